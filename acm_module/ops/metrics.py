"""Prometheus metrics of the pool, built from what the workers and the writer publish in the store.

Workers never touch prometheus_client: each one writes a JSON snapshot a second into
`{acm.stats}:w` (acm_module/core/stats.py) and one collector, in one process, turns every
fresh snapshot into labelled series at scrape time. That is multiprocess-safe by construction
(no shared mmap files, nothing to clean up when a worker dies) and sees every pool sharing the
store. Counters are labelled per worker (`host`, `worker` = index): a respawned worker restarts
its counters at zero, which Prometheus reads as a counter reset, whereas a sum over workers would
drop when a worker goes away and fake a spike in rate().

Alert counts come from the counters decide.lua and fanout.lua keep in each partition
(`{acm.<p>}:n`, alerts opened and escalated per severity, updates): a background thread reads
those few small hashes every second, whatever the call rate, and they survive exporter restarts.

`metrics_main(settings)` is the supervisor's sidecar entry point (`metrics_http`, default
127.0.0.1:9464; exit 3 when it cannot bind, so a misconfiguration stops the service loudly).
`acm metrics --once` prints one exposition to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from acm_module.core import keys
from acm_module.core import liveconfig as store_config
from acm_module.core import stats as stats_mod
from acm_module.core.backoff import Backoff
from acm_module.core.errors import BOOT_ERROR, StoreError
from acm_module.core.redis import LazyRedis
from acm_module.core.types import SEVERITIES

log = logging.getLogger("acm.metrics")

WRITER_STATS_KEY = "{acm.stats}:writer"  # one JSON per writer (acm_module/write/writer.py)
DLQ_KEY = "{acm.dlq}:s"
WRITER_GROUP_PREFIX = "acm."  # the writer's consumer group of sink X is "acm.X"
WRITER_FRESH_S = 10.0
# The writers' view of every stream group (acm_module/write/writer.py, Writer._report).
GROUPS_KEY = "{acm.stats}:groups"
TRIMMED_UNREAD_KEY = "{acm.stats}:trimmed_unread"
GROUPS_FRESH_S = 60.0  # several trim intervals
_SCAN_IDLE_S = 1.0

# Prometheus bucket bounds: every half octave from 8 us to ~1.05 s. Each is exactly a boundary
# of the workers' log-linear buckets (8 per octave), so the conversion loses nothing.
LATENCY_BOUNDS_US: tuple[float, ...] = tuple(2 ** (k / 2) for k in range(6, 41))
_PER_OCTAVE = 8


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" ("[::1]:9464", ":9464" = all interfaces). Raises ValueError."""
    host, sep, port_s = value.strip().rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"metrics_http must be host:port, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_s)


def prometheus_buckets(sparse: dict[str, int]) -> tuple[list[tuple[str, float]], float, int]:
    """Convert a sparse log-linear histogram (bucket index -> count, microseconds) into
    cumulative Prometheus buckets in seconds; return (buckets, estimated sum in s, count).

    The sum is estimated from each bucket's geometric midpoint (the workers keep no sum), at
    most ~4.5 % off per observation.
    """
    counts: dict[int, int] = {}
    for k, v in sparse.items():
        with contextlib.suppress(TypeError, ValueError):
            counts[int(k)] = counts.get(int(k), 0) + int(v)
    total = sum(counts.values())
    est_sum_us = sum(c * 2 ** ((i + 0.5) / _PER_OCTAVE) for i, c in counts.items())
    out: list[tuple[str, float]] = []
    for bound in LATENCY_BOUNDS_US:
        # Source bucket i ends at 2**((i+1)/8): it is below `bound` when i+1 <= 8*log2(bound).
        last = round(math.log2(bound) * _PER_OCTAVE) - 1
        out.append((_fmt(bound / 1e6), float(sum(c for i, c in counts.items() if i <= last))))
    out.append(("+Inf", float(total)))
    return out, est_sum_us / 1e6, total


def _fmt(v: float) -> str:
    return repr(float(f"{v:.9g}"))


def _num(v: Any, default: float = 0.0) -> float:
    """Return v as a float, or default when it is not a number (snapshots are read defensively)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v)
    return default


# -- alerts, from the counters decide.lua keeps per partition ----------------------------------
class AlertScanner:
    """Read the alert counters of every partition, in a background thread.

    `opened[sev]` counts alerts opened at that severity; `escalated[sev]` counts updates that
    raised an open alert to that severity; `fanout_opened[sev]` fan-out alerts opened. The
    scripts keep them in `{acm.<p>}:n`, so they survive exporter restarts.
    """

    def __init__(self, store_url: str, partitions: int, poll_s: float = _SCAN_IDLE_S) -> None:
        self.store_url = store_url
        self.partitions = partitions
        self.poll_s = poll_s
        self.opened: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self.escalated: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self.updates = 0
        self.fanout_opened: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self.read = 0
        self.healthy = False
        self.log_level: str | None = None
        self._reachable = False  # the store answered once (prime)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._store = LazyRedis(store_url, timeout=2.0)
        self._thread = threading.Thread(target=self._run, name="alert-scanner", daemon=True)
        self._cfg_next = 0.0

    def prime(self) -> bool:
        """Say whether the store answers (the counters need no starting point to read)."""
        try:
            self._store.get().ping()
        except StoreError as e:
            self._store.reset()
            log.warning("alert counter: store not reachable yet: %s", e)
            return False
        self._reachable = True
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._store.reset()

    def snapshot(self) -> dict[str, Any]:
        """Return a consistent copy of the counters."""
        with self._lock:
            return {"opened": dict(self.opened), "escalated": dict(self.escalated),
                    "updates": self.updates, "fanout_opened": dict(self.fanout_opened),
                    "read": self.read, "healthy": self.healthy}

    def _run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._stop.is_set():
            try:
                if not self._reachable and not self.prime():
                    raise StoreError("store unreachable")
                self.scan_once()
                self._follow_log_level()
                self.healthy = True
                backoff.reset()
                self._stop.wait(self.poll_s)
            except StoreError as e:
                self.healthy = False
                delay = backoff.next()
                log.debug("alert scanner: %s (retry in %.1fs)", e, delay)
                self._store.reset()
                self._stop.wait(delay)
            except Exception:  # a bug here must not kill the exporter; it is logged loudly
                log.exception("alert scanner failed; reading again in 1 s")
                self._reachable = False
                self._stop.wait(1.0)

    def scan_once(self) -> None:
        """Read every partition's alert counters in one pipeline (one buffer per master in a
        cluster). Raises StoreError.

        A handful of small hashes cost the same at any call rate; the streams' records are not
        read at all.
        """
        pipe = self._store.get().pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.hgetall(keys.counters(p))
        replies = pipe.execute()
        opened = dict.fromkeys(SEVERITIES, 0)
        escalated = dict.fromkeys(SEVERITIES, 0)
        updates = 0
        fanout = dict.fromkeys(SEVERITIES, 0)
        for r in replies:
            for field, raw in r.items():
                name, value = field.decode(errors="replace"), int(raw)
                kind, _, sev = name.partition(":")
                if kind == "open" and sev in opened:
                    opened[sev] += value
                elif kind == "esc" and sev in escalated:
                    escalated[sev] += value
                elif kind == "upd":
                    updates += value
                elif kind == "fo" and sev.startswith("open:") and sev[5:] in fanout:
                    fanout[sev[5:]] += value  # fanout.lua: fo:open:<SEV>
        with self._lock:
            self.opened, self.escalated, self.updates = opened, escalated, updates
            self.fanout_opened = fanout
            self.read += 1

    def _follow_log_level(self) -> None:
        """Apply the live config's log_level (MI acm_log_level) to this process, once a second."""
        now = time.monotonic()
        if now < self._cfg_next:
            return
        self._cfg_next = now + 1.0
        _, values = store_config.read(self._store.get())
        level = (values or {}).get("log_level")
        if level and level != self.log_level:
            from acm_module.core.logs import apply_log_level

            with contextlib.suppress(ValueError):
                apply_log_level(level)
                self.log_level = level


# -- the collector -----------------------------------------------------------------------------
class PoolCollector(Collector):
    """Build every acm series from the store at scrape time."""

    def __init__(self, store_url: str, partitions: int, scanner: AlertScanner | None = None,
                 fresh_s: float = stats_mod.FRESH_S) -> None:
        self.store_url = store_url
        self.partitions = partitions
        self.scanner = scanner
        self.fresh_s = fresh_s
        self._store = LazyRedis(store_url, timeout=2.0)
        self._lock = threading.Lock()  # one scrape at a time
        self._pids: dict[tuple[str, str], int] = {}
        self._restarts: dict[tuple[str, str], int] = {}

    def close(self) -> None:
        self._store.reset()

    def describe(self) -> Iterable[Metric]:
        return []  # metric names depend on the store's content; skip registry-time collection

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        with self._lock:
            try:
                raw = self._read_store()
            except StoreError as e:
                log.warning("metrics: store unreachable: %s", e)
                self._store.reset()
                raw = None
        up = GaugeMetricFamily("acm_store_up",
                               "1 when the metrics process could read the store in this scrape.")
        up.add_metric([], 1.0 if raw is not None else 0.0)
        yield up
        if raw is not None:
            yield from self._worker_metrics(raw["workers"])
            yield from self._config_metrics(raw["config"])
            yield from self._stream_metrics(raw["xlen"], raw["groups"], raw["dlq"])
            yield from self._writer_metrics(raw["writers"])
            yield from self._group_metrics(raw["group_state"], raw["trimmed_unread"])
        yield from self._alert_metrics()
        took = GaugeMetricFamily("acm_metrics_scrape_seconds",
                                 "Seconds this scrape spent reading the store.")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    # -- reading -----------------------------------------------------------------------------
    def _read_store(self) -> dict[str, Any]:
        """Read everything in one pipeline (one buffer per master in a cluster). Raises
        StoreError; an error reply (a stream not created yet) reads as no data."""
        streams = keys.streams(self.partitions)
        pipe = self._store.get().pipeline(transaction=False)
        pipe.hgetall(stats_mod.STATS_KEY)
        pipe.hgetall(WRITER_STATS_KEY)
        pipe.hmget(store_config.CONFIG_KEY, ["gen", "values"])
        pipe.xlen(DLQ_KEY)
        pipe.hgetall(GROUPS_KEY)
        pipe.hgetall(TRIMMED_UNREAD_KEY)
        for s in streams:
            pipe.xlen(s)
        for s in streams:
            pipe.xinfo_groups(s)
        r = pipe.execute(raise_on_error=False)
        p = self.partitions
        return {"workers": r[0], "writers": r[1], "config": r[2], "dlq": r[3],
                "group_state": r[4], "trimmed_unread": r[5],
                "xlen": r[6:6 + p], "groups": r[6 + p:6 + 2 * p]}

    def _fresh_snapshots(self, raw: Any, fresh_s: float) -> list[dict[str, Any]]:
        if not isinstance(raw, dict):
            return []
        now = time.time()
        out = []
        for value in raw.values():
            try:
                snap = json.loads(value)
            except (TypeError, ValueError):
                continue
            if isinstance(snap, dict) and now - _num(snap.get("updated")) <= fresh_s:
                out.append(snap)
        return out

    # -- series ------------------------------------------------------------------------------
    def _worker_metrics(self, raw: Any) -> Iterator[Metric]:
        # One series set per worker slot: when a slot has two fresh snapshots (a respawn, or a
        # supervisor restart within the freshness window) the newest process wins.
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for snap in self._fresh_snapshots(raw, self.fresh_s):
            slot = (str(snap.get("host", "")), str(snap.get("index", "")))
            if slot not in newest or _num(snap.get("started")) > _num(newest[slot].get("started")):
                newest[slot] = snap
        for slot, snap in newest.items():
            pid = int(_num(snap.get("pid")))
            old = self._pids.get(slot)
            if old is not None and old != pid:
                self._restarts[slot] = self._restarts.get(slot, 0) + 1
            self._pids[slot] = pid
            self._restarts.setdefault(slot, 0)

        lw = ["host", "worker"]
        workers = GaugeMetricFamily("acm_workers", "Worker processes with a fresh stats snapshot.")
        workers.add_metric([], float(len(newest)))
        started = GaugeMetricFamily("acm_worker_start_time_seconds",
                                    "Start time of the process serving a worker slot.", labels=lw)
        restarts = CounterMetricFamily(
            "acm_worker_restarts", "Times a worker slot changed process (seen by this exporter).",
            labels=lw)
        requests = CounterMetricFamily("acm_requests", "Request frames received.", labels=lw)
        batches = CounterMetricFamily("acm_batches", "Store round trips (batches).", labels=lw)
        decisions = CounterMetricFamily("acm_decisions", "Decisions by verdict and reason.",
                                        labels=[*lw, "verdict", "reason"])
        per_carrier = CounterMetricFamily(
            "acm_carrier_decisions", "Decisions by the carrier they came through (registered "
            "gateways only), verdict and reason.", labels=[*lw, "carrier", "verdict", "reason"])
        dups = CounterMetricFamily("acm_duplicates",
                                   "Requests answered from the Call-ID dedup (retransmissions).",
                                   labels=lw)
        errors = CounterMetricFamily(
            "acm_errors", "Requests answered with an error, by kind (bad_request, bad_frame, "
            "store_unavailable, store_error), and failed side checks (rate_error: a rate-limit "
            "check that failed open; fanout_error).", labels=[*lw, "kind"])
        unchecked = CounterMetricFamily(
            "acm_unchecked_calls", "Calls answered without a check, which the client lets "
            "through on its fail policy, by kind: store_unavailable (store down or slower than "
            "the worker's store budget), store_error, internal.", labels=[*lw, "kind"])
        failures = CounterMetricFamily("acm_store_failures",
                                       "Store connection failures and timeouts.", labels=lw)
        connected = GaugeMetricFamily("acm_worker_store_connected",
                                      "1 when the worker holds a store connection.", labels=lw)
        gen = GaugeMetricFamily("acm_worker_config_generation",
                                "Config generation the worker applies.", labels=lw)
        conns = GaugeMetricFamily("acm_worker_connections",
                                  "Client connections the worker serves (worker_io = zmtp).",
                                  labels=lw)
        handoffs = CounterMetricFamily(
            "acm_connection_handoffs", "Connections a busy worker handed to a less-loaded one "
            "(direction sent) or took from a busier one (received); rebalance, worker_io = zmtp.",
            labels=[*lw, "direction"])
        total_h = HistogramMetricFamily(
            "acm_decision_latency_seconds",
            "Receive to reply per request, store round trip included (sum estimated).",
            labels=lw)
        service_h = HistogramMetricFamily(
            "acm_decision_service_seconds",
            "Receive to reply per request, store wait excluded (sum estimated).", labels=lw)

        for (host, index), snap in sorted(newest.items()):
            lv = [host, index]
            started.add_metric(lv, _num(snap.get("started")))
            restarts.add_metric(lv, float(self._restarts.get((host, index), 0)))
            requests.add_metric(lv, _num(snap.get("requests")))
            batches.add_metric(lv, _num(snap.get("batches")))
            failures.add_metric(lv, _num(snap.get("store_failures")))
            connected.add_metric(lv, 1.0 if snap.get("store_up") else 0.0)
            gen.add_metric(lv, _num(snap.get("config_generation")))
            conns.add_metric(lv, _num(snap.get("connections")))
            handoffs.add_metric([*lv, "sent"], _num(snap.get("handoffs_sent")))
            handoffs.add_metric([*lv, "received"], _num(snap.get("handoffs_received")))
            d = snap.get("decisions") if isinstance(snap.get("decisions"), dict) else {}
            kinds = {"bad_request": _num(d.get("error")),
                     "bad_frame": _num(snap.get("bad_frames")),
                     "store_unavailable": _num(d.get("store_unavailable")),
                     "store_error": _num(d.get("store_error")),
                     "rate_error": _num(d.get("rate_error")),
                     "fanout_error": _num(d.get("fanout_error"))}
            for kind, v in kinds.items():
                errors.add_metric([*lv, kind], v)
            for kind, v in stats_mod.unchecked(snap).items():
                unchecked.add_metric([*lv, kind], float(v))
            dups.add_metric(lv, _num(d.get("dup")))
            for key, v in sorted(d.items()):
                key = str(key)
                if key.startswith("@"):  # "@<carrier>|<verdict>:<reason>"
                    carrier, _, rest = key[1:].partition("|")
                    verdict, sep, reason = rest.partition(":")
                    if sep:
                        per_carrier.add_metric([*lv, carrier, verdict, reason], _num(v))
                    continue
                verdict, sep, reason = key.partition(":")
                if sep:
                    decisions.add_metric([*lv, verdict, reason], _num(v))
            for fam, name in ((total_h, "total_us"), (service_h, "service_us")):
                sparse = snap.get(name) if isinstance(snap.get(name), dict) else {}
                buckets, est_sum, _ = prometheus_buckets(sparse)
                fam.add_metric(lv, buckets, est_sum)
        yield from (workers, started, restarts, requests, batches, decisions, per_carrier, dups,
                    errors, unchecked, failures, connected, gen, conns, handoffs, total_h,
                    service_h)

    def _config_metrics(self, raw: Any) -> Iterator[Metric]:
        gen = GaugeMetricFamily("acm_config_generation",
                                "Live config generation published in the store.")
        values: dict[str, Any] = {}
        if isinstance(raw, list) and len(raw) == 2 and raw[0] is not None:
            gen.add_metric([], _num(_int_or(raw[0])))
            with contextlib.suppress(TypeError, ValueError):
                values = json.loads(raw[1]) if raw[1] is not None else {}
        yield gen
        if not isinstance(values, dict) or not values:
            return
        for name, key, help_ in (
                ("acm_detection_threshold", "threshold",
                 "Distinct A-numbers within the window that mean masking."),
                ("acm_detection_window_seconds", "window", "Sliding window in seconds."),
                ("acm_detection_block_ttl_seconds", "block_ttl",
                 "Seconds detected A-numbers stay blocked (0 = off).")):
            if key in values:
                g = GaugeMetricFamily(name, help_)
                g.add_metric([], _num(_float_or(values[key])))
                yield g
        if "mode" in values:
            m = GaugeMetricFamily("acm_detection_mode", "1 for the live mode (block|monitor).",
                                  labels=["mode"])
            for mode in ("block", "monitor"):
                m.add_metric([mode], 1.0 if values["mode"] == mode else 0.0)
            yield m

    def _stream_metrics(self, xlen: list[Any], groups: list[Any], dlq: Any) -> Iterator[Metric]:
        length = GaugeMetricFamily("acm_stream_length",
                                   "Records in a partition's durable stream (not yet trimmed).",
                                   labels=["partition"])
        for p, n in enumerate(xlen):
            length.add_metric([str(p)], float(n) if isinstance(n, int) else 0.0)
        yield length
        backlog: dict[str, dict[str, float]] = {}
        lag_known: dict[str, bool] = {}
        for g in groups:
            if not isinstance(g, list):
                continue  # no such stream yet, or no groups
            for d in g:
                name = d.get("name")
                if not isinstance(name, bytes) or not name.startswith(WRITER_GROUP_PREFIX.encode()):
                    continue
                sink = name[len(WRITER_GROUP_PREFIX):].decode(errors="replace")
                agg = backlog.setdefault(sink, {"pending": 0.0, "lag": 0.0})
                agg["pending"] += _num(d.get("pending"))
                lag = d.get("lag")
                if isinstance(lag, int):
                    agg["lag"] += lag
                    lag_known.setdefault(sink, True)
                else:
                    lag_known[sink] = False  # Redis < 7 / servers that do not report lag
        fam = GaugeMetricFamily(
            "acm_writer_backlog_records",
            "Stream records per sink: pending = delivered, not yet committed; lag = not yet "
            "delivered (absent when the server does not report it).", labels=["sink", "kind"])
        for sink, agg in sorted(backlog.items()):
            fam.add_metric([sink, "pending"], agg["pending"])
            if lag_known.get(sink):
                fam.add_metric([sink, "lag"], agg["lag"])
        yield fam
        dead = GaugeMetricFamily("acm_dead_letters", "Records in the writer's dead-letter stream.")
        dead.add_metric([], float(dlq) if isinstance(dlq, int) else 0.0)
        yield dead

    def _writer_metrics(self, raw: Any) -> Iterator[Metric]:
        snaps = self._fresh_snapshots(raw, WRITER_FRESH_S)
        lw = ["writer", "sink"]
        writers = GaugeMetricFamily("acm_writers", "Writer processes with a fresh stats snapshot.")
        writers.add_metric([], float(len(snaps)))
        up = GaugeMetricFamily("acm_writer_sink_up", "1 when the sink accepts writes.", labels=lw)
        state = GaugeMetricFamily("acm_writer_sink_state", "1 for the sink's current state.",
                                  labels=[*lw, "state"])
        records = CounterMetricFamily("acm_writer_records", "Records written, by kind.",
                                      labels=[*lw, "kind"])
        dead = CounterMetricFamily("acm_writer_dead_lettered",
                                   "Records the sink refused, moved to the dead-letter stream.",
                                   labels=lw)
        retries = CounterMetricFamily("acm_writer_retries", "Retried batches.", labels=lw)
        failing = GaugeMetricFamily("acm_writer_consecutive_failures",
                                    "Consecutive failed attempts of the sink.", labels=lw)
        last_ok = GaugeMetricFamily("acm_writer_last_success_time_seconds",
                                    "When the sink last committed a batch.", labels=lw)
        for snap in snaps:
            writer = str(snap.get("writer", snap.get("consumer", "")))
            sinks = snap.get("sinks") if isinstance(snap.get("sinks"), dict) else {}
            for sink, st in sorted(sinks.items()):
                if not isinstance(st, dict):
                    continue
                lv = [writer, str(sink)]
                s = str(st.get("state", ""))
                up.add_metric(lv, 1.0 if s == "up" else 0.0)
                if s:
                    state.add_metric([*lv, s], 1.0)
                for kind in ("decisions", "alerts"):
                    if kind in st:
                        records.add_metric([*lv, kind], _num(st.get(kind)))
                dead.add_metric(lv, _num(st.get("dead_lettered")))
                retries.add_metric(lv, _num(st.get("retries")))
                failing.add_metric(lv, _num(st.get("consecutive_failures")))
                if "last_ok" in st:
                    last_ok.add_metric(lv, _num(st.get("last_ok")))
        yield from (writers, up, state, records, dead, retries, failing, last_ok)

    def _group_metrics(self, state: Any, unread: Any) -> Iterator[Metric]:
        idle = GaugeMetricFamily(
            "acm_stream_group_idle_seconds",
            "Seconds a stream group's backlog has waited with nobody reading it (no progress, "
            "no live writer of its sink); 0 while it is read or has no backlog.",
            labels=["group"])
        released = GaugeMetricFamily(
            "acm_stream_group_released",
            "1 when the group was idle past writer_group_max_idle and no longer holds back "
            "trimming (what is trimmed before it read it is lost to it).", labels=["group"])
        lost = CounterMetricFamily(
            "acm_stream_group_trimmed_unread_records",
            "Records trimmed from the streams before the (released) group acknowledged them.",
            labels=["group"])
        now = time.time()
        for name, raw in sorted(_pairs(state).items()):
            try:
                d = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if isinstance(d, dict) and now - _num(d.get("updated")) <= GROUPS_FRESH_S:
                idle.add_metric([name], _num(d.get("idle_s")))
                released.add_metric([name], 1.0 if d.get("released") else 0.0)
        for name, raw in sorted(_pairs(unread).items()):
            lost.add_metric([name], _num(_int_or(raw)))
        yield from (idle, released, lost)

    def _alert_metrics(self) -> Iterator[Metric]:
        if self.scanner is None:
            return
        snap = self.scanner.snapshot()
        opened = CounterMetricFamily("acm_alerts", "Alerts opened, by severity at opening.",
                                     labels=["severity"])
        esc = CounterMetricFamily("acm_alert_escalations",
                                  "Open alerts raised to a higher severity, by the new severity.",
                                  labels=["severity"])
        for sev in SEVERITIES:
            opened.add_metric([sev], float(snap["opened"][sev]))
            esc.add_metric([sev], float(snap["escalated"][sev]))
        fanout = CounterMetricFamily(
            "acm_fanout_alerts", "Fan-out alerts (one A-number calling many B-numbers) opened, "
            "by severity at opening.", labels=["severity"])
        for sev in SEVERITIES:
            fanout.add_metric([sev], float(snap["fanout_opened"][sev]))
        updates = CounterMetricFamily("acm_alert_updates",
                                      "Alert records that joined an open alert.")
        updates.add_metric([], float(snap["updates"]))
        read = CounterMetricFamily("acm_alert_counter_reads",
                                   "Reads of the per-partition alert counters.")
        read.add_metric([], float(snap["read"]))
        healthy = GaugeMetricFamily("acm_alert_scanner_up",
                                    "1 when the alert counters are being read.")
        healthy.add_metric([], 1.0 if snap["healthy"] else 0.0)
        yield from (opened, esc, fanout, updates, read, healthy)


def _pairs(h: Any) -> dict[str, Any]:
    """Return a hash's fields as text (an error reply: no fields)."""
    if not isinstance(h, dict):
        return {}
    return {k.decode(errors="replace") if isinstance(k, bytes) else str(k): v
            for k, v in h.items()}


def _int_or(v: Any) -> float:
    try:
        return float(int(v))
    except (TypeError, ValueError):
        return 0.0


def _float_or(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


# -- entry points ------------------------------------------------------------------------------
def build_registry(store_url: str, partitions: int, scanner: AlertScanner | None
                   ) -> tuple[CollectorRegistry, PoolCollector]:
    """Return a registry holding only the acm collector."""
    registry = CollectorRegistry(auto_describe=False)
    collector = PoolCollector(store_url, partitions, scanner)
    registry.register(collector)
    return registry, collector


def render_once(store_url: str, partitions: int) -> bytes:
    """Return one text exposition (worker, config, stream and writer series; no alert counts)."""
    registry, collector = build_registry(store_url, partitions, None)
    try:
        return generate_latest(registry)
    finally:
        collector.close()


def metrics_main(settings: Any) -> int:
    """Serve GET /metrics on settings.metrics_http until SIGTERM; return the exit code.

    Returns 3 (boot error) when the address is invalid or cannot be bound.
    """
    # Observability must never take CPU from the call path: the workers win every contest.
    with contextlib.suppress(OSError):
        os.nice(10)
    try:
        host, port = parse_listen(settings.metrics_http)
    except ValueError as e:
        log.error("metrics: %s", e)
        return BOOT_ERROR
    scanner = AlertScanner(settings.store, settings.partitions)
    scanner.prime()  # the store may not be up yet: the thread retries
    registry, collector = build_registry(settings.store, settings.partitions, scanner)
    try:
        server, _thread = start_http_server(port, host, registry)
    except OSError as e:
        log.error("metrics: cannot listen on %s: %s", settings.metrics_http, e)
        collector.close()
        scanner.stop()
        return BOOT_ERROR
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    scanner.start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        scanner.stop()
        collector.close()
    return 0
