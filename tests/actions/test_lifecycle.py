"""The alert lifecycle on PostgreSQL through MI: every allowed transition with its audit row,
every refused one rejected (and audited), FALSE_POSITIVE whitelisting in the same step, and the
`acm alert` CLI against a real `acm serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from acm_module.actions.mi import lifecycle_commands
from acm_module.control.commands import Control
from acm_module.control.jsonrpc import INVALID_PARAMS, NOT_FOUND
from acm_module.core import liveconfig as store_config
from acm_module.core import settings as settings_mod
from acm_module.core.records import AlertChange
from acm_module.write.pg import PostgresSink
from tests.support.servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]

_n = iter(range(1, 10_000))


def make_alert(database_url: str, b: str | None = None, severity: str = "HIGH") -> str:
    """Persist one alert the way the writer does; return its id."""
    aid = str(uuid.uuid4())
    i = next(_n)
    b = b or f"+2348039{i:06d}"
    now = int(time.time() * 1000)
    a = AlertChange(sid=f"s/{now}-0", alert_id=aid, op="open", b=b, severity=severity,
                    distinct=5, a_numbers=tuple(f"+23480310{i:03d}{j:02d}" for j in range(5)),
                    first_ms=now - 500, last_ms=now, ver=1, window_ms=5000, block_ttl_ms=0)
    sink = PostgresSink(database_url)
    try:
        sink.open()
        sink.write([], [a])
    finally:
        sink.close()
    return aid


@pytest.fixture
def control(store_url: str, database_url: str, tmp_path: Any) -> Iterator[Control]:
    s = settings_mod.load(None, env={}, cli={"store": store_url, "database_url": database_url,
                                             "state_dir": str(tmp_path)})
    c = Control(s, extra_commands=[lifecycle_commands])
    try:
        yield c
    finally:
        c.close()


def mi(control: Control, method: str, **params: Any) -> dict[str, Any]:
    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                      "params": {"actor": "alice", **params}}).encode()
    out = control.dispatch(raw, via="http:127.0.0.1:40000", loopback_bind=True)
    assert out is not None
    return json.loads(out)


def row(database_url: str, aid: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as c:
        cur = c.execute("SELECT status, assigned_to, resolved_at, notes FROM fraud_alerts "
                        "WHERE alert_id = %s", (aid,))
        r = cur.fetchone()
        assert r is not None and cur.description is not None
        return dict(zip([d.name for d in cur.description], r, strict=True))


def audit_rows(database_url: str, target: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as c:
        cur = c.execute("SELECT actor, action, target, old, new, outcome, details FROM audit_log "
                        "WHERE target = %s ORDER BY id", (target,))
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


# (how, from, to) for every allowed move; "assign" takes NEW to INVESTIGATING.
ALLOWED = [
    ("assign", "NEW", "INVESTIGATING"),
    ("status", "NEW", "INVESTIGATING"),
    ("status", "NEW", "RESOLVED"),
    ("status", "NEW", "FALSE_POSITIVE"),
    ("status", "INVESTIGATING", "RESOLVED"),
    ("status", "INVESTIGATING", "FALSE_POSITIVE"),
    ("status", "NEW", "CONFIRMED"),
    ("status", "INVESTIGATING", "CONFIRMED"),
    ("status", "CONFIRMED", "RESOLVED"),
]


@pytest.mark.parametrize(("how", "start", "target"), ALLOWED)
def test_every_allowed_transition_has_its_audit_row(
        control: Control, database_url: str, how: str, start: str, target: str) -> None:
    aid = make_alert(database_url)
    if start != "NEW":
        assert mi(control, "acm_alert_status", alert_id=aid, status=start)["result"]
    before = audit_rows(database_url, aid)
    if how == "assign":
        r = mi(control, "acm_alert_assign", alert_id=aid, assignee="bob")
    else:
        r = mi(control, "acm_alert_status", alert_id=aid, status=target.lower(),
               note=f"moved to {target}")
    assert "error" not in r, r
    res = r["result"]
    assert res["status"] == target
    db = row(database_url, aid)
    assert db["status"] == target
    final = target in ("RESOLVED", "FALSE_POSITIVE")
    assert (db["resolved_at"] is not None) == final
    assert (res["resolved_at"] is not None) == final
    if how == "assign":
        assert db["assigned_to"] == "bob"
    else:
        assert db["notes"].endswith(f"alice: moved to {target}")

    rows = audit_rows(database_url, aid)
    assert len(rows) == len(before) + 1
    a = rows[-1]
    assert (a["actor"], a["action"], a["outcome"]) == (
        "alice", "acm_alert_assign" if how == "assign" else "acm_alert_status", "ok")
    assert a["old"]["status"] == start and a["new"]["status"] == target
    assert a["details"] == "via http:127.0.0.1:40000"
    assert len(res["audit_ids"]) == 1


REFUSED = [
    ("RESOLVED", "INVESTIGATING"), ("RESOLVED", "FALSE_POSITIVE"), ("RESOLVED", "RESOLVED"),
    ("FALSE_POSITIVE", "RESOLVED"), ("FALSE_POSITIVE", "INVESTIGATING"),
    ("INVESTIGATING", "INVESTIGATING"), ("INVESTIGATING", "NEW"), ("NEW", "NEW"),
    ("CONFIRMED", "INVESTIGATING"), ("CONFIRMED", "FALSE_POSITIVE"), ("CONFIRMED", "CONFIRMED"),
    ("RESOLVED", "CONFIRMED"), ("FALSE_POSITIVE", "CONFIRMED"),
]


@pytest.mark.parametrize(("start", "target"), REFUSED)
def test_invalid_transitions_are_rejected_and_audited(
        control: Control, database_url: str, start: str, target: str) -> None:
    aid = make_alert(database_url)
    if start != "NEW":
        assert "result" in mi(control, "acm_alert_status", alert_id=aid, status=start)
    before = row(database_url, aid)
    r = mi(control, "acm_alert_status", alert_id=aid, status=target)
    assert r["error"]["code"] == INVALID_PARAMS
    assert f"{start} -> {target} is not allowed" in r["error"]["message"]
    assert row(database_url, aid) == before
    last = audit_rows(database_url, aid)[-1]
    assert (last["action"], last["outcome"], last["new"]) == ("acm_alert_status", "rejected",
                                                              None)
    assert last["old"]["status"] == start


def test_final_alerts_cannot_be_assigned(control: Control, database_url: str) -> None:
    aid = make_alert(database_url)
    mi(control, "acm_alert_status", alert_id=aid, status="RESOLVED")
    r = mi(control, "acm_alert_assign", alert_id=aid, assignee="bob")
    assert r["error"]["code"] == INVALID_PARAMS
    assert audit_rows(database_url, aid)[-1]["outcome"] == "rejected"
    assert row(database_url, aid)["assigned_to"] is None


def test_false_positive_whitelists_the_b_number_in_the_same_step(
        control: Control, database_url: str, store_url: str) -> None:
    b = "+2348039955555"
    aid = make_alert(database_url, b=b)
    r = mi(control, "acm_alert_status", alert_id=aid, status="FALSE_POSITIVE", whitelist=True,
           reason="bank IVR callback")
    assert "error" not in r, r
    res = r["result"]
    assert res["status"] == "FALSE_POSITIVE" and len(res["audit_ids"]) == 2
    assert res["whitelisted"]["b_number"] == b
    with psycopg.connect(database_url) as c:
        wl = c.execute("SELECT reason, created_by, expires_at FROM whitelist WHERE b_number = %s",
                       (b,)).fetchone()
    assert wl == ("bank IVR callback", "alice", None)
    wl_audit = audit_rows(database_url, b)
    assert [(x["action"], x["outcome"]) for x in wl_audit] == [("acm_whitelist_add", "ok")]
    assert wl_audit[0]["new"]["reason"] == "bank IVR callback"
    assert aid in wl_audit[0]["details"]
    # The marker the decision script reads, and the control plane's listing.
    marker = control.conn.execute_command("GET", store_config.whitelist_key(b, 16))
    assert marker == b"bank IVR callback"
    listed = mi(control, "acm_whitelist_list", number=b)["result"]
    assert listed["count"] == 1


def test_whitelist_only_with_false_positive_and_unknown_alerts(
        control: Control, database_url: str) -> None:
    aid = make_alert(database_url)
    r = mi(control, "acm_alert_status", alert_id=aid, status="RESOLVED", whitelist=True)
    assert r["error"]["code"] == INVALID_PARAMS
    assert row(database_url, aid)["status"] == "NEW"
    r = mi(control, "acm_alert_status", alert_id=str(uuid.uuid4()), status="RESOLVED")
    assert r["error"]["code"] == NOT_FOUND
    r = mi(control, "acm_alert_status", alert_id="not-a-uuid", status="RESOLVED")
    assert r["error"]["code"] == INVALID_PARAMS
    r = mi(control, "acm_alert_status", alert_id=aid, status="CLOSED")
    assert r["error"]["code"] == INVALID_PARAMS


def test_notes_append_in_any_status_with_audit(control: Control, database_url: str) -> None:
    aid = make_alert(database_url)
    mi(control, "acm_alert_note", alert_id=aid, note="first look: SIM box in Lagos")
    mi(control, "acm_alert_status", alert_id=aid, status="RESOLVED")
    r = mi(control, "acm_alert_note", alert_id=aid, note="reported to the carrier")
    assert r["result"]["status"] == "RESOLVED"
    notes = row(database_url, aid)["notes"].splitlines()
    assert len(notes) == 2
    assert notes[0].endswith("alice: first look: SIM box in Lagos")
    assert notes[1].endswith("alice: reported to the carrier")
    acts = [(x["action"], x["outcome"]) for x in audit_rows(database_url, aid)]
    assert acts == [("acm_alert_note", "ok"), ("acm_alert_status", "ok"),
                    ("acm_alert_note", "ok")]
    shown = mi(control, "acm_alert_show", alert_id=aid)["result"]
    assert shown["alert_id"] == aid and shown["status"] == "RESOLVED"


def test_acm_alert_cli_through_a_running_service(service_factory: Any, database_url: str
                                                 ) -> None:
    b = "+2348039977777"
    aid = make_alert(database_url, b=b)
    with service_factory(env={"DATABASE_URL": database_url}) as (svc, client):
        url = f"http://{svc.mi_http}/mi"

        def acm(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "acm_module.cli", "alert", *args,
                                   "--url", url], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, env={**svc.env})

        r = acm("assign", aid, "carol", "--note", "on it")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "INVESTIGATING"
        r = acm("status", aid, "resolved")
        assert r.returncode == 0, r.stderr
        r = acm("status", aid, "investigating")
        assert r.returncode == 1 and "is not allowed" in r.stderr
        aid2 = make_alert(database_url, b=b)
        r = acm("status", aid2, "false_positive", "--whitelist", "--reason", "hospital PBX")
        assert r.returncode == 0, r.stderr
        # The decision path sees the whitelist at once.
        reply = client.decide("after-fp", "+2348031000001", b, ts=time.time())
        assert (reply["verdict"], reply["reason"]) == ("allow", "whitelisted")
    assert row(database_url, aid)["assigned_to"] == "carol"
    acts = [(x["actor"], x["action"], x["outcome"]) for x in audit_rows(database_url, aid)]
    assert [a[1:] for a in acts] == [("acm_alert_assign", "ok"), ("acm_alert_status", "ok"),
                                     ("acm_alert_status", "rejected")]
