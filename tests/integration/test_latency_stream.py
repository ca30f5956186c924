"""Detection latencies reach the writer's latency stream for every batch, at a fraction of a
store command per call."""

from __future__ import annotations

import time

import pytest

from acm_module.core import keys
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from acm_module.decide.worker import LATENCY_STREAM
from tests.support.servers import Service, flush

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]


def _fields(entry: list) -> dict[str, str]:
    flat = entry[1]
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def test_every_decision_gets_its_latency_in_far_fewer_stream_entries_than_calls(
        redis_server: str, zctx) -> None:
    flush(redis_server)
    svc = Service(redis_server, workers=1)
    c = None
    store = StoreConnection(redis_server, timeout=2.0)
    try:
        svc.start()
        c = Client(svc.endpoint, timeout=2.0, context=zctx)
        calls = 300
        for i in range(calls):  # one at a time: a batch per call, as from one OpenSIPS process
            assert c.decide(f"lat-{i}", f"+23480300{i:05d}", f"+23480399{i:05d}")["verdict"] \
                == "allow"
        time.sleep(1.5)  # the worker's stats tick sends what it still holds
        rx_of_decisions = set()
        for p in range(16):
            for entry in store.call("XRANGE", keys.stream(p), "-", "+"):
                f = _fields(entry)
                if f.get("k") == "d" and f["id"].startswith("lat-"):
                    rx_of_decisions.add(int(f["rx"]))
        assert len(rx_of_decisions) == calls
        entries = store.call("XRANGE", LATENCY_STREAM, "-", "+")
        latency_of = {}
        for entry in entries:
            for pair in _fields(entry).get("v", "").split(","):
                rx, _, us = pair.partition(":")
                if us:
                    latency_of[int(rx)] = int(us)
        missing = rx_of_decisions - latency_of.keys()
        assert not missing, f"{len(missing)} of {calls} decisions have no latency"
        assert all(latency_of[rx] > 0 for rx in rx_of_decisions)
        # One XADD per batch would be a store command per call at this concurrency.
        assert len(entries) <= calls // 5, f"{len(entries)} latency entries for {calls} calls"
    finally:
        if c is not None:
            c.close()
        store.close()
        svc.cleanup()
