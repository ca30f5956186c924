"""Unchecked calls under a co-located load: paced OpenSIPS-like checks while `acm writer` and its
sinks (PostgreSQL, QuestDB, embedded ClickHouse) share the machine with the pool and its store.

    python benchmarks/bench_colocated.py [--rate 1000] [--seconds 30] [--procs 4] \\
        [--env ACM_STORE_TIMEOUT_MS=20 ...] [--no-writer] [--json out.json]

A call goes through unchecked when OpenSIPS gets no verdict: the service answered
`store_unavailable`/`store_error` (the store was down or slower than the worker's store budget),
the client's own budget (50 ms) ran out, or the client's breaker was open after such failures.
The load is `--procs` processes, each an `AcmClient` of opensips_scripts/acm_opensips.py (the
code OpenSIPS runs: REQ socket, timeout, breaker) paced at rate/procs; every call has a fresh
Call-ID and B-number drawn from many, so the writer gets one decision record per call.

Servers: redis-server, PostgreSQL 15 and QuestDB are started here (temporary, loopback);
ClickHouse is chdb in a temporary directory. QuestDB needs scripts/fetch-questdb.sh first.
The figure is the unchecked share of the calls placed, with where each came from, and the CPU
each part of the box used over the run (the co-located load, measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "opensips_scripts")]

from acm_module.core import stats as stats_mod  # noqa: E402
from acm_module.decide.store.conn import StoreConnection  # noqa: E402
from acm_module.write.migrate import migrate  # noqa: E402
from benchmarks.loadtool import acm_service, cpu_ns, redis_server, worker_pids  # noqa: E402
from tests.support.pgqdb import PostgresServer, QuestDBServer  # noqa: E402

CTX = mp.get_context("fork")
UNCHECKED_REASONS = ("service_unavailable", "service_error", "client_error")


def _caller(endpoint: str, rate: float, seconds: float, warmup_s: float, seed: int,
            client_cfg: dict[str, Any], start: Any, out: Any) -> None:
    """One OpenSIPS process: AcmClient.check() paced at `rate`; report what came back."""
    from acm_module.core.arbiter import die_with_parent

    die_with_parent(signal.SIGKILL, os.getppid())
    os.setsid()  # an OpenSIPS process of its own: its own session and scheduler autogroup
    try:
        out.put(_calls(endpoint, rate, seconds, warmup_s, seed, client_cfg, start))
    except Exception as e:  # reported by the parent, which must not wait forever
        out.put(e)


def _calls(endpoint: str, rate: float, seconds: float, warmup_s: float, seed: int,
           client_cfg: dict[str, Any], start: Any
           ) -> tuple[bytes, dict[str, int], dict[str, int]]:
    from acm_opensips import AcmClient, Config

    client = AcmClient(Config(endpoint=endpoint, **client_cfg))
    client.after_fork(seed)
    rng = random.Random(seed)
    lat = array("q")
    reasons: dict[str, int] = {}
    interval = 1.0 / rate
    start.wait()
    t_begin = time.perf_counter()
    t_measure = t_begin + warmup_s
    t_end = t_measure + seconds
    next_at = t_begin
    i = 0
    stats0 = None
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        if now < next_at:
            time.sleep(next_at - now)
        measuring = next_at >= t_measure
        if measuring and stats0 is None:
            stats0 = asdict(client.stats)
        t0 = time.perf_counter()
        v = client.check(f"colo-{seed}-{i}", f"+23481{rng.randrange(10**8):08d}",
                         f"+23480{rng.randrange(10**6):08d}")
        i += 1
        next_at += interval
        if not measuring:
            continue
        lat.append(int((time.perf_counter() - t0) * 1e9))
        key = v.reason if v.policy else "checked"
        reasons[key] = reasons.get(key, 0) + 1
    st = {k: v - (stats0 or {}).get(k, 0) for k, v in asdict(client.stats).items()}
    client.close()
    return lat.tobytes(), reasons, st


def _renice(pids: list[int], nice: int) -> None:
    """Give the processes this priority: every thread's nice value, and their session's
    scheduler autogroup's (with autogroups on, a nice value counts only against the tasks of
    the same session; the call path runs in sessions of its own, see measure())."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))


def _tree(pid: int) -> list[int]:
    """Return pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        r = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True)
        todo += [int(x) for x in r.stdout.split()]
    return out


def _pool_counters(store_url: str, pids: list[int]) -> dict[str, int]:
    """Return the unchecked calls and store failures the workers `pids` published."""
    c = StoreConnection(store_url, timeout=2.0)
    try:
        time.sleep(1.1)  # workers publish once a second
        snaps = [s for s in stats_mod.read_all(c) if s["pid"] in pids]
    finally:
        c.close()
    out: dict[str, int] = {"requests": sum(s["requests"] for s in snaps),
                           "store_failures": sum(s["store_failures"] for s in snaps)}
    for s in snaps:
        for k, v in stats_mod.unchecked(s).items():
            out[k] = out.get(k, 0) + v
    return out


def measure(store: str, endpoint: str, env: dict[str, str], groups: dict[str, list[int]],
            args: argparse.Namespace) -> dict[str, Any]:
    """Start acm serve with `env`, place the paced checks, return what they measured."""
    env = dict(env)
    nice = int(env.pop("NICE", "0"))  # the call path's priority, set here (see --env)
    writer_nice = int(env.pop("WRITER_NICE", "0"))
    src = Path(env.pop("SRC", str(ROOT)))  # another checkout's acm serve, for before/after
    client_cfg: dict[str, Any] = {}
    if "BREAKER_FAILURES" in env:  # the OpenSIPS client's ACM_BREAKER_FAILURES
        client_cfg["breaker_failures"] = int(env.pop("BREAKER_FAILURES"))
    batch = [x for g in ("writer", "postgres", "questdb") for p in groups.get(g, [])
             for x in _tree(p)]
    _renice(batch, writer_nice)
    with acm_service(store, args.workers, endpoint, env, src, new_session=True) as svc:
        workers = worker_pids(svc.pid)
        groups = {**groups, "acm workers": workers}
        _renice([svc.pid, *workers, *groups["store"]], nice)
        time.sleep(1.0)
        start = CTX.Event()
        q_out: Any = CTX.Queue()
        per = args.rate / args.procs
        callers = [CTX.Process(target=_caller, args=(endpoint, per, args.seconds, args.warmup,
                                                     1000 + i, client_cfg, start, q_out))
                   for i in range(args.procs)]
        for p in callers:
            p.start()
            _renice([p.pid] if p.pid else [], nice)
        time.sleep(0.5)
        served0 = _pool_counters(store, workers)
        start.set()
        time.sleep(args.warmup)
        pids = {g: [x for p in ps for x in _tree(p)] for g, ps in groups.items()}
        pids["load (callers)"] = [p.pid for p in callers if p.pid]
        cpu0 = {g: cpu_ns(ps) for g, ps in pids.items()}
        la0 = os.getloadavg()
        t0 = time.monotonic()
        lat = array("q")
        reasons: dict[str, int] = {}
        client: dict[str, int] = {}
        for _ in callers:
            got = q_out.get(timeout=args.seconds + args.warmup + 60)
            if isinstance(got, Exception):
                raise RuntimeError(f"a caller failed: {got!r}") from got
            raw, rs, st = got
            chunk = array("q")
            chunk.frombytes(raw)
            lat.extend(chunk)
            for k, v in rs.items():
                reasons[k] = reasons.get(k, 0) + v
            for k, v in st.items():
                client[k] = client.get(k, 0) + v
        wall = time.monotonic() - t0
        cpu = {g: (cpu_ns(ps) - cpu0[g]) / 1e9 / wall for g, ps in pids.items()}
        la1 = os.getloadavg()
        for p in callers:
            p.join(10)
        served1 = _pool_counters(store, workers)
        _renice(groups["store"], 0)

    total = sum(reasons.values())
    unchecked = sum(v for k, v in reasons.items() if k != "checked")
    served = {k: served1[k] - served0.get(k, 0) for k in served1}
    lat_s = sorted(lat)

    def pct(p: float) -> float:
        return lat_s[min(len(lat_s) - 1, int(len(lat_s) * p))] / 1e6 if lat_s else 0.0

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "env": env, "nice": nice,
        "writer_nice": writer_nice, "src": str(src) if src != ROOT else "",
        "client": client_cfg, "calls": total,
        "unchecked": unchecked, "unchecked_share": unchecked / total if total else 0.0,
        "by_reason": reasons, "client_stats": client, "pool_counters": served,
        "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p99.9": pct(0.999),
                       "max": lat_s[-1] / 1e6 if lat_s else 0.0},
        "cpu_share": {g: round(v, 3) for g, v in cpu.items()}, "loadavg": [la0[0], la1[0]],
    }


def render(r: dict[str, Any]) -> str:
    """Return one measurement as text."""
    c, served, lm = r["client_stats"], r["pool_counters"], r["latency_ms"]
    return "\n".join([
        f"{r['date']} {('acm serve from ' + r['src'] + ', ') if r['src'] else ''}"
        f"env {r['env'] or 'defaults'}, client {r['client'] or 'defaults'}, call path at "
        f"nice {r['nice']}, writer "
        f"and sinks at nice {r['writer_nice']}: calls "
        f"{r['calls']}, unchecked "
        f"{r['unchecked']} = {100 * r['unchecked_share']:.3f} % (by reason: {r['by_reason']})",
        f"  pool answered store_unavailable {served['store_unavailable']}, store_error "
        f"{served['store_error']}, internal {served['internal']}, store failures "
        f"{served['store_failures']}; client timeouts "
        f"{c.get('timeouts', 0)}, breaker short-circuits {c.get('short_circuits', 0)}",
        f"  check latency ms (OpenSIPS side): p50 {lm['p50']:.2f}, p99 {lm['p99']:.2f}, "
        f"p99.9 {lm['p99.9']:.2f}, max {lm['max']:.2f}",
        "  CPU over the run, in CPUs (2 = the whole box): " + ", ".join(
            f"{g} {v:.2f}" for g, v in r["cpu_share"].items())
        + f"; load average {r['loadavg'][0]:.2f} -> {r['loadavg'][1]:.2f}"])


def main(argv: list[str] | None = None) -> int:
    """Run the co-located measurement; print it and write --json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="checks per second, in all")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured span per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="paced seconds not counted")
    ap.add_argument("--procs", type=int, default=4, help="OpenSIPS-like client processes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=VALUE[,NAME=VALUE...] for acm serve: one run per --env, in "
                         "order (none: one run on defaults); NICE=-10 runs the call path "
                         "(workers, store, callers) at that priority, WRITER_NICE=10 the "
                         "writer, PostgreSQL and QuestDB; SRC=DIR runs acm serve from "
                         "another checkout (before/after a change, in one run); "
                         "BREAKER_FAILURES=N sets the OpenSIPS client's breaker")
    ap.add_argument("--repeat", type=int, default=1, help="run the --env list this many times")
    ap.add_argument("--no-writer", action="store_true", help="no writer and no sinks")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    variants = [dict(kv.split("=", 1) for kv in e.split(",") if kv) for e in args.env] or [{}]

    tmp = tempfile.mkdtemp(prefix="acm-colo-")
    servers: list[Any] = []
    writer: subprocess.Popen | None = None
    groups: dict[str, list[int]] = {}
    runs: list[dict[str, Any]] = []
    stack = contextlib.ExitStack()
    head = (f"co-located check load — {platform.node()} {platform.machine()} "
            f"{os.cpu_count()} cores, {args.rate:.0f} checks/s for {args.seconds:.0f} s per run "
            f"from {args.procs} AcmClient processes, {args.workers} workers, writer "
            f"{'off' if args.no_writer else 'on (pg, questdb, clickhouse)'}")
    print(head, flush=True)
    try:
        store, store_pid = stack.enter_context(redis_server(None))
        assert store_pid is not None
        groups["store"] = [store_pid]
        if not args.no_writer:
            pg = PostgresServer().init().start()
            servers.append(pg)
            migrate(pg.url)
            q = QuestDBServer().start()
            servers.append(q)
            assert q.proc is not None
            groups["questdb"] = [q.proc.pid]
            groups["postgres"] = [int((pg.data / "postmaster.pid").read_text().split()[0])]
            wenv = {"DATABASE_URL": pg.url, "QUESTDB_URL": q.url,
                    "ACM_CHDB_PATH": os.path.join(tmp, "chdb"),
                    "ACM_WHITELIST_SYNC_INTERVAL": "0", "ACM_LOG_LEVEL": "WARNING"}
            writer = subprocess.Popen([sys.executable, "-m", "acm_module.cli", "writer",
                                       "--store", store], env={**os.environ, **wenv}, cwd=ROOT)
            groups["writer"] = [writer.pid]
        for i in range(args.repeat):
            for j, env in enumerate(variants):
                res = measure(store, f"ipc://{tmp}/acm-{i}-{j}.sock", env, groups, args)
                runs.append(res)
                print(render(res), flush=True)
    finally:
        if writer is not None:
            writer.send_signal(signal.SIGTERM)
            try:
                writer.wait(30)
            except subprocess.TimeoutExpired:
                writer.kill()
        for s in reversed(servers):
            with contextlib.suppress(Exception):
                s.cleanup()
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"head": head, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
