"""Ask the worker pool for a verdict from the API's event loop: the same endpoint, contract,
rules, stream and writer as OpenSIPS's requests.

The API speaks ZMTP 3 to the pool itself, as a DEALER (NULL mechanism), on asyncio
connections: a request is one write() and its reply one read on the event loop, with no libzmq
I/O thread to wake in between (through zmq.asyncio the libzmq hand-offs cost the web process
more CPU than HTTP parsing; benchmarks/RESULTS.md §7). A few connections (the kernel spreads
them over the workers) carry many requests at once: each request carries its id as a routing
frame before the empty delimiter, which the worker echoes back (decide/zmtp.split_envelope).
Past `max_inflight` requests in flight a caller gets PoolBusy at once instead of queueing
without limit; a lost connection fails its requests and is re-made with backoff.

An endpoint with CURVE (`curve_server_key`: the workers use libzmq, and the NULL mechanism
above is refused) is asked through pyzmq DEALER sockets with CURVE instead (CurvePoolClient):
a fresh client key pair when any client key is admitted, else the service's own key pair, whose
public key must then be among `curve_client_keys` (docs/API.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import msgpack

from acm_module.decide.zmtp import GREETING, _command, _properties, encode_message

log = logging.getLogger("acm.web")

READY_DEALER = _command(b"READY", b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER")
MAX_REPLY = 1 << 20
_DELIM = b""

# Send one request (id, body); an awaitable when the socket's send must be awaited.
_Send = Callable[[bytes, bytes], Awaitable[Any] | None]


class PoolBusy(Exception):
    """Too many requests in flight."""


class PoolTimeout(TimeoutError):
    """The pool did not answer in time (or the connection was lost)."""


class _Link(asyncio.Protocol):
    """One ZMTP connection to the pool."""

    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.greeted = False
        self.open = False
        self.was_open = False
        self.frames: list[bytes] = []
        self.pending: dict[bytes, asyncio.Future[bytes]] = {}
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write().
        self.transport = transport  # type: ignore[assignment]
        transport.write(GREETING + READY_DEALER)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        try:
            if not self.greeted:
                if n < 64:
                    return
                if buf[0] != 0xFF or buf[10] < 3 or bytes(buf[12:17]) != b"NULL\x00":
                    raise ValueError("unsupported greeting")
                self.greeted, pos = True, 64
            while pos < n:
                flags = buf[pos]
                if flags & 0x02:
                    if pos + 9 > n:
                        break
                    size, start = int.from_bytes(buf[pos + 1:pos + 9], "big"), pos + 9
                else:
                    if pos + 2 > n:
                        break
                    size, start = buf[pos + 1], pos + 2
                if size > MAX_REPLY:
                    raise ValueError("reply frame too large")
                end = start + size
                if end > n:
                    break
                pos = end
                frame = bytes(buf[start:end])
                if flags & 0x04:
                    self._command(frame)
                elif flags & 0x01:
                    self.frames.append(frame)
                else:
                    frames, self.frames = self.frames, []
                    fut = self.pending.pop(frames[0], None) if frames else None
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except (ValueError, IndexError) as e:
            log.warning("pool connection dropped: %s", e)
            if self.transport is not None:
                self.transport.close()
            return
        del buf[:pos]

    def _command(self, body: bytes) -> None:
        name = body[1:1 + body[0]]
        if name == b"READY":
            props = _properties(body[1 + body[0]:])
            if props.get(b"Socket-Type") != b"ROUTER":
                raise ValueError("the pool is not a ROUTER")
            self.open = self.was_open = True
            self.client._ready(self)
        elif name == b"PING":
            assert self.transport is not None
            self.transport.write(_command(b"PONG", body[1 + body[0] + 2:][:16]))

    def send(self, rid: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(encode_message([rid, _DELIM], body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(PoolTimeout("connection to the pool lost"))
        self.pending.clear()
        self.client._lost(self)
        if not self.closed.done():
            self.closed.set_result(None)


class _Requests:
    """What both clients share: request ids, the bound on requests in flight, the timeout."""

    def __init__(self, endpoint: str, sockets: int, max_inflight: int, timeout: float) -> None:
        self.endpoint = endpoint
        self.sockets = sockets
        self.timeout = timeout
        self._free = max_inflight
        self._ids = itertools.count(1)
        self._rr = 0

    def _channel(self) -> tuple[dict[bytes, asyncio.Future[bytes]], _Send]:
        """Return where the next request's reply is awaited and how it is sent.

        Raises PoolTimeout."""
        raise NotImplementedError

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request map, return the reply map. Raises PoolBusy, PoolTimeout."""
        if self._free <= 0:
            raise PoolBusy("too many events in flight to the pool")
        pending, send = self._channel()
        rid = next(self._ids).to_bytes(8, "big")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        timer = loop.call_later(self.timeout, _expire, fut, self.timeout)
        pending[rid] = fut
        self._free -= 1
        try:
            sent = send(rid, msgpack.packb(req))
            if sent is not None:  # pyzmq's send is awaited; a ZMTP link writes at once
                await sent
            raw = await fut
        finally:
            timer.cancel()
            pending.pop(rid, None)
            self._free += 1
        reply: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        return reply


class PoolClient(_Requests):
    """Concurrent requests to the pool over `sockets` ZMTP connections."""

    def __init__(self, endpoint: str, sockets: int = 4, max_inflight: int = 1024,
                 timeout: float = 2.0) -> None:
        super().__init__(endpoint, sockets, max_inflight, timeout)
        self._links: list[_Link] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, wait: float = 2.0) -> None:
        """Open the connections (kept open and re-made in the background); wait up to `wait`
        seconds for the first one."""
        self._tasks = [asyncio.create_task(self._keep_link()) for _ in range(self.sockets)]
        deadline = asyncio.get_running_loop().time() + wait
        while not self._links and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        if self.endpoint.startswith("ipc://"):
            _, link = await loop.create_unix_connection(lambda: _Link(self),
                                                        self.endpoint[len("ipc://"):])
        else:
            u = urlparse(self.endpoint)
            _, link = await loop.create_connection(lambda: _Link(self), u.hostname, u.port)
        return link

    async def _keep_link(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                link = await self._connect()
            except OSError as e:
                log.debug("pool %s not reachable: %s", self.endpoint, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            await link.closed
            if link.was_open:  # a link that never got READY does not reset the backoff
                backoff = 0.05
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _ready(self, link: _Link) -> None:
        self._links.append(link)

    def _lost(self, link: _Link) -> None:
        with contextlib.suppress(ValueError):
            self._links.remove(link)

    def _channel(self) -> tuple[dict[bytes, asyncio.Future[bytes]], _Send]:
        if not self._links:
            raise PoolTimeout(f"no connection to the pool at {self.endpoint}")
        self._rr = (self._rr + 1) % len(self._links)
        link = self._links[self._rr]
        return link.pending, link.send

    async def close(self) -> None:
        """Close every connection and stop re-making them."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for link in list(self._links):
            if link.transport is not None:
                link.transport.close()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class CurvePoolClient(_Requests):
    """The same requests over pyzmq DEALER sockets speaking CURVE (libzmq does the crypto)."""

    def __init__(self, endpoint: str, curve: Any, sockets: int = 4, max_inflight: int = 1024,
                 timeout: float = 2.0) -> None:
        super().__init__(endpoint, sockets, max_inflight, timeout)
        self.curve = curve  # acm_module.decide.client.CurveKeys
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._socks: list[Any] = []
        self._readers: list[asyncio.Task[None]] = []
        self._ctx: Any = None

    async def start(self) -> None:
        """Connect the sockets and start one reader per socket."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        for _ in range(self.sockets):
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._socks.append(sock)
            self._readers.append(asyncio.create_task(self._read(sock)))

    async def _read(self, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart()
            fut = self._pending.pop(frames[0], None)
            if fut is not None and not fut.done():
                fut.set_result(frames[-1])

    def _channel(self) -> tuple[dict[bytes, asyncio.Future[bytes]], _Send]:
        self._rr = (self._rr + 1) % len(self._socks)
        sock = self._socks[self._rr]
        return self._pending, lambda rid, body: sock.send_multipart([rid, _DELIM, body])

    async def close(self) -> None:
        """Stop the readers and close the sockets."""
        for t in self._readers:
            t.cancel()
        for t in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for sock in self._socks:
            sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()


def pool_client(settings: Any) -> PoolClient | CurvePoolClient:
    """Return the client of the pool's endpoint that its settings call for."""
    sockets = max(2, 2 * settings.workers)
    if not getattr(settings, "curve_server_key", ""):
        return PoolClient(settings.endpoint, sockets=sockets,
                          max_inflight=settings.web_max_inflight)
    from acm_module.decide.access import Access
    from acm_module.decide.client import CurveKeys

    access = Access.from_settings(settings)
    assert access.server_public is not None and access.server_secret is not None
    if access.client_keys is None:
        curve = CurveKeys.load(settings.curve_server_key)  # a fresh client pair
    else:  # the service's own pair: its public key must be an authorised client key
        curve = CurveKeys(access.server_public, access.server_public, access.server_secret)
    return CurvePoolClient(settings.endpoint, curve, sockets=sockets,
                           max_inflight=settings.web_max_inflight)


def _expire(fut: asyncio.Future[bytes], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(PoolTimeout(f"no verdict from the pool within {timeout:g}s"))
