"""`acm writer`: persist the durable decision streams into every enabled sink, exactly once.

Delivery model:
- Each sink has its own consumer group on every partition stream (`acm.<sink>`) and its own
  thread. A group acknowledges (XACK) a record only after its sink committed it; a down sink's
  group simply stops advancing (its backlog waits in the stream) while the other sinks go on.
- Writes are idempotent (upsert on the alert version, QuestDB DEDUP keys, ClickHouse version
  check), so redelivery after a crash is harmless: at-least-once + idempotent = exactly once.
- A restarted writer first re-reads its own pending entries (same consumer name), then claims
  entries another consumer left pending longer than `claim_idle_ms` (XAUTOCLAIM).
- A record that cannot be parsed, or that the sink rejects, goes to the dead-letter stream
  `{acm.dlq}:s` with the reason and is acknowledged, so it never blocks the rest. A rejected
  batch is bisected to find the bad record(s).
- Streams are trimmed (XTRIM MINID) only below the oldest entry some group still needs: the
  smallest pending id, or the first undelivered one.
- SIGTERM: every sink finishes (writes and acknowledges) the batch in hand, then stops; a batch
  its sink cannot take within the grace period stays pending for the next writer.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from acm_module.engine import hotpath
from acm_module.errors import StoreError
from acm_module.persist import records as rec
from acm_module.persist.base import Sink, SinkRejected, SinkUnavailable
from acm_module.persist.streamconn import StreamConnection
from acm_module.store import keys
from acm_module.store.conn import StoreConnection

AnyConn = StoreConnection | StreamConnection

log = logging.getLogger("acm.writer")

DLQ_KEY = "{acm.dlq}:s"
STATS_KEY = "{acm.stats}:writer"
GROUP_PREFIX = "acm."
FRESH_S = 10.0

RETRYABLE: tuple[type[BaseException], ...] = (SinkUnavailable, StoreError)

def group_name(sink_name: str) -> str:
    """Return the consumer group of a sink."""
    return GROUP_PREFIX + sink_name


@dataclass
class WriterConfig:
    """How the writer reads, retries and trims (see the writer settings)."""

    store_url: str
    partitions: int = 16
    consumer: str = field(default_factory=socket.gethostname)
    batch: int = 5000  # records per batch (spread over the partition streams)
    block_ms: int = 500  # XREADGROUP BLOCK: also bounds how fast SIGTERM is noticed
    claim_idle_ms: int = 60000  # take over entries another consumer left pending this long
    backoff_base_s: float = 0.2
    backoff_max_s: float = 30.0
    graceful_timeout_s: float = 10.0
    trim_interval_s: float = 5.0
    stats_interval_s: float = 1.0
    dlq_maxlen: int = 1_000_000
    # Every sink of the deployment, also those fed by other writer processes: their groups are
    # created at start (from the beginning of the stream) and trimming waits for all of them.
    all_sinks: tuple[str, ...] = ()


@dataclass
class SinkStats:
    """Counters and state of one sink's runner (published as JSON)."""

    state: str = "starting"  # starting | up | down | stopped
    batches: int = 0
    decisions: int = 0
    alerts: int = 0
    acked: int = 0
    dead_lettered: int = 0
    retries: int = 0
    consecutive_failures: int = 0
    backoff_s: float = 0.0
    last_error: str = ""
    last_ok: float = 0.0
    reclaimed: int = 0


class Backoff:
    """Jittered exponential backoff ("equal jitter": half fixed, half random)."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """Return the delay before the next attempt and count a failure."""
        d = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return d / 2 + self._rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.failures = 0


Entry = tuple[str, str, "dict[str, str] | None"]  # (stream, entry id, fields or None if deleted)


def _s(x: Any) -> Any:
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def _decode_entries(stream: str, entries: Iterable[Any]) -> list[Entry]:
    out: list[Entry] = []
    for eid, f in entries:
        if f is None:
            out.append((stream, _s(eid), None))
        elif f and isinstance(f[0], str):
            out.append((stream, eid, dict(zip(f[::2], f[1::2], strict=False))))
        else:
            out.append((stream, _s(eid), {_s(f[i]): _s(f[i + 1])
                                          for i in range(0, len(f) - 1, 2)}))
    return out


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _next_id(eid: str) -> str:
    ms, _, seq = eid.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


class SinkRunner:
    """Feed one sink from its consumer group, in its own thread."""

    def __init__(self, sink: Sink, cfg: WriterConfig, stop: threading.Event) -> None:
        self.sink = sink
        self.cfg = cfg
        self.stop = stop
        self.group = group_name(sink.name)
        self.streams = keys.streams(cfg.partitions)
        self.stats = SinkStats()
        self.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        self.store = StreamConnection(cfg.store_url, timeout=5.0)
        self.thread = threading.Thread(target=self.run, name=f"sink-{sink.name}", daemon=True)
        self._own_cursor: dict[str, str] | None = None  # own-pending scan; None when done
        self._claim_next = 0.0
        self._stop_deadline = 0.0
        self._sink_open = False
        # Test hook: called after the sink committed a batch, before the XACK.
        self.after_commit: Callable[[list[Entry]], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        """Read, write, acknowledge until stopped; never raises.

        An unexpected error (a bug, an unclassified driver error) restarts the loop after a
        backoff: what was in hand is still pending and is re-read first.
        """
        try:
            while not self.stop.is_set():
                try:
                    self._run()
                except Exception as e:
                    log.exception("sink %s: unexpected error; restarting its loop",
                                  self.sink.name)
                    self.sink.close()
                    self._sink_open = False
                    self.store.close()
                    self._failed(e)
        finally:
            self.sink.close()
            self.store.close()
            self.stats.state = "stopped"

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._ensure_groups()
                break
            except StoreError as e:
                self._failed(e)
        while not self.stop.is_set() and not self._sink_open:
            try:
                self.sink.open()
                self._sink_open = True
                self.stats.state = "up"
                self.backoff.reset()
            except RETRYABLE as e:
                self.sink.close()
                self._failed(e)
        self._own_cursor = {s: "0" for s in self.streams}
        while not self.stop.is_set():
            try:
                batch = self._next_batch()
            except StoreError as e:
                self._failed(e)
                continue
            if batch:
                self._stop_deadline = 0.0
                self._process(batch)
            self._tick()

    def _tick(self) -> None:
        if self._sink_open:
            try:
                self.sink.tick()
            except Exception as e:  # side work must never stop the sink
                log.debug("sink %s: tick failed: %s", self.sink.name, e)

    def _sleep(self, seconds: float) -> None:
        # On stop, still wait (bounded by the grace period) so a batch in hand can finish.
        if self.stop.is_set():
            if not self._stop_deadline:
                self._stop_deadline = time.monotonic() + self.cfg.graceful_timeout_s
            seconds = min(seconds, max(0.0, self._stop_deadline - time.monotonic()))
            time.sleep(seconds)
        else:
            self.stop.wait(seconds)

    def _failed(self, e: BaseException) -> None:
        delay = self.backoff.next()
        st = self.stats
        st.state = "down"
        st.retries += 1
        st.consecutive_failures = self.backoff.failures
        st.backoff_s = round(delay, 3)
        st.last_error = str(e)[:300]
        if self.backoff.failures in (1, 2) or self.backoff.failures % 20 == 0:
            log.warning("sink %s: %s (retry in %.2fs, failure %d)", self.sink.name, e, delay,
                        self.backoff.failures)
        self._sleep(delay)

    # -- reading -----------------------------------------------------------------------------
    def _ensure_groups(self) -> None:
        """Create the sink's group on every stream (from the start of what is retained)."""
        cmds = b"".join(hotpath.encode_command("XGROUP", "CREATE", s, self.group, "0",
                                               "MKSTREAM") for s in self.streams)
        for r in self.store.round_trip(cmds, len(self.streams), 5.0):
            if isinstance(r, hotpath.RespError) and not r.message.startswith("BUSYGROUP"):
                raise StoreError(f"XGROUP CREATE: {r.message}")

    def _count(self) -> int:
        return max(1, -(-self.cfg.batch // len(self.streams)))

    def _next_batch(self) -> list[Entry]:
        if self._own_cursor:
            return self._read_own_pending()
        now = time.monotonic()
        if now >= self._claim_next:
            self._claim_next = now + max(1.0, self.cfg.claim_idle_ms / 2000.0)
            claimed = self._claim()
            if claimed:
                return claimed
        return self._read_new()

    def _xreadgroup(self, ids: list[str], streams: list[str], block: bool) -> list[Entry]:
        args: list[str | int] = ["XREADGROUP", "GROUP", self.group, self.cfg.consumer,
                                 "COUNT", self._count()]
        if block:
            args += ["BLOCK", self.cfg.block_ms]
        args += ["STREAMS", *streams, *ids]
        r = self.store.call(*args, timeout=self.cfg.block_ms / 1000.0 + 5.0)
        out: list[Entry] = []
        for stream, entries in r or []:  # type: ignore[union-attr]
            out += _decode_entries(_s(stream), entries)
        return out

    def _read_own_pending(self) -> list[Entry]:
        """Re-read what this consumer was delivered but never acknowledged (a restart)."""
        cur = self._own_cursor
        assert cur is not None
        streams = list(cur)
        got = self._xreadgroup([cur[s] for s in streams], streams, block=False)
        seen: set[str] = set()
        for stream, eid, _ in got:
            cur[stream] = eid
            seen.add(stream)
        for s in streams:
            if s not in seen:
                del cur[s]
        if got:
            self.stats.reclaimed += len(got)
            log.info("sink %s: re-processing %d pending entries", self.sink.name, len(got))
        if not cur:
            self._own_cursor = None
        return got

    def _claim(self) -> list[Entry]:
        """Take over entries other (dead) consumers left pending longer than claim_idle_ms."""
        out: list[Entry] = []
        for s in self.streams:
            r = self.store.call("XAUTOCLAIM", s, self.group, self.cfg.consumer,
                                self.cfg.claim_idle_ms, "0-0", "COUNT", self._count(),
                                timeout=5.0)
            assert isinstance(r, list)
            out += _decode_entries(s, r[1])
            if len(r) > 2:  # Redis 7: ids whose entries were deleted; nothing to write
                for eid in r[2] or []:
                    out.append((s, _s(eid), None))
        if out:
            self.stats.reclaimed += len(out)
            log.info("sink %s: claimed %d entries left pending by another writer",
                     self.sink.name, len(out))
        return out

    def _read_new(self) -> list[Entry]:
        return self._xreadgroup([">"] * len(self.streams), self.streams, block=True)

    # -- writing -----------------------------------------------------------------------------
    def _parse(self, batch: list[Entry]) -> tuple[list[tuple[Entry, Any]], list[tuple[Entry, str]]]:
        items: list[tuple[Entry, Any]] = []
        poison: list[tuple[Entry, str]] = []
        kinds = self.sink.kinds
        for e in batch:
            stream, eid, f = e
            if f is None:
                continue  # trimmed while pending: nothing left to write
            k = f.get("k")
            try:
                if k == "d":
                    if "d" in kinds:
                        items.append((e, rec.parse_decision(f"{stream}/{eid}", f)))
                elif k == "a":
                    if "a" in kinds:
                        items.append((e, rec.parse_alert(f"{stream}/{eid}", f)))
                else:
                    raise rec.RecordError(f"unknown record kind {k!r}")
            except rec.RecordError as err:
                poison.append((e, f"unparsable: {err}"))
        return items, poison

    def _write(self, items: list[tuple[Entry, Any]], poison: list[tuple[Entry, str]]) -> None:
        """Write items; isolate what the sink rejects by bisection. Raises SinkUnavailable."""
        if not items:
            return
        ds = [x for _, x in items if isinstance(x, rec.Decision)]
        als = [x for _, x in items if isinstance(x, rec.AlertChange)]
        try:
            self.sink.write(ds, als)
        except SinkRejected as e:
            if len(items) == 1:
                poison.append((items[0][0], f"rejected by {self.sink.name}: {e}"))
                return
            mid = len(items) // 2
            self._write(items[:mid], poison)
            self._write(items[mid:], poison)

    def _process(self, batch: list[Entry]) -> None:
        """Write a batch until it is committed (or the stop grace runs out), then ack it."""
        items, poison = self._parse(batch)
        while True:
            try:
                if not self._sink_open:
                    self.sink.open()
                    self._sink_open = True
                bad = list(poison)
                self._write(items, bad)
                break
            except RETRYABLE as e:
                self._sink_open = False
                self.sink.close()
                if self._gave_up():
                    return
                self._failed(e)
                if self._gave_up():
                    return
        if self.after_commit is not None:
            self.after_commit(batch)
        while True:
            try:
                self._dead_letter(bad)
                self._ack(batch)
                break
            except StoreError as e:
                if self._gave_up():
                    return
                self._failed(e)
        st = self.stats
        st.state = "up"
        st.batches += 1
        st.decisions += sum(isinstance(x, rec.Decision) for _, x in items)
        st.alerts += sum(isinstance(x, rec.AlertChange) for _, x in items)
        st.acked += len(batch)
        st.dead_lettered += len(bad)
        st.consecutive_failures = 0
        st.backoff_s = 0.0
        st.last_ok = time.time()
        self.backoff.reset()

    def _gave_up(self) -> bool:
        if self.stop.is_set() and self._stop_deadline and time.monotonic() >= self._stop_deadline:
            log.warning("sink %s: stopping with a batch unwritten; it stays pending",
                        self.sink.name)
            return True
        return False

    def _dead_letter(self, bad: list[tuple[Entry, str]]) -> None:
        if not bad:
            return
        cmds = []
        for (stream, eid, f), reason in bad:
            log.error("sink %s: dead-lettered %s %s: %s", self.sink.name, stream, eid, reason)
            cmds.append(hotpath.encode_command(
                "XADD", DLQ_KEY, "MAXLEN", "~", self.cfg.dlq_maxlen, "*", "stream", stream,
                "id", eid, "sink", self.sink.name, "reason", reason,
                "record", json.dumps(f or {}, separators=(",", ":"))))
        for r in self.store.round_trip(b"".join(cmds), len(cmds), 5.0):
            if isinstance(r, hotpath.RespError):
                raise StoreError(f"dead-letter XADD: {r.message}")

    def _ack(self, batch: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, eid, _ in batch:
            by_stream.setdefault(stream, []).append(eid)
        cmds = b"".join(hotpath.encode_command("XACK", s, self.group, *ids)
                        for s, ids in by_stream.items())
        for r in self.store.round_trip(cmds, len(by_stream), 5.0):
            if isinstance(r, hotpath.RespError):
                raise StoreError(f"XACK: {r.message}")


# -- trimming and stats (shared by every writer; each call is safe to repeat) -----------------
def group_positions(store: AnyConn, stream: str) -> dict[str, dict[str, Any]]:
    """Return {group: {pending, last_delivered, lag, min_pending}} of one stream."""
    try:
        raw = store.call("XINFO", "GROUPS", stream, timeout=5.0)
    except StoreError as e:
        if "no such key" in str(e).lower():
            return {}
        raise
    out: dict[str, dict[str, Any]] = {}
    for g in raw or []:  # type: ignore[union-attr]
        d = _pairs(g)
        name = _s(d["name"])
        pending = int(d.get("pending") or 0)
        lag = d.get("lag")
        info: dict[str, Any] = {"pending": pending,
                                "last_delivered": _s(d["last-delivered-id"]),
                                "lag": None if lag is None else int(lag), "min_pending": None}
        if pending:
            summary = store.call("XPENDING", stream, name, timeout=5.0)
            assert isinstance(summary, list)
            if summary[1] is not None:
                info["min_pending"] = _s(summary[1])
        out[name] = info
    return out


def safe_trim_id(groups: dict[str, dict[str, Any]], required: Iterable[str]) -> str | None:
    """Return the MINID below which every group has acknowledged everything, or None.

    None when a required group does not exist yet (its sink would lose what is trimmed).
    """
    if not groups or any(g not in groups for g in required):
        return None
    best: str | None = None
    for info in groups.values():
        keep = info["min_pending"] or _next_id(info["last_delivered"])
        if best is None or _id_key(keep) < _id_key(best):
            best = keep
    return best


def trim_streams(store: AnyConn, partitions: int, required: Iterable[str]) -> int:
    """Trim every partition stream below what all groups acknowledged; return entries removed."""
    required = list(required)
    removed = 0
    for s in keys.streams(partitions):
        minid = safe_trim_id(group_positions(store, s), required)
        if minid is not None:
            removed += int(store.call("XTRIM", s, "MINID", minid, timeout=5.0))  # type: ignore[arg-type]
    return removed


def writer_stats(store: AnyConn, partitions: int = 16) -> dict[str, Any]:
    """Return backlog per sink (pending, lag, from the groups) and the writers' published state.

    `pending`: delivered to the sink but not yet committed; `lag`: not yet delivered (None when
    the server does not report it). Both summed over the partition streams.
    """
    sinks: dict[str, dict[str, Any]] = {}
    for s in keys.streams(partitions):
        for g, info in group_positions(store, s).items():
            if not g.startswith(GROUP_PREFIX):
                continue
            agg = sinks.setdefault(g[len(GROUP_PREFIX):], {"pending": 0, "lag": 0})
            agg["pending"] += info["pending"]
            if info["lag"] is None or agg["lag"] is None:
                agg["lag"] = None
            else:
                agg["lag"] += info["lag"]
    writers = []
    raw = store.call("HGETALL", STATS_KEY, timeout=5.0)
    now = time.time()
    for i in range(0, len(raw or []), 2):  # type: ignore[arg-type]
        snap = json.loads(raw[i + 1])  # type: ignore[index]
        if now - snap.get("updated", 0) <= FRESH_S:
            writers.append(snap)
            for name, st in snap.get("sinks", {}).items():
                sinks.setdefault(name, {"pending": 0, "lag": 0}).setdefault("writers", []).append(
                    {"writer": snap["writer"], **st})
    dlq = store.call("XLEN", DLQ_KEY, timeout=5.0)
    return {"sinks": sinks, "dead_letters": int(dlq or 0), "writers": len(writers)}  # type: ignore[arg-type]


# -- the process ---------------------------------------------------------------------------
class Writer:
    """The writer process: one runner thread per sink, trimming and stats on the main thread."""

    def __init__(self, cfg: WriterConfig, sinks: list[Sink],
                 periodic: list[tuple[float, Callable[[], None]]] | None = None) -> None:
        if not sinks:
            raise ValueError("no sink enabled")
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.runners = [SinkRunner(s, cfg, self.stop_event) for s in sinks]
        self.store = StreamConnection(cfg.store_url, timeout=5.0)
        self.periodic = list(periodic or [])  # (interval_s, fn): e.g. whitelist sync
        self.field = f"{socket.gethostname()}/{os.getpid()}"
        self._signals: list[int] = []
        self._groups_ok = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # the main loop acts on it
        self.stop_event.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("writer %s: sinks %s, consumer %r, %d partitions", self.field,
                 ", ".join(r.sink.name for r in self.runners), self.cfg.consumer,
                 self.cfg.partitions)
        for r in self.runners:
            r.start()
        timers = [(self.cfg.trim_interval_s, self._ensure_then_trim), (self.cfg.stats_interval_s,
                                                          self.publish_stats), *self.periodic]
        due = [0.0] * len(timers)
        failing = [0] * len(timers)
        while not self.stop_event.is_set():
            now = time.monotonic()
            for i, (interval, fn) in enumerate(timers):
                if now >= due[i]:
                    due[i] = now + interval
                    name = getattr(fn, "__name__", str(fn))
                    try:
                        fn()
                    except Exception as e:  # housekeeping retries next time
                        self.store.close()
                        failing[i] += 1
                        # Log the first failure and then every 100th, not every interval.
                        if failing[i] % 100 == 1:
                            log.warning("writer: %s failed (%d times): %s", name, failing[i],
                                        str(e).splitlines()[0] if str(e) else repr(e))
                        continue
                    if failing[i]:
                        log.info("writer: %s works again", name)
                        failing[i] = 0
            self.stop_event.wait(0.1)
        log.info("writer: stopping (signal %s); finishing the batches in hand", self._signals)
        deadline = time.monotonic() + self.cfg.graceful_timeout_s + self.cfg.block_ms / 1000 + 2
        for r in self.runners:
            r.thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.publish_stats()
            self.store.call("HDEL", STATS_KEY, self.field)
        except StoreError:
            pass
        self.store.close()
        return 0

    def _ensure_then_trim(self) -> None:
        if not self._groups_ok:
            self.ensure_groups()
            self._groups_ok = True
        self.trim()

    def required_groups(self) -> list[str]:
        """Return the groups trimming must wait for: this writer's and the deployment's."""
        names = {r.sink.name for r in self.runners} | set(self.cfg.all_sinks)
        return sorted(group_name(n) for n in names)

    def ensure_groups(self) -> None:
        """Create every required group, so no record is trimmed before its sink first runs."""
        streams = keys.streams(self.cfg.partitions)
        cmds = [hotpath.encode_command("XGROUP", "CREATE", s, g, "0", "MKSTREAM")
                for g in self.required_groups() for s in streams]
        for r in self.store.round_trip(b"".join(cmds), len(cmds), 10.0):
            if isinstance(r, hotpath.RespError) and not r.message.startswith("BUSYGROUP"):
                raise StoreError(f"XGROUP CREATE: {r.message}")

    def trim(self) -> None:
        """Trim the partition streams to what every group acknowledged."""
        n = trim_streams(self.store, self.cfg.partitions, self.required_groups())
        if n:
            log.debug("trimmed %d acknowledged entries", n)

    def snapshot(self) -> dict[str, Any]:
        return {"writer": self.field, "consumer": self.cfg.consumer, "updated": time.time(),
                "sinks": {r.sink.name: asdict(r.stats) for r in self.runners}}

    def publish_stats(self) -> None:
        """Write this writer's per-sink state into the stats hash."""
        self.store.call("HSET", STATS_KEY, self.field,
                        json.dumps(self.snapshot(), separators=(",", ":")), timeout=5.0)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when its parent dies (no orphaned sink writers)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ProcessPerSink:
    """Run each sink's writer in its own forked process, so sinks use separate cores.

    The parent only forks, forwards SIGTERM/SIGINT and respawns a child that died (after a
    jittered backoff); everything with a connection is created in the child, after fork().
    """

    def __init__(self, cfg: WriterConfig, factories: dict[str, Callable[[], Sink]],
                 periodic: Callable[[], list[tuple[float, Callable[[], None]]]] | None = None
                 ) -> None:
        if not factories:
            raise ValueError("no sink enabled")
        self.cfg = cfg
        self.factories = factories
        self.periodic = periodic  # built in the first sink's child only
        self.children: dict[int, str] = {}
        self.stopping = False
        self._backoff = {n: Backoff(0.5, 30.0) for n in factories}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _spawn(self, name: str) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = name
            return
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            first = name == next(iter(self.factories))
            periodic = self.periodic() if (first and self.periodic) else []
            code = Writer(self.cfg, [self.factories[name]()], periodic).run()
        except BaseException:
            log.exception("writer child for sink %s failed", name)
        finally:
            logging.shutdown()
            os._exit(code)

    def run(self) -> int:
        """Fork the children and keep them running until SIGTERM/SIGINT; return 0."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for name in self.factories:
            self._spawn(name)
        due: dict[str, float] = {}
        while not self.stopping:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid and pid in self.children:
                name = self.children.pop(pid)
                delay = self._backoff[name].next()
                log.error("writer child for sink %s (pid %d) exited with status %d; "
                          "restarting in %.1fs", name, pid, status, delay)
                due[name] = time.monotonic() + delay
            for name, at in list(due.items()):
                if time.monotonic() >= at and not self.stopping:
                    del due[name]
                    self._spawn(name)
            time.sleep(0.1)
        deadline = time.monotonic() + self.cfg.graceful_timeout_s + 10
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in self.children:
            log.error("writer child %d did not stop in time; killing it", pid)
            os.kill(pid, signal.SIGKILL)
        return 0
