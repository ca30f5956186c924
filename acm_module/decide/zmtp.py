"""ZMTP 3 spoken by the worker thread itself on the shared listening socket.

With libzmq a request crosses the worker's ZeroMQ I/O thread twice (receive and reply): two
thread wake-ups and an eventfd mailbox per direction, each costing tens of microseconds of
kernel time on a small VM. Here the worker thread accepts, reads and writes its connections
itself through one epoll set: a decision costs the worker one recv() per readable connection,
one send() per connection per batch, and the store round trip.

The peer side is unchanged: OpenSIPS (or any client) keeps its libzmq REQ or DEALER socket. This
side is a ROUTER as far as a peer can tell (Socket-Type ROUTER, NULL mechanism, ZMTP 3.0/3.1,
PING answered with PONG). Frames above the size limit close the connection, as ZMQ_MAXMSGSIZE
does. See RFC 23/ZMTP (https://rfc.zeromq.org/spec/23/) and 37/ZMTP for PING/PONG.

One peer cannot take the worker's memory or its service from the others (as libzmq's RCVHWM and
SNDHWM with socket backpressure do): a connection is read no further while it has IN_HWM
requests (or IN_BYTES) waiting or OUT_PAUSE bytes of replies it has not read, so a peer that
pipelines without reading blocks in its own send(); each readable connection gets one recv() per
poll; queued requests are taken round-robin, one per connection per turn; a connection whose
unread replies pass MAX_PENDING_OUT is closed; and the requests of a peer that hung up are
dropped undecided.

Equal connection counts do not make equal work: OpenSIPS's processes are very unequal (the
kernel hands most INVITEs to its first UDP workers). So a worker that serves clearly more than
its share hands one of its connections to the least-loaded live sibling (Handoff): the file
descriptor travels with SCM_RIGHTS over the siblings' AF_UNIX datagram inboxes, taken at a
quiescent point of the connection (handshake done, nothing buffered either way), so what the
peer sends meanwhile waits in the kernel for the new owner. Only these ZMTP workers do this;
libzmq owns its connections (worker_io = libzmq).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16
            + b"\x00" + b"\x00" * 31)
assert len(GREETING) == 64


def _command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return b"\x04" + bytes([len(data)]) + data
    return b"\x06" + len(data).to_bytes(8, "big") + data


READY = _command(b"READY", b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"ROUTER")
PEERS = frozenset({b"REQ", b"DEALER"})
MAX_FRAMES = 16  # frames in one message (envelope + body); more is a protocol abuse
MAX_PENDING_OUT = 4 << 20  # bytes of replies a peer that stopped reading may hold up
OUT_PAUSE = 256 * 1024  # unread reply bytes at which a connection is read no further
IN_HWM = 1000  # requests of one connection waiting for a decision (libzmq's default RCVHWM)
IN_BYTES = 1 << 20  # bytes of those requests
RECV_BYTES = 64 * 1024  # one recv() per readable connection per poll
BALANCE_POLL_S = 0.02  # while leaving new connections to less-loaded siblings, look this often
# Moving connections between workers (Handoff). Rates are requests/s, decayed with RATE_TAU_S.
RATE_TICK_S = 0.5  # the per-connection and per-worker rates are updated this often
RATE_TAU_S = 1.0
REBALANCE_MARGIN = 1.25  # a worker above this times the live workers' mean rate gives one away
REBALANCE_MIN_RATE = 50.0  # below this a worker never gives: an idle pool never shuffles
REBALANCE_EVERY_S = 1.0  # a worker considers a move at most this often
REBALANCE_CHECKS = 2  # over the margin at this many checks in a row: not a blip of the machine
MOVE_HOLD_S = 1.0  # after giving or receiving a connection, give none for this long
STAY_S = 10.0  # a connection that moved stays where it went this long (no ping-pong)

log = logging.getLogger("acm.worker")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP = select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP

# Connection states
_GREETING, _READY, _OPEN = 0, 1, 2


class ProtocolError(Exception):
    """A peer broke ZMTP; its connection is closed."""


def encode_message(env: list[bytes], body: bytes) -> bytes:
    """Encode one message (envelope frames, then the body) as ZMTP frames."""
    out = []
    for f in env:
        n = len(f)
        out.append((b"\x01" + bytes([n]) if n < 256 else b"\x03" + n.to_bytes(8, "big")) + f)
    n = len(body)
    out.append((b"\x00" + bytes([n]) if n < 256 else b"\x02" + n.to_bytes(8, "big")) + body)
    return b"".join(out)


class Conn:
    """One accepted peer."""

    __slots__ = ("buf", "count", "fd", "frames", "in_bytes", "inbox", "mask", "msg_bytes", "out",
                 "out_bytes", "queued", "rate", "reading", "sock", "state", "stay_until",
                 "want_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.state = _GREETING
        self.frames: list[bytes] = []
        self.msg_bytes = 0  # of the frames of the message being received
        self.inbox: deque[tuple[list[bytes], int]] = deque()  # (frames, bytes) to decide
        self.in_bytes = 0
        self.queued = False  # in the server's round-robin ring
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.want_out = False  # send() would block: wait for EPOLLOUT
        self.reading = True  # under its limits: EPOLLIN registered
        self.mask = _IN | select.EPOLLRDHUP
        self.count = 0  # requests received since the last rate tick
        self.rate = 0.0  # decayed requests/s
        self.stay_until = 0.0  # moved here: not moved again before this monotonic time


class Balance:
    """Connection counts and request rates of the pool's workers in shared memory.

    counts[i] is worker i's number of connections (-1: not accepting); heartbeat[i] the
    monotonic time of its last beat; rates[i] (when given) its decayed requests/s. A worker
    accepts only while no live sibling holds fewer connections, so connections made all at once
    (every OpenSIPS process at start-up, while one worker is awake) and connections made later
    both spread evenly; the rates say where a busy worker's connection should go (Handoff).
    """

    LIVE_S = 2.0  # a sibling silent this long is stuck or gone: it does not hold the others

    def __init__(self, counts: Any, heartbeat: Any, index: int, rates: Any = None) -> None:
        self.counts = counts
        self.heartbeat = heartbeat
        self.index = index
        self.rates = rates

    def publish(self, n: int) -> None:
        self.counts[self.index] = n

    def publish_rate(self, rate: float) -> None:
        if self.rates is not None:
            self.rates[self.index] = rate

    def _live(self) -> list[int]:
        """Return the live siblings that accept connections."""
        stale = time.monotonic() - self.LIVE_S
        return [j for j in range(min(len(self.counts), len(self.heartbeat)))
                if j != self.index and self.counts[j] >= 0 and self.heartbeat[j] > stale]

    def may_accept(self) -> bool:
        """Return True unless a live sibling holds fewer connections than this worker."""
        mine = self.counts[self.index]
        return not any(self.counts[j] < mine for j in self._live())

    def fewest_connections(self, given: dict[int, int]) -> int | None:
        """Return the live accepting sibling holding the fewest connections, counting those
        `given` to it that it may not have published yet (None if there is none)."""
        live = self._live()
        if not live:
            return None
        rates = self.rates
        return min(live, key=lambda j: (self.counts[j] + given.get(j, 0),
                                        rates[j] if rates is not None else 0.0))

    def least_loaded(self, mine: float) -> tuple[int, float, float] | None:
        """Return (slot, rate) of the live accepting sibling serving the fewest requests/s, and
        the mean rate of those siblings and this worker (whose rate is `mine`); None if alone."""
        if self.rates is None:
            return None
        live = self._live()
        if not live:
            return None
        rates = {j: self.rates[j] for j in live}
        slot = min(live, key=lambda j: (rates[j], self.counts[j]))
        return slot, rates[slot], (mine + sum(rates.values())) / (1 + len(live))


class Handoff:
    """Each worker's inbox for connections its siblings hand over (SCM_RIGHTS).

    One AF_UNIX datagram socket per worker slot, bound at `<directory>/<slot>` in a directory
    the supervisor created (mode 0700: only this user can hand anything in; made again should
    a /tmp cleaner have removed it), and one unbound socket to send from. A worker restarted in
    the same slot binds the path again; a dead worker's path refuses, and the sender keeps its
    connection. Sends never block: a full inbox refuses too. Raises OSError when the inbox
    cannot be bound.
    """

    _MAGIC = b"acm-handoff1"
    # The connection's decayed requests/s, and whether it moved for balance (it then stays
    # where it went for STAY_S) or because its worker retired (it may move again at once).
    _FORMAT = struct.Struct("!d?")

    def __init__(self, directory: str, slot: int) -> None:
        self.directory = directory
        self.path = self.path_of(slot)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by this slot's previous worker
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.path)
        self.inbox.setblocking(False)
        self.outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.outbox.setblocking(False)

    def path_of(self, slot: int) -> str:
        return os.path.join(self.directory, str(slot))

    def send(self, slot: int, fd: int, rate: float, stay: bool = True) -> bool:
        """Hand the descriptor to the worker in `slot`; return False if it cannot take it."""
        try:
            # sendmsg, not socket.send_fds: that one drops its flags and address arguments.
            self.outbox.sendmsg([self._MAGIC + self._FORMAT.pack(rate, stay)],
                                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))], 0,
                                self.path_of(slot))
        except OSError:  # gone (refused, no such path), or its inbox is full (EAGAIN)
            return False
        return True

    def receive(self) -> list[tuple[int, float, bool]]:
        """Return the (descriptor, rate) of every connection waiting in the inbox."""
        out: list[tuple[int, float, bool]] = []
        n = len(self._MAGIC) + self._FORMAT.size
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.inbox, 64, 4)
            except (BlockingIOError, InterruptedError):
                return out
            if flags & socket.MSG_CTRUNC:  # out of descriptors: the kernel closed the rest
                log.warning("a connection handed over was lost: out of descriptors")
            if len(data) == n and data.startswith(self._MAGIC) and len(fds) == 1:
                out.append((fds[0], *self._FORMAT.unpack_from(data, len(self._MAGIC))))
                continue
            for fd in fds:  # not ours: nothing to serve
                os.close(fd)

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class ZmtpServer:
    """Accept and serve ZMTP peers on a (shared, non-blocking) listening socket."""

    def __init__(self, listen_fd: int, max_frame: int, balance: Balance | None = None,
                 admit: Callable[[Any], bool] | None = None,
                 handoff: Handoff | None = None) -> None:
        self.listen = socket.socket(fileno=listen_fd)
        self.admit = admit  # given the peer address, says whether to serve it (allow_networks)
        self.listen.setblocking(False)
        self.max_frame = max_frame
        self.balance = balance
        self.ep = select.epoll()
        self.accepting = False  # registered for new connections
        self.draining = False  # stop_accepting() was called: never accept again
        self.resume_at = 0.0  # out of descriptors: accept again at this monotonic time
        self.conns: dict[int, Conn] = {}
        self.ready: deque[Conn] = deque()  # connections with requests queued, round-robin
        self.queued = 0  # requests queued over every connection
        self.dirty: list[Conn] = []
        self.rx_ns = 0  # when the last poll() found something (perf_counter_ns)
        self.accepted = 0
        self.dropped = 0  # connections closed for a protocol error or an oversize frame
        self.accept_pauses = 0  # times accepting paused for lack of descriptors
        self.read_pauses = 0  # times a connection was read no further (over its limits)
        # Moving busy connections to idler siblings (needs the balance's rates).
        if handoff is not None and balance is None:
            raise ValueError("a hand-off inbox needs the pool's balance")
        self.handoff = handoff
        self.handoffs_sent = 0
        self.handoffs_received = 0
        self.rate = 0.0  # this worker's decayed requests/s (the sum of its connections')
        now = time.monotonic()
        self._rate_at = now  # the last rate tick
        self._move_at = now + MOVE_HOLD_S  # no move before this
        self._over = 0  # checks in a row that found this worker over the margin
        self._given: dict[int, int] = {}  # connections handed to each slot while retiring
        self._inbox_fd = -1
        if self.handoff is not None:
            self._inbox_fd = self.handoff.inbox.fileno()
            self.ep.register(self._inbox_fd, _IN)
        self._publish()
        self._listen()

    def _listen(self) -> None:
        if not self.accepting:
            # EPOLLEXCLUSIVE: a new connection wakes one of the workers polling it, not all.
            self.ep.register(self.listen.fileno(), _IN | select.EPOLLEXCLUSIVE)
            self.accepting = True

    def _unlisten(self) -> None:
        if self.accepting:
            self.accepting = False
            self.ep.unregister(self.listen.fileno())

    def _publish(self) -> None:
        if self.balance is not None:
            self.balance.publish(-1 if self.draining or self.resume_at else len(self.conns))

    # -- receiving ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        """Wait up to timeout seconds for messages (0: just look); return how many are queued."""
        if self.queued:
            timeout = 0
        if not self.accepting and not self.draining:
            if self.resume_at and time.monotonic() >= self.resume_at:
                self.resume_at = 0.0
                self._publish()
            if not self.resume_at:
                if self.balance is None or self.balance.may_accept():
                    self._listen()
                else:
                    timeout = min(timeout, BALANCE_POLL_S)
        events = self.ep.poll(timeout)
        if events:
            self.rx_ns = time.perf_counter_ns()
        for fd, ev in events:
            conn = self.conns.get(fd)
            if conn is None:
                if self.accepting and fd == self.listen.fileno():
                    self._accept()
                elif fd == self._inbox_fd:
                    self._adopt()
                continue
            if ev & _HUP:
                # Gone (or half-closed, which no ZMTP peer does): what it still had queued
                # would be decided for nobody.
                self.close_conn(conn)
                continue
            if ev & _OUT:
                self._write(conn)
            if ev & _IN and conn.reading:
                self._read(conn)
        return self.queued

    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, addr = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays queued and the
                    # listening socket stays readable, so polling it now would spin. Serve the
                    # connections we have and try again in 100 ms (another worker may take it).
                    self._pause_accepting()
                    self.accept_pauses += 1
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPERM):
                    continue
                raise
            if self.admit is not None and not self.admit(addr):
                s.close()  # before the greeting: a refused peer learns nothing
                continue
            s.setblocking(False)
            if s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(s)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, conn.mask)
            self.accepted += 1
            self._send(conn, GREETING)
            if self.balance is not None:
                self._publish()
                if not self.balance.may_accept():
                    self._unlisten()  # a sibling holds fewer: the next one is its
                    return

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_conn(conn)
            return
        if not data:
            self.close_conn(conn)
            return
        self._feed(conn, conn.buf + data if conn.buf else data)

    def _feed(self, conn: Conn, data: bytes) -> None:
        try:
            used = self._parse(conn, data)
        except ProtocolError:
            self.dropped += 1
            self.close_conn(conn)
            return
        if conn.fd < 0:
            return
        conn.buf = data[used:] if used < len(data) else b""
        if conn.reading and (len(conn.inbox) >= IN_HWM or conn.in_bytes >= IN_BYTES
                             or conn.out_bytes >= OUT_PAUSE):
            conn.reading = False
            self.read_pauses += 1
            self._rearm(conn)

    def _maybe_resume(self, conn: Conn) -> None:
        """Read a paused connection again once it is well under its limits (hysteresis)."""
        if (conn.fd >= 0 and len(conn.inbox) <= IN_HWM // 2 and conn.in_bytes <= IN_BYTES // 2
                and conn.out_bytes <= OUT_PAUSE // 2):
            conn.reading = True
            self._rearm(conn)
            if conn.buf:  # complete messages may wait there; no EPOLLIN would announce them
                buf, conn.buf = conn.buf, b""
                self._feed(conn, buf)

    def _rearm(self, conn: Conn) -> None:
        mask = select.EPOLLRDHUP | (_IN if conn.reading else 0) | (_OUT if conn.want_out else 0)
        if mask != conn.mask and conn.fd >= 0:
            conn.mask = mask
            self.ep.modify(conn.fd, mask)

    def _parse(self, conn: Conn, data: bytes) -> int:
        """Consume what data holds; return how many bytes were used."""
        pos = 0
        n = len(data)
        if conn.state == _GREETING:
            if n < 64:
                if n >= 1 and data[0] != 0xFF:
                    raise ProtocolError("not a ZMTP peer")
                return 0
            if data[0] != 0xFF or not data[9] & 1 or data[10] < 3 or data[12:17] != b"NULL\x00":
                raise ProtocolError("unsupported greeting")
            pos = 64
            conn.state = _READY
            self._send(conn, READY)
        max_frame = self.max_frame
        frames = conn.frames
        inbox = conn.inbox
        # Room left under the connection's limits: past it, the rest waits in conn.buf and in
        # the kernel (the peer's send() blocks).
        room = IN_HWM - len(inbox) if conn.out_bytes < OUT_PAUSE else 0
        in_room = IN_BYTES - conn.in_bytes
        msg_bytes = conn.msg_bytes
        added = 0
        try:
            while pos < n:
                if not frames and (room <= 0 or in_room <= 0):
                    break
                flags = data[pos]
                if flags & 0x02:
                    if pos + 9 > n:
                        break
                    size = int.from_bytes(data[pos + 1:pos + 9], "big")
                    start = pos + 9
                else:
                    if pos + 2 > n:
                        break
                    size = data[pos + 1]
                    start = pos + 2
                if size > max_frame or flags & 0xF8:
                    raise ProtocolError("frame too large or bad flags")
                end = start + size
                if end > n:
                    break
                pos = end
                if flags & 0x04:
                    self._on_command(conn, data[start:end])
                    if conn.fd < 0:
                        return pos
                    continue
                if conn.state != _OPEN:
                    raise ProtocolError("message before READY")
                frames.append(data[start:end])
                msg_bytes += size
                if flags & 0x01:
                    if len(frames) > MAX_FRAMES:
                        raise ProtocolError("too many frames")
                    continue
                inbox.append((frames, msg_bytes))
                added += 1
                room -= 1
                in_room -= msg_bytes
                msg_bytes = 0
                frames = conn.frames = []
        finally:
            conn.msg_bytes = msg_bytes
            if added:
                conn.count += added  # per read, not per request: the rate tick needs no more
                conn.in_bytes = IN_BYTES - in_room
                self.queued += added
                if not conn.queued:
                    conn.queued = True
                    self.ready.append(conn)
        return pos

    def _on_command(self, conn: Conn, body: bytes) -> None:
        if not body:
            raise ProtocolError("empty command")
        name = body[1:1 + body[0]]
        if conn.state == _READY:
            if name != b"READY":
                raise ProtocolError("expected READY")
            props = _properties(body[1 + body[0]:])
            if props.get(b"Socket-Type") not in PEERS:
                raise ProtocolError("incompatible socket type")
            conn.state = _OPEN
        elif name == b"PING":
            # PING: ttl (2 bytes), context (up to 16 bytes) -> PONG with the same context.
            self._send(conn, _command(b"PONG", body[1 + body[0] + 2:][:16]))
        # Other commands (PONG, SUBSCRIBE, ...) mean nothing to a ROUTER: ignored.

    # -- replying ----------------------------------------------------------------------------
    def reply(self, conn: Conn, env: list[bytes], body: bytes) -> None:
        """Queue a reply; flush() sends it."""
        if conn.fd < 0:
            return  # the peer went away; its client applies its policy
        if not conn.out:
            self.dirty.append(conn)
        self._queue(conn, encode_message(env, body))

    def _queue(self, conn: Conn, data: bytes) -> None:
        """Queue bytes to send; close a peer whose unread bytes pass MAX_PENDING_OUT."""
        conn.out.append(data)
        conn.out_bytes += len(data)
        if conn.out_bytes > MAX_PENDING_OUT:
            self.dropped += 1  # it stopped reading long ago: its client gives up too
            self.close_conn(conn)

    def _send(self, conn: Conn, data: bytes) -> None:
        self._queue(conn, data)
        if not conn.want_out:
            self._write(conn)

    def flush(self) -> None:
        """Send every queued reply: one send() per connection."""
        dirty = self.dirty
        self.dirty = []
        for conn in dirty:
            if conn.fd >= 0 and not conn.want_out:
                self._write(conn)

    def _write(self, conn: Conn) -> None:
        if not conn.out or conn.fd < 0:
            return
        data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close_conn(conn)
            return
        if sent == len(data):
            conn.out = []
            conn.out_bytes = 0
            if conn.want_out:
                conn.want_out = False
                self._rearm(conn)
            if not conn.reading:
                self._maybe_resume(conn)
            return
        rest = data[sent:]
        conn.out = [rest]
        conn.out_bytes = len(rest)
        if not conn.want_out:
            conn.want_out = True
            self._rearm(conn)
        if conn.reading and conn.out_bytes >= OUT_PAUSE:
            conn.reading = False  # it is not reading its replies: stop reading its requests
            self.read_pauses += 1
            self._rearm(conn)
        elif not conn.reading:
            self._maybe_resume(conn)

    # -- moving connections between workers --------------------------------------------------
    def housekeep(self) -> None:
        """Between batches: update the rates and maybe hand a connection to a sibling."""
        if self.handoff is None:
            return
        now = time.monotonic()
        dt = now - self._rate_at
        if dt < RATE_TICK_S:
            return
        self._rate_at = now
        decay = 1.0 - math.exp(-dt / RATE_TAU_S)
        total = 0.0
        for conn in self.conns.values():
            conn.rate += decay * (conn.count / dt - conn.rate)
            conn.count = 0
            total += conn.rate
        self.rate = total
        assert self.balance is not None
        self.balance.publish_rate(total)
        if now >= self._move_at and not self.draining and not self.resume_at:
            self._move_at = now + REBALANCE_EVERY_S
            self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        """Hand one connection to the least-loaded sibling when this worker has served clearly
        more than its share at REBALANCE_CHECKS checks in a row and the move lowers the higher
        of the two rates."""
        assert self.balance is not None and self.handoff is not None
        mine = self.rate
        found = (self.balance.least_loaded(mine)
                 if mine >= REBALANCE_MIN_RATE and len(self.conns) >= 2 else None)
        if found is None or mine <= REBALANCE_MARGIN * found[2] or found[1] >= mine:
            self._over = 0
            return
        self._over += 1
        if self._over < REBALANCE_CHECKS:
            return
        slot, theirs, _ = found
        gap = mine - theirs
        # Moving rate c leaves max(mine - c, theirs + c): best at c = gap / 2; c must be under
        # the gap (else the sibling becomes the new maximum) and worth a move.
        best: Conn | None = None
        for conn in self.conns.values():
            c = conn.rate
            if (gap / 10 <= c < gap and now >= conn.stay_until and _quiescent(conn)
                    and (best is None or abs(c - gap / 2) < abs(best.rate - gap / 2))):
                best = conn
        if best is not None and self.hand_off(best, slot):
            self._move_at = now + MOVE_HOLD_S
            self._over = 0
            log.debug("handed a connection of %.0f requests/s to slot %d: %.0f -> %.0f/s here, "
                      "%.0f -> %.0f/s there (mean %.0f/s)", best.rate, slot, mine,
                      mine - best.rate, theirs, theirs + best.rate, found[2])
        # else nothing movable now, or the sibling cannot take it: try again later

    def hand_off(self, conn: Conn, slot: int, stay: bool = True) -> bool:
        """Hand a quiescent connection to the worker in `slot`; return False (and keep serving
        it) if it is not quiescent or that worker cannot take it.

        Call it between batches only: a request taken from the connection and not yet answered
        would have nobody to answer it.
        """
        assert self.handoff is not None and self.balance is not None
        if (conn.fd < 0 or not _quiescent(conn)
                or not self.handoff.send(slot, conn.fd, conn.rate, stay)):
            return False
        self.handoffs_sent += 1
        self.rate -= conn.rate
        self.balance.publish_rate(self.rate)
        # The descriptor travels in the datagram: close ours only, without shutdown().
        # (close_conn unregisters it first: epoll watches the open file, which lives on.)
        self.close_conn(conn)
        return True

    def hand_off_idle(self) -> int:
        """Hand every quiescent connection to the live siblings, fewest connections first;
        return how many went. A retiring worker calls it so that its peers keep their
        connections (a closed one would lose the request its peer sends next)."""
        if self.handoff is None or self.balance is None:
            return 0
        given = self._given
        moved = 0
        for conn in list(self.conns.values()):
            slot = self.balance.fewest_connections(given)
            if slot is None:
                break
            if _quiescent(conn) and self.hand_off(conn, slot, stay=False):
                given[slot] = given.get(slot, 0) + 1
                moved += 1
        return moved

    def _adopt(self) -> None:
        """Serve the connections siblings handed to this worker."""
        assert self.handoff is not None and self.balance is not None
        now = time.monotonic()
        for fd, rate, stay in self.handoff.receive():
            try:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
            except OSError:
                os.close(fd)
                continue
            conn = Conn(sock)
            conn.state = _OPEN  # past its handshake with the sibling: no greeting
            conn.rate = rate
            conn.stay_until = now + STAY_S if stay else 0.0
            self.conns[conn.fd] = conn
            # Level-triggered: what the peer sent during the move is read at the next poll.
            self.ep.register(conn.fd, conn.mask)
            self.handoffs_received += 1
            self.rate += rate
            self._move_at = max(self._move_at, now + MOVE_HOLD_S)
        self.balance.publish_rate(self.rate)
        self._publish()

    # -- lifecycle ---------------------------------------------------------------------------
    def take(self, n: int) -> list[tuple[Conn, list[bytes]]]:
        """Remove and return up to n queued messages: one per connection per turn, in order."""
        batch: list[tuple[Conn, list[bytes]]] = []
        ready = self.ready
        while ready and len(batch) < n:
            conn = ready.popleft()
            inbox = conn.inbox
            if not inbox:  # closed since (close_conn empties it)
                conn.queued = False
                continue
            frames, size = inbox.popleft()
            conn.in_bytes -= size
            batch.append((conn, frames))
            if inbox:
                ready.append(conn)
            else:
                conn.queued = False
            if not conn.reading:
                self._maybe_resume(conn)
        self.queued -= len(batch)
        return batch

    def stop_accepting(self) -> None:
        """Leave new connections to the other workers (the listening socket stays open)."""
        self.draining = True
        self._pause_accepting()

    def _pause_accepting(self) -> None:
        self._unlisten()
        if not self.draining:
            self.resume_at = time.monotonic() + 0.1
        self._publish()  # siblings must not wait for a worker that cannot accept

    def close_conn(self, conn: Conn) -> None:
        """Close one connection."""
        if conn.fd < 0:
            return
        self.conns.pop(conn.fd, None)
        try:
            self.ep.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()
        conn.fd = -1
        conn.out = []
        conn.out_bytes = 0
        # Its requests not yet taken are dropped undecided (the ring skips closed connections).
        self.queued -= len(conn.inbox)
        conn.inbox.clear()
        conn.in_bytes = 0
        conn.buf = b""
        self._publish()

    def close(self) -> None:
        """Flush what can be flushed, close every connection and the epoll set."""
        self.flush()
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        self.stop_accepting()
        self.ep.close()
        self.listen.close()  # this process's copy of the shared descriptor
        if self.handoff is not None:
            self.handoff.close()


def _quiescent(conn: Conn) -> bool:
    """Return True when a connection can change worker: past its handshake, with no request
    or partial frame buffered, no reply unsent, and read normally."""
    return (conn.state == _OPEN and not conn.inbox and not conn.buf and not conn.frames
            and not conn.out and not conn.queued and conn.reading and not conn.want_out)


def _properties(data: bytes) -> dict[bytes, bytes]:
    """Parse ZMTP metadata properties (name-len 1 byte, name, value-len 4 bytes, value)."""
    out: dict[bytes, bytes] = {}
    pos, n = 0, len(data)
    while pos < n:
        nl = data[pos]
        name = data[pos + 1:pos + 1 + nl]
        pos += 1 + nl
        if pos + 4 > n:
            raise ProtocolError("truncated property")
        vl = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + vl > n:
            raise ProtocolError("truncated property")
        out[name] = data[pos:pos + vl]
        pos += vl
    return out


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """Split a message into (envelope, body); body is None unless exactly one body frame.

    REQ peers send [b"", body]; DEALER peers [body] or [b"", body]; a proxy in between adds
    routing frames before the empty delimiter. The reply carries the envelope back.
    """
    try:
        i = frames.index(b"")
    except ValueError:
        return [], (frames[0] if len(frames) == 1 else None)
    body = frames[i + 1:]
    return frames[:i + 1], (body[0] if len(body) == 1 else None)
