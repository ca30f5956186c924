"""A few thousand mixed events through the real pool, checked reply by reply against the
straightforward reference model (tests/support/reference.py)."""

from __future__ import annotations

import random

import pytest

from acm_module.core import liveconfig as store_config
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from tests.support.reference import Reference, mismatches

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


def make_events(seed: int, n: int) -> list[tuple[str, str, str, float]]:
    """Mixed traffic: background calls, masking bursts, junk CLIs, bad B-numbers, retransmits."""
    rng = random.Random(seed)
    bs = [f"+23480{rng.randrange(10**8):08d}" for _ in range(25)]
    a_pool = [f"+23481{rng.randrange(10**8):08d}" for _ in range(400)]
    t = 1_790_000_000.0
    events: list[tuple[str, str, str, float]] = []
    i = 0
    while len(events) < n:
        t += rng.expovariate(20.0)  # ~20 calls/s of background
        roll = rng.random()
        if roll < 0.04:
            # A masking burst: 4..12 distinct callers to one B within a few seconds.
            b = rng.choice(bs)
            for _ in range(rng.randint(4, 12)):
                t += rng.uniform(0.05, 0.6)
                events.append((f"e{i}", rng.choice(a_pool), b, t))
                i += 1
            continue
        if roll < 0.07:
            a = rng.choice(["anonymous", "unknown", "", "12345", "sip:anonymous@x.invalid"])
        else:
            a = rng.choice(a_pool)
        b = rng.choice(bs) if rng.random() > 0.02 else rng.choice(["", "abc", "112"])
        if rng.random() < 0.3:  # formats vary per carrier
            b = b.replace("+234", "0") if b.startswith("+234") else b
        # Out-of-order arrival by up to half a window, as on a busy interconnect.
        ts = t - rng.uniform(0, 2.5) if rng.random() < 0.1 else t
        events.append((f"e{i}", a, b, ts))
        i += 1
        if rng.random() < 0.03 and events:  # a retransmission of an earlier INVITE
            events.append(rng.choice(events[-50:]))
    return events[:n]


@pytest.mark.parametrize(("block_ttl", "seed"), [(0.0, 1), (30.0, 2)])
def test_replay_matches_the_reference_model(service_factory, block_ttl: float, seed: int,
                                            zctx) -> None:
    events = make_events(seed, 3000)
    whitelisted = "+2348000000001"
    events[100:100] = [(f"w{k}", f"+2348199{k:06d}", whitelisted, events[100][3] + k * 0.01)
                       for k in range(8)]
    ref = Reference(block_ttl=block_ttl, whitelist={whitelisted})
    env = {"ACM_BLOCK_TTL": str(block_ttl)}
    with service_factory(env=env, workers=2) as (svc, c1):
        conn = StoreConnection(svc.store_url, timeout=2.0)
        try:
            store_config.whitelist_set(conn, whitelisted, 16, "test")
        finally:
            conn.close()
        c2 = Client(svc.endpoint, timeout=10.0, context=zctx)
        try:
            def decide(k: int, call_id: str, a: str, b: str, ts: float) -> dict:
                return (c1 if k % 2 else c2).decide(call_id, a, b, ts=ts)
            bad = mismatches(ref, events, decide)
        finally:
            c2.close()
    drops = sum(r.get("verdict") == "drop" for r in ref.replies.values())
    assert bad[:5] == []
    # The traffic really exercised the rules.
    assert len(ref.alerts) >= 20 and drops >= 50
    if block_ttl:
        assert any(r["reason"] == "blocked" for r in ref.replies.values())
