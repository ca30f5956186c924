"""Ask the worker pool for a verdict from the API's event loop: the same ZeroMQ endpoint, contract,
rules, stream and writer as OpenSIPS's requests.

A few DEALER sockets (one connection each, so the kernel spreads them over the workers) carry
many requests at once; each request carries its id as a routing frame before the empty
delimiter, which the worker echoes back (server/zmtp.split_envelope). A semaphore bounds the
requests in flight: past `web_max_inflight` a caller gets PoolBusy at once instead of queueing
without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger("acm.web")


class PoolBusy(Exception):
    """Too many requests in flight."""


class PoolTimeout(TimeoutError):
    """The pool did not answer in time."""


class PoolClient:
    """Concurrent requests to the pool over `sockets` DEALER connections."""

    def __init__(self, endpoint: str, sockets: int = 4, max_inflight: int = 1024,
                 timeout: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.ctx = zmq.asyncio.Context()
        self.socks: list[zmq.asyncio.Socket] = []
        for _ in range(sockets):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            self.socks.append(s)
        self._next = itertools.cycle(self.socks)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._free = max_inflight
        self._readers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start one reader task per socket (call from the event loop)."""
        self._readers = [asyncio.create_task(self._read(s)) for s in self.socks]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                log.warning("pool reply socket failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            fut = self._pending.pop(frames[0], None)
            if fut is not None and not fut.done():
                fut.set_result(frames[-1])

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request map, return the reply map. Raises PoolBusy, PoolTimeout."""
        if self._free <= 0:
            raise PoolBusy(f"more than {len(self._pending)} events in flight")
        self._free -= 1
        rid = next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await next(self._next).send_multipart([rid, b"", msgpack.packb(req)])
            try:
                raw = await asyncio.wait_for(fut, self.timeout)
            except TimeoutError as e:
                raise PoolTimeout(f"no verdict from the pool within {self.timeout:g}s") from e
        finally:
            self._pending.pop(rid, None)
            self._free += 1
        reply: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        return reply

    async def close(self) -> None:
        """Stop the readers and close the sockets."""
        for t in self._readers:
            t.cancel()
        for t in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()
