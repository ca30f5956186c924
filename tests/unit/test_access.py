"""Which endpoints count as exposed, and which peer addresses an allow-list admits."""

from __future__ import annotations

import socket

import pytest

from acm_module.server.access import Access, is_exposed
from acm_module.server.supervisor import bound_endpoint
from acm_module.settings import parse_networks


@pytest.mark.parametrize(("endpoint", "exposed"), [
    ("tcp://0.0.0.0:5555", True), ("tcp://[::]:5555", True), ("tcp://*:5555", True),
    ("tcp://10.1.2.3:5555", True), ("tcp://[2001:db8::1]:5555", True),
    ("tcp://127.0.0.1:5555", False), ("tcp://127.0.0.2:5555", False),
    ("tcp://[::1]:5555", False), ("tcp://localhost:5555", False),
    ("ipc:///run/acm/acm.sock", False),
])
def test_exposure_is_decided_by_the_bind_address(endpoint: str, exposed: bool) -> None:
    assert is_exposed(endpoint) is exposed


def test_the_allow_list_matches_networks_and_ipv4_mapped_peers() -> None:
    a = Access(networks=parse_networks("10.1.0.0/16, 192.0.2.7, 2001:db8::/32"))
    for ok in ("10.1.200.3", "192.0.2.7", "::ffff:10.1.0.1", "2001:db8::5"):
        assert a.allows_address(ok), ok
    for no in ("10.2.0.1", "192.0.2.8", "127.0.0.1", "::1", "", "not-an-ip"):
        assert not a.allows_address(no), no
    assert Access().allows_address("203.0.113.9")  # no list: anyone


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        parse_networks("10.0.0.0/8, 10.0.0.300")


def test_bound_endpoint_brackets_ipv6() -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
        assert bound_endpoint("tcp://[::1]:0", s) == f"tcp://[::1]:{port}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert bound_endpoint("tcp://127.0.0.1:0", s) == f"tcp://127.0.0.1:{port}"


def test_the_zap_handler_admits_only_what_the_rules_allow() -> None:
    import zmq
    from zmq.utils import z85

    from acm_module.server.access import ZapHandler

    client_pub, _ = zmq.curve_keypair()
    stranger_pub, _ = zmq.curve_keypair()
    _, server_secret = zmq.curve_keypair()
    access = Access(networks=parse_networks("127.0.0.0/8"), server_secret=server_secret,
                    client_keys=frozenset({client_pub}))
    ctx = zmq.Context()
    zap = ZapHandler(ctx, access)
    try:
        def req(address: bytes, mechanism: bytes, *creds: bytes) -> bytes:
            return zap.decide([b"1.0", b"id", b"acm", address, b"", mechanism, *creds])[0]

        assert req(b"127.0.0.1", b"CURVE", z85.decode(client_pub)) == b"200"
        assert req(b"127.0.0.1", b"CURVE", z85.decode(stranger_pub)) == b"400"
        assert req(b"10.0.0.1", b"CURVE", z85.decode(client_pub)) == b"400"  # not in the list
        assert req(b"127.0.0.1", b"CURVE", b"short") == b"400"
        assert req(b"127.0.0.1", b"NULL") == b"400"  # CURVE on: no NULL peers
        assert req(b"127.0.0.1", b"PLAIN", b"user", b"pass") == b"400"
        assert zap.decide([b"2.0", b"id"])[0] == b"400"
    finally:
        zap.close()
        ctx.term()
