"""`acm bench`: the end-to-end load tool.

Starts a store (redis-server, unless --store is given) and the service, then drives logical
clients that behave like OpenSIPS processes (one connection each, one request in flight; a few
load processes pipeline many of them, benchmarks/zmtp_client.py, so the tool costs little
next to what it measures): closed loop (as fast as answers come) and open loop (requests
scheduled at a fixed rate, latency counted from the scheduled time so a stall is not hidden).
In the same run it measures

* the load tool's own ceiling: the same clients against a reflector that only sends each frame
  back (workers on the same shared listening socket, nothing decoded);
* the echo pool: the same workers decoding each request and encoding a reply with msgpack, no
  store (the transport's ceiling for the service);
* the floor of one call: a reflector round trip plus a bare EVALSHA of the same decide.lua;
* the straightforward design: a `zmq.proxy` in front of REP workers that call the script through
  redis-py, one request at a time;

and the server CPU per request (workers + store, from /proc) and the load processes' CPU, so a
phase whose clients were the bottleneck is reported as such instead of as a service figure.
JSON results go to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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

from acm_module.decide.client import CurveKeys

REPO = Path(__file__).resolve().parent.parent
CTX = mp.get_context("fork")


# -- measurement -------------------------------------------------------------------------------

CLIENT_BOUND_UTIL = 0.9  # load processes busy this share of the phase: they set the pace


@dataclass
class Result:
    """Latencies (microseconds), throughput and CPU of one measured phase."""

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
    unavailable: int = 0  # store_unavailable replies
    server_cpu_us: float | None = None  # per reply, workers + store (None: not measurable)
    store_cpu_us: float | None = None  # the store's part of it (None: not measured)
    client_cpu_us: float = 0.0  # per reply, the load processes
    client_util: float = 0.0  # busy share of the load processes over the phase (1 = pegged)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def client_bound(self) -> bool:
        """Say whether the load processes, not the server, set this phase's pace.

        They do when they were busy nearly all the time (a request was always waiting on them),
        or, in a closed loop sharing the CPUs with the server, when they spent more CPU per
        request than the server did (they took the larger share of the machine).
        """
        if self.client_util >= CLIENT_BOUND_UTIL:
            return True
        return (not self.extra.get("paced") and self.server_cpu_us is not None
                and self.client_cpu_us > self.server_cpu_us)

    @classmethod
    def of(cls, name: str, clients: int, seconds: float, lat_ns: array, errors: int,
           **extra: Any) -> Result:
        lat = sorted(lat_ns)
        n = len(lat)

        def pct(p: float) -> float:
            return lat[min(n - 1, int(n * p))] / 1000.0 if n else 0.0

        return cls(name, clients, seconds, n, errors, pct(0.5), pct(0.99), pct(0.999),
                   (sum(lat) / n / 1000.0) if n else 0.0, n / seconds if seconds else 0.0,
                   extra=extra)


def cpu_ns(pids: list[int]) -> int:
    """Return the CPU time (ns) the processes and all their threads have run so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total


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


def _req_client_proc(endpoint: str, seconds: float, rate: float, b_pool: int, warmup: int,
                     start: Any, out: Any, curve: CurveKeys | None = None) -> None:
    """One process per client with a pyzmq REQ socket (--client-kind req: the old load tool;
    CurveZMQ phases, which the ZMTP clients do not speak)."""
    _die_with_parent()
    ctx = zmq.Context()
    s = _req_socket(ctx, endpoint, curve)
    rng = random.Random(os.getpid())
    lat = array("q")
    errors = unavailable = timeouts = 0
    codes: dict[str, int] = {}
    cpu0 = w0 = 0.0
    try:
        for i in range(warmup):
            s.send(_request(-1 - i, rng, b_pool))
            if not s.poll(5000):
                errors += 1  # no service answering: reported as an error, nothing timed
                return
            s.recv()
        start.wait()
        cpu0, w0 = time.process_time(), time.perf_counter()
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
                timeouts += 1
                s.close(linger=0)
                s = _req_socket(ctx, endpoint, curve)
                continue
            reply = s.recv()
            lat.append(time.perf_counter_ns() - t0)
            if b"error" in reply[:8]:
                errors += 1
                code = str(msgpack.unpackb(reply).get("error"))
                codes[code] = codes.get(code, 0) + 1
                unavailable += code == "store_unavailable"
            i += 1
    finally:
        s.close(linger=0)
        ctx.term()
        out.put((lat.tobytes(), errors, unavailable, timeouts,
                 time.process_time() - cpu0 if w0 else 0.0,
                 time.perf_counter() - w0 if w0 else 0.0, codes))


def drive(endpoint: str | list[str], clients: int, seconds: float, rate: float = 0.0,
          b_pool: int = 10**6, warmup: int = 200,
          progress: Callable[[str], None] | None = None, procs: int = 1, kind: str = "zmtp",
          server_pids: list[int] | None = None, store_pids: list[int] | None = None,
          name: str = "", curve: CurveKeys | None = None,
          groups: dict[str, list[int]] | None = None) -> Result:
    """Run `clients` logical clients for `seconds` and return the phase's Result.

    kind "zmtp": `procs` load processes pipeline the clients (benchmarks/zmtp_client.py);
    kind "req": one process per client with a pyzmq REQ socket. Several endpoints (several
    `acm serve` nodes): the load processes (REQ clients) take them in turn, at least one each.
    Server CPU is measured over `server_pids` (the workers) and `store_pids` when given, and
    per reply of each process group in `groups` (in extra["cpu_us"]). With `curve` the clients
    are REQ processes with those keys (the ZMTP clients speak the NULL mechanism only).
    """
    from benchmarks import zmtp_client

    eps = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    start = CTX.Event()
    out: Any = CTX.Queue()
    if curve is not None:
        kind = "req"
    if kind == "req":
        per_rate = rate / clients if rate else 0.0
        workers = [CTX.Process(target=_req_client_proc,
                               args=(eps[i % len(eps)], seconds, per_rate, b_pool, warmup,
                                     start, out, curve))
                   for i in range(clients)]
    else:
        procs = max(1, len(eps), min(procs, clients))
        split = [clients // procs + (i < clients % procs) for i in range(procs)]
        workers = [CTX.Process(target=zmtp_client.client_proc,
                               args=(eps[i % len(eps)], n, seconds, rate * n / clients, b_pool,
                                     warmup, start, out))
                   for i, n in enumerate(split)]
    for p in workers:
        p.start()
    time.sleep(0.3 + (0.02 * clients if kind == "req" else 0.05 * len(workers)))
    pids, spids = server_pids or [], store_pids or []
    groups = groups or {}
    srv0, st0 = cpu_ns(pids), cpu_ns(spids)
    g0 = {g: cpu_ns(gp) for g, gp in groups.items()}
    start.set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if progress:
            progress(f"{name}: {time.monotonic() - t0:4.1f}/{seconds:.0f}s")
        time.sleep(min(0.5, max(0.0, seconds - (time.monotonic() - t0))))
    srv_ns, st_ns = cpu_ns(pids) - srv0, cpu_ns(spids) - st0
    g_ns = {g: cpu_ns(gp) - g0[g] for g, gp in groups.items()}
    lat = array("q")
    errors = unavailable = timeouts = 0
    codes: dict[str, int] = {}
    cpu_s = wall_s = 0.0
    failure: Exception | None = None
    for _ in workers:
        got = out.get(timeout=seconds + 60)
        if isinstance(got, Exception):
            failure = got
            continue
        raw, err, unav, tmo, c_s, w_s, cds = got
        for k, v in cds.items():
            codes[k] = codes.get(k, 0) + v
        chunk = array("q")
        chunk.frombytes(raw)
        lat.extend(chunk)
        errors += err
        unavailable += unav
        timeouts += tmo
        cpu_s += c_s
        wall_s = max(wall_s, w_s)
    for p in workers:
        p.join(10)
    if failure is not None:
        raise RuntimeError(f"{name}: a load process failed: {failure!r}") from failure
    r = Result.of(name or ",".join(eps), clients, seconds, lat, errors)
    r.unavailable = unavailable
    r.extra["timeouts"] = timeouts
    r.extra["error_codes"] = codes
    r.extra["load_processes"] = len(workers)
    if r.count:
        r.client_cpu_us = cpu_s * 1e6 / r.count
        r.server_cpu_us = (srv_ns + st_ns) / 1000.0 / r.count if pids else None
        r.store_cpu_us = st_ns / 1000.0 / r.count if spids else None
        r.extra["cpu_us"] = {g: round(ns / 1000.0 / r.count, 2) for g, ns in g_ns.items()}
    # Busy share of the CPUs the load processes could use (one each, at most the machine's).
    usable = min(len(workers), os.cpu_count() or 1)
    r.client_util = cpu_s / (wall_s * usable) if wall_s else 0.0
    r.extra["paced"] = rate
    return r


def _die_with_parent() -> None:
    """Let a load or server process end with the bench, whatever ends the bench."""
    from acm_module.core.arbiter import die_with_parent

    die_with_parent(signal.SIGKILL, os.getppid())


# -- servers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[tuple[str, int | None]]:
    """Yield (store URL, its pid): the given URL (pid None), or a temporary redis-server's."""
    if url:
        yield url, None
        return
    port = _free_port()
    d = tempfile.mkdtemp(prefix="acm-bench-redis-")
    # Its own session (and so its own scheduler autogroup): its priority can be set apart.
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", d],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", p.pid
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def acm_service(store: str, workers: int, endpoint: str, env: dict[str, str] | None = None,
                src: Path = REPO, new_session: bool = False,
                curve: CurveKeys | None = None,
                python: str = sys.executable) -> Iterator[subprocess.Popen]:
    """Run `acm serve` (from the checkout `src` with its interpreter `python`; in its own
    session) until the block ends; yield once every worker serves."""
    e = {**os.environ, "ACM_MI_HTTP": "", "ACM_MI_DATAGRAM": "", "ACM_METRICS_HTTP": "",
         "ACM_WEB_HTTP": "",
         "ACM_LOG_LEVEL": "WARNING", "ACM_STATE_DIR": tempfile.mkdtemp(prefix="acm-bench-st-"),
         **(env or {})}
    if Path(src).resolve() != REPO:
        e["PYTHONDONTWRITEBYTECODE"] = "1"  # leave another checkout as it was
    p = subprocess.Popen([python, "-m", "acm_module.cli", "serve", "--workers",
                          str(workers), "--store", store, "--endpoint", endpoint], env=e,
                         cwd=src, start_new_session=new_session)
    try:
        _wait_ready(endpoint, curve=curve)
        # One worker answering is not all of them: a worker not yet named acm-worker would be
        # missing from worker_pids(), and its CPU from the CPU per decision.
        deadline = time.monotonic() + 20.0
        while len(worker_pids(p.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
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


# The floor of any check that consults the store once per call: a script that touches nothing and
# answers in decide.lua's reply shape.
FLOOR_SCRIPT = "return {'allow', 'clean', 0, '', '', 0, {}}"


def _zmtp_pool_worker(listen_fd: int, mode: str, store: str | None, ready: Any) -> None:
    """Serve the shared listening socket as a worker does: reflect frames, or echo with msgpack.

    mode "reflect": each request frame goes back as it came (the load tool's ceiling).
    mode "echo": each request is decoded and a reply of a decision's shape encoded (the
    service's transport ceiling: everything a worker does but the decision and the store).
    mode "store": echo, and each batch is one pipelined round trip to `store` of one EVALSHA per
    request, of FLOOR_SCRIPT with decide.lua's 8 keys and 17 arguments, through the worker's
    own store client (the floor of any check that asks the store once per call).
    """
    _die_with_parent()
    from acm_module.decide.engine import hotpath
    from acm_module.decide.store.cluster import StoreClient
    from acm_module.decide.zmtp import ZmtpServer, split_envelope

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    srv = ZmtpServer(listen_fd, 1 << 16)
    sc, sha = None, ""
    if mode == "store":
        assert store is not None
        sc = StoreClient(store, timeout=2.0)
        sc.connect()
        sha = sc.script_load(FLOOR_SCRIPT)
    ready.set()
    unpackb, packb = msgpack.unpackb, msgpack.packb
    echo = mode != "reflect"
    n = 0
    while True:
        if not srv.poll(1.0):
            continue
        out = []  # (connection, envelope, request or None, body)
        for conn, frames in srv.take(256):
            env, body = split_envelope(frames)
            if body is None:
                continue
            out.append((conn, env, unpackb(body) if echo else None, body))
        if sc is not None and out:
            cmds = []
            for _, _, req, _ in out:
                b, t = str(req.get("b", "")), "{acm.%d}:" % (n % 16)
                n += 1
                cmds.append(hotpath.encode_command(
                    "EVALSHA", sha, 8, t + "w:" + b, t + "e:" + b, t + "ea:" + b, t + "wl:" + b,
                    t + "c:" + str(req.get("call_id", "")), t + "s", t + "n", t + "k",
                    str(req.get("call_id", "")), str(req.get("a", "")), b,
                    time.time_ns() // 1000000, 5000, 5, "block", "",
                    "00000000-0000-4000-8000-000000000000", 32000, 11000, "", "", 0, 0, "", ""))
            sc.round_trip(b"".join(cmds), len(cmds))
        for conn, env, req, body in out:
            if echo:
                body = packb({"verdict": "allow", "reason": "clean", "distinct": len(req)})
            srv.reply(conn, env, body)
        srv.flush()


@contextlib.contextmanager
def zmtp_pool(endpoint: str, workers: int, mode: str,
              store: str | None = None) -> Iterator[list[int]]:
    """Run `workers` reflect/echo/store-floor workers on one shared listening socket; yield
    their pids."""
    from acm_module.decide.supervisor import listen_socket

    lsock = listen_socket(endpoint)
    try:
        with processes([(_zmtp_pool_worker, (lsock.fileno(), mode, store))
                        for _ in range(workers)]) as pids:
            yield pids
    finally:
        lsock.close()


def _rep_echo_worker(backend: str, ready: Any) -> None:
    """A REP worker behind zmq.proxy that decodes and encodes with msgpack, no store."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.connect(backend)
    ready.set()
    while True:
        req = msgpack.unpackb(s.recv())
        s.send(msgpack.packb({"verdict": "allow", "reason": "clean", "distinct": len(req)}))


def _straightforward_worker(backend: str, store: str, sha: str, ready: Any) -> None:
    _die_with_parent()
    import redis  # the straightforward client, one command per request

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    r = redis.Redis.from_url(store)
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.connect(backend)
    ready.set()
    from acm_module.decide.engine.hotpath_py import decode_request, normalise, partition_of

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
def processes(specs: list[tuple[Callable[..., None], tuple]]) -> Iterator[list[int]]:
    """Start processes that signal readiness through their last argument; kill them after.

    Yields their pids.
    """
    procs = []
    try:
        for target, args in specs:
            ev = CTX.Event()
            p = CTX.Process(target=target, args=(*args, ev), daemon=True)
            p.start()
            if not ev.wait(10):
                raise RuntimeError(f"{target.__name__} did not start")
            procs.append(p)
        yield [p.pid for p in procs if p.pid is not None]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def evalsha_floor(store: str, seconds: float) -> array:
    """Time sequential EVALSHA round trips of decide.lua with the minimal RESP client."""
    from acm_module.decide.engine.hotpath_py import encode_command
    from acm_module.decide.store.cluster import StoreClient as StoreConnection
    from acm_module.decide.store.conn import load_script

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
    from acm_module.decide.store.cluster import StoreClient as StoreConnection

    c = StoreConnection(store, timeout=5.0)
    c.connect()
    try:
        # Every master's keys on a cluster (StoreClient.scan_keys).
        keys = list(itertools.islice(c.scan_keys("{acm.*}:w:*"), samples))
        total_b, n = 0, 0
        for k in keys[:samples]:
            b = k.split(b":w:", 1)[1]
            tag = k.split(b"w:", 1)[0]
            for kk in (k, tag + b"e:" + b, tag + b"ea:" + b):
                total_b += int(c.call("MEMORY", "USAGE", kk) or 0)
            n += 1
        # Dedup keys are per call, not per B: report them per call.
        ckeys = list(itertools.islice(c.scan_keys("{acm.*}:c:*", count=200), 100))
        per_call = [int(c.call("MEMORY", "USAGE", k) or 0) for k in ckeys[:100]]
        return {"bytes_per_active_b": round(total_b / n, 1) if n else 0.0,
                "bytes_per_call_dedup": round(statistics.mean(per_call), 1) if per_call else 0,
                "sampled_b_numbers": n}
    finally:
        c.close()


def _revision(checkout: Path) -> str:
    """Return a checkout's commit (with "+dirty" when its tracked files differ from it)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True)
        return r.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def worker_pids(service_pid: int) -> list[int]:
    """Return the pids of a service's decision workers."""
    out = subprocess.run(["pgrep", "-P", str(service_pid)], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("acm-worker"):
                pids.append(int(pid))
    return pids


def worker_rss_kib(service_pid: int) -> list[int]:
    """Return the resident set size of each worker of a service."""
    rss = []
    for pid in worker_pids(service_pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]))
    return rss


# -- the run -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print/write the results."""
    ap = argparse.ArgumentParser(prog="acm bench", description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="use this store URL instead of a temporary redis-server "
                    "(its CPU is then not counted in the server CPU per request)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--clients", type=int, default=16, help="logical clients (connections)")
    ap.add_argument("--load-procs", type=int, default=1,
                    help="processes the logical clients are spread over (--client-kind zmtp)")
    ap.add_argument("--client-kind", choices=("zmtp", "req"), default="zmtp",
                    help="zmtp: pipelined ZMTP clients; req: one pyzmq REQ process per client")
    ap.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    ap.add_argument("--paced", type=float, default=1000.0,
                    help="open-loop rate (requests/s) of the paced phases; 0 = skip them")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open-loop rate (decisions/s) for an extra acm phase; 0 = skip")
    ap.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="skip the straightforward design")
    ap.add_argument("--compare-io", action="store_true",
                    help="also run the service with the other worker_io (zmtp/libzmq)")
    ap.add_argument("--compare-clients", action="store_true",
                    help="also measure the other client kind's ceiling against the reflector")
    ap.add_argument("--compare-proxy-echo", action="store_true",
                    help="also measure an echo pool behind zmq.proxy (REP workers, msgpack)")
    ap.add_argument("--compare-store-floor", action="store_true",
                    help="also measure the store floor: the echo pool plus one EVALSHA per "
                         "request of a script that touches nothing (any check that asks the "
                         "store once per call costs at least this)")
    ap.add_argument("--curve", action="store_true",
                    help="also run the service with CurveZMQ (keys made for the run; its "
                         "workers use libzmq I/O) and its clients with the keys")
    ap.add_argument("--serve-from", type=Path, default=REPO,
                    help="run the service (acm phases) from this checkout, with its "
                         ".venv/bin/python unless --serve-python is given; everything else, "
                         "the load tool and its ceiling included, from this one (before/after "
                         "comparisons: benchmarks/ab_bench.py)")
    ap.add_argument("--serve-python", default="")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    serve_src = args.serve_from.resolve()
    serve_py = args.serve_python or (sys.executable if serve_src == REPO
                                     else str(serve_src / ".venv" / "bin" / "python"))

    def service(store: str, endpoint: str, env: dict[str, str] | None = None,
                curve: CurveKeys | None = None) -> contextlib.AbstractContextManager:
        return acm_service(store, args.workers, endpoint, env, src=serve_src, curve=curve,
                           python=serve_py)

    tmp = tempfile.mkdtemp(prefix="acm-bench-")

    def ep(name: str) -> str:
        return (f"ipc://{tmp}/{name}.sock" if args.transport == "ipc"
                else f"tcp://127.0.0.1:{_free_port()}")

    def say(msg: str) -> None:
        sys.stderr.write(f"\r\033[K{msg}")
        sys.stderr.flush()

    n = args.clients
    results: dict[str, Result] = {}

    def phase(key: str, name: str, endpoint: str, clients: int, rate: float = 0.0,
              pids: list[int] | None = None, spids: list[int] | None = None,
              kind: str = args.client_kind, curve: CurveKeys | None = None) -> Result:
        r = drive(endpoint, clients, args.seconds, rate=rate, progress=say,
                  procs=args.load_procs, kind=kind, server_pids=pids, store_pids=spids,
                  name=name, curve=curve)
        results[key] = r
        return r

    meta: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(), "transport": args.transport,
        "workers": args.workers, "clients": n, "seconds": args.seconds,
        "client_kind": args.client_kind, "load_procs": args.load_procs,
        "paced": args.paced,
        "hot_path": (os.environ.get("ACM_PUREPYTHON", "") in ("", "0") and "cython") or "python",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg(),
        "served_from": _revision(serve_src), "served_by": serve_py,
    }
    try:
        with redis_server(args.store) as (store, store_pid):
            store_pids = [store_pid] if store_pid else []
            meta["store_cpu_counted"] = bool(store_pids)
            refl = ep("reflect")
            with zmtp_pool(refl, args.workers, "reflect") as pids:
                phase("reflect_1", "load tool ceiling: reflector", refl,
                      1, pids=pids)
                phase("reflect_n", "load tool ceiling: reflector", refl,
                      n, pids=pids)
                if args.compare_clients:
                    other = "req" if args.client_kind == "zmtp" else "zmtp"
                    phase("reflect_n_other", f"reflector, {other} clients",
                          refl, n, pids=pids, kind=other)
            echo = ep("echo")
            with zmtp_pool(echo, args.workers, "echo") as pids:
                phase("echo_n", "echo pool (msgpack, no store)", echo, n,
                      pids=pids)
                if args.paced:
                    phase("echo_paced", f"echo pool, paced {args.paced:.0f}/s",
                          echo, n, rate=args.paced, pids=pids)
            if args.compare_store_floor:
                fl = ep("store-floor")
                with zmtp_pool(fl, args.workers, "store", store) as pids:
                    phase("storefl_1", "store floor pool", fl, 1, pids=pids,
                          spids=store_pids)
                    phase("storefl_n", "store floor pool", fl, n, pids=pids,
                          spids=store_pids)
                    if args.paced:
                        phase("storefl_paced", f"store floor pool, paced {args.paced:.0f}/s",
                              fl, n, rate=args.paced, pids=pids, spids=store_pids)
            if args.compare_proxy_echo:
                front, back = ep("pe-front"), ep("pe-back")
                with processes([(_proxy_proc, (front, back))] + [
                        (_rep_echo_worker, (back,)) for _ in range(args.workers)]) as pids:
                    phase("proxy_echo_n", "echo pool via zmq.proxy + REP", front, n,
                          pids=pids)

            acm_ep = ep("acm")
            with service(store, acm_ep) as svc:
                pids, spids = worker_pids(svc.pid), store_pids
                if args.paced:
                    # First, on a store holding no earlier phase's keys: their expiry would be
                    # charged to this phase's requests.
                    phase("acm_paced", f"acm, paced {args.paced:.0f}/s", acm_ep, n,
                          rate=args.paced, pids=pids, spids=spids)
                before = _in_worker_raw(store)
                phase("acm_1", "acm", acm_ep, 1, pids=pids, spids=spids)
                meta["in_worker_1"] = _in_worker_phase(store, before)
                before = _in_worker_raw(store)
                r = phase("acm_n", "acm", acm_ep, n, pids=pids, spids=spids)
                r.extra["worker_rss_kib"] = worker_rss_kib(svc.pid)
                meta["in_worker_n"] = _in_worker_phase(store, before)
                if args.rate:
                    phase("acm_open", f"acm open loop {args.rate:.0f}/s", acm_ep, n,
                          rate=args.rate, pids=pids, spids=spids)
                meta["in_worker"] = _in_worker_phase(store)  # every acm phase so far
            meta["store"] = store_footprint(store)
            # After the service: the keys this floor leaves expire within the next phases, and
            # their expiry would be charged to the service's requests.
            say("floor: EVALSHA decide.lua, minimal client")
            lat = evalsha_floor(store, args.seconds)
            results["floor_evalsha_1"] = Result.of("floor: EVALSHA", 1, args.seconds, lat, 0)
            if args.compare_io:
                # The same service with the other worker I/O, for the ratio of the two.
                other = "libzmq" if os.environ.get("ACM_WORKER_IO", "zmtp") == "zmtp" else "zmtp"
                io_ep = ep("acm-io")
                with service(store, io_ep, {"ACM_WORKER_IO": other}) as svc:
                    pids = worker_pids(svc.pid)
                    phase("io_1", f"acm, worker_io={other}", io_ep, 1, pids=pids,
                          spids=store_pids)
                    phase("io_n", f"acm, worker_io={other}", io_ep, n, pids=pids,
                          spids=store_pids)
            if args.curve:
                from acm_module.decide.access import generate_keypair

                public, secret = generate_keypair(Path(tmp) / "keys", "acm")
                curve = CurveKeys.load(str(public))
                cv_ep = ep("acm-curve")
                with service(store, cv_ep, {"ACM_CURVE_SERVER_KEY": str(secret)},
                             curve=curve) as svc:
                    pids = worker_pids(svc.pid)
                    for key, c in (("io_curve_1", 1), ("io_curve_n", n)):
                        phase(key, "acm, CURVE (libzmq I/O)", cv_ep, c, pids=pids,
                              spids=store_pids, curve=curve)

            if not args.skip_baseline:
                from acm_module.decide.store.cluster import StoreClient as StoreConnection
                from acm_module.decide.store.conn import load_script

                c = StoreConnection(store, timeout=2.0)
                c.connect()
                sha = c.script_load(load_script("decide"))
                c.close()
                front, back = ep("sf-front"), ep("sf-back")
                with processes([(_proxy_proc, (front, back))] + [
                        (_straightforward_worker, (back, store, sha))
                        for _ in range(args.workers)]) as pids:
                    phase("sf_1", "straightforward", front, 1, pids=pids, spids=store_pids)
                    phase("sf_n", "straightforward", front, n, pids=pids, spids=store_pids)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        say("")
    meta["loadavg_end"] = os.getloadavg()
    report = render(results, meta)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "results": {k: {**asdict(v), "client_bound": v.client_bound}
                                       for k, v in results.items()},
             "targets": targets(results)}, indent=2))
    return 0


def _in_worker_raw(store: str) -> dict[str, Any]:
    """Return the workers' merged histograms and counters as they are now."""
    from acm_module.core import stats
    from acm_module.decide.store.cluster import StoreClient as StoreConnection

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
    from acm_module.core import stats

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


def targets(results: dict[str, Result]) -> list[dict[str, Any]]:
    """Judge issue #15's targets for the pool alone; each with the phases it rests on.

    A target is `valid` only when none of its service phases was client-bound (the reflector
    is the load tool's ceiling: bound by the tool by definition).
    """
    out: list[dict[str, Any]] = []

    def add(name: str, keys: tuple[str, ...], value: Callable[[], float], limit: float,
            at_most: bool) -> None:
        rs = [results.get(k) for k in keys]
        if any(r is None or not r.count for r in rs):
            return
        v = value()
        out.append({"target": name, "value": round(v, 3), "limit": limit,
                    "met": v <= limit if at_most else v >= limit,
                    "valid": not any(r.client_bound for k, r in zip(keys, rs, strict=True)
                                     if r is not None and not k.startswith("reflect")),
                    "phases": list(keys)})

    r = results.get
    add("N clients: acm decisions/s / echo pool replies/s", ("acm_n", "echo_n"),
        lambda: r("acm_n").rate / r("echo_n").rate, 0.9, False)
    add("N clients: acm p99 (us)", ("acm_n",), lambda: r("acm_n").p99, 2000.0, True)
    for key, label in (("n", "saturation"), ("paced", "paced")):
        add(f"server CPU per decision / echo pool's per reply, {label}",
            (f"acm_{key}", f"echo_{key}"),
            lambda k=key: (r(f"acm_{k}").server_cpu_us or 0) / (r(f"echo_{k}").server_cpu_us
                                                                 or float("inf")),
            1.3, True)
    add("N clients: acm decisions/s / zmq.proxy echo pool's (the issue's first echo pool)",
        ("acm_n", "proxy_echo_n"), lambda: r("acm_n").rate / r("proxy_echo_n").rate, 0.9,
        False)
    add("server CPU per decision / zmq.proxy echo pool's per reply, saturation",
        ("acm_n", "proxy_echo_n"),
        lambda: (r("acm_n").server_cpu_us or 0) / (r("proxy_echo_n").server_cpu_us
                                                   or float("inf")), 1.3, True)
    # Not the targets: how far acm is from any check that asks the store once per call.
    for key, label in (("1", "1 client"), ("n", "N clients"), ("paced", "paced")):
        if key != "paced":
            add(f"reference, {label}: acm decisions/s / store floor pool's",
                (f"acm_{key}", f"storefl_{key}"),
                lambda k=key: r(f"acm_{k}").rate / r(f"storefl_{k}").rate, 0.0, False)
        add(f"reference, {label}: server CPU per decision / store floor pool's",
            (f"acm_{key}", f"storefl_{key}"),
            lambda k=key: (r(f"acm_{k}").server_cpu_us or 0) / (
                r(f"storefl_{k}").server_cpu_us or float("inf")), float("inf"), True)
    add("1 client: acm p50 / floor p50", ("acm_1", "reflect_1", "floor_evalsha_1"),
        lambda: r("acm_1").p50 / (r("reflect_1").p50 + r("floor_evalsha_1").p50), 1.25, True)
    add("1 client: acm p99 / floor p99", ("acm_1", "reflect_1", "floor_evalsha_1"),
        lambda: r("acm_1").p99 / (r("reflect_1").p99 + r("floor_evalsha_1").p99), 1.5, True)
    return out


def render(results: dict[str, Result], meta: dict[str, Any]) -> str:
    """Render the results: every figure with the load tool's ceiling, ratios and targets."""
    la0, la1 = meta.get("loadavg_start", (0, 0, 0)), meta.get("loadavg_end", (0, 0, 0))
    lines = [f"acm bench — {meta['machine']}, python {meta['python']}, hot path "
             f"{meta['hot_path']}, {meta['workers']} workers, {meta['transport']}, "
             f"{meta['client_kind']} clients over {meta['load_procs']} load process(es), "
             f"{meta['seconds']:.0f} s per phase, {meta['date']}, load average "
             f"{la0[0]:.2f} at start, {la1[0]:.2f} at end, service from "
             f"{meta.get('served_from', '?')}", ""]
    e1, ev = results.get("reflect_1"), results.get("floor_evalsha_1")
    floor = None
    if e1 and ev:
        floor = (e1.p50 + ev.p50, e1.p99 + ev.p99)
        lines.append(f"floor (1 client) = reflector round trip + EVALSHA: p50 {floor[0]:.0f} us, "
                     f"p99 {floor[1]:.0f} us")
    if not meta.get("store_cpu_counted", True):
        lines.append("server CPU counts the workers only (--store given: the store's pid is "
                     "not known here)")
    hdr = (f"{'phase':32} {'clients':>7} {'req/s':>8} {'p50 us':>7} {'p99 us':>7} "
           f"{'p99.9':>7} {'errors':>6} {'srv cpu':>8} {'store':>6} {'tool cpu':>8} {'tool':>5} "
           f"{'tool ceiling':>12}  ratios")
    sub = (f"{'':32} {'':>7} {'':>8} {'':>7} {'':>7} {'':>7} {'':>6} {'us/req':>8} "
           f"{'of it':>6} {'us/req':>8} {'busy':>5} {'req/s':>12}")
    lines += [hdr, sub, "-" * len(hdr)]
    echo_by = {"n": results.get("echo_n"), "paced": results.get("echo_paced")}
    sf = {1: results.get("sf_1"), 0: results.get("sf_n")}
    for key, r in results.items():
        ceiling = results.get("reflect_1" if r.clients == 1 else "reflect_n")
        ratio: list[str] = []
        service = key.startswith(("acm", "sf", "io"))
        if r.client_bound and not key.startswith("reflect"):
            ratio.append("CLIENT-BOUND: the load tool set this pace, not a service figure")
        elif service:
            if floor and r.clients == 1:
                ratio.append(f"p50 {r.p50 / floor[0]:.2f}x / p99 {r.p99 / floor[1]:.2f}x floor")
            en = echo_by["paced" if r.extra.get("paced") else "n"]
            if en and r.clients > 1 and en.rate and not r.extra.get("paced"):
                ratio.append(f"{r.rate / en.rate:.2f}x echo-pool rate")
            if en and r.clients > 1 and r.server_cpu_us and en.server_cpu_us:
                ratio.append(f"cpu {r.server_cpu_us / en.server_cpu_us:.2f}x echo pool")
            base = sf[1] if r.clients == 1 else sf[0]
            if base and key.startswith(("acm", "io")) and base.rate and \
                    not r.extra.get("paced"):
                ratio.append(f"{r.rate / base.rate:.2f}x straightforward rate, "
                             f"p99 {r.p99 / base.p99:.2f}x")
        plain = results.get("acm_1" if r.clients == 1 else "acm_n")
        if key.startswith("io_curve") and plain and plain.rate:
            # REQ clients against ZMTP ones: the server CPU ratio is the like-for-like one.
            ratio.append(f"{r.rate / plain.rate:.2f}x acm (no CURVE) rate, "
                         f"p50 {r.p50 / plain.p50:.2f}x")
            if r.server_cpu_us and plain.server_cpu_us:
                ratio.append(f"cpu {r.server_cpu_us / plain.server_cpu_us:.2f}x acm (no CURVE)")
        if ceiling and ceiling.rate and not r.extra.get("paced") and \
                not key.startswith(("reflect_1", "reflect_n", "floor")):
            ratio.append(f"{r.rate / ceiling.rate:.2f}x tool ceiling")
        srv = f"{r.server_cpu_us:8.1f}" if r.server_cpu_us is not None else f"{'-':>8}"
        srv += f" {r.store_cpu_us:6.1f}" if r.store_cpu_us is not None else f" {'-':>6}"
        ceil = f"{ceiling.rate:12,.0f}" if ceiling else f"{'-':>12}"
        lines.append(f"{r.name[:32]:32} {r.clients:>7} {r.rate:>8,.0f} {r.p50:>7.0f} "
                     f"{r.p99:>7.0f} {r.p999:>7.0f} {r.errors:>6} {srv} {r.client_cpu_us:8.1f} "
                     f"{r.client_util:5.2f} {ceil}  {'; '.join(ratio)}")
    tg = targets(results)
    if tg:
        lines += ["", "targets (issue #15, the pool alone):"]
        for t in tg:
            state = ("met" if t["met"] else "NOT met") if t["valid"] else \
                "not judged: a phase was client-bound"
            if t["target"].startswith("reference"):
                lines.append(f"  {t['target']}: {t['value']:g}"
                             + ("" if t["valid"] else f" — {state}"))
                continue
            lines.append(f"  {t['target']}: {t['value']:g} (limit {t['limit']:g}) — {state}")
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
