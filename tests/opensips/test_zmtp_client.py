"""The OpenSIPS script's own ZMTP client (transport = zmtp) against a real `acm serve`.

What an OpenSIPS process depends on: a verdict over ipc:// and tcp://, the budget kept when the
service stalls (and the late reply never read as the next call's), a verdict again after the
service restarts (even on a connection kept from before), the breaker opening and closing, and
a broken peer (oversize frame, closing mid-reply) costing one policy verdict, not the process.
The broken peers are the service's own ZMTP server (acm_module/decide/zmtp.py) made to misbehave.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from acm_module.decide import zmtp
from acm_module.decide.zmtp import ZmtpServer, encode_message
from tests.opensips import test_acm_opensips as stub_tests
from tests.support.fake_msg import FakeMsg
from tests.support.servers import Service, free_port
from tests.unit.test_zmtp import EchoServer

ALLOW = msgpack.packb({"verdict": "allow", "reason": "ok", "distinct": 1})


# the stub tests' fixtures: the script loaded like OpenSIPS loads it, Modules closed on teardown
acm = stub_tests.acm
make = stub_tests.make


@pytest.fixture
def transport() -> str:
    """The transport under test here: the script's own ZMTP (`make` comes with it)."""
    return "zmtp"


def _call(m: Any, n: int) -> tuple[int, dict[str, str]]:
    msg = FakeMsg({"$ci": f"zmtp-{n}-{time.monotonic_ns()}", "$rU": f"23480{n:08d}"})
    return m.acm_check(msg), msg.vars


# ---------------------------------------------------------------------------------------------
# Against acm serve
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_verdicts_from_acm_serve(make: Any, store_url: str, kind: str) -> None:
    args = [] if kind == "ipc" else ["--endpoint", f"tcp://127.0.0.1:{free_port()}"]
    svc = Service(store_url, workers=2, args=args)
    if kind == "tcp":
        svc.endpoint = args[1]
    try:
        svc.start()
        m = make(svc.endpoint, timeout_ms=2000)
        for n in range(20):
            rc, v = _call(m, n)
            assert rc == 1 and v["acm_verdict"] == "allow" and v["acm_reason"] == "clean", v
            assert v["acm_distinct"] == "1"
        st = m.client.stats
        assert (st.replies, st.sockets_built, st.timeouts) == (20, 1, 0)
        # the service answers a repeated Call-ID with the verdict it gave (what a retry relies on)
        msg = FakeMsg({"$ci": "same", "$rU": "2348000000001"})
        assert m.acm_check(msg) == 1
        again = FakeMsg({"$ci": "same", "$rU": "2348000000001"})
        assert m.acm_check(again) == 1 and again.vars == msg.vars
    finally:
        svc.cleanup()


@pytest.mark.timeout(60)
def test_stalled_service_costs_the_budget_and_the_late_reply_is_never_read(
        make: Any, store_url: str) -> None:
    svc = Service(store_url, workers=2)
    try:
        svc.start()
        m = make(svc.endpoint, timeout_ms=150, breaker_failures=100)
        assert _call(m, 1)[0] == 1
        workers = svc.worker_pids()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            rc, v = _call(m, 2)
            took = time.monotonic() - t0
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        assert rc == 2 and v["acm_reason"] == "service_unavailable"
        assert 0.14 <= took < 0.5, took
        assert m.client.stats.timeouts == 1 and not m.client._transport.connected
        # the stalled request is answered now, on the connection the client dropped; the next
        # call gets its own verdict on a new connection
        time.sleep(0.2)
        m.client.config = type(m.client.config)(endpoint=svc.endpoint, timeout_ms=2000,
                                                transport="zmtp")
        msg = FakeMsg({"$ci": "after-stall", "$rU": "2348000000077"})
        assert m.acm_check(msg) == 1 and msg.vars["acm_reason"] == "clean"
        assert m.client.stats.sockets_built == 2
    finally:
        svc.cleanup()


@pytest.mark.timeout(90)
def test_reconnects_after_restart_even_on_a_kept_connection(make: Any, store_url: str) -> None:
    svc = Service(store_url, workers=1)
    try:
        svc.start()
        m = make(svc.endpoint, timeout_ms=2000, breaker_failures=100)
        assert _call(m, 1)[0] == 1 and m.client._transport.connected
        svc.stop()
        # service down: the policy verdict at once (no connection to wait for)
        t0 = time.monotonic()
        rc, v = _call(m, 2)
        assert rc == 2 and v["acm_reason"] == "service_unavailable"
        assert time.monotonic() - t0 < 0.5
        svc.start()
        # connection kept from before the restart? no: the failed call dropped it. Keep one
        # open across a second restart to check the retry on a closed kept connection.
        assert _call(m, 3)[0] == 1
        kept = m.client._transport.sock
        svc.stop()
        svc.start()
        rc, v = _call(m, 4)
        assert rc == 1 and v["acm_reason"] == "clean", "a restart must not cost a verdict"
        assert m.client._transport.sock is not kept
        assert m.client.stats.timeouts == 1
    finally:
        svc.cleanup()


class Clock:
    """A monotonic clock moved by hand (the breaker's notion of time only)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(90)
def test_breaker_opens_on_a_dead_service_and_closes_when_it_answers(
        make: Any, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = Service(store_url, workers=1)
    try:
        svc.start()
        clock = Clock()
        m = make(svc.endpoint, timeout_ms=2000, breaker_failures=3, clock=clock)
        assert _call(m, 1)[0] == 1
        svc.stop()
        for n in range(3):
            assert _call(m, 10 + n)[0] == 2
        assert m.client.state == "open"
        sent = m.client.stats.sent

        def boom(*a: Any) -> Any:
            raise AssertionError("I/O while the breaker is open")

        with monkeypatch.context() as mp:
            mp.setattr(m.client._transport, "request", boom)
            for n in range(50):
                assert _call(m, 20 + n)[0] == 2
        assert m.client.stats.short_circuits == 50 and m.client.stats.sent == sent
        svc.start()
        clock.now += 1.0  # cool-down over: the next call is the trial
        rc, v = _call(m, 99)
        assert rc == 1 and v["acm_reason"] == "clean" and m.client.state == "closed"
    finally:
        svc.cleanup()


# ---------------------------------------------------------------------------------------------
# Broken peers
# ---------------------------------------------------------------------------------------------


BadPeer = EchoServer


@pytest.fixture
def bad_peer() -> Iterator[Callable[..., BadPeer]]:
    """The service's own ZMTP server in a thread, answering with a given (mis)behaviour."""
    peers: list[BadPeer] = []

    def start(answer: Callable[..., None]) -> BadPeer:
        peers.append(EchoServer("tcp://127.0.0.1:0", 1 << 20, answer=answer))
        return peers[-1]

    try:
        yield start
    finally:
        for p in peers:
            p.close()


@pytest.mark.timeout(20)
def test_oversize_reply_is_refused_without_reading_it(make: Any,
                                                      bad_peer: Callable[..., BadPeer]) -> None:
    big = [True]

    def answer(srv: ZmtpServer, conn: Any, env: list[bytes], body: bytes | None) -> None:
        srv.reply(conn, env, b"\x00" * (900 * 1024) if big[0] else ALLOW)

    peer = bad_peer(answer)
    log: list[str] = []
    m = make(peer.endpoint, timeout_ms=2000, log=log)
    t0 = time.monotonic()
    rc, v = _call(m, 1)
    assert rc == 2 and v["acm_reason"] == "service_unavailable"
    assert time.monotonic() - t0 < 1.0
    assert not m.client._transport.connected
    assert any("bad reply frame" in line for line in log), log
    big[0] = False
    assert _call(m, 2)[0] == 1, "the next call gets a verdict on a new connection"
    assert m.client.stats.sockets_built == 2


@pytest.mark.timeout(20)
def test_peer_closing_mid_reply_costs_one_policy_verdict(
        make: Any, bad_peer: Callable[..., BadPeer]) -> None:
    half = [True]

    def answer(srv: ZmtpServer, conn: Any, env: list[bytes], body: bytes | None) -> None:
        wire = encode_message(env, ALLOW)
        if half[0]:
            conn.sock.send(wire[:len(wire) // 2])
            srv.close_conn(conn)
        else:
            srv.reply(conn, env, ALLOW)

    peer = bad_peer(answer)
    log: list[str] = []
    m = make(peer.endpoint, timeout_ms=2000, log=log, breaker_failures=100)
    rc, v = _call(m, 1)
    assert rc == 2 and v["acm_reason"] == "service_unavailable"
    assert peer.requests == 1, "a half-delivered reply is not retried"
    assert any("mid-reply" in line for line in log), log
    half[0] = False
    assert _call(m, 2)[0] == 1
    assert peer.requests == 2


@pytest.mark.timeout(20)
def test_peer_that_is_not_zmtp_gives_policy_verdict(make: Any) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    stop = threading.Event()

    def http_server() -> None:
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b" " * 100)
            c.close()

    t = threading.Thread(target=http_server, daemon=True)
    t.start()
    try:
        log: list[str] = []
        m = make(f"tcp://127.0.0.1:{lsock.getsockname()[1]}", timeout_ms=500, log=log)
        rc, v = _call(m, 1)
        assert rc == 2 and v["acm_reason"] == "service_unavailable"
        assert any("handshake failed" in line for line in log), log
        assert m.client.stats.sent == 0
    finally:
        stop.set()
        t.join(2)
        lsock.close()


@pytest.mark.timeout(20)
def test_ping_before_the_reply_is_answered_and_the_reply_still_read(
        make: Any, bad_peer: Callable[..., BadPeer]) -> None:
    pongs: list[bytes] = []

    def answer(srv: ZmtpServer, conn: Any, env: list[bytes], body: bytes | None) -> None:
        # a heartbeating ROUTER (ZMQ_HEARTBEAT_IVL) may PING between the request and the reply
        conn.sock.send(zmtp._command(b"PING", b"\x00\x64" + b"hb-1"))
        srv.reply(conn, env, ALLOW)

    peer = bad_peer(answer)
    orig = peer.srv._on_command

    def on_command(conn: Any, body: bytes) -> None:
        pongs.append(body)
        orig(conn, body)

    peer.srv._on_command = on_command  # type: ignore[method-assign]
    m = make(peer.endpoint, timeout_ms=2000)
    assert _call(m, 1)[0] == 1
    assert _call(m, 2)[0] == 1
    deadline = time.monotonic() + 2
    while b"\x04PONGhb-1" not in pongs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"\x04PONGhb-1" in pongs, pongs
    assert m.client.stats.sockets_built == 1
