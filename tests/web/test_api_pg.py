"""The REST API with PostgreSQL (users, tokens, alerts, lifecycle, reports) and `acm writer`
between the pool's stream and the database: real redis-server, PostgreSQL and writer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from tests.support.pdfreport import assert_same_figures
from tests.support.web import PASSWORD, Web, running_web
from tests.web.test_api import burst, fresh_b

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


@pytest.fixture
def pg_web(store_url: str, database_url: str, writer_factory: Any) -> Iterator[Web]:
    writer_factory(env={"DATABASE_URL": database_url}, args=["--sinks", "pg"])
    with running_web(store_url, env={"DATABASE_URL": database_url}) as w:
        w.make_users()
        w.database_url = database_url  # type: ignore[attr-defined]
        yield w


def wait_row(url: str, alert_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(url) as c:
            if c.execute("SELECT 1 FROM fraud_alerts WHERE alert_id = %s",
                         (alert_id,)).fetchone():
                return
        time.sleep(0.1)
    raise AssertionError(f"alert {alert_id} never reached fraud_alerts")


def test_users_and_tokens_live_in_postgres_hashed(pg_web: Web) -> None:
    with psycopg.connect(pg_web.database_url) as c:  # type: ignore[attr-defined]
        users = dict(c.execute("SELECT name, password_hash FROM web_users").fetchall())
        hashes = [r[0] for r in c.execute("SELECT token_hash FROM web_tokens").fetchall()]
    assert set(users) == {"viewer", "analyst", "admin"}
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in users.values())
    assert len(hashes) == 3 and not set(hashes) & set(pg_web.tokens.values())
    r = pg_web.client().post("/api/v1/auth/login", json={"username": "analyst",
                                                         "password": PASSWORD})
    assert r.status_code == 200
    t = pg_web.client(r.json()["token"])
    assert t.get("/api/v1/auth/me").json()["user"] == "analyst"
    assert t.post("/api/v1/auth/logout").status_code == 204
    assert t.get("/api/v1/auth/me").status_code == 401


def test_an_api_burst_reaches_the_writer_and_is_worked_through_its_lifecycle(
        pg_web: Web) -> None:
    analyst, viewer = pg_web.as_role("analyst"), pg_web.as_role("viewer")
    b = fresh_b()
    aid = burst(analyst, b, 5)[-1]["detection_result"]["alert_id"]
    wait_row(pg_web.database_url, aid)  # type: ignore[attr-defined]
    page = viewer.get("/api/v1/alerts", params={"b_number": b, "status": "NEW"}).json()
    assert page["source"] == "postgres"
    assert [a["alert_id"] for a in page["alerts"]] == [aid]
    # Viewers read, analysts act.
    assert viewer.post(f"/api/v1/alerts/{aid}/transitions",
                       json={"status": "INVESTIGATING"}).status_code == 403
    r = analyst.post(f"/api/v1/alerts/{aid}/transitions",
                     json={"status": "INVESTIGATING", "assignee": "ada", "note": "looking"})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["assigned_to"]) == ("INVESTIGATING", "ada")
    r = analyst.post(f"/api/v1/alerts/{aid}/transitions", json={"status": "NEW"})
    assert r.status_code == 422 and "not allowed" in r.json()["message"]
    r = analyst.post(f"/api/v1/alerts/{aid}/transitions", json={
        "status": "FALSE_POSITIVE", "note": "a call centre", "whitelist": True})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "FALSE_POSITIVE" and r.json()["whitelisted"]["b_number"] == b
    # The whitelist took effect in the pool at once.
    out = burst(analyst, b, 5, tag=f"{b}-after")
    assert {o["detection_result"]["reason"] for o in out} == {"whitelisted"}
    d = viewer.get(f"/api/v1/alerts/{aid}").json()
    assert d["alert"]["status"] == "FALSE_POSITIVE"
    assert [n.split(" ", 1)[1] for n in d["notes"]] == ["analyst: looking",
                                                        "analyst: a call centre"]
    acts = [(a["action"], a["actor"]) for a in d["actions"]]
    assert ("acm_alert_assign", "analyst") in acts and ("acm_alert_status", "analyst") in acts
    assert {e["kind"] for e in d["timeline"]} == {"call", "action"}
    assert viewer.get("/api/v1/alerts", params={"status": "FALSE_POSITIVE", "b_number": b}
                      ).json()["count"] == 1
    # What the actions runner records about an alert (its audit_log rows, the incident id)
    # shows in the detail.
    with psycopg.connect(pg_web.database_url, autocommit=True) as c:  # type: ignore[attr-defined]
        c.execute("UPDATE fraud_alerts SET ncc_incident_id = 'NCC-OPR-20261129-0007' "
                  "WHERE alert_id = %s", (aid,))
        c.execute("INSERT INTO audit_log (actor, action, target, new, outcome) VALUES "
                  "('acm-actions', 'action.disconnect', %s, '{\"ended\": 4}', 'ok')", (aid,))
    d = viewer.get(f"/api/v1/alerts/{aid}").json()
    assert d["alert"]["ncc_incident_id"] == "NCC-OPR-20261129-0007"
    (act,) = [a for a in d["actions"] if a["action"] == "action.disconnect"]
    assert act["actor"] == "acm-actions" and act["new"] == {"ended": 4}
    # A final alert takes no more moves.
    r = analyst.post(f"/api/v1/alerts/{aid}/transitions", json={"status": "RESOLVED"})
    assert r.status_code == 422


def test_the_daily_report_in_json_csv_html_and_pdf(pg_web: Web) -> None:
    b = fresh_b()
    aid = burst(pg_web.as_role("analyst"), b, 5)[-1]["detection_result"]["alert_id"]
    wait_row(pg_web.database_url, aid)  # type: ignore[attr-defined]
    day = datetime.now(ZoneInfo("Africa/Lagos")).date().isoformat()
    v = pg_web.as_role("viewer")
    j = v.get(f"/api/v1/reports/daily/{day}").json()
    assert j["date"] == day and j["alerts_total"] >= 1
    assert aid in [a["alert_id"] for a in j["alerts"]]
    csv = v.get(f"/api/v1/reports/daily/{day}", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv") and aid in csv.text
    html = v.get(f"/api/v1/reports/daily/{day}", params={"format": "html"})
    assert html.headers["content-type"].startswith("text/html") and "<svg" in html.text
    pdf = v.get(f"/api/v1/reports/daily/{day}", params={"format": "pdf"})
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == f'attachment; filename="acm-daily-{day}.pdf"'
    assert_same_figures(pdf.content, j)
    assert pg_web.client().get(f"/api/v1/reports/daily/{day}",
                               params={"format": "pdf"}).status_code == 401
    assert v.get(f"/api/v1/reports/daily/{day}", params={"format": "xls"}).status_code == 422
    assert v.get("/api/v1/reports/daily/2026-13-01").status_code == 422
