"""The components off the decision path on a real Redis Cluster (3 masters, 3 replicas): the
actions runner and the metrics read every partition's keys wherever their slots live."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from acm_module.actions.runner import GROUP, ActionRunner, Ledger, RunnerConfig
from acm_module.control.repository import AlertQuery, StoreRepository
from acm_module.core import keys, stats
from acm_module.core.redis import open_redis
from acm_module.decide.store.cluster import StoreClient
from acm_module.ops.metrics import AlertScanner, PoolCollector
from tests.support.servers import RedisCluster

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

PARTITIONS = 16


def _alert(p: int, now_ms: int) -> dict[str, str]:
    return {"k": "a", "al": str(uuid.uuid4()), "op": "open", "typ": "masking",
            "b": f"+23480300000{p:02d}", "sv": "HIGH", "n": "3",
            "an": "+2348010000001,+2348010000002,+2348010000003", "t0": str(now_ms - 2000),
            "t1": str(now_ms), "ver": "1", "wms": "5000", "blk": "0", "cr": "", "gw": ""}


def test_the_actions_runner_acts_on_every_partition_of_a_cluster(
        empty_cluster: RedisCluster) -> None:
    """One alert in each of the 16 partition streams, spread over the 3 masters: the runner,
    seeded with one node, reads them all (a cluster refuses one XREADGROUP over streams of
    several slots), acts once on each and records it in the ledger and the audit stream."""
    cl = empty_cluster
    r = open_redis(cl.url(0), timeout=5.0)
    now_ms = int(time.time() * 1000)
    alerts = [_alert(p, now_ms) for p in range(PARTITIONS)]
    for p, f in enumerate(alerts):
        r.xadd(keys.stream(p), f)
    owners = {r.get_node_from_key(keys.stream(p)).port for p in range(PARTITIONS)}
    assert len(owners) == 3
    runner = ActionRunner(RunnerConfig(store_url=cl.url(1), partitions=PARTITIONS,
                                       consumer="t", block_ms=200, lookback_s=0.0))
    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while runner.handled < PARTITIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.handled == PARTITIONS
    finally:
        runner.stop.set()
        t.join(10)
    try:
        assert not t.is_alive()
        ledger = Ledger(r)
        assert [ledger.done(f["al"], "open", "notify") for f in alerts] == ["ok"] * PARTITIONS
        notified = StoreRepository(r, PARTITIONS).audit_list(limit=100,
                                                             action="action.notify")
        assert sorted(a.target for a in notified) == sorted(f["al"] for f in alerts)
        # Every record was acknowledged on its own master (lookback 0: at once).
        for p in range(PARTITIONS):
            (g,) = r.xinfo_groups(keys.stream(p))
            assert (g["name"], g["pending"]) == (GROUP.encode(), 0)
    finally:
        r.close()


def test_metrics_read_every_partition_of_a_cluster(empty_cluster: RedisCluster) -> None:
    """The alert counters and streams of all 16 partitions and the workers' snapshots, over
    3 masters: the exporter sums and lists them all."""
    cl = empty_cluster
    r = open_redis(cl.url(0), timeout=5.0)
    scanner = AlertScanner(cl.url(2), PARTITIONS)
    collector = PoolCollector(cl.url(2), PARTITIONS)
    try:
        for p in range(PARTITIONS):
            r.hincrby(keys.counters(p), "open:HIGH", 1)
            r.hincrby(keys.counters(p), "upd", 2)
            r.xadd(keys.stream(p), {"k": "d"})
        stats.publish(r, "h/b/0", stats.WorkerStats(index=0, pid=1, requests=7))
        scanner.scan_once()
        snap = scanner.snapshot()
        assert snap["opened"]["HIGH"] == PARTITIONS
        assert snap["updates"] == 2 * PARTITIONS
        families = {m.name: m for m in collector.collect()}
        assert families["acm_store_up"].samples[0].value == 1.0
        assert families["acm_workers"].samples[0].value == 1.0
        lengths = {s.labels["partition"]: s.value
                   for s in families["acm_stream_length"].samples}
        assert lengths == {str(p): 1.0 for p in range(PARTITIONS)}
    finally:
        scanner.stop()
        collector.close()
        r.close()


def test_the_store_repository_lists_alerts_of_every_partition_with_either_client(
        empty_cluster: RedisCluster) -> None:
    """acm_alert_list on the store repository reads the 16 partition streams in one pipeline:
    redis-py's cluster client and the worker's StoreClient (the control plane's today) list
    the same 16 alerts."""
    cl = empty_cluster
    r = open_redis(cl.url(0), timeout=5.0)
    s = StoreClient(cl.url(1), timeout=5.0)
    try:
        now_ms = int(time.time() * 1000)
        alerts = [_alert(p, now_ms) for p in range(PARTITIONS)]
        for p, f in enumerate(alerts):
            r.xadd(keys.stream(p), f)
        listed = [StoreRepository(c, PARTITIONS).alert_list(AlertQuery(limit=100))
                  for c in (r, s)]
        assert sorted(a["alert_id"] for a in listed[0]) == sorted(f["al"] for f in alerts)
        assert listed[0] == listed[1]
    finally:
        s.close()
        r.close()
