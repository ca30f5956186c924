"""Pieces of the web process without servers: the boot check, secrets in logs, tokens."""

from __future__ import annotations

import pytest

from acm_module.errors import ConfigError
from acm_module.ops.logs import secrets_of
from acm_module.web.security import Passwords, check_boot, new_token, token_hash

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("bind", ["0.0.0.0:8080", "[::]:8080", "192.0.2.10:8080", ":8080"])
def test_an_exposed_bind_needs_api_token(bind: str) -> None:
    with pytest.raises(ConfigError, match="requires api_token"):
        check_boot(bind, "")
    check_boot(bind, "x" * 16)


@pytest.mark.parametrize("bind", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080", ""])
def test_loopback_needs_no_api_token(bind: str) -> None:
    check_boot(bind, "")


def test_a_short_api_token_and_a_unix_bind_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        check_boot("127.0.0.1:8080", "short")
    with pytest.raises(ConfigError, match="host:port"):
        check_boot("unix:/tmp/x.sock", "")


def test_api_token_is_redacted_from_logs() -> None:
    assert "s3cret-api-token-0123" in secrets_of({"api_token": "s3cret-api-token-0123"})


def test_tokens_are_random_and_only_their_hash_is_kept() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("acm_") and len(a) > 40
    assert token_hash(a) != token_hash(b) and a not in token_hash(a)
    assert len(token_hash(a)) == 64


def test_argon2id_hashes_verify_only_the_right_password() -> None:
    p = Passwords()
    h = p.hash("correct horse battery")
    assert h.startswith("$argon2id$")
    assert p.verify(h, "correct horse battery")
    assert not p.verify(h, "wrong horse battery")
    assert not p.verify("not a hash", "correct horse battery")
