"""A threshold change reaches every worker, under load, with no failed request, in well under
a second (the figure is printed: median and max over 20 changes).

Each client thread calls its own B-number from 4 rotating A-numbers, so every reply after the
warm-up has distinct = 4: threshold 5 allows it, threshold 3 drops it. A client's REQ
connection stays on one worker, so "every client saw the new threshold" plus "every worker
served clients during the run" means every worker applied every change.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest
import zmq

from acm_module.decide.client import Client, ServiceTimeout
from tests.support.mi_helpers import wait_in_sync

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]

CLIENTS = 6
CHANGES = 20
WORKERS = 2


@dataclass
class Caller:
    """One deciding client thread and what it saw: (receive time, dropped?) per reply."""

    index: int
    seen: list[tuple[float, bool]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_caller(c: Caller, endpoint: str, ctx: zmq.Context, stop: threading.Event) -> None:
    b = f"+23480370{c.index:05d}"
    client = Client(endpoint, timeout=2.0, context=ctx)
    n = 0
    try:
        while not stop.is_set():
            a = f"+23480360{c.index:03d}{n % 4:02d}"
            try:
                r = client.decide(f"p{c.index}-{n}", a, b, ts=time.time())
            except ServiceTimeout as e:
                c.failures.append(str(e))
                continue
            finally:
                n += 1
            if "error" in r:
                c.failures.append(f"{r['error']}: {r['message']}")
            elif r["distinct"] == 4:
                c.seen.append((time.perf_counter(), r["verdict"] == "drop"))
            time.sleep(0.001)
    finally:
        client.close()


def first_consistent(c: Caller, since: float, drop: bool, deadline: float) -> float | None:
    """Return when the caller first saw the new behaviour after `since`; None if never."""
    while time.perf_counter() < deadline:
        for t, dropped in c.seen[-2000:]:
            if t >= since and dropped == drop:
                return t
        time.sleep(0.002)
    return None


def test_threshold_change_reaches_every_worker_under_load(mi_factory, zctx: zmq.Context,
                                                          capsys: pytest.CaptureFixture) -> None:
    # The store budget is raised so that a busy CI box cannot turn store latency into failed
    # requests: this test is about the config change, which must fail none.
    with mi_factory(workers=WORKERS, env={"ACM_STORE_TIMEOUT_MS": "1000"}) as (mi, _):
        http = mi.http()
        stop = threading.Event()
        callers = [Caller(i) for i in range(CLIENTS)]
        threads: list[threading.Thread] = []

        def add(c: Caller) -> None:
            t = threading.Thread(target=run_caller, args=(c, mi.svc.endpoint, zctx, stop),
                                 daemon=True)
            t.start()
            threads.append(t)

        before = {w["index"]: w["requests"] for w in wait_in_sync(mi)["workers"]}
        try:
            for c in list(callers):
                add(c)
            # The kernel hands each connection to one worker; until every worker serves a
            # client (stats lag ~1 s), add clients.
            for _ in range(10):
                time.sleep(1.2)
                served = {w["index"]: w["requests"] - before.get(w["index"], 0)
                          for w in mi.http().execute("acm_stats")["workers"]}
                if len(served) == WORKERS and all(n > 0 for n in served.values()):
                    break
                for _ in range(2):
                    callers.append(Caller(len(callers)))
                    add(callers[-1])
            else:
                pytest.fail(f"clients never reached every worker: {served}")
            time.sleep(0.3)  # the new clients' windows reach 4 distinct A-numbers
            assert all(c.seen for c in callers), "a client got no reply during warm-up"
            propagation: list[float] = []
            set_rtt: list[float] = []
            for i in range(CHANGES):
                threshold = 3 if i % 2 == 0 else 5
                t0 = time.perf_counter()
                r = http.execute("acm_set", {"threshold": threshold})
                set_rtt.append(time.perf_counter() - t0)
                assert r["changed"]["threshold"]["new"] == threshold
                worst = 0.0
                for c in callers:
                    t = first_consistent(c, t0, threshold == 3, t0 + 5.0)
                    assert t is not None, f"client {c.index} never saw threshold {threshold}"
                    worst = max(worst, t - t0)
                propagation.append(worst)
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        failures = [f for c in callers for f in c.failures]
        assert failures == [], failures[:5]
        final = wait_in_sync(mi, r["generation"])
        served = {w["index"]: w["requests"] - before.get(w["index"], 0)
                  for w in final["workers"]}
        assert len(served) == WORKERS and all(n > 0 for n in served.values()), served
        assert final["total"]["store_failures"] == 0
        ms = sorted(p * 1000 for p in propagation)
        summary = (f"MI threshold propagation over {CHANGES} changes, {len(callers)} clients, "
                   f"{WORKERS} workers: median {statistics.median(ms):.1f} ms, "
                   f"p90 {ms[int(len(ms) * 0.9) - 1]:.1f} ms, max {ms[-1]:.1f} ms "
                   f"(acm_set round trip median {statistics.median(set_rtt) * 1000:.1f} ms); "
                   f"requests per worker {served}")
        with capsys.disabled():
            print("\n" + summary)
        # Workers poll the config every config_poll_ms (50 ms): ~50 ms median measured on a
        # loaded 2-core VM; the bounds leave room for a slower box so the test does not flake.
        assert statistics.median(ms) < 150, summary
        assert ms[-1] < 3000, summary  # a stalled VM, not the design: see the median
