"""The MI control process: JSON-RPC 2.0 over HTTP (`POST /mi`, like OpenSIPS mi_http) and over
UDP/unix datagrams (like mi_datagram, and the target of OpenSIPS's event_datagram).

The supervisor forks this process after the workers (`control_main`); everything here (sockets,
threads, the store connection) is created in this process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from acm_module.control import jsonrpc
from acm_module.control.auth import Bind, check_boot, is_loopback, parse_bind
from acm_module.control.commands import CommandFactory, Control
from acm_module.core.errors import BOOT_ERROR, ConfigError

log = logging.getLogger("acm.control")

MAX_DATAGRAM_REPLY = 32768  # python-opensips reads replies with a 32 KiB buffer by default
MI_PATHS = ("/mi", "/mi/", "/json", "/json/")
MAX_DISCARD = 1 << 20  # an oversize body up to this size is read (and dropped) before the 413
REGISTRY_WATCH_S = 5.0  # how often the control process checks the store still has the registry
CONFIG_WATCH_S = 1.0  # ... and the live config (one HMGET)


# -- HTTP ----------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "acm-mi"
    protocol_version = "HTTP/1.1"
    server: Any

    def setup(self) -> None:
        self.timeout = self.server.conns.timeout_s  # each recv(); the deadline bounds the sum
        if self.request.family != socket.AF_UNIX:
            # Headers and body leave in two writes: without this, Nagle holds the body until
            # the client's delayed ACK, 40 ms on every reply.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle_one_request(self) -> None:
        self.server.conns.reading(self.connection)
        super().handle_one_request()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] not in MI_PATHS:
            self._send(404, b'{"error":"not found: POST /mi"}')
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send(411, b'{"error":"Content-Length required"}')
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, b'{"error":"Content-Length required"}')
            return
        if length < 0 or length > jsonrpc.MAX_REQUEST_BYTES:
            self.close_connection = True
            if length <= MAX_DISCARD:
                # Read what the client is sending before answering: closing on unread data
                # makes the kernel reset the connection, and the client may never see the 413.
                self.server.conns.reading(self.connection)
                while length > 0 and (chunk := self.rfile.read(min(length, 65536))):
                    length -= len(chunk)
            self._send(413, jsonrpc.error(None, jsonrpc.MIError(
                jsonrpc.INVALID_REQUEST,
                f"request larger than {jsonrpc.MAX_REQUEST_BYTES} bytes")))
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True  # closed or timed out mid-body: nobody to answer
            return
        self.server.conns.busy(self.connection)
        bearer = None
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            bearer = auth[7:].strip()
        reply = self.server.control.dispatch(
            body, via=f"http:{self._peer()}", loopback_bind=self.server.loopback,
            bearer=bearer)
        if reply is None:
            self._send(204, b"")
        else:
            self._send(200, reply)

    def do_GET(self) -> None:
        self._send(405, b'{"error":"use POST /mi with a JSON-RPC 2.0 body"}',
                   extra={"Allow": "POST"})

    def _peer(self) -> str:
        addr = self.client_address
        if isinstance(addr, tuple) and len(addr) >= 2:
            return f"{addr[0]}:{addr[1]}"
        return "unix"

    def _send(self, code: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        if code >= 400:
            self.close_connection = True  # an unread body must not become the next request
        self.send_response(code)
        if self.close_connection:  # say so, or a keep-alive client writes into a closed socket
            self.send_header("Connection", "close")
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self._peer(), *args)


class _Connections:
    """The open connections of an HTTP endpoint: each has a deadline for its next request and
    their number is bounded, so neither slow nor idle peers hold threads forever or keep the
    operator out (one thread per connection, as http.server does, but never more than
    `limit`)."""

    def __init__(self, limit: int, timeout_s: float) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        # socket -> monotonic deadline of the request it is reading; None while dispatching
        self._open: dict[socket.socket, float | None] = {}
        self.evicted = 0
        self.refused = 0

    def admit(self, sock: socket.socket) -> bool:
        """Register a new connection; make room by closing the one reading the longest. Return
        False when every slot is busy dispatching (the caller answers 503)."""
        with self._lock:
            if len(self._open) >= self.limit:
                reading = [(d, s) for s, d in self._open.items() if d is not None]
                if not reading:
                    self.refused += 1
                    return False
                _, victim = min(reading, key=lambda x: x[0])
                self._drop(victim)
                self.evicted += 1
            self._open[sock] = time.monotonic() + self.timeout_s
            return True

    def reading(self, sock: socket.socket) -> None:
        """Start the deadline of the connection's next request."""
        with self._lock:
            if sock in self._open:
                self._open[sock] = time.monotonic() + self.timeout_s

    def busy(self, sock: socket.socket) -> None:
        """The request is in: no deadline (and no eviction) while it is being answered."""
        with self._lock:
            if sock in self._open:
                self._open[sock] = None

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def expire(self) -> int:
        """Close every connection past its deadline; return how many."""
        now = time.monotonic()
        with self._lock:
            late = [s for s, d in self._open.items() if d is not None and d <= now]
            for s in late:
                self._drop(s)
        return len(late)

    def _drop(self, sock: socket.socket) -> None:
        # shutdown() wakes the thread blocked in recv(); it then closes and unregisters.
        self._open.pop(sock, None)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class _BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    """Thread per connection, bounded and with deadlines (see _Connections)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog (socketserver's default is 5)
    conns: _Connections

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.conns.admit(request):
            body = jsonrpc.error(None, jsonrpc.MIError(
                jsonrpc.BUSY, "MI busy: every connection is being answered; retry"))
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY_REPLY % (len(body), body))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.conns.closed(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def service_actions(self) -> None:
        self.conns.expire()  # called by serve_forever() every poll interval

    def handle_error(self, request: Any, client_address: Any) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # a peer that resets or missed its deadline: routine
            log.debug("MI HTTP connection from %s ended: %s", client_address, e)
        else:
            log.error("MI HTTP connection from %s failed", client_address, exc_info=True)


class _HTTPServer(_BoundedThreadingMixIn, HTTPServer):
    allow_reuse_address = True
    control: Control
    loopback: bool


class _HTTP6Server(_HTTPServer):
    address_family = socket.AF_INET6


class _UnixHTTPServer(_BoundedThreadingMixIn, socketserver.UnixStreamServer):
    control: Control
    loopback: bool = True


def _http_server(bind: Bind, control: Control) -> Any:
    if bind.unix_path is not None:
        _unlink_stale(bind.unix_path)
        srv: Any = _UnixHTTPServer(bind.unix_path, _Handler, bind_and_activate=False)
    else:
        cls = _HTTP6Server if ":" in bind.host else _HTTPServer
        srv = cls((bind.host, bind.port), _Handler, bind_and_activate=False)
    # Before the bind: a server that cannot bind still has them, to close.
    srv.conns = _Connections(control.settings.mi_http_max_connections,
                             control.settings.mi_http_timeout)
    try:
        srv.server_bind()
        srv.server_activate()
    except BaseException:
        srv.server_close()
        raise
    if bind.unix_path is not None:
        os.chmod(bind.unix_path, 0o660)
    srv.control = control
    srv.loopback = is_loopback(bind)
    return srv


# -- datagrams -----------------------------------------------------------------------------
class DatagramServer:
    """Answer one JSON-RPC request per datagram, replying to the sender's address."""

    def __init__(self, bind: Bind, control: Control) -> None:
        self.bind = bind
        self.control = control
        self.loopback = is_loopback(bind)
        if bind.unix_path is not None:
            _unlink_stale(bind.unix_path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(bind.unix_path)
            os.chmod(bind.unix_path, 0o660)
        else:
            fam = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
            self.sock = socket.socket(fam, socket.SOCK_DGRAM)
            self.sock.bind((bind.host, bind.port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.unanswered = 0  # requests without the token too short for any reply (exposed)

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def serve_forever(self) -> None:
        """Serve until shutdown()."""
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self._handle(data, peer)

    def _handle(self, data: bytes, peer: Any) -> None:
        via = f"datagram:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "datagram:unix"
        try:
            # Exposed: every command needs the token (a forged source must not get answers).
            r = self.control.handle(data, via=via, loopback_bind=self.loopback,
                                    token_always=not self.loopback)
        except Exception:  # never let one datagram stop the endpoint
            log.exception("datagram from %s failed", via)
            return
        reply = r.body
        if reply is None or not peer:
            return  # a notification (OpenSIPS events), or an unbound unix sender
        if not self.loopback and not r.authenticated and len(reply) > len(data):
            # No amplification towards a forged source: without the token, never more bytes
            # back than came in. The short form keeps the code; a request shorter than even
            # that gets no reply.
            reply = _short_error(reply)
            if reply is None or len(reply) > len(data):
                self.unanswered += 1
                log.debug("datagram from %s: no reply (no token, request of %d bytes)",
                          via, len(data))
                return
        if len(reply) > MAX_DATAGRAM_REPLY:
            rid = _request_id(data)
            reply = jsonrpc.error(rid, jsonrpc.MIError(
                jsonrpc.REPLY_TOO_LARGE,
                f"reply of {len(reply)} bytes does not fit a datagram "
                f"({MAX_DATAGRAM_REPLY}); use a smaller limit or MI over HTTP"))
        try:
            self.sock.sendto(reply, peer)
        except OSError as e:
            log.warning("cannot reply to %s: %s", via, e)

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()

    def server_close(self) -> None:
        self.sock.close()
        if self.bind.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.bind.unix_path)


def _short_error(reply: bytes) -> bytes | None:
    """Return an error reply cut to its code and a one-word message (None if not an error)."""
    try:
        rep = json.loads(reply)
        code = int(rep["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None
    word = "unauthorized" if code == jsonrpc.UNAUTHORIZED else "error"
    return jsonrpc.error(rep.get("id"), jsonrpc.MIError(code, word))


def _request_id(data: bytes) -> Any:
    try:
        return jsonrpc.parse(data).id
    except jsonrpc.MIError:
        return None


def _unlink_stale(path: str) -> None:
    """Remove a socket file left by a previous run (never a regular file)."""
    import stat

    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        else:
            raise ConfigError(f"{path} exists and is not a socket")


# -- the process ---------------------------------------------------------------------------
class ControlServer:
    """Both transports and the Control behind them; start() binds, stop() closes."""

    def __init__(self, settings: Any, control: Control | None = None, boot_id: str = "",
                 extra_commands: Sequence[CommandFactory] = ()) -> None:
        self.settings = settings
        self.http_bind = parse_bind(settings.mi_http, "mi_http") if settings.mi_http else None
        self.dgram_bind = (parse_bind(settings.mi_datagram, "mi_datagram")
                           if settings.mi_datagram else None)
        binds = [b for b in (self.http_bind, self.dgram_bind) if b is not None]
        check_boot(binds, settings.mi_token or "")
        self.control = control or Control(settings, boot_id=boot_id,
                                          extra_commands=extra_commands)
        self.http: Any = None
        self.dgram: DatagramServer | None = None
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Bind every endpoint and serve in threads. Raises OSError if a bind fails."""
        try:
            if self.http_bind is not None:
                self.http = _http_server(self.http_bind, self.control)
            if self.dgram_bind is not None:
                self.dgram = DatagramServer(self.dgram_bind, self.control)
        except BaseException:
            self.stop()
            raise
        if self.http is not None:
            self._thread("mi-http", self.http.serve_forever)
            log.info("MI over HTTP on %s (POST /mi)%s", self.http_bind,
                     "" if self.http.loopback else ", admin token required")
        if self.dgram is not None:
            self._thread("mi-datagram", self.dgram.serve_forever)
            log.info("MI over datagrams on %s%s", self.dgram_bind,
                     "" if self.dgram.loopback else ", admin token required")
        self._thread("mi-boot", self._boot_tasks)
        self._thread("mi-registry", self._registry_watch)
        self._thread("mi-config", self._config_watch)

    def _thread(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _boot_tasks(self) -> None:
        try:
            self.control.live.check_deployment()
        except Exception as e:
            log.warning("deployment name not checked: %s", e)
        try:
            n = self.control.lists.resync_whitelist()
            if n:
                log.info("re-asserted %d whitelist markers", n)
        except Exception as e:
            log.warning("whitelist resync skipped: %s", e)
        try:
            self.control.live.reconcile_overrides(self.stop_event)
        except Exception as e:
            log.warning("override reconciliation skipped: %s", e)

    def _registry_watch(self) -> None:
        """Publish the repository's carrier registry at start-up (retried until it works),
        then again whenever the store has lost it (flushed, replaced)."""
        synced, failures = False, 0
        while not self.stop_event.is_set():
            try:
                if not synced or self.control.registry.registry_lost():
                    self.control.registry.sync_registry()
                    synced, failures = True, 0
            except Exception as e:
                if not failures:
                    log.warning("carrier registry not published: %s (retrying)", e)
                failures += 1
            # Soon again while the first publish fails (a database still starting).
            self.stop_event.wait(1.0 if 0 < failures < 10 else REGISTRY_WATCH_S)

    def _config_watch(self) -> None:
        """Put the live config (with the MI overrides) back whenever the store has lost it;
        write to the repository the changes made while it was down.

        The first look comes a period after start-up, when the workers of this boot have
        published theirs."""
        failing = False
        while not self.stop_event.wait(CONFIG_WATCH_S):
            try:
                self.control.live.restore_config()
                failing = False
            except Exception as e:
                if not failing:
                    log.warning("live config not checked: %s (retrying)", e)
                failing = True
            try:
                self.control.live.flush_pending()
            except Exception as e:
                if not failing:
                    log.warning("MI overrides not persisted yet: %s (retrying)", e)
                failing = True

    def stop(self) -> None:
        """Stop serving, close every socket and the store connection."""
        self.stop_event.set()
        if self.http is not None:
            if any(t.name == "mi-http" for t in self._threads):
                self.http.shutdown()
            self.http.server_close()
            if self.http_bind is not None and self.http_bind.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.http_bind.unix_path)
            self.http = None
        if self.dgram is not None:
            self.dgram.shutdown()
            for t in self._threads:
                if t.name == "mi-datagram":
                    t.join(2.0)
            self.dgram.server_close()
            self.dgram = None
        self.control.close()


def control_main(settings: Any, boot_id: str = "",
                 extra_commands: Sequence[CommandFactory] = ()) -> int:
    """Entry point of the forked control process; return its exit code (3 = boot failure).

    boot_id: the supervisor's, put back with a restored live config; extra_commands: the
    commands other rooms add (cli.py hands in the alert lifecycle's)."""
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor owns Ctrl-C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        srv = ControlServer(settings, boot_id=boot_id, extra_commands=extra_commands)
    except ConfigError as e:
        log.error("MI control plane: %s", e)
        return BOOT_ERROR
    try:
        srv.start()
    except (OSError, ConfigError) as e:
        log.error("MI control plane cannot bind: %s", e)
        srv.control.close()
        return BOOT_ERROR
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
    return 0
