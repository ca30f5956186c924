"""The MI HTTP endpoint under connections that never finish a request (issue 12, item 9).

Slow-loris connections (a header that never ends), idle ones (nothing sent) and bursts of
connects must not cost a thread each forever, nor keep a genuine operator from being answered:
connections have a deadline for a whole request, their number is bounded (the oldest
unfinished one makes room for a new one), and the listen backlog takes a burst. Measured on
the real control process of `acm serve` (/proc: threads, RSS, descriptors).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.servers import Service, proc_usage

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

TIMEOUT_S = 2.0  # ACM_MI_HTTP_TIMEOUT for these tests (production default 10 s)
MAX_CONNS = 32  # ACM_MI_HTTP_MAX_CONNECTIONS for these tests (production default 64)


def mi_call(svc: Service, method: str = "acm_get_config", timeout: float = 5.0) -> float:
    """One MI request on a fresh connection; return its wall time. Fails without a result."""
    host, port = svc.mi_http.rsplit(":", 1)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(b"POST /mi HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert b'"result"' in data, data[:300]
    return time.monotonic() - t0


@pytest.fixture
def svc(service_factory: Any) -> Iterator[Service]:
    env = {"ACM_MI_HTTP_TIMEOUT": str(TIMEOUT_S),
           "ACM_MI_HTTP_MAX_CONNECTIONS": str(MAX_CONNS)}
    with service_factory(env=env, workers=1) as (s, _):
        deadline = time.monotonic() + 15
        while True:
            try:
                mi_call(s)
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, s.read_log()
                time.sleep(0.05)
        yield s


@contextlib.contextmanager
def opened(svc: Service, n: int, first: bytes) -> Iterator[list[socket.socket]]:
    """Open n connections (each sends `first`); all closed on the way out."""
    host, port = svc.mi_http.rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=5)
            socks.append(s)
            if first:
                s.sendall(first)
        yield socks
    finally:
        for s in socks:
            s.close()


def check_bounded(pid: int, before: dict[str, int], during: dict[str, int]) -> dict[str, int]:
    """Assert the control process stayed within its connection bound and gave everything
    back once the connections are gone; return its usage afterwards."""
    assert during["threads"] <= before["threads"] + MAX_CONNS + 2, (before, during)
    assert during["fds"] <= before["fds"] + MAX_CONNS + 2, (before, during)
    assert during["rss_kb"] - before["rss_kb"] < 20 * 1024, (before, during)
    time.sleep(0.5)
    after = proc_usage(pid)
    assert after["threads"] <= before["threads"] + 2 and after["fds"] <= before["fds"] + 2
    return after


def _closed_by_server(socks: list[socket.socket], within: float) -> int:
    """Return how many sockets the server closed (EOF or reset, or a 503) within `within`."""
    closed = 0
    deadline = time.monotonic() + within
    for s in socks:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
            closed += 1
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except TimeoutError:
            pass
    return closed


def test_slow_loris_connections_are_bounded_and_never_starve_the_mi(svc: Service) -> None:
    pid = svc.child_pid("acm-control")
    before = proc_usage(pid)
    # 200 connections, each a request header that never ends, dripped on every ~0.5 s.
    with opened(svc, 200, b"POST /mi HTTP/1.1\r\nHost: x\r\n") as socks:
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(0.5):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"X-a: b\r\n")

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            time.sleep(0.5)
            during = proc_usage(pid)
            # A genuine operator is answered, promptly, while the loris holds on.
            waits = [mi_call(svc) for _ in range(5)]
        finally:
            stop.set()
            t.join(2)
        closed = _closed_by_server(socks, TIMEOUT_S + 2.0)
    after = check_bounded(pid, before, during)
    print(f"MI slow loris: 200 connections dripping headers; control process threads "
          f"{before['threads']} -> {during['threads']} -> {after['threads']}, RSS "
          f"{before['rss_kb'] / 1024:.1f} -> {during['rss_kb'] / 1024:.1f} MB; operator "
          f"requests answered in max {max(waits) * 1e3:.0f} ms; {closed}/200 closed by the "
          f"server within its {TIMEOUT_S:.0f} s request deadline")
    assert max(waits) < 1.0, waits
    assert closed == 200


def test_idle_connections_are_bounded_and_closed(svc: Service) -> None:
    pid = svc.child_pid("acm-control")
    before = proc_usage(pid)
    with opened(svc, 600, b"") as socks:  # connect, send nothing
        time.sleep(0.3)
        during = proc_usage(pid)
        wait = mi_call(svc)
        closed = _closed_by_server(socks, TIMEOUT_S + 2.0)
    check_bounded(pid, before, during)
    print(f"MI idle connections: 600 opened; control process threads {before['threads']} -> "
          f"{during['threads']}, RSS {before['rss_kb'] / 1024:.1f} -> "
          f"{during['rss_kb'] / 1024:.1f} MB, fds {before['fds']} -> {during['fds']}; "
          f"operator answered in {wait * 1e3:.0f} ms; {closed}/600 closed by the server")
    assert wait < 1.0 and closed == 600


def test_a_burst_of_connects_is_not_dropped_by_the_backlog(svc: Service) -> None:
    host, port = svc.mi_http.rsplit(":", 1)
    times: list[float] = []
    barrier = threading.Barrier(100)
    lock = threading.Lock()

    def connect() -> None:
        barrier.wait()
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=5), lock:
            times.append(time.monotonic() - t0)

    threads = [threading.Thread(target=connect) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    slow = [x for x in times if x > 0.5]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    backlog: Any = out.stdout.split()[2] if out.stdout.split() else "?"
    print(f"MI connect burst: 100 simultaneous connects, {len(slow)} over 0.5 s (max "
          f"{max(times) * 1e3:.0f} ms); listen backlog {backlog}")
    assert len(times) == 100 and not slow, sorted(times)[-5:]
    mi_call(svc)


def test_keep_alive_replies_are_not_held_back_by_nagle(svc: Service) -> None:
    """Headers and body leave in two writes; without TCP_NODELAY the body waited for the
    client's delayed ACK: 40 ms on every MI reply over a kept-alive connection."""
    import http.client
    import statistics

    host, port = svc.mi_http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        times = []
        for i in range(30):
            t0 = time.monotonic()
            conn.request("POST", "/mi", json.dumps(
                {"jsonrpc": "2.0", "id": i, "method": "which"}).encode())
            assert b'"result"' in conn.getresponse().read()
            times.append(time.monotonic() - t0)
    finally:
        conn.close()
    median = statistics.median(times)
    print(f"MI keep-alive: 30 requests on one connection, median {median * 1e3:.1f} ms")
    assert median < 0.030, times


def test_when_every_slot_is_answering_a_new_connection_gets_503_at_once(redis_server: str
                                                                        ) -> None:
    """Slots busy answering (a black-holed store holds each command ~1 s) are not evicted;
    the connection over the limit is told so at once instead of waiting."""
    from tests.support.servers import DelayProxy, wait_port

    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    proxy = DelayProxy(port)
    svc = Service(proxy.url, workers=1, extra_env={"ACM_MI_HTTP_MAX_CONNECTIONS": "2"})
    try:
        svc.start()
        host, mport = svc.mi_http.rsplit(":", 1)
        assert wait_port(int(mport))
        mi_call(svc)
        proxy.blackhole = True
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acm_stats"}).encode()
        req = (b"POST /mi HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
        with opened(svc, 2, req):
            time.sleep(0.3)  # both are in, waiting on the store
            t0 = time.monotonic()
            with socket.create_connection((host, int(mport)), timeout=5) as s:
                s.sendall(req)
                data = s.recv(65536)
            took = time.monotonic() - t0
        assert data.startswith(b"HTTP/1.1 503 "), data[:200]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == -32006
        assert took < 0.5, took
    finally:
        svc.cleanup()
        proxy.close()
