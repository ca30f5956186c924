"""One MI client for OpenSIPS's MI (actions/: `dlg_end_dlg`) and acm's own (`acm mi`):
python-opensips's `OpenSIPSMI`.

`MIClient(url, timeout, token)`: url is `http(s)://host:port/path` (mi_http), `udp:host:port`
(`udp:[::1]:port`) or `unix:/path` (mi_datagram). `execute` returns the command's result, or
raises MIReplyError (a JSON-RPC error) or MIUnavailable (unreachable, no reply in time, a reply
that is not JSON-RPC: retryable).

python-opensips (0.1.11, the newest) builds the request, parses the reply and tells a JSON-RPC
error from a failed connection. Its transports lack what acm needs, so `_HTTP` and `_Datagram`
extend them:
- HTTP: no timeout (a hung endpoint would hold the caller forever); no header of ours (acm's
  admin token travels as `Authorization: Bearer`); a non-200 answer loses its JSON-RPC error
  (acm's MI answers 413 and 503 with one); certificates unchecked over https.
- datagrams: IPv4 only; one unix reply path for every request, so a late reply to an earlier,
  timed-out request could be taken for this one's (here each request has a socket of its own).
A datagram has no header: the token goes as the `token` parameter, which acm's MI reads too.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from opensips.mi import OpenSIPSMI, OpenSIPSMIException
from opensips.mi.datagram import Datagram
from opensips.mi.http import HTTP
from opensips.mi.jsonrpc_helper import JSONRPCError, JSONRPCException, get_command, get_reply

from acm_module.core.errors import MIReplyError, MIUnavailable

_MAX_REPLY = 65535  # a datagram's payload at most


def _reply(conn: Any, raw: bytes) -> Any:
    """Keep the whole reply on conn (`last_reply`); return its result. Raises JSONRPCError,
    JSONRPCException (not a JSON-RPC object)."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise JSONRPCException(f"reply is not JSON: {raw[:100]!r}") from e
    if not isinstance(obj, dict):
        raise JSONRPCException(f"reply is not a JSON object: {raw[:100]!r}")
    conn.last_reply = obj
    return get_reply(raw)


class _HTTP(HTTP):
    """mi_http with a timeout, extra headers and the JSON-RPC errors of non-200 answers."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str]) -> None:
        super().__init__(url=url)
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **headers}
        self.last_reply: dict[str, Any] | None = None

    def execute(self, method: str, params: Any) -> Any:
        req = urllib.request.Request(self.url, get_command(method, params).encode(),
                                     self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:  # 413, 503 (JSON-RPC errors), 404/405 (none)
            with e:
                raw = e.read()
            if not raw.lstrip().startswith(b"{"):
                raise JSONRPCException(f"HTTP {e.code}") from e
        except TimeoutError as e:
            raise JSONRPCException(f"no reply in {self.timeout:g}s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise JSONRPCException(f"no reply in {self.timeout:g}s") from e
            raise JSONRPCException(str(e.reason)) from e
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise JSONRPCException(str(e) or type(e).__name__) from e
        return _reply(self, raw)


class _Datagram(Datagram):
    """mi_datagram over IPv4, IPv6 or a unix socket, a reply socket of its own per request."""

    def __init__(self, target: str | tuple[str, int], timeout: float) -> None:
        if isinstance(target, str):
            super().__init__(datagram_unix_socket=target, datagram_timeout=timeout,
                             datagram_buffer_size=_MAX_REPLY)
        else:
            super().__init__(datagram_ip=target[0], datagram_port=target[1],
                             datagram_timeout=timeout, datagram_buffer_size=_MAX_REPLY)
            if ":" in target[0]:
                self.family = socket.AF_INET6
        self.last_reply: dict[str, Any] | None = None

    def execute(self, method: str, params: Any) -> Any:
        tmp: tempfile.TemporaryDirectory[str] | None = None
        try:
            with socket.socket(self.family, socket.SOCK_DGRAM) as s:
                if self.family == socket.AF_UNIX:
                    # mi_datagram answers the sender's address: bind one of our own.
                    tmp = tempfile.TemporaryDirectory(prefix="acm-mi-")
                    s.bind(os.path.join(tmp.name, "reply.sock"))
                s.settimeout(self.timeout)
                s.sendto(get_command(method, params).encode(), self.address)
                raw = s.recv(self.recv_size)
        except TimeoutError as e:
            raise JSONRPCException(f"no reply in {self.timeout:g}s") from e
        except OSError as e:
            raise JSONRPCException(str(e)) from e
        finally:
            if tmp is not None:
                tmp.cleanup()
        return _reply(self, raw)


class MIClient(OpenSIPSMI):
    """One MI endpoint; one request at a time (not thread-safe).

    name heads MIUnavailable's message ("OpenSIPS MI", "the MI endpoint"); token: acm's admin
    token (a bearer header over HTTP, the `token` parameter in a datagram).
    """

    def __init__(self, url: str, timeout: float = 2.0, token: str | None = None,
                 name: str = "MI") -> None:
        # OpenSIPSMI.__init__ builds only its own transports: ours are set here instead.
        self.url = url.strip()
        self.timeout = timeout
        self.token = token or None
        self.name = name
        parsed = urllib.parse.urlsplit(self.url)
        kind = parsed.scheme.lower()
        if kind in ("http", "https"):
            self.conn: _HTTP | _Datagram = _HTTP(
                self.url, timeout, {"Authorization": f"Bearer {token}"} if token else {})
        elif kind == "udp":
            host, _, port = (parsed.netloc or parsed.path).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{url!r}: expected udp:host:port")
            self.conn = _Datagram((host.strip("[]"), int(port)), timeout)
        elif kind == "unix":
            self.conn = _Datagram(parsed.path or self.url[len("unix:"):], timeout)
        else:
            raise ValueError(f"{url!r}: expected http(s)://, udp: or unix:")
        self.validated = None

    @property
    def last_reply(self) -> dict[str, Any] | None:
        """Return the whole JSON-RPC response to the last request (None before one)."""
        return self.conn.last_reply

    def execute(self, cmd: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Run one MI command and return its `result`.

        Raises MIUnavailable (unreachable, no answer in time, not JSON-RPC) or MIReplyError.
        """
        if self.token and isinstance(self.conn, _Datagram):
            if isinstance(params, list):
                params = [*params, f"token={self.token}"]
            else:
                params = {**(params or {}), "token": self.token}
        self.conn.last_reply = None
        try:
            return super().execute(cmd, params)
        except OpenSIPSMIException as e:
            cause = e.__cause__
            if isinstance(cause, JSONRPCError):
                try:
                    code = int(cause.code)
                except (TypeError, ValueError):
                    raise MIUnavailable(f"{self.name} {self.url}: reply with a bad error "
                                        f"code {cause.code!r}") from cause
                raise MIReplyError(code, str(cause.message or ""), cause.data) from cause
            raise MIUnavailable(f"{self.name} {self.url}: {cause}") from cause
