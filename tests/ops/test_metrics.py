"""Prometheus metrics scraped over HTTP from a live pool: the counters equal what was sent."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from acm_module.core import keys
from acm_module.core import stats as stats_mod
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from acm_module.ops import metrics
from tests.support.numbers import cid
from tests.support.servers import (
    DelayProxy,
    RedisServer,
    Service,
    flush,
    free_port,
    publish_registry,
    wait_port,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

B = "+2348039999999"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    """Return every sample of /metrics by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum a sample over every series whose labels include `labels`."""
    return sum(v for lab, v in samples.get(name, [])
               if all(lab.get(k) == x for k, x in labels.items()))


def decisions(samples: Samples) -> Counter[tuple[str, str]]:
    c: Counter[tuple[str, str]] = Counter()
    for lab, v in samples.get("acm_decisions_total", []):
        c[(lab["verdict"], lab["reason"])] += int(v)
    return c


def settle(port: int, until: float = 1.5) -> Samples:
    """Scrape once every worker has published what it did so far (they publish each second)."""
    time.sleep(until)
    return scrape(port)


def test_prometheus_buckets_are_exact_cumulative_sums() -> None:
    h = stats_mod.Histogram()
    for us in (0.5, 7.0, 8.5, 11.0, 100.0, 100.0, 5000.0, 2e6):
        h.add(us)
    buckets, est_sum, count = metrics.prometheus_buckets(h.to_sparse())
    assert count == 8 and buckets[-1] == ("+Inf", 8.0)
    by_le = dict(buckets)
    assert by_le[repr(8e-06)] == 2  # 0.5 and 7 us
    assert by_le[repr(float(f"{2 ** 3.5 / 1e6:.9g}"))] == 4  # + 8.5 and 11 (< 11.3 us)
    assert by_le[repr(float(f"{2 ** 7 / 1e6:.9g}"))] == 6  # + 100 and 100 (< 128 us)
    values = [v for _, v in buckets]
    assert values == sorted(values)  # cumulative
    assert values[-2] == 7  # 2 s is beyond the last finite bound (~1.05 s)
    assert 2.0 < est_sum < 2.2


def test_parse_listen() -> None:
    assert metrics.parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_listen("[::1]:9") == ("::1", 9)
    assert metrics.parse_listen(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "host:http", "h:70000"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)


def test_live_pool_metrics_equal_what_was_sent(service_factory) -> None:
    port = free_port()
    env = {"ACM_METRICS_HTTP": f"127.0.0.1:{port}"}
    with service_factory(env=env, workers=2) as (svc, client):
        assert wait_port(port), svc.read_log()
        store = StoreConnection(svc.store_url, timeout=2.0)
        try:
            # A writer's consumer group and its published state, as acm writer would leave them.
            for p in range(16):
                store.call("XGROUP", "CREATE", keys.stream(p), "acm.pg", "$", "MKSTREAM")
            store.call("HSET", metrics.WRITER_STATS_KEY, "w1", json.dumps({
                "writer": "w1", "consumer": "h", "updated": time.time() + 60,
                "sinks": {"pg": {"state": "up", "decisions": 5, "alerts": 1, "retries": 2,
                                 "dead_lettered": 0, "consecutive_failures": 0}}}))
            before = settle(port)
            xlen_before = total(before, "acm_stream_length")

            t0 = 1_800_000_000.0
            sent: Counter[tuple[str, str]] = Counter()
            for i in range(7):  # the seed: 4 clean, 3 masking, one alert HIGH -> CRITICAL
                r = client.decide(cid(), f"+23480310{i:05d}", "0803 999 9999", ts=t0 + i * 0.3)
                sent[(r["verdict"], r["reason"])] += 1
            first = cid()
            r = client.decide(first, "+2348031000100", "+2348030000001", ts=t0)
            sent[(r["verdict"], r["reason"])] += 1
            assert client.decide(first, "+2348031000100", "+2348030000001", ts=t0) == r  # dup
            for b in ("anonymous", "12"):
                r = client.decide(cid(), "+2348031000100", b, ts=t0)
                sent[(r["verdict"], r["reason"])] += 1
            r = client.decide(cid(), "unknown", "+2348030000002", ts=t0)
            sent[(r["verdict"], r["reason"])] += 1
            bad = msgpack.unpackb(client.request_raw(msgpack.packb([1, 2])))
            assert bad["error"] == "not_a_map"
            assert sent == {("allow", "clean"): 5, ("drop", "masking"): 3,
                            ("allow", "invalid_b"): 2, ("allow", "unverifiable_cli"): 1}
            n_requests = sum(sent.values()) + 2  # + the duplicate + the bad request

            deadline = time.monotonic() + 10
            while True:
                after = scrape(port)
                got = decisions(after) - decisions(before)
                done = (total(after, "acm_requests_total") - total(before, "acm_requests_total")
                        == n_requests and total(after, "acm_alerts_total") >= 1)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            store.close()

    assert got == sent
    assert total(after, "acm_requests_total") - total(before, "acm_requests_total") == n_requests
    assert total(after, "acm_duplicates_total") - total(before, "acm_duplicates_total") == 1
    assert (total(after, "acm_errors_total", kind="bad_request")
            - total(before, "acm_errors_total", kind="bad_request")) == 1
    assert total(after, "acm_errors_total", kind="store_unavailable") == 0
    # Every request is in the latency histogram, worker by worker.
    for name in ("acm_decision_latency_seconds", "acm_decision_service_seconds"):
        assert total(after, name + "_count") == total(after, "acm_requests_total")
        for lab, v in after[name + "_count"]:
            inf = [x for lb, x in after[name + "_bucket"]
                   if lb["le"] == "+Inf" and lb["worker"] == lab["worker"]]
            assert inf == [v]
    assert total(after, "acm_decision_latency_seconds_sum") > 0
    # One alert, opened HIGH at 5 callers, escalated to CRITICAL at 7.
    assert total(after, "acm_alerts_total", severity="HIGH") == 1
    assert total(after, "acm_alerts_total") == 1
    assert total(after, "acm_alert_escalations_total", severity="CRITICAL") == 1
    assert total(after, "acm_alert_updates_total") == 2
    # Streams: one record per non-duplicate decision (errors are not recorded) + 3 alert records.
    assert total(after, "acm_stream_length") - xlen_before == sum(sent.values()) + 3
    # The writer's group was created at the stream ends: everything new is its lag.
    assert total(after, "acm_writer_backlog_records", sink="pg", kind="lag") == (
        sum(sent.values()) + 3)
    assert total(after, "acm_writer_backlog_records", sink="pg", kind="pending") == 0
    assert total(after, "acm_writer_sink_up", sink="pg", writer="w1") == 1
    assert total(after, "acm_writer_retries_total", sink="pg") == 2
    # Pool health and config.
    assert total(after, "acm_store_up") == 1
    assert total(after, "acm_workers") == 2
    live = total(after, "acm_config_generation")
    assert live >= 1
    assert [v for _, v in after["acm_worker_config_generation"]] == [live, live]
    assert total(after, "acm_worker_connections") == 1  # the client's one connection
    # Connection hand-offs between workers (none here: one client), both directions exported.
    assert sorted((lab["direction"], v) for lab, v in after["acm_connection_handoffs_total"]) == [
        ("received", 0), ("received", 0), ("sent", 0), ("sent", 0)]
    assert total(after, "acm_detection_threshold") == 5
    assert total(after, "acm_detection_mode", mode="block") == 1


def test_store_down_is_reported_not_raised() -> None:
    srv = RedisServer().start()
    url = srv.url
    srv.cleanup()  # nothing listens there any more
    samples: Samples = {}
    for fam in text_string_to_metric_families(metrics.render_once(url, 4).decode()):
        for s in fam.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    assert total(samples, "acm_store_up") == 0
    assert "acm_requests_total" not in samples


def test_metrics_sidecar_refuses_a_busy_port(store_url) -> None:
    import socket
    from types import SimpleNamespace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        settings = SimpleNamespace(metrics_http=f"127.0.0.1:{busy}", store=store_url,
                                   partitions=16)
        assert metrics.metrics_main(settings) == metrics.BOOT_ERROR


def test_per_carrier_decisions_and_fanout_alerts_are_exported(service_factory) -> None:
    port = free_port()
    env = {"ACM_METRICS_HTTP": f"127.0.0.1:{port}", "ACM_FANOUT_THRESHOLD": "3"}
    doc = {"carriers": [{"id": "igw", "name": "IGW", "licence": "international_gateway",
                         "contact": "", "cli_rule": None}],
           "gateways": [{"id": "igw-1", "carrier_id": "igw", "addresses": ["198.51.100.0/24"],
                         "trunks": [], "rate_limit_cps": 0, "rate_window_s": 1.0}],
           "routes": [{"id": "igw-in", "carrier_id": "igw", "gateway_id": None, "trunk": None,
                       "direction": "international", "cli_rule": None}]}
    with service_factory(env=env, workers=2) as (svc, client):
        assert wait_port(port), svc.read_log()
        publish_registry(svc.store_url, doc)
        t0 = 1_800_000_000.0
        sim = "+447700900001"  # a foreign CLI: allowed on the international route
        for i in range(4):
            r = client.decide(cid(), sim, f"+23480399{i:05d}", ts=t0 + i, src_ip="198.51.100.9")
            assert (r["verdict"], r["reason"]) == ("allow", "clean")
        r = client.decide(cid(), "+2348031234567", B, ts=t0, src_ip="198.51.100.9")
        assert r["reason"] == "national_cli_on_international_route"
        client.decide(cid(), "+2348031234568", B, ts=t0, src_ip="192.0.2.1")  # no carrier
        deadline = time.monotonic() + 10
        while True:
            after = scrape(port)
            per = {(lab["carrier"], lab["verdict"], lab["reason"]): v
                   for lab, v in after.get("acm_carrier_decisions_total", [])}
            merged: Counter[tuple[str, str, str]] = Counter()
            for k, v in per.items():
                merged[k] += int(v)
            done = (merged == {("igw", "allow", "clean"): 4,
                               ("igw", "drop", "national_cli_on_international_route"): 1}
                    and total(after, "acm_fanout_alerts_total") == 1)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert merged == {("igw", "allow", "clean"): 4,
                      ("igw", "drop", "national_cli_on_international_route"): 1}
    # The global counters hold every decision, the carrier's included.
    assert decisions(after)[("allow", "clean")] == 5
    assert total(after, "acm_fanout_alerts_total", severity="LOW") == 1
    assert total(after, "acm_alerts_total") == 0


def _unchecked_until(port: int, want: int, timeout: float = 10.0) -> Samples:
    """Scrape until the pool's unchecked-call counter reaches `want` (workers publish each s)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(port)
        if total(s, "acm_unchecked_calls_total") >= want or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def _until_checked(client, b: str) -> int:
    """Call until one gets a verdict (the store is back); return how many were unchecked."""
    unchecked = 0
    deadline = time.monotonic() + 10
    while "verdict" not in (r := client.decide(cid(), "+2348031000200", b, ts=5.0)):
        assert r["error"] == "store_unavailable", r
        unchecked += 1
        assert time.monotonic() < deadline, "the pool did not come back with the store"
        time.sleep(0.01)
    return unchecked


@contextlib.contextmanager
def metered_pool(store_url: str, zctx, env: dict[str, str] | None = None
                 ) -> Iterator[tuple[int, Client]]:
    """One worker with its metrics sidecar; yield (metrics port, a client that got a verdict)."""
    port = free_port()
    svc = Service(store_url, workers=1,
                  extra_env={"ACM_METRICS_HTTP": f"127.0.0.1:{port}", **(env or {})})
    c = None
    try:
        svc.start()
        assert wait_port(port), svc.read_log()
        c = Client(svc.endpoint, timeout=5.0, context=zctx)
        assert c.decide(cid(), "+2348031000100", B, ts=1.0)["reason"] == "clean"
        yield port, c
    finally:
        if c is not None:
            c.close()
        svc.cleanup()


def test_unchecked_calls_are_exported_when_the_store_stops(zctx) -> None:
    srv = RedisServer().start()
    try:
        with metered_pool(srv.url, zctx) as (port, c):
            assert total(settle(port), "acm_unchecked_calls_total") == 0
            srv.stop()  # the store is gone: answered at once, each call let through unchecked
            for _ in range(5):
                assert c.decide(cid(), "+2348031000100", B, ts=2.0)["error"] == \
                    "store_unavailable"
            srv.start()
            unchecked = 5 + _until_checked(c, B)
            after = _unchecked_until(port, unchecked)
    finally:
        srv.cleanup()
    assert total(after, "acm_unchecked_calls_total", kind="store_unavailable") == unchecked
    assert total(after, "acm_unchecked_calls_total", kind="store_error") == 0
    assert total(after, "acm_unchecked_calls_total", kind="internal") == 0
    assert total(after, "acm_unchecked_calls_total") == total(
        after, "acm_errors_total", kind="store_unavailable")


def test_unchecked_calls_are_exported_when_the_store_is_slow(redis_server, zctx) -> None:
    flush(redis_server)
    proxy = DelayProxy(int(redis_server.rsplit(":", 1)[1].split("/")[0]))
    try:
        with metered_pool(proxy.url, zctx, {"ACM_STORE_TIMEOUT_MS": "30"}) as (port, c):
            proxy.delay = 0.2  # the store answers, far too late for the worker's 30 ms
            for _ in range(3):
                assert c.decide(cid(), "+2348031000100", B, ts=2.0)["error"] == \
                    "store_unavailable"
            proxy.delay = 0.0
            unchecked = 3 + _until_checked(c, B)
            after = _unchecked_until(port, unchecked)
    finally:
        proxy.close()
    assert total(after, "acm_unchecked_calls_total", kind="store_unavailable") == unchecked
    assert total(after, "acm_store_failures_total") >= 1
