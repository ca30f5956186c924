"""Store URLs (seeds, TLS, ACL users) and cluster slots, without a server."""

from __future__ import annotations

import pytest

from acm_module.core.errors import StoreError
from acm_module.core.storeurl import parse_seeds, safe_url
from acm_module.decide.store.cluster import command_key, key_slot


def test_several_seeds_share_credentials_tls_and_db() -> None:
    seeds = parse_seeds("rediss://acm:s%40cret@h1:7000,h2,[::1]:7002/0?ssl_cert_reqs=none")
    assert [(a.host, a.port) for a in seeds] == [("h1", 7000), ("h2", 6379), ("::1", 7002)]
    assert all(a.username == "acm" and a.password == "s@cret" for a in seeds)
    assert all(a.tls and not a.tls_verify and a.db == 0 for a in seeds)
    one = parse_seeds("redis://127.0.0.1:6380/2")
    assert len(one) == 1 and not one[0].tls and one[0].db == 2 and one[0].password is None


def test_bad_urls_are_refused_clearly() -> None:
    with pytest.raises(StoreError, match="scheme"):
        parse_seeds("http://h:1/0")
    with pytest.raises(StoreError, match="bad port"):
        parse_seeds("redis://h1:x/0")


def test_safe_url_hides_the_password_of_any_url() -> None:
    assert safe_url("redis://u:pw@h1:1,h2:2/0") == "redis://u:***@h1:1,h2:2/0"
    assert safe_url("redis://h1:1/0") == "redis://h1:1/0"


def test_key_slot_is_redis_cluster_keyslot() -> None:
    # Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    assert key_slot(b"123456789") == 0x31C3 & 16383
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{acm.3}:w:+2348012345678") == key_slot(b"{acm.3}:s")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag hashes the key


def test_command_key_finds_the_routing_key() -> None:
    assert command_key([b"EVALSHA", b"ab", b"2", b"{acm.1}:w", b"x"]) == b"{acm.1}:w"
    assert command_key([b"EVAL", b"return 1", b"0"]) is None
    assert command_key([b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"{acm.2}:s",
                        b">"]) == b"{acm.2}:s"
    assert command_key([b"XGROUP", b"CREATE", b"{acm.4}:s", b"g", b"0"]) == b"{acm.4}:s"
    assert command_key([b"SCRIPT", b"LOAD", b"x"]) is None
    assert command_key([b"MEMORY", b"USAGE", b"{acm.5}:w:x"]) == b"{acm.5}:w:x"
    assert command_key([b"HGET", b"{acm.cfg}:detect", b"gen"]) == b"{acm.cfg}:detect"
