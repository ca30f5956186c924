"""`acm bench`: the end-to-end load tool.

Starts a store (redis-server, unless --store is given) and the service, then drives client
processes that behave like OpenSIPS processes (one REQ socket each, one request in flight):
closed loop (as fast as answers come) and open loop (requests scheduled at a fixed rate, latency
counted from the scheduled time so a stall is not hidden). In the same run it measures

* the floor: a bare ZeroMQ echo round trip over the same transport, plus a bare EVALSHA round
  trip of the same decide.lua with a minimal client;
* the straightforward design: a `zmq.proxy` in front of REP workers that call the script through
  redis-py, one request at a time;

and prints every figure with its ratio to both. JSON results go to --json.
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from acm_module.client import CurveKeys

REPO = Path(__file__).resolve().parent.parent
CTX = mp.get_context("fork")


# -- measurement -------------------------------------------------------------------------------

@dataclass
class Result:
    """Latencies (microseconds) and throughput of one measured phase."""

    name: str
    clients: int
    seconds: float
    count: int
    errors: int
    p50: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    mean: float = 0.0
    rate: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, clients: int, seconds: float, lat_ns: array, errors: int,
           **extra: Any) -> Result:
        lat = sorted(lat_ns)
        n = len(lat)

        def pct(p: float) -> float:
            return lat[min(n - 1, int(n * p))] / 1000.0 if n else 0.0

        return cls(name, clients, seconds, n, errors, pct(0.5), pct(0.99), pct(0.999),
                   (sum(lat) / n / 1000.0) if n else 0.0, n / seconds if seconds else 0.0,
                   extra)


def _request(i: int, rng: random.Random, b_pool: int) -> bytes:
    # Realistic mix: many B-numbers, most calls clean; the service stamps ts itself.
    return msgpack.packb({"call_id": f"bench-{os.getpid()}-{i}",
                          "a": f"+23481{rng.randrange(10**8):08d}",
                          "b": f"+23480{rng.randrange(b_pool):08d}"})


def _req_socket(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(s)
    s.connect(endpoint)
    return s


def _client_proc(endpoint: str, seconds: float, rate: float, b_pool: int, start: Any,
                 out: Any, warmup: int, curve: CurveKeys | None = None) -> None:
    """One OpenSIPS-like client: a REQ socket, one request in flight."""
    _die_with_parent()
    ctx = zmq.Context()
    s = _req_socket(ctx, endpoint, curve)
    rng = random.Random(os.getpid())
    lat = array("q")
    errors = 0
    try:
        for i in range(warmup):
            s.send(_request(-1 - i, rng, b_pool))
            if not s.poll(5000):
                errors += 1  # no service answering: reported as an error, nothing timed
                return
            s.recv()
        start.wait()
        t_end = time.perf_counter_ns() + int(seconds * 1e9)
        interval = int(1e9 / rate) if rate > 0 else 0
        next_at = time.perf_counter_ns()
        i = 0
        while True:
            now = time.perf_counter_ns()
            if now >= t_end:
                break
            if interval:
                if now < next_at:
                    time.sleep((next_at - now) / 1e9)
                t0 = next_at  # open loop: count from the scheduled time
                next_at += interval
            else:
                t0 = now
            s.send(_request(i, rng, b_pool))
            if not s.poll(2000):
                errors += 1
                s.close(linger=0)
                s = _req_socket(ctx, endpoint, curve)
                continue
            reply = s.recv()
            lat.append(time.perf_counter_ns() - t0)
            if b"error" in reply[:8]:
                errors += 1
            i += 1
    finally:
        s.close(linger=0)
        ctx.term()
        out.put((lat.tobytes(), errors))


def drive(endpoint: str, clients: int, seconds: float, rate: float = 0.0, b_pool: int = 10**6,
          warmup: int = 200, progress: Callable[[str], None] | None = None,
          curve: CurveKeys | None = None) -> tuple[array, int]:
    """Run `clients` client processes for `seconds`; return (latencies in ns, errors)."""
    start = CTX.Event()
    out: Any = CTX.Queue()
    per_client_rate = rate / clients if rate else 0.0
    procs = [CTX.Process(target=_client_proc,
                         args=(endpoint, seconds, per_client_rate, b_pool, start, out, warmup,
                               curve))
             for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.3 + 0.02 * clients)
    start.set()
    t0 = time.monotonic()
    while progress and time.monotonic() - t0 < seconds:
        progress(f"{time.monotonic() - t0:4.1f}/{seconds:.0f}s")
        time.sleep(0.5)
    lat = array("q")
    errors = 0
    for _ in procs:
        raw, err = out.get(timeout=seconds + 60)
        chunk = array("q")
        chunk.frombytes(raw)
        lat.extend(chunk)
        errors += err
    for p in procs:
        p.join(10)
    return lat, errors


def _die_with_parent() -> None:
    """Let a load or server process end with the bench, whatever ends the bench."""
    from acm_module.server.proctitle import die_with_parent

    die_with_parent(signal.SIGKILL, os.getppid())


# -- servers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """Yield a store URL: the given one, or a temporary redis-server's."""
    if url:
        yield url
        return
    port = _free_port()
    d = tempfile.mkdtemp(prefix="acm-bench-redis-")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", d],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def acm_service(store: str, workers: int, endpoint: str, env: dict[str, str] | None = None,
                curve: CurveKeys | None = None) -> Iterator[subprocess.Popen]:
    """Run `acm serve` until the block ends."""
    e = {**os.environ, "ACM_MI_HTTP": "", "ACM_MI_DATAGRAM": "", "ACM_METRICS_HTTP": "",
         "ACM_LOG_LEVEL": "WARNING", "ACM_STATE_DIR": tempfile.mkdtemp(prefix="acm-bench-st-"),
         **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "acm_module.cli", "serve", "--workers",
                          str(workers), "--store", store, "--endpoint", endpoint], env=e,
                         cwd=REPO)
    try:
        _wait_ready(endpoint, curve=curve)
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def _wait_ready(endpoint: str, timeout: float = 20.0, curve: CurveKeys | None = None) -> None:
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = _req_socket(ctx, endpoint, curve)
            s.send(msgpack.packb({"call_id": "probe", "a": "x", "b": "y"}))
            ok = s.poll(300)
            s.close(linger=0)
            if ok:
                return
        raise RuntimeError(f"service on {endpoint} not ready")
    finally:
        ctx.term()


def _echo_proc(endpoint: str, ready: Any) -> None:
    _die_with_parent()
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    ready.set()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        s.send_multipart(s.recv_multipart())


def _straightforward_worker(backend: str, store: str, sha: str, ready: Any) -> None:
    _die_with_parent()
    import redis  # the straightforward client, one command per request

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    r = redis.Redis.from_url(store)
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.connect(backend)
    ready.set()
    from acm_module.engine.hotpath_py import decode_request, normalise, partition_of

    n = 0
    while True:
        req = decode_request(s.recv(), 4096, int(time.time() * 1000))
        a, b = normalise(req.a or ""), normalise(req.b or "")
        if a is None or b is None:
            s.send(msgpack.packb({"verdict": "allow", "reason": "invalid", "distinct": 0}))
            continue
        t = "{acm.%d}:" % partition_of(b, 16)
        n += 1
        v = r.evalsha(sha, 8, t + "w:" + b, t + "e:" + b, t + "ea:" + b, t + "wl:" + b,
                      t + "c:" + req.call_id, t + "s", t + "n", t + "k", req.call_id, a, b,
                      req.ts_ms,
                      5000, 5, "block", "", f"00000000-0000-4000-8000-{n:012x}", 32000, 11000,
                      "", "", 0, 0, "", "")
        s.send(msgpack.packb({"verdict": v[0].decode(), "reason": v[1].decode(),
                              "distinct": v[2]}))


def _proxy_proc(front: str, back: str, ready: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    f.bind(front)
    b = ctx.socket(zmq.DEALER)
    b.bind(back)
    ready.set()
    zmq.proxy(f, b)


@contextlib.contextmanager
def processes(specs: list[tuple[Callable[..., None], tuple]]) -> Iterator[None]:
    """Start processes that signal readiness through their last argument; kill them after."""
    procs = []
    try:
        for target, args in specs:
            ev = CTX.Event()
            p = CTX.Process(target=target, args=(*args, ev), daemon=True)
            p.start()
            if not ev.wait(10):
                raise RuntimeError(f"{target.__name__} did not start")
            procs.append(p)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def evalsha_floor(store: str, seconds: float) -> array:
    """Time sequential EVALSHA round trips of decide.lua with the minimal RESP client."""
    from acm_module.engine.hotpath_py import encode_command
    from acm_module.store.conn import StoreConnection, load_script

    c = StoreConnection(store, timeout=2.0)
    c.connect()
    sha = c.script_load(load_script("decide"))
    rng = random.Random(1)
    lat = array("q")
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        b = f"+23480{rng.randrange(10**6):08d}"
        t = "{acm.%d}:" % (i % 16)
        cmd = encode_command("EVALSHA", sha, 8, t + "w:" + b, t + "e:" + b, t + "ea:" + b,
                             t + "wl:" + b, t + f"c:floor-{i}", t + "s", t + "n", t + "k",
                             f"floor-{i}",
                             f"+23481{rng.randrange(10**8):08d}", b, int(time.time() * 1000),
                             5000, 5, "block", "", "00000000-0000-4000-8000-000000000000",
                             32000, 11000, "", "", 0, 0, "", "")
        t0 = time.perf_counter_ns()
        (r,) = c.round_trip(cmd, 1)
        lat.append(time.perf_counter_ns() - t0)
        if not isinstance(r, list):  # an error reply would time something else than the floor
            raise RuntimeError(f"EVALSHA floor: unexpected reply {r!r}")
        i += 1
    c.close()
    return lat


def store_footprint(store: str, samples: int = 200) -> dict[str, float]:
    """Return the store's bytes per active B-number (window, episode, dedup keys), sampled."""
    from acm_module.store.conn import StoreConnection

    c = StoreConnection(store, timeout=5.0)
    c.connect()
    try:
        cursor, keys = b"0", []
        while True:
            cursor, batch = c.call("SCAN", cursor, "MATCH", "{acm.*}:w:*", "COUNT", 1000)
            keys += batch
            if cursor == b"0" or len(keys) >= samples:
                break
        total_b, n = 0, 0
        for k in keys[:samples]:
            b = k.split(b":w:", 1)[1]
            tag = k.split(b"w:", 1)[0]
            for kk in (k, tag + b"e:" + b, tag + b"ea:" + b):
                total_b += int(c.call("MEMORY", "USAGE", kk) or 0)
            n += 1
        # Dedup keys are per call, not per B: report them per call.
        cursor, ckeys = c.call("SCAN", "0", "MATCH", "{acm.*}:c:*", "COUNT", 200)
        per_call = [int(c.call("MEMORY", "USAGE", k) or 0) for k in ckeys[:100]]
        return {"bytes_per_active_b": round(total_b / n, 1) if n else 0.0,
                "bytes_per_call_dedup": round(statistics.mean(per_call), 1) if per_call else 0,
                "sampled_b_numbers": n}
    finally:
        c.close()


def worker_rss_kib(service_pid: int) -> list[int]:
    """Return the resident set size of each worker of a service."""
    out = subprocess.run(["pgrep", "-P", str(service_pid)], capture_output=True, text=True)
    rss = []
    for pid in out.stdout.split():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if not f.read().startswith("acm-worker"):
                continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]))
    return rss


# -- the run -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print/write the results."""
    ap = argparse.ArgumentParser(prog="acm bench", description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="use this store URL instead of a temporary redis-server")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open-loop rate (decisions/s) for an extra phase; 0 = skip")
    ap.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="skip the straightforward design")
    ap.add_argument("--compare-io", action="store_true",
                    help="also run the service with the other worker_io (zmtp/libzmq)")
    ap.add_argument("--curve", action="store_true",
                    help="also run the service with CurveZMQ (keys made for the run; its "
                         "workers use libzmq I/O) and its clients with the keys")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="acm-bench-")

    def ep(name: str) -> str:
        return (f"ipc://{tmp}/{name}.sock" if args.transport == "ipc"
                else f"tcp://127.0.0.1:{_free_port()}")

    def say(msg: str) -> None:
        sys.stderr.write(f"\r\033[K{msg}")
        sys.stderr.flush()

    results: dict[str, Result] = {}
    meta: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(), "transport": args.transport,
        "workers": args.workers, "clients": args.clients, "seconds": args.seconds,
        "hot_path": (os.environ.get("ACM_PUREPYTHON", "") in ("", "0") and "cython") or "python",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        with redis_server(args.store) as store:
            say("floor: ZeroMQ echo, 1 client")
            echo = ep("echo")
            with processes([(_echo_proc, (echo,))]):
                lat, err = drive(echo, 1, args.seconds, progress=say)
                results["floor_echo_1"] = Result.of("floor: zmq echo", 1, args.seconds, lat, err)
                say(f"floor: ZeroMQ echo, {args.clients} clients")
                lat, err = drive(echo, args.clients, args.seconds, progress=say)
                results["floor_echo_n"] = Result.of("floor: zmq echo", args.clients,
                                                    args.seconds, lat, err)
            say("floor: EVALSHA decide.lua, minimal client")
            lat = evalsha_floor(store, args.seconds)
            results["floor_evalsha_1"] = Result.of("floor: EVALSHA", 1, args.seconds, lat, 0)

            acm_ep = ep("acm")
            with acm_service(store, args.workers, acm_ep) as svc:
                say("acm: 1 client, sequential")
                before = _in_worker_raw(store)
                lat, err = drive(acm_ep, 1, args.seconds, progress=say)
                results["acm_1"] = Result.of("acm", 1, args.seconds, lat, err)
                meta["in_worker_1"] = _in_worker_phase(store, before)
                say(f"acm: {args.clients} clients, closed loop")
                before = _in_worker_raw(store)
                lat, err = drive(acm_ep, args.clients, args.seconds, progress=say)
                rss = worker_rss_kib(svc.pid)
                results["acm_n"] = Result.of("acm", args.clients, args.seconds, lat, err,
                                             worker_rss_kib=rss)
                meta["in_worker_n"] = _in_worker_phase(store, before)
                if args.rate:
                    say(f"acm: open loop at {args.rate:.0f}/s")
                    lat, err = drive(acm_ep, args.clients, args.seconds, rate=args.rate,
                                     progress=say)
                    results["acm_open"] = Result.of(f"acm open loop {args.rate:.0f}/s",
                                                    args.clients, args.seconds, lat, err)
                meta["in_worker"] = _in_worker_phase(store)  # every acm phase so far
            meta["store"] = store_footprint(store)
            if args.compare_io:
                # The same service with the other worker I/O, for the ratio of the two.
                other = "libzmq" if os.environ.get("ACM_WORKER_IO", "zmtp") == "zmtp" else "zmtp"
                io_ep = ep("acm-io")
                with acm_service(store, args.workers, io_ep, {"ACM_WORKER_IO": other}):
                    say(f"acm (worker_io={other}): 1 client")
                    lat, err = drive(io_ep, 1, args.seconds, progress=say)
                    results["io_1"] = Result.of(f"acm, worker_io={other}", 1, args.seconds,
                                                lat, err)
                    say(f"acm (worker_io={other}): {args.clients} clients")
                    lat, err = drive(io_ep, args.clients, args.seconds, progress=say)
                    results["io_n"] = Result.of(f"acm, worker_io={other}", args.clients,
                                                args.seconds, lat, err)
            if args.curve:
                from acm_module.server.access import generate_keypair

                public, secret = generate_keypair(Path(tmp) / "keys", "acm")
                curve = CurveKeys.load(str(public))
                cv_ep = ep("acm-curve")
                with acm_service(store, args.workers, cv_ep,
                                 {"ACM_CURVE_SERVER_KEY": str(secret)}, curve=curve):
                    for key, n in (("io_curve_1", 1), ("io_curve_n", args.clients)):
                        say(f"acm (CURVE, libzmq I/O): {n} client(s)")
                        lat, err = drive(cv_ep, n, args.seconds, progress=say, curve=curve)
                        results[key] = Result.of("acm, CURVE (libzmq I/O)", n, args.seconds,
                                                 lat, err)

            if not args.skip_baseline:
                from acm_module.store.conn import StoreConnection, load_script

                c = StoreConnection(store, timeout=2.0)
                c.connect()
                sha = c.script_load(load_script("decide"))
                c.close()
                front, back = ep("sf-front"), ep("sf-back")
                with processes([(_proxy_proc, (front, back))] + [
                        (_straightforward_worker, (back, store, sha))
                        for _ in range(args.workers)]):
                    say("straightforward: 1 client")
                    lat, err = drive(front, 1, args.seconds, progress=say)
                    results["sf_1"] = Result.of("straightforward", 1, args.seconds, lat, err)
                    say(f"straightforward: {args.clients} clients")
                    lat, err = drive(front, args.clients, args.seconds, progress=say)
                    results["sf_n"] = Result.of("straightforward", args.clients, args.seconds,
                                                lat, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        say("")
    report = render(results, meta)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "results": {k: asdict(v) for k, v in results.items()}}, indent=2))
    return 0


def _in_worker_raw(store: str) -> dict[str, Any]:
    """Return the workers' merged histograms and counters as they are now."""
    from acm_module.server import stats
    from acm_module.store.conn import StoreConnection

    c = StoreConnection(store, timeout=2.0)
    c.connect()
    try:
        time.sleep(1.1)  # workers publish once a second: let the last period land
        snaps = stats.read_all(c)
    finally:
        c.close()
    out: dict[str, Any] = {"requests": sum(s["requests"] for s in snaps),
                           "batches": sum(s["batches"] for s in snaps)}
    for name in ("service_us", "total_us", "service_cpu_us"):
        h = stats.Histogram()
        for s in snaps:
            h.merge(stats.Histogram.from_sparse(s.get(name, {})))
        out[name] = h
    return out


def _in_worker_phase(store: str, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the in-worker figures of what happened since `before` (None: since start)."""
    from acm_module.server import stats

    after = _in_worker_raw(store)
    if before is None:
        before = {"requests": 0, "batches": 0,
                  **{n: stats.Histogram() for n in ("service_us", "total_us", "service_cpu_us")}}
    out: dict[str, Any] = {k: after[k] - before[k] for k in ("requests", "batches")}
    for name in ("service_us", "total_us", "service_cpu_us"):
        h = stats.Histogram()
        h.counts = [a - b for a, b in zip(after[name].counts, before[name].counts, strict=True)]
        h.total = after[name].total - before[name].total
        out[name] = {f"p{p}": h.percentile(p) for p in (50, 99)}
    return out


def render(results: dict[str, Result], meta: dict[str, Any]) -> str:
    """Render the results as a table with ratios to the floor and the straightforward design."""
    lines = [f"acm bench — {meta['machine']}, python {meta['python']}, hot path "
             f"{meta['hot_path']}, {meta['workers']} workers, {meta['transport']}, "
             f"{meta['seconds']:.0f} s per phase, {meta['date']}", ""]
    e1, ev = results.get("floor_echo_1"), results.get("floor_evalsha_1")
    floor = None
    if e1 and ev:
        floor = (e1.p50 + ev.p50, e1.p99 + ev.p99)
        lines.append(f"floor (1 client) = zmq echo + EVALSHA: p50 {floor[0]:.0f} us, "
                     f"p99 {floor[1]:.0f} us")
    hdr = (f"{'phase':32} {'clients':>7} {'decisions/s':>12} {'p50 us':>8} {'p99 us':>8} "
           f"{'p99.9 us':>9} {'errors':>6}  ratios")
    lines += [hdr, "-" * len(hdr)]
    sf = {1: results.get("sf_1"), 0: results.get("sf_n")}
    for key, r in results.items():
        ratio = []
        if floor and r.clients == 1 and key.startswith(("acm", "sf", "io")):
            ratio.append(f"p50 {r.p50 / floor[0]:.2f}x / p99 {r.p99 / floor[1]:.2f}x floor")
        en = results.get("floor_echo_n")
        if en and r.clients > 1 and key.startswith(("acm", "sf", "io")):
            ratio.append(f"{r.rate / en.rate:.2f}x echo-pool rate")
        plain = results.get("acm_1" if r.clients == 1 else "acm_n")
        if key.startswith("io_curve") and plain and plain.rate:
            ratio.append(f"{r.rate / plain.rate:.2f}x acm (no CURVE) rate, "
                         f"p50 {r.p50 / plain.p50:.2f}x")
        base = sf[1] if r.clients == 1 else sf[0]
        if base and key.startswith(("acm", "io")) and base.rate:
            ratio.append(f"{r.rate / base.rate:.2f}x straightforward rate, "
                         f"p99 {r.p99 / base.p99:.2f}x")
        lines.append(f"{r.name:32} {r.clients:>7} {r.rate:>12,.0f} {r.p50:>8.0f} {r.p99:>8.0f} "
                     f"{r.p999:>9.0f} {r.errors:>6}  {'; '.join(ratio)}")
    iw = meta.get("in_worker")
    if iw:
        lines.append("")
        lines.append(f"in-worker service CPU per batch (receive->send, store excluded): "
                     f"p50 {iw['service_cpu_us']['p50']} us, p99 {iw['service_cpu_us']['p99']} us")
        lines.append(f"in-worker service wall time (same span, incl. preemption): "
                     f"p50 {iw['service_us']['p50']} us, p99 {iw['service_us']['p99']} us; "
                     f"in-worker total incl. store: p50 {iw['total_us']['p50']} us, "
                     f"p99 {iw['total_us']['p99']} us; "
                     f"mean batch {iw['requests'] / max(iw['batches'], 1):.1f} requests")
    for key, label in (("in_worker_1", "1 client"), ("in_worker_n", f"{meta['clients']} clients")):
        ph = meta.get(key)
        if ph and ph["batches"]:
            lines.append(f"in-worker, acm phase with {label}: service wall p50 "
                         f"{ph['service_us']['p50']:.1f} us, p99 {ph['service_us']['p99']:.1f} us;"
                         f" service CPU p50 {ph['service_cpu_us']['p50']:.1f} us, p99 "
                         f"{ph['service_cpu_us']['p99']:.1f} us; total incl. store p50 "
                         f"{ph['total_us']['p50']:.1f} us; mean batch "
                         f"{ph['requests'] / ph['batches']:.1f}")
    st = meta.get("store")
    if st:
        lines.append(f"store: {st['bytes_per_active_b']} bytes per active B-number "
                     f"(window+episode+members, {st['sampled_b_numbers']} sampled), "
                     f"{st['bytes_per_call_dedup']} bytes per call-id dedup key")
    an = results.get("acm_n")
    if an and an.extra.get("worker_rss_kib"):
        lines.append(f"worker RSS under load: {an.extra['worker_rss_kib']} KiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
