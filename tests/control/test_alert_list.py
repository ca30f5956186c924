"""acm_alert_list on the store repository, for both kinds of alert a real pool raises."""

from __future__ import annotations

import time

import pytest

from tests.support.servers import publish_registry

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

IGW_IP = "198.51.100.7"
REGISTRY = {
    "carriers": [{"id": "igw", "name": "IGW Ltd", "licence": "international_gateway",
                  "contact": "noc@igw.example", "cli_rule": None}],
    "gateways": [{"id": "igw-lag", "carrier_id": "igw", "addresses": ["198.51.100.0/24"],
                  "trunks": [], "rate_limit_cps": 0, "rate_window_s": 1.0}],
    "routes": [{"id": "igw-in", "carrier_id": "igw", "gateway_id": None, "trunk": None,
                "direction": "national", "cli_rule": None}],
}


def test_store_lists_fanout_and_masking_alerts_as_they_are(mi_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"ACM_FANOUT_THRESHOLD": "4", "ACM_FANOUT_WINDOW": "60"}
    with mi_factory(env=env) as (mi, client):
        publish_registry(mi.svc.store_url, REGISTRY)
        t0 = time.time()
        sim = "+2348031000007"
        bs = [f"+23480399{i:05d}" for i in range(6)]
        fan = [client.decide(f"fo-{i}-{t0}", sim, b, ts=t0 + i, src_ip=IGW_IP)
               for i, b in enumerate(bs)]
        assert all(r["verdict"] == "allow" for r in fan)
        victim = "+2348037775555"
        masking = [client.decide(f"mk-{i}-{t0}", f"+23480310{i:05d}", victim, ts=t0 + i * 0.3,
                                 src_ip=IGW_IP) for i in range(6)]
        assert masking[-1]["reason"] == "masking"
        http = mi.http()
        out = http.execute("acm_alert_list")
        assert out["source"] == "store" and out["count"] == 2
        by_type = {a["alert_type"]: a for a in out["alerts"]}
        f = by_type["MULTICALL_FANOUT"]
        # The fan-out is about one A-number and the B-numbers it called, as in fraud_alerts.
        assert (f["a_number"], f["b_number"], f["a_numbers"]) == (sim, "", [sim])
        assert sorted(f["b_numbers"]) == bs
        assert (f["severity"], f["distinct_max"], f["version"]) == ("HIGH", 6, 3)
        assert (f["carrier_id"], f["gateway_id"]) == ("igw", "igw-lag")
        m = by_type["MULTICALL_MASKING"]
        assert (m["b_number"], m["a_number"], m["b_numbers"]) == (victim, "", [])
        assert m["alert_id"] == masking[-1]["alert_id"]
        assert sorted(m["a_numbers"]) == [f"+23480310{i:05d}" for i in range(6)]
        assert m["a_number_count"] == 6 and m["severity"] == "HIGH"
        # Filtering by number is on the B-number, as in fraud_alerts.
        assert [a["alert_id"] for a in http.execute("acm_alert_list",
                                                    {"number": victim})["alerts"]] \
            == [m["alert_id"]]
