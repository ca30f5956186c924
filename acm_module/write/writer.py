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
  smallest pending id, or the first undelivered one. The groups waited for are every group on
  the stream; the deployment's sinks (this writer's, and those with a URL setting) get theirs
  created at start, so none misses a record before its writer first runs.
- A group with a backlog that makes no progress while no live writer feeds its sink (a sink
  taken out of a deployment, a writer that is gone, a foreign reader that stopped) is reported
  once `writer_group_max_idle` has passed (a log line and the `acm_stream_group_*` metrics) and
  from then on no longer holds back trimming, so the streams stay bounded: every record then
  trimmed before it acknowledged it is counted (`acm_stream_group_trimmed_unread_records`, an
  ERROR line at most once a minute). A sink whose writer is alive (even if its database is
  down) always holds back trimming. `writer_group_max_idle = 0` never releases a group.
- SIGTERM: every sink finishes (writes and acknowledges) the batch in hand, then stops; a batch
  its sink cannot take within the grace period stays pending for the next writer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from acm_module.core import keys
from acm_module.core import records as rec
from acm_module.core.arbiter import Arbiter, Exited
from acm_module.core.backoff import Backoff
from acm_module.core.errors import StoreError, StoreReplyError
from acm_module.core.redis import read_groups
from acm_module.write.base import Sink, SinkRejected, SinkUnavailable
from acm_module.write.store import StreamStore

log = logging.getLogger("acm.writer")

DLQ_KEY = "{acm.dlq}:s"
STATS_KEY = "{acm.stats}:writer"
GROUPS_KEY = "{acm.stats}:groups"  # group -> JSON {idle_s, released, updated}
# "<stream>|<group>" -> JSON [last delivered id, pending, since (unix s), released]
IDLE_KEY = "{acm.stats}:idle"
TRIMMED_UNREAD_KEY = "{acm.stats}:trimmed_unread"  # group -> records trimmed it never acked
LOSS_LOG_EVERY_S = 60.0
# Set each clock (field, expected, new) only if it still holds what this writer read: a refresh
# must not undo a release another writer made after this one loaded the clocks.
# Restart clocks only where nobody changed them since they were read; return the fields that
# another writer changed meanwhile.
_CAS_CLOCKS = """
local changed = {}
for i = 1, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  else
    changed[#changed + 1] = ARGV[i]
  end
end
return changed
"""
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
    group_max_idle_s: float = 3600.0  # 0: a group nobody reads holds back trimming for ever
    stats_interval_s: float = 1.0
    dlq_maxlen: int = 1_000_000
    # Every sink of the deployment, also those fed by other writer processes: their groups are
    # created at start (from the beginning of the stream), so trimming waits for them.
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


Entry = tuple[str, str, "dict[str, str] | None"]  # (stream, entry id, fields or None if deleted)


def _entries(stream: str, entries: Iterable[tuple[str, dict[str, str]]]) -> list[Entry]:
    # redis-py gives a deleted entry (trimmed while pending) no fields; XADD needs at least one.
    return [(stream, eid, f or None) for eid, f in entries]


def _read_reply(reply: list[Any]) -> list[Entry]:
    """Return the entries of read_groups' raw reply ([[stream, [[id, [f, v, ...]]]], ...])."""
    out: list[Entry] = []
    for stream, entries in reply:
        out += [(stream, eid, dict(zip(f[::2], f[1::2], strict=False)) if f else None)
                for eid, f in entries]
    return out


def _hash(store: StreamStore, key: str) -> dict[str, str]:
    return store.call("HGETALL", key) or {}


def _check(replies: list[Any], what: str, ok: str = "") -> None:
    """Raise StoreError for the first error reply (but those starting with `ok`)."""
    for r in replies:
        if isinstance(r, StoreReplyError) and not (ok and r.message.startswith(ok)):
            raise StoreError(f"{what}: {r.message}")


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
        # A blocking read waits block_ms before its reply: the socket must wait longer.
        self.store = StreamStore(cfg.store_url, timeout=cfg.block_ms / 1000.0 + 5.0)
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
        _check(self.store.pipeline([("XGROUP", "CREATE", s, self.group, "0", "MKSTREAM")
                                    for s in self.streams], self.streams),
               "XGROUP CREATE", ok="BUSYGROUP")

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
        with self.store.errors():
            reply = read_groups(self.store.get(), self.group, self.cfg.consumer,
                                dict(zip(streams, ids, strict=True)), self._count(),
                                self.cfg.block_ms if block else None, self.stop.wait, raw=True)
        return _read_reply(reply)

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
        replies = self.store.pipeline([("XAUTOCLAIM", s, self.group, self.cfg.consumer,
                                         self.cfg.claim_idle_ms, "0-0", "COUNT", self._count())
                                        for s in self.streams], self.streams)
        for s, r in zip(self.streams, replies, strict=True):
            if isinstance(r, StoreReplyError):
                raise r
            out += _entries(s, r[1])
            if len(r) > 2:  # Redis 7: ids whose entries were deleted; nothing to write
                out += [(s, eid, None) for eid in r[2] or []]
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
            cmds.append(("XADD", DLQ_KEY, "MAXLEN", "~", self.cfg.dlq_maxlen, "*",
                         "stream", stream, "id", eid, "sink", self.sink.name, "reason", reason,
                         "record", json.dumps(f or {}, separators=(",", ":"))))
        _check(self.store.pipeline(cmds), "dead-letter XADD")

    def _ack(self, batch: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, eid, _ in batch:
            by_stream.setdefault(stream, []).append(eid)
        _check(self.store.pipeline([("XACK", s, self.group, *ids)
                                    for s, ids in by_stream.items()], list(by_stream)), "XACK")


# -- trimming and stats (shared by every writer; each call is safe to repeat) -----------------
def group_positions(store: StreamStore, stream: str) -> dict[str, dict[str, Any]]:
    """Return {group: {pending, last_delivered, lag, min_pending}} of one stream."""
    try:
        with store.errors():
            raw = store.client.xinfo_groups(stream)
    except StoreReplyError as e:
        if "no such key" in str(e).lower():
            return {}
        raise
    out: dict[str, dict[str, Any]] = {}
    for d in raw or []:
        name = d["name"]
        pending = int(d.get("pending") or 0)
        lag = d.get("lag")
        info: dict[str, Any] = {"pending": pending, "last_delivered": d["last-delivered-id"],
                                "lag": None if lag is None else int(lag), "min_pending": None}
        if pending:
            with store.errors():
                summary = store.client.xpending(stream, name)
            info["min_pending"] = summary["min"]
        out[name] = info
    return out


def _keep(info: dict[str, Any]) -> str:
    """Return the oldest entry id a group still needs (its oldest pending, or next to read)."""
    return info["min_pending"] or _next_id(info["last_delivered"])


def safe_trim_id(groups: dict[str, dict[str, Any]], required: Iterable[str],
                 released: Iterable[str] = ()) -> str | None:
    """Return the MINID below which every group not released has acknowledged everything.

    None when a required group does not exist yet (its sink would lose what is trimmed), or
    when no group holds back.
    """
    if not groups or any(g not in groups for g in required):
        return None
    skip = set(released)
    best: str | None = None
    for name, info in groups.items():
        if name in skip:
            continue
        keep = _keep(info)
        if best is None or _id_key(keep) < _id_key(best):
            best = keep
    return best


def trim_stream(store: StreamStore, stream: str, groups: dict[str, dict[str, Any]],
                required: Iterable[str], released: Iterable[str] = ()
                ) -> tuple[int, dict[str, int]]:
    """Trim one stream below what every group not released acknowledged.

    Return (entries removed, {released group: entries removed that it had not acknowledged}).
    The trim goes in steps, one at each released group's own position, so each step's count
    is exactly the records the groups behind it lose.
    """
    released = [g for g in released if g in groups]
    minid = safe_trim_id(groups, required, released)
    if minid is None:
        return 0, {}
    keeps = {g: _keep(groups[g]) for g in released}
    cuts = sorted({k for k in keeps.values() if _id_key(k) < _id_key(minid)}, key=_id_key)
    removed, lost, prev = 0, {}, None
    for cut in [*cuts, minid]:
        n = int(store.call("XTRIM", stream, "MINID", cut))
        removed += n
        if prev is not None and n:
            for g, k in keeps.items():
                if _id_key(k) <= _id_key(prev):
                    lost[g] = lost.get(g, 0) + n
        prev = cut
    return removed, lost


def trim_streams(store: StreamStore, partitions: int, required: Iterable[str]) -> int:
    """Trim every partition stream below what all groups acknowledged; return entries removed."""
    required = list(required)
    return sum(trim_stream(store, s, group_positions(store, s), required)[0]
               for s in keys.streams(partitions))


def _has_backlog(store: StreamStore, stream: str, info: dict[str, Any]) -> bool:
    """Say whether a group has records to read or to acknowledge on a stream."""
    if info["pending"] or (info["lag"] or 0) > 0:
        return True
    if info["lag"] is not None:
        return False
    # The server does not know the lag (deleted entries): compare with the newest entry.
    last = store.call("XREVRANGE", stream, "+", "-", "COUNT", 1)
    return bool(last) and _id_key(last[0][0]) > _id_key(info["last_delivered"])


class GroupWatch:
    """Tell, per stream and group, how long a backlog has waited with nobody reading it, and
    which groups no longer hold back trimming.

    Progress is a change of the group's last-delivered id or pending count; a group whose sink
    has a live writer (a fresh stats snapshot) is being read even when its database is down. A
    group released after `max_idle_s` stays released until it makes progress again (a stream
    trimmed empty does not bring it back). The clocks live in the store (`IDLE_KEY`), so every
    writer that trims sees the same ones.
    """

    def __init__(self, max_idle_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_idle_s = max_idle_s
        self._clock = clock
        self._shared: dict[str, list[Any]] = {}
        self._raw: dict[str, str] = {}  # the clocks as loaded, for the compare-and-set
        self._writes: dict[str, list[Any]] = {}
        self._refresh: dict[str, list[Any]] = {}  # clocks only restarted: compare-and-set
        self._seen: set[str] = set()
        self.newly_released: set[str] = set()  # groups this writer released in this pass
        # Groups whose clock another writer changed after this pass read it (it released the
        # group and trimmed what it held, say): this pass's view of them is out of date.
        self.stale: set[str] = set()

    def load(self, store: StreamStore) -> None:
        """Read the shared clocks; call once per pass, before observe()."""
        self._shared, self._writes, self._refresh, self._seen = {}, {}, {}, set()
        self.newly_released, self.stale = set(), set()
        self._raw = _hash(store, IDLE_KEY)
        for k, v in self._raw.items():
            try:
                rec = json.loads(v)
            except (TypeError, ValueError):
                continue
            if isinstance(rec, list) and len(rec) == 4:
                self._shared[k] = rec

    def observe(self, store: StreamStore, stream: str, groups: dict[str, dict[str, Any]],
                attended: set[str]) -> dict[str, tuple[float, bool]]:
        """Return {group: (seconds without progress on `stream`, released)}."""
        now = self._clock()
        out: dict[str, tuple[float, bool]] = {}
        for g, info in groups.items():
            key = f"{stream}|{g}"
            self._seen.add(key)
            ld, pending = info["last_delivered"], info["pending"]
            rec = self._shared.get(key)
            same = rec is not None and rec[0] == ld and rec[1] == pending
            if (not same or g in attended
                    or (not rec[3] and not _has_backlog(store, stream, info))):  # type: ignore[index]
                if not same:  # progress: whatever was stored
                    self._writes[key] = [ld, pending, now, False]
                elif rec[3] or now - rec[2] > 1.0:  # type: ignore[index]
                    # A group being read, or one with nothing to read: restart the clock. The
                    # latter unless another writer has meanwhile released the group (it saw
                    # the backlog this writer now sees trimmed).
                    (self._writes if g in attended else self._refresh)[key] = [
                        ld, pending, now, False]
                out[g] = (0.0, False)
                continue
            assert rec is not None
            idle = max(0.0, now - float(rec[2]))
            released = bool(rec[3])
            if not released and self.max_idle_s > 0 and idle >= self.max_idle_s:
                released = True
                self._writes[key] = [ld, pending, rec[2], True]
                self.newly_released.add(g)
            out[g] = (idle, released)
        return out

    def save(self, store: StreamStore) -> None:
        """Write the clocks that changed; forget those of groups and streams that are gone."""
        cmds: list[tuple[Any, ...]] = []
        if self._writes:
            cmds.append(("HSET", IDLE_KEY, *[x for k, rec in self._writes.items()
                                             for x in (k, json.dumps(rec, separators=(",", ":")))]))
        if self._refresh:
            cmds.append(("EVAL", _CAS_CLOCKS, 1, IDLE_KEY, *[
                x for k, rec in self._refresh.items()
                for x in (k, self._raw[k], json.dumps(rec, separators=(",", ":")))]))
        gone = [k for k in self._shared if k not in self._seen]
        if gone:
            cmds.append(("HDEL", IDLE_KEY, *gone))
        replies = store.pipeline(cmds)
        _check(replies, "group clocks")
        if self._refresh:
            changed = replies[1 if self._writes else 0]
            self.stale = {k.split("|", 1)[1] for k in changed or ()}


def writer_stats(store: StreamStore, partitions: int = 16) -> dict[str, Any]:
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
    now = time.time()
    for v in _hash(store, STATS_KEY).values():
        snap = json.loads(v)
        if now - snap.get("updated", 0) <= FRESH_S:
            writers.append(snap)
            for name, st in snap.get("sinks", {}).items():
                sinks.setdefault(name, {"pending": 0, "lag": 0}).setdefault("writers", []).append(
                    {"writer": snap["writer"], **st})
    dlq = store.call("XLEN", DLQ_KEY)
    groups = {k: json.loads(v) for k, v in _hash(store, GROUPS_KEY).items()}
    for k, v in _hash(store, TRIMMED_UNREAD_KEY).items():
        groups.setdefault(k, {})["trimmed_unread"] = int(v)
    return {"sinks": sinks, "dead_letters": int(dlq or 0), "writers": len(writers),
            "groups": groups}


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
        self.store = StreamStore(cfg.store_url, timeout=10.0)
        self.periodic = list(periodic or [])  # (interval_s, fn): e.g. whitelist sync
        self.field = f"{socket.gethostname()}/{os.getpid()}"
        self._signals: list[int] = []
        self._groups_ok = False
        self.watch = GroupWatch(cfg.group_max_idle_s)
        self._released: set[str] = set()
        self._unlogged_loss: dict[str, int] = {}
        self._loss_logged_at: dict[str, float] = {}

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
        groups = self.required_groups()
        _check(self.store.pipeline([("XGROUP", "CREATE", s, g, "0", "MKSTREAM")
                                    for g in groups for s in streams], streams * len(groups)),
               "XGROUP CREATE", ok="BUSYGROUP")

    def trim(self) -> None:
        """Trim the partition streams to what every group acknowledged, releasing the groups
        nobody has read for `group_max_idle_s`, and publish the groups' state."""
        attended = self._attended_groups()
        required = self.required_groups()
        idle_of: dict[str, float] = {}
        released_any: set[str] = set()
        lost: dict[str, int] = {}
        removed = 0
        self.watch.load(self.store)
        for s in keys.streams(self.cfg.partitions):
            groups = group_positions(self.store, s)
            seen = self.watch.observe(self.store, s, groups, attended)
            released = [g for g, (_, rel) in seen.items() if rel]
            for g, (secs, _) in seen.items():
                idle_of[g] = max(idle_of.get(g, 0.0), secs)
            released_any.update(released)
            n, lost_here = trim_stream(self.store, s, groups,
                                       [g for g in required if g not in released], released)
            removed += n
            for g, k in lost_here.items():
                lost[g] = lost.get(g, 0) + k
        self.watch.save(self.store)
        for g in self.watch.stale:
            # Publish nothing for it this pass: the writer that changed its clock did.
            idle_of.pop(g, None)
            if g in self._released:
                released_any.add(g)
        if removed:
            log.debug("trimmed %d acknowledged entries", removed)
        self._report(idle_of, released_any, lost)

    def _attended_groups(self) -> set[str]:
        """Return the groups of the sinks with a live writer (this one's, and fresh snapshots)."""
        sinks = {r.sink.name for r in self.runners}
        now = time.time()
        for v in _hash(self.store, STATS_KEY).values():
            try:
                snap = json.loads(v)
            except (TypeError, ValueError):
                continue
            if isinstance(snap, dict) and now - float(snap.get("updated") or 0) <= FRESH_S:
                sinks.update(snap.get("sinks") or {})
        return {group_name(n) for n in sinks}

    def _report(self, idle_of: dict[str, float], released: set[str],
                lost: dict[str, int]) -> None:
        """Log release transitions and losses, count losses, publish every group's state."""
        cfg = self.cfg
        for g in sorted(self.watch.newly_released):
            log.warning("group %s: nobody has read its backlog for %.0fs (writer_group_max_idle "
                        "%gs, no live writer of its sink); it no longer holds back trimming: "
                        "records it has not acknowledged are trimmed and counted", g, idle_of[g],
                        cfg.group_max_idle_s)
        for g in sorted(self._released - released):
            log.warning("group %s: read again (or removed); it holds back trimming again", g)
        self._released = released
        now = time.monotonic()
        cmds: list[tuple[Any, ...]] = [("HINCRBY", TRIMMED_UNREAD_KEY, g, n)
                                       for g, n in sorted(lost.items())]
        for g, n in lost.items():
            self._unlogged_loss[g] = self._unlogged_loss.get(g, 0) + n
        for g, n in list(self._unlogged_loss.items()):
            if now - self._loss_logged_at.get(g, -LOSS_LOG_EVERY_S) >= LOSS_LOG_EVERY_S:
                log.error("group %s: trimmed %d records it never acknowledged: its sink will "
                          "not get them (acm_stream_group_trimmed_unread_records)", g, n)
                self._loss_logged_at[g] = now
                del self._unlogged_loss[g]
        wall = time.time()
        state = [x for g, secs in sorted(idle_of.items()) for x in (g, json.dumps(
            {"idle_s": round(secs, 3), "released": g in released, "updated": wall,
             "writer": self.field}, separators=(",", ":")))]
        if state:
            cmds.append(("HSET", GROUPS_KEY, *state))
        _check(self.store.pipeline(cmds), "group report")

    def snapshot(self) -> dict[str, Any]:
        return {"writer": self.field, "consumer": self.cfg.consumer, "updated": time.time(),
                "sinks": {r.sink.name: asdict(r.stats) for r in self.runners}}

    def publish_stats(self) -> None:
        """Write this writer's per-sink state into the stats hash."""
        self.store.call("HSET", STATS_KEY, self.field,
                        json.dumps(self.snapshot(), separators=(",", ":")))


class ProcessPerSink(Arbiter):
    """Run each sink's writer in its own forked process, so sinks use separate cores.

    The parent only forks, stops the children on SIGTERM/SIGINT and respawns a child that died
    (after a jittered backoff); everything with a connection is created in the child, after
    fork().
    """

    signals = (signal.SIGTERM, signal.SIGINT)
    crash_message = "%s failed"

    def __init__(self, cfg: WriterConfig, factories: dict[str, Callable[[], Sink]],
                 periodic: Callable[[], list[tuple[float, Callable[[], None]]]] | None = None
                 ) -> None:
        if not factories:
            raise ValueError("no sink enabled")
        super().__init__(log)
        self.cfg = cfg
        self.factories = factories
        self.periodic = periodic  # built in the first sink's child only
        self.sink_of: dict[int, str] = {}  # pid -> sink name
        self._backoff = {n: Backoff(0.5, 30.0) for n in factories}

    def _spawn(self, name: str) -> None:
        def run() -> int:
            first = name == next(iter(self.factories))
            periodic = self.periodic() if (first and self.periodic) else []
            return Writer(self.cfg, [self.factories[name]()], periodic).run()

        self.sink_of[self.spawn(f"writer child for sink {name}", run)] = name

    def run(self) -> int:
        """Fork the children and keep them running until SIGTERM/SIGINT; return 0."""
        self.open()
        try:
            for name in self.factories:
                self._spawn(name)
            self.loop()
            for pid in self.stop(self.cfg.graceful_timeout_s + 10):
                log.error("writer child %d did not stop in time; killing it", pid)
            return 0
        finally:
            self.close()

    def child_exited(self, exited: Exited) -> None:
        name = self.sink_of.pop(exited.pid)
        delay = self._backoff[name].next()
        log.error("writer child for sink %s (pid %d) exited with status %d; restarting in %.1fs",
                  name, exited.pid, exited.status, delay)
        self.restart_in(name, delay)

    def restart(self, key: Any) -> None:
        self._spawn(key)
