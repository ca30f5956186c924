"""A flood on the request endpoint: one greedy peer must not take memory or service from others.

A single-worker pool (real redis-server, real `acm serve`) is flooded for FLOOD_S seconds by two
peers that pipeline requests and never read a reply: a raw ZMTP peer writing as fast as the
socket takes bytes, and a pyzmq DEALER; a third, greedy DEALER keeps 2,000 requests in flight
and reads its replies, so the worker is busy throughout. Meanwhile a well-behaved REQ client on
the same worker asks once every 10 ms with a 500 ms budget. The worker's RSS, the client's
answers and the decisions made for nobody are measured; the figures are printed (run with -s)
and recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq

from acm_module.core import stats
from acm_module.decide.client import Client, ServiceTimeout
from acm_module.decide.store.conn import StoreConnection
from acm_module.decide.zmtp import GREETING, encode_message
from tests.support.servers import Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

FLOOD_S = 8.0
BUDGET_S = 0.5
MAX_RSS_GROWTH_MB = 150.0
MIN_ANSWERED = 0.90
# Requests decided whose replies nobody read: a never-reading peer gets its high-water marks'
# worth decided, not its whole flood.
MAX_DECIDED_FOR_NOBODY = 50_000


def _requests(tag: str, n: int = 4096) -> list[bytes]:
    return [msgpack.packb({"call_id": f"flood-{tag}-{i}", "a": f"+23480{i % 10**8:08d}",
                           "b": f"+2349{i % 10**9:09d}"}) for i in range(n)]


def _address(endpoint: str) -> tuple[int, Any]:
    if endpoint.startswith("ipc://"):
        return socket.AF_UNIX, endpoint[6:]
    host, port = endpoint[6:].rsplit(":", 1)
    return socket.AF_INET, (host, int(port))


def _raw_flooder(endpoint: str, stop: Any, sent: Any) -> None:
    """Speak ZMTP as a DEALER, pipeline requests as fast as the socket takes them, never read."""
    fam, addr = _address(endpoint)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.connect(addr)
    s.settimeout(5)
    s.sendall(GREETING)
    got = b""
    while len(got) < 64:  # libzmq wants its greeting read before the handshake goes on
        got += s.recv(64 - len(got))
    ready = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    buf = b"\x04" + bytes([len(ready)]) + ready
    chunk = b"".join(encode_message([b""], r) for r in _requests("raw"))
    per_chunk = 4096
    s.setblocking(False)
    off = 0
    n = 0
    while not stop.is_set():
        if off >= len(buf):
            if buf is chunk:
                n += per_chunk
            buf, off = chunk, 0
        _, w, _ = select.select([], [s], [], 0.1)
        if not w:
            continue  # the server stopped reading us: backpressure
        try:
            off += s.send(buf[off:off + 65536])
        except BlockingIOError:
            continue
        except OSError:
            break  # closed by the server
    sent.value = n + (off * per_chunk // len(chunk) if buf is chunk else 0)
    s.close()


def _dealer_flooder(endpoint: str, stop: Any, sent: Any) -> None:
    """Send requests through a pyzmq DEALER as fast as it takes them, never read a reply."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(endpoint)
    reqs = _requests("dealer")
    n = 0
    while not stop.is_set():
        try:
            d.send_multipart([b"", reqs[n % len(reqs)]], zmq.NOBLOCK)
            n += 1
        except zmq.Again:
            time.sleep(0.001)  # the DEALER's high-water mark: the server is not reading
    sent.value = n
    d.close(linger=0)
    ctx.term()


def _greedy_dealer(endpoint: str, stop: Any, sent: Any) -> None:
    """Keep 2,000 requests in flight through a DEALER, reading replies as fast as they come."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.SNDHWM, 0)
    d.setsockopt(zmq.RCVHWM, 0)
    d.connect(endpoint)
    reqs = _requests("greedy")
    n = answered = 0
    while not stop.is_set():
        while n - answered < 2000:
            d.send_multipart([b"", reqs[n % len(reqs)]])
            n += 1
        if d.poll(10):
            while True:
                try:
                    d.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answered += 1
    sent.value = answered
    d.close(linger=0)
    ctx.term()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for {pid}")


def _requests_decided(url: str) -> int:
    conn = StoreConnection(url, timeout=2.0)
    try:
        return sum(s["requests"] for s in stats.read_all(conn))
    finally:
        conn.close()


@pytest.mark.parametrize("worker_io", ["zmtp", "libzmq"])
def test_a_peer_that_never_reads_takes_neither_memory_nor_service(module_redis: str,
                                                                   worker_io: str) -> None:
    svc = Service(module_redis, workers=1, extra_env={"ACM_WORKER_IO": worker_io})
    mp = multiprocessing.get_context("fork")
    stop = mp.Event()
    sent = {name: mp.Value("q", 0) for name in ("raw", "dealer", "greedy")}
    procs = [mp.Process(target=_raw_flooder, args=(svc.endpoint, stop, sent["raw"]),
                        daemon=True),
             mp.Process(target=_dealer_flooder, args=(svc.endpoint, stop, sent["dealer"]),
                        daemon=True),
             # A greedy peer that does read keeps the worker busy: the REQ client still gets
             # its turn.
             mp.Process(target=_greedy_dealer, args=(svc.endpoint, stop, sent["greedy"]),
                        daemon=True)]
    client = None
    try:
        svc.start()
        (pid,) = svc.worker_pids()
        client = Client(svc.endpoint, timeout=BUDGET_S)
        for i in range(200):  # warm up: the worker's steady-state memory is the baseline
            client.decide(f"warm-{i}", f"+23480{i:08d}", "+2348030000001")
        base = _rss_mb(pid)
        peak = [base]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.1):
                with contextlib.suppress(OSError):
                    peak[0] = max(peak[0], _rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for p in procs:
            p.start()
        time.sleep(0.3)  # the flood is on before the client measures
        asked = answered = 0
        worst = 0.0
        end = time.monotonic() + FLOOD_S
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                r = client.decide(f"good-{i}", f"+23481{i:08d}", f"+2348031{i:06d}")
                dt = time.perf_counter() - t0
                answered += dt <= BUDGET_S and r.get("verdict") == "allow"
                worst = max(worst, dt)
            except ServiceTimeout:
                worst = BUDGET_S
            asked += 1
            i += 1
            time.sleep(0.01)
        stop.set()
        for p in procs:
            p.join(10)
        sampling.set()
        sampler.join(5)
        growth = peak[0] - base
        ratio = answered / asked
        # After the flood: the flooders are gone, and nothing they left behind is decided.
        time.sleep(1.5)
        decided_1 = _requests_decided(svc.store_url)
        time.sleep(1.5)
        decided_2 = _requests_decided(svc.store_url)
        t0 = time.perf_counter()
        try:
            after = client.decide("after-flood", "+2348099999999", "+2348039999999")
        except ServiceTimeout:
            after = {}
        after_ms = (time.perf_counter() - t0) * 1e3
        for_nobody = decided_2 - sent["greedy"].value - answered
        print(f"\nflood ({worker_io}, 1 worker, {FLOOD_S:g} s): raw ZMTP peer sent "
              f"{sent['raw'].value:,} requests, DEALER {sent['dealer'].value:,}, greedy DEALER got "
              f"{sent['greedy'].value:,} answers; worker RSS "
              f"{base:.1f} -> peak {peak[0]:.1f} MB (+{growth:.1f} MB); REQ client "
              f"{answered}/{asked} answered within {BUDGET_S * 1e3:.0f} ms ({ratio:.1%}), worst "
              f"{worst * 1e3:.0f} ms; decided in all {decided_2:,}, of which "
              f"{decided_2 - decided_1} in the 1.5 s after the flood and {for_nobody:,} whose "
              f"reply nobody read; next request "
              f"{after_ms:.1f} ms")
        assert sent["raw"].value + sent["dealer"].value > 5_000, "the flood did not happen"
        assert growth < MAX_RSS_GROWTH_MB, f"worker RSS grew {growth:.0f} MB under the flood"
        assert ratio >= MIN_ANSWERED, f"only {answered}/{asked} answered within the budget"
        assert after.get("verdict") == "allow", "no answer right after the flood"
        assert decided_2 - decided_1 < 100, "requests of departed peers are still being decided"
        assert for_nobody < MAX_DECIDED_FOR_NOBODY, f"{for_nobody} decided for nobody"
        assert svc.worker_pids() == [pid], "the worker died under the flood"
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(5)
        if client is not None:
            client.close()
        workers = svc.worker_pids() if svc.proc is not None else []
        svc.cleanup()
        for w in workers:  # a worker still deciding a backlog must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
