"""The arbiter base: fork children, learn of their exits through a self-pipe, restart them after
a delay, stop them within a grace, and make them die with the arbiter.

acm has two process pools and both are arbiters: the request server's supervisor
(decide/supervisor.py: workers and sidecars) and the writer's process per sink (write/writer.py).
As in gunicorn's arbiter, a signal handler only queues the signal and writes a byte to a pipe
(SIGCHLD too); the loop sleeps in poll() on that pipe until a signal, a child's exit or its next
deadline, so an idle arbiter does not wake and a dead child is reaped at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_name(name: str) -> None:
    """Set this process's comm name (Linux; at most 15 bytes), so ps and pgrep tell it apart."""
    try:
        _libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux).

    An arbiter killed with SIGKILL cannot stop its children; without this they would live on
    as orphans holding the endpoint or a stream's consumer. If the parent is already gone, exit
    now.
    """
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class Exited(NamedTuple):
    """A child the arbiter reaped."""

    pid: int
    status: int  # as waitpid() gives it
    retired: bool  # stopped on purpose (`retire`), not a death

    @property
    def code(self) -> int:
        """The exit code; minus the signal number when a signal killed it."""
        return os.waitstatus_to_exitcode(self.status)


class Arbiter:
    """Keep forked children; a subclass says what a signal, an exit, a restart and a tick do.

    `loop()` dispatches the queued signals to `handle_signal` (a returned int ends the loop with
    that exit code), each reaped child to `child_exited`, each restart that fell due to
    `restart`, then runs `tick` (periodic checks; an int ends the loop) and SIGKILLs the retired
    children past their grace, and sleeps until the next of: a signal, a child's exit, a due
    restart or retirement deadline, `next_wake()` seconds.
    """

    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    crash_message = "%s crashed"  # logged with the child's `what` when its `run` raises

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.pid = os.getpid()
        self.children: dict[int, str] = {}  # pid -> what it is
        self.restart_at: dict[Hashable, float] = {}  # key -> when `restart(key)` is due
        self.retiring: dict[int, float] = {}  # pid -> SIGKILL deadline (stopped on purpose)
        self._queued: list[int] = []
        self._wake_r = self._wake_w = -1
        self._saved: dict[int, Any] = {}

    # -- set up and tear down ------------------------------------------------------------------
    def open(self) -> None:
        """Create the self-pipe and install the signal handlers; call before the first spawn."""
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        for sig in (*self.signals, signal.SIGCHLD):
            self._saved[sig] = signal.signal(sig, self._on_signal)

    def close(self) -> None:
        """Put the previous signal handlers back and close the self-pipe."""
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        r, w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._queued.append(signum)
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # a full pipe already wakes the loop
                os.write(self._wake_w, b".")

    # -- children ----------------------------------------------------------------------------
    def spawn(self, what: str, run: Callable[[], int], title: str | None = None) -> int:
        """Fork a child that runs `run` and exits with its code; return the child's pid.

        The child takes back the default signal handlers, closes the self-pipe, shows `title`
        in ps (when given) and gets SIGTERM when the arbiter dies; an exception is logged
        (`crash_message`) and exits 1.
        """
        pid = os.fork()
        if pid:
            self.children[pid] = what
            return pid
        code = 1
        try:
            for sig in (*self.signals, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            if title:
                set_name(title)
            die_with_parent(signal.SIGTERM, self.pid)
            code = run()
        except BaseException:
            self.log.exception(self.crash_message, what)
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reap(self) -> list[Exited]:
        """Collect the children that have exited; never block.

        Only this arbiter's children are waited for: a subprocess.Popen of the same process
        (an embedded store) keeps its own.
        """
        done = []
        for pid in list(self.children):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: it is gone all the same
                got, status = pid, 0
            if got:
                del self.children[pid]
                retired = self.retiring.pop(pid, None) is not None
                done.append(Exited(pid, status, retired))
        return done

    def restart_in(self, key: Hashable, delay: float) -> None:
        """Call `restart(key)` from the loop `delay` seconds from now."""
        self.restart_at[key] = time.monotonic() + delay

    def retire(self, pid: int, grace: float) -> None:
        """Stop a child on purpose: SIGTERM now, SIGKILL if it still runs `grace` seconds on."""
        self.retiring[pid] = time.monotonic() + grace
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for pid, deadline in list(self.retiring.items()):
            if now > deadline:
                self.log.warning("pid %d did not stop within graceful_timeout; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.retiring[pid] = now + 5.0

    def stop(self, grace: float) -> list[int]:
        """SIGTERM every child, wait up to `grace` seconds for them, SIGKILL the rest.

        Return the pids that had to be killed; every child has been reaped on return.
        """
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        self.reap()
        while self.children:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wait(left)
            self.reap()
        killed = list(self.children)
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()
        self.retiring.clear()
        return killed

    # -- the loop ----------------------------------------------------------------------------
    def wait(self, timeout: float | None) -> None:
        """Sleep until a signal or a child's exit, or `timeout` seconds (None: no limit)."""
        if self._wake_r < 0:  # not open: nothing can wake us but time
            if timeout:
                time.sleep(timeout)
            return
        # Rounded up: waking a hair before a deadline would only spin once more.
        ms = -1 if timeout is None else math.ceil(max(timeout, 0.0) * 1000)
        if self._poll.poll(ms):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

    def loop(self) -> int:
        """Keep the children until a handler or `tick` returns an exit code; return it."""
        while True:
            while self._queued:
                sig = self._queued.pop(0)
                if sig != signal.SIGCHLD:  # exits are reaped below, signalled or not
                    code = self.handle_signal(sig)
                    if code is not None:
                        return code
            for exited in self.reap():
                self.child_exited(exited)
            now = time.monotonic()
            for key, at in list(self.restart_at.items()):
                if at <= now and self.restart_at.pop(key, None) is not None:
                    self.restart(key)
            code = self.tick()
            if code is not None:
                return code
            self._kill_overdue()
            self.wait(self._timeout())

    def _timeout(self) -> float | None:
        deadlines = [*self.restart_at.values(), *self.retiring.values()]
        timeout = self.next_wake()
        if deadlines:
            soonest = max(0.0, min(deadlines) - time.monotonic())
            timeout = soonest if timeout is None else min(timeout, soonest)
        return timeout

    # -- what a subclass says ------------------------------------------------------------------
    def handle_signal(self, signum: int) -> int | None:
        """Act on a queued signal (one of `signals`); return an exit code to stop the loop."""
        return 0

    def child_exited(self, exited: Exited) -> None:
        """Act on a child's exit (schedule its restart with `restart_in`, or not)."""

    def restart(self, key: Hashable) -> None:
        """Start again what `restart_in(key, ...)` scheduled."""

    def tick(self) -> int | None:
        """Run the periodic checks; return an exit code to stop the loop."""
        return None

    def next_wake(self) -> float | None:
        """Return the seconds until `tick` needs to run again (None: only on an event)."""
        return None
