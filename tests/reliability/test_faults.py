"""Faults under load, seen from OpenSIPS: workers SIGKILLed, the store gone, the service gone.

Load comes from several processes each driving the OpenSIPS-side client (`AcmClient` of
opensips_scripts/acm_opensips.py, the code OpenSIPS runs), so every call must end with the
service's verdict or the client's policy verdict within its timeout. Every figure is printed
(run with -s to see them) and recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import signal
import statistics
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from acm_module.core import stats
from acm_module.decide.client import Client, ServiceTimeout
from acm_module.decide.store.conn import StoreConnection
from tests.support.opensips_script import load_acm_opensips
from tests.support.servers import RedisServer, Service, wait_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

TIMEOUT_MS = 250.0  # the client's budget per call (production default: 50 ms)
# A call's wall time may exceed its budget by scheduling alone on a loaded 2-core machine
# (other engineers' suites run beside this one); calls over budget + 50 ms are counted and
# printed, calls over budget + SLACK_S fail the test.
SLACK_S = 1.0
# The supervisor counts a death within 1 s of a worker's start as a crash loop and backs off;
# the killer leaves a worker alone until it has lived this long, so every kill is a first one.
MIN_AGE_S = 1.2
KILL_EVERY_S = 0.3


acm = load_acm_opensips("acm_opensips_rel")


# -- helpers -------------------------------------------------------------------------------
def worker_map(sup_pid: int) -> dict[int, int]:
    """Return {worker index: pid} of the supervisor's live acm-worker-N children."""
    try:
        with open(f"/proc/{sup_pid}/task/{sup_pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return {}
    out: dict[int, int] = {}
    for k in kids:
        try:
            with open(f"/proc/{k}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{k}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm.startswith("acm-worker-") and state != "Z":
            out[int(comm.rsplit("-", 1)[1])] = int(k)
    return out


def _load_proc(k: int, endpoint: str, stop: Any, results: Any, tag: str) -> None:
    """Drive AcmClient.check() until `stop`; put one summary dict on `results`."""
    try:
        client = acm.AcmClient(acm.Config(endpoint=endpoint, timeout_ms=TIMEOUT_MS),
                               log=lambda key, msg: None)
        client.after_fork(k)
        lat: list[float] = []
        kinds: Counter[str] = Counter()
        wrong: list[Any] = []
        timeline: list[tuple[float, bool]] = []  # (wall time, policy?) per call
        i = 0
        while not stop.is_set():
            # A fresh B-number per call: every verdict the service gives must be allow/clean.
            b = f"+2349{k}{i % 10**8:08d}"
            t0 = time.perf_counter()
            v = client.check(f"rel-{tag}-{k}-{i}@x", f"+23480{random.randrange(10**8):08d}", b)
            lat.append(time.perf_counter() - t0)
            timeline.append((time.time(), v.policy))
            if v.policy:
                kinds[f"policy:{v.reason}"] += 1
            else:
                kinds["verdict"] += 1
                if (v.verdict, v.reason) != ("allow", "clean"):
                    wrong.append((v.verdict, v.reason))
            i += 1
            if v.policy and client.state == acm.OPEN:
                time.sleep(0.001)  # an open breaker answers in microseconds; don't spin
        lat.sort()
        results.put({
            "k": k, "calls": i, "kinds": dict(kinds), "wrong": wrong[:10],
            "max_s": lat[-1] if lat else 0.0, "p50_s": lat[len(lat) // 2] if lat else 0.0,
            "p99_s": lat[int(len(lat) * 0.99)] if lat else 0.0,
            "over_budget": sum(1 for x in lat if x > TIMEOUT_MS / 1000 + SLACK_S),
            "late": sum(1 for x in lat if x > TIMEOUT_MS / 1000 + 0.05),
            "stats": {f: getattr(client.stats, f) for f in client.stats.__slots__},
            "state": client.state, "timeline": timeline,
        })
        client.close()
    except BaseException as e:  # the parent asserts on this
        results.put({"k": k, "crash": repr(e)})


class LoadProcs:
    """N forked processes, each one OpenSIPS process with its own AcmClient."""

    def __init__(self, n: int, endpoint: str, tag: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_load_proc, args=(k, endpoint, self.stop, self.results,
                                                           tag), daemon=True)
                      for k in range(n)]

    def __enter__(self) -> LoadProcs:
        for p in self.procs:
            p.start()
        return self

    def collect(self) -> list[dict[str, Any]]:
        self.stop.set()
        out = []
        for _ in self.procs:
            out.append(self.results.get(timeout=30))
        for p in self.procs:
            p.join(10)
        return sorted(out, key=lambda r: r["k"])

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            if p.is_alive():
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _check_load(results: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """Assert every call ended in time with a right verdict; print and return the totals."""
    crashed = [r for r in results if "crash" in r]
    assert not crashed, crashed
    kinds: Counter[str] = Counter()
    cstats: Counter[str] = Counter()
    for r in results:
        kinds.update(r["kinds"])
        cstats.update(r["stats"])
        assert r["wrong"] == [], f"client {r['k']} got wrong verdicts: {r['wrong']}"
        assert r["over_budget"] == 0, (
            f"client {r['k']}: {r['over_budget']} calls over {TIMEOUT_MS} ms + {SLACK_S} s "
            f"(max {r['max_s']:.3f} s)")
    calls = sum(r["calls"] for r in results)
    worst = max(r["max_s"] for r in results)
    print(f"{what}: {len(results)} client processes, {calls} calls: {dict(kinds)}; per call "
          f"p50 {statistics.median(r['p50_s'] for r in results) * 1e3:.2f} ms, worst p99 "
          f"{max(r['p99_s'] for r in results) * 1e3:.1f} ms, max {worst * 1e3:.1f} ms "
          f"(budget {TIMEOUT_MS:g} ms; {sum(r['late'] for r in results)} calls over budget + "
          f"50 ms)")
    print(f"{what}: client stats {dict(cstats)}")
    assert calls > 0 and sum(kinds[k] for k in kinds if k == "verdict") > 0
    return {"calls": calls, "kinds": kinds, "stats": cstats, "max_s": worst}


def _log_time(line: str) -> float:
    """Epoch seconds of a log line's asctime ("2026-11-26 09:16:54,123 ...")."""
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _read_stats(url: str) -> dict[str, Any]:
    conn = StoreConnection(url, timeout=2.0)
    try:
        return stats.summarize(stats.read_all(conn))
    finally:
        conn.close()


# -- workers SIGKILLed under load ----------------------------------------------------------
def test_workers_sigkilled_repeatedly_under_load(store_url: str) -> None:
    svc = Service(store_url, workers=3)
    try:
        svc.start()
        assert svc.proc is not None
        sup = svc.proc.pid
        seen: dict[int, float] = {pid: time.monotonic() - 5.0 for pid in worker_map(sup).values()}
        assert len(seen) == 3
        kills: list[dict[str, Any]] = []
        with LoadProcs(3, svc.endpoint, "k") as load:
            time.sleep(0.7)  # load running before the first kill
            rng = random.Random()
            stop_at = time.monotonic() + 4.5
            next_kill = time.monotonic()
            while time.monotonic() < stop_at:
                now = time.monotonic()
                if now < next_kill:
                    time.sleep(next_kill - now)
                    continue
                live = worker_map(sup)
                for pid in live.values():
                    seen.setdefault(pid, time.monotonic())
                eligible = [(i, p) for i, p in live.items()
                            if time.monotonic() - seen[p] >= MIN_AGE_S]
                if not eligible:
                    time.sleep(0.02)
                    continue
                index, pid = rng.choice(eligible)
                wall = time.time()
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                new = None
                while time.monotonic() - t0 < 5.0:
                    cur = worker_map(sup).get(index)
                    if cur is not None and cur != pid:
                        new = cur
                        break
                    time.sleep(0.002)
                respawn_s = time.monotonic() - t0
                assert new is not None, f"worker {index} not respawned in 5 s\n{svc.read_log()}"
                seen[new] = time.monotonic()
                kills.append({"index": index, "old": pid, "new": new, "wall": wall,
                              "respawn_s": respawn_s})
                next_kill = t0 + KILL_EVERY_S
            time.sleep(1.0)  # calls after the last kill
            results = load.collect()

        total = _check_load(results, "SIGKILL")
        # Every kill is in the supervisor's log, and every replacement booted.
        log = svc.read_log()
        respawn_lines = re.findall(r"worker \d+ \(pid \d+\) exited with -9; respawning", log)
        ready = []
        for k in kills:
            m = re.search(rf"^(.{{23}}) .*worker {k['index']} up \(pid {k['new']},", log, re.M)
            assert m, f"replacement pid {k['new']} never booted\n{log[-3000:]}"
            ready.append(_log_time(m.group(1)) - k["wall"])
        resp = [k["respawn_s"] for k in kills]
        print(f"SIGKILL: {len(kills)} kills in ~4.5 s; respawn (kill -> new pid) "
              f"median {statistics.median(resp) * 1e3:.0f} ms, max {max(resp) * 1e3:.0f} ms; "
              f"kill -> 'worker up' logged: median {statistics.median(ready) * 1e3:.0f} ms, "
              f"max {max(ready) * 1e3:.0f} ms; respawn lines in log: {len(respawn_lines)}")
        assert len(kills) >= 5
        assert max(resp) < 1.0, resp
        assert max(ready) < 3.0, ready  # the new worker has its store connection and serves
        assert len(respawn_lines) == len(kills)
        assert "failed to boot" not in log
        assert total["kinds"]["verdict"] > total["calls"] // 2
        # The pool is whole again and answers.
        assert len(worker_map(sup)) == 3
        with Client(svc.endpoint, timeout=2.0) as c:
            assert c.decide("after-kills", "+2348030000001", "+2348039999991")["reason"] == "clean"
    finally:
        svc.cleanup()



def test_a_worker_dying_right_after_start_is_respawned_with_backoff_not_in_a_storm(
        store_url: str) -> None:
    """Kill worker 0 as soon as each replacement appears: the delays grow, the pool answers."""
    svc = Service(store_url, workers=2)
    try:
        svc.start()
        assert svc.proc is not None
        sup = svc.proc.pid
        delays = []
        t_start = time.monotonic()
        pid = worker_map(sup)[0]
        for _ in range(4):
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            new = None
            while time.monotonic() - t0 < 5.0:
                cur = worker_map(sup).get(0)
                if cur is not None and cur != pid:
                    new = cur
                    break
                time.sleep(0.002)
            assert new is not None, svc.read_log()
            delays.append(time.monotonic() - t0)
            pid = new
        loop_s = time.monotonic() - t_start
        print(f"crash loop: 4 deaths within 1 s of start, respawn delays "
              f"{', '.join(f'{d * 1e3:.0f}' for d in delays)} ms ({loop_s:.1f} s in all)")
        # The first deaths are respawned at once, then the supervisor backs off (0.4, 0.8,
        # 1.6 s...): 4 deaths take seconds, not milliseconds.
        assert delays[0] < 1.0
        assert delays[-1] >= 1.0 and delays[-1] > delays[0]
        assert loop_s >= 2.0
        # Worker 1 served throughout; worker 0 is back and the service never gave up.
        assert svc.proc.poll() is None and len(worker_map(sup)) == 2
        with Client(svc.endpoint, timeout=2.0) as c:
            assert c.decide("after-loop", "+2348030000001", "+2348039999993")["reason"] == "clean"
    finally:
        svc.cleanup()

# -- the store stopped and restarted under load -------------------------------------------
def test_store_stopped_and_restarted_under_load() -> None:
    srv = RedisServer().start()
    svc = Service(srv.url, workers=2)
    try:
        svc.start()
        pids = svc.worker_pids()
        assert len(pids) == 2
        probe_log: list[tuple[float, str]] = []  # (monotonic, verdict or error code)
        stop_probe = threading.Event()

        def probe() -> None:
            with Client(svc.endpoint, timeout=1.0) as c:
                n = 0
                while not stop_probe.is_set():
                    n += 1
                    try:
                        r = c.decide(f"probe-{n}", "+2348030000009", f"+23481{n:09d}")
                        probe_log.append((time.monotonic(), r.get("error") or r["verdict"]))
                    except ServiceTimeout:
                        probe_log.append((time.monotonic(), "timeout"))
                    time.sleep(0.005)

        pt = threading.Thread(target=probe, daemon=True)
        with LoadProcs(3, svc.endpoint, "s") as load:
            pt.start()
            time.sleep(1.0)
            down_wall = time.time()
            srv.stop()
            down_at = time.monotonic()  # redis-server has exited
            time.sleep(1.5)
            # The store's return: from the restart on (the pool may answer before the port
            # probe below sees it). Recovery is measured from here, so it includes the start.
            back_at = time.monotonic()
            back_wall = time.time()
            srv.start()
            assert wait_port(srv.port)
            # Recovery of the pool: the probe's first verdict after the store is back.
            deadline = back_at + 5.0
            recovered_at = None
            while time.monotonic() < deadline and recovered_at is None:
                recovered_at = next((t for t, r in probe_log if t >= back_at and r in
                                     ("allow", "drop")), None)
                time.sleep(0.01)
            # The clients' breakers stay closed (the pool answers store_unavailable at once), so
            # their calls are checked again as soon as the pool is.
            time.sleep(1.5)
            results = load.collect()
            stop_probe.set()
            pt.join(5)

        total = _check_load(results, "store outage")
        during = [r for t, r in probe_log if down_at + 0.05 < t < back_at]
        assert during and set(during) <= {"store_unavailable"}, Counter(during)
        assert recovered_at is not None, "the pool did not recover within 5 s"
        recovery_s = recovered_at - back_at
        # Per client: first service verdict after the store came back (breaker closed again).
        client_back = []
        for r in results:
            first = next((t for t, policy in r["timeline"] if t >= back_wall and not policy),
                         None)
            assert first is not None, f"client {r['k']} never got a verdict after the outage"
            client_back.append(first - back_wall)
            # Nothing but policy verdicts between the outage and the recovery, and every
            # one of them in time (checked in _check_load).
            assert r["state"] == acm.CLOSED
        assert svc.worker_pids() == pids, "a worker died during the store outage"
        time.sleep(1.2)  # a stats period after recovery
        summary = _read_stats(srv.url)
        print(f"store outage: 1.5 s down; probe answers while down: {Counter(during)}; "
              f"pool recovered {recovery_s * 1e3:.0f} ms after the store's return; "
              f"clients' first verdict after return: "
              f"{', '.join(f'{x:.2f} s' for x in client_back)}; worker store_failures "
              f"{summary['store_failures']}, store_unavailable replies "
              f"{summary['decisions'].get('store_unavailable', 0)}; outage began "
              f"{down_wall:.3f}")
        # Counted from the restart, so it holds redis-server's own start; a worker that retried
        # just before the port opened waits one more backoff (at most 1 s, jittered): on a
        # loaded box that can pass 2 s (2.21 s seen in a full CI run).
        assert recovery_s < 3.0
        assert summary["store_failures"] >= 2  # each worker noticed
        assert summary["decisions"].get("store_unavailable", 0) > 0
        assert total["stats"]["breaker_opened"] == 0
        # Checked again within a second of the store's return (an open breaker kept them
        # unchecked for its 1-4 s cooldown).
        assert max(client_back) < recovery_s + 1.0, client_back
        assert "Traceback" not in svc.read_log()
    finally:
        svc.cleanup()
        srv.cleanup()



def test_the_control_plane_answers_at_once_after_a_store_restart() -> None:
    """An idle store connection (the MI process's) must not fail the first command after a
    store restart with "store closed the connection"."""
    import json
    import urllib.request

    srv = RedisServer().start()
    svc = Service(srv.url, workers=1)
    conn = StoreConnection(srv.url, timeout=2.0)

    def mi(method: str) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
        req = urllib.request.Request(f"http://{svc.mi_http}/mi", body)
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.loads(r.read()))

    try:
        svc.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                if "result" in mi("acm_get_config"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, svc.read_log()
            time.sleep(0.05)
        assert conn.call("PING") == b"PONG"
        srv.stop()
        srv.start()
        assert conn.call("PING") == b"PONG"  # the first command after the restart
        rep = mi("acm_get_config")
        assert "result" in rep, rep
    finally:
        conn.close()
        svc.cleanup()
        srv.cleanup()

# -- the OpenSIPS side with the service down: the breaker ---------------------------------
class _CountingClient(acm.AcmClient):  # type: ignore[name-defined,misc]
    """AcmClient counting every attempt at socket I/O (all of it goes through _roundtrip)."""

    io_calls = 0

    def _roundtrip(self, payload: bytes, start: float) -> bytes:
        type(self).io_calls += 1
        return super()._roundtrip(payload, start)


def test_open_breaker_costs_microseconds_and_closes_when_the_service_returns(
        store_url: str) -> None:
    svc = Service(store_url, workers=1)
    cooldown_ms = 3000.0
    client = _CountingClient(acm.Config(endpoint=svc.endpoint, timeout_ms=50.0,
                                        breaker_cooldown_ms=cooldown_ms),
                             log=lambda key, msg: None)
    try:
        svc.start()
        client.after_fork(1)
        v = client.check("up-1", "+2348030000001", "+2348039999992")
        assert not v.policy and v.reason == "clean"
        svc.stop()
        # Closed breaker, service gone: each call costs the timeout until the breaker opens.
        failing = []
        while client.state != acm.OPEN:
            t0 = time.perf_counter()
            v = client.check(f"down-{len(failing)}", "+2348030000002", "+2348039999992")
            failing.append(time.perf_counter() - t0)
            assert v.policy and v.verdict == "allow" and v.reason == "service_unavailable"
            assert len(failing) <= 3
        assert len(failing) == 3
        # Open breaker: no I/O at all, the policy verdict at once.
        io_before, sent_before = _CountingClient.io_calls, client.stats.sent
        n = 10_000
        per_call = []
        t_all = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter_ns()
            v = client.check(f"open-{i}", "+2348030000003", "+2348039999992")
            per_call.append(time.perf_counter_ns() - t0)
            assert v.policy
        all_s = time.perf_counter() - t_all
        assert all_s < cooldown_ms / 1000, "the cooldown ran out during the measurement"
        per_call.sort()
        med_us = per_call[n // 2] / 1000
        p99_us = per_call[int(n * 0.99)] / 1000
        assert _CountingClient.io_calls == io_before and client.stats.sent == sent_before
        assert client.stats.short_circuits == n
        print(f"breaker: {len(failing)} calls at the timeout while closed "
              f"({', '.join(f'{x * 1e3:.1f}' for x in failing)} ms); then {n} calls open: "
              f"median {med_us:.2f} us, p99 {p99_us:.2f} us per call, no socket I/O")
        assert med_us < 100.0  # microseconds, not the 50 ms timeout
        # The service returns: the first call after the cooldown is the trial, and closes it.
        svc.start()
        ready_at = time.monotonic()
        closed_at = None
        while time.monotonic() - ready_at < cooldown_ms / 1000 + 5.0:
            v = client.check(f"back-{time.monotonic_ns()}", "+2348030000004",
                             f"+2348{random.randrange(10**9):09d}")
            if not v.policy:
                closed_at = time.monotonic()
                break
            time.sleep(0.01)
        assert closed_at is not None, "the breaker never closed"
        assert client.state == acm.CLOSED and v.reason == "clean"
        print(f"breaker: closed by its trial {closed_at - ready_at:.2f} s after the service "
              f"was ready (cooldown {cooldown_ms / 1000:g} s); client stats {client.stats}")
    finally:
        with contextlib.suppress(Exception):
            client.close()
        svc.cleanup()

