"""The same `acm bench` against the service of two checkouts, interleaved in one session
(before, after, after, before, before, after, ...: the order turns every round, so a steady rise
or fall of the neighbours' load weighs on both sides alike over two rounds), with the ratios
after/before of each round's pair.

    .venv/bin/python benchmarks/ab_bench.py --before ../acm-before --after . --rounds 4 \\
        -- --workers 2 --seconds 3 --skip-baseline

The load tool is this checkout's `acm bench` for both sides (the same clients, reflector and
echo pool, so the same ceiling, measured in every run); only its acm phases run the other
checkout's `acm serve` (`acm bench --serve-from CHECKOUT`), with that checkout's interpreter
(CHECKOUT/.venv/bin/python unless --before-python/--after-python say otherwise) and its own
compiled hot path. The arguments after `--` go to both. A pair's ratio compares two runs a
minute apart at most, so the neighbours' load changes less between them than across the
session; the median of the pairs' ratios is the figure. ACM_PUREPYTHON from the environment
chooses the twin for both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.loadtool, for --together
PHASES = ("reflect_n", "echo_n", "acm_1", "acm_n", "acm_paced")
FIGURES = ("rate", "p50", "p99", "server_cpu_us", "store_cpu_us", "worker_cpu_us",
           "batch_cpu_p50_us", "mean_batch")


def bench(checkout: Path, python: str, bench_args: list[str]) -> dict[str, Any]:
    """Run `acm bench` with the service of `checkout`; return its JSON document."""
    with tempfile.TemporaryDirectory(prefix="acm-ab-") as d:
        out = Path(d) / "bench.json"
        p = subprocess.run([sys.executable, "-m", "acm_module.cli", "bench", "--serve-from",
                            str(checkout), "--serve-python", python, *bench_args, "--json",
                            str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"acm bench in {checkout} exited {p.returncode}:\n"
                               f"{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def _requests(store: str) -> int:
    """Return the decisions every worker of a store's service has counted so far."""
    from acm_module.core import stats
    from acm_module.decide.store.cluster import StoreClient

    c = StoreClient(store, timeout=2.0)
    try:
        c.connect()
        time.sleep(1.1)  # workers publish once a second: let the last period land
        return sum(s["requests"] for s in stats.read_all(c))
    finally:
        c.close()


def together(sides: dict[str, tuple[Path, str]],
             args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Run both services at once, each on its own redis-server, driven by the same load
    processes (half the clients each); return the per-side CPU per decision and their ratios,
    as text and as data.

    Both sides share every moment of the neighbours' load, so the ratio of their CPU per
    decision in one phase is the comparison least disturbed by it.
    """
    from benchmarks.loadtool import acm_service, drive, redis_server, worker_pids, zmtp_pool

    lines = [f"both services at once, {args.clients} clients over 2 load processes, "
             f"{args.workers} workers each, {args.seconds:.0f} s per phase, {os.cpu_count()} "
             f"CPUs, load average {os.getloadavg()[0]:.1f} at start", "",
             f"{'rnd':>3} {'side':6} {'dec/s':>8} {'worker us/dec':>13} {'store us/dec':>12} "
             f"{'load':>5}  both sides / tool ceiling"]
    ratios: dict[str, list[float]] = {"dec/s": [], "worker": [], "store": []}
    with contextlib.ExitStack() as st:
        # The load tool's ceiling: the same clients and load processes against a reflector
        # with as many workers as both services have.
        ep = f"ipc://{st.enter_context(tempfile.TemporaryDirectory())}/reflect.sock"
        with zmtp_pool(ep, 2 * args.workers, "reflect") as pids:
            ceiling = drive(ep, args.clients, args.seconds, procs=2, server_pids=pids)
        lines.insert(1, f"load tool ceiling (reflector, same clients): {ceiling.rate:,.0f} req/s")
        svc: dict[str, tuple[str, str, int, int]] = {}
        rounds: list[dict[str, Any]] = []
        for side, (co, py) in sides.items():
            store, spid = st.enter_context(redis_server(None))
            ep = f"ipc://{st.enter_context(tempfile.TemporaryDirectory())}/{side}.sock"
            p = st.enter_context(acm_service(store, args.workers, ep, src=co, python=py))
            svc[side] = (ep, store, p.pid, spid or 0)
        groups = {f"{s} {g}": (worker_pids(v[2]) if g == "workers" else [v[3]])
                  for s, v in svc.items() for g in ("workers", "store")}
        for rnd in range(args.rounds):
            n0 = {s: _requests(v[1]) for s, v in svc.items()}
            # Load process i drives endpoint i: swap them every round, so neither side always
            # has the process that starts first.
            eps = [v[0] for v in svc.values()]
            r = drive(eps if rnd % 2 == 0 else eps[::-1], args.clients, args.seconds, procs=2,
                      groups=groups, name=f"round {rnd}")
            n = {s: _requests(v[1]) - n0[s] for s, v in svc.items()}
            got: dict[str, dict[str, float]] = {}
            for s in svc:
                cpu = {g: r.extra["cpu_us"][f"{s} {g}"] * r.count / max(n[s], 1)
                       for g in ("workers", "store")}
                got[s] = {"dec/s": n[s] / args.seconds, "worker": cpu["workers"],
                          "store": cpu["store"]}
                bound = " CLIENT-BOUND" if r.client_bound else ""
                lines.append(f"{rnd:>3} {s:6} {got[s]['dec/s']:8,.0f} "
                             f"{got[s]['worker']:13.1f} {got[s]['store']:12.1f} "
                             f"{os.getloadavg()[0]:5.1f}  {r.rate / ceiling.rate:.2f}{bound}")
            rounds.append({**got, "tool_ceiling": ceiling.rate, "rate": r.rate,
                           "client_bound": r.client_bound, "loadavg": os.getloadavg()})
            for k in ratios:
                ratios[k].append(got["after"][k] / got["before"][k])
    lines += ["", "after / before, per round, then the median (the stats count decisions "
              "since the previous reading: a phase's warm-up requests are in it):"]
    for k, vs in ratios.items():
        lines.append(f"  {k:7} {' '.join(f'{v:5.2f}' for v in vs)}   median "
                     f"{statistics.median(vs):.2f}")
    return "\n".join(lines), {"rounds": rounds, "ratios": ratios}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="checkout A")
    ap.add_argument("--after", required=True, type=Path, help="checkout B")
    ap.add_argument("--before-python", default="")
    ap.add_argument("--after-python", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--together", action="store_true",
                    help="instead: both services at once, each on its own store, driven by "
                         "the same load processes; per-side CPU per decision")
    ap.add_argument("--seconds", type=float, default=3.0, help="--together: per phase")
    ap.add_argument("--clients", type=int, default=16, help="--together: both sides")
    ap.add_argument("--workers", type=int, default=1, help="--together: per service")
    ap.add_argument("--json", default="")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="after --: arguments of `acm bench` for both")
    args = ap.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    sides = {}
    for side in ("before", "after"):
        co = getattr(args, side).resolve()
        py = getattr(args, f"{side}_python") or str(co / ".venv" / "bin" / "python")
        sides[side] = (co, py)
    if args.together:
        text, data = together(sides, args)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=2))
        return 0
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = list(sides.items()) if rnd % 2 == 0 else list(sides.items())[::-1]
        for side, (co, py) in order:
            sys.stderr.write(f"round {rnd} {side}: acm bench {' '.join(bench_args)}\n")
            doc = bench(co, py, bench_args)
            res = {k: v for k, v in doc["results"].items() if k in PHASES}
            for v in res.values():
                if v.get("server_cpu_us") is not None and v.get("store_cpu_us") is not None:
                    v["worker_cpu_us"] = v["server_cpu_us"] - v["store_cpu_us"]
            iw = doc["meta"].get("in_worker_n") or {}
            if iw.get("batches") and "acm_n" in res:
                # The hot path's own CPU (receive -> send, the store excluded), in the worker.
                res["acm_n"]["batch_cpu_p50_us"] = iw["service_cpu_us"]["p50"]
                res["acm_n"]["mean_batch"] = iw["requests"] / iw["batches"]
            runs.append({"round": rnd, "side": side, "meta": doc["meta"], "results": res})
    print(report(runs, bench_args))
    if args.json:
        Path(args.json).write_text(json.dumps({"bench_args": bench_args, "runs": runs},
                                              indent=2))
    return 0


def report(runs: list[dict[str, Any]], bench_args: list[str]) -> str:
    """Render every run's figures, then each pair's ratios after/before and their median."""
    m = runs[0]["meta"]
    lines = [f"acm bench {' '.join(bench_args)} — {m['machine']}, python {m['python']}, hot path "
             f"{m['hot_path']}, {m['workers']} workers, {m['clients']} clients", "",
             f"{'rnd':>3} {'side':6} {'phase':9} {'req/s':>8} {'p50 us':>7} {'p99 us':>7} "
             f"{'srv cpu':>8} {'store':>6} {'worker':>6} {'ceiling':>8} {'load':>5}  flags"]
    for r in runs:
        ceiling = r["results"].get("reflect_n", {}).get("rate", 0)
        la = r["meta"].get("loadavg_start", (0,))[0], r["meta"].get("loadavg_end", (0,))[0]
        for k, ph in r["results"].items():
            if k == "reflect_n":
                continue
            srv = ph.get("server_cpu_us") or 0.0
            st = ph.get("store_cpu_us") or 0.0
            flag = "CLIENT-BOUND" if ph.get("client_bound") else ""
            lines.append(f"{r['round']:>3} {r['side']:6} {k:9} {ph['rate']:8,.0f} "
                         f"{ph['p50']:7.0f} {ph['p99']:7.0f} {srv:8.1f} {st:6.1f} "
                         f"{srv - st:6.1f} "
                         f"{ceiling:8,.0f} {la[0]:2.0f}-{la[1]:<2.0f} {flag}")
    served = {r["side"]: r["meta"].get("served_from", "?") for r in runs}
    lines += ["", f"service: before = {served.get('before')}, after = {served.get('after')}",
              "after / before, per pair (round), then the median:"]
    pairs: dict[tuple[str, str], list[float]] = {}
    for rnd in sorted({r["round"] for r in runs}):
        b = next(r for r in runs if r["round"] == rnd and r["side"] == "before")
        a = next(r for r in runs if r["round"] == rnd and r["side"] == "after")
        for k in PHASES:
            pa, pb = a["results"].get(k), b["results"].get(k)
            if not pa or not pb:
                continue
            for f in FIGURES:
                v = ratio(pa.get(f), pb.get(f))
                if v is not None:
                    pairs.setdefault((k, f), []).append(v)
    for (k, f), vs in pairs.items():
        lines.append(f"  {k:9} {f:14} {' '.join(f'{v:5.2f}' for v in vs)}   median "
                     f"{statistics.median(vs):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
