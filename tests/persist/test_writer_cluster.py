"""The writer on a Redis Cluster: a master fails over under load, the writer catches up, and
every sink holds each record still in the streams exactly once."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from pgqdb import ALL_SINKS, WriterProcess, add_tap, wait_drained, writer_env
from servers import RedisCluster, Service
from test_writer import check_all, drive

from acm_module.decide.client import Client

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
