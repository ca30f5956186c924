"""Who may run what: read-only commands are open, admin commands need the token on exposed binds.

Rules:
- A loopback or unix-socket endpoint trusts local callers (as OpenSIPS's own mi_http does):
  admin commands need no token there. A token that is given must still be right.
- Any other bind (0.0.0.0, a LAN address, a name that is not loopback) refuses to start
  without `mi_token`, and its admin commands need that token: HTTP `Authorization: Bearer
  <token>` or a `token` parameter (datagram: the `token` parameter only).
- Read-only commands (listing, stats, config) need no token, except on an exposed datagram
  bind: UDP source addresses can be forged, so there every command needs the token and
  whoever lacks it gets at most a reply no larger than the request (server.py).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass

from acm_module.control.jsonrpc import UNAUTHORIZED, MIError
from acm_module.errors import ConfigError


@dataclass(frozen=True)
class Bind:
    """A parsed MI bind address: host:port, [v6]:port, or unix:/path."""

    host: str
    port: int
    unix_path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_bind(value: str, setting: str) -> Bind:
    """Parse an mi_http/mi_datagram value. Raises ConfigError naming the setting."""
    v = value.strip()
    if v.startswith("unix:"):
        path = v[len("unix:"):]
        if not path:
            raise ConfigError(f"{setting}: unix: needs a path (got {value!r})")
        return Bind(host="", port=0, unix_path=path)
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
    else:
        host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{setting}: expected host:port or unix:/path (got {value!r})")
    return Bind(host=host or "0.0.0.0", port=int(port))


def is_loopback(bind: Bind) -> bool:
    """Say whether only this host can reach the bind (loopback address or unix socket)."""
    if bind.is_unix:
        return True
    host = bind.host
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def check_boot(binds: list[Bind], token: str) -> None:
    """Refuse an exposed bind without a token. Raises ConfigError."""
    exposed = [str(b) for b in binds if not is_loopback(b)]
    if exposed and not token:
        raise ConfigError(
            f"MI bound to non-loopback {', '.join(exposed)} requires mi_token "
            "(ACM_MI_TOKEN); refusing to start")
    if token and len(token) < 16:
        raise ConfigError("mi_token must be at least 16 characters")


class Authorizer:
    """Decide whether a call may run a command."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def check(self, *, admin: bool, loopback_bind: bool, presented: str | None,
              token_always: bool = False) -> str:
        """Return the caller's role ("admin" or "read"). Raises MIError(-32001).

        token_always: every command needs the token (an exposed datagram bind, where a
        forged source address would otherwise turn read-only replies into amplification)."""
        if presented is not None:
            # surrogatepass: a lone surrogate ("\ud800") is a wrong token, not an exception.
            if not self._token or not hmac.compare_digest(
                    presented.encode("utf-8", "surrogatepass"), self._token):
                raise MIError(UNAUTHORIZED, "invalid MI token")
            return "admin"
        if token_always:
            raise MIError(UNAUTHORIZED, "this endpoint needs the MI token for every command "
                                        "(a token parameter)")
        if not admin:
            return "read"
        if loopback_bind:
            return "admin"
        raise MIError(UNAUTHORIZED,
                      "this command changes state: an admin token is required "
                      "(Authorization: Bearer <token> or a token parameter)")
