"""Signals to a real `acm serve`, as an operator sends them.

- SIGTTIN adds a worker up to max_workers, SIGTTOU removes one down to 1; a removed worker is
  retired (no respawn, no "respawning" line) and each step is logged.
- SIGHUP reloads the config file and rolls the workers: new ones start on the new config, the
  old ones are retired once the new ones serve; requests keep being answered meanwhile. An
  invalid new config is logged and the running one kept.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from acm_module.decide.client import Client, ServiceTimeout
from tests.support.servers import Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]


def signal_service(svc: Service, sig: int) -> None:
    assert svc.proc is not None
    svc.proc.send_signal(sig)


def test_ttin_grows_to_max_workers_and_ttou_retires_down_to_one(store_url: str) -> None:
    svc = Service(store_url, workers=1, args=["--max-workers", "3"])
    try:
        svc.start()
        first = svc.worker_pids()
        assert len(first) == 1
        for n in (2, 3):
            signal_service(svc, signal.SIGTTIN)
            svc.wait_for(lambda n=n: len(svc.worker_pids()) == n)
        signal_service(svc, signal.SIGTTIN)  # beyond max_workers: refused, said so
        svc.wait_log("SIGTTIN ignored")
        assert len(svc.worker_pids()) == 3
        with Client(svc.endpoint, timeout=5) as c:  # the grown pool serves
            for i in range(6):
                assert c.decide(f"grow-{i}", f"+23480300000{i:02d}", "+2348039990001")
        for n in (2, 1):
            signal_service(svc, signal.SIGTTOU)
            svc.wait_for(lambda n=n: len(svc.worker_pids()) == n)
        signal_service(svc, signal.SIGTTOU)  # below 1: refused
        svc.wait_log("SIGTTOU ignored")
        time.sleep(0.5)  # a wrongful respawn would show by now
        log = svc.read_log()
        assert svc.worker_pids() == first, log
        assert "respawning" not in log
        assert log.count("retired") == 2, log
        for line in ("SIGTTIN: workers 1 -> 2", "SIGTTIN: workers 2 -> 3",
                     "SIGTTOU: workers 3 -> 2", "SIGTTOU: workers 2 -> 1"):
            assert line in log
        with Client(svc.endpoint, timeout=5) as c:
            assert c.decide("after-shrink", "+2348030000099", "+2348039990002")["verdict"]
    finally:
        svc.cleanup()


def three_callers_dropped(c: Client, tag: str) -> bool:
    """Three distinct callers to one B: the third is dropped only with threshold <= 3."""
    b = f"+234803{abs(hash(tag)) % 10**7:07d}"
    verdicts = [c.decide(f"{tag}-{i}", f"+23480311{i:05d}", b)["verdict"] for i in range(3)]
    return verdicts[-1] == "drop"


def test_sighup_reloads_the_file_and_rolls_every_worker_while_serving(store_url: str,
                                                                      tmp_path: Path) -> None:
    cfg = tmp_path / "acm.toml"
    cfg.write_text("[service]\nworkers = 1\n[detection]\nthreshold = 5\n")
    svc = Service(store_url, workers=0)
    svc.pre_args = ["--config", str(cfg)]
    stop = threading.Event()
    answered, lost = [0], [0]

    def load() -> None:  # one OpenSIPS-like client, one request in flight, all along
        with Client(svc.endpoint, timeout=2.0) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.decide(f"roll-{i}", "+2348030000001", f"+2348038{i:06d}")
                    answered[0] += 1
                except ServiceTimeout:
                    lost[0] += 1
                i += 1

    try:
        svc.start()
        old = svc.worker_pids()
        assert len(old) == 1
        with Client(svc.endpoint, timeout=5) as c:
            assert not three_callers_dropped(c, "before")
        t = threading.Thread(target=load, daemon=True)
        t.start()
        time.sleep(0.3)
        cfg.write_text("[service]\nworkers = 2\n[detection]\nthreshold = 3\n")
        signal_service(svc, signal.SIGHUP)
        svc.wait_log("reload done")
        before_end = answered[0]
        svc.wait_for(lambda: answered[0] > before_end + 20, what="answers after the roll")
        stop.set()
        t.join(10)
        new = svc.worker_pids()
        log = svc.read_log()
        assert len(new) == 2 and not set(new) & set(old), log
        assert "respawning" not in log
        assert before_end > 0
        # The retired worker handed its connection to a new one once it was quiescent, so the
        # client's next request waited in the kernel for the new owner: nothing lost. (Closed
        # instead, the request sent next was lost: ZeroMQ has no "go away", and the client
        # timed out and applied its fail policy.)
        assert lost[0] == 0, f"{lost[0]} requests lost during the roll"
        with Client(svc.endpoint, timeout=5) as c:
            assert three_callers_dropped(c, "after")  # the file's new threshold is live
    finally:
        stop.set()
        svc.cleanup()


@pytest.mark.parametrize("bad", ["[detection]\nthreshold = 'many'\n",
                                 "[service]\nworkers = 1\nnot toml at all\n",
                                 "[service]\ncurve_server_key = '/nonexistent/acm.key_secret'\n"],
                         ids=["bad-value", "bad-syntax", "missing-key-file"])
def test_sighup_with_an_invalid_config_keeps_the_running_one(store_url: str, tmp_path: Path,
                                                             bad: str) -> None:
    cfg = tmp_path / "acm.toml"
    cfg.write_text("[detection]\nthreshold = 3\n")
    svc = Service(store_url, workers=1)
    svc.pre_args = ["--config", str(cfg)]
    try:
        svc.start()
        pids = svc.worker_pids()
        cfg.write_text(bad)
        signal_service(svc, signal.SIGHUP)
        svc.wait_log("keeping the running one")
        time.sleep(0.3)
        assert svc.worker_pids() == pids, svc.read_log()
        with Client(svc.endpoint, timeout=5) as c:
            assert three_callers_dropped(c, "kept")  # still threshold 3
    finally:
        svc.cleanup()


def test_busy_connections_still_move_after_a_respawn_and_a_sighup_roll(store_url: str,
                                                                      tmp_path: Path) -> None:
    """A worker respawned in its slot, and a reload's new workers, take connections handed over.

    A second worker is added (SIGTTIN), killed and respawned (binding its slot's inbox again),
    then frozen (SIGSTOP) while two busy OpenSIPS-like clients connect, so both land on the
    first worker; thawed, it takes one busy connection from its sibling. A SIGHUP then rolls
    the pool: the clients reconnect to the one new worker, SIGTTIN adds another, and again one
    busy connection moves to it.
    """
    from acm_module.core import stats as stats_mod
    from acm_module.decide.store.conn import StoreConnection

    cfg = tmp_path / "acm.toml"
    cfg.write_text("[service]\nworkers = 1\nmax_workers = 4\n")
    svc = Service(store_url, workers=0)
    svc.pre_args = ["--config", str(cfg)]
    stop = threading.Event()
    answered, lost = [0, 0], [0, 0]

    def busy(k: int, rate: float = 150.0) -> None:
        with Client(svc.endpoint, timeout=2.0) as c:
            i, t0 = 0, time.monotonic()
            while not stop.is_set():
                try:
                    c.decide(f"move-{k}-{i}", f"+23480320000{k}", f"+2348037{i:06d}")
                    answered[k] += 1
                except ServiceTimeout:
                    lost[k] += 1
                i += 1
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))

    def snapshot(pid: int) -> dict | None:
        conn = StoreConnection(store_url, timeout=2.0)
        try:
            return {s["pid"]: s for s in stats_mod.read_all(conn)}.get(pid)
        finally:
            conn.close()

    def received_by(pid: int) -> int:
        return (snapshot(pid) or {}).get("handoffs_received", 0)

    def grow() -> int:
        before = set(svc.worker_pids())
        signal_service(svc, signal.SIGTTIN)
        svc.wait_for(lambda: len(svc.worker_pids()) == 2, what="a second worker")
        (grown,) = set(svc.worker_pids()) - before
        return grown

    threads = [threading.Thread(target=busy, args=(k,), daemon=True) for k in range(2)]
    try:
        svc.start()
        (first,) = svc.worker_pids()
        grown = grow()
        os.kill(grown, signal.SIGKILL)
        svc.wait_for(lambda: len(svc.worker_pids()) == 2 and grown not in svc.worker_pids(),
                     what="the respawn")
        (respawned,) = set(svc.worker_pids()) - {first}
        svc.wait_for(lambda: snapshot(respawned) is not None, what="the respawned worker up")
        os.kill(respawned, signal.SIGSTOP)
        try:
            time.sleep(2.5)  # its heartbeat is stale: its sibling takes every new connection
            for t in threads:
                t.start()
            svc.wait_for(lambda: min(answered) > 20, what="both clients served")
        finally:
            os.kill(respawned, signal.SIGCONT)
        svc.wait_for(lambda: received_by(respawned) >= 1, timeout=10,
                     what="a connection handed to the respawned worker")
        cfg.write_text("[service]\nworkers = 1\nmax_workers = 4\n[detection]\nthreshold = 6\n")
        signal_service(svc, signal.SIGHUP)
        svc.wait_log("reload done")
        svc.wait_for(lambda: len(svc.worker_pids()) == 1, what="the roll")
        mark = list(answered)
        svc.wait_for(lambda: all(a > m + 20 for a, m in zip(answered, mark, strict=True)),
                     what="both clients served by the new worker")
        grown = grow()
        svc.wait_for(lambda: received_by(grown) >= 1, timeout=10,
                     what="a connection handed to the reload's new worker")
        mark = list(answered)
        time.sleep(1.0)
        assert all(a > m + 50 for a, m in zip(answered, mark, strict=True)), (answered, mark)
        # A hand-off costs no request, for balance or from the roll's retired worker.
        assert sum(lost) == 0, lost
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(5)
        svc.cleanup()


def test_the_hand_off_directory_of_a_killed_supervisor_is_removed_by_the_next_one(
        store_url: str, tmp_path: Path) -> None:
    """A SIGKILL runs no cleanup: the next `acm serve` on the host removes what it left."""
    env = {"TMPDIR": str(tmp_path)}
    killed = Service(store_url, workers=1, extra_env=env)
    nxt = Service(store_url, workers=1, extra_env=env)
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        killed.start()
        assert killed.proc is not None
        dead_pid = killed.proc.pid
        (left,) = tmp_path.glob("acm-handoff-*")
        killed.stop(signal.SIGKILL)
        assert left.is_dir()  # nothing ran on the way out
        # A directory of a supervisor that is alive (this test's pid) stays, and so does one
        # whose pid looks dead but where a worker still has its inbox bound (a supervisor in
        # another pid namespace sharing the directory).
        alive = tmp_path / f"acm-handoff-{os.getpid()}-x"
        alive.mkdir()
        elsewhere = tmp_path / f"acm-handoff-{dead_pid}-ns"
        elsewhere.mkdir()
        inbox.bind(str(elsewhere / "acm-worker-0"))
        nxt.start()
        assert not left.exists()
        assert alive.is_dir() and elsewhere.is_dir()
        (own,) = (p for p in tmp_path.glob("acm-handoff-*") if p not in (alive, elsewhere))
        assert own.name.startswith(f"acm-handoff-{nxt.proc.pid}-")
        nxt.stop()
        assert not own.exists()  # and its own goes with a clean stop
    finally:
        inbox.close()
        killed.cleanup()
        nxt.cleanup()
