"""The writer on a Redis Cluster: a master fails over under load, the writer catches up, and
every sink holds each record still in the streams exactly once; a dead writer's pending entries
are claimed by another, and what every group acknowledged is trimmed."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from acm_module.core import keys
from acm_module.decide.client import Client
from acm_module.write.store import StreamStore
from acm_module.write.writer import GROUP_PREFIX
from tests.persist.test_writer import check_all, drive
from tests.support.pgqdb import (
    ALL_SINKS,
    TAP_GROUP,
    WriterProcess,
    add_tap,
    qdb_count,
    stream_records,
    synthetic,
    wait_drained,
    writer_env,
)
from tests.support.servers import RedisCluster, Service

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


def test_writer_catches_up_after_a_failover(empty_cluster: RedisCluster, database_url: str,
                                            questdb_url: str, chdb_path: str, zctx: Any) -> None:
    cl = empty_cluster
    url = cl.seeds_url
    add_tap(url)
    svc = Service(url)
    w = WriterProcess(url, writer_env(database_url, questdb_url, chdb_path), [])
    c = None
    try:
        svc.start()
        w.start()
        c = Client(svc.endpoint, timeout=10.0, context=zctx)
        drive(c, episodes=6, base_ts=1_800_000_000.0)
        victim = cl.master_ports()[0]
        cl.stop_node(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in cl.master_ports():
            assert time.monotonic() < deadline, "no failover"
            drive(c, episodes=1, base_ts=1_800_001_000.0, clean_calls=2)
        cl.wait_ok()  # every node knows the new master
        drive(c, episodes=6, base_ts=1_800_002_000.0)
        wait_drained(url, ALL_SINKS, timeout=90, writer=w)
        assert w.stop() == 0
    finally:
        if c is not None:
            c.close()
        w.stop(signal.SIGKILL)
        svc.cleanup()
    check_all(url, database_url, questdb_url, chdb_path)


def test_on_a_cluster_a_dead_writers_entries_are_claimed_and_acked_ones_trimmed(
        empty_cluster: RedisCluster, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    url = empty_cluster.seeds_url
    add_tap(url)  # nothing trimmed until the end: the sinks are checked against the streams
    synthetic(url, 12_000)
    # A QuestDB writer that died with batches in hand: delivered to it, never acknowledged.
    s = StreamStore(url)
    try:
        group = GROUP_PREFIX + "questdb"
        for stream in keys.streams(16):
            s.call("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        s.pipeline([("XREADGROUP", "GROUP", group, "dead", "COUNT", 200, "STREAMS", stream, ">")
                    for stream in keys.streams(16)], keys.streams(16))
        pending = sum(s.client.xpending(stream, group)["pending"] for stream in keys.streams(16))
    finally:
        s.close()
    assert pending == 16 * 200
    env = writer_env(database_url, questdb_url, chdb_path, ACM_WRITER_BATCH="4000",
                     ACM_WRITER_TRIM_INTERVAL="0.5")
    # Another consumer claims them (XAUTOCLAIM on each partition's master).
    w = WriterProcess(url, env, ["--consumer", "w2", "--claim-idle-ms", "500"]).start()
    try:
        wait_drained(url, ALL_SINKS, timeout=90, writer=w)
        assert "claimed" in w.read_log()
        assert w.stop() == 0  # chdb's directory belongs to one process at a time
        check_all(url, database_url, questdb_url, chdb_path)
        # Once the tap group is gone every record is acknowledged by every group: trimmed.
        s = StreamStore(url)
        try:
            for stream in keys.streams(16):
                s.call("XGROUP", "DESTROY", stream, TAP_GROUP)
        finally:
            s.close()
        w = WriterProcess(url, env, ["--consumer", "w2"]).start()
        deadline = time.monotonic() + 20
        while stream_records(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stream_records(url) == []
        assert w.stop() == 0
    finally:
        w.stop(signal.SIGKILL)
    assert qdb_count(questdb_url) == 12_000
