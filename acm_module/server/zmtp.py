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
"""

from __future__ import annotations

import errno
import select
import socket
import time

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
RECV_BYTES = 256 * 1024

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERRS = select.EPOLLERR | select.EPOLLHUP

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

    __slots__ = ("buf", "fd", "frames", "out", "sock", "state", "want_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.state = _GREETING
        self.frames: list[bytes] = []
        self.out: list[bytes] = []
        self.want_out = False


class ZmtpServer:
    """Accept and serve ZMTP peers on a (shared, non-blocking) listening socket."""

    def __init__(self, listen_fd: int, max_frame: int) -> None:
        self.listen = socket.socket(fileno=listen_fd)
        self.listen.setblocking(False)
        self.max_frame = max_frame
        self.ep = select.epoll()
        # EPOLLEXCLUSIVE: a new connection wakes one of the workers polling this socket, not all.
        self.ep.register(self.listen.fileno(), _IN | select.EPOLLEXCLUSIVE)
        self.accepting = True  # registered for new connections
        self.draining = False  # stop_accepting() was called: never accept again
        self.resume_at = 0.0  # out of descriptors: accept again at this monotonic time
        self.conns: dict[int, Conn] = {}
        self.inbox: list[tuple[Conn, list[bytes]]] = []
        self.dirty: list[Conn] = []
        self.rx_ns = 0  # when the last poll() found something (perf_counter_ns)
        self.accepted = 0
        self.dropped = 0  # connections closed for a protocol error or an oversize frame
        self.accept_pauses = 0  # times accepting paused for lack of descriptors

    # -- receiving ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        """Wait up to timeout seconds for messages (0: just look); return how many are queued."""
        if self.inbox:
            timeout = 0
        if self.resume_at and time.monotonic() >= self.resume_at:
            self.resume_at = 0.0
            if not self.draining:
                self.accepting = True
                self.ep.register(self.listen.fileno(), _IN | select.EPOLLEXCLUSIVE)
        events = self.ep.poll(timeout)
        if events:
            self.rx_ns = time.perf_counter_ns()
        for fd, ev in events:
            conn = self.conns.get(fd)
            if conn is None:
                if self.accepting and fd == self.listen.fileno():
                    self._accept()
                continue
            if ev & _OUT:
                self._write(conn)
            if ev & (_IN | _ERRS):
                self._read(conn)
        return len(self.inbox)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, _ = self.listen.accept()
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
            s.setblocking(False)
            if s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(s)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, _IN)
            self.accepted += 1
            conn.out.append(GREETING)
            self._write(conn)

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
        if conn.buf:
            data = conn.buf + data
        try:
            used = self._parse(conn, data)
        except ProtocolError:
            self.dropped += 1
            self.close_conn(conn)
            return
        conn.buf = data[used:] if used < len(data) else b""

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
            conn.out.append(READY)
            self._write(conn)
        max_frame = self.max_frame
        frames = conn.frames
        while pos < n:
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
                continue
            if conn.state != _OPEN:
                raise ProtocolError("message before READY")
            frames.append(data[start:end])
            if flags & 0x01:
                if len(frames) > MAX_FRAMES:
                    raise ProtocolError("too many frames")
                continue
            self.inbox.append((conn, frames))
            frames = conn.frames = []
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
            conn.out.append(_command(b"PONG", body[1 + body[0] + 2:][:16]))
            self._write(conn)
        # Other commands (PONG, SUBSCRIBE, ...) mean nothing to a ROUTER: ignored.

    # -- replying ----------------------------------------------------------------------------
    def reply(self, conn: Conn, env: list[bytes], body: bytes) -> None:
        """Queue a reply; flush() sends it."""
        if conn.fd < 0:
            return  # the peer went away; its client applies its policy
        if not conn.out:
            self.dirty.append(conn)
        conn.out.append(encode_message(env, body))

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
            if conn.want_out:
                conn.want_out = False
                self.ep.modify(conn.fd, _IN)
            return
        rest = data[sent:]
        if len(rest) > MAX_PENDING_OUT:
            self.dropped += 1
            self.close_conn(conn)
            return
        conn.out = [rest]
        if not conn.want_out:
            conn.want_out = True
            self.ep.modify(conn.fd, _IN | _OUT)

    # -- lifecycle ---------------------------------------------------------------------------
    def take(self, n: int) -> list[tuple[Conn, list[bytes]]]:
        """Remove and return up to n queued messages, oldest first."""
        if len(self.inbox) <= n:
            batch, self.inbox = self.inbox, []
            return batch
        batch = self.inbox[:n]
        del self.inbox[:n]
        return batch

    def stop_accepting(self) -> None:
        """Leave new connections to the other workers (the listening socket stays open)."""
        self.draining = True
        self._pause_accepting()

    def _pause_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            self.ep.unregister(self.listen.fileno())
        if not self.draining:
            self.resume_at = time.monotonic() + 0.1

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

    def close(self) -> None:
        """Flush what can be flushed, close every connection and the epoll set."""
        self.flush()
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        self.stop_accepting()
        self.ep.close()
        self.listen.close()  # this process's copy of the shared descriptor


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
