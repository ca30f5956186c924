"""The REST API against the live pool and a real redis-server (the store repository): auth and
roles, events decided by the pool, alerts, lists, registry, config and audit."""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from acm_module.core import keys
from acm_module.decide.engine import hotpath
from acm_module.decide.store.conn import StoreConnection
from tests.support.servers import REPO, RedisServer, flush, free_port
from tests.support.web import BOOT_TOKEN, PASSWORD, ROLES, Web, running_web

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

_seq = itertools.count()
B_BASE = 2348090000000


def fresh_b() -> str:
    return f"+{B_BASE + next(_seq) * 7919 + int(time.time()) % 100000}"


def burst(c: httpx.Client, b: str, n: int = 5, tag: str = "") -> list[dict[str, Any]]:
    """Send n calls from distinct A-numbers to b through the API; return the responses."""
    out = []
    tag = tag or f"{b}-{time.monotonic_ns()}"
    for i in range(n):
        r = c.post("/api/v1/fraud/events", json={
            "call_id": f"{tag}-{i}", "a_number": f"+23480{(hash(tag) + i) % 10**8:08d}",
            "b_number": b, "status": "ringing"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def stream_records(store_url: str, b: str) -> list[dict[str, str]]:
    """Return the stream records (decisions and alerts) about B-number b."""
    conn = StoreConnection(store_url, timeout=2.0)
    try:
        raw = conn.call("XRANGE", keys.stream(hotpath.partition_of(b, 16)), "-", "+")
    finally:
        conn.close()
    recs = [{f[i].decode(): f[i + 1].decode() for i in range(0, len(f), 2)} for _, f in raw]
    return [r for r in recs if r.get("b") == b]


def wait_applied(web: Web, generation: int, timeout: float = 10.0) -> None:
    """Wait until every worker runs the config generation (their stats say so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = web.as_role("viewer").get("/api/v1/stats").json()
        if st["workers"] and all(w["config_generation"] >= generation for w in st["workers"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"workers did not apply config generation {generation}")


# -- the document and the public part -------------------------------------------------------
def test_openapi_document_describes_the_api_and_security_headers_are_set(web: Web) -> None:
    r = web.client().get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/fraud/events", "/api/v1/alerts", "/api/v1/alerts/{alert_id}",
                 "/api/v1/alerts/{alert_id}/transitions", "/api/v1/whitelist",
                 "/api/v1/blocks", "/api/v1/carriers", "/api/v1/gateways", "/api/v1/routes",
                 "/api/v1/config", "/api/v1/audit", "/api/v1/reports/daily/{day}",
                 "/api/v1/auth/login", "/api/v1/users"):
        assert path in doc["paths"], path
    ev = doc["components"]["schemas"]["CallEventRequest"]
    assert set(ev["required"]) == {"call_id", "a_number", "b_number"}
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    h = web.client().get("/api/v1/health")
    assert h.json() == {"status": "ok"}
    for name, value in (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                        ("referrer-policy", "no-referrer"), ("cache-control", "no-store")):
        assert h.headers[name] == value
    assert "frame-ancestors 'none'" in h.headers["content-security-policy"]


def _operations(web: Web) -> list[tuple[str, str]]:
    doc = web.client().get("/openapi.json").json()
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if path in ("/api/v1/health", "/api/v1/auth/login"):
                continue
            concrete = re.sub(r"\{alert_id\}", "00000000-0000-4000-8000-000000000000", path)
            concrete = re.sub(r"\{day\}", "2026-01-01", concrete)
            concrete = re.sub(r"\{token_id\}", "0123456789abcdef", concrete)
            concrete = re.sub(r"\{[a-z_]+\}", "x1", concrete)
            ops.append((method.upper(), concrete))
    return ops


def test_every_operation_but_health_and_login_answers_401_without_a_valid_token(
        web: Web) -> None:
    ops = _operations(web)
    assert len(ops) >= 30
    anonymous, wrong = web.client(), web.client("acm_not-a-token")
    for method, path in ops:
        for c in (anonymous, wrong):
            r = c.request(method, path, json={})
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"


# -- roles ----------------------------------------------------------------------------------
AID = "00000000-0000-4000-8000-000000000000"
# Every operation of the document but the public ones: (method, template) -> (path, body, the
# least role that may). "{me}" is the caller's own user name (a user's own tokens).
MATRIX: dict[tuple[str, str], tuple[str, Any, str]] = {
    ("GET", "/api/v1/alerts"): ("/api/v1/alerts", None, "viewer"),
    ("GET", "/api/v1/alerts/{alert_id}"): (f"/api/v1/alerts/{AID}", None, "viewer"),
    ("POST", "/api/v1/alerts/{alert_id}/transitions"): (
        f"/api/v1/alerts/{AID}/transitions", {"status": "INVESTIGATING"}, "analyst"),
    ("POST", "/api/v1/alerts/{alert_id}/notes"): (
        f"/api/v1/alerts/{AID}/notes", {"note": "n"}, "analyst"),
    ("POST", "/api/v1/alerts/{alert_id}/assign"): (
        f"/api/v1/alerts/{AID}/assign", {"assignee": "ada"}, "analyst"),
    ("GET", "/api/v1/whitelist"): ("/api/v1/whitelist", None, "viewer"),
    ("POST", "/api/v1/whitelist"): (
        "/api/v1/whitelist", {"b_number": "+2348033333333", "reason": "role test"}, "analyst"),
    ("DELETE", "/api/v1/whitelist/{b_number}"): (
        "/api/v1/whitelist/+2348033333333", None, "analyst"),
    ("GET", "/api/v1/blocks"): ("/api/v1/blocks", None, "viewer"),
    ("DELETE", "/api/v1/blocks/{a_number}"): ("/api/v1/blocks/+2348044444444", None, "analyst"),
    ("GET", "/api/v1/carriers"): ("/api/v1/carriers", None, "viewer"),
    ("POST", "/api/v1/carriers"): (
        "/api/v1/carriers", {"id": "role-c", "name": "Role", "licence": "mno"}, "admin"),
    ("DELETE", "/api/v1/carriers/{id}"): ("/api/v1/carriers/role-c", None, "admin"),
    ("GET", "/api/v1/gateways"): ("/api/v1/gateways", None, "viewer"),
    ("POST", "/api/v1/gateways"): ("/api/v1/gateways", {
        "id": "role-g", "carrier": "nobody", "addresses": ["198.51.100.9"]}, "admin"),
    ("PUT", "/api/v1/gateways/{id}/limit"): ("/api/v1/gateways/role-g/limit", {"cps": 5},
                                             "admin"),
    ("DELETE", "/api/v1/gateways/{id}"): ("/api/v1/gateways/role-g", None, "admin"),
    ("GET", "/api/v1/routes"): ("/api/v1/routes", None, "viewer"),
    ("POST", "/api/v1/routes"): ("/api/v1/routes", {
        "id": "role-r", "carrier": "nobody", "direction": "national"}, "admin"),
    ("DELETE", "/api/v1/routes/{id}"): ("/api/v1/routes/role-r", None, "admin"),
    ("GET", "/api/v1/config"): ("/api/v1/config", None, "viewer"),
    ("PATCH", "/api/v1/config"): ("/api/v1/config", {"log_level": "INFO"}, "admin"),
    ("GET", "/api/v1/stats"): ("/api/v1/stats", None, "viewer"),
    ("GET", "/api/v1/audit"): ("/api/v1/audit", None, "viewer"),
    ("GET", "/api/v1/reports/daily/{day}"): ("/api/v1/reports/daily/2026-01-01", None,
                                              "viewer"),
    ("POST", "/api/v1/fraud/events"): ("/api/v1/fraud/events", {
        "call_id": "role-{me}", "a_number": "+2348011111111", "b_number": "+2348022222222"},
        "analyst"),
    ("GET", "/api/v1/auth/me"): ("/api/v1/auth/me", None, "viewer"),
    ("POST", "/api/v1/auth/logout"): ("/api/v1/auth/logout", None, "viewer"),
    ("GET", "/api/v1/users"): ("/api/v1/users", None, "admin"),
    ("POST", "/api/v1/users"): ("/api/v1/users", {"name": "new-{me}", "role": "viewer",
                                                  "password": PASSWORD}, "admin"),
    ("PATCH", "/api/v1/users/{name}"): ("/api/v1/users/nobody", {"role": "viewer"}, "admin"),
    ("DELETE", "/api/v1/users/{name}"): ("/api/v1/users/nobody", None, "admin"),
    ("GET", "/api/v1/users/{name}/tokens"): ("/api/v1/users/{me}/tokens", None, "viewer"),
    ("POST", "/api/v1/users/{name}/tokens"): ("/api/v1/users/{me}/tokens", {"name": "m"},
                                              "viewer"),
    ("DELETE", "/api/v1/users/{name}/tokens/{token_id}"): (
        "/api/v1/users/{me}/tokens/0123456789abcdef", None, "viewer"),
}


def test_the_role_matrix_covers_every_operation(web: Web) -> None:
    doc = web.client().get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops - set(MATRIX) == {("GET", "/api/v1/health"), ("POST", "/api/v1/auth/login")}
    assert set(MATRIX) <= ops


@pytest.mark.parametrize("op", list(MATRIX), ids=[f"{m} {p}" for m, p in MATRIX])
def test_each_role_may_what_its_rank_allows_and_gets_403_otherwise(
        web: Web, op: tuple[str, str]) -> None:
    method, (path, body, least) = op[0], MATRIX[op]
    for role in ROLES:
        payload = None if body is None else {
            k: v.format(me=role) if isinstance(v, str) else v for k, v in body.items()}
        r = web.as_role(role).request(method, path.format(me=role), json=payload)
        if ROLES.index(role) < ROLES.index(least):
            assert r.status_code == 403, (role, r.text)
            assert r.json() == {"code": "forbidden", "message": r.json()["message"]}
        else:
            assert r.status_code not in (401, 403), (role, r.status_code, r.text)
            # Without a database the lifecycle says so (tests/web/test_api_pg.py has one).
            assert r.status_code < 500 or r.json()["code"] == "not_configured", (role, r.text)


# -- events -----------------------------------------------------------------------------------
def test_a_masking_burst_through_the_api_is_detected_by_the_pool_and_reaches_the_stream(
        web: Web) -> None:
    b = fresh_b()
    out = burst(web.as_role("analyst"), b, 5)
    assert [o["detection_result"]["detected"] for o in out] == [False] * 4 + [True]
    last = out[-1]
    assert last["status"] == "accepted" and last["call_status"] == "ringing"
    res = last["detection_result"]
    assert res["distinct_a_numbers"] == 5
    assert res["threat_level"] == "HIGH"
    assert (res["verdict"], res["reason"]) == ("drop", "masking")
    assert re.fullmatch(r"[0-9a-f-]{36}", res["alert_id"])
    assert "alert_id" in out[0]["detection_result"] and out[0]["detection_result"][
        "alert_id"] is None
    recs = stream_records(web.svc.store_url, b)
    decisions = [r for r in recs if r["k"] == "d"]
    assert len(decisions) == 5 and decisions[-1]["al"] == res["alert_id"]
    assert any(r["k"] == "a" and r["al"] == res["alert_id"] for r in recs)
    # The same alert, seen through the alerts endpoints.
    v = web.as_role("viewer")
    page = v.get("/api/v1/alerts", params={"b_number": b}).json()
    assert [a["alert_id"] for a in page["alerts"]] == [res["alert_id"]]
    assert page["alerts"][0]["status"] == "NEW"
    d = v.get(f"/api/v1/alerts/{res['alert_id']}").json()
    assert len(d["alert"]["a_numbers"]) == 5
    assert len(d["calls"]) == 5 and {c["reason"] for c in d["calls"]} == {"clean", "masking"}
    assert [e["kind"] for e in d["timeline"]] == ["call"] * 5


def test_the_timestamp_is_rfc3339_and_the_pool_trusts_it(web: Web) -> None:
    b = fresh_b()
    c = web.as_role("analyst")
    r = c.post("/api/v1/fraud/events", json={
        "call_id": f"ts-{b}", "a_number": "+2348012345678", "b_number": b,
        "timestamp": "2026-03-01T10:00:00+01:00"})
    assert r.status_code == 200, r.text
    (rec,) = [x for x in stream_records(web.svc.store_url, b) if x["k"] == "d"]
    assert int(rec["ts"]) == 1772355600000


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[]",
    b'{"a_number": "+2348011111111", "b_number": "+2348022222222"}',
    b'{"call_id": "bad-1", "a_number": 2348011111111, "b_number": "+2348022222222"}',
    b'{"call_id": "bad-2", "a_number": "+2348011111111", "b_number": "+2348022222222",'
    b' "timestamp": "yesterday"}',
    b'{"call_id": "bad-3", "a_number": "+2348011111111", "b_number": "+2348022222222",'
    b' "extra": 1}',
    b'{"call_id": "", "a_number": "+2348011111111", "b_number": "+2348022222222"}',
    b'{"call_id": "bad-4", "a_number": "+2348011111111", "b_number": "' + b"9" * 65 + b'"}',
], ids=["not-json", "not-an-object", "missing-call_id", "number-not-a-string",
        "bad-timestamp", "unknown-field", "empty-call_id", "too-long"])
def test_bad_events_get_422_with_a_code_and_a_message_and_nothing_is_recorded(
        web: Web, body: bytes) -> None:
    conn = StoreConnection(web.svc.store_url, timeout=2.0)
    try:
        before = sum(conn.call("XLEN", keys.stream(p)) for p in range(16))
        r = web.as_role("analyst").post("/api/v1/fraud/events", content=body,
                                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        err = r.json()
        assert set(err) == {"code", "message"} and err["code"] == "bad_request"
        assert err["message"]
        after = sum(conn.call("XLEN", keys.stream(p)) for p in range(16))
    finally:
        conn.close()
    assert after == before


def test_the_pool_rules_apply_unchanged_a_number_that_is_not_one_is_allowed_as_invalid_b(
        web: Web) -> None:
    r = web.as_role("analyst").post("/api/v1/fraud/events", json={
        "call_id": f"inv-{time.time_ns()}", "a_number": "+2348011111111",
        "b_number": "anonymous"})
    assert r.status_code == 200
    assert r.json()["detection_result"] | {} == {
        "detected": False, "threat_level": "NONE", "distinct_a_numbers": 0, "alert_id": None,
        "verdict": "allow", "reason": "invalid_b"}


# -- tokens, logins, sessions -------------------------------------------------------------------
def test_login_tokens_are_revocable_and_disabled_users_are_locked_out(web: Web) -> None:
    admin = web.boot
    name = f"u{time.time_ns() % 10**9}"
    assert admin.post("/api/v1/users", json={"name": name, "role": "analyst",
                                             "password": PASSWORD}).status_code == 201
    anon = web.client()
    assert anon.post("/api/v1/auth/login", json={"username": name, "password": "wrong pw 123"}
                     ).status_code == 401
    assert anon.post("/api/v1/auth/login", json={"username": "nobody-" + name,
                                                 "password": PASSWORD}).status_code == 401
    r = anon.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    login = r.json()
    assert (login["user"], login["role"], login["token_type"]) == (name, "analyst", "bearer")
    me = web.client(login["token"])
    assert me.get("/api/v1/auth/me").json() == {"user": name, "role": "analyst",
                                                "csrf_token": None}
    # An API token of one's own, listed (never shown again), then revoked.
    t = me.post(f"/api/v1/users/{name}/tokens", json={"name": "cdr pipeline"}).json()
    listed = me.get(f"/api/v1/users/{name}/tokens").json()["tokens"]
    assert {x["id"] for x in listed} >= {t["id"]} and all("token" not in x for x in listed)
    api = web.client(t["token"])
    assert api.get("/api/v1/alerts").status_code == 200
    assert me.delete(f"/api/v1/users/{name}/tokens/{t['id']}").status_code == 204
    assert api.get("/api/v1/alerts").status_code == 401
    # Another user's tokens are an admin's business only.
    assert me.get("/api/v1/users/admin/tokens").status_code == 403
    # Logout ends the login.
    assert me.post("/api/v1/auth/logout").status_code == 204
    assert me.get("/api/v1/alerts").status_code == 401
    # A disabled user can neither log in nor use a token.
    t2 = admin.post(f"/api/v1/users/{name}/tokens", json={}).json()["token"]
    assert admin.patch(f"/api/v1/users/{name}", json={"disabled": True}).status_code == 200
    assert web.client(t2).get("/api/v1/alerts").status_code == 401
    assert anon.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD}
                     ).status_code == 401
    audit = admin.get("/api/v1/audit", params={"target": f"user:{name}", "limit": 20}).json()
    actions = [(x["action"], x["actor"]) for x in audit["records"]]
    assert ("web_user_add", "api-token") in actions
    assert ("web_token_add", name) in actions and ("web_token_revoke", name) in actions
    assert ("web_user_update", "api-token") in actions


def test_a_cookie_session_needs_the_csrf_header_for_changes(web: Web) -> None:
    c = web.client()
    r = c.post("/api/v1/auth/login", json={"username": "analyst", "password": PASSWORD,
                                           "session": True})
    assert r.status_code == 200
    csrf = r.json()["csrf_token"]
    cookie = r.headers["set-cookie"]
    assert "acm_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert c.get("/api/v1/alerts").status_code == 200
    assert c.get("/api/v1/auth/me").json()["csrf_token"] == csrf
    body = {"b_number": "+2348066666666", "reason": "csrf test"}
    r = c.post("/api/v1/whitelist", json=body)
    assert r.status_code == 403 and r.json()["code"] == "csrf"
    r = c.post("/api/v1/whitelist", json=body, headers={"X-CSRF-Token": "0" * 32})
    assert r.status_code == 403
    r = c.post("/api/v1/whitelist", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    # An event from the session goes through the framework's route (CSRF checked there), and
    # is answered as the bearer fast path answers.
    ev = {"call_id": f"cookie-{time.time_ns()}", "a_number": "+2348011111111",
          "b_number": "+2348066666666"}
    assert c.post("/api/v1/fraud/events", json=ev).status_code == 403
    r = c.post("/api/v1/fraud/events", json=ev, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert r.json()["detection_result"]["reason"] == "whitelisted"
    assert r.headers["x-frame-options"] == "DENY"
    bad = c.post("/api/v1/fraud/events", json={"call_id": "x"}, headers={"X-CSRF-Token": csrf})
    assert bad.status_code == 422 and bad.json()["code"] == "bad_request"
    assert c.delete("/api/v1/whitelist/+2348066666666",
                    headers={"X-CSRF-Token": csrf}).status_code == 200


# -- lists, registry, config, audit ---------------------------------------------------------------
def test_whitelisting_a_b_number_lets_the_next_burst_through(web: Web) -> None:
    b = fresh_b()
    a = web.as_role("analyst")
    r = a.post("/api/v1/whitelist", json={"b_number": b, "reason": "call centre"})
    assert r.status_code == 201, r.text
    assert r.json()["created_by"] == "analyst"
    listed = web.as_role("viewer").get("/api/v1/whitelist", params={"b_number": b}).json()
    assert [e["b_number"] for e in listed["entries"]] == [b]
    out = burst(a, b, 6)
    assert {(o["detection_result"]["verdict"], o["detection_result"]["reason"])
            for o in out} == {("allow", "whitelisted")}
    assert a.delete(f"/api/v1/whitelist/{b}").status_code == 200
    assert a.delete(f"/api/v1/whitelist/{b}").status_code == 404
    audit = web.as_role("viewer").get("/api/v1/audit", params={"target": b}).json()
    assert [(x["action"], x["actor"]) for x in audit["records"]] == [
        ("acm_whitelist_remove", "analyst"), ("acm_whitelist_add", "analyst")]
    assert a.post("/api/v1/whitelist", json={"b_number": "not a number", "reason": "x"}
                  ).json()["code"] == "bad_params"


def test_blocks_are_listed_and_released(web: Web) -> None:
    admin = web.as_role("admin")
    r = admin.patch("/api/v1/config", json={"block_ttl": 60})
    assert r.status_code == 200
    wait_applied(web, r.json()["generation"])
    try:
        b = fresh_b()
        out = burst(web.as_role("analyst"), b, 5)
        a5 = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            blocks = web.as_role("viewer").get("/api/v1/blocks").json()["blocks"]
            if blocks:
                a5 = blocks[0]["a_number"]
                break
            time.sleep(0.05)
        assert a5 is not None, out
        assert web.as_role("analyst").delete(f"/api/v1/blocks/{a5}").status_code == 200
        assert web.as_role("analyst").delete(f"/api/v1/blocks/{a5}").status_code == 404
    finally:
        admin.patch("/api/v1/config", json={"block_ttl": 0})


def test_config_changes_are_validated_and_audited_with_the_user(web: Web) -> None:
    admin = web.as_role("admin")
    r = admin.patch("/api/v1/config", json={"threshold": 1})
    assert r.status_code == 422 and r.json()["code"] == "bad_params"
    assert "old config kept" in r.json()["message"]
    assert admin.patch("/api/v1/config", json={"workers": 3}).status_code == 422
    assert admin.patch("/api/v1/config", json={"nonsense": 3}).status_code == 422
    r = admin.patch("/api/v1/config", json={"threshold": 6})
    assert r.status_code == 200, r.text
    try:
        assert r.json()["changed"] == {"threshold": {"old": 5, "new": 6}}
        live = web.as_role("viewer").get("/api/v1/config").json()
        assert live["live"]["threshold"] == 6
        assert live["settings"]["api_token"] == "***"
        rec = admin.get("/api/v1/audit", params={"action": "acm_set", "limit": 1}).json()
        assert rec["records"][0]["actor"] == "admin"
        assert rec["records"][0]["new"] == {"threshold": 6}
    finally:
        assert admin.patch("/api/v1/config", json={"threshold": 5}).status_code == 200


def test_carriers_gateways_and_routes_are_managed_by_admins(web: Web) -> None:
    admin = web.as_role("admin")
    assert admin.post("/api/v1/carriers", json={"id": "igw1", "name": "IGW One",
                                                "licence": "international_gateway"}
                      ).status_code == 201
    r = admin.post("/api/v1/gateways", json={"id": "gw1", "carrier": "igw1",
                                             "addresses": ["198.51.100.7", "203.0.113.0/24"]})
    assert r.status_code == 201, r.text
    assert admin.post("/api/v1/routes", json={"id": "r1", "carrier": "igw1", "gateway": "gw1",
                                              "direction": "international"}).status_code == 201
    assert admin.put("/api/v1/gateways/gw1/limit", json={"cps": 50}).status_code == 200
    v = web.as_role("viewer")
    (c,) = [c for c in v.get("/api/v1/carriers").json()["carriers"] if c["id"] == "igw1"]
    assert c["gateways"] == ["gw1"] and c["routes"] == ["r1"]
    (g,) = [g for g in v.get("/api/v1/gateways").json()["gateways"] if g["id"] == "gw1"]
    assert g["rate_limit_cps"] == 50
    assert [x["id"] for x in v.get("/api/v1/routes").json()["routes"]] == ["r1"]
    r = admin.delete("/api/v1/carriers/igw1")
    assert r.status_code == 422 and "cascade" in r.json()["message"]
    assert admin.post("/api/v1/gateways", json={"id": "gw2", "carrier": "igw1",
                                                "addresses": ["not an address"]}
                      ).status_code == 422
    assert admin.delete("/api/v1/carriers/igw1", params={"cascade": "true"}).status_code == 200
    assert admin.delete("/api/v1/routes/r1").status_code == 404
    assert v.get("/api/v1/gateways").json()["gateways"] == []


def test_lifecycle_and_reports_say_they_need_the_database_without_one(web: Web) -> None:
    b = fresh_b()
    aid = burst(web.as_role("analyst"), b, 5)[-1]["detection_result"]["alert_id"]
    r = web.as_role("analyst").post(f"/api/v1/alerts/{aid}/transitions",
                                    json={"status": "INVESTIGATING"})
    assert r.status_code == 503 and r.json()["code"] == "not_configured"
    r = web.as_role("viewer").get("/api/v1/reports/daily/2026-01-01")
    assert r.status_code == 503 and r.json()["code"] == "not_configured"
    assert web.as_role("viewer").get(
        "/api/v1/alerts/00000000-0000-4000-8000-000000000000").status_code == 404


def test_alert_filters_and_paging(web: Web) -> None:
    a = web.as_role("analyst")
    bs = [fresh_b() for _ in range(3)]
    ids = [burst(a, b, 5)[-1]["detection_result"]["alert_id"] for b in bs]
    burst(a, bs[2], 2, tag=f"{bs[2]}-more")  # 7 distinct: CRITICAL
    v = web.as_role("viewer")
    everything = v.get("/api/v1/alerts", params={"limit": 500}).json()["alerts"]
    mine = [x["alert_id"] for x in everything if x["alert_id"] in ids]
    assert mine == ids[::-1]  # newest last detection first
    crit = v.get("/api/v1/alerts", params={"severity": "CRITICAL"}).json()["alerts"]
    assert ids[2] in [x["alert_id"] for x in crit] and ids[0] not in [
        x["alert_id"] for x in crit]
    p1 = v.get("/api/v1/alerts", params={"limit": 1, "offset": 0}).json()
    p2 = v.get("/api/v1/alerts", params={"limit": 1, "offset": 1}).json()
    assert (p1["count"], p2["count"]) == (1, 1)
    assert p1["alerts"][0]["alert_id"] != p2["alerts"][0]["alert_id"]
    assert v.get("/api/v1/alerts", params={"status": "RESOLVED"}).json()["alerts"] == []
    assert v.get("/api/v1/alerts", params={"carrier": "nobody"}).json()["alerts"] == []
    future = v.get("/api/v1/alerts", params={"since": "2999-01-01T00:00:00Z"}).json()
    assert future["alerts"] == []
    assert v.get("/api/v1/alerts", params={"severity": "BAD"}).status_code == 422


# -- boot ---------------------------------------------------------------------------------------
def test_an_exposed_api_without_a_token_refuses_to_start_with_one_clear_line(
        tmp_path: Any) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ACM_")}
    r = subprocess.run(
        [sys.executable, "-m", "acm_module.cli", "serve", "--workers", "1",
         "--endpoint", f"ipc://{tmp_path}/acm.sock", "--store", "redis://127.0.0.1:1/0"],
        env={**env, "ACM_WEB_HTTP": f"0.0.0.0:{free_port()}", "ACM_MI_HTTP": "",
             "ACM_MI_DATAGRAM": "", "ACM_METRICS_HTTP": ""},
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "web_http" in lines[0] and "api_token" in lines[0] and "refusing" in lines[0]


def test_the_bootstrap_admin_is_created_once_with_its_password_printed_once(
        store_url: str, tmp_path: Any) -> None:
    pattern = re.compile(r"created user 'admin' with password (\S+)")
    env = {"ACM_API_TOKEN": "", "ACM_STATE_DIR": str(tmp_path / "state")}
    with running_web(store_url, env=env) as w:
        deadline = time.monotonic() + 10
        while not pattern.search(w.svc.read_log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        found = pattern.findall(w.svc.read_log())
        assert len(found) == 1, w.svc.read_log()
        r = w.client().post("/api/v1/auth/login",
                            json={"username": "admin", "password": found[0]})
        assert r.status_code == 200 and r.json()["role"] == "admin"
        # Without api_token, the bootstrap token is no token at all.
        assert w.client(BOOT_TOKEN).get("/api/v1/alerts").status_code == 401
    assert (tmp_path / "state" / "web-bootstrap.json").stat().st_mode & 0o777 == 0o600
    assert found[0] not in (tmp_path / "state" / "web-bootstrap.json").read_text()
    # A restart on an emptied store (the embedded store of scripts/run.sh starts empty): the
    # same admin comes back, and no password is printed again.
    flush(store_url)
    with running_web(store_url, env=env) as w:
        deadline = time.monotonic() + 10
        r = None
        while time.monotonic() < deadline:
            r = w.client().post("/api/v1/auth/login",
                                json={"username": "admin", "password": found[0]})
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r is not None and r.status_code == 200, r.text if r else None
        assert not pattern.search(w.svc.read_log())


def test_a_body_over_the_limit_gets_413_and_reaches_nothing(web: Web) -> None:
    conn = StoreConnection(web.svc.store_url, timeout=2.0)
    try:
        before = sum(conn.call("XLEN", keys.stream(p)) for p in range(16))
        big = b'{"call_id": "big", "a_number": "+2348011111111", "b_number": "+2348022222222",' \
              b' "status": "' + b"x" * (300 * 1024) + b'"}'
        c = web.as_role("analyst")
        r = c.post("/api/v1/fraud/events", content=big,
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "too_large"

        def chunks():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 16384):
                yield big[i:i + 16384]

        r = c.post("/api/v1/fraud/events", content=chunks(),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "too_large"
        assert r.headers["x-content-type-options"] == "nosniff"
        after = sum(conn.call("XLEN", keys.stream(p)) for p in range(16))
    finally:
        conn.close()
    assert after == before
    assert c.get("/api/v1/auth/me").status_code == 200  # the service is fine


def test_failed_logins_from_one_address_are_throttled(store_url: str) -> None:
    with running_web(store_url) as w:
        w.make_users()
        anon = w.client()
        codes = [anon.post("/api/v1/auth/login", json={"username": "viewer",
                                                       "password": f"wrong-{i}-xxxx"}
                           ).status_code for i in range(11)]
        assert codes == [401] * 10 + [429]
        r = anon.post("/api/v1/auth/login", json={"username": "viewer", "password": PASSWORD})
        assert r.status_code == 429 and r.json()["code"] == "too_many_attempts"
        # Tokens keep working: only password guessing is slowed down.
        assert w.as_role("viewer").get("/api/v1/alerts").status_code == 200


def _children(pid: int, comm: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    found = []
    for x in out.stdout.split():
        try:
            with open(f"/proc/{x}/comm") as f:
                if f.read().strip() == comm:
                    found.append(int(x))
        except OSError:
            continue
    return found


def test_the_web_process_is_restarted_after_a_crash_and_dies_with_the_service(
        store_url: str) -> None:
    import os
    import signal

    with running_web(store_url) as w:
        assert w.svc.proc is not None
        (pid,) = _children(w.svc.proc.pid, "acm-web")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            new = _children(w.svc.proc.pid, "acm-web")
            if new and new != [pid]:
                with contextlib.suppress(httpx.HTTPError):
                    if w.boot.get("/api/v1/alerts").status_code == 200:
                        break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the web process did not come back:\n{w.svc.read_log()}")
        (pid,) = _children(w.svc.proc.pid, "acm-web")
        w.svc.stop()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_store_outage_gets_503_at_once_and_the_api_recovers_with_the_store() -> None:
    srv = RedisServer().start()
    try:
        with running_web(srv.url) as w:
            c = w.boot
            ev = {"a_number": "+2348011111111", "b_number": "+2348077777777"}
            assert c.post("/api/v1/fraud/events", json={"call_id": "up-0", **ev}
                          ).status_code == 200
            srv.stop()
            t0 = time.monotonic()
            for i in range(5):
                r = c.post("/api/v1/fraud/events", json={"call_id": f"down-{i}", **ev})
                assert r.status_code == 503, r.text
                assert r.json()["code"] in ("store_unavailable", "unavailable")
            assert time.monotonic() - t0 < 5.0  # answered, not hung
            assert c.get("/api/v1/health").status_code == 200
            srv.start()
            deadline = time.monotonic() + 10
            while True:
                r = c.post("/api/v1/fraud/events",
                           json={"call_id": f"back-{time.monotonic_ns()}", **ev})
                if r.status_code == 200:
                    break
                assert time.monotonic() < deadline, r.text
                time.sleep(0.1)
    finally:
        srv.cleanup()


@pytest.mark.parametrize("restricted", [False, True], ids=["any-client-key", "client-keys"])
def test_events_reach_a_pool_whose_endpoint_speaks_curve(store_url: str, tmp_path: Any,
                                                         restricted: bool) -> None:
    from acm_module.decide.access import generate_keypair
    from acm_module.decide.client import CurveKeys

    generate_keypair(tmp_path, "server")
    generate_keypair(tmp_path, "opensips")
    env = {"ACM_CURVE_SERVER_KEY": str(tmp_path / "server.key_secret")}
    probe = CurveKeys.load(str(tmp_path / "server.key"))
    if restricted:  # the API process uses the service's own pair: list its public key
        clients = tmp_path / "clients"
        clients.mkdir()
        for name in ("opensips", "server"):
            (clients / f"{name}.key").write_bytes((tmp_path / f"{name}.key").read_bytes())
        env["ACM_CURVE_CLIENT_KEYS"] = str(clients)
        probe = CurveKeys.load(str(tmp_path / "server.key"),
                               str(tmp_path / "opensips.key_secret"))
    with running_web(store_url, env=env, curve=probe) as w:
        out = burst(w.boot, fresh_b(), 5)
        assert out[-1]["detection_result"]["detected"] is True
        assert "libzmq" in w.svc.read_log()  # CURVE: the workers run libzmq I/O
