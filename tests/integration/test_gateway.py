"""The gateway context against a real pool and a real Redis store (docs/GATEWAY.md).

Attribution of decisions and alerts to carrier and gateway, the CLI-origin rule, the
per-gateway rate limit shared by every worker, and the fan-out alert.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from acm_module.core import registry
from acm_module.core import stats as stats_mod
from acm_module.decide.client import Client
from acm_module.decide.store.conn import StoreConnection
from tests.integration.test_contract import alert_records, decisions, stream_entries
from tests.support.numbers import a_num, cid
from tests.support.servers import publish_registry as publish

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

B = "+2348039999999"
IGW_IP = "198.51.100.7"


def foreign(i: int) -> str:
    return f"+4477009{i:05d}"


def doc(*, direction: str = "national", route_rule: str | None = None, cps: int = 0,
        carrier_rule: str | None = None) -> dict[str, Any]:
    return {
        "carriers": [{"id": "igw", "name": "IGW Ltd", "licence": "international_gateway",
                      "contact": "noc@igw.example", "cli_rule": carrier_rule}],
        "gateways": [{"id": "igw-lag", "carrier_id": "igw",
                      "addresses": ["198.51.100.0/24"], "trunks": ["tg-7"],
                      "rate_limit_cps": cps, "rate_window_s": 1.0}],
        "routes": [{"id": "igw-in", "carrier_id": "igw", "gateway_id": None, "trunk": None,
                    "direction": direction, "cli_rule": route_rule}],
    }


def test_decisions_and_alerts_record_the_carrier_and_gateway(client: Client, service) -> None:
    publish(service.store_url, doc())
    t0 = 1_800_000_000.0
    replies = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.3, src_ip=IGW_IP)
               for i in range(7)]
    # Attribution changes no verdict: the seed scenario as without a registry.
    assert [r["verdict"] for r in replies] == ["allow"] * 4 + ["drop"] * 3
    assert [r["reason"] for r in replies] == ["clean"] * 4 + ["masking"] * 3
    other = client.decide(cid(), a_num(50), "+2348030000001", ts=t0, src_ip="192.0.2.1")
    by_trunk = client.decide(cid(), a_num(51), "+2348030000002", ts=t0, src_ip="192.0.2.1",
                             trunk="tg-7")
    bare = client.decide(cid(), a_num(52), "+2348030000003", ts=t0)
    invalid = client.decide(cid(), a_num(53), "12", ts=t0, src_ip=IGW_IP)
    assert [x["reason"] for x in (other, by_trunk, bare, invalid)] == [
        "clean", "clean", "clean", "invalid_b"]

    recs = {r["b"]: r for r in decisions(service.store_url) if r["b"] != B}
    assert (recs["+2348030000001"]["cr"], recs["+2348030000001"]["gw"]) == ("", "")
    assert (recs["+2348030000002"]["cr"], recs["+2348030000002"]["gw"]) == ("igw", "igw-lag")
    assert (recs["+2348030000003"]["cr"], recs["+2348030000003"]["gw"]) == ("", "")
    assert (recs["12"]["cr"], recs["12"]["gw"]) == ("igw", "igw-lag")
    on_b = [r for r in decisions(service.store_url) if r["b"] == B]
    assert len(on_b) == 7 and all((r["cr"], r["gw"]) == ("igw", "igw-lag") for r in on_b)
    alerts = alert_records(service.store_url)
    assert [a["op"] for a in alerts] == ["open", "update", "update"]
    assert all((a["typ"], a["cr"], a["gw"]) == ("masking", "igw", "igw-lag") for a in alerts)

    # The workers count decisions per carrier too (acm_stats, Prometheus).
    conn = StoreConnection(service.store_url, timeout=2.0)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            merged = stats_mod.summarize(stats_mod.read_all(conn))["decisions"]
            if merged.get("@igw|drop:masking") == 3:
                break
            time.sleep(0.2)
    finally:
        conn.close()
    assert merged.get("@igw|drop:masking") == 3
    assert merged.get("@igw|allow:clean") == 5  # 4 on B, 1 by trunk
    assert merged.get("@igw|allow:invalid_b") == 1


def test_a_national_cli_on_an_international_route(client: Client, service) -> None:
    publish(service.store_url, doc(direction="international"))
    t0 = 1_800_000_100.0
    dropped = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.1, src_ip=IGW_IP)
               for i in range(6)]
    assert {(r["verdict"], r["reason"]) for r in dropped} == {
        ("drop", "national_cli_on_international_route")}
    # A genuinely international CLI passes, and the dropped calls never entered B's window.
    ok = client.decide(cid(), foreign(1), B, ts=t0 + 1, src_ip=IGW_IP)
    assert (ok["verdict"], ok["reason"], ok["distinct"]) == ("allow", "clean", 1)
    # The same national CLI from no registered gateway is not judged by the rule.
    plain = client.decide(cid(), a_num(40), B, ts=t0 + 1.1, src_ip="192.0.2.9")
    assert (plain["verdict"], plain["reason"]) == ("allow", "clean")
    recs = [r for r in decisions(service.store_url)
            if r["r"] == "national_cli_on_international_route"]
    assert len(recs) == 6 and all(r["v"] == "drop" and r["cr"] == "igw" for r in recs)

    # Per route: monitor reports and lets the call through (it counts in the window).
    publish(service.store_url, doc(direction="international", route_rule="monitor"))
    mon = client.decide(cid(), a_num(60), B, ts=t0 + 1.2, src_ip=IGW_IP)
    assert (mon["verdict"], mon["reason"], mon["distinct"]) == (
        "allow", "national_cli_on_international_route", 3)
    # Per carrier: off.
    publish(service.store_url, doc(direction="international", carrier_rule="off"))
    off = client.decide(cid(), a_num(61), B, ts=t0 + 1.3, src_ip=IGW_IP)
    assert (off["verdict"], off["reason"]) == ("allow", "clean")


def test_the_cli_origin_rule_follows_the_live_setting(service_factory) -> None:
    with service_factory(env={"ACM_CLI_ORIGIN_RULE": "monitor"}) as (svc, client):
        publish(svc.store_url, doc(direction="international"))
        r = client.decide(cid(), a_num(1), B, ts=1_800_000_200.0, src_ip=IGW_IP)
        assert (r["verdict"], r["reason"]) == ("allow", "national_cli_on_international_route")


def test_the_rate_limit_is_shared_by_every_worker(service, zctx) -> None:
    """3 calls/s over 2 s: 6 admitted however the calls spread over clients and workers.

    The limit runs on the workers' receive clock, so this test runs in real time: 20 calls
    take milliseconds, far inside the 2 s window.
    """
    from tests.support.servers import flush

    flush(service.store_url)
    d = doc(cps=3)
    d["gateways"][0]["rate_window_s"] = 2.0
    publish(service.store_url, d)
    results: list[tuple[int, dict[str, Any]]] = []
    answered_at: list[float] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        c = Client(service.endpoint, timeout=10.0, context=zctx)
        try:
            for j in range(5):
                i = k * 5 + j
                r = c.decide(f"rl-{i}", a_num(i), f"+23480300{i:05d}", src_ip=IGW_IP)
                with lock:
                    results.append((i, r))
                    answered_at.append(time.monotonic())
        finally:
            c.close()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert len(results) == 20
    assert elapsed < 2.0, f"the calls took {elapsed:.2f}s: longer than the window"
    verdicts = [(r["verdict"], r["reason"]) for _, r in results]
    assert verdicts.count(("allow", "clean")) == 6
    assert verdicts.count(("drop", "rate_limited")) == 14
    first = min(i for i, r in results if r["verdict"] == "allow")

    c = Client(service.endpoint, timeout=10.0, context=zctx)
    try:
        # A retransmission gets its first answer again.
        again = c.decide(f"rl-{first}", a_num(first), f"+23480300{first:05d}", src_ip=IGW_IP)
        assert (again["verdict"], again["reason"]) == ("allow", "clean")
        # Calls from elsewhere are not limited by this gateway.
        free = [c.decide(cid(), a_num(200 + i), f"+23480302{i:05d}", src_ip="192.0.2.50")
                for i in range(8)]
        assert all(r["verdict"] == "allow" for r in free)
        # The window slides: once it has passed since the last admitted call (received by the
        # service before its answer reached us), the gateway gets its capacity back.
        time.sleep(max(0.0, max(answered_at) + 2.1 - time.monotonic()))
        later = [c.decide(cid(), a_num(100 + i), f"+23480301{i:05d}", src_ip=IGW_IP)
                 for i in range(7)]
        assert [r["verdict"] for r in later] == ["allow"] * 6 + ["drop"]
    finally:
        c.close()
    limited = [r for r in decisions(service.store_url) if r["r"] == "rate_limited"]
    assert len(limited) == 15 and all(r["gw"] == "igw-lag" for r in limited)
    flush(service.store_url)


def test_a_fanout_alert_for_one_a_number_calling_many_b_numbers(service_factory) -> None:
    env = {"ACM_FANOUT_THRESHOLD": "4", "ACM_FANOUT_WINDOW": "60"}
    with service_factory(env=env) as (svc, client):
        publish(svc.store_url, doc())
        sim = a_num(7)
        t0 = 1_800_000_400.0
        bs = [f"+23480399{i:05d}" for i in range(6)]
        replies = [client.decide(f"fo-{i}", sim, b, ts=t0 + i, src_ip=IGW_IP)
                   for i, b in enumerate(bs)]
        # A signal for the fraud team, not a drop.
        assert all((r["verdict"], r["reason"]) == ("allow", "clean") for r in replies)
        # A retransmission changes nothing; a quieter A-number raises nothing.
        client.decide("fo-5", sim, bs[5], ts=t0 + 5, src_ip=IGW_IP)
        for i in range(3):
            client.decide(cid(), a_num(8), bs[i], ts=t0 + i)
        fan = [a for a in alert_records(svc.store_url) if a.get("typ") == "fanout"]
        assert [a["op"] for a in fan] == ["open", "update", "update"]
        assert len({a["al"] for a in fan}) == 1
        assert [a["sv"] for a in fan] == ["LOW", "HIGH", "HIGH"]
        assert [a["n"] for a in fan] == ["4", "5", "6"]
        last = fan[-1]
        assert (last["a"], last["b"], last["cr"], last["gw"]) == (sim, "", "igw", "igw-lag")
        assert sorted(last["an"].split(",")) == bs
        # The fan-out records live in the A-number's partition stream.
        from acm_module.decide.engine import hotpath

        p = hotpath.partition_of(sim, 16)
        conn = StoreConnection(svc.store_url, timeout=2.0)
        try:
            raw = conn.call("XRANGE", "{acm.%d}:s" % p, "-", "+")
        finally:
            conn.close()
        assert sum(1 for _, f in raw if b"fanout" in f) == 3
        assert len([r for r in stream_entries(svc.store_url) if r.get("typ") == "fanout"]) == 3


def test_a_registry_lost_with_the_store_keeps_applying_until_republished(client: Client,
                                                                          service) -> None:
    publish(service.store_url, doc(direction="international"))
    t0 = 1_800_000_500.0
    r = client.decide(cid(), a_num(1), B, ts=t0, src_ip=IGW_IP)
    assert r["reason"] == "national_cli_on_international_route"
    conn = StoreConnection(service.store_url, timeout=2.0)
    try:
        conn.call("DEL", registry.REGISTRY_KEY)  # what a flushed or failed-over store shows
        time.sleep(0.5)  # ten config polls
        r = client.decide(cid(), a_num(2), B, ts=t0 + 1, src_ip=IGW_IP)
        assert r["reason"] == "national_cli_on_international_route"
        assert "carrier registry missing from the store" in service.read_log()
        # A document that is not JSON (never published by the control plane) changes nothing.
        conn.call("HSET", registry.REGISTRY_KEY, "ver", int(time.time() * 1000), "doc", "{not")
        time.sleep(0.5)
        r = client.decide(cid(), a_num(4), B, ts=t0 + 1.5, src_ip=IGW_IP)
        assert r["reason"] == "national_cli_on_international_route"
        assert "ignoring unreadable carrier registry version" in service.read_log()
    finally:
        conn.close()
    # A new publication (the control plane republishes what it holds) is applied as usual.
    publish(service.store_url, doc(direction="national"))
    r = client.decide(cid(), a_num(3), B, ts=t0 + 2, src_ip=IGW_IP)
    assert (r["verdict"], r["reason"]) == ("allow", "clean")
