"""A minimal blocking RESP connection: one pipelined write, one read loop, nothing else.

redis-py spends tens of microseconds per command in Python; the hot path sends a whole batch as
one buffer and parses the replies with the compiled parser.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from acm_module.core.errors import ConfigError, StoreError, StoreReplyError
from acm_module.core.storeurl import StoreAddress, login_refusal, parse_url, safe_url
from acm_module.core.types import SEVERITY_CRITICAL, SEVERITY_HIGH
from acm_module.decide.engine import hotpath

LUA_DIR = Path(__file__).with_name("lua")
# Scripts that run after episode.lua, the window/episode/severity logic they share.
_EPISODE_SCRIPTS = frozenset({"decide", "fanout"})


@functools.cache
def load_script(name: str) -> str:
    """Return the text the store runs for a bundled Lua script (EVALSHA names its SHA-1).

    decide and fanout get the severity bands of engine.types and episode.lua in front, so the
    episode logic is written once and the bands are the ones Python uses.
    """
    source = (LUA_DIR / f"{name}.lua").read_text()
    if name in _EPISODE_SCRIPTS:
        bands = (f"local SEVERITY_HIGH, SEVERITY_CRITICAL = {SEVERITY_HIGH}, "
                 f"{SEVERITY_CRITICAL}\n")
        source = bands + (LUA_DIR / "episode.lua").read_text() + source
    return source


def script_sha(source: str) -> str:
    """Return the SHA-1 the store names a script by (what SCRIPT LOAD returns)."""
    return hashlib.sha1(source.encode()).hexdigest()


class RedisInterface:
    """redis-py's execute_command and pipeline over call() and round_trip(), so the schema
    helpers the control plane shares with the worker take either client."""

    def call(self, *args: bytes | str | int, timeout: float | None = None) -> object:
        raise NotImplementedError

    def round_trip(self, payload: bytes, n: int, timeout: float | None = None) -> list:
        raise NotImplementedError

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command; return its reply as redis-py's client would. Raises StoreError."""
        return parsed_reply(args, self.call(*args), options)

    def pipeline(self, transaction: bool = False) -> StorePipeline:
        """Return a pipeline (redis-py's interface): one round_trip() on execute().

        Never MULTI: in a cluster each command goes to its own slot's master.
        """
        del transaction
        return StorePipeline(self)


class StoreConnection(RedisInterface):
    """One connection to a Redis-protocol server (DragonflyDB, Redis, Valkey)."""

    def __init__(self, url: str, timeout: float = 0.02, connect_timeout: float = 1.0,
                 address: StoreAddress | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._applied = -1.0
        self._address = address or parse_url(url)

    # -- connection management -------------------------------------------------------------
    def connect(self) -> None:
        """Open the connection (AUTH/SELECT as the URL says). Raises StoreError."""
        self.close()
        self._sock = self._address.open(self.connect_timeout, self.url)
        self._apply_timeout()
        self._buf.clear()
        for cmd in self._address.login():
            self.call(*cmd)

    @property
    def connected(self) -> bool:
        """Say whether a socket is open."""
        return self._sock is not None

    def close(self) -> None:
        """Close the socket, if open."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf.clear()

    def check_login(self) -> None:
        """Connect, log in and PING once, then close.

        Raises ConfigError when the store refuses the URL's credentials or database (a retry
        cannot fix that), StoreError when it is unreachable or failing.
        """
        try:
            self.connect()
            self.call("PING")
        except StoreError as e:
            why = login_refusal(e)
            if why is not None:
                raise ConfigError(f"store {self.safe_url()}: {why}") from e
            raise
        finally:
            self.close()

    def safe_url(self) -> str:
        """Return the URL without its password, for logs."""
        return safe_url(self.url)

    def set_timeout(self, timeout: float) -> None:
        """Change the per-round-trip timeout."""
        self.timeout = timeout
        if self._sock is not None:
            self._apply_timeout()

    def _apply_timeout(self, timeout: float | None = None) -> None:
        # Kernel timeouts on a blocking socket: Python's timeout mode would add a poll()
        # before every send and recv, two system calls per round trip on the hot path.
        assert self._sock is not None
        t = self.timeout if timeout is None else timeout
        tv = struct.pack("ll", int(t), int((t - int(t)) * 1e6) or (0 if int(t) else 1))
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._applied = t

    # -- I/O -------------------------------------------------------------------------------
    def round_trip(self, payload: bytes, n: int, timeout: float | None = None) -> list:
        """Send payload (n pipelined commands) and return their n replies.

        Error replies come back in the list as RespError; a broken or slow connection raises
        StoreError and is closed (the caller reconnects).
        """
        return self.read(n, self.send(payload, timeout))

    def send(self, payload: bytes, timeout: float | None = None) -> float:
        """Send pipelined commands; return the deadline of their replies (for read()).

        Raises StoreError (the connection is then closed).
        """
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        budget = self.timeout if timeout is None else timeout
        if budget != self._applied:
            self._apply_timeout(budget)
        try:
            sock.sendall(payload)
        except OSError as e:
            self.close()
            raise StoreError(f"store {self.safe_url()}: {e}") from e
        return time.monotonic() + budget

    def read(self, n: int, deadline: float) -> list:
        """Read n replies sent before deadline (see round_trip()). Raises StoreError."""
        sock = self._sock
        if sock is None:
            raise StoreError(f"store {self.safe_url()}: connection closed")
        try:
            out: list = []
            buf = self._buf
            pos = 0
            while len(out) < n:
                if pos < len(buf):
                    try:
                        v, pos = hotpath.parse_reply(buf, pos)
                        out.append(v)
                        continue
                    except hotpath.Incomplete:
                        pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("store round trip timed out")
                if left < self._applied * 0.5:
                    # Read after another node's replies (a cluster): wait only what is left.
                    self._apply_timeout(left)
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:  # SO_RCVTIMEO expired
                    raise TimeoutError("store round trip timed out") from None
                if not chunk:
                    raise ConnectionError("store closed the connection")
                del buf[:pos]
                pos = 0
                buf += chunk
            del buf[:pos]
            return out
        except (OSError, ValueError) as e:
            self.close()
            raise StoreError(f"store {self.safe_url()}: {e}") from e

    def call(self, *args: bytes | str | int, timeout: float | None = None) -> object:
        """Run one command; raise StoreReplyError for an error reply."""
        self._drop_if_closed()
        # The connection's own timeout: a worker's is the hot path's store budget, so neither a
        # reconnect's SCRIPT LOAD nor housekeeping can stall its clients longer than a decision.
        (reply,) = self.round_trip(hotpath.encode_command(*args), 1,
                                   timeout if timeout is not None else self.timeout)
        if isinstance(reply, hotpath.RespError):
            raise StoreReplyError(reply.message)
        return reply

    def _drop_if_closed(self) -> None:
        """Close a connection the server has closed while it sat idle (a store restart).

        Without this the first command after a restart fails with "store closed the
        connection" although the store is back. Only call() checks (one non-blocking peek):
        the hot path's round_trip() stays at two system calls.
        """
        s = self._sock
        if s is None:
            return
        try:
            # The plain socket's recv: a TLS socket refuses flags, and a peek only asks
            # whether the peer closed (pending TLS records count as open).
            data = socket.socket.recv(s, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # open, nothing pending: the normal case
        except OSError:
            self.close()
            return
        if not data:
            self.close()

    def script_load(self, source: str) -> str:
        """Load a Lua script and return its SHA1."""
        sha = self.call("SCRIPT", "LOAD", source)
        assert isinstance(sha, bytes)
        return sha.decode()


class StorePipeline:
    """Commands queued for one round trip, with redis-py's Pipeline interface."""

    def __init__(self, client: RedisInterface) -> None:
        self._client = client
        self._cmds: list[tuple[tuple, dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._cmds)

    def execute_command(self, *args: Any, **options: Any) -> StorePipeline:
        """Queue a command."""
        self._cmds.append((args, options))
        return self

    def execute(self, raise_on_error: bool = True) -> list:
        """Send the queued commands in one round trip; return their replies, parsed as redis-py's.

        An error reply raises StoreReplyError (the first one), or with raise_on_error=False comes
        back in the list as one; a failing store raises StoreError.
        """
        cmds, self._cmds = self._cmds, []
        if not cmds:
            return []
        payload = b"".join(hotpath.encode_command(*args) for args, _ in cmds)
        out: list = []
        for (args, options), r in zip(cmds, self._client.round_trip(payload, len(cmds)),
                                       strict=True):
            if isinstance(r, hotpath.RespError):
                if raise_on_error:
                    raise StoreReplyError(r.message)
                out.append(StoreReplyError(r.message))
            else:
                out.append(parsed_reply(args, r, options))
        return out


@functools.cache
def _reply_parsers() -> Mapping[str, Any]:
    # redis-py's own parsing per command (HGETALL -> dict, XRANGE -> [(id, fields)], ...), so a
    # helper reads one shape from this client and from redis-py's. Building a client connects
    # nothing. RESP2, as the worker speaks and open_redis asks for.
    return redis.Redis(protocol=2).response_callbacks


def parsed_reply(args: tuple, reply: Any, options: dict[str, Any]) -> Any:
    """Return a reply as redis-py's client parses it for the command args name."""
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    parse = _reply_parsers().get(name)
    if parse is None:
        return reply
    return parse(reply, **{k: v for k, v in options.items() if k != "keys"})
