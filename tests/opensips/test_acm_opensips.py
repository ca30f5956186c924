"""Client behaviour of opensips_scripts/acm_opensips.py against a stub ZeroMQ service.

The script is loaded the way the OpenSIPS python module loads it: import the file by its base
name, call mod_init(), then child_init(rank), then the method with a msg object. The stub is a
libzmq ROUTER replying with canned frames (or not at all); every client test runs with both
transports (ZMTP spoken by the script, and a pyzmq REQ socket), so the ZMTP one is checked
against libzmq itself. The real service: test_zmtp_client.py and the e2e suite.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
import zmq

from tests.support.fake_msg import FakeMsg
from tests.support.opensips_script import load_acm_opensips

ALLOW = {"verdict": "allow", "reason": "ok", "distinct": 1}
DROP = {"verdict": "drop", "reason": "masking", "distinct": 7, "alert_id": "al-42",
        "severity": "CRITICAL"}

Handler = Callable[[dict[str, Any]], Any]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def load_script() -> ModuleType:
    """Import acm_opensips.py by base name from its directory, as python_mod.c does."""
    return load_acm_opensips("acm_opensips")


@pytest.fixture(scope="module")
def acm() -> ModuleType:
    return load_script()


class StubService:
    """A ROUTER socket in a thread answering REQ clients with whatever `handler` returns.

    handler(request) -> dict (packed), bytes (sent raw) or None (no reply, to make the
    client time out). ROUTER rather than REP so that not answering does not wedge it.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://"):
            port = self.sock.bind_to_random_port(endpoint)
            self.endpoint = f"{endpoint}:{port}"
        else:
            self.sock.bind(endpoint)
            self.endpoint = endpoint
        self.handler: Handler = lambda req: ALLOW
        self.received: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20, zmq.POLLIN):
                continue
            frames = self.sock.recv_multipart()
            ident, payload = frames[0], frames[-1]
            req = msgpack.unpackb(payload, raw=False)
            self.received.append(req)
            rep = self.handler(req)
            if rep is None:
                continue
            body = rep if isinstance(rep, bytes) else msgpack.packb(rep)
            self.sock.send_multipart([ident, b"", body])

    def wait_received(self, n: int, timeout: float = 2.0) -> None:
        """Wait until `n` requests arrived. Raises AssertionError on timeout."""
        end = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < end, f"stub got {len(self.received)} of {n} requests"
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def stub() -> Iterator[StubService]:
    s = StubService()
    try:
        yield s
    finally:
        s.close()


class Clock:
    """A monotonic clock the test moves by hand (only for the breaker's notion of time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["zmtp", "libzmq"])
def transport(request: pytest.FixtureRequest) -> str:
    """The client transport under test."""
    return str(request.param)


@pytest.fixture
def make(acm: ModuleType, transport: str) -> Iterator[Callable[..., Any]]:
    """Build Module objects around AcmClients; close every client's socket on teardown."""
    made: list[Any] = []

    def _make(endpoint: str, *, clock: Callable[[], float] = time.monotonic,
              getpid: Callable[[], int] = os.getpid, log: list[str] | None = None,
              **settings: Any) -> Any:
        settings.setdefault("transport", transport)
        cfg = acm.Config(endpoint=endpoint, **settings)
        lines = log if log is not None else []
        client = acm.AcmClient(cfg, clock=clock, getpid=getpid,
                               log=lambda key, message: lines.append(f"{key}: {message}"))
        module = acm.Module(client)
        made.append(client)
        return module

    try:
        yield _make
    finally:
        for client in made:
            client.close()


# ---------------------------------------------------------------------------------------------
# Loading like OpenSIPS
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_loads_like_opensips(acm: ModuleType, stub: StubService,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACM_ENDPOINT", stub.endpoint)
    monkeypatch.setenv("ACM_TIMEOUT_MS", "2000")
    monkeypatch.setenv("ACM_OPENSIPS_CONFIG", "")
    handler = acm.mod_init()
    try:
        assert handler.client._transport is None, "mod_init must not create sockets (pre-fork)"
        assert handler.child_init(1) == 0
        assert not handler.client._transport.connected
        msg = FakeMsg()
        rc = handler.acm_check(msg)
        assert rc == 1 and type(rc) is int
        assert msg.vars == {"acm_verdict": "allow", "acm_reason": "ok", "acm_alert_id": "",
                            "acm_severity": "", "acm_distinct": "1"}
        assert stub.received == [{"call_id": "call-1@example", "a": "2348031234567",
                                  "b": "2348097654321", "src_ip": "10.0.0.1"}]
    finally:
        handler.client.close()


@pytest.mark.timeout(10)
def test_drop_sets_alert_vars_and_sends_trunk(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: DROP
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg()
    assert m.acm_check(msg, "trunk-7") == -1
    assert msg.vars == {"acm_verdict": "drop", "acm_reason": "masking", "acm_alert_id": "al-42",
                        "acm_severity": "CRITICAL", "acm_distinct": "7"}
    assert stub.received[0]["trunk"] == "trunk-7"
    assert "ts" not in stub.received[0]


@pytest.mark.timeout(10)
def test_null_pvs_fall_back_and_unset_trunk_is_omitted(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg({"$fU": "<null>", "$fu": "sip:anonymous.invalid", "$si": "<null>"})
    assert m.acm_check(msg, "<null>") == 1
    assert stub.received == [{"call_id": "call-1@example", "a": "sip:anonymous.invalid",
                              "b": "2348097654321"}]


@pytest.mark.timeout(10)
def test_fields_are_clipped_to_service_limits(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg({"$ci": "x" * 1000, "$fU": "\u00e9" * 200, "$ci_unused": ""})
    assert m.acm_check(msg, "t" * 500) == 1
    req = stub.received[0]
    assert len(req["call_id"].encode()) == 256
    assert len(req["a"].encode()) <= 256 and req["a"] == "\u00e9" * 128
    assert len(req["trunk"].encode()) == 128


# ---------------------------------------------------------------------------------------------
# Timeouts and the fail policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_timeout_gives_fail_open_verdict(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: None
    m = make(stub.endpoint, timeout_ms=50)
    msg = FakeMsg()
    t0 = time.monotonic()
    assert m.acm_check(msg) == 2
    assert time.monotonic() - t0 < 1.0
    assert msg.vars["acm_verdict"] == "allow"
    assert msg.vars["acm_reason"] == "service_unavailable"
    assert m.client.stats.timeouts == 1


@pytest.mark.timeout(10)
def test_timeout_fail_closed_drops(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: None
    m = make(stub.endpoint, timeout_ms=50, fail_policy="closed")
    msg = FakeMsg()
    assert m.acm_check(msg) == -2
    assert msg.vars["acm_verdict"] == "drop"
    assert msg.vars["acm_reason"] == "service_unavailable"


@pytest.mark.timeout(10)
def test_no_service_at_endpoint_gives_policy_verdict(make: Any) -> None:
    d = tempfile.mkdtemp(prefix="acm", dir="/tmp")
    try:
        m = make(f"ipc://{d}/none.sock", timeout_ms=30)
        msg = FakeMsg()
        assert m.acm_check(msg) == 2
        assert msg.vars["acm_reason"] == "service_unavailable"
        assert m.client.stats.sent == 0, "IMMEDIATE: nothing queued towards a missing peer"
    finally:
        os.rmdir(d)


@pytest.mark.timeout(10)
def test_socket_rebuilt_after_timeout(make: Any, stub: StubService) -> None:
    answers = iter([None, DROP])
    stub.handler = lambda req: next(answers)
    m = make(stub.endpoint, timeout_ms=100)
    assert m.acm_check(FakeMsg({"$ci": "first"})) == 2
    first = m.client.stats.sockets_built
    assert m.client.stats.sockets_discarded == 1 and not m.client._transport.connected
    m.client.config = dataclasses.replace(m.client.config, timeout_ms=2000)
    msg = FakeMsg({"$ci": "second"})
    assert m.acm_check(msg) == -1, "a REQ socket left waiting would raise EFSM here"
    assert m.client.stats.sockets_built == first + 1
    assert msg.vars["acm_alert_id"] == "al-42"


# ---------------------------------------------------------------------------------------------
# Error replies
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_service_error_reply_counts_for_breaker(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: {"error": "store_error", "message": "NOSCRIPT"}
    log: list[str] = []
    m = make(stub.endpoint, timeout_ms=2000, breaker_failures=2, log=log)
    msg = FakeMsg()
    assert m.acm_check(msg) == 2
    assert msg.vars["acm_reason"] == "service_error"
    assert m.client.state == "closed"
    assert m.acm_check(FakeMsg()) == 2
    assert m.client.state == "open"
    assert any("store_error" in line for line in log)


@pytest.mark.timeout(10)
def test_store_unavailable_keeps_the_breaker_closed(make: Any, stub: StubService) -> None:
    # The pool answers at once while its store is down; an open breaker would keep calls
    # unchecked for its cooldown after the store is back.
    down = True
    stub.handler = lambda req: ({"error": "store_unavailable", "message": "dragonfly down"}
                                if down else {"verdict": "allow", "reason": "clean",
                                              "distinct": 1})
    log: list[str] = []
    m = make(stub.endpoint, timeout_ms=2000, breaker_failures=2, log=log)
    for _ in range(5):
        msg = FakeMsg()
        assert m.acm_check(msg) == 2
        assert msg.vars["acm_reason"] == "service_error"
        assert m.client.state == "closed"
    assert m.client.stats.breaker_opened == 0
    assert any("store_unavailable" in line for line in log)
    down = False
    msg = FakeMsg()
    assert m.acm_check(msg) == 1  # the first call after the store's return is checked
    assert msg.vars["acm_reason"] == "clean"


@pytest.mark.timeout(10)
def test_bad_request_reply_is_logged_but_keeps_breaker_closed(make: Any,
                                                              stub: StubService) -> None:
    stub.handler = lambda req: {"error": "bad_value", "message": "field 'a' too long"}
    log: list[str] = []
    m = make(stub.endpoint, timeout_ms=2000, breaker_failures=1, fail_policy="closed", log=log)
    msg = FakeMsg()
    assert m.acm_check(msg) == -2
    assert msg.vars["acm_reason"] == "service_error"
    assert m.client.state == "closed"
    assert m.client.stats.request_errors == 1
    assert any("bad_value" in line and "call-1@example" in line for line in log)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("reply", [b"\xc1garbage", msgpack.packb([1, 2]),
                                   msgpack.packb({"verdict": "maybe"})])
def test_malformed_reply_gives_policy_verdict(make: Any, stub: StubService, reply: bytes) -> None:
    stub.handler = lambda req: reply
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg()
    assert m.acm_check(msg) == 2
    assert msg.vars["acm_reason"] == "service_error"
    stub.handler = lambda req: ALLOW
    assert m.acm_check(FakeMsg()) == 1, "the socket stays usable after a bad reply"


# ---------------------------------------------------------------------------------------------
# Circuit breaker
# ---------------------------------------------------------------------------------------------


def _forbid_io(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("socket I/O while the breaker is open")

    monkeypatch.setattr(client, "_roundtrip", boom)
    monkeypatch.setattr(client._transport, "request", boom)


@pytest.mark.timeout(10)
def test_breaker_opens_after_k_failures_and_short_circuits(
        make: Any, stub: StubService, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=30, breaker_failures=3, clock=clock)
    for _ in range(3):
        assert m.acm_check(FakeMsg()) == 2
    assert m.client.state == "open"
    stub.wait_received(3)
    sent, built = m.client.stats.sent, m.client.stats.sockets_built

    with monkeypatch.context() as mp:
        _forbid_io(m.client, mp)
        clock.now += 0.999  # still inside the 1 s cool-down
        for _ in range(100):
            msg = FakeMsg()
            assert m.acm_check(msg) == 2
            assert msg.vars["acm_reason"] == "service_unavailable"
    time.sleep(0.1)
    assert len(stub.received) == 3
    assert m.client.stats.sent == sent and m.client.stats.sockets_built == built
    assert m.client.stats.short_circuits == 100


@pytest.mark.timeout(10)
def test_breaker_open_fail_closed_drops_without_io(
        make: Any, stub: StubService, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=30, breaker_failures=1, fail_policy="closed", clock=clock)
    assert m.acm_check(FakeMsg()) == -2
    _forbid_io(m.client, monkeypatch)
    msg = FakeMsg()
    assert m.acm_check(msg) == -2
    assert msg.vars["acm_verdict"] == "drop"


@pytest.mark.timeout(10)
def test_half_open_trial_recovers(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=30, breaker_failures=2, clock=clock)
    m.acm_check(FakeMsg())
    m.acm_check(FakeMsg())
    assert m.client.state == "open"
    # The second request went out on a new socket within 30 ms, or (on a loaded box, before
    # its connect completed) never: either way it was a failure for the breaker.
    stub.wait_received(1)

    stub.handler = lambda req: DROP
    m.client.config = dataclasses.replace(m.client.config, timeout_ms=2000)
    clock.now += 1.0  # cool-down over: the next call is the trial
    msg = FakeMsg({"$ci": "trial"})
    assert m.acm_check(msg) == -1
    assert m.client.state == "closed"
    assert "trial" in [r["call_id"] for r in stub.received]
    assert m.acm_check(FakeMsg()) == -1


@pytest.mark.timeout(10)
def test_failed_trial_reopens_with_doubling_cooldown(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=20, breaker_failures=1, clock=clock,
             breaker_cooldown_ms=1000, breaker_max_cooldown_ms=3000)
    m.acm_check(FakeMsg())
    assert m.client.state == "open" and m.client._open_until == clock.now + 1.0
    for expected in (2.0, 3.0, 3.0):
        clock.now = m.client._open_until
        n = len(stub.received)
        assert m.acm_check(FakeMsg()) == 2  # the trial, which times out
        stub.wait_received(n + 1)
        assert m.client.state == "open"
        assert m.client._open_until == pytest.approx(clock.now + expected)
        clock.now += expected - 0.001
        assert m.acm_check(FakeMsg()) == 2  # short-circuited
        assert len(stub.received) == n + 1


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_pid_change_builds_a_new_socket(make: Any, stub: StubService, transport: str) -> None:
    pid = [100]
    m = make(stub.endpoint, timeout_ms=2000, getpid=lambda: pid[0])
    assert m.child_init(1) == 0
    assert m.acm_check(FakeMsg()) == 1
    old = m.client._transport
    old_sock, old_ctx = old.sock, getattr(old, "ctx", None)
    try:
        pid[0] = 101  # as if OpenSIPS forked after the first use
        assert m.acm_check(FakeMsg()) == 1
        assert m.client._transport is not old and m.client._transport.sock is not old_sock
        assert m.client.stats.sockets_built == 1
        if transport == "libzmq":
            assert not old_sock.closed, "the parent's socket is not closed from the child"
    finally:
        if transport == "libzmq":
            old_sock.close(linger=0)
            old_ctx.term()


@pytest.mark.timeout(10)
def test_real_fork_child_uses_its_own_socket(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    assert m.acm_check(FakeMsg({"$ci": "parent"})) == 1  # the parent has a live socket
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            m.child_init(2)
            msg = FakeMsg({"$ci": "child"})
            rc = m.acm_check(msg)
            os.write(w, f"{rc} {msg.vars.get('acm_reason')} {m.client.stats.sockets_built}"
                     .encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        _, status = os.waitpid(child, 0)
        out = os.read(r, 100).decode()
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out == "1 ok 1"
    assert [q["call_id"] for q in stub.received] == ["parent", "child"]
    assert m.acm_check(FakeMsg({"$ci": "parent-again"})) == 1


# ---------------------------------------------------------------------------------------------
# The shim never raises and always returns an int
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("fail", [["get_pseudoVar"], ["set_pseudoVar"],
                                  ["get_pseudoVar", "set_pseudoVar", "getHeader"]])
def test_acm_check_returns_int_when_msg_raises(make: Any, stub: StubService,
                                               fail: list[str]) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    rc = m.acm_check(FakeMsg(fail=fail))
    assert type(rc) is int and rc != 0
    if "get_pseudoVar" in fail:
        assert rc == 2 and stub.received == []
    else:
        assert rc == 1


@pytest.mark.timeout(10)
def test_acm_check_returns_int_on_unexpected_errors(make: Any, stub: StubService,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    m = make(stub.endpoint, timeout_ms=2000, fail_policy="closed")

    class Weird:
        def get_pseudoVar(self, spec: str) -> object:
            return object()

        def set_pseudoVar(self, name: str, value: str) -> None:
            raise SystemError("returned a result with an exception set")

    assert m.acm_check(Weird()) == 1  # odd values are sent as str; var errors are logged
    monkeypatch.setattr(m.client, "check", lambda *a: 1 / 0)
    rc = m.acm_check(FakeMsg())
    assert rc == -2 and type(rc) is int
    monkeypatch.setattr(m.client, "policy", lambda reason: 1 / 0)
    assert m.acm_check(FakeMsg()) == 2  # last resort


@pytest.mark.timeout(10)
def test_child_init_returns_int_even_on_error(make: Any, stub: StubService,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    m = make(stub.endpoint)
    monkeypatch.setattr(m.client, "after_fork", lambda rank: 1 / 0)
    assert m.child_init(3) == 0


# ---------------------------------------------------------------------------------------------
# Settings and logging
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_config_file_then_env(acm: ModuleType, tmp_path: Path) -> None:
    conf = tmp_path / "acm.conf"
    conf.write_text("# acm\nendpoint = tcp://127.0.0.1:7000\ntimeout_ms = 80\n"
                    "fail_policy = closed\n")
    cfg = acm.Config.load(str(conf), {"ACM_TIMEOUT_MS": "25"})
    assert cfg.endpoint == "tcp://127.0.0.1:7000"
    assert cfg.timeout_ms == 25.0
    assert cfg.fail_policy == "closed"
    assert acm.Config.load("", {}) == acm.Config()
    assert {x.name: x.default for x in acm.SETTINGS} == dataclasses.asdict(acm.Config())
    with pytest.raises(acm.ConfigError):
        acm.Config.load("", {"ACM_FAIL_POLICY": "sometimes"})
    with pytest.raises(acm.ConfigError):
        acm.Config.load("", {"ACM_TIMEOUT_MS": "-1"})
    assert acm.Config.load("", {"ACM_TRANSPORT": "LibZMQ"}).transport == "libzmq"
    with pytest.raises(acm.ConfigError):
        acm.Config.load("", {"ACM_TRANSPORT": "http"})
    conf.write_text("timeout = 80\n")
    with pytest.raises(acm.ConfigError):
        acm.Config.load(str(conf), {})


@pytest.mark.timeout(10)
def test_log_is_rate_limited(acm: ModuleType) -> None:
    clock = Clock()
    lines: list[str] = []
    log = acm.RateLimitedLog(10.0, sink=lines.append, clock=clock)
    for _ in range(5):
        log("timeout", "no verdict")
    log("other", "something else")
    clock.now += 10.0
    log("timeout", "no verdict")
    assert len(lines) == 3
    assert lines[2].endswith("no verdict (4 similar suppressed)\n")


@pytest.mark.timeout(10)
def test_log_sink_failure_is_swallowed(acm: ModuleType) -> None:
    def bad_sink(line: str) -> None:
        raise ValueError("embedded null character")

    acm.RateLimitedLog(1.0, sink=bad_sink)("k", "message")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("policy, rc", [("open", 2), ("closed", -2)])
def test_the_cfg_logs_a_fail_policy_call_once_per_interval(
        make: Any, stub: StubService, policy: str, rc: int) -> None:
    """opensips.cfg logs a fail-policy call only when $var(acm_log) is "1" (see route
    acm_check): one line per interval in an outage, not one per call."""
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=30, breaker_failures=1, fail_policy=policy, clock=clock,
             log_interval_s=10.0)
    msgs = [FakeMsg() for _ in range(300)]  # a second of an outage at 300 calls/s
    assert {m.acm_check(x) for x in msgs} == {rc}
    assert [x.vars["acm_log"] for x in msgs] == ["1"] + ["0"] * 299
    assert msgs[0].vars["acm_log_held"] == "0"
    clock.now += 10.0  # the next interval: one line again, saying how many were not logged
    later = [FakeMsg() for _ in range(3)]
    for x in later:
        m.acm_check(x)
    assert [x.vars["acm_log"] for x in later] == ["1", "0", "0"]
    assert later[0].vars["acm_log_held"] == "299"
    # A verdict of the service is not a fail-policy call: the cfg logs drops as before.
    stub.handler = lambda req: DROP
    # (the trial reconnects: on a loaded machine that can take more than 30 ms)
    m.client.config = dataclasses.replace(m.client.config, timeout_ms=2000)
    clock.now += 60.0
    ok = FakeMsg()
    assert m.acm_check(ok) == -1 and "acm_log" not in ok.vars


# ---------------------------------------------------------------------------------------------
# acm_check_fields: the packed argument in, one packed $var(acm) out (what opensips.cfg calls)
# ---------------------------------------------------------------------------------------------


def _result(msg: FakeMsg) -> dict[str, str]:
    """Split $var(acm) the way opensips.cfg does ({s.select,N,|})."""
    assert set(msg.vars) == {"acm"}, "one set_pseudoVar per call"
    keys = ("verdict", "reason", "alert_id", "severity", "distinct", "log", "log_held")
    values = msg.vars["acm"].split("|")
    assert len(values) == len(keys), msg.vars["acm"]
    return dict(zip(keys, values, strict=True))


class CountingMsg(FakeMsg):
    """A FakeMsg counting the C-side calls python_exec's msg object would make."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: list[str] = []

    def get_pseudoVar(self, spec: str) -> str:
        self.calls.append(f"get {spec}")
        return super().get_pseudoVar(spec)

    def set_pseudoVar(self, name: str, value: str) -> None:
        self.calls.append(f"set {name}")
        super().set_pseudoVar(name, value)


@pytest.mark.timeout(10)
def test_fields_allow_is_one_write_and_no_read(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    msg = CountingMsg()
    rc = m.acm_check_fields(msg, msg.fields("trunk-7"))
    assert rc == 1 and type(rc) is int
    assert msg.calls == ["set $var(acm)"]
    assert msg.vars["acm"] == "allow|ok|||1||"
    assert stub.received == [{"call_id": "call-1@example", "a": "2348031234567",
                              "b": "2348097654321", "src_ip": "10.0.0.1", "trunk": "trunk-7"}]


@pytest.mark.timeout(10)
def test_fields_drop_carries_alert_and_severity(make: Any, stub: StubService) -> None:
    stub.handler = lambda req: DROP
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg()
    assert m.acm_check_fields(msg, msg.fields()) == -1
    assert _result(msg) == {"verdict": "drop", "reason": "masking", "alert_id": "al-42",
                            "severity": "CRITICAL", "distinct": "7", "log": "",
                            "log_held": ""}
    assert "trunk" not in stub.received[0]


@pytest.mark.timeout(10)
def test_fields_any_octet_of_the_message_still_gets_a_checked_call(
        make: Any, stub: StubService) -> None:
    """A '|', a NUL-free odd byte or invalid UTF-8 in a header must not turn the call into a
    policy verdict (with acm_check, a From user that is not UTF-8 made get_pseudoVar raise:
    an unchecked call for whoever sends one)."""
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg({"$ci": "a|b 00<null>@x"})
    msg.raw["$fU"] = b"23480\xff\xfe31"
    assert m.acm_check_fields(msg, msg.fields("t|1")) == 1
    assert stub.received == [{"call_id": "a|b 00<null>@x", "a": "23480\ufffd\ufffd31",
                              "b": "2348097654321", "src_ip": "10.0.0.1", "trunk": "t|1"}]


@pytest.mark.timeout(10)
def test_fields_without_user_parts_fall_back_to_the_uris(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    msg = CountingMsg({"$fU": "", "$fu": "sip:anonymous.invalid", "$rU": "<null>",
                       "$ru": "sip:gw.example"})
    assert m.acm_check_fields(msg, msg.fields()) == 1
    assert stub.received == [{"call_id": "call-1@example", "a": "sip:anonymous.invalid",
                              "b": "sip:gw.example", "src_ip": "10.0.0.1"}]
    assert msg.calls == ["get $fu", "get $ru", "set $var(acm)"]


@pytest.mark.timeout(10)
def test_fields_cut_by_the_cfg_are_sent_as_valid_utf8(make: Any, stub: StubService) -> None:
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg({"$ci": "x" * 1000, "$fU": "\u00e9" * 200})
    assert m.acm_check_fields(msg, msg.fields("t" * 500)) == 1
    req = stub.received[0]
    assert req["call_id"] == "x" * 256 and req["trunk"] == "t" * 128
    assert req["a"] == "\u00e9" * 128


@pytest.mark.timeout(10)
@pytest.mark.parametrize("fields", [None, "", "trunk-7", "zz00", "3100320033",
                                    "31003200330034003500"])
def test_fields_not_packed_by_the_cfg_get_the_policy_verdict(
        make: Any, stub: StubService, fields: str | None) -> None:
    """The old form (a plain trunk), odd hex, or a NUL inside a value (one field too many):
    nothing is sent, the policy answers, one line is logged."""
    lines: list[str] = []
    m = make(stub.endpoint, timeout_ms=2000, fail_policy="closed", log=lines)
    msg = FakeMsg()
    assert m.acm_check_fields(msg, fields) == -2
    assert _result(msg)["reason"] == "client_error"
    assert stub.received == []
    assert any("FIELDS_FORMAT" in x for x in lines), lines


@pytest.mark.timeout(10)
def test_fields_separator_in_a_service_value_cannot_shift_the_fields(
        make: Any, stub: StubService) -> None:
    stub.handler = lambda req: {**DROP, "reason": "a|b", "alert_id": "al\x00|7"}
    m = make(stub.endpoint, timeout_ms=2000)
    msg = FakeMsg()
    assert m.acm_check_fields(msg, msg.fields()) == -1
    r = _result(msg)
    assert (r["verdict"], r["reason"], r["alert_id"], r["distinct"]) == ("drop", "a_b",
                                                                          "al__7", "7")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("policy, rc", [("open", 2), ("closed", -2)])
def test_fields_policy_calls_are_logged_once_per_interval(
        make: Any, stub: StubService, policy: str, rc: int) -> None:
    """The log / log_held fields of $var(acm) are what the cfg reads as $var(acm_log) and
    $var(acm_log_held)."""
    stub.handler = lambda req: None
    clock = Clock()
    m = make(stub.endpoint, timeout_ms=30, breaker_failures=1, fail_policy=policy, clock=clock,
             log_interval_s=10.0)
    msgs = [FakeMsg() for _ in range(300)]
    assert {m.acm_check_fields(x, x.fields()) for x in msgs} == {rc}
    results = [_result(x) for x in msgs]
    assert [r["log"] for r in results] == ["1"] + ["0"] * 299
    assert results[0]["log_held"] == "0"
    assert results[0]["reason"] == "service_unavailable"
    clock.now += 10.0
    later = FakeMsg()
    m.acm_check_fields(later, later.fields())
    assert (_result(later)["log"], _result(later)["log_held"]) == ("1", "299")


@pytest.mark.timeout(10)
def test_fields_returns_int_whatever_fails(make: Any, stub: StubService,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    m = make(stub.endpoint, timeout_ms=2000, fail_policy="closed")
    msg = FakeMsg(fail=["set_pseudoVar", "get_pseudoVar"])
    assert m.acm_check_fields(msg, msg.fields()) == 1  # the write failure is only logged
    monkeypatch.setattr(m.client, "check", lambda *a: 1 / 0)
    rc = m.acm_check_fields(FakeMsg(), FakeMsg().fields())
    assert rc == -2 and type(rc) is int


@pytest.mark.timeout(10)
def test_repeated_replies_are_decoded_once_and_the_cache_stays_bounded(
        acm: ModuleType, make: Any, stub: StubService) -> None:
    """Replies repeat byte for byte (allow, clean, distinct 1..n); their verdicts and results
    are kept by body, at most _MAX_CACHED of each, never an alert's (its id is unique), and a
    cached body never answers for another one."""
    n = [0]

    def distinct(req: dict[str, Any]) -> dict[str, Any]:
        n[0] += 1
        if n[0] % 3 == 0:
            return {**DROP, "alert_id": f"al-{n[0]}"}
        return {**ALLOW, "distinct": n[0]}

    stub.handler = distinct
    m = make(stub.endpoint, timeout_ms=2000)
    for i in range(1, 601):
        msg = FakeMsg({"$ci": f"c{i}"})
        rc = m.acm_check_fields(msg, msg.fields())
        if i % 3 == 0:
            assert (rc, msg.vars["acm"]) == (-1, f"drop|masking|al-{i}|CRITICAL|7||")
        else:
            assert (rc, msg.vars["acm"]) == (1, f"allow|ok|||{i}||")
        assert len(acm._REPLIES) <= acm._MAX_CACHED and len(acm._RESULTS) <= acm._MAX_CACHED
    assert not any(v.alert_id for v in acm._REPLIES.values())
    stub.handler = lambda req: ALLOW
    first, again = FakeMsg({"$ci": "r1"}), FakeMsg({"$ci": "r2"})
    assert m.acm_check_fields(first, first.fields()) == 1
    assert msgpack.packb(ALLOW) in acm._REPLIES
    assert m.acm_check_fields(again, again.fields()) == 1
    assert again.vars == first.vars == {"acm": "allow|ok|||1||"}
