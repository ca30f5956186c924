"""The writer's connection to the store: big stream replies, parsed by hiredis."""

from __future__ import annotations

import socket
import time
from typing import Any

from acm_module.core.errors import StoreError, StoreReplyError
from acm_module.core.storeurl import StoreAddress, parse_url, safe_url
from acm_module.decide.engine import hotpath

try:
    import hiredis
except ImportError:  # pragma: no cover - the writer extra installs it
    hiredis = None


class StreamConnection:
    """A blocking Redis-protocol connection for the writer, replies parsed by hiredis.

    The writer reads thousands of stream entries per reply; the decision path's
    StoreConnection is tuned for small replies (its parser restarts on every partial read,
    quadratic here) and the writer should not depend on its hot-path internals. Replies are
    UTF-8 decoded str with hiredis, bytes without it: readers go through `_s`.
    """

    def __init__(self, url: str, timeout: float = 5.0, connect_timeout: float = 2.0,
                 address: StoreAddress | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._address = address or parse_url(url)
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._buf = bytearray()

    def safe_url(self) -> str:
        """Return the URL without its password, for logs."""
        return safe_url(self.url)

    def connect(self) -> None:
        """Open the connection (AUTH/SELECT as the URL says). Raises StoreError."""
        self.close()
        self._sock = self._address.open(self.connect_timeout, self.url)
        self._reader = hiredis.Reader(replyError=hotpath.RespError, encoding="utf-8",
                                      errors="replace") if hiredis else None
        self._buf.clear()
        for cmd in self._address.login():
            self.call(*cmd)

    @property
    def connected(self) -> bool:
        """Say whether a socket is open."""
        return self._sock is not None

    def set_timeout(self, timeout: float) -> None:
        """Change the default round-trip timeout."""
        self.timeout = timeout

    def close(self) -> None:
        """Close the socket, if open."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _next_reply(self) -> Any:
        if self._reader is not None:
            return self._reader.gets()
        try:
            reply, pos = hotpath.parse_reply(self._buf, 0)
        except hotpath.Incomplete:
            return False
        del self._buf[:pos]
        return reply

    def round_trip(self, payload: bytes, n: int, timeout: float | None = None) -> list:
        """Send n pipelined commands and return their n replies (errors as RespError).

        Raises StoreError (and closes) on a broken or slow connection.
        """
        return self.read(n, self.send(payload, timeout))

    def send(self, payload: bytes, timeout: float | None = None) -> float:
        """Send pipelined commands; return the deadline of their replies (for read())."""
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(payload)
        except OSError as e:
            self.close()
            raise StoreError(f"store {self.safe_url()}: {e}") from e
        return deadline

    def read(self, n: int, deadline: float) -> list:
        """Read n replies sent before deadline (see round_trip()). Raises StoreError."""
        sock = self._sock
        if sock is None:
            raise StoreError(f"store {self.safe_url()}: connection closed")
        try:
            out: list = []
            while len(out) < n:
                reply = self._next_reply()
                if reply is not False:
                    out.append(reply)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("store round trip timed out")
                sock.settimeout(left)
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("store closed the connection")
                if self._reader is not None:
                    self._reader.feed(chunk)
                else:
                    self._buf += chunk
            return out
        except (OSError, ValueError) as e:
            self.close()
            raise StoreError(f"store {self.safe_url()}: {e}") from e
        except Exception as e:
            if hiredis is not None and isinstance(e, hiredis.ProtocolError):
                self.close()
                raise StoreError(f"store {self.safe_url()}: {e}") from e
            raise

    def call(self, *args: bytes | str | int, timeout: float | None = None) -> Any:
        """Run one command; raise StoreReplyError for an error reply."""
        (reply,) = self.round_trip(hotpath.encode_command(*args), 1,
                                   timeout if timeout is not None else self.timeout)
        if isinstance(reply, hotpath.RespError):
            raise StoreReplyError(reply.message)
        return reply


