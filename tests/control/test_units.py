"""Control-plane pieces without servers: JSON-RPC parsing, binds and auth, override files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from acm_module.control import jsonrpc, overrides
from acm_module.control.auth import Authorizer, check_boot, is_loopback, parse_bind
from acm_module.control.cli import build_params
from acm_module.control.commands import open_repository
from acm_module.control.repository import StoreRepository
from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("raw", "code"), [
    (b"{nope", jsonrpc.PARSE_ERROR),
    (b"\xff\xfe", jsonrpc.PARSE_ERROR),
    (b"[]", jsonrpc.INVALID_REQUEST),
    (b'"x"', jsonrpc.INVALID_REQUEST),
    (b'{"method":"which","id":1}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"which","params":5}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":true,"method":"which"}', jsonrpc.INVALID_REQUEST),
    (b" " * (jsonrpc.MAX_REQUEST_BYTES + 1), jsonrpc.INVALID_REQUEST),
    # a duplicate key anywhere, as the request decoder refuses duplicate fields
    (b'{"jsonrpc":"2.0","id":1,"method":"which","method":"acm_reload"}',
     jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"acm_set","params":{"a":{"b":1,"b":2}}}',
     jsonrpc.INVALID_REQUEST),
    # ids JSON cannot echo: past Python's int digit limit, not finite
    (b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"which"}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1e400,"method":"which"}', jsonrpc.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":NaN,"method":"which"}', jsonrpc.INVALID_REQUEST),
])
def test_bad_requests_are_rejected_with_their_code(raw: bytes, code: int) -> None:
    with pytest.raises(jsonrpc.MIError) as e:
        jsonrpc.parse(raw)
    assert e.value.code == code


def test_requests_and_notifications() -> None:
    r = jsonrpc.parse(b'{"jsonrpc":"2.0","id":"7","method":"acm_set","params":{"threshold":7}}')
    assert (r.method, r.params, r.id, r.is_notification) == (
        "acm_set", {"threshold": 7}, "7", False)
    # What OpenSIPS event_datagram sends: no id, params optional.
    n = jsonrpc.parse(b'{"jsonrpc":"2.0","method":"E_ACM_RELOAD"}')
    assert n.is_notification and n.params == {}
    assert json.loads(jsonrpc.result("7", {"a": 1})) == {"jsonrpc": "2.0", "result": {"a": 1},
                                                         "id": "7"}


def test_huge_integers_parse_to_a_value_no_parameter_accepts() -> None:
    r = jsonrpc.parse(b'{"jsonrpc":"2.0","id":1,"method":"acm_set","params":{"threshold":'
                      + b"9" * 5000 + b"}}")
    huge = r.params["threshold"]  # type: ignore[call-overload]
    assert isinstance(huge, jsonrpc.HugeInt) and str(huge) == "<an integer of 5000 digits>"
    with pytest.raises(ValueError):
        jsonrpc.param_str(huge)
    with pytest.raises(ValueError):
        jsonrpc.param_str("\ud800")
    # Replies are strict JSON (no NaN), and always one reply.
    assert json.loads(jsonrpc.result(1, float("nan")))["error"]["code"] == jsonrpc.INTERNAL_ERROR


def test_bind_parsing_and_loopback() -> None:
    assert parse_bind("127.0.0.1:8899", "mi_http").port == 8899
    assert parse_bind("[::1]:8899", "mi_http").host == "::1"
    assert parse_bind("unix:/run/acm/mi.sock", "mi_datagram").unix_path == "/run/acm/mi.sock"
    for bad in ("8899", "host:", "host:99999", "unix:"):
        with pytest.raises(ConfigError):
            parse_bind(bad, "mi_http")
    assert is_loopback(parse_bind("127.0.0.1:1", "x"))
    assert is_loopback(parse_bind("[::1]:1", "x"))
    assert is_loopback(parse_bind("localhost:1", "x"))
    assert is_loopback(parse_bind("unix:/tmp/x", "x"))
    assert not is_loopback(parse_bind("0.0.0.0:1", "x"))
    assert not is_loopback(parse_bind(":1", "x"))
    assert not is_loopback(parse_bind("[::]:1", "x"))


def test_exposed_bind_needs_a_token() -> None:
    check_boot([parse_bind("127.0.0.1:1", "x")], "")
    with pytest.raises(ConfigError, match="requires mi_token"):
        check_boot([parse_bind("0.0.0.0:1", "x")], "")
    with pytest.raises(ConfigError, match="at least 16"):
        check_boot([parse_bind("0.0.0.0:1", "x")], "short")
    check_boot([parse_bind("0.0.0.0:1", "x")], "a" * 32)


def test_authorizer_roles() -> None:
    a = Authorizer("s3cret-token-0123456789")
    assert a.check(admin=False, loopback_bind=False, presented=None) == "read"
    assert a.check(admin=True, loopback_bind=True, presented=None) == "admin"
    assert a.check(admin=True, loopback_bind=False,
                   presented="s3cret-token-0123456789") == "admin"
    for presented in (None, "wrong"):
        with pytest.raises(jsonrpc.MIError) as e:
            a.check(admin=True, loopback_bind=False, presented=presented)
        assert e.value.code == jsonrpc.UNAUTHORIZED
    with pytest.raises(jsonrpc.MIError):  # a wrong token is wrong even where none is needed
        a.check(admin=False, loopback_bind=True, presented="wrong")
    with pytest.raises(jsonrpc.MIError) as e:  # not text at all: wrong, not an exception
        a.check(admin=False, loopback_bind=True, presented="\ud800")
    assert e.value.code == jsonrpc.UNAUTHORIZED


def test_overrides_round_trip_and_apply(tmp_path: Path, store_url: str, store) -> None:  # type: ignore[no-untyped-def]
    env = {"ACM_STATE_DIR": str(tmp_path), "ACM_DETECTION_THRESHOLD": "9",
           "ACM_STORE_URL": store_url}
    s = settings_mod.load(None, env=env)
    repo = StoreRepository(store, 16)

    def apply() -> dict[str, Any]:
        return overrides.apply_overrides(s, open_repository)

    # A host-local file of the old design is ignored: no silent inheritance between instances.
    (tmp_path / overrides.LEGACY_FILENAME).write_text('{"values": {"threshold": 3}}')
    assert apply() == {}
    assert repo.overrides_put("default", 0, {"threshold": 7, "mode": "monitor"}, "test") == 1
    applied = apply()
    assert applied == {"threshold": 7, "mode": "monitor"}
    assert s.threshold == 7 and s.mode == "monitor"  # the override beats the environment
    assert s.source["threshold"].startswith("override:")
    # Compare-and-set on the generation: a writer that read generation 0 (or 2) comes second.
    assert repo.overrides_put("default", 0, {"threshold": 8}, "late") == -1
    assert repo.overrides_put("default", 2, {"threshold": 8}, "late") == -1
    assert repo.overrides_put("default", 1, {"threshold": 6}, "b") == 2
    assert overrides.read_overrides(repo, "default") == overrides.Saved(2, {"threshold": 6})
    # A document of the old design (no generation) is generation 0, and readable.
    store.call("SET", overrides.OVERRIDES_KEY, '{"values": {"threshold": 1}}')
    assert overrides.read_overrides(repo, "default").generation == 0
    with pytest.raises(ConfigError, match="threshold"):
        apply()
    store.call("SET", overrides.OVERRIDES_KEY, "{broken")
    with pytest.raises(ConfigError, match="in JSON"):
        apply()
    assert repo.overrides_put("default", 0, {}, "reset") == 1  # replaceable
    store.call("SET", overrides.OVERRIDES_KEY, '{"values": {"workers": 3}}')  # not runtime
    assert apply() == {}


def test_cli_builds_named_or_positional_params() -> None:
    assert build_params(["threshold=7"]) == {"threshold": "7"}
    assert build_params(["+2348031234567"]) == ["+2348031234567"]
    assert build_params([]) is None
    assert build_params([], actor="ops") == {"actor": "ops"}
    assert build_params(["threshold=7"], actor="ops") == {"threshold": "7", "actor": "ops"}


def test_connection_slots_evict_the_oldest_unfinished_and_refuse_when_all_are_busy() -> None:
    import socket
    import time

    from acm_module.control.server import _Connections

    conns = _Connections(limit=2, timeout_s=0.2)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        a, b, c, d = (p[0] for p in pairs)
        assert conns.admit(a) and conns.admit(b)
        assert conns.admit(c) and conns.evicted == 1  # a read the longest: closed for c
        assert pairs[0][1].recv(1) == b""  # the peer of a sees the end
        conns.busy(b)
        conns.busy(c)
        assert not conns.admit(d) and conns.refused == 1  # every slot answering: 503
        conns.reading(c)
        time.sleep(0.25)
        assert conns.expire() == 1 and pairs[2][1].recv(1) == b""  # c missed its deadline
        conns.closed(b)
        assert conns.admit(d)
    finally:
        for x, y in pairs:
            x.close()
            y.close()
