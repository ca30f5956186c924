"""Store URLs: `redis[s]://[user:pass@]host:port[,host:port...]/db` or `unix:///path`, parsed once
for every client (the decision path's pipelined one and redis-py off it)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from acm_module.core.errors import StoreError, StoreReplyError
from acm_module.core.redaction import redact_url
from acm_module.core.settings import STORE_SCHEMES


@dataclass(frozen=True)
class StoreAddress:
    """Where a store URL points (redis[s]://[user:pass@]host:port/db or unix:///path)."""

    unix: bool
    path: str
    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    tls: bool = False
    tls_verify: bool = True
    ca_certs: str | None = None

    def at(self, host: str, port: int) -> StoreAddress:
        """Return the same credentials and TLS settings for another node (a cluster's)."""
        return StoreAddress(False, "", host, port, self.username, self.password, self.db,
                            self.tls, self.tls_verify, self.ca_certs)

    def open(self, connect_timeout: float, url: str) -> socket.socket:
        """Connect a socket to the store (TCP_NODELAY on TCP, TLS for rediss://).

        Raises StoreError.
        """
        try:
            if self.unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(connect_timeout)
                s.connect(self.path)
            else:
                s = socket.create_connection((self.host, self.port), connect_timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls:
                    s = self._tls_context().wrap_socket(s, server_hostname=self.host)
        except (OSError, ssl.SSLError) as e:
            raise StoreError(f"cannot connect to store {safe_url(url)} "
                             f"({self.host}:{self.port}): {e}") from e
        return s

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_certs)
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def login(self) -> list[list[str | int]]:
        """Return the commands a new connection sends first (AUTH, SELECT as the URL says)."""
        out: list[list[str | int]] = []
        if self.password:
            out.append(["AUTH", self.username, self.password] if self.username
                       else ["AUTH", self.password])
        if self.db:
            out.append(["SELECT", self.db])
        return out


def parse_seeds(url: str) -> list[StoreAddress]:
    """Parse a store URL into its seed addresses (`redis://h1:6379,h2:6379/0` names two).

    `rediss://` connects over TLS (query `ssl_cert_reqs=none` skips verification,
    `ssl_ca_certs=PATH` names the CA file); `user:password@` logs in as an ACL user.
    Raises StoreError for an unsupported scheme or a malformed address.
    """
    u = urlparse(url)
    if u.scheme not in STORE_SCHEMES:
        raise StoreError(f"unsupported store URL scheme {u.scheme!r} "
                         "(redis://, rediss:// or unix://)")
    if u.scheme == "unix":
        return [StoreAddress(True, u.path, "", 0, None, None, 0)]
    userinfo, _, hosts = u.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    db = u.path.strip("/")
    q = parse_qs(u.query)
    verify = q.get("ssl_cert_reqs", ["required"])[0].lower() not in ("none", "optional")
    out = []
    for hp in hosts.split(","):
        host, port = hp or "127.0.0.1", 6379
        if hp.startswith("["):  # [ipv6]:port
            host, _, rest = hp[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 6379
        elif ":" in hp:
            h, _, p = hp.rpartition(":")
            try:
                host, port = h, int(p)
            except ValueError as e:
                raise StoreError(f"bad port in store URL {safe_url(url)}") from e
        out.append(StoreAddress(False, "", host, port, unquote(user) if user else None,
                                unquote(password) if password else None,
                                int(db) if db else 0, u.scheme == "rediss", verify,
                                q.get("ssl_ca_certs", [None])[0]))
    return out


def parse_url(url: str) -> StoreAddress:
    """Parse a store URL into its first address. Raises StoreError (see parse_seeds)."""
    return parse_seeds(url)[0]


# Error replies that mean the URL's credentials or database are wrong: no retry can fix them.
_REFUSALS = (
    ("WRONGPASS", "the store refused the user name or password"),
    ("NOAUTH", "the store requires a password and the URL has none"),
    ("ERR AUTH", "the URL has a password but the store has none configured"),
    ("ERR Client sent AUTH", "the URL has a password but the store has none configured"),
    ("ERR invalid password", "the store refused the password"),
    ("ERR DB index", "the store has no such database"),
)


def login_refusal(e: BaseException) -> str | None:
    """Say why the store refused to log in (a wrong password...), or None for anything else."""
    if not isinstance(e, StoreReplyError):
        return None
    for prefix, why in _REFUSALS:
        if e.message.startswith(prefix):
            return f"{why} ({e.message.split(' ', 1)[0]})"
    return None


def safe_url(url: str) -> str:
    """Return a store URL without its password, for logs."""
    return redact_url(url)
