"""The arbiter base (core/arbiter.py) against real child processes.

Each test runs a small arbiter as its own process (so it can be signalled and SIGKILLed) and
reads what it did from its stdout: one JSON line per event, stamped with CLOCK_MONOTONIC, which
every process of the machine shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# argv[1]: what each child does: "crash" (exit 7 at once), "idle" (sleep until SIGTERM),
# "stubborn" (ignore SIGTERM, say so, sleep on); argv[2:]: the children, by name.
PROGRAM = textwrap.dedent("""
    import json, logging, os, signal, sys, time
    from acm_module.core.arbiter import Arbiter
    from acm_module.core.backoff import Backoff

    def say(**ev):
        ev["t"] = time.monotonic()
        os.write(1, (json.dumps(ev) + "\\n").encode())

    def child(mode):
        if mode == "crash":
            say(ev="bye", pid=os.getpid())
            return 7
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, lambda *a: say(ev="term ignored", pid=os.getpid()))
        while True:
            time.sleep(3600)

    class Test(Arbiter):
        def __init__(self, modes):
            super().__init__(logging.getLogger("test"))
            self.modes = modes
            self.names = {}
            self.backoff = {n: Backoff(0.05, 0.2) for n in modes}

        def start(self, name):
            pid = self.spawn(name, lambda: child(self.modes[name]), f"t-{name}")
            self.names[pid] = name
            say(ev="spawn", name=name, pid=pid)

        def child_exited(self, e):
            name = self.names.pop(e.pid)
            delay = self.backoff[name].next()
            say(ev="reaped", name=name, pid=e.pid, code=e.code, delay=delay)
            self.restart_in(name, delay)

        def restart(self, name):
            self.start(name)

    mode, names = sys.argv[1], sys.argv[2:]
    a = Test({n: mode if n != "good" else "idle" for n in names})
    a.open()
    for n in names:
        a.start(n)
    say(ev="ready")
    code = a.loop()
    killed = a.stop(1.0)
    say(ev="stopped", killed=killed, code=code)
    a.close()
    sys.exit(code)
""")


class Run:
    """The test arbiter as a subprocess, and the events it printed."""

    def __init__(self, mode: str, *names: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROGRAM, mode, *names],
                                     stdout=subprocess.PIPE, cwd=REPO, start_new_session=True)
        self.events: list[dict] = []

    def until(self, pred, timeout: float = 10.0) -> dict:  # type: ignore[no-untyped-def]
        """Read events until one satisfies pred; return it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if pred(ev):
                return ev
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            self.events.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"no such event; saw {self.events}")

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["ev"] == kind]

    def close(self) -> None:
        # The whole group: children a failed test left behind too, even with the arbiter gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def run() -> Iterator:  # type: ignore[type-arg]
    started: list[Run] = []

    def start(mode: str, *names: str) -> Run:
        r = Run(mode, *names)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wakeups(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


def test_a_child_that_exits_is_reaped_at_once_and_restarted_with_backoff(run) -> None:  # type: ignore[no-untyped-def]
    r = run("crash", "a")
    r.until(lambda e: e["ev"] == "spawn" and len(r.of("spawn")) == 11)
    byes = {e["pid"]: e["t"] for e in r.of("bye")}
    spawns = r.of("spawn")
    lags = []
    for i, reaped in enumerate(r.of("reaped")[:10]):
        assert reaped["code"] == 7
        lags.append(reaped["t"] - byes[reaped["pid"]])
        # Restarted after core.backoff's jittered delay: half of min(0.2, 0.05 * 2**i) to all.
        cap = min(0.2, 0.05 * 2 ** i)
        assert cap / 2 <= reaped["delay"] <= cap
        gap = spawns[i + 1]["t"] - reaped["t"]
        assert reaped["delay"] - 0.01 <= gap < reaped["delay"] + 0.1, r.events
    lags.sort()
    print(f"exit -> reaped: median {lags[5] * 1e3:.1f} ms, max {lags[-1] * 1e3:.1f} ms")
    # Reaped when the child exits (SIGCHLD through the self-pipe), not at a poll's next turn
    # (a 100 ms poll has a median near 50 ms).
    assert lags[5] < 0.02 and lags[-1] < 0.5, lags


def test_stop_sigkills_a_child_that_ignores_sigterm_after_the_grace(run) -> None:  # type: ignore[no-untyped-def]
    r = run("stubborn", "good", "bad")
    r.until(lambda e: e["ev"] == "ready")
    pids = {e["name"]: e["pid"] for e in r.of("spawn")}
    time.sleep(0.2)  # the children installed their handlers
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    ignored = r.until(lambda e: e["ev"] == "term ignored")
    stopped = r.until(lambda e: e["ev"] == "stopped")
    assert ignored["pid"] == pids["bad"]
    # The child that obeys SIGTERM is not killed; the one that ignores it is, after 1 s.
    assert stopped["killed"] == [pids["bad"]]
    assert 1.0 <= stopped["t"] - t0 < 2.0
    assert r.proc.wait(10) == 0
    assert not _alive(pids["good"]) and not _alive(pids["bad"])


def test_the_children_die_when_the_arbiter_is_sigkilled(run) -> None:  # type: ignore[no-untyped-def]
    r = run("idle", "a", "b", "c")
    r.until(lambda e: e["ev"] == "ready")
    pids = [e["pid"] for e in r.of("spawn")]
    assert all(_alive(p) for p in pids)
    os.kill(r.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids)


def test_an_idle_arbiter_does_not_wake(run) -> None:  # type: ignore[no-untyped-def]
    r = run("idle", "a", "b")
    r.until(lambda e: e["ev"] == "ready")
    time.sleep(0.3)
    before = _wakeups(r.proc.pid)
    time.sleep(2.0)
    # No periodic waitpid: nothing happens, so it sleeps (a 100 ms poll would wake 20 times).
    assert _wakeups(r.proc.pid) - before <= 2
    # ... and a signal still wakes it at once.
    r.proc.send_signal(signal.SIGTERM)
    assert r.until(lambda e: e["ev"] == "stopped")["killed"] == []
    assert r.proc.wait(10) == 0
