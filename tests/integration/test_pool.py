"""The worker pool as an operator sees it: respawn, drain, boot failures, a store that goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from acm_module.decide.client import Client, ServiceTimeout
from tests.support.servers import RedisServer, Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

B = "+2348039999999"


def test_a_killed_worker_is_respawned_and_the_pool_keeps_answering(service_factory) -> None:
    with service_factory(workers=2) as (svc, client):
        before = svc.worker_pids()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            now = svc.worker_pids()
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.02)
        respawn_s = time.monotonic() - t0
        assert len(now) == 2 and before[0] not in now, svc.read_log()
        assert respawn_s < 1.0
        # The client's connection may have been on the dead worker: a timeout then a retry on
        # a fresh socket is what OpenSIPS's side does too.
        answered = 0
        for i in range(20):
            try:
                client.decide(f"r{i}", f"+2348030000{i:03d}", B, ts=100.0 + i)
                answered += 1
            except ServiceTimeout:
                pass
        assert answered >= 19
        assert "respawning" in svc.read_log()


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(service_factory, zctx) -> None:
    import msgpack
    import zmq

    with service_factory(workers=2) as (svc, _client):
        stop = threading.Event()
        term_at: list[float] = []
        sent_before_term = [0] * 6
        lost_before_term: list[tuple[int, int]] = []

        def load(k: int) -> None:
            s = zctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(svc.endpoint)
            try:
                i = 0
                while not stop.is_set():
                    s.send(msgpack.packb({"call_id": f"d{k}-{i}", "a": f"+23480310{k:02d}{i:03d}",
                                          "b": B, "ts": 10.0 + i}))
                    sent_at = time.monotonic()  # the request is in the socket's pipe now
                    before = not term_at or sent_at < term_at[0]
                    if not s.poll(2000):
                        if before:
                            lost_before_term.append((k, i))
                        break
                    assert "verdict" in msgpack.unpackb(s.recv())
                    sent_before_term[k] += before
                    i += 1
            finally:
                s.close(linger=0)

        threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert svc.proc is not None
        term_at.append(time.monotonic())
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(15)
        stop.set()
        for t in threads:
            t.join(5)
        assert code == 0, svc.read_log()
        assert "Traceback" not in svc.read_log()  # every worker stopped cleanly too
        assert sum(sent_before_term) > 50
        assert lost_before_term == []
        assert not os.path.exists(svc.endpoint[len("ipc://"):])


def test_a_worker_that_cannot_boot_stops_the_service_instead_of_respawning(store_url,
                                                                          tmp_path) -> None:
    from acm_module.decide.access import generate_keypair
    from acm_module.decide.client import CurveKeys

    public, secret = generate_keypair(tmp_path, "server")
    svc = Service(store_url, workers=1, args=["--curve-server-key", str(secret)],
                  curve=CurveKeys.load(str(public)))
    try:
        svc.start()
        secret.unlink()  # its key file gone, a new worker cannot boot
        os.kill(svc.worker_pids()[0], signal.SIGKILL)
        assert svc.proc is not None
        code = svc.proc.wait(20)
        assert code == 3
        log = svc.read_log()
        assert log.count("failed to boot") == 2, log  # the worker's line and the halt's
        assert "not respawning" in log
    finally:
        svc.cleanup()


def test_the_supervisor_holds_no_connection_only_the_listening_socket(service_factory) -> None:
    with service_factory(workers=2) as (svc, client):
        client.decide("fd-check", "+2348030000001", B, ts=1.0)
        assert svc.proc is not None
        fd_dir = f"/proc/{svc.proc.pid}/fd"
        sockets = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)
                   if os.readlink(f"{fd_dir}/{fd}").startswith("socket:")]
        # The control-plane sidecar owns its own sockets; the supervisor keeps only the
        # request listener shared with the workers.
        assert len(sockets) == 1, sockets


def test_store_outage_gets_fast_errors_then_recovers(zctx) -> None:
    srv = RedisServer().start()
    svc = Service(srv.url, workers=2)
    try:
        svc.start()
        c = Client(svc.endpoint, timeout=1.0, context=zctx)
        try:
            assert c.decide("before", "+2348030000001", B, ts=1.0)["reason"] == "clean"
            srv.stop()
            # Every request still gets an answer, well within the client's timeout.
            for i in range(20):
                t = time.monotonic()
                r = c.decide(f"down{i}", "+2348030000002", B, ts=2.0)
                assert r["error"] == "store_unavailable"
                assert time.monotonic() - t < 0.5
            srv.start()
            back = time.monotonic()
            while True:
                r = c.decide(f"up{time.monotonic_ns()}", "+2348030000003", B, ts=3.0)
                if "verdict" in r:
                    break
                assert time.monotonic() - back < 2.0, f"pool did not recover within 2 s: {r}"
                time.sleep(0.01)
            assert r["reason"] == "clean"
            assert sorted(svc.worker_pids()) == sorted(svc.worker_pids())  # still there
            assert len(svc.worker_pids()) == 2
        finally:
            c.close()
    finally:
        svc.cleanup()
        srv.cleanup()


def test_slow_store_gets_errors_within_the_timeout_and_counts_them(redis_server, zctx) -> None:
    from acm_module.core import stats
    from acm_module.decide.store.conn import StoreConnection
    from tests.support.servers import DelayProxy, flush

    flush(redis_server)
    proxy = DelayProxy(int(redis_server.rsplit(":", 1)[1].split("/")[0]))
    svc = Service(proxy.url, workers=1, extra_env={"ACM_STORE_TIMEOUT_MS": "30"})
    try:
        svc.start()
        c = Client(svc.endpoint, timeout=1.0, context=zctx)
        try:
            assert c.decide("fast", "+2348030000001", B, ts=1.0)["reason"] == "clean"
            proxy.delay = 0.2  # the store answers, but far too late
            for i in range(5):
                t = time.monotonic()
                r = c.decide(f"slow{i}", "+2348030000002", B, ts=2.0)
                assert r["error"] == "store_unavailable"
                assert time.monotonic() - t < 0.3  # the worker's 30 ms, not the store's 200
            proxy.delay = 0.0
            deadline = time.monotonic() + 3
            while "verdict" not in (r := c.decide(f"ok{time.monotonic_ns()}", "+2348030000003",
                                                   B, ts=3.0)):
                assert time.monotonic() < deadline, r
                time.sleep(0.02)
            # Stats are published once a second; a loaded machine may take a few periods.
            conn = StoreConnection(redis_server, timeout=2.0)
            try:
                deadline = time.monotonic() + 10
                while True:
                    snaps = stats.read_all(conn)
                    if ((sum(s["store_failures"] for s in snaps) >= 1 and sum(
                            s["decisions"].get("store_unavailable", 0) for s in snaps) >= 5)
                            or time.monotonic() > deadline):
                        break
                    time.sleep(0.2)
            finally:
                conn.close()
            assert sum(s["store_failures"] for s in snaps) >= 1
            assert sum(s["decisions"].get("store_unavailable", 0) for s in snaps) >= 5
        finally:
            c.close()
    finally:
        svc.cleanup()
        proxy.close()


def test_workers_and_sidecars_exit_when_the_supervisor_is_killed(service_factory) -> None:
    with service_factory(workers=2) as (svc, _client):
        assert svc.proc is not None
        out = subprocess.run(["pgrep", "-P", str(svc.proc.pid)], capture_output=True, text=True)
        children = [int(x) for x in out.stdout.split()]
        assert len(children) >= 2  # workers, and the MI/metrics sidecars
        svc.proc.kill()  # SIGKILL: the supervisor cannot stop anyone itself
        svc.proc.wait(5)
        deadline = time.monotonic() + 5
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _running(p)]
            time.sleep(0.05)
        assert alive == [], "orphaned workers kept running after the supervisor died"


def test_an_idle_supervisor_sleeps_and_still_respawns_at_once(service_factory) -> None:
    """Exits come through SIGCHLD and a self-pipe: no periodic poll wakes an idle supervisor."""
    with service_factory(workers=2) as (svc, _client):
        assert svc.proc is not None
        time.sleep(0.5)
        before = _wakeups(svc.proc.pid)
        time.sleep(3.0)
        # At most the heartbeat check (every ~10 s); a 250 ms poll woke it 12 times.
        assert _wakeups(svc.proc.pid) - before <= 2
        pid = svc.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and (pid in svc.worker_pids()
                                             or len(svc.worker_pids()) < 2):
            time.sleep(0.005)
        assert pid not in svc.worker_pids() and len(svc.worker_pids()) == 2
        assert time.monotonic() - t0 < 1.0


def _wakeups(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.parametrize("worker_io", ["zmtp", "libzmq"])
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_every_new_connection_is_answered_when_many_connect_at_once(store_url, zctx,
                                                                    transport, worker_io) -> None:
    """Each worker polls the one shared listening socket: a lost accept race must not stall.

    OpenSIPS opens one connection per forked process, all at start-up. A worker that loses the
    accept race on a blocking listener would hang in accept() with its connections unserved
    (3% of requests lost here before the listener was made non-blocking).
    """
    import msgpack
    import zmq

    from tests.support.servers import free_port

    svc = Service(store_url, workers=2, extra_env={"ACM_WORKER_IO": worker_io})
    if transport == "tcp":
        svc.endpoint = f"tcp://127.0.0.1:{free_port()}"
    try:
        svc.start()
        lost: list[tuple[int, int]] = []
        for rnd in range(40):
            socks = []
            try:
                for _ in range(12):
                    s = zctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(svc.endpoint)
                    socks.append(s)
                for i, s in enumerate(socks):
                    s.send(msgpack.packb({"call_id": f"burst-{rnd}-{i}", "a": f"+2348031{i:06d}",
                                          "b": f"+234803{rnd:07d}"}))
                verdicts = []
                for i, s in enumerate(socks):
                    if s.poll(5000):
                        verdicts.append(msgpack.unpackb(s.recv())["verdict"])
                    else:
                        lost.append((rnd, i))
                # 12 distinct callers to one B-number: the first 4 pass, whatever the order.
                assert lost or sorted(verdicts) == ["allow"] * 4 + ["drop"] * 8, verdicts
            finally:
                for s in socks:
                    s.close(linger=0)
        assert not lost, f"{len(lost)} of 480 requests unanswered: {lost[:12]}"
    finally:
        svc.cleanup()


def test_the_listening_socket_is_non_blocking() -> None:
    import tempfile

    from acm_module.decide.supervisor import listen_socket

    with tempfile.TemporaryDirectory() as d:
        for endpoint in (f"ipc://{d}/l.sock", "tcp://127.0.0.1:0"):
            s = listen_socket(endpoint)
            try:
                assert not os.get_blocking(s.fileno()), endpoint
            finally:
                s.close()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_connections_made_all_at_once_at_start_spread_over_the_workers(store_url, zctx,
                                                                       transport) -> None:
    """8 OpenSIPS processes connect to an idle pool: no worker serves > 1.5x the mean.

    The kernel wakes the first idle worker polling the listening socket for each connection;
    without spreading it took every connection and served every request while its siblings
    idled (560/0 and 12,075/0 requests per worker through a real OpenSIPS).
    """
    from acm_module.core import stats as stats_mod
    from acm_module.decide.store.conn import StoreConnection
    from tests.support.servers import free_port

    workers, clients, run_s = 2, 8, 3.0
    svc = Service(store_url, workers=workers)
    if transport == "tcp":
        svc.endpoint = f"tcp://127.0.0.1:{free_port()}"
    counts = [0] * clients
    errors: list[str] = []
    socks: list[Client] = []
    try:
        svc.start()  # the pool is up and idle, as when OpenSIPS starts after it
        # OpenSIPS forks its processes one after another; each connects in child_init().
        for _ in range(clients):
            socks.append(Client(svc.endpoint, timeout=10.0, context=zctx))
            time.sleep(0.02)
        stop = time.monotonic() + run_s

        def opensips_process(k: int) -> None:
            c = socks[k]
            try:
                i = 0
                while time.monotonic() < stop:
                    r = c.decide(f"spread-{k}-{i}", f"+2348031{k:06d}", f"+234804{k}{i:07d}")
                    if r.get("verdict") != "allow":
                        errors.append(repr(r))
                    counts[k] += 1
                    i += 1
            except Exception as e:  # the assertion below names it
                errors.append(repr(e))

        threads = [threading.Thread(target=opensips_process, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(run_s + 20)
        assert not errors, errors[:5]
        time.sleep(1.5)  # every worker publishes its counters once a second
        conn = StoreConnection(svc.store_url, timeout=2.0)
        try:
            snaps = stats_mod.read_all(conn)
        finally:
            conn.close()
        served = [s["requests"] for s in snaps]
        conns = [s["connections"] for s in snaps]
        mean = sum(counts) / workers
        print(f"\n{transport}: {clients} clients, {sum(counts)} requests; per worker {served} "
              f"(max/mean {max(served) / mean:.2f}), connections {conns}")
        assert len(served) == workers and sum(served) >= sum(counts)
        assert max(served) <= 1.5 * mean, f"per-worker requests {served}, connections {conns}"
        assert sorted(conns) == [clients // workers] * workers, conns
        # Processes come and go: 3 leave (from whichever workers), 3 others connect; the new
        # ones go where the leavers left room.
        for c in socks[:3]:
            c.close()
        time.sleep(0.5)
        for k in range(3):
            socks[k] = Client(svc.endpoint, timeout=10.0, context=zctx)
            assert socks[k].decide(f"again-{k}", "x", "y")["reason"] == "invalid_b"
            time.sleep(0.02)
        time.sleep(1.5)
        conn = StoreConnection(svc.store_url, timeout=2.0)
        try:
            conns = [s["connections"] for s in stats_mod.read_all(conn)]
        finally:
            conn.close()
        assert sorted(conns) == [clients // workers] * workers, conns
    finally:
        for c in socks:
            c.close()
        svc.cleanup()


def _worker_snapshots(store_url: str) -> dict[int, dict]:
    """Return the fresh stats snapshot of each worker process, by pid."""
    from acm_module.core import stats as stats_mod
    from acm_module.decide.store.conn import StoreConnection

    conn = StoreConnection(store_url, timeout=2.0)
    try:
        return {s["pid"]: s for s in stats_mod.read_all(conn)}
    finally:
        conn.close()


def _rates(a: dict[int, dict], b: dict[int, dict]) -> list[float]:
    """Requests per second of each worker between two snapshot sets (by their own clocks)."""
    return [(b[p]["requests"] - a[p]["requests"]) / max(1e-3, b[p]["updated"] - a[p]["updated"])
            for p in sorted(a.keys() & b.keys())]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_busy_connections_are_moved_so_no_worker_serves_over_1_5x_the_mean(store_url, zctx,
                                                                           transport) -> None:
    """Unequal OpenSIPS processes: the busiest worker hands connections to idler siblings.

    The kernel gives most INVITEs to OpenSIPS's first UDP processes, so equal connection counts
    still left one of 4 workers 1.51x the mean through a real OpenSIPS. Here both busy
    processes land on one worker (connected while it was alone, before SIGTTIN grows the pool)
    and 6 quiet ones spread over the 3 others: 2 connections each, yet that worker serves 2.3x
    the mean until it hands connections over. No request may be lost or wait out its timeout
    across the hand-offs.
    """
    import msgpack
    import zmq

    from tests.support.servers import free_port

    busy_rate, quiet_rate, settle_s, measure_s = 200.0, 50.0, 5.0, 3.0
    svc = Service(store_url, workers=1, args=["--max-workers", "4"])
    if transport == "tcp":
        svc.endpoint = f"tcp://127.0.0.1:{free_port()}"
    errors: list[str] = []
    sent = [0] * 9
    answered = [0] * 9
    socks: list[zmq.Socket] = []
    stop = threading.Event()
    try:
        svc.start()
        assert svc.proc is not None

        def connect(kind: int = zmq.REQ) -> zmq.Socket:
            s = zctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(svc.endpoint)
            socks.append(s)
            return s

        busy = [connect(), connect()]
        for s in busy:  # connected to the lone worker before the pool grows
            s.send(msgpack.packb({"call_id": "hello", "a": "x", "b": "y"}))
            assert s.poll(5000) and s.recv()
        for _ in range(3):
            svc.proc.send_signal(signal.SIGTTIN)
            time.sleep(0.1)
        svc.wait_for(lambda: len(svc.worker_pids()) == 4, what="4 workers")
        time.sleep(1.0)  # booted: each new worker takes 2 of the quiet ones
        quiet = [connect() for _ in range(6)]

        def paced(k: int, s: zmq.Socket, rate: float) -> None:
            """One OpenSIPS process: one request at a time, `rate` a second."""
            i = 0
            t0 = time.monotonic()
            try:
                while not stop.is_set():
                    s.send(msgpack.packb({"call_id": f"rb-{k}-{i}", "a": f"+2348031{k:06d}",
                                          "b": f"+234805{k}{i:07d}"}))
                    sent[k] += 1
                    if not s.poll(5000):
                        errors.append(f"client {k}: request {i} unanswered after 5 s")
                        return
                    if "verdict" not in msgpack.unpackb(s.recv()):
                        errors.append(f"client {k}: request {i} got an error")
                    answered[k] += 1
                    i += 1
                    wait = t0 + i / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
            except Exception as e:  # the assertion below names it
                errors.append(repr(e))

        def pipelined(k: int, s: zmq.Socket, depth: int = 8) -> None:
            """A DEALER keeping `depth` requests in flight, paced to quiet_rate."""
            i = 0
            t0 = time.monotonic()
            try:
                while not stop.is_set() or answered[k] < sent[k]:
                    while not stop.is_set() and sent[k] - answered[k] < depth and (
                            sent[k] < (time.monotonic() - t0) * quiet_rate):
                        s.send_multipart([b"", msgpack.packb({
                            "call_id": f"rbd-{i}", "a": "+2348032000001",
                            "b": f"+234806{i:07d}"})])
                        sent[k] += 1
                        i += 1
                    if s.poll(20):
                        answered[k] += 1
                        s.recv_multipart()
                    elif stop.is_set() and answered[k] < sent[k] and not s.poll(5000):
                        errors.append(f"dealer: {sent[k] - answered[k]} requests unanswered")
                        return
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=paced, args=(k, s, busy_rate))
                   for k, s in enumerate(busy)]
        threads += [threading.Thread(target=paced, args=(2 + k, s, quiet_rate))
                    for k, s in enumerate(quiet)]
        threads.append(threading.Thread(target=pipelined, args=(8, connect(zmq.DEALER))))
        for t in threads:
            t.start()
        time.sleep(2.0)  # stats are published once a second
        first = _worker_snapshots(svc.store_url)
        time.sleep(settle_s - 2.0)
        before = _worker_snapshots(svc.store_url)
        time.sleep(measure_s)
        after = _worker_snapshots(svc.store_url)
        stop.set()
        for t in threads:
            t.join(15)
        early, rates = _rates(first, before), _rates(before, after)
        mean = sum(rates) / max(1, len(rates))
        moves = sum(s.get("handoffs_received", 0) for s in after.values())
        print(f"\n{transport}: requests/s per worker, first {settle_s - 2.0:.0f} s: "
              f"{[round(r) for r in early]}; then {[round(r) for r in rates]} "
              f"(max/mean {max(rates) / mean:.2f}); connections "
              f"{[s['connections'] for s in after.values()]}; hand-offs {moves}")
        assert not errors, errors[:5]
        assert sent == answered
        assert len(rates) == 4, (first.keys(), after.keys())
        assert max(rates) <= 1.5 * mean, (rates, svc.read_log()[-3000:])
        assert moves >= 1
    finally:
        stop.set()
        for s in socks:
            s.close(linger=0)
        svc.cleanup()


def test_a_socket_file_left_by_a_killed_supervisor_does_not_stop_the_next_start(
        store_url) -> None:
    svc = Service(store_url, workers=1)
    path = svc.endpoint[len("ipc://"):]
    try:
        svc.start()
        assert svc.proc is not None
        out = subprocess.run(["pgrep", "-P", str(svc.proc.pid)], capture_output=True, text=True)
        children = [int(x) for x in out.stdout.split()]  # workers and sidecars
        svc.stop(signal.SIGKILL)  # no clean-up: the socket file stays behind
        deadline = time.monotonic() + 5
        while any(_running(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(path)
        svc.start()  # nobody listens on the stale file: it is replaced
        with Client(svc.endpoint, timeout=5.0) as c:
            assert c.decide("after-kill", "x", "y")["reason"] == "invalid_b"
    finally:
        svc.cleanup()


def test_a_second_instance_never_steals_the_socket_of_a_running_one(store_url) -> None:
    first = Service(store_url, workers=1)
    second = Service(store_url, workers=1)
    second.endpoint = first.endpoint
    try:
        first.start()
        second.start(wait=False)
        assert second.proc is not None
        code = second.proc.wait(15)
        assert code == 2, second.read_log()
        assert "already serving" in second.read_log()
        with Client(first.endpoint, timeout=5.0) as c:  # the running one still answers
            assert c.decide("still-mine", "x", "y")["reason"] == "invalid_b"
    finally:
        second.cleanup()
        first.cleanup()


def test_an_ipc_endpoint_on_a_regular_file_is_refused_and_the_file_kept(tmp_path) -> None:
    from acm_module.core.errors import ConfigError
    from acm_module.decide.supervisor import listen_socket

    f = tmp_path / "not-a-socket"
    f.write_text("keep")
    with pytest.raises(ConfigError, match="not a socket"):
        listen_socket(f"ipc://{f}")
    assert f.read_text() == "keep"
