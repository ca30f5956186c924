"""Decisions/s and p99 with 1 and 2 `acm serve` nodes on a standalone store, a Redis Cluster of
1 master and one of 3 masters, in one run (issue #14's "1 and 3 masters, 1 and 2 acm nodes").

    .venv/bin/python benchmarks/nodes_bench.py --seconds 3 --rounds 2 [--layouts 1x1,2x1,1x2]
        [--json out.json]

Every store is started first (Debian redis-server on loopback; the clusters without replicas,
as in benchmarks/cluster_bench.py). Each round then measures the load tool's ceiling (the same
clients and load processes against a reflector) and every (store, layout) cell in turn, so the
cells of one round are A B A B under the same neighbours' load (in reverse order every other
round). A layout NxW is N nodes of W
workers; with two nodes each is given a different seed node of the cluster (a cluster of one
master has one node: both get it) and the load processes take the nodes in turn. Before each
cell the store is flushed and the nodes start afresh.

Per cell: closed-loop decisions/s, p50/p99 at --clients clients, an open-loop phase at --paced
decisions/s (its p99 is the latency at a moderate load), whether the load tool set the pace
(CLIENT-BOUND), and the CPU per decision of each process group: the nodes' workers, the rest of
the nodes (supervisor, sidecars), the store (all masters) and the load tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the checkout's acm_module and tests.support

from acm_module.decide.store.cluster import StoreClient  # noqa: E402
from benchmarks.loadtool import (  # noqa: E402
    Result,
    acm_service,
    drive,
    worker_pids,
    zmtp_pool,
)
from tests.support.servers import RedisCluster, RedisServer  # noqa: E402


def children(pid: int) -> list[int]:
    """Return the pids of a process's descendants."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in out.stdout.split()]
    return kids + [g for k in kids for g in children(k)]


def machine() -> dict[str, Any]:
    """Return what the figures depend on: CPUs, their model, the kernel."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "host": platform.node()}


class Store:
    """A store under test: its seed URLs (one per node) and the pids of its masters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: RedisServer | RedisCluster
        if name == "standalone":
            self.server = RedisServer().start()
            assert self.server.proc is not None
            self.seeds = [self.server.url, self.server.url]
            self.pids = [self.server.proc.pid]
        else:
            m = int(name.split("_")[1])
            self.server = RedisCluster(masters=m, replicas=0).start()
            self.seeds = [self.server.url(0), self.server.url(min(1, m - 1))]
            self.pids = [p.pid for p in self.server.procs.values()]

    def flush(self) -> None:
        """Empty every master, so no earlier cell's keys expire during this one."""
        c = StoreClient(self.seeds[0], timeout=10.0)
        try:
            c.connect()
            c.on_each_master("FLUSHALL")
        finally:
            c.close()

    def cleanup(self) -> None:
        self.server.cleanup()


@contextlib.contextmanager
def nodes(store: Store, count: int, workers: int, tmp: str) -> Iterator[list[tuple[str, int]]]:
    """Run `count` nodes of `workers` workers, node i seeded with store.seeds[i]; yield
    (endpoint, supervisor pid) per node."""
    with contextlib.ExitStack() as stack:
        out = []
        for i in range(count):
            ep = f"ipc://{tmp}/node{i}-{time.monotonic_ns()}.sock"
            svc = stack.enter_context(acm_service(store.seeds[i], workers, ep,
                                                  new_session=True))
            out.append((ep, svc.pid))
        yield out


def cell(store: Store, layout: str, args: argparse.Namespace,
         tmp: str) -> dict[str, Result]:
    """Measure one (store, layout) cell: a closed-loop and (--paced) an open-loop phase."""
    count, workers = (int(x) for x in layout.split("x"))
    store.flush()
    out: dict[str, Result] = {}
    with nodes(store, count, workers, tmp) as ns:
        groups: dict[str, list[int]] = {"workers": [], "node other": [], "store": store.pids}
        for i, (_, pid) in enumerate(ns):
            w = worker_pids(pid)
            groups[f"node{i} workers"] = w
            groups["workers"] += w
            groups["node other"] += [pid] + [c for c in children(pid) if c not in w]
        eps = [ep for ep, _ in ns]
        phases = [("closed", 0.0)] + ([("paced", args.paced)] if args.paced else [])
        for key, rate in phases:
            r = drive(eps, args.clients, args.seconds, rate=rate, procs=args.load_procs,
                      server_pids=groups["workers"] + groups["node other"],
                      store_pids=store.pids, groups=groups, name=f"{store.name} {layout}")
            r.extra["loadavg"] = os.getloadavg()
            out[key] = r
    return out


def row(r: Result, ceiling: Result | None) -> dict[str, Any]:
    """Return a phase's figures for the table and the JSON."""
    cpu = r.extra.get("cpu_us", {})
    # The cores every process of the cell ran on, on average: on a shared machine, what the
    # neighbours left it (decisions/s follow it; the CPU per decision hardly does).
    used = sum(v for k, v in cpu.items() if k in ("workers", "node other", "store"))
    cores = (used + r.client_cpu_us) * r.count / r.seconds / 1e6
    return {"cores": round(cores, 2), "rate": round(r.rate), "p50": round(r.p50),
            "p99": round(r.p99), "errors": r.errors, "client_bound": r.client_bound,
            "tool_ceiling": round(ceiling.rate) if ceiling else None,
            "of_ceiling": round(r.rate / ceiling.rate, 2) if ceiling and ceiling.rate else None,
            "cpu_us": {**cpu, "tool": round(r.client_cpu_us, 2)},
            "tool_busy": round(r.client_util, 2), "loadavg": r.extra.get("loadavg")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measured phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layouts", default="1x1,2x1",
                    help="comma-separated NxW: N nodes of W workers each")
    ap.add_argument("--stores", default="standalone,cluster_1,cluster_3")
    ap.add_argument("--clients", type=int, default=16, help="logical clients, all nodes")
    ap.add_argument("--load-procs", type=int, default=2,
                    help="load processes (the same for every cell; at least one per node)")
    ap.add_argument("--paced", type=float, default=2000.0,
                    help="rate of the open-loop phase (decisions/s); 0 = skip it")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    meta = {**machine(), "loadavg_start": os.getloadavg(), "args": vars(args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    stores: list[Store] = []
    runs: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="acm-nodes-")
    try:
        for name in args.stores.split(","):
            stores.append(Store(name))
        for rnd in range(args.rounds):
            ep = f"ipc://{tmp}/reflect-{rnd}.sock"
            most = max(int(n) * int(w) for n, w in (x.split("x") for x in layouts))
            with zmtp_pool(ep, most, "reflect") as pids:
                ceiling = drive(ep, args.clients, args.seconds, procs=args.load_procs,
                                server_pids=pids, name="load tool ceiling: reflector",
                                groups={"workers": pids})
                ceiling.extra["loadavg"] = os.getloadavg()
            runs.append({"round": rnd, "store": "-", "layout": "reflector", "closed":
                         row(ceiling, None)})
            cells = [(st, lay) for st in stores for lay in layouts]
            # The order turns every round: a steady change of the neighbours' load weighs on
            # every cell alike over two rounds.
            for st, lay in cells if rnd % 2 == 0 else cells[::-1]:
                got = cell(st, lay, args, tmp)
                runs.append({"round": rnd, "store": st.name, "layout": lay,
                             "seeds": st.seeds[:int(lay.split("x")[0])],
                             **{k: row(v, ceiling) for k, v in got.items()},
                             "raw": {k: asdict(v) for k, v in got.items()}})
    finally:
        for st in stores:
            st.cleanup()
        with contextlib.suppress(OSError):
            for f in Path(tmp).iterdir():
                f.unlink()
            Path(tmp).rmdir()
    meta["loadavg_end"] = os.getloadavg()
    print(report(runs, meta, layouts))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2,
                                              default=str))
    return 0


def report(runs: list[dict[str, Any]], meta: dict[str, Any], layouts: list[str]) -> str:
    """Render every cell of every round, then the ratios between layouts within each round."""
    lines = [f"nodes_bench — {meta['nproc']} CPUs ({meta['cpu']}), python {meta['python']}, "
             f"{meta['date']}, load average {meta['loadavg_start'][0]:.2f} at start, "
             f"{meta['loadavg_end'][0]:.2f} at end", "",
             f"{'rnd':>3} {'store':10} {'layout':9} {'dec/s':>8} {'p50':>6} {'p99':>6} "
             f"{'ceiling':>8} {'of':>5} {'paced p99':>9} {'wrk':>6} {'node':>6} {'store':>6} "
             f"{'tool':>6} {'cores':>5} {'load':>5}  flags",
             f"{'':>3} {'':10} {'':9} {'':>8} {'us':>6} {'us':>6} {'dec/s':>8} {'ceil':>5} "
             f"{'us':>9} {'cpu us per decision':^27} {'got':>5} {'avg':>5}"]
    for r in runs:
        c = r["closed"]
        if r["layout"] == "reflector":
            lines.append(f"{r['round']:>3} {'-':10} {'reflect':9} {c['rate']:8,} {c['p50']:6} "
                         f"{c['p99']:6} {'':>8} {'':>5} {'':>9} {'':>6} {'':>6} {'':>6} "
                         f"{c['cpu_us']['tool']:6.1f} {c['cores']:5.2f} "
                         f"{c['loadavg'][0] if c['loadavg'] else 0:5.1f}  load tool ceiling")
            continue
        cpu = c["cpu_us"]
        paced = r.get("paced")
        flags = []
        if c["client_bound"]:
            flags.append("CLIENT-BOUND")
        if paced and paced["client_bound"]:
            flags.append("paced CLIENT-BOUND")
        if c["errors"] or (paced and paced["errors"]):
            flags.append(f"errors {c['errors']}/{paced['errors'] if paced else 0}")
        lines.append(
            f"{r['round']:>3} {r['store']:10} {r['layout']:9} {c['rate']:8,} {c['p50']:6} "
            f"{c['p99']:6} {c['tool_ceiling']:8,} {c['of_ceiling']:5.2f} "
            f"{paced['p99'] if paced else '-':>9} {cpu['workers']:6.1f} {cpu['node other']:6.1f} "
            f"{cpu['store']:6.1f} {cpu['tool']:6.1f} {c['cores']:5.2f} {c['loadavg'][0]:5.1f}  "
            f"{' '.join(flags)}")
    lines += ["", f"ratios within each round, to layout {layouts[0]} on the same store "
              "(dec/s, p99, worker+store CPU per decision):"]
    for r in runs:
        if r["layout"] in ("reflector", layouts[0]):
            continue
        base = next(b for b in runs if b["round"] == r["round"] and b["store"] == r["store"]
                    and b["layout"] == layouts[0])
        a, b = r["closed"], base["closed"]

        def srv(x: dict[str, Any]) -> float:
            return x["cpu_us"]["workers"] + x["cpu_us"]["store"]

        lines.append(f"  round {r['round']} {r['store']:10} {r['layout']} / {layouts[0]}: "
                     f"dec/s {a['rate'] / b['rate']:.2f}x, p99 {a['p99'] / b['p99']:.2f}x, "
                     f"cpu {srv(a) / srv(b):.2f}x")
    std = [r for r in runs if r["store"] == "standalone"]
    if std:
        lines += ["", "ratios within each round, to the standalone store with the same layout "
                  "(worker CPU per decision, store CPU per decision):"]
        for r in runs:
            if r["store"] in ("-", "standalone"):
                continue
            b = next(s for s in std if s["round"] == r["round"] and s["layout"] == r["layout"])
            a, s = r["closed"]["cpu_us"], b["closed"]["cpu_us"]
            lines.append(f"  round {r['round']} {r['store']:10} {r['layout']}: workers "
                         f"{a['workers'] / s['workers']:.2f}x, "
                         f"store {a['store'] / s['store']:.2f}x")
    med = statistics.median(r["closed"]["rate"] for r in runs if r["layout"] == "reflector")
    lines.append(f"\nload tool ceiling (median of rounds): {med:,.0f} req/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
