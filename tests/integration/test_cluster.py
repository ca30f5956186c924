"""acm on a real Redis Cluster (3 masters, 3 replicas on loopback, tests/servers.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from reference import Reference, mismatches
from servers import RedisCluster, Service

from acm_module.client import Client
from acm_module.store.cluster import StoreClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_replay_reference import make_events

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters and 3 replicas, stopped after the module."""
    c = RedisCluster(masters=3, replicas=1).start()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def empty_cluster(cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The module's cluster with every master emptied before and after the test."""
    def flush() -> None:
        s = StoreClient(cluster.url(0), timeout=5.0)
        try:
            s.connect()
            s.on_each_master("FLUSHALL")
        finally:
            s.close()
    flush()
    yield cluster
    flush()


def test_two_nodes_with_different_seeds_decide_as_one(empty_cluster: RedisCluster,
                                                      zctx: zmq.Context) -> None:
    """Two `acm serve` nodes, one seeded with a master and one with a replica, answer one
    interleaved stream: every verdict, distinct count and alert grouping is the single-node
    reference's, and every master holds keys."""
    cl = empty_cluster
    replica = next(p for p in cl.ports if p not in cl.master_ports())
    events = make_events(3, 1500)
    ref = Reference()
    nodes = [Service(cl.url(0)), Service(f"redis://127.0.0.1:{replica}/0")]
    clients: list[Client] = []
    try:
        for n in nodes:
            n.start()
            clients.append(Client(n.endpoint, timeout=10.0, context=zctx))
        bad = mismatches(ref, events, lambda k, call_id, a, b, ts:
                         clients[k % 2].decide(call_id, a, b, ts=ts))
    finally:
        for c in clients:
            c.close()
        for n in nodes:
            n.cleanup()
    assert bad[:5] == []
    assert len(ref.alerts) >= 10
    sizes = {p: int(cl.redis(p, "DBSIZE").strip()) for p in cl.master_ports()}
    assert all(v > 0 for v in sizes.values()), sizes
