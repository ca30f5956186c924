"""Security of a running service: socket permissions, what the logs hold, the MI control plane.

- The ipc socket file is created with restrictive permissions (0660 by default, whatever the
  caller's umask) and `ACM_IPC_MODE` sets them.
- At the default log level (INFO) a run with traffic, alerts, bad requests, a store outage and
  MI commands leaves neither the store password nor call records (A/B numbers, Call-IDs) in
  the log, the MI replies or the metrics.
- The MI endpoint answers malformed JSON-RPC, wrong types, out-of-range values and injection
  attempts with clear JSON-RPC errors and no change of the live config; values that are
  accepted come back literally.
- Exposed (non-loopback) binds need the admin token for admin commands only.

Everything is sent to 127.0.0.1; the one exposed bind (0.0.0.0) lives a few seconds and has a
32-character token.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from acm_module.control import jsonrpc
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from tests.support.servers import RedisServer, Service, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

TOKEN = "rel-admin-token-0123456789abcdef"
PASSWORD = "s3cr3t-Pa55word-in-url"


# -- helpers -------------------------------------------------------------------------------
def mi_post(svc: Service, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, Any] | None]:
    """POST to the service's /mi; return (HTTP status, decoded JSON or None)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{svc.mi_http}/mi", raw,
                                 {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        data = e.read()
        return e.code, json.loads(data) if data else None


def mi_dgram(svc: Service, body: bytes | dict[str, Any], wait: float = 5.0
             ) -> dict[str, Any] | None:
    """Send one datagram to the service's MI; return the decoded reply or None."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    host, port = svc.mi_datagram.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(raw, (host, int(port)))
        try:
            return json.loads(s.recv(65535))
        except TimeoutError:
            return None


def call(svc: Service, method: str, params: Any = None, via: str = "http",
         token: str | None = None) -> dict[str, Any]:
    """Run one MI command; return the JSON-RPC response object."""
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    if via == "http":
        headers = {"Authorization": f"Bearer {token}"} if token else None
        status, rep = mi_post(svc, req, headers)
        assert status == 200 and rep is not None, (status, rep)
        return rep
    if token:
        req["params"] = {**(params or {}), "token": token}
    rep = mi_dgram(svc, req)
    assert rep is not None, f"no datagram reply to {method}"
    return rep


def result(rep: dict[str, Any]) -> Any:
    assert "result" in rep, rep
    return rep["result"]


def wait_mi(svc: Service, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError):
            result(call(svc, "acm_get_config"))
            return
        time.sleep(0.05)
    raise RuntimeError(f"MI not ready:\n{svc.read_log()}")


def live_config(svc: Service) -> tuple[int, dict[str, Any]]:
    cfg = result(call(svc, "acm_get_config"))
    return cfg["generation"], cfg["live"]


@pytest.fixture(scope="module")
def mi_svc(module_redis: str) -> Iterator[Service]:
    """One service (1 worker, MI on loopback) for the control-plane tests of this module."""
    svc = Service(module_redis, workers=1)
    try:
        svc.start()
        wait_mi(svc)
        yield svc
    finally:
        svc.cleanup()


# -- the ipc socket file -------------------------------------------------------------------
def test_ipc_socket_is_0660_by_default_whatever_the_umask(store_url: str) -> None:
    old = os.umask(0)  # the most permissive caller: the mode must not come from it
    try:
        svc = Service(store_url, workers=1)
        svc.start()
    finally:
        os.umask(old)
    try:
        st = os.stat(svc.endpoint[len("ipc://"):])
        print(f"ipc socket mode (default): {oct(stat.S_IMODE(st.st_mode))}")
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        svc.cleanup()


@pytest.mark.parametrize("raw, mode", [("0600", 0o600), ("0770", 0o770), ("0o640", 0o640),
                                       ("600", 0o600), ("99999", None), ("1777", None)])
def test_acm_ipc_mode_is_octal_and_never_wider_than_asked(store_url: str, raw: str,
                                                         mode: int | None) -> None:
    svc = Service(store_url, workers=1, extra_env={"ACM_IPC_MODE": raw})
    try:
        if mode is None:
            svc.start(wait=False)
            assert svc.proc is not None
            assert svc.proc.wait(20) != 0 and "ipc_mode" in svc.read_log()
            return
        svc.start()
        got = stat.S_IMODE(os.stat(svc.endpoint[len("ipc://"):]).st_mode)
        assert got == mode, f"ACM_IPC_MODE={raw} gave {oct(got)}"
    finally:
        svc.cleanup()


# -- logs at the default level -------------------------------------------------------------
def test_no_password_or_call_records_in_logs_at_default_level(zctx) -> None:  # type: ignore[no-untyped-def]
    srv = RedisServer(password=PASSWORD).start()
    svc = Service(srv.url, workers=2, extra_env={"ACM_LOG_LEVEL": "INFO"})
    b_num = "+2348059876543"
    a_nums = [f"+23480312345{i:02d}" for i in range(8)]
    call_ids = [f"CALLID-{i}-7f3a9c@carrier.example" for i in range(8)]
    try:
        svc.start()
        wait_mi(svc)
        c = Client(svc.endpoint, timeout=3.0, context=zctx)
        try:
            # A masking episode with an alert, in several number formats.
            forms = [a_nums[0], "0803123450" + "1", f"sip:{a_nums[2]}@192.0.2.7;user=phone",
                     *a_nums[3:7]]
            replies = [c.decide(call_ids[i], forms[i], b_num if i % 2 else "08059876543",
                                ts=1000.0 + i) for i in range(7)]
            assert [r["verdict"] for r in replies].count("drop") == 3, replies
            # Bad requests carrying the numbers.
            c.request_raw(b"\x83\xa7call_id" + msgpack.packb(call_ids[7])[:-3])
            c.request({"call_id": call_ids[7], "a": a_nums[7], "b": b_num, b_num: 1})
            c.request({"call_id": call_ids[7], "a": a_nums[7] * 30, "b": b_num})
            c.request({"call_id": call_ids[7], "a": 123, "b": b_num})
            c.request_raw([b"one", msgpack.packb({"call_id": call_ids[7]})])
            # A store outage under traffic, then recovery.
            srv.stop()
            for i in range(10):
                r = c.decide(f"{call_ids[7]}-down{i}", a_nums[7], b_num, ts=1010.0)
                assert r["error"] == "store_unavailable"
            srv.start()
            deadline = time.monotonic() + 5
            while "verdict" not in c.decide(f"{call_ids[7]}-up{time.monotonic_ns()}",
                                            a_nums[7], b_num, ts=1011.0):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            c.close()
        # MI traffic: a config change, a whitelist entry, reads.
        assert result(call(svc, "acm_set", {"threshold": 6}))["generation"]
        assert result(call(svc, "acm_whitelist_add", {"number": "+2348051112223",
                                                      "reason": "test"}))
        cfg = result(call(svc, "acm_get_config"))
        st = result(call(svc, "acm_stats"))
        with urllib.request.urlopen(f"http://{svc.metrics_http}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        time.sleep(1.2)  # let every process flush what it logs about the above
        log = svc.read_log()
        levels = {w for line in log.splitlines() for w in line.split()[2:3]}
        print(f"log: {len(log.splitlines())} lines at levels {sorted(levels)}; store shown as "
              f"{[ln.split('store ', 1)[1] for ln in log.splitlines() if 'acm serving' in ln]}")
        assert "INFO" in levels and "DEBUG" not in levels
        assert "store failure" in log  # the outage was logged ...
        assert PASSWORD not in log  # ... without the password
        assert ":***@" in log
        for where, text in (("acm_get_config", json.dumps(cfg)), ("acm_stats", json.dumps(st)),
                            ("metrics", metrics)):
            assert PASSWORD not in text, f"store password in {where}"
        for cid in call_ids:
            assert cid.split("@")[0] not in log, f"Call-ID {cid} in the log"
        for n in [b_num, *a_nums]:
            core = n[-10:]  # the national significant number, in any format
            assert core not in log, f"number {n} in the log"
        # Outside the log: the password is in the supervisor's argv (--store), readable by
        # anyone through /proc/<pid>/cmdline; DRAGONFLY_URL in the environment is not.
        assert svc.proc is not None
        with open(f"/proc/{svc.proc.pid}/cmdline", "rb") as f:
            in_argv = PASSWORD.encode() in f.read()
        print(f"store password visible in /proc/<pid>/cmdline when given by --store: {in_argv}")
    finally:
        svc.cleanup()
        srv.cleanup()



def _secret_env() -> dict[str, str]:
    """A distinctive value for every secret-looking setting, and credentials in every URL."""
    from acm_module.core import settings as settings_mod

    env = {}
    for st in settings_mod.SETTINGS:
        if not st.env or st.name == "store":
            continue
        if re.search(r"secret|token|password", st.name):
            env[st.env[0]] = f"{st.name}-SECRETVALUE-0123456789"
        elif st.name.endswith("_url"):
            env[st.env[0]] = f"http://user:{st.name}-URLPASS@127.0.0.1:9/x"
    return env


def test_get_config_shows_no_secret_setting(store_url: str) -> None:
    env = _secret_env()
    svc = Service(store_url, workers=1, extra_env={**env, "ACM_LOG_LEVEL": "INFO"})
    try:
        svc.start()
        wait_mi(svc)
        text = json.dumps(result(call(svc, "acm_get_config")))
        leaked = sorted(k for k, v in env.items()
                        if v.split("@")[0].rsplit(":", 1)[-1] in text)
        assert leaked == [], f"acm_get_config shows {leaked}"
        log = svc.read_log()
        assert not [k for k, v in env.items() if v.split("@")[0].rsplit(":", 1)[-1] in log]
    finally:
        svc.cleanup()

# -- the MI control plane: malformed requests ----------------------------------------------
MALFORMED: list[tuple[bytes, int]] = [
    (b"", jsonrpc.PARSE_ERROR),
    (b"{", jsonrpc.PARSE_ERROR),
    (b"\xff\xfe\x00{", jsonrpc.PARSE_ERROR),
    (b"{'jsonrpc': '2.0'}", jsonrpc.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","method":"acm_set","params":{"threshold":7}', jsonrpc.PARSE_ERROR),
    (b"[]", jsonrpc.INVALID_REQUEST),
    (b'[{"jsonrpc":"2.0","id":1,"method":"acm_set","params":{"threshold":7}}]',
     jsonrpc.INVALID_REQUEST),
    (b"null", jsonrpc.INVALID_REQUEST),
    (b"42", jsonrpc.INVALID_REQUEST),
    (b'"acm_set"', jsonrpc.INVALID_REQUEST),
    (b'{"id":1,"method":"acm_set","params":{"threshold":7}}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","id":1,"method":"acm_set","params":{"threshold":7}}',
     jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":2.0,"id":1,"method":"acm_set","params":{"threshold":7}}',
     jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":7}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":["acm_set"]}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"acm_set","params":"threshold=7"}',
     jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"acm_set","params":7}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":[1],"method":"acm_set","params":{"threshold":7}}',
     jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"which"}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":true,"method":"which"}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"acm_set\'; DROP TABLE whitelist; --"}',
     jsonrpc.METHOD_NOT_FOUND),
    (b'{"jsonrpc":"2.0","id":1,"method":"__init__"}', jsonrpc.METHOD_NOT_FOUND),
    (b'{"jsonrpc":"2.0","id":1,"method":"acm_set\\u0000"}', jsonrpc.METHOD_NOT_FOUND),
    (b'{"jsonrpc":"2.0","id":1,"method":"publish","params":{"changes":{"threshold":2}}}',
     jsonrpc.METHOD_NOT_FOUND),
]


def test_malformed_json_rpc_gets_clear_errors_and_changes_nothing(mi_svc: Service) -> None:
    gen, live = live_config(mi_svc)
    seen = 0
    for body, code in MALFORMED:
        for via in ("http", "datagram"):
            if via == "http":
                status, rep = mi_post(mi_svc, body)
                assert status == 200, (body, status, rep)
            else:
                if not body:
                    continue  # an empty datagram is not a request
                rep = mi_dgram(mi_svc, body)
            assert rep is not None and rep.get("jsonrpc") == "2.0", (via, body, rep)
            assert rep["error"]["code"] == code, (via, body, rep)
            assert isinstance(rep["error"]["message"], str) and rep["error"]["message"]
            seen += 1
    # Not JSON-RPC at the HTTP level: clear HTTP errors.
    host, port = mi_svc.mi_http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /mi HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\n{}\r\n0\r\n\r\n")
        assert s.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 411 Length Required"
    for length in (b"-1", b"abc", b"99999999"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /mi HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                      + b"\r\n\r\n{}")
            status = s.recv(4096).split(b"\r\n", 1)[0]
            assert status in (b"HTTP/1.1 411 Length Required",
                              b"HTTP/1.1 413 Request Entity Too Large"), (length, status)
    req = urllib.request.Request(f"http://{mi_svc.mi_http}/other", b"{}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{mi_svc.mi_http}/mi", timeout=5)
    assert e.value.code == 405
    assert live_config(mi_svc) == (gen, live)
    print(f"MI: {seen} malformed requests over HTTP and datagrams, each a JSON-RPC error; "
          f"config generation {gen} unchanged")


def test_deeply_nested_json_gets_a_parse_error(mi_svc: Service) -> None:
    gen, live = live_config(mi_svc)
    body = b"[" * 40_000  # under the 64 KiB request limit
    try:
        status, rep = mi_post(mi_svc, body)
    except OSError as e:  # the connection closed without a response
        pytest.fail(f"HTTP: no response to nested JSON ({e})")
    assert status == 200 and rep is not None and rep["error"]["code"] == jsonrpc.PARSE_ERROR
    rep = mi_dgram(mi_svc, body, wait=2.0)
    assert rep is not None and rep["error"]["code"] == jsonrpc.PARSE_ERROR
    assert live_config(mi_svc) == (gen, live)


# -- wrong types and out-of-range values -----------------------------------------------------
BAD_SETTINGS: list[dict[str, Any]] = [
    {"threshold": "abc"}, {"threshold": [7]}, {"threshold": {"v": 7}}, {"threshold": True},
    {"threshold": 7.5}, {"threshold": 0}, {"threshold": 1},
    {"threshold": -5}, {"threshold": 10**30}, {"threshold": 1e400}, {"threshold": "7; DEL x"},
    {"window": -1}, {"window": 0}, {"window": "nan"}, {"window": "inf"}, {"window": 1e9},
    {"window": "5s"}, {"window": 40, "dedup_ttl": 10}, {"dedup_ttl": 0.5},
    {"mode": "drop"}, {"mode": ""}, {"mode": 1}, {"mode": "block\r\nDEL {acm.cfg}:detect"},
    {"block_ttl": -1}, {"block_ttl": 10**12}, {"log_level": "TRACE"},
    {"log_level": "INFO'; --"}, {"store_timeout_ms": 0},
    {"no_such_setting": 1}, {"threshold; DROP TABLE whitelist": 7}, {"": 7},
    {"store": "redis://evil:6379/0"}, {"endpoint": "tcp://0.0.0.0:1"}, {"workers": 64},
    {"mi_token": "x" * 20},
]


def test_wrong_types_and_out_of_range_values_are_refused_and_change_nothing(
        mi_svc: Service) -> None:
    gen, live = live_config(mi_svc)
    for i, params in enumerate(BAD_SETTINGS):
        via = "http" if i % 2 else "datagram"
        rep = call(mi_svc, "acm_set", params, via=via)
        assert "error" in rep, (params, rep)
        assert rep["error"]["code"] in (jsonrpc.INVALID_PARAMS, jsonrpc.CONFIG_INVALID), (
            params, rep)
        assert rep["error"]["message"], rep
    # Wrong parameter types and values for the other commands.
    bad_calls: list[tuple[str, Any]] = [
        ("acm_whitelist_add", {"number": "+2348051230000"}),  # no reason
        ("acm_whitelist_add", {"number": ["+2348051230000"], "reason": "x"}),
        ("acm_whitelist_add", {"number": True, "reason": "x"}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": ""}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "   "}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": {"a": 1}}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x", "ttl": -5}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x", "ttl": "soon"}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x", "ttl": 1.5}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x",
                               "expires_at": "2001-01-01T00:00:00"}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x",
                               "expires_at": "tomorrow"}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x", "ttl": 60,
                               "expires_at": 4102444800}),
        ("acm_whitelist_add", {"number": "+2348051230000", "reason": "x", "extra": 1}),
        ("acm_whitelist_add", ["+2348051230000", "x", "me", None, 60, "one too many"]),
        ("acm_whitelist_list", {"limit": 0}), ("acm_whitelist_list", {"limit": 10**6}),
        ("acm_whitelist_list", {"limit": "all"}), ("acm_alert_list", {"severity": "HUGE"}),
        ("acm_alert_list", {"since": "yesterday"}), ("acm_unblock", {}),
        ("acm_unblock", {"number": "anonymous"}), ("acm_log_level", {"level": "LOUD"}),
        ("acm_reload", {"reset": "maybe"}),
    ]
    for i, (method, params) in enumerate(bad_calls):
        rep = call(mi_svc, method, params, via="http" if i % 2 else "datagram")
        assert "error" in rep and rep["error"]["code"] == jsonrpc.INVALID_PARAMS, (
            method, params, rep)
    wl = result(call(mi_svc, "acm_whitelist_list", {"number": "+2348051230000"}))
    assert wl["count"] == 0
    assert live_config(mi_svc) == (gen, live)
    print(f"MI: {len(BAD_SETTINGS)} bad acm_set values and {len(bad_calls)} bad command "
          f"params refused with -32602/-32002; generation {gen} unchanged")



@pytest.mark.parametrize("params", [{"threshold": None}, {"mode": None}, {"window": None}])
def test_null_setting_values_are_refused(store_url: str, params: dict[str, Any]) -> None:
    svc = Service(store_url, workers=1)  # its own service: the bug poisons the live config
    try:
        svc.start()
        wait_mi(svc)
        gen, live = live_config(svc)
        rep = call(svc, "acm_set", params)
        assert rep.get("error", {}).get("code") == jsonrpc.INVALID_PARAMS, rep
        assert live_config(svc) == (gen, live)
    finally:
        svc.cleanup()

# -- injection attempts ----------------------------------------------------------------------
INJECTIONS = [
    "'; DROP TABLE whitelist; --",
    "Robert'); DELETE FROM audit_log WHERE ('1'='1",
    "1 OR 1=1; UPDATE whitelist SET reason='x' --",
    "redis.call('FLUSHALL')",
    "]] .. redis.call('DEL', KEYS[1]) .. [[",
    "\"); os.execute('id'); --",
    "x\r\n*1\r\n$8\r\nFLUSHALL\r\n",
    "x\r\n*3\r\n$3\r\nDEL\r\n$20\r\n{acm.ctl}:whitelist\r\n",
    "nul\x00byte\x00after",
    "${jndi:ldap://127.0.0.1/x} {{7*7}} $(id) `id` %s%s%n <script>alert(1)</script>",
    "ünïcødé ☎ 📞 \u202e reversed",
    "\\x00\\r\\n literal backslashes",
]


def test_injection_attempts_are_stored_literally_and_touch_nothing_else(
        mi_svc: Service, zctx) -> None:  # type: ignore[no-untyped-def]
    conn = StoreConnection(mi_svc.store_url, timeout=2.0)
    try:
        conn.call("SET", "rel:canary", "alive")
        keys_before = conn.call("DBSIZE")
        gen, live = live_config(mi_svc)
        numbers = [f"+23480512{i:05d}" for i in range(len(INJECTIONS))]
        for i, (number, text) in enumerate(zip(numbers, INJECTIONS, strict=True)):
            via = "http" if i % 2 else "datagram"
            rep = call(mi_svc, "acm_whitelist_add",
                       {"number": number, "reason": text, "created_by": text,
                        "actor": text}, via=via)
            entry = result(rep)
            assert entry["reason"] == text.strip() and entry["created_by"] == text, entry
        listed = {e["b_number"]: e for e in result(call(mi_svc, "acm_whitelist_list",
                                                        {"limit": 1000}))["entries"]}
        for number, text in zip(numbers, INJECTIONS, strict=True):
            assert listed[number]["reason"] == text.strip()
            assert listed[number]["created_by"] == text
        # The injected text did nothing to the store: the canary and the other keys are there.
        assert conn.call("GET", "rel:canary") == b"alive"
        assert conn.call("DBSIZE") >= keys_before
        assert live_config(mi_svc) == (gen, live)
        # The markers work: every one of these B-numbers is whitelisted for the workers.
        with Client(mi_svc.endpoint, timeout=3.0, context=zctx) as c:
            for i, number in enumerate(numbers):
                r = c.decide(f"inj-{i}-{time.monotonic_ns()}", "+2348030000001", number)
                assert r["reason"] == "whitelisted", r
        # The audit trail has the actor sanitised, never the raw text.
        recs = result(call(mi_svc, "acm_audit_list", {"action": "acm_whitelist_add",
                                                      "limit": 100}))["records"]
        actors = {r.get("actor") for r in recs}
        assert actors and not any("\r" in a or "\x00" in a or " " in a for a in actors), actors
        # Injection in names: refused as not a number / unknown, nothing written.
        for i, text in enumerate(INJECTIONS):
            via = "http" if i % 2 else "datagram"
            rep = call(mi_svc, "acm_whitelist_add", {"number": text, "reason": "x"}, via=via)
            assert rep["error"]["code"] == jsonrpc.INVALID_PARAMS, rep
            rep = call(mi_svc, "acm_unblock", {"number": text}, via=via)
            assert rep["error"]["code"] == jsonrpc.INVALID_PARAMS, rep
            rep = call(mi_svc, "acm_set", {text: 7}, via=via)
            assert rep["error"]["code"] == jsonrpc.INVALID_PARAMS, rep
            rep = call(mi_svc, "acm_audit_list", {"target": text, "action": text}, via=via)
            assert result(rep)["count"] == 0
        assert live_config(mi_svc) == (gen, live)
        for number in numbers:
            result(call(mi_svc, "acm_whitelist_remove", {"number": number}))
        print(f"MI: {len(INJECTIONS)} injection strings stored and listed back literally "
              f"(HTTP and datagrams), canary intact, {4 * len(INJECTIONS)} injections in names "
              f"refused")
    finally:
        conn.close()


def test_100kb_strings_are_refused_with_clear_errors(mi_svc: Service) -> None:
    gen, live = live_config(mi_svc)
    big = "A" * 100_000
    for params in ({"number": "+2348051239999", "reason": big},
                   {"number": big, "reason": "x"}, {"mode": big}):
        method = "acm_set" if "mode" in params else "acm_whitelist_add"
        status, rep = mi_post(mi_svc, {"jsonrpc": "2.0", "id": 1, "method": method,
                                       "params": params})
        assert status == 413 and rep is not None
        assert rep["error"]["code"] == jsonrpc.INVALID_REQUEST
        assert "larger than" in rep["error"]["message"]
    # Under the request limit but over the field limits: -32602 naming the field.
    for via in ("http", "datagram"):
        for params in ({"number": "+2348051239999", "reason": "B" * 30_000},
                       {"number": "+2348051239999", "reason": "x", "created_by": "C" * 30_000},
                       {"number": "9" * 30_000, "reason": "x"}):
            rep = call(mi_svc, "acm_whitelist_add", params, via=via)
            assert rep["error"]["code"] == jsonrpc.INVALID_PARAMS, rep
            echo = len(rep["error"]["message"])
            if params["reason"] == "x" and "created_by" not in params:
                # Finding (reported): a bad number is echoed whole in the error message.
                print(f"MI: error message for a 30 KB number is {echo} bytes ({via})")
            else:
                assert echo < 1000  # the error does not echo 30 KB
    # The largest datagram UDP carries (65,507 bytes fit the 64 KiB request limit): an error
    # (today the value is echoed, so the reply itself is too large for a datagram).
    rep = mi_dgram(mi_svc, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acm_set",
                                       "params": {"mode": "D" * 65_400}}).encode())
    assert rep is not None
    assert rep["error"]["code"] in (jsonrpc.INVALID_PARAMS, jsonrpc.REPLY_TOO_LARGE), rep
    assert result(call(mi_svc, "acm_whitelist_list",
                       {"number": "+2348051239999"}))["count"] == 0
    assert live_config(mi_svc) == (gen, live)


# -- token auth on exposed binds; read-only vs admin ---------------------------------------
READ_ONLY = {"acm_get_config", "acm_stats", "acm_whitelist_list", "acm_block_list",
             "acm_alert_list", "acm_audit_list", "which"}
MINIMAL: dict[str, dict[str, Any]] = {
    "acm_set": {"threshold": 6},
    "acm_reload": {},
    "E_ACM_RELOAD": {"threshold": 6},
    "acm_log_level": {"level": "INFO"},
    "acm_whitelist_add": {"number": "+2348051230001", "reason": "auth test"},
    "acm_whitelist_remove": {"number": "+2348051230001"},
    "acm_unblock": {"number": "+2348051230001"},
}


def test_exposed_bind_admin_commands_need_the_token_read_only_ones_do_not(
        store_url: str) -> None:
    http_port, dgram_port = free_port(), free_port()
    svc = Service(store_url, workers=1, extra_env={
        "ACM_MI_HTTP": f"0.0.0.0:{http_port}", "ACM_MI_DATAGRAM": f"0.0.0.0:{dgram_port}",
        "ACM_MI_TOKEN": TOKEN})
    svc.mi_http, svc.mi_datagram = f"127.0.0.1:{http_port}", f"127.0.0.1:{dgram_port}"
    try:
        svc.start()
        wait_mi(svc)
        commands = result(call(svc, "which"))
        admin = {name for name, c in commands.items() if c["admin"]}
        read_only = set(commands) - admin
        # Every command that changes state is admin; what is open only reads (auth.py:
        # "listing, stats, config"); commands added later must follow the naming.
        assert set(MINIMAL) <= admin and read_only >= READ_ONLY, sorted(read_only)
        assert all(re.search(r"_(list|show|get_config|stats)$|^which$", n)
                   for n in read_only), sorted(read_only)
        gen, live = live_config(svc)
        for name in sorted(commands):
            params = MINIMAL.get(name, {})
            rep = call(svc, name, params)
            if name in admin:
                assert rep.get("error", {}).get("code") == jsonrpc.UNAUTHORIZED, (name, rep)
            else:  # runs (or needs a parameter), never asks for the token
                assert "result" in rep or rep["error"]["code"] != jsonrpc.UNAUTHORIZED, (
                    name, rep)
            # Over an exposed datagram bind every command needs the token: "unauthorized"
            # (no larger than the request), or no reply at all.
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": name,
                               "params": params}).encode()
            rep = mi_dgram(svc, body, wait=0.5)
            assert rep is None or rep["error"]["code"] == jsonrpc.UNAUTHORIZED, (name, rep)
            # A wrong token is refused even for a read-only command.
            for via in ("http", "datagram"):
                rep = call(svc, name, params, via=via, token="wrong-token-0123456789abcdef")
                assert rep.get("error", {}).get("code") == jsonrpc.UNAUTHORIZED, (name, rep)
        assert live_config(svc) == (gen, live)
        wl = result(call(svc, "acm_whitelist_list", {"number": "+2348051230001"}))
        assert wl["count"] == 0
        # With the token every admin command runs (over both transports).
        assert result(call(svc, "acm_set", MINIMAL["acm_set"], token=TOKEN))["generation"] > gen
        assert result(call(svc, "acm_whitelist_add", MINIMAL["acm_whitelist_add"],
                           via="datagram", token=TOKEN))["b_number"] == "+2348051230001"
        assert result(call(svc, "acm_whitelist_remove", MINIMAL["acm_whitelist_remove"],
                           token=TOKEN))["removed"] == "+2348051230001"
        log = svc.read_log()
        assert TOKEN not in log and "wrong-token" not in log
        print(f"MI exposed bind: {len(admin)} admin commands refused without/with a wrong "
              f"token over HTTP and datagrams, {len(read_only)} read-only commands open "
              f"over HTTP only")
    finally:
        svc.cleanup()


def test_exposed_datagram_bind_never_answers_more_than_it_was_sent(store_url: str) -> None:
    """UDP sources can be forged: without the token, no command on an exposed datagram bind
    answers with more bytes than the request had (issue 12 item 3: `which` answered 60 B
    with 3,860 B, `acm_get_config` 69 B with 3,218 B)."""
    dgram_port = free_port()
    svc = Service(store_url, workers=1, extra_env={
        "ACM_MI_DATAGRAM": f"0.0.0.0:{dgram_port}", "ACM_MI_TOKEN": TOKEN})
    svc.mi_datagram = f"127.0.0.1:{dgram_port}"
    try:
        svc.start()
        wait_mi(svc)  # over HTTP on loopback
        commands = sorted(result(call(svc, "which")))
        ratios, answered = [], 0
        for name in commands:
            for params in ({}, MINIMAL.get(name, {}), {"token": "x" * 40}, {"token": None},
                           {"limit": 10_000, "scan": 10_000}):
                for rid in (1, "r" * 200):
                    body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": name,
                                       "params": params}, separators=(",", ":")).encode()
                    host, port = svc.mi_datagram.rsplit(":", 1)
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.settimeout(0.3)
                        s.sendto(body, (host, int(port)))
                        try:
                            reply = s.recv(65535)
                        except TimeoutError:
                            continue
                    answered += 1
                    ratios.append(len(reply) / len(body))
                    assert json.loads(reply)["error"]["code"] in (
                        jsonrpc.UNAUTHORIZED, jsonrpc.INVALID_PARAMS,
                        jsonrpc.METHOD_NOT_FOUND), reply
        assert ratios and max(ratios) <= 1.0, max(ratios)
        # With the token the same endpoint answers in full.
        rep = call(svc, "which", {}, via="datagram", token=TOKEN)
        assert len(json.dumps(result(rep))) > 3000
        cfg = call(svc, "acm_get_config", {}, via="datagram", token=TOKEN)
        assert result(cfg)["live"]["threshold"] == 5
        print(f"MI exposed datagram bind: {len(commands)} commands x 10 bodies without the "
              f"token, {answered} answered (short errors), largest reply/request "
              f"{max(ratios):.2f}")
    finally:
        svc.cleanup()
