"""Worker counters and latency histograms, published to the store for the control plane.

Each worker writes one JSON snapshot a second into HASH {acm.stats}:w (field host/boot/index);
readers merge the fresh ones. Publishing through the store keeps the supervisor free of
connections and works for pools on several hosts sharing one store.
"""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any

STATS_KEY = "{acm.stats}:w"
FRESH_S = 5.0

# Log-linear buckets: 8 per power of two from 1 us to ~67 s. Bucket i covers
# [2**(i/8), 2**((i+1)/8)) microseconds; bucket 0 also takes everything below 1 us.
_PER_OCTAVE = 8
_BUCKETS = 26 * _PER_OCTAVE


def bucket_of(us: float) -> int:
    """Return the histogram bucket of a duration in microseconds."""
    if us <= 1.0:
        return 0
    return min(int(math.log2(us) * _PER_OCTAVE), _BUCKETS - 1)


def bucket_upper(i: int) -> float:
    """Return a bucket's upper bound in microseconds."""
    return 2 ** ((i + 1) / _PER_OCTAVE)


@dataclass
class Histogram:
    """A mergeable latency histogram (microseconds)."""

    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    total: int = 0

    def add(self, us: float, n: int = 1) -> None:
        self.counts[bucket_of(us)] += n
        self.total += n

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.total += other.total

    def percentile(self, p: float) -> float:
        """Return the upper bound of the bucket holding the p-th percentile (0 if empty)."""
        if not self.total:
            return 0.0
        rank = math.ceil(self.total * p / 100.0)
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return round(bucket_upper(i), 1)
        return round(bucket_upper(_BUCKETS - 1), 1)

    def to_sparse(self) -> dict[str, int]:
        return {str(i): c for i, c in enumerate(self.counts) if c}

    @classmethod
    def from_sparse(cls, d: dict[str, int]) -> Histogram:
        h = cls()
        for i, c in d.items():
            h.counts[int(i)] += c
            h.total += c
        return h


@dataclass
class WorkerStats:
    """Counters of one worker process."""

    index: int = 0
    pid: int = 0
    started: float = field(default_factory=time.time)
    requests: int = 0
    batches: int = 0
    bad_frames: int = 0
    store_failures: int = 0
    internal_errors: int = 0  # requests answered "internal" (a batch that raised)
    config_generation: int = 0
    registry_version: int = 0  # carrier registry in use (docs/GATEWAY.md)
    store_up: bool = False
    connections: int = 0  # peers connected to this worker (worker_io = zmtp)
    # Connections this worker handed to a less-loaded sibling / took from a busier one
    # (worker_io = zmtp, rebalance on).
    handoffs_sent: int = 0
    handoffs_received: int = 0
    decisions: dict[str, int] = field(default_factory=dict)  # "verdict:reason"/"dup"/errors
    # Per request, the span of its batch. service: the requests are in memory -> their replies
    # are handed to send(), the store round trip excluded (the worker's own work); total: poll()
    # saw them arrive -> replies sent, everything included.
    service_us: Histogram = field(default_factory=Histogram)
    total_us: Histogram = field(default_factory=Histogram)
    # CPU the worker's thread spent over the service span (no waiting, no preemption), which
    # includes the CPU of the store round trip's system calls (waking the store costs the
    # sender): what the hot path costs, whatever else the machine runs.
    service_cpu_us: Histogram = field(default_factory=Histogram)

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index, "pid": self.pid, "host": socket.gethostname(),
            "started": self.started, "updated": time.time(), "requests": self.requests,
            "batches": self.batches, "bad_frames": self.bad_frames,
            "store_failures": self.store_failures, "internal_errors": self.internal_errors,
            "store_up": self.store_up,
            "config_generation": self.config_generation, "connections": self.connections,
            "handoffs_sent": self.handoffs_sent, "handoffs_received": self.handoffs_received,
            "registry_version": self.registry_version, "decisions": dict(self.decisions),
            "service_us": self.service_us.to_sparse(), "total_us": self.total_us.to_sparse(),
            "service_cpu_us": self.service_cpu_us.to_sparse(),
        }


def publish(conn: Any, field_name: str, stats: WorkerStats) -> None:
    """Write one worker's snapshot into the stats hash."""
    conn.execute_command("HSET", STATS_KEY, field_name,
                         json.dumps(stats.snapshot(), separators=(",", ":")))


def read_all(conn: Any, fresh_s: float = FRESH_S) -> list[dict[str, Any]]:
    """Return the fresh snapshots of every worker; stale ones are removed."""
    out, stale = [], []
    now = time.time()
    for key, value in conn.execute_command("HGETALL", STATS_KEY).items():
        snap = json.loads(value)
        # The field is host/boot/index: one node (an `acm serve`) is one host/boot.
        field = key.decode() if isinstance(key, bytes) else key
        snap.setdefault("node", field.rpartition("/")[0])
        if now - snap["updated"] > fresh_s:
            stale.append(key)
        else:
            out.append(snap)
    if stale:
        conn.execute_command("HDEL", STATS_KEY, *stale)
    return sorted(out, key=lambda s: (s["host"], s["index"], s["pid"]))


UNCHECKED_KINDS = ("store_unavailable", "store_error", "internal")


def unchecked(snap: dict[str, Any]) -> dict[str, int]:
    """Return a snapshot's calls answered without a check, by kind.

    Each went through on the client's fail policy: the store was down or slower than the
    worker's store budget (store_unavailable), the store refused the script (store_error), or
    the batch raised (internal).
    """
    d = snap.get("decisions") if isinstance(snap.get("decisions"), dict) else {}

    def count(v: Any) -> int:  # snapshots are read defensively: a non-number counts 0
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    return {"store_unavailable": count(d.get("store_unavailable")),
            "store_error": count(d.get("store_error")),
            "internal": count(snap.get("internal_errors"))}


def summarize(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge worker snapshots into totals with latency percentiles."""
    decisions: dict[str, int] = {}
    service, total, cpu = Histogram(), Histogram(), Histogram()
    for s in snaps:
        for k, v in s["decisions"].items():
            decisions[k] = decisions.get(k, 0) + v
        service.merge(Histogram.from_sparse(s["service_us"]))
        total.merge(Histogram.from_sparse(s["total_us"]))
        cpu.merge(Histogram.from_sparse(s.get("service_cpu_us", {})))
    return {
        "workers": len(snaps),
        "requests": sum(s["requests"] for s in snaps),
        "batches": sum(s["batches"] for s in snaps),
        "store_failures": sum(s["store_failures"] for s in snaps),
        "unchecked": sum(sum(unchecked(s).values()) for s in snaps),
        "bad_frames": sum(s["bad_frames"] for s in snaps),
        "decisions": decisions,
        "service_us": {f"p{p}": service.percentile(p) for p in (50, 90, 99, 99.9)},
        "total_us": {f"p{p}": total.percentile(p) for p in (50, 90, 99, 99.9)},
        "service_cpu_us": {f"p{p}": cpu.percentile(p) for p in (50, 90, 99, 99.9)},
    }
