"""Ask the acm detection service about each initial INVITE, from inside OpenSIPS.

Loaded by the OpenSIPS `python` module (3.x)::

    loadmodule "python.so"
    modparam("python", "script_name", "/etc/opensips/acm_opensips.py")

The module imports this file, calls the module-level `mod_init()` (the `mod_init_function`
modparam) once in the attendant BEFORE it forks, keeps the object it returns, calls its
`child_init(rank)` in every process, and runs `python_exec("acm_check_fields", FIELDS)` as
`Module.acm_check_fields(msg, fields)` (one packed argument in, one packed `$var(acm)` out; see
opensips.cfg), or the older `python_exec("acm_check"[, "trunk"])` as
`Module.acm_check(msg[, trunk])` (four reads and five `$var` writes per call).

Everything that talks to the service lives in `AcmClient`, which needs no OpenSIPS and is what
the tests drive; `Module` only reads the SIP message and writes `$var`s.

Runs on the system Python with nothing beyond the stdlib, pyzmq and msgpack.

Settings (defaults < config file < environment), see `SETTINGS`:

    ACM_ENDPOINT               ipc:///run/acm/acm.sock
    ACM_TIMEOUT_MS             50      whole request/reply budget
    ACM_FAIL_POLICY            open    open = allow, closed = drop when there is no verdict
    ACM_BREAKER_FAILURES       3       consecutive failures that open the breaker
    ACM_BREAKER_COOLDOWN_MS    1000    first open period; doubles per failed trial
    ACM_BREAKER_MAX_COOLDOWN_MS 30000  cap of the open period
    ACM_LOG_INTERVAL_S         10      at most one log line per kind of trouble per interval
    ACM_TRANSPORT              zmtp    zmtp = speak ZMTP 3 on a blocking unix/TCP socket from
                                       this process; libzmq = a pyzmq REQ socket (its I/O
                                       thread costs two thread wake-ups per call)
    ACM_CURVE_SERVER_KEY       (none)  the service's public key file (its NAME.key from
                               `acm keys generate`): set, the socket speaks CurveZMQ
    ACM_CURVE_CLIENT_KEY       (none)  this client's NAME.key_secret (needed when the service
                               lists authorised client keys); unset, a fresh pair per start
    ACM_OPENSIPS_CONFIG        /etc/acm/acm_opensips.conf  (``key = value`` lines, keys as
                               above without the ACM_ prefix, lower case; optional file)
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]
import zmq

try:  # only importable inside OpenSIPS
    from OpenSIPS import LM_ERR as _LM_ERR  # type: ignore[import-not-found]
except ImportError:
    _LM_ERR = None

__all__ = [
    "SETTINGS",
    "AcmClient",
    "Config",
    "ConfigError",
    "Module",
    "Verdict",
    "mod_init",
]

DEFAULT_CONFIG_PATH = "/etc/acm/acm_opensips.conf"

# Error codes the service sends when it refused *this request* (it is alive and answering):
# they yield the policy verdict and get logged, but do not count against the breaker, or a
# caller sending odd headers could trip it and switch everyone to the policy verdict.
REQUEST_ERRORS = frozenset({
    "bad_request", "bad_msgpack", "not_a_map", "unknown_field", "duplicate_field", "bad_type",
    "bad_value", "missing_field", "too_large",
})

# The pool answers this at once while its store is down or slow; the call gets the policy
# verdict, but the breaker stays closed (see AcmClient._check).
STORE_UNAVAILABLE = "store_unavailable"

# Field limits of the service (bytes of UTF-8); longer values are cut here so that a crafted
# Call-ID or From cannot turn a call into a refused request, i.e. into the policy verdict.
_MAX_BYTES = {"call_id": 256, "a": 256, "b": 256, "src_ip": 64, "trunk": 128}

# What pv_printf() renders for an unset pseudo-variable.
_PV_NULL = "<null>"


class ConfigError(ValueError):
    """A setting has an invalid value."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _positive(v: float) -> None:
    if not v > 0:
        raise ValueError("must be > 0")


def _policy(v: str) -> None:
    if v not in ("open", "closed"):
        raise ValueError("must be 'open' or 'closed'")


def _transport(v: str) -> None:
    if v not in ("zmtp", "libzmq"):
        raise ValueError("must be 'zmtp' or 'libzmq'")


def _endpoint(v: str) -> None:
    if not v.startswith(("ipc://", "tcp://")):
        raise ValueError("must start with ipc:// or tcp://")


class Setting(NamedTuple):
    """One setting: config-file key, type, default, environment variable, check, description."""

    name: str
    type: type
    default: Any
    env: str
    validator: Callable[[Any], None] | None
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting("endpoint", str, "ipc:///run/acm/acm.sock", "ACM_ENDPOINT", _endpoint,
            "ZeroMQ endpoint of the detection service (ipc:// or tcp://)."),
    Setting("timeout_ms", float, 50.0, "ACM_TIMEOUT_MS", _positive,
            "Budget of one request/reply, connection wait included."),
    Setting("fail_policy", str, "open", "ACM_FAIL_POLICY", _policy,
            "Verdict without an answer: open = allow, closed = drop."),
    Setting("breaker_failures", int, 3, "ACM_BREAKER_FAILURES", _positive,
            "Consecutive failures that open the circuit breaker."),
    Setting("breaker_cooldown_ms", float, 1000.0, "ACM_BREAKER_COOLDOWN_MS", _positive,
            "First open period of the breaker; doubles after each failed trial."),
    Setting("breaker_max_cooldown_ms", float, 30000.0, "ACM_BREAKER_MAX_COOLDOWN_MS", _positive,
            "Longest open period of the breaker."),
    Setting("log_interval_s", float, 10.0, "ACM_LOG_INTERVAL_S", None,
            "At most one log line per kind of trouble and process in this interval."),
    Setting("transport", str, "zmtp", "ACM_TRANSPORT", _transport,
            "zmtp = this process speaks ZMTP 3 on a blocking socket (no libzmq I/O thread); "
            "libzmq = a pyzmq REQ socket."),
    Setting("curve_server_key", str, "", "ACM_CURVE_SERVER_KEY", None,
            "The service's CurveZMQ public key file; set, requests go over CURVE."),
    Setting("curve_client_key", str, "", "ACM_CURVE_CLIENT_KEY", None,
            "This client's CurveZMQ .key_secret file; unset, a pair is made at start."),
)


@dataclass(frozen=True, slots=True)
class Config:
    """The client settings; build one with `Config.load()`."""

    endpoint: str = "ipc:///run/acm/acm.sock"
    timeout_ms: float = 50.0
    fail_policy: str = "open"
    breaker_failures: int = 3
    breaker_cooldown_ms: float = 1000.0
    breaker_max_cooldown_ms: float = 30000.0
    log_interval_s: float = 10.0
    transport: str = "zmtp"
    curve_server_key: str = ""
    curve_client_key: str = ""

    @classmethod
    def load(cls, path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
        """Read defaults, then the config file (if present), then the environment.

        Raises ConfigError on an unknown key or an invalid value, so a typo stops OpenSIPS at
        start-up instead of silently changing the policy.
        """
        env = os.environ if environ is None else environ
        if path is None:
            path = env.get("ACM_OPENSIPS_CONFIG", DEFAULT_CONFIG_PATH)
        raw: dict[str, str] = {}
        if path and os.path.exists(path):
            raw.update(_read_conf(path))
        for s in SETTINGS:
            if s.env in env:
                raw[s.name] = env[s.env]
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if s.name not in raw:
                continue
            text = raw[s.name].strip()
            try:
                v = s.type(text.lower() if s.name in ("fail_policy", "transport") else text)
                if s.validator is not None:
                    s.validator(v)
            except ValueError as e:
                raise ConfigError(f"acm setting {s.name}={text!r}: {e}") from e
            values[s.name] = v
        cfg = cls(**values)
        if cfg.breaker_max_cooldown_ms < cfg.breaker_cooldown_ms:
            raise ConfigError("acm setting breaker_max_cooldown_ms is below breaker_cooldown_ms")
        if cfg.curve_client_key and not cfg.curve_server_key:
            raise ConfigError("acm setting curve_client_key needs curve_server_key")
        cfg.curve_keys()  # an unreadable key file stops OpenSIPS at start, not every call
        return cfg

    def curve_keys(self) -> tuple[bytes, bytes, bytes] | None:
        """Return (server public, client public, client secret), or None without CURVE.

        Raises ConfigError when a key file cannot be read.
        """
        if not self.curve_server_key:
            return None
        from zmq.auth.certs import load_certificate

        try:
            server, _ = load_certificate(self.curve_server_key)
            if self.curve_client_key:
                public, secret = load_certificate(self.curve_client_key)
                if secret is None:
                    raise ValueError("no secret-key (give the .key_secret file)")
            else:
                public, secret = zmq.curve_keypair()
        except (OSError, ValueError) as e:
            raise ConfigError(f"acm CURVE key: {e}") from e
        return server, public, secret


def _read_conf(path: str) -> dict[str, str]:
    """Parse ``key = value`` lines ('#' comments). Raises ConfigError on a bad line or key."""
    known = {s.name for s in SETTINGS}
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            key = key.strip().lower()
            if not sep or key not in known:
                raise ConfigError(f"{path}:{n}: expected 'key = value' with key in {sorted(known)}")
            out[key] = value.strip().strip("\"'")
    return out


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def _default_sink(line: str) -> None:
    if _LM_ERR is not None:
        _LM_ERR(line)
    else:
        sys.stderr.write(line)
        sys.stderr.flush()


class RateLimitedLog:
    """Log at most one line per key and interval, counting what was held back."""

    def __init__(self, interval_s: float, sink: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._sink = sink or _default_sink
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """Return None when a line for `key` went out within the interval (counted as held
        back), else how many were held back since the last one (and start a new interval)."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def __call__(self, key: str, message: str) -> None:
        """Emit `message` unless a line for `key` went out within the interval; never raise."""
        held = self.due(key)
        if held is None:
            return
        suffix = f" ({held} similar suppressed)" if held else ""
        line = f"acm[{os.getpid()}]: {message}{suffix}\n".replace("\x00", "")
        with contextlib.suppress(Exception):  # logging must never change a verdict
            self._sink(line)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class Verdict(NamedTuple):
    """A decision for one call; `policy` is True when it came from the fail policy.

    A NamedTuple: built on every call, and a frozen dataclass's __init__ costs several times
    a tuple's.
    """

    verdict: str
    reason: str
    distinct: int = 0
    alert_id: str = ""
    severity: str = ""
    policy: bool = False

    @property
    def allow(self) -> bool:
        """Return True when the call may proceed."""
        return self.verdict == "allow"


class _Unavailable(Exception):
    """No reply within the budget, or the socket failed."""


class _ServiceError(Exception):
    """The service answered with an error or with something that is not a verdict."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Stats:
    """Per-process counters (reset in each new process)."""

    requests: int = 0          # check() calls
    sent: int = 0              # requests put on a socket
    replies: int = 0           # verdicts received
    timeouts: int = 0
    service_errors: int = 0
    request_errors: int = 0
    short_circuits: int = 0    # answered by the open breaker without I/O
    sockets_built: int = 0
    sockets_discarded: int = 0
    breaker_opened: int = 0


# ---------------------------------------------------------------------------------------------
# Transports: how one request reaches the service and its reply comes back
# ---------------------------------------------------------------------------------------------


class _Stale(Exception):
    """A kept connection turned out closed before any reply byte came back."""


# ZMTP 3.0 (RFC 23/ZMTP): greeting with the NULL mechanism, then READY with our socket type.
_GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16
             + b"\x00" + b"\x00" * 31)
_READY_REQ = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x03REQ"
_PEER_TYPES = (b"ROUTER", b"REP")
_DELIMITER = b"\x01\x00"      # the empty frame a REQ puts before the body (MORE flag)
_SHORT_REPLY = _DELIMITER + b"\x00"  # ... then a last frame of fewer than 256 bytes
_MAX_REPLY = 64 * 1024        # bytes in one reply frame; a verdict is ~100
_RECV_BYTES = 8192
_SLACK_S = 0.001              # SO_RCVTIMEO is re-set only when the budget moved more than this


class _ZmtpReq:
    """A ZMTP 3 REQ peer on a blocking unix/TCP socket, driven by the calling process itself.

    libzmq carries every message through its I/O thread: the request wakes that thread, the
    reply wakes it and then the caller, so a call costs the OpenSIPS process two thread
    wake-ups (and their eventfd and epoll calls) on top of its socket I/O. Here the process
    writes the request and sleeps in recv() until the reply is there. The wire is what a libzmq
    REQ socket sends (NULL mechanism, Socket-Type REQ, [empty delimiter, body]), so the service,
    or any ROUTER/REP, sees no difference.
    """

    def __init__(self, config: Config, stats: Stats) -> None:
        self.endpoint = config.endpoint
        self.timeout_ms = config.timeout_ms
        self.stats = stats
        self.sock: socket.socket | None = None
        self._rcvtimeo = 0.0

    @property
    def connected(self) -> bool:
        """Whether a connection is kept for the next request."""
        return self.sock is not None

    def request(self, payload: bytes, deadline: float, clock: Callable[[], float]) -> bytes:
        """Send one request and return its reply body. Raises _Unavailable."""
        n = len(payload)
        msg = _DELIMITER + (b"\x00" + bytes((n,)) if n < 256
                            else b"\x02" + n.to_bytes(8, "big")) + payload
        kept = self.sock is not None
        if not kept:
            self._connect(deadline, clock)
        try:
            return self._exchange(msg, deadline, clock)
        except _Stale as e:
            # The service closed the kept connection while it was idle (restart, worker
            # replaced): once more on a new one. Harmless if it did get the request: the
            # service answers a repeated Call-ID with the same verdict.
            self.discard()
            if not kept:
                raise _Unavailable(f"connection closed by the service ({e})") from None
        self._connect(deadline, clock)
        try:
            return self._exchange(msg, deadline, clock)
        except _Stale as e:
            self.discard()
            raise _Unavailable(f"connection closed by the service ({e})") from None

    def _connect(self, deadline: float, clock: Callable[[], float]) -> None:
        remaining = deadline - clock()
        if remaining <= 0:
            raise _Unavailable(f"timeout after {self.timeout_ms:g} ms")
        ep = self.endpoint
        try:
            if ep.startswith("ipc://"):
                path = ep[6:]
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                addr: Any = "\0" + path[1:] if path.startswith("@") else path
            else:
                host, _, port = ep[6:].rpartition(":")
                host = host.strip("[]")
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                addr = (host, int(port))
        except (OSError, ValueError) as e:
            raise _Unavailable(f"bad endpoint {ep!r}: {e}") from None
        try:
            s.settimeout(remaining)
            try:
                s.connect(addr)
            except OSError as e:
                raise _Unavailable(f"not connected: {e.strerror or e}") from None
            if s.family != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(_GREETING + _READY_REQ)
            self._handshake(s, deadline, clock)
            s.settimeout(None)  # blocking; SO_RCVTIMEO/SO_SNDTIMEO bound each call instead
            budget = self.timeout_ms / 1000.0
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(budget))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(budget))
            self._rcvtimeo = budget
        except _Unavailable:
            s.close()
            raise
        except (OSError, ValueError) as e:
            s.close()
            raise _Unavailable(f"handshake failed: {e}") from None
        self.sock = s
        self.stats.sockets_built += 1

    def _handshake(self, s: socket.socket, deadline: float, clock: Callable[[], float]) -> None:
        """Read the peer's greeting and READY; raise ValueError unless it is a ROUTER/REP."""
        buf = b""
        while True:
            if len(buf) >= 66:
                if buf[0] != 0xFF or not buf[9] & 1 or buf[10] < 3 or buf[12:17] != b"NULL\x00":
                    raise ValueError("the peer is not a ZMTP 3 peer with the NULL mechanism")
                flags = buf[64]
                if flags not in (0x04, 0x06):
                    raise ValueError("the peer sent no READY command")
                if flags == 0x04:
                    start, size = 66, buf[65]
                elif len(buf) >= 73:
                    start, size = 73, int.from_bytes(buf[65:73], "big")
                else:
                    start, size = 0, 0
                if start and size > 4096:
                    raise ValueError("oversize READY command")
                if start and len(buf) >= start + size:
                    body = buf[start:start + size]
                    if body[:6] != b"\x05READY":
                        raise ValueError("the peer sent no READY command")
                    kind = _properties(body[6:]).get(b"Socket-Type")
                    if kind not in _PEER_TYPES:
                        raise ValueError(f"peer socket type {kind!r} cannot answer a REQ")
                    if len(buf) > start + size:
                        raise ValueError("the peer sent a message before any request")
                    return
            remaining = deadline - clock()
            if remaining <= 0:
                raise _Unavailable(f"timeout after {self.timeout_ms:g} ms (handshake)")
            s.settimeout(remaining)
            try:
                data = s.recv(_RECV_BYTES)
            except TimeoutError:
                raise _Unavailable(f"timeout after {self.timeout_ms:g} ms (handshake)") from None
            if not data:
                raise ValueError("connection closed during the handshake")
            buf += data

    def _exchange(self, msg: bytes, deadline: float, clock: Callable[[], float]) -> bytes:
        sock = self.sock
        assert sock is not None
        try:
            sock.sendall(msg, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise _Stale(e.strerror) from None
        except OSError as e:  # BlockingIOError: SO_SNDTIMEO expired (the service stopped reading)
            self.discard()
            raise _Unavailable(f"send failed: {e.strerror or e}") from None
        self.stats.sent += 1
        buf = self._recv(sock, deadline, clock, False)
        if len(buf) > 4 and buf[:3] == _SHORT_REPLY and len(buf) == 4 + buf[3]:
            return buf[4:]  # the usual reply: [empty, body < 256 bytes] in one read
        frames: list[bytes] = []
        while True:
            # Parse what is there: [empty delimiter, body], commands (PING) in between.
            pos, n = 0, len(buf)
            while n - pos >= 2:
                flags = buf[pos]
                if flags & 0x02:
                    if n - pos < 9:
                        break
                    size = int.from_bytes(buf[pos + 1:pos + 9], "big")
                    start = pos + 9
                else:
                    size = buf[pos + 1]
                    start = pos + 2
                if flags & 0xF8 or size > _MAX_REPLY:
                    self.discard()
                    raise _Unavailable(f"bad reply frame (flags {flags:#x}, {size} bytes)")
                if start + size > n:
                    break
                frame = buf[start:start + size]
                pos = start + size
                if flags & 0x04:
                    self._command(frame)
                    continue
                frames.append(frame)
                if flags & 0x01:
                    if len(frames) > 2:
                        break  # judged below
                    continue
                if len(frames) != 2 or frames[0] != b"" or pos != n:
                    # not [b"", body], or bytes beyond the reply: the stream cannot be trusted
                    self.discard()
                    if len(frames) == 2 and frames[0] == b"":
                        return frames[1]
                    raise _Unavailable("malformed reply envelope")
                return frames[1]
            if len(frames) > 2:
                self.discard()
                raise _Unavailable("malformed reply envelope")
            buf = buf[pos:]
            buf += self._recv(sock, deadline, clock, bool(buf or frames))

    def _recv(self, sock: socket.socket, deadline: float, clock: Callable[[], float],
              partial: bool) -> bytes:
        """Read what the service sent within the budget; `partial`: part of a reply is in."""
        remaining = deadline - clock()
        if remaining <= 0:
            self.discard()  # the late reply must not be read as the next call's
            raise _Unavailable(f"timeout after {self.timeout_ms:g} ms")
        if abs(remaining - self._rcvtimeo) > _SLACK_S:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(remaining))
            self._rcvtimeo = remaining
        try:
            data = sock.recv(_RECV_BYTES)
        except BlockingIOError:  # SO_RCVTIMEO expired
            self.discard()
            raise _Unavailable(f"timeout after {self.timeout_ms:g} ms") from None
        except ConnectionResetError as e:
            if partial:
                self.discard()
                raise _Unavailable("connection reset mid-reply") from None
            raise _Stale(e.strerror) from None
        except OSError as e:
            self.discard()
            raise _Unavailable(f"recv failed: {e.strerror or e}") from None
        if not data:
            if partial:
                self.discard()
                raise _Unavailable("connection closed mid-reply")
            raise _Stale("connection closed")
        return data

    def _command(self, body: bytes) -> None:
        """Answer PING with PONG (RFC 37); ignore other commands."""
        if body[:5] == b"\x04PING" and self.sock is not None:
            ctx = body[7:23]  # after the 2-byte TTL, up to 16 bytes of context
            pong = b"\x04PONG" + ctx
            with contextlib.suppress(OSError):
                self.sock.sendall(b"\x04" + bytes((len(pong),)) + pong, socket.MSG_NOSIGNAL)

    def discard(self) -> None:
        """Close the connection; the next request opens a new one."""
        sock, self.sock = self.sock, None
        if sock is not None:
            self.stats.sockets_discarded += 1
            with contextlib.suppress(OSError):
                sock.close()

    def forget(self) -> None:
        """In a forked child: close this process's copy of the parent's descriptor."""
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # close(2) only: the parent's connection stays up

    def close(self) -> None:
        """Close the connection."""
        self.discard()


def _timeval(seconds: float) -> bytes:
    us = max(1000, int(seconds * 1e6))
    return struct.pack("ll", us // 1_000_000, us % 1_000_000)


def _properties(data: bytes) -> dict[bytes, bytes]:
    """Parse ZMTP metadata (name length byte, name, 4-byte value length, value).

    The service's acm_module/decide/zmtp.py has the same parser: this script runs inside
    OpenSIPS on the system Python, where acm_module is not installed.
    """
    out: dict[bytes, bytes] = {}
    pos, n = 0, len(data)
    while pos < n:
        nl = data[pos]
        name = data[pos + 1:pos + 1 + nl]
        pos += 1 + nl
        if pos + 4 > n:
            raise ValueError("truncated ZMTP property")
        vl = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + vl > n:
            raise ValueError("truncated ZMTP property")
        out[name] = data[pos:pos + vl]
        pos += vl
    return out


class _LibzmqReq:
    """A libzmq REQ socket (pyzmq): the transport for what libzmq alone provides (CurveZMQ)."""

    def __init__(self, config: Config, stats: Stats,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.endpoint = config.endpoint
        self.timeout_ms = config.timeout_ms
        self.stats = stats
        self.curve = curve
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.sock: zmq.Socket[bytes] | None = None

    @property
    def connected(self) -> bool:
        """Whether a socket is kept for the next request."""
        return self.sock is not None

    def request(self, payload: bytes, deadline: float, clock: Callable[[], float]) -> bytes:
        """Send one request and return its reply body. Raises _Unavailable."""
        sock = self._socket()
        try:
            # IMMEDIATE + SNDTIMEO: blocks only until a connection exists (or the budget ends),
            # so nothing is queued towards a service that is not there.
            sock.send(payload, copy=True)
        except zmq.Again as e:
            # The REQ socket stays usable: nothing was sent.
            raise _Unavailable("not connected") from e
        except zmq.ZMQError as e:
            self.discard()
            raise _Unavailable(f"send failed: {e}") from e
        self.stats.sent += 1
        remaining_ms = max(0, int((deadline - clock()) * 1000.0 + 0.999))
        try:
            if sock.poll(remaining_ms, zmq.POLLIN):
                return sock.recv(zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.discard()
            raise _Unavailable(f"recv failed: {e}") from e
        # A REQ socket waiting for a reply cannot send again: throw it away.
        self.discard()
        raise _Unavailable(f"timeout after {self.timeout_ms:g} ms")

    def _socket(self) -> zmq.Socket[bytes]:
        if self.sock is not None:
            return self.sock
        if self.ctx is None:
            self.ctx = zmq.Context(io_threads=1)
        sock = self.ctx.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_ms)))
            if self.curve is not None:
                server, public, secret = self.curve
                sock.setsockopt(zmq.CURVE_SERVERKEY, server)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.connect(self.endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.sock = sock
        self.stats.sockets_built += 1
        return sock

    def discard(self) -> None:
        """Close the socket (linger 0); the next request builds a new one."""
        sock, self.sock = self.sock, None
        if sock is not None:
            self.stats.sockets_discarded += 1
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)

    def forget(self) -> None:
        """In a forked child: drop the parent's context and socket without closing them.

        libzmq's I/O threads did not survive fork; pyzmq skips zmq_close/zmq_ctx_term for
        objects created in another pid, and closing could touch the parent's state.
        """
        self.sock = None
        self.ctx = None

    def close(self) -> None:
        """Close the socket and the context."""
        self.discard()
        if self.ctx is not None:
            self.ctx.term()
        self.ctx = None


_Transport = _ZmtpReq | _LibzmqReq


def _make_transport(config: Config, stats: Stats,
                    curve: tuple[bytes, bytes, bytes] | None) -> _Transport:
    """Pick the transport: ZMTP spoken here (NULL mechanism only), libzmq when asked or when
    CurveZMQ keys are set."""
    if config.transport == "libzmq" or curve is not None:
        return _LibzmqReq(config, stats, curve)
    return _ZmtpReq(config, stats)


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class AcmClient:
    """Send decision requests as a ZeroMQ REQ peer, with a timeout and a circuit breaker.

    One instance per OpenSIPS process in effect: the connection is made lazily and rebuilt
    whenever os.getpid() changes, because the object itself is created before OpenSIPS forks.
    Not thread-safe (OpenSIPS workers are single-threaded).
    """

    def __init__(self, config: Config | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str, str], None] | None = None,
                 getpid: Callable[[], int] = os.getpid) -> None:
        self.config = config or Config()
        self._clock = clock
        self._getpid = getpid
        self._log = log or RateLimitedLog(self.config.log_interval_s, clock=clock)
        self._policy_verdict = "allow" if self.config.fail_policy == "open" else "drop"
        self._curve = self.config.curve_keys()
        # msgpack.packb() builds a Packer (and mallocs its buffer) on every call
        self._packer = msgpack.Packer()
        self._pid: int | None = None
        self._transport: _Transport | None = None
        self.rank: int | None = None
        self.stats = Stats()
        self.state = CLOSED
        self._failures = 0
        self._cooldown_s = self.config.breaker_cooldown_ms / 1000.0
        self._open_until = 0.0

    # -- process lifecycle --------------------------------------------------------------
    def after_fork(self, rank: int | None = None) -> None:
        """Forget whatever a parent process built; nothing is created until the first check."""
        self.rank = rank
        self._ensure_process()

    def _ensure_process(self) -> None:
        pid = self._getpid()
        if pid == self._pid:
            return
        # The parent's connection is the parent's: a reply to this process could land there.
        if self._transport is not None:
            self._transport.forget()
        self._pid = pid
        self.stats = Stats()
        self._transport = _make_transport(self.config, self.stats, self._curve)
        self.state = CLOSED
        self._failures = 0
        self._cooldown_s = self.config.breaker_cooldown_ms / 1000.0
        self._open_until = 0.0

    def close(self) -> None:
        """Close this process's connection to the service."""
        t, self._transport = self._transport, None
        if t is not None:
            if self._pid == self._getpid():
                t.close()
            else:
                t.forget()

    # -- the call -----------------------------------------------------------------------
    def policy(self, reason: str) -> Verdict:
        """Return the fail-policy verdict with `reason`."""
        return Verdict(self._policy_verdict, reason, policy=True)

    def check(self, call_id: str, a: str, b: str, src_ip: str | None = None,
              trunk: str | None = None) -> Verdict:
        """Return the service's verdict for a call, or the policy verdict; never raise."""
        try:
            return self._check(call_id, a, b, src_ip, trunk)
        except Exception as e:  # a bug here must not cost a call or the process
            self._log("client_bug", f"unexpected {type(e).__name__}: {e}")
            self._discard_socket()
            return self.policy("client_error")

    def _check(self, call_id: str, a: str, b: str, src_ip: str | None,
               trunk: str | None) -> Verdict:
        self._ensure_process()
        self.stats.requests += 1
        now = self._clock()
        if self.state == OPEN:
            if now < self._open_until:
                self.stats.short_circuits += 1
                return self.policy("service_unavailable")
            self.state = HALF_OPEN  # this call is the trial
        req: dict[str, str] = {
            "call_id": _clip(call_id or "-", "call_id"),
            "a": _clip(a or "", "a"),
            "b": _clip(b or "", "b"),
        }
        if src_ip:
            req["src_ip"] = _clip(src_ip, "src_ip")
        if trunk:
            req["trunk"] = _clip(trunk, "trunk")
        payload = self._packer.pack(req)
        try:
            raw = self._roundtrip(payload, now)
            verdict = _parse_reply(raw)
        except _Unavailable as e:
            self.stats.timeouts += 1
            self._failed("unavailable", f"no verdict from {self.config.endpoint}: {e}")
            return self.policy("service_unavailable")
        except _ServiceError as e:
            if e.code in REQUEST_ERRORS:
                # The service is healthy; the request was refused: a bug to look at.
                self.stats.request_errors += 1
                self._succeeded()
                self._log(f"refused:{e.code}", f"request refused by the service: {e.code}: "
                          f"{e.message} (call_id={req['call_id']!r})")
            elif e.code == STORE_UNAVAILABLE:
                # The service is alive and said so at once: opening the breaker would save
                # nothing but would keep every call unchecked for its cooldown after the store
                # is back (1 s, doubling to 30 s), where the pool recovers in tens of ms.
                self.stats.service_errors += 1
                self._succeeded()
                self._log(f"error:{e.code}", f"service error {e.code}: {e.message}")
            else:
                self.stats.service_errors += 1
                self._failed(f"error:{e.code}", f"service error {e.code}: {e.message}")
            return self.policy("service_error")
        self.stats.replies += 1
        self._succeeded()
        return verdict

    def _roundtrip(self, payload: bytes, start: float) -> bytes:
        """Send one request and wait for its reply within the budget. Raises _Unavailable."""
        deadline = start + self.config.timeout_ms / 1000.0
        if self._transport is None:
            self._transport = _make_transport(self.config, self.stats, self._curve)
        return self._transport.request(payload, deadline, self._clock)

    def _discard_socket(self) -> None:
        if self._transport is not None:
            self._transport.discard()

    # -- breaker ------------------------------------------------------------------------
    def _succeeded(self) -> None:
        if self.state != CLOSED:
            self._log("breaker_closed", "service answering again; circuit closed")
        self.state = CLOSED
        self._failures = 0
        self._cooldown_s = self.config.breaker_cooldown_ms / 1000.0

    def _failed(self, key: str, message: str) -> None:
        self._log(key, message)
        self._failures += 1
        if self.state == HALF_OPEN:
            self._cooldown_s = min(self._cooldown_s * 2.0,
                                   self.config.breaker_max_cooldown_ms / 1000.0)
            self._open(f"trial failed; circuit open for {self._cooldown_s:g} s")
        elif self._failures >= self.config.breaker_failures:
            self._open(f"{self._failures} consecutive failures; circuit open for "
                       f"{self._cooldown_s:g} s, verdict meanwhile: {self._policy_verdict}")

    def _open(self, message: str) -> None:
        self.state = OPEN
        self._open_until = self._clock() + self._cooldown_s
        self.stats.breaker_opened += 1
        self._log("breaker_open", message)


def _clip(value: str, name: str) -> str:
    """Return `value` as valid UTF-8 of at most the service's byte limit for `name`."""
    if type(value) is str and value.isascii() and len(value) <= _MAX_BYTES[name]:
        return value  # the usual case: one byte per character, nothing to cut
    data = str(value).encode("utf-8", "replace")  # lone surrogates become '?'
    return data[:_MAX_BYTES[name]].decode("utf-8", "ignore")


# Verdicts by reply body: most replies repeat byte for byte (allow, clean, distinct 1..a few),
# and decoding one costs ~20 us inside OpenSIPS (the interpreter runs cold after the switch).
_REPLIES: dict[bytes, Verdict] = {}
_MAX_CACHED = 256


def _parse_reply(raw: bytes) -> Verdict:
    """Decode a reply frame. Raises _ServiceError for error replies and malformed frames."""
    v = _REPLIES.get(raw)
    if v is not None:
        return v
    v = _decode_reply(raw)
    if v.alert_id == "":  # an alert's id is unique: not worth a slot
        if len(_REPLIES) >= _MAX_CACHED:
            _REPLIES.clear()
        _REPLIES[raw] = v
    return v


def _decode_reply(raw: bytes) -> Verdict:
    """Decode a reply frame. Raises _ServiceError for error replies and malformed frames."""
    try:
        rep = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise _ServiceError("bad_reply", f"undecodable reply: {e}") from e
    if not isinstance(rep, dict):
        raise _ServiceError("bad_reply", f"reply is a {type(rep).__name__}, not a map")
    if "error" in rep:
        raise _ServiceError(str(rep.get("error")), str(rep.get("message", "")))
    verdict = rep.get("verdict")
    if verdict not in ("allow", "drop"):
        raise _ServiceError("bad_reply", f"unknown verdict {verdict!r}")
    distinct = rep.get("distinct", 0)
    return Verdict(
        verdict,
        str(rep.get("reason", "")),
        distinct if isinstance(distinct, int) and not isinstance(distinct, bool) else 0,
        str(rep.get("alert_id") or ""),
        str(rep.get("severity") or ""),
    )


# ---------------------------------------------------------------------------------------------
# The OpenSIPS shim
# ---------------------------------------------------------------------------------------------

# python_exec() return codes: > 0 is true in the script, < 0 false, and 0 would end the route.
RC_ALLOW = 1
RC_ALLOW_POLICY = 2
RC_DROP = -1
RC_DROP_POLICY = -2


def _return_code(v: Verdict) -> int:
    if v.allow:
        return RC_ALLOW_POLICY if v.policy else RC_ALLOW
    return RC_DROP_POLICY if v.policy else RC_DROP


class Module:
    """The handler object OpenSIPS keeps; every method returns an int, whatever happens.

    An exception escaping, or a non-int result, leaves a Python error set that breaks the
    next python_exec() of the process, so everything below is wrapped.
    """

    def __init__(self, client: AcmClient | None = None) -> None:
        self.client = client if client is not None else AcmClient(Config.load())
        # opensips.cfg logs a fail-policy call only when $var(acm_log) is "1": at most once per
        # verdict, reason, process and log interval, like this script's own lines.
        self.policy_lines = RateLimitedLog(self.client.config.log_interval_s,
                                           clock=self.client._clock)

    def child_init(self, rank: int) -> int:
        """Reset per-process state for OpenSIPS process `rank`; return 0 (success)."""
        try:
            self.client.after_fork(int(rank))
        except BaseException as e:  # see class docstring
            _safe_log(self.client, "child_init", f"child_init({rank!r}) failed: {e!r}")
        return 0

    def acm_check(self, msg: Any, trunk: str | None = None) -> int:
        """Check the INVITE in `msg`; set $var(acm_*) and return 1/2 (allow) or -1/-2 (drop).

        `trunk` is the optional second python_exec() argument (after pseudo-variable
        expansion); empty means no trunk.
        """
        try:
            try:
                call_id = _pv(msg, "$ci")
                a = _pv(msg, "$fU") or _pv(msg, "$fu")
                b = _pv(msg, "$rU") or _pv(msg, "$ru")
                src_ip = _pv(msg, "$si")
            except Exception as e:
                _safe_log(self.client, "msg", f"cannot read the message: {e!r}")
                v = self.client.policy("client_error")
            else:
                trunk_s = trunk if isinstance(trunk, str) and trunk != _PV_NULL else ""
                v = self.client.check(call_id, a, b, src_ip or None, trunk_s or None)
            _set_vars(self.client, msg, v)
            if v.policy:
                _set_policy_log(self, msg, v)
            return _return_code(v)
        except BaseException as e:  # see class docstring
            return self._last_resort(e)

    def acm_check_fields(self, msg: Any, fields: str | None = None) -> int:
        """Check a call whose fields come packed in `fields`; set $var(acm); return 1/2
        (allow) or -1/-2 (drop).

        `fields` is the expansion of FIELDS_FORMAT (opensips.cfg): Call-ID, From user, R-URI
        user, source IP and trunk, each hex-encoded, joined by "00" (a NUL once decoded). One
        argument expanded by OpenSIPS instead of four get_pseudoVar() calls (each parses its
        format and allocates a 4 KB buffer), and hex keeps any byte of the message (a '|', an
        invalid UTF-8 sequence) from breaking the packing or python_exec() itself. The result
        is one $var(acm) (see `pack_result`) instead of five set_pseudoVar() calls.
        """
        try:
            parts = _unpack_fields(fields)
            if parts is None:
                _safe_log(self.client, "fields", "python_exec argument is not the packed "
                          "fields of opensips.cfg (FIELDS_FORMAT); verdict by fail policy")
                v = self.client.policy("client_error")
            else:
                call_id, a, b, src_ip, trunk = parts
                try:
                    # the URI without a user part, as acm_check does (rare: one more read)
                    a = a or _pv(msg, "$fu")
                    b = b or _pv(msg, "$ru")
                except Exception as e:
                    _safe_log(self.client, "msg", f"cannot read the message: {e!r}")
                v = self.client.check(call_id, a, b, src_ip or None, trunk or None)
            held = self.policy_lines.due(f"{v.verdict}:{v.reason}") if v.policy else None
            try:
                msg.set_pseudoVar("$var(acm)", pack_result(v, held))
            except Exception as e:
                _safe_log(self.client, "set_var", f"cannot set $var(acm): {e!r}")
            return _return_code(v)
        except BaseException as e:  # see class docstring
            return self._last_resort(e)

    def _last_resort(self, e: BaseException) -> int:
        _safe_log(self.client, "acm_check", f"acm_check failed: {e!r}")
        try:
            return _return_code(self.client.policy("client_error"))
        except BaseException:
            return RC_ALLOW_POLICY


# What opensips.cfg passes to acm_check_fields (kept in step with it by the tests): each value
# cut to the service's byte limit and hex-encoded, "00" between them.
FIELDS_FORMAT = ("$(ci{s.substr,0,256}{s.encode.hexa})00$(fU{s.substr,0,256}{s.encode.hexa})00"
                 "$(rU{s.substr,0,256}{s.encode.hexa})00$(si{s.encode.hexa})00"
                 "$(var(acm_trunk){s.substr,0,128}{s.encode.hexa})")
_N_FIELDS = 5
_RESULT_SEP = "|"
_N_RESULT = 7


def _unpack_fields(fields: Any) -> list[str] | None:
    """Return [call_id, a, b, src_ip, trunk] from the packed argument, or None if malformed.

    A value OpenSIPS could not render (unset, or a transformation failing on an empty string)
    prints as "<null>": empty here. Invalid UTF-8 becomes U+FFFD: the call is still checked.
    """
    if not isinstance(fields, str):
        return None
    try:
        raw = bytes.fromhex(fields.replace(_PV_NULL, "") if "<" in fields else fields)
    except ValueError:
        return None
    parts = raw.decode("utf-8", "replace").split("\x00")
    # a NUL inside a value shows as an extra part: not trusted, policy verdict
    return parts if len(parts) == _N_FIELDS else None


_RESULTS: dict[Verdict, str] = {}


def pack_result(v: Verdict, held: int | None) -> str:
    """Return $var(acm): verdict|reason|alert_id|severity|distinct|log|log_held.

    log is "1" when the cfg may log this fail-policy call (at most once per verdict, reason,
    process and log interval), "0" when not, "" for a service verdict; log_held counts the
    fail-policy calls of that kind not logged since the last line. A '|' or NUL in a value
    the service sent becomes '_' so that the cfg's {s.select} finds each field.
    """
    if v.policy:
        log, held_s = ("0", "0") if held is None else ("1", str(held))
    else:
        out = _RESULTS.get(v)
        if out is not None:
            return out
        log = held_s = ""
    values = (v.verdict, v.reason, v.alert_id, v.severity, str(v.distinct), log, held_s)
    out = _RESULT_SEP.join(values)
    if out.count(_RESULT_SEP) != _N_RESULT - 1 or "\x00" in out:
        out = _RESULT_SEP.join(x.replace(_RESULT_SEP, "_").replace("\x00", "_") for x in values)
    if not v.policy and v.alert_id == "":
        if len(_RESULTS) >= _MAX_CACHED:
            _RESULTS.clear()
        _RESULTS[v] = out
    return out


def _pv(msg: Any, spec: str) -> str:
    v = msg.get_pseudoVar(spec)
    if v is None or v == _PV_NULL:
        return ""
    return str(v)


_VAR_NAMES = ("$var(acm_verdict)", "$var(acm_reason)", "$var(acm_alert_id)",
              "$var(acm_severity)", "$var(acm_distinct)")


def _set_vars(client: AcmClient, msg: Any, v: Verdict) -> None:
    for name, value in zip(_VAR_NAMES, (v.verdict, v.reason, v.alert_id, v.severity,
                                        str(v.distinct)), strict=True):
        try:
            # set_pseudoVar() takes str values without NUL only and returns None even when
            # it fails (then with a Python error set: SystemError here, caught below).
            msg.set_pseudoVar(name, value.replace("\x00", "") if "\x00" in value else value)
        except Exception as e:
            _safe_log(client, "set_var", f"cannot set {name}: {e!r}")


def _set_policy_log(module: Module, msg: Any, v: Verdict) -> None:
    """Set $var(acm_log) ("1": the cfg may log this fail-policy call) and $var(acm_log_held)
    (fail-policy calls of the same kind not logged since the last line)."""
    held = module.policy_lines.due(f"{v.verdict}:{v.reason}")
    try:
        msg.set_pseudoVar("$var(acm_log)", "0" if held is None else "1")
        msg.set_pseudoVar("$var(acm_log_held)", str(held or 0))
    except Exception as e:
        _safe_log(module.client, "set_var", f"cannot set $var(acm_log): {e!r}")


def _safe_log(client: AcmClient, key: str, message: str) -> None:
    with contextlib.suppress(BaseException):
        client._log(key, message)


def mod_init() -> Module:
    """Return the handler object (OpenSIPS `mod_init_function`); create no sockets here."""
    return Module()
