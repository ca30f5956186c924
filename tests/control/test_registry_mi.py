"""The carrier registry's control plane over the real MI endpoint, on the store repository:
acm_carrier_* / acm_gateway_* / acm_route_* / acm_registry_show, the publish to the store, the
audit trail, the re-publish at start-up and on acm_reload, acm_stats per carrier, the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opensips.mi import OpenSIPSMI, OpenSIPSMIException

from acm_module.control import jsonrpc
from acm_module.control.repository import REGISTRY_RECORD_KEY
from acm_module.core import registry
from acm_module.core import stats as stats_mod
from acm_module.decide.store.conn import StoreConnection
from tests.control.test_mi import wait_for
from tests.support.mi_helpers import mi_error
from tests.support.servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

GLO = {"id": "glo-ig", "name": "Globacom IGW", "licence": "international_gateway",
       "contact": "noc@example.ng"}
MTN = {"id": "mtn", "name": "MTN", "licence": "mno"}


@pytest.fixture
def conn(store_url: str) -> Iterator[StoreConnection]:
    c = StoreConnection(store_url, timeout=2.0)
    try:
        yield c
    finally:
        c.close()


def call_error(mi: OpenSIPSMI, method: str, params: dict[str, Any]) -> tuple[int, str]:
    with pytest.raises(OpenSIPSMIException) as e:
        mi.execute(method, params)
    return mi_error(e.value)


def record_doc(conn: StoreConnection) -> dict[str, Any] | None:
    raw = conn.call("HGET", REGISTRY_RECORD_KEY, "doc")
    return None if raw is None else json.loads(raw)  # type: ignore[arg-type]


def populate(mi: OpenSIPSMI) -> None:
    """Two carriers, two gateways, two routes."""
    mi.execute("acm_carrier_add", {**GLO, "actor": "alice"})
    mi.execute("acm_carrier_add", MTN)
    mi.execute("acm_gateway_add", {"id": "glo-lag-1", "carrier": "glo-ig",
                                   "addresses": "198.51.100.7, 203.0.113.0/24",
                                   "trunks": "tg-101", "rate_limit_cps": 50})
    mi.execute("acm_gateway_add", {"id": "mtn-1", "carrier": "mtn",
                                   "addresses": ["2001:db8::1"]})
    mi.execute("acm_route_add", {"id": "glo-intl", "carrier": "glo-ig",
                                 "direction": "international"})
    mi.execute("acm_route_add", {"id": "glo-lag-nat", "carrier": "glo-ig",
                                 "gateway": "glo-lag-1", "trunk": "tg-101",
                                 "direction": "national", "cli_rule": "monitor"})


def test_every_command_changes_the_published_registry(mi_factory, conn: StoreConnection  # type: ignore[no-untyped-def]
                                                      ) -> None:
    with mi_factory(workers=1) as (mi, _):
        http, dgram = mi.http(), mi.datagram()
        show = http.execute("acm_registry_show")
        assert show == {"version": 0, "document": registry.EMPTY, "repository": "store",
                        "in_sync": True}

        versions = [0]

        def bumped(r: dict[str, Any]) -> bool:
            """The change was published as a new version (and is the store's now)."""
            versions.append(r["version"])
            return versions[-1] > versions[-2] and registry.version(conn) == versions[-1]

        r = http.execute("acm_carrier_add", {**GLO, "actor": "alice"})
        assert r["carrier"] == {**GLO, "cli_rule": None}
        assert r["replaced"] is False and bumped(r) and r["audit_id"]
        assert registry.read(conn) == (r["version"], {**registry.EMPTY,
                                                      "carriers": [r["carrier"]]})
        assert record_doc(conn) == registry.read(conn)[1]  # the store repository's record

        # Replace (over datagrams, as opensips-cli would): every field is the new one.
        r = dgram.execute("acm_carrier_add", {"id": "glo-ig", "name": "Glo", "licence": "PNL",
                                              "cli_rule": "Enforce"})
        assert r["carrier"] == {"id": "glo-ig", "name": "Glo", "licence": "pnl",
                                "contact": None, "cli_rule": "enforce"}
        assert r["replaced"] is True and bumped(r)
        assert bumped(http.execute("acm_carrier_add", {**GLO, "cli_rule": "null"}))
        assert bumped(http.execute("acm_carrier_add", MTN))

        r = http.execute("acm_gateway_add", {"id": "glo-lag-1", "carrier": "glo-ig",
                                             "addresses": "198.51.100.7/32, 203.0.113.9/24",
                                             "trunks": "tg-101,tg-102", "rate_limit_cps": "50"})
        assert r["gateway"] == {"id": "glo-lag-1", "carrier_id": "glo-ig",
                                "addresses": ["198.51.100.7", "203.0.113.0/24"],
                                "trunks": ["tg-101", "tg-102"], "rate_limit_cps": 50,
                                "rate_window_s": 1.0}
        assert bumped(r)
        r = dgram.execute("acm_gateway_add", {"id": "mtn-1", "carrier": "mtn",
                                              "addresses": ["2001:DB8::1"]})
        assert r["gateway"]["addresses"] == ["2001:db8::1"] and bumped(r)

        r = http.execute("acm_gateway_set_limit", {"id": "glo-lag-1", "cps": 20,
                                                   "window": "2.5"})
        assert (r["gateway"]["rate_limit_cps"], r["gateway"]["rate_window_s"]) == (20, 2.5)
        assert r["old"] == {"rate_limit_cps": 50, "rate_window_s": 1.0} and bumped(r)
        r = http.execute("acm_gateway_set_limit", {"id": "glo-lag-1", "cps": 0})
        assert (r["gateway"]["rate_limit_cps"], r["gateway"]["rate_window_s"]) == (0, 2.5)
        assert bumped(r)

        r = http.execute("acm_route_add", {"id": "glo-intl", "carrier": "glo-ig",
                                           "direction": "International"})
        assert r["route"] == {"id": "glo-intl", "carrier_id": "glo-ig", "gateway_id": None,
                              "trunk": None, "direction": "international", "cli_rule": None}
        assert bumped(r)
        r = http.execute("acm_route_add", {"id": "glo-lag-nat", "carrier": "glo-ig",
                                           "gateway": "glo-lag-1", "trunk": "tg-101",
                                           "direction": "national", "cli_rule": "monitor"})
        assert bumped(r)

        ver, doc = registry.read(conn)
        assert ver == versions[-1] and doc == registry.validate(doc)
        assert [c["id"] for c in doc["carriers"]] == ["glo-ig", "mtn"]
        assert [g["id"] for g in doc["gateways"]] == ["glo-lag-1", "mtn-1"]
        assert [x["id"] for x in doc["routes"]] == ["glo-intl", "glo-lag-nat"]
        assert http.execute("acm_registry_show") == {
            "version": ver, "document": doc, "repository": "store", "in_sync": True}
        listed = http.execute("acm_carrier_list")
        assert listed["count"] == 2
        assert listed["carriers"][0] == {**GLO, "cli_rule": None, "gateways": ["glo-lag-1"],
                                         "routes": ["glo-intl", "glo-lag-nat"]}
        assert listed["carriers"][1]["gateways"] == ["mtn-1"]

        # Removing what others reference is refused unless cascade=true.
        code, msg = call_error(http, "acm_carrier_remove", {"id": "glo-ig"})
        assert code == jsonrpc.INVALID_PARAMS
        assert "carrier 'glo-ig' is still referenced by gateway(s) glo-lag-1 and route(s) " \
               "glo-intl, glo-lag-nat" in msg and "cascade=true" in msg
        code, msg = call_error(http, "acm_gateway_remove", {"id": "glo-lag-1"})
        assert code == jsonrpc.INVALID_PARAMS and "route(s) glo-lag-nat" in msg
        assert registry.version(conn) == ver

        r = http.execute("acm_route_remove", {"id": "glo-intl"})
        assert r["removed"] == "glo-intl" and r["route"]["direction"] == "international"
        assert bumped(r)
        r = http.execute("acm_gateway_remove", {"id": "glo-lag-1", "cascade": True})
        assert r["gateway"]["id"] == "glo-lag-1"
        assert [x["id"] for x in r["gateway"]["routes"]] == ["glo-lag-nat"] and bumped(r)
        assert registry.read(conn)[1]["routes"] == []
        r = http.execute("acm_carrier_remove", {"id": "mtn", "cascade": "true"})
        assert [g["id"] for g in r["carrier"]["gateways"]] == ["mtn-1"] and bumped(r)
        r = http.execute("acm_carrier_remove", {"id": "glo-ig"})  # nothing references it now
        assert bumped(r) and len(versions) == 15
        assert registry.read(conn) == (r["version"], registry.EMPTY)
        assert record_doc(conn) == registry.EMPTY
        for method, eid in (("acm_carrier_remove", "glo-ig"), ("acm_gateway_remove", "x"),
                            ("acm_route_remove", "x"),
                            ("acm_gateway_set_limit", "x")):
            params = {"id": eid, **({"cps": 1} if method.endswith("limit") else {})}
            code, msg = call_error(http, method, params)
            assert code == jsonrpc.NOT_FOUND and repr(eid) in msg, (method, msg)

        # One audit record per change: action, target, old -> new.
        recs = http.execute("acm_audit_list", {"limit": 100})["records"]
        assert len(recs) == 14
        first = recs[-1]
        assert (first["action"], first["target"], first["actor"]) == (
            "acm_carrier_add", "carrier:glo-ig", "alice")
        assert first["old"] is None and first["new"]["name"] == "Globacom IGW"
        assert first["via"].startswith("http:127.0.0.1:")
        limit = http.execute("acm_audit_list", {"action": "acm_gateway_set_limit"})["records"]
        assert [(x["target"], x["old"]["rate_limit_cps"], x["new"]["rate_limit_cps"])
                for x in limit] == [("gateway:glo-lag-1", 20, 0), ("gateway:glo-lag-1", 50, 20)]
        cascade = http.execute("acm_audit_list", {"target": "gateway:glo-lag-1",
                                                  "action": "acm_gateway_remove"})["records"]
        assert cascade[0]["new"] is None and cascade[0]["old"]["routes"][0]["id"] == "glo-lag-nat"
        which = http.execute("which")
        for name in ("acm_carrier_add", "acm_carrier_remove", "acm_gateway_add",
                     "acm_gateway_remove", "acm_gateway_set_limit", "acm_route_add",
                     "acm_route_remove"):
            assert which[name]["admin"] is True, name
        assert which["acm_carrier_list"]["admin"] is False
        assert which["acm_registry_show"]["admin"] is False
        assert which["acm_gateway_add"]["params"] == [
            "id", "carrier", "addresses", "trunks?", "rate_limit_cps?", "rate_window_s?"]


BAD = [
    ("acm_carrier_add", {"id": "new", "name": "N", "licence": "isp"},
     "carrier 'new': licence: 'isp' is not one of"),
    ("acm_carrier_add", {"id": "bad id", "name": "N", "licence": "mno"},
     "id: must be 1 to 64 characters"),
    ("acm_carrier_add", {"id": "x" * 65, "name": "N", "licence": "mno"}, "id: must be 1 to 64"),
    ("acm_carrier_add", {"id": "new", "licence": "mno"}, "missing required parameter 'name'"),
    ("acm_carrier_add", {"id": "new", "name": "N" * 201, "licence": "mno"},
     "name: must be a string of at most 200"),
    ("acm_carrier_add", {"id": "new", "name": "N", "licence": "mno", "cli_rule": "drop"},
     "cli_rule: 'drop' is not one of enforce, monitor, off"),
    ("acm_carrier_add", {"id": "new", "name": "N", "licence": "mno", "colour": "red"},
     "unknown parameter(s) colour"),
    ("acm_carrier_remove", {"id": "glo-ig"}, "still referenced"),
    ("acm_gateway_add", {"id": "g", "carrier": "nope", "addresses": "192.0.2.1"},
     "gateway 'g': carrier_id: no carrier 'nope'"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": "192.0.2.300"},
     "gateway 'g': addresses: '192.0.2.300' is not an IP address or network"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": "203.0.113.77/24"},
     "gateway 'g': address 203.0.113.0/24 is already listed by gateway 'glo-lag-1'"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": ""},
     "gateway 'g': needs at least one address or trunk"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": "192.0.2.1",
                         "rate_limit_cps": 100_001}, "rate_limit_cps: must be an integer from 0"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": "192.0.2.1",
                         "rate_limit_cps": "lots"}, "rate_limit_cps: must be an integer"),
    ("acm_gateway_add", {"id": "g", "carrier": "mtn", "addresses": "192.0.2.1",
                         "rate_window_s": 0.05}, "rate_window_s: must be a number of seconds"),
    ("acm_gateway_add", {"id": "glo-lag-1", "carrier": "mtn", "addresses": "192.0.2.1"},
     "route 'glo-lag-nat': gateway 'glo-lag-1' belongs to carrier 'mtn', not 'glo-ig'"),
    ("acm_gateway_remove", {"id": "glo-lag-1"}, "still referenced by route(s) glo-lag-nat"),
    ("acm_gateway_set_limit", {"id": "glo-lag-1", "cps": -1}, "rate_limit_cps: must be"),
    ("acm_gateway_set_limit", {"id": "glo-lag-1", "cps": 5, "window": 61},
     "gateway 'glo-lag-1': rate_window_s"),
    ("acm_route_add", {"id": "r", "carrier": "mtn", "direction": "outbound"},
     "route 'r': direction: 'outbound' is not one of international, national"),
    ("acm_route_add", {"id": "r", "carrier": "mtn", "gateway": "glo-lag-1",
                       "direction": "national"},
     "route 'r': gateway 'glo-lag-1' belongs to carrier 'glo-ig', not 'mtn'"),
    ("acm_route_add", {"id": "r", "carrier": "glo-ig", "direction": "national"},
     "route 'r': route 'glo-intl' already has carrier 'glo-ig'"),
    ("acm_route_add", {"id": "r", "carrier": "mtn", "direction": "national", "trunk": "t" * 129},
     "route 'r': trunk"),
]


def test_bad_input_is_an_error_and_changes_nothing(mi_factory, conn: StoreConnection  # type: ignore[no-untyped-def]
                                                   ) -> None:
    with mi_factory(workers=1) as (mi, _):
        http = mi.http()
        populate(http)
        before = (registry.read(conn), record_doc(conn),
                  http.execute("acm_audit_list", {"limit": 1000})["count"])
        for method, params, text in BAD:
            code, msg = call_error(http, method, params)
            assert code == jsonrpc.INVALID_PARAMS and text in msg, (method, params, msg)
        after = (registry.read(conn), record_doc(conn),
                 http.execute("acm_audit_list", {"limit": 1000})["count"])
        assert after == before


def test_registry_is_republished_at_start_up_and_on_reload(mi_factory, conn: StoreConnection,  # type: ignore[no-untyped-def]
                                                           tmp_path: Any) -> None:
    state = tmp_path / "state"
    with mi_factory(workers=1, state_dir=state) as (mi, _):
        populate(mi.http())
        _, doc = registry.read(conn)

    # A flushed store loses the published document; the repository's record is kept here.
    conn.call("DEL", registry.REGISTRY_KEY)
    with mi_factory(workers=1, state_dir=state) as (mi, _):
        wait_for(lambda: registry.read(conn)[1] == doc, 10, "the start-up publish")
        ver = registry.version(conn)
        assert mi.http().execute("acm_registry_show")["in_sync"] is True

        # Someone overwrites the published document: acm_reload puts the repository's back.
        registry.publish(conn, {**registry.EMPTY, "carriers": [
            {"id": "rogue", "name": "R", "licence": "other", "contact": None,
             "cli_rule": None}]})
        assert mi.http().execute("acm_registry_show")["in_sync"] is False
        rogue = registry.version(conn)
        r = mi.http().execute("acm_reload")
        assert r["registry"]["published"] is True and r["registry"]["version"] > rogue > ver
        assert registry.read(conn) == (r["registry"]["version"], doc)
        again = mi.http().execute("acm_reload")  # in sync: not published again
        assert again["registry"] == {**r["registry"], "published": False}

        # While running: a store that loses the key gets it back within the watch interval.
        conn.call("DEL", registry.REGISTRY_KEY)
        wait_for(lambda: registry.read(conn)[1] == doc, 10, "the watch's re-publish")


def test_an_empty_repository_leaves_a_published_document_alone(mi_factory,  # type: ignore[no-untyped-def]
                                                               conn: StoreConnection) -> None:
    published = registry.validate({"carriers": [{"id": "c", "name": "C", "licence": "mno"}]})
    ver = registry.publish(conn, published)
    with mi_factory(workers=1) as (mi, _):
        time.sleep(0.5)  # the start-up sync has run
        assert registry.read(conn) == (ver, published)
        assert mi.http().execute("acm_reload")["registry"] == {"version": ver,
                                                                "published": False}
        assert record_doc(conn) is None


def test_acm_stats_counts_per_carrier(mi_factory, conn: StoreConnection) -> None:  # type: ignore[no-untyped-def]
    with mi_factory(workers=1) as (mi, _):
        st = stats_mod.WorkerStats(index=99, pid=os.getpid())
        st.decisions = {"allow:clean": 10, "drop:masking": 3, "drop:rate_limited": 2, "dup": 1,
                        "@glo-ig|allow:clean": 6, "@glo-ig|drop:rate_limited": 2,
                        "@mtn|drop:masking": 3, "@mtn|allow:clean": 1}
        stats_mod.publish(conn, "synthetic/boot/99", st)
        out = mi.http().execute("acm_stats")
        assert out["carriers"] == {
            "glo-ig": {"allow:clean": 6, "drop:rate_limited": 2, "total": 8},
            "mtn": {"drop:masking": 3, "allow:clean": 1, "total": 4}}
        assert not any(k.startswith("@") for k in out["total"]["decisions"])
        assert out["total"]["decisions"]["drop:rate_limited"] == 2
        assert out["total"]["decisions"]["allow:clean"] >= 10
        (w,) = [w for w in out["workers"] if w["index"] == 99]
        assert w["decisions"] == {"allow:clean": 10, "drop:masking": 3,
                                  "drop:rate_limited": 2, "dup": 1}


def test_cli_commands(mi_factory, conn: StoreConnection) -> None:  # type: ignore[no-untyped-def]
    with mi_factory(workers=1) as (mi, _):
        env = {**os.environ, "ACM_MI_HTTP": f"127.0.0.1:{mi.http_port}",
               "ACM_MI_DATAGRAM": f"127.0.0.1:{mi.dgram_port}"}

        def acm(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "acm_module.cli", *args], env=env,
                                  cwd=REPO, capture_output=True, text=True, timeout=30)

        def ok(*args: str) -> Any:
            r = acm(*args)
            assert r.returncode == 0, (args, r.stderr)
            return json.loads(r.stdout)

        assert ok("carrier", "add", "glo-ig", "Globacom IGW", "international_gateway",
                  "--contact", "noc@example.ng")["version"] == registry.version(conn)
        ok("carrier", "add", "mtn", "MTN", "mno", "--cli-rule", "monitor")
        g = ok("gateway", "add", "glo-lag-1", "glo-ig", "198.51.100.7,203.0.113.0/24",
               "--trunks", "tg-101,tg-102", "--cps", "50", "--window", "2")["gateway"]
        assert g["addresses"] == ["198.51.100.7", "203.0.113.0/24"]
        assert (g["trunks"], g["rate_limit_cps"], g["rate_window_s"]) == (
            ["tg-101", "tg-102"], 50, 2.0)
        g = ok("gateway", "set-limit", "glo-lag-1", "10")["gateway"]
        assert (g["rate_limit_cps"], g["rate_window_s"]) == (10, 2.0)
        r = ok("--config", "/dev/null", "route", "add", "glo-nat", "glo-ig", "national",
               "--gateway", "glo-lag-1", "--trunk", "tg-101", "--cli-rule", "off")
        assert r["route"]["cli_rule"] == "off" and r["version"] == registry.version(conn)
        ok("route", "add", "mtn-intl", "mtn", "international", "--datagram",
           f"127.0.0.1:{mi.dgram_port}")
        listed = ok("carrier", "list")
        assert [(c["id"], c["routes"]) for c in listed["carriers"]] == [
            ("glo-ig", ["glo-nat"]), ("mtn", ["mtn-intl"])]
        show = ok("carrier", "show")
        assert (show["version"], show["document"]) == registry.read(conn)

        r = acm("carrier", "remove", "glo-ig")
        assert r.returncode == 1 and "-32602" in r.stderr and "cascade=true" in r.stderr
        r = acm("gateway", "add", "g2", "mtn", "999.1.1.1")
        assert r.returncode == 1 and "not an IP address" in r.stderr
        assert ok("route", "remove", "mtn-intl")["removed"] == "mtn-intl"
        assert ok("gateway", "remove", "glo-lag-1", "--cascade")["removed"] == "glo-lag-1"
        assert ok("carrier", "remove", "glo-ig")["version"] == registry.version(conn)
        r = acm("route", "remove", "mtn-intl")
        assert r.returncode == 1 and "-32004" in r.stderr
        assert [c["id"] for c in registry.read(conn)[1]["carriers"]] == ["mtn"]
        rec = mi.http().execute("acm_audit_list", {"action": "acm_carrier_remove"})["records"]
        assert rec[0]["actor"] != "anonymous"  # the CLI sends the login name
