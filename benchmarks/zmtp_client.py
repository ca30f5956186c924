"""Cheap load clients for `acm bench`: many logical OpenSIPS-like clients from one process.

Each logical client is one connection speaking ZMTP 3 as a REQ peer (NULL mechanism, one request
in flight, `[b"", body]` out, `[b"", reply]` back), so the service sees exactly what it sees
from an OpenSIPS process's libzmq REQ socket. One process drives many of them through one epoll
set on plain non-blocking sockets: no libzmq I/O thread, no per-client process, a request costs
the load tool a send(), a share of a recv() and of an epoll_wait(), and a few microseconds of
Python. Any ZMTP 3 ROUTER answers it (the workers' own ZMTP, a libzmq ROUTER or zmq.proxy).
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from array import array
from collections import deque
from typing import Any
from urllib.parse import urlparse

import msgpack

# Greeting: signature, version 3.0, NULL mechanism, as-server 0 (RFC 23/ZMTP).
GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16
            + b"\x00" + b"\x00" * 31)
_READY_BODY = b"\x05READY" + b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"REQ"
READY_REQ = b"\x04" + bytes([len(_READY_BODY)]) + _READY_BODY
DELIM = b"\x01\x00"  # REQ's empty delimiter frame, MORE set
REPLY_TIMEOUT_S = 2.0


def connect(endpoint: str, timeout: float = 5.0) -> socket.socket:
    """Open one REQ-peer connection and finish the ZMTP handshake; return it non-blocking.

    Raises OSError (including TimeoutError) when the peer does not complete the handshake.
    """
    if endpoint.startswith("ipc://"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: Any = endpoint[len("ipc://"):]
    else:
        u = urlparse(endpoint)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        addr = (u.hostname or "127.0.0.1", u.port)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        s.sendall(GREETING + READY_REQ)
        buf = b""
        while True:  # the peer's greeting, then its READY command
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("peer closed during the ZMTP handshake")
            buf += chunk
            if len(buf) < 66:
                continue
            flags = buf[64]
            if flags & 0x02:
                if len(buf) < 73:
                    continue
                end = 73 + int.from_bytes(buf[65:73], "big")
            else:
                end = 66 + buf[65]
            if len(buf) >= end:
                if len(buf) > end:
                    raise ConnectionError("peer sent data before a request")
                break
    except BaseException:
        s.close()
        raise
    s.setblocking(False)
    return s


def frame(body: bytes) -> bytes:
    """Return one request as REQ sends it: the empty delimiter, then the body."""
    n = len(body)
    if n < 256:
        return DELIM + b"\x00" + bytes([n]) + body
    return DELIM + b"\x02" + n.to_bytes(8, "big") + body


def parse(buf: bytes) -> tuple[list[bytes], int]:
    """Return the complete messages' last frames in buf and how many bytes they used."""
    out: list[bytes] = []
    pos = done = 0
    n = len(buf)
    while pos < n:
        flags = buf[pos]
        if flags & 0x02:
            if pos + 9 > n:
                break
            size = int.from_bytes(buf[pos + 1:pos + 9], "big")
            start = pos + 9
        else:
            if pos + 2 > n:
                break
            size = buf[pos + 1]
            start = pos + 2
        end = start + size
        if end > n:
            break
        pos = end
        if flags & 0x04:  # a command (PING...): nothing for a REQ peer to do
            done = pos
            continue
        if not flags & 0x01:
            out.append(buf[start:end])
            done = pos
    return out, done


class Requests:
    """Decision requests as OpenSIPS sends them: many B-numbers, fresh Call-IDs, no ts."""

    def __init__(self, seed: int, b_pool: int, size: int = 8192) -> None:
        rng = random.Random(seed)
        self.a = [f"+23481{rng.randrange(10**8):08d}" for _ in range(size)]
        self.b = [f"+23480{rng.randrange(b_pool):08d}" for _ in range(size)]
        self.mask = size - 1
        self.tag = f"bench-{seed}-"
        self.i = 0

    def next(self) -> bytes:
        i = self.i = self.i + 1
        return frame(msgpack.packb({"call_id": self.tag + str(i), "a": self.a[i & self.mask],
                                    "b": self.b[(i * 7919) & self.mask]}))


class Outcome:
    """What one client process measured."""

    def __init__(self) -> None:
        self.lat = array("q")  # ns per answered request
        self.errors = 0  # error replies and timeouts
        self.unavailable = 0  # store_unavailable replies (calls that went through unchecked)
        self.timeouts = 0
        self.codes: dict[str, int] = {}  # error replies by code
        self.cpu_s = 0.0  # this process's CPU over the measured span
        self.wall_s = 0.0

    def error(self, body: bytes) -> None:
        """Count an error reply by its code."""
        self.errors += 1
        try:
            code = str(msgpack.unpackb(body).get("error"))
        except (ValueError, AttributeError):
            code = "unreadable"
        self.codes[code] = self.codes.get(code, 0) + 1
        if code == "store_unavailable":
            self.unavailable += 1

    def dump(self) -> tuple:
        return (self.lat.tobytes(), self.errors, self.unavailable, self.timeouts, self.cpu_s,
                self.wall_s, self.codes)


class _Conn:
    __slots__ = ("buf", "fd", "sock", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.t0 = 0  # ns: when the request in flight was sent (or scheduled); 0 = idle


def run(endpoint: str, clients: int, seconds: float, rate: float, b_pool: int, seed: int,
        warmup: int, start: Any = None) -> Outcome:
    """Drive `clients` logical clients for `seconds`; return the outcome.

    rate = 0: closed loop, each client sends its next request as soon as its reply arrives.
    rate > 0: open loop, requests scheduled every 1/rate s on whichever client is idle, latency
    counted from the scheduled time (a stall is not hidden); when every client is busy the
    request waits for one, as a call waits for a free OpenSIPS process.
    """
    reqs = Requests(seed, b_pool)
    conns = [_Conn(connect(endpoint)) for _ in range(clients)]
    by_fd = {c.fd: c for c in conns}
    ep = select.epoll()
    for c in conns:
        ep.register(c.fd, select.EPOLLIN)
    out = Outcome()
    try:
        _loop(ep, by_fd, conns, reqs, 0.0, float(warmup) / max(clients, 1), Outcome(), True)
        if start is not None:
            start.wait()
        cpu0, w0 = time.process_time(), time.perf_counter()
        _loop(ep, by_fd, conns, reqs, rate, seconds, out, False)
        out.cpu_s, out.wall_s = time.process_time() - cpu0, time.perf_counter() - w0
    finally:
        ep.close()
        for c in conns:
            c.sock.close()
    return out


def _loop(ep: select.epoll, by_fd: dict[int, _Conn], conns: list[_Conn], reqs: Requests,
          rate: float, span: float, out: Outcome, count_mode: bool) -> None:
    """Run one phase: `span` seconds, or (count_mode) `span` round trips per client."""
    now = time.perf_counter_ns
    lat = out.lat
    interval = int(1e9 / rate) if rate > 0 else 0
    idle: deque[_Conn] = deque()
    t_start = now()
    t_end = t_start + int(span * 1e9) if not count_mode else 1 << 62
    quota = int(span * len(conns)) if count_mode else 1 << 62
    sent = 0
    next_at = t_start
    late = 0  # scheduled requests waiting for an idle client (open loop)
    if interval:
        idle.extend(conns)
    else:
        for c in conns:
            c.t0 = now()
            c.sock.send(reqs.next())
            sent += 1
    in_flight = 0 if interval else len(conns)
    last_progress = now()
    epr = [ep.fileno()]
    while True:
        t = now()
        if interval:
            while next_at <= t and next_at < t_end:
                late += 1
                next_at += interval
            while late and idle:
                c = idle.popleft()
                c.t0 = next_at - late * interval  # the scheduled time of the oldest one
                late -= 1
                c.sock.send(reqs.next())
                in_flight += 1
            if t >= t_end and not in_flight:
                break
            # Sleep until the next scheduled request, or until a reply arrives.
            wait = min((next_at - t) / 1e9, 0.05) if next_at < t_end else 0.05
        else:
            if not in_flight:
                break
            wait = 0.05
        if interval:
            # epoll_wait counts whole milliseconds; select() on the epoll descriptor waits to
            # the microsecond, so a scheduled request leaves on time.
            events = ep.poll(0) if select.select(epr, (), (), max(wait, 0.0))[0] else []
        else:
            events = ep.poll(wait)
        t = now()
        if not events:
            if in_flight and t - last_progress > REPLY_TIMEOUT_S * 1e9:
                out.errors += in_flight  # the service stopped answering: count, stop
                out.timeouts += in_flight
                return
            continue
        last_progress = t
        for fd, _ in events:
            c = by_fd[fd]
            data = c.sock.recv(65536)
            if not data:
                raise ConnectionError("the service closed a client connection")
            if c.buf:
                data = c.buf + data
            msgs, used = parse(data)
            c.buf = data[used:]
            for body in msgs:
                lat.append(t - c.t0)
                if body[:8].find(b"error") >= 0:
                    out.error(body)
                in_flight -= 1
                if interval:
                    c.t0 = 0
                    idle.append(c)
                elif t < t_end and sent < quota:
                    c.t0 = t
                    c.sock.send(reqs.next())
                    sent += 1
                    in_flight += 1


def client_proc(endpoint: str, clients: int, seconds: float, rate: float, b_pool: int,
                warmup: int, start: Any, q: Any) -> None:
    """A load process (multiprocessing target): run() and put the outcome on q."""
    from benchmarks.loadtool import _die_with_parent

    _die_with_parent()
    try:
        out = run(endpoint, clients, seconds, rate, b_pool, os.getpid(), warmup, start)
        q.put(out.dump())
    except Exception as e:  # reported by the parent, which must not wait forever
        q.put(e)
