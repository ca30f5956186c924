"""The worker's store budget: a slow round trip costs the calls it holds, not the ones after it;
a store that is really gone is still answered at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from acm_module.decide.client import Client
from tests.support.servers import DelayProxy, Service, flush

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

B = "+2348039999999"
TIMEOUT_MS = 100  # roomy: the reconnect's own round trips must fit on a loaded machine


@pytest.fixture
def slow_store(redis_server: str, zctx) -> Iterator[tuple[DelayProxy, Client]]:
    """One worker whose store sits behind a proxy that can delay or black-hole it."""
    flush(redis_server)
    proxy = DelayProxy(int(redis_server.rsplit(":", 1)[1].split("/")[0]))
    # No housekeeping round trip (config poll) in the windows these tests look at.
    svc = Service(proxy.url, workers=1, extra_env={"ACM_STORE_TIMEOUT_MS": str(TIMEOUT_MS),
                                                   "ACM_CONFIG_POLL_MS": "5000"})
    c = None
    try:
        svc.start()
        c = Client(svc.endpoint, timeout=2.0, context=zctx)
        yield proxy, c
    finally:
        if c is not None:
            c.close()
        svc.cleanup()
        proxy.close()


def test_one_slow_round_trip_leaves_the_next_call_checked(slow_store) -> None:
    proxy, c = slow_store
    for i in range(3):
        assert c.decide(f"warm{i}", "+2348030000001", B, ts=1.0)["reason"] == "clean"
        proxy.delay = 0.3  # this round trip outlasts the worker's budget
        r = c.decide(f"slow{i}", "+2348030000002", B, ts=2.0)
        assert r["error"] == "store_unavailable"
        proxy.delay = 0.0
        # The store answers again: the very next call is checked, not answered unchecked for
        # a back-off period.
        r = c.decide(f"next{i}", "+2348030000003", B, ts=3.0)
        assert r.get("verdict") == "allow", r


def test_a_store_that_is_gone_is_answered_at_once(slow_store) -> None:
    proxy, c = slow_store
    assert c.decide("warm", "+2348030000001", B, ts=1.0)["reason"] == "clean"
    proxy.blackhole = True  # connections open, nothing ever comes back
    took = []
    for i in range(12):
        t = time.monotonic()
        r = c.decide(f"gone{i}", "+2348030000002", B, ts=2.0)
        took.append(time.monotonic() - t)
        assert r["error"] == "store_unavailable"
    # Each call within the budget; after two timed-out round trips in a row the worker backs
    # off and answers at once (a retry after each back-off period may wait the budget again).
    assert max(took) < TIMEOUT_MS / 1000 + 0.25, took
    slow = [t for t in took if t >= TIMEOUT_MS / 1000 * 0.8]
    assert len(slow) <= 4, took
    assert took[-1] < TIMEOUT_MS / 1000 * 0.8, took
