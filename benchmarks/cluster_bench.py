"""Cluster vs standalone store, in one run: `acm bench` against a standalone redis-server, a
Redis Cluster of 1 master and one of 3 masters (Debian redis-server, loopback, no replicas: a
replica's cost is the master's replication stream, the same for both), then the spread of the
partitions' keys over the 3 masters.

    .venv/bin/python benchmarks/cluster_bench.py --seconds 3 [--workers 1] [--json out.json]

Reports per store: decisions/s and p99 at N clients, the workers' CPU per decision (the store's
not counted: `acm bench --store` does not know its pid) and the ratio to the standalone store.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the checkout's acm_module and tests.support

from acm_module.decide.store.cluster import StoreClient, key_slot  # noqa: E402
from tests.support.servers import RedisCluster, RedisServer  # noqa: E402


def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `acm bench` against a store URL; return its acm phases."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "acm_module.cli", "bench", "--store", url,
                        "--workers", str(args.workers), "--skip-baseline", "--seconds",
                        str(args.seconds), "--paced", "0", "--json", f.name],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        doc = json.loads(Path(f.name).read_text())
    r = doc["results"]
    return {"meta": doc["meta"], "acm_1": r["acm_1"], "acm_n": r["acm_n"],
            "store_bytes": doc["meta"].get("store_footprint")}


def stream_bytes(url: str, partitions: int = 16) -> float:
    """Return the partition streams' bytes per record (MEMORY USAGE ... SAMPLES 0 / XLEN)."""
    c = StoreClient(url, timeout=30.0)
    try:
        c.connect()
        total = n = 0
        for p in range(partitions):
            k = "{acm.%d}:s" % p
            total += int(c.call("MEMORY", "USAGE", k, "SAMPLES", "0") or 0)  # type: ignore[arg-type]
            n += int(c.call("XLEN", k))  # type: ignore[arg-type]
        return round(total / n, 1) if n else 0.0
    finally:
        c.close()


def spread(url: str) -> dict[str, int]:
    """Return keys per master (DBSIZE) after a bench."""
    c = StoreClient(url, timeout=5.0)
    try:
        c.connect()
        return {f"{h}:{p}": int(n) for (h, p), n in  # type: ignore[call-overload]
                zip(c.masters(), c.on_each_master("DBSIZE"), strict=True)}
    finally:
        c.close()


def partition_spread(masters: int, partitions: int) -> list[int]:
    """Return partitions per master when the slots are split evenly in order (as
    `redis-cli --cluster create` does)."""
    per = 16384 / masters
    out = [0] * masters
    for p in range(partitions):
        out[min(int(key_slot(b"{acm.%d}" % p) // per), masters - 1)] += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out: dict[str, Any] = {"runs": {}}
    std = RedisServer().start()
    try:
        out["runs"]["standalone"] = bench(std.url, args)
        out["stream_bytes_per_decision"] = stream_bytes(std.url)
    finally:
        std.cleanup()
    for m in (1, 3):
        cl = RedisCluster(masters=m, replicas=0).start()
        try:
            out["runs"][f"cluster_{m}"] = bench(cl.url(0), args)
            out["runs"][f"cluster_{m}"]["keys_per_master"] = spread(cl.url(0))
        finally:
            cl.cleanup()
    base = out["runs"]["standalone"]["acm_n"]
    print(f"{'store':14} {'dec/s N':>9} {'p99 us N':>9} {'cpu us/dec':>10} {'cpu ratio':>9} "
          f"{'dec/s 1':>8} {'p99 us 1':>9}  keys per master")
    for name, r in out["runs"].items():
        n, one = r["acm_n"], r["acm_1"]
        ratio = n["server_cpu_us"] / base["server_cpu_us"]
        r["cpu_ratio_vs_standalone"] = round(ratio, 3)
        print(f"{name:14} {n['rate']:9,.0f} {n['p99']:9,.0f} {n['server_cpu_us']:10.1f} "
              f"{ratio:8.2f}x {one['rate']:8,.0f} {one['p99']:9,.0f}  "
              f"{list(r.get('keys_per_master', {}).values())}")
    print(f"\nstream bytes per decision record: {out['stream_bytes_per_decision']}")
    print("\npartitions per master (slots split evenly in order), max/mean:")
    for m in (3, 6, 12):
        for p in (16, 64, 128, 256):
            s = partition_spread(m, p)
            print(f"  {m:2} masters, {p:3} partitions: max/mean {max(s) / (p / m):.2f}  {s}")
    out["partition_spread"] = {f"{m}x{p}": partition_spread(m, p)
                               for m in (3, 6, 12) for p in (16, 64, 128, 256)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
