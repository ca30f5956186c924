"""The daily report from the stored data: real attacks through `acm serve`, persisted by
`acm writer`, NCC ids given by `acm actions`, some alerts resolved; `acm report daily` must show
exactly what fraud_alerts and audit_log hold (and what the durable stream says happened)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from acm_module.actions.lifecycle import Lifecycle
from acm_module.compliance.ncc import incident_id, parse_incident_id
from acm_module.compliance.report import chart_svg
from acm_module.compliance.stats import _calls_dropped
from tests.actions.test_disconnect import ActionsProcess, wait_for
from tests.support.numbers import b_num
from tests.support.pgqdb import stream_records, wait_drained
from tests.support.servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(150)]

TZ = "Africa/Lagos"
DAY = date(2026, 11, 20)
# (local day, local hour:minute, callers) with threshold 3: 3-4 callers LOW, 5-6 HIGH, 7+ CRITICAL.
EPISODES = [
    (date(2026, 11, 19), (23, 30), 5),  # the day before: not in the report
    (DAY, (0, 30), 3),                  # 23:30 UTC the day before, but 00:30 in Lagos: in it
    (DAY, (2, 5), 4),
    (DAY, (2, 40), 7),
    (DAY, (9, 10), 5),
    (DAY, (14, 0), 6),
    (DAY, (14, 20), 8),
    (DAY, (23, 50), 3),
    (date(2026, 11, 21), (0, 10), 5),   # 23:10 UTC on the 20th, but the 21st in Lagos: not in it
]


def a_num(e: int, i: int) -> str:
    return f"+2348031{e:02d}{i:04d}"


def drive(client: Any) -> None:
    z = ZoneInfo(TZ)
    for e, (d, (hh, mm), callers) in enumerate(EPISODES):
        base = datetime(d.year, d.month, d.day, hh, mm, tzinfo=z).timestamp()
        for i in range(callers):
            r = client.decide(f"rep-{e}-{i}", a_num(e, i), b_num(e), ts=base + i * 0.2)
            assert r["verdict"] == ("drop" if i >= 2 else "allow"), r
        # A shared attacker: the same A-number in several alerts counts once.
        client.decide(f"rep-{e}-x", a_num(99, 0), b_num(e), ts=base + 1.9)


def expected_drops(store_url: str) -> dict[str, int]:
    """Return the day's drop decisions of the streams, by reason (call time in the Lagos day)."""
    z = ZoneInfo(TZ)
    out: dict[str, int] = {}
    for _, _, f in stream_records(store_url):
        if f.get("k") == "d" and f["v"] == "drop" and \
                datetime.fromtimestamp(int(f["ts"]) / 1000, z).date() == DAY:
            out[f["r"]] = out.get(f["r"], 0) + 1
    return out


def expected_alerts(store_url: str) -> dict[str, dict[str, str]]:
    """Return {alert_id: highest-version alert record} of the streams."""
    best: dict[str, dict[str, str]] = {}
    for _, _, f in stream_records(store_url):
        if f.get("k") == "a" and (f["al"] not in best or int(f["ver"]) > int(best[f["al"]]["ver"])):
            best[f["al"]] = f
    return best


def test_daily_report_equals_the_stored_alerts(
        service_factory: Any, store_url: str, database_url: str, questdb_url: str,
        writer_factory: Any, tmp_path: Path) -> None:
    env = {"ACM_DETECTION_THRESHOLD": "3"}
    with service_factory(env=env) as (_svc, client):
        writer = writer_factory(env={"DATABASE_URL": database_url, "QUESTDB_URL": questdb_url},
                                args=["--sinks", "pg,questdb"])
        runner = ActionsProcess(store_url, {
            "DATABASE_URL": database_url, "ACM_NCC_REPORTING": "true",
            "ACM_OPERATOR_CODE": "mtn", "ACM_ACTIONS_ON_ESCALATION": "false"}).start()
        try:
            wait_for(lambda: _groups_ready(store_url), 30, "the writer's groups", runner)
            drive(client)
            alerts = expected_alerts(store_url)
            assert len(alerts) == len(EPISODES)
            dropped = expected_drops(store_url)
            wait_drained(store_url, ["pg", "questdb"], writer=writer)

            def notified() -> bool:
                with psycopg.connect(database_url) as c:
                    row = c.execute("SELECT count(*) FROM audit_log WHERE action = "
                                    "'action.notify'").fetchone()
                return row is not None and row[0] == len(alerts)

            wait_for(notified, 60, "one notify per alert", runner)
            assert runner.stop() == 0
        finally:
            runner.stop()

    # The day's alerts according to the stream (first detection in the Lagos day).
    z = ZoneInfo(TZ)
    day_alerts = {aid: f for aid, f in alerts.items()
                  if datetime.fromtimestamp(int(f["t0"]) / 1000, z).date() == DAY}
    assert len(day_alerts) == 7
    by_sev = {s: sum(1 for f in day_alerts.values() if f["sv"] == s)
              for s in ("LOW", "HIGH", "CRITICAL")}
    # The shared attacker adds one distinct caller to every episode.
    assert by_sev == {"LOW": 2, "HIGH": 2, "CRITICAL": 3}
    a_numbers = {a for f in day_alerts.values() for a in f["an"].split(",")}

    # Work some alerts through the lifecycle.
    lc = Lifecycle(database_url)
    ids = sorted(day_alerts, key=lambda a: int(day_alerts[a]["t0"]))
    lc.assign(ids[0], "bob", "alice")
    lc.set_status(ids[0], "RESOLVED", "alice")
    lc.set_status(ids[1], "RESOLVED", "alice")
    lc.set_status(ids[2], "FALSE_POSITIVE", "alice", whitelist=True)
    lc.add_note(ids[3], "looking", "alice")

    # QuestDB applies its WAL asynchronously: wait until the day's drops are all visible.
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=z)
    end = datetime.fromtimestamp(start.timestamp() + 86400, z)
    seen: list = []

    def all_visible() -> bool:
        seen[:] = [_calls_dropped(questdb_url, start, end)]
        return seen[0][0] == sum(dropped.values())

    try:
        wait_for(all_visible, 60, "the day's dropped calls in QuestDB")
    except AssertionError as e:
        raise AssertionError(f"{e}: QuestDB has {seen}, the stream {dropped}") from None
    r = subprocess.run(
        [sys.executable, "-m", "acm_module.cli", "report", "daily", "--date", DAY.isoformat(),
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**_env(), "DATABASE_URL": database_url, "QUESTDB_URL": questdb_url,
             "ACM_NCC_REPORTING": "true", "ACM_OPERATOR_CODE": "MTN"})
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / f"acm-daily-{DAY}.json").read_text())

    # Numbers equal the stored alerts ...
    with psycopg.connect(database_url) as c:
        db = c.execute("SELECT alert_id::text, severity, a_numbers, ncc_incident_id, status, "
                       "EXTRACT(EPOCH FROM resolved_at - detected_at) FROM fraud_alerts "
                       "WHERE (detected_at AT TIME ZONE 'Africa/Lagos')::date = %s", (DAY,)
                       ).fetchall()
    assert {row[0] for row in db} == set(day_alerts)
    assert out["alerts_total"] == len(db) == 7
    assert out["alerts_by_severity"] == by_sev
    assert out["alerts_by_severity"] == {s: sum(1 for row in db if row[1] == s)
                                         for s in ("LOW", "HIGH", "CRITICAL")}
    assert out["distinct_a_numbers"] == len(a_numbers) == len({a for row in db for a in row[2]})
    assert out["distinct_b_numbers"] == 7
    assert out["alerts_by_status"] == {"NEW": 4, "INVESTIGATING": 0, "CONFIRMED": 0,
                                       "RESOLVED": 2, "FALSE_POSITIVE": 1}
    # ... and the stream's own account of them.
    per_hour = {h["hour"]: {s: h[s] for s in ("LOW", "HIGH", "CRITICAL")}
                for h in out["alerts_per_hour"]}
    for f in day_alerts.values():
        hour = datetime.fromtimestamp(int(f["t0"]) / 1000, z).hour
        per_hour[hour][f["sv"]] -= 1
    assert all(v == 0 for h in per_hour.values() for v in h.values())
    assert sum(h["HIGH"] + h["LOW"] + h["CRITICAL"] for h in out["alerts_per_hour"]) == 7

    # Actions and their outcomes, from audit_log.
    assert out["actions"] == {"disconnect": {"skipped": 7}, "ncc": {"ok": 7},
                              "notify": {"ok": 7}}
    assert out["lifecycle_changes"] == {"acm_alert_assign": {"ok": 1},
                                        "acm_alert_status": {"ok": 3},
                                        "acm_alert_note": {"ok": 1}}
    ttr = sorted(float(row[5]) for row in db if row[4] in ("RESOLVED", "FALSE_POSITIVE"))
    assert out["time_to_resolve_s"]["count"] == 3
    assert out["time_to_resolve_s"]["max"] == pytest.approx(ttr[-1], abs=0.01)
    # Calls dropped come from the stored call records (QuestDB call_events) and equal the
    # drop decisions of the day in the durable stream.
    assert out["calls_dropped"] == sum(dropped.values()) > 0
    assert out["calls_dropped_source"] == "questdb:call_events"

    # NCC incident ids: every alert has one, numbered 1..7 for the day (runner order), unique.
    nids = sorted(row[3] for row in db)
    assert all(re.fullmatch(r"NCC-MTN-20261120-\d{5}", n) for n in nids)
    assert sorted(parse_incident_id(n)[2] for n in nids) == list(range(1, 8))
    with psycopg.connect(database_url) as c:
        other = c.execute("SELECT ncc_incident_id FROM fraud_alerts WHERE alert_id = ANY(%s)",
                          ([a for a in alerts if a not in day_alerts],)).fetchall()
    assert sorted(x[0] for x in other) == [incident_id("MTN", date(2026, 11, 19), 1),
                                           incident_id("MTN", date(2026, 11, 21), 1)]

    # The CSVs and the HTML page say the same.
    with open(tmp_path / f"acm-daily-{DAY}-alerts.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(x["ncc_incident_id"] for x in rows) == nids
    assert {x["alert_id"]: x["severity"] for x in rows} == {a: f["sv"]
                                                           for a, f in day_alerts.items()}
    with open(tmp_path / f"acm-daily-{DAY}-summary.csv") as f:
        summary = dict(csv.reader(f))
    assert summary["alerts_total"] == "7" and summary["alerts_critical"] == "3"
    assert summary["distinct_a_numbers"] == str(len(a_numbers))
    assert summary["action_ncc_ok"] == "7"
    page = (tmp_path / f"acm-daily-{DAY}.html").read_text()
    bars = sum(1 for h in out["alerts_per_hour"] for s in ("LOW", "HIGH", "CRITICAL") if h[s])
    assert "<svg" in page and page.count("<rect") == bars + 3  # + 3 legend keys
    for n in nids:
        assert n in page


def test_chart_stacks_severities_per_hour() -> None:
    per_hour = [{"hour": h, "LOW": 0, "HIGH": 0, "CRITICAL": 0} for h in range(24)]
    per_hour[3].update(LOW=2, CRITICAL=1)
    svg = chart_svg(per_hour)
    assert svg.count("<rect") == 2 + 3
    assert "03:00 LOW: 2" in svg and "03:00 CRITICAL: 1" in svg


def _groups_ready(store_url: str) -> bool:
    from acm_module.core import keys
    from acm_module.write.store import StreamStore
    from acm_module.write.writer import group_positions

    c = StreamStore(store_url, timeout=2.0)
    try:
        return all("acm.pg" in group_positions(c, s) for s in keys.streams(16))
    finally:
        c.close()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ACM_")}


def test_calls_answered_store_unavailable_are_not_counted_as_checked(
        zctx: Any, writer_factory: Any, store_url: str, database_url: str,
        questdb_url: str) -> None:
    """The worker gives up on a slow store after store_timeout_ms and answers store_unavailable
    (the client applies its fail policy), but the store still runs the script it was sent and
    records a decision: call_events must say the caller never got it, and the report must not
    count the call as checked."""
    from acm_module.compliance.report import summary_rows, to_html
    from acm_module.compliance.stats import compute
    from acm_module.core.errors import StoreReplyError
    from acm_module.decide.client import Client
    from acm_module.write.questdb import QuestDB
    from tests.support.servers import DelayProxy, running_service

    port = int(store_url.rsplit(":", 1)[1].split("/")[0])
    proxy = DelayProxy(port)
    day = date(2026, 11, 22)
    base = datetime(2026, 11, 22, 12, 0, tzinfo=ZoneInfo(TZ)).timestamp()
    try:
        env = {"ACM_STORE_TIMEOUT_MS": "100"}
        with running_service(proxy.url, workers=1, extra_env=env) as svc:
            client = Client(svc.endpoint, timeout=10.0, context=zctx)
            assert client.decide("su-warm", a_num(1, 0), b_num(20), ts=base)["verdict"] == "allow"
            proxy.delay = 0.4  # every store reply now comes after the worker gave up
            late = [client.request({"call_id": f"su-{i}", "a": a_num(1, i + 1),
                                    "b": b_num(21), "ts": base + 1 + i}) for i in range(2)]
            assert [r.get("error") for r in late] == ["store_unavailable"] * 2
            proxy.delay = 0.0
            deadline = time.monotonic() + 10
            ok: dict[str, Any] = {}
            while time.monotonic() < deadline:  # the worker's backoff, then a round trip
                ok = client.decide(f"su-ok-{time.monotonic_ns()}", a_num(1, 9), b_num(22),
                                   ts=base + 5)
                if "verdict" in ok:
                    break
                time.sleep(0.1)
            assert ok.get("verdict") == "allow", ok
            client.close()
        recorded = {f["id"] for _, _, f in stream_records(store_url) if f.get("k") == "d"}
        assert "su-0" in recorded  # the store applied it after the worker's timeout
        assert "su-1" not in recorded  # answered during the worker's backoff: never sent
    finally:
        proxy.close()
    w = writer_factory(env={"QUESTDB_URL": questdb_url, "ACM_WRITER_SINKS": "questdb"})
    deadline = time.monotonic() + 30
    while True:
        try:
            wait_drained(store_url, ["questdb"], writer=w)
            break
        except StoreReplyError:  # a stream the writer has not created yet
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert w.stop() == 0
    q = QuestDB(questdb_url)
    assert q.wait_applied(("call_events",))
    status = dict(q.rows("SELECT call_id, status FROM call_events"))
    assert status["su-0"] == "STORE_UNAVAILABLE", status
    assert status["su-warm"] == "ALLOWED" and all(
        v == "ALLOWED" for k, v in status.items() if k.startswith("su-ok"))
    with psycopg.connect(database_url) as conn:
        s = compute(conn, day, TZ, questdb_url=questdb_url)
    # A call the store recorded but whose caller was never told: not decided, not clean.
    assert s.calls_store_unavailable == 1
    (row,) = s.carriers
    assert row["calls_store_unavailable"] == 1
    assert row["calls_decided"] == sum(1 for k in status if k.startswith("su-")) - 1
    assert ("calls_store_unavailable", 1) in summary_rows(s)
    assert "Calls not checked (store unavailable)</th><td>1<" in to_html(s)
