"""Hostile MI bodies that once got no answer, or the wrong one, from a real `acm serve`.

Each body goes over HTTP and over a datagram; each must get exactly one JSON-RPC error with the
code that names the fault (-32602 bad parameters, -32600 bad request, -32001 bad token), never
a closed connection, a silent datagram or -32603, and the live config must not move.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from acm_module.control import jsonrpc
from tests.support.servers import Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

HUGE = "9" * 5000  # over Python's 4,300-digit int limit
DIGITS400 = "1" * 400


def _req(method: str, params: str, rid: str = "1") -> bytes:
    """A request with params (and id) given as raw JSON text."""
    return (f'{{"jsonrpc":"2.0","id":{rid},"method":"{method}","params":{params}}}').encode()


BAD_PARAMS: list[tuple[str, bytes]] = [
    # item 7: integers over 4,300 digits as a value
    ("huge int threshold", _req("acm_set", f'{{"threshold":{HUGE}}}')),
    ("huge int limit", _req("acm_whitelist_list", f'{{"limit":{HUGE}}}')),
    ("huge int number", _req("acm_unblock", f'{{"number":{HUGE}}}')),
    # item 7: since/until out of any clock's range
    *[(f"{m} {p}={v}", _req(m, f'{{"{p}":{v}}}'))
      for m, p in (("acm_alert_list", "since"), ("acm_alert_list", "until"),
                   ("acm_audit_list", "since"))
      for v in ("Infinity", "-Infinity", "NaN", "1e400", HUGE[:4000], '"1e400"', '"inf"')],
    # item 8: 400-digit settings
    *[(f"400 digits {name}", _req("acm_set", f'{{"{name}":{DIGITS400}}}'))
      for name in ("window", "block_ttl", "dedup_ttl", "store_timeout_ms", "fanout_window",
                   "threshold", "fanout_threshold")],
    ("400 digits ttl", _req("acm_whitelist_add",
                            f'{{"number":"+2348031111111","reason":"x","ttl":{DIGITS400}}}')),
    ("400 digits rate", _req("acm_gateway_set_limit", f'{{"id":"g","cps":{DIGITS400}}}')),
    ("1e400 window", _req("acm_gateway_set_limit", '{"id":"g","cps":1,"window":1e400}')),
    # item 8: reset of the wrong type
    ("reset list", _req("acm_reload", '{"reset":[1]}')),
    ("reset object", _req("acm_reload", '{"reset":{"a":1}}')),
    ("event reset list", _req("E_ACM_RELOAD", '{"reset":[true]}')),
    ("event reset object", _req("E_ACM_RELOAD", '{"reset":{"x":1}}')),
    # item 8: nested JSON inside the event's nameless parameter
    ("event nested", _req("E_ACM_RELOAD", json.dumps({"": "[" * 100_00}))),
    ("event nested list form", _req("E_ACM_RELOAD", json.dumps(["[" * 100_00]))),
    ("event not an object", _req("E_ACM_RELOAD", json.dumps({"": "[1,2]"}))),
    # lone surrogates in values
    ("surrogate reason", _req("acm_whitelist_add",
                              '{"number":"+2348031111111","reason":"\\ud800"}')),
    ("surrogate mode", _req("acm_set", '{"mode":"\\udfff"}')),
    ("surrogate number", _req("acm_unblock", '{"number":"\\ud800"}')),
]

BAD_REQUEST: list[tuple[str, bytes]] = [
    ("huge int id", f'{{"jsonrpc":"2.0","id":{HUGE},"method":"which"}}'.encode()),
    ("infinite id", b'{"jsonrpc":"2.0","id":1e400,"method":"which"}'),
    ("NaN id", b'{"jsonrpc":"2.0","id":NaN,"method":"which"}'),
    # item 6: duplicate keys, anywhere
    ("duplicate method", b'{"jsonrpc":"2.0","id":1,"method":"which","method":"acm_reload"}'),
    ("duplicate id", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"which"}'),
    ("duplicate param", _req("acm_set", '{"threshold":7,"threshold":9}')),
    ("duplicate nested key", _req("acm_set", '{"mode":{"a":1,"a":2}}')),
]

BAD_TOKEN: list[tuple[str, bytes]] = [
    ("surrogate token", _req("acm_stats", '{"token":"\\ud800"}')),
    ("surrogate token admin", _req("acm_set", '{"threshold":7,"token":"\\udbff\\udfff\\ud800"}')),
    ("token of a huge int", _req("acm_stats", f'{{"token":{HUGE}}}')),
]


@pytest.fixture(scope="module")
def svc(module_redis: str) -> Iterator[Service]:
    s = Service(module_redis, workers=1)  # MI on its own loopback ports, its own state dir
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


def http_raw(svc: Service, body: bytes, headers: str = "") -> tuple[int, dict[str, Any]]:
    """POST body over a raw socket; return (status, JSON body). Fails on a closed connection."""
    host, port = svc.mi_http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /mi HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}"
                  "\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data, "the connection was closed without a response"
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def dgram(svc: Service, body: bytes) -> dict[str, Any]:
    host, port = svc.mi_datagram.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(body, (host, int(port)))
        try:
            return dict(json.loads(s.recv(65535)))
        except TimeoutError:
            raise AssertionError("no datagram reply") from None


def call(svc: Service, method: str, params: dict[str, Any] | None = None) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    status, rep = http_raw(svc, body.encode())
    assert status == 200 and "result" in rep, rep
    return rep["result"]


def wait_mi(svc: Service) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            call(svc, "acm_get_config")
            return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize(("cases", "code"), [
    (BAD_PARAMS, jsonrpc.INVALID_PARAMS),
    (BAD_REQUEST, jsonrpc.INVALID_REQUEST),
    (BAD_TOKEN, jsonrpc.UNAUTHORIZED),
], ids=["bad-params", "bad-request", "bad-token"])
def test_each_hostile_body_gets_one_clear_error(svc: Service, cases: list[tuple[str, bytes]],
                                                code: int) -> None:
    wait_mi(svc)
    before = call(svc, "acm_get_config")
    wrong = []
    for name, body in cases:
        assert len(body) < jsonrpc.MAX_REQUEST_BYTES, name
        status, rep = http_raw(svc, body)
        got = [("http", status, rep.get("error", {}).get("code"))]
        got.append(("datagram", 200, dgram(svc, body).get("error", {}).get("code")))
        wrong += [(name, *g) for g in got if g[1:] != (200, code)]
    assert not wrong, wrong
    after = call(svc, "acm_get_config")
    assert (after["generation"], after["live"]) == (before["generation"], before["live"])
    assert "Traceback" not in svc.read_log()


def test_a_bad_header_token_is_unauthorized_not_a_dropped_connection(svc: Service) -> None:
    wait_mi(svc)
    # Header bytes are Latin-1 text to the server: not the token, and no crash.
    status, rep = http_raw(svc, _req("acm_stats", "{}"), "Authorization: Bearer \xff\xfe\r\n")
    assert (status, rep["error"]["code"]) == (200, jsonrpc.UNAUTHORIZED)


def test_event_reload_in_both_forms_opensips_hands_on(svc: Service) -> None:
    """`opensips-cli -x mi raise_event E_ACM_RELOAD '{"threshold": N}'` reaches the service
    as {"": "<json>"} or as ["<json>"] (OpenSIPS 3.6, either at random): both apply."""
    wait_mi(svc)
    for n, params in enumerate(({"": '{"threshold": 3}'}, ['{"threshold": 4}'],
                                {"": '{"threshold": 6, "window": "2.5"}'},
                                ['{"threshold": 7, "window": "2"}'])):
        want = json.loads(next(iter(params.values())) if isinstance(params, dict)
                          else params[0])
        ev = {"jsonrpc": "2.0", "method": "E_ACM_RELOAD", "params": params}
        host, port = svc.mi_datagram.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(json.dumps(ev).encode(), (host, int(port)))  # a notification: no reply
        deadline = time.monotonic() + 5
        while True:
            live = call(svc, "acm_get_config")["live"]
            if live["threshold"] == want["threshold"]:
                break
            assert time.monotonic() < deadline, (n, params, live)
            time.sleep(0.02)
        if "window" in want:
            assert live["window"] == float(want["window"])
    # The same list form as a request (with an id) answers like acm_set.
    rep = dgram(svc, _req("E_ACM_RELOAD", json.dumps(['{"threshold": 5}'])))
    assert rep["result"]["values"]["threshold"] == 5, rep
    # A name=value list is still acm_set's positional form.
    rep = dgram(svc, _req("E_ACM_RELOAD", json.dumps(["threshold=8"])))
    assert rep["result"]["values"]["threshold"] == 8, rep
    call(svc, "acm_reload", {"reset": True})
