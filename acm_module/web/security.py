"""Who is calling: roles, password hashes (argon2), API tokens (only their SHA-256 is kept), the
boot check of an exposed bind.

Roles are ordered: a viewer reads; an analyst also works alerts (lifecycle, notes), the
whitelist and blocks; an admin also changes the live configuration, the carrier registry and
users. A token is 32 random bytes (URL-safe base64 with the `acm_` prefix), so a plain SHA-256
is enough to keep it: there is nothing to brute-force. Passwords are chosen by people and get
argon2id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from acm_module.control.auth import check_boot as _check_mi_boot
from acm_module.control.auth import parse_bind
from acm_module.errors import ConfigError

ROLES = ("viewer", "analyst", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}
TOKEN_PREFIX = "acm_"
MIN_PASSWORD = 10  # models.UserCreate / UserUpdate enforce it
BOOTSTRAP_ACTOR = "api-token"


class ApiError(Exception):
    """An error answered as {code, message} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the audit trail's actor and what it may do."""

    user: str
    role: str
    token_id: str = ""  # the token used ("" for the bootstrap token)
    token_kind: str = ""  # "api" or "session" ("" for the bootstrap token)
    session: bool = False  # authenticated by the console's session cookie (needs CSRF)

    def may(self, role: str) -> bool:
        """Say whether this caller has at least `role`."""
        return _RANK[self.role] >= _RANK[role]


def new_token() -> str:
    """Return a fresh API token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Return what is stored of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in constant time."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


def new_password() -> str:
    """Return a generated password (the bootstrap admin's)."""
    return secrets.token_urlsafe(18)


class Passwords:
    """argon2id hashing with the library's defaults (RFC 9106 low-memory profile)."""

    def __init__(self) -> None:
        from argon2 import PasswordHasher

        self._ph = PasswordHasher()

    def hash(self, password: str) -> str:
        """Return the encoded hash of a password."""
        return self._ph.hash(password)

    def verify(self, encoded: str, password: str) -> bool:
        """Say whether the password matches the encoded hash."""
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            return bool(self._ph.verify(encoded, password))
        except (VerificationError, InvalidHashError):
            return False


def check_boot(web_http: str, api_token: str) -> None:
    """Refuse an exposed web_http without api_token, a short api_token. Raises ConfigError."""
    if api_token and len(api_token) < 16:
        raise ConfigError("api_token must be at least 16 characters")
    if not web_http:
        return
    bind = parse_bind(web_http, "web_http")
    if bind.is_unix:
        raise ConfigError(f"web_http: expected host:port (got {web_http!r})")
    try:
        _check_mi_boot([bind], api_token)
    except ConfigError as e:
        raise ConfigError(f"web_http bound to non-loopback {bind} requires api_token "
                          "(ACM_API_TOKEN); refusing to start") from e
