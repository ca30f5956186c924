"""The daily report's per-carrier breakdown (docs/GATEWAY.md): stream records with carriers,
gateways, the gateway reasons and fan-out alerts, persisted by `acm writer`; `acm report daily`
must show per carrier exactly what call_events and fraud_alerts hold for the day."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from acm_module.compliance.report import carrier_columns, to_pdf
from acm_module.compliance.stats import DROP_REASONS, DailyStats
from acm_module.core import records as rec
from acm_module.write.questdb import QuestDB
from tests.support.pdfreport import assert_same_figures, pdf_text
from tests.support.pgqdb import add_tap, wait_drained
from tests.support.servers import REPO
from tests.support.streamrec import decision, fanout_alert, masking_alert, parsed, xadd

pytestmark = [pytest.mark.server, pytest.mark.timeout(150)]

TZ = ZoneInfo("Africa/Lagos")
DAY = date(2026, 11, 20)
PREV, NEXT = date(2026, 11, 19), date(2026, 11, 21)
C1, C2 = "glo-ig", "mtn.ng_1"
GATEWAYS = {C1: ("glo-lag-1", "glo-lag-2"), C2: ("mtn-gw.2",), "": ("",)}
# (verdict, reason, mode) of the decisions, cycled.
OUTCOMES = [("allow", "clean", "block"), ("drop", "masking", "block"),
            ("drop", "rate_limited", "block"), ("allow", "clean", "block"),
            ("drop", "national_cli_on_international_route", "block"),
            ("drop", "blocked", "block"), ("allow", "masking", "monitor"),
            ("allow", "national_cli_on_international_route", "block")]


def ms(d: date, hh: int, mm: int, s: float = 0.0) -> int:
    return int((datetime(d.year, d.month, d.day, hh, mm, tzinfo=TZ).timestamp() + s) * 1000)


def a_num(i: int) -> str:
    return f"+2348032{i:06d}"


def b_num(i: int) -> str:
    return f"+2348098{i:06d}"


def traffic() -> list[Any]:
    """Decisions over the day and either side of it, from two carriers, unattributed and
    pre-attribution sources; masking and fan-out alerts, some escalating, some old-format."""
    out: list[Any] = []
    n = 0
    # 00:30 in Lagos is 23:30 UTC the day before (in the day); the neighbours' are not.
    for d, hours in ((PREV, (23,)), (DAY, (0, 2, 9, 14, 23)), (NEXT, (0,))):
        for hh in hours:
            for carrier, count in ((C1, 13), (C2, 9), ("", 5)):
                gws = GATEWAYS[carrier]
                for i in range(count):
                    v, r, md = OUTCOMES[n % len(OUTCOMES)]
                    out.append(decision(f"call-{n}", a_num(n % 50), b_num(n % 31),
                                        ms(d, hh, 30, i * 0.5), verdict=v, reason=r, mode=md,
                                        carrier=carrier, gateway=gws[i % len(gws)]))
                    n += 1
            for i in range(3):  # written before attribution: no cr/gw at all
                out.append(decision(f"old-{n}", a_num(n % 50), b_num(n % 31),
                                    ms(d, hh, 40, i), attributed=False))
                n += 1

    def masking(d: date, hh: int, carrier: str, callers: list[int], sev: str, ver: int = 1,
                aid: str = "", attributed: bool = True) -> str:
        aid = aid or str(uuid.uuid4())
        gw = GATEWAYS[carrier][ver % len(GATEWAYS[carrier])]
        out.append(masking_alert(aid, b_num(100 + hh), [a_num(c) for c in callers],
                                 ms(d, hh, 5), ms(d, hh, 5, ver), ver=ver, severity=sev,
                                 carrier=carrier, gateway=gw, attributed=attributed))
        return aid

    def fanout(d: date, hh: int, carrier: str, a: int, called: int, sev: str, ver: int = 1,
               aid: str = "") -> str:
        aid = aid or str(uuid.uuid4())
        out.append(fanout_alert(aid, a_num(a), [b_num(200 + j) for j in range(called)],
                                ms(d, hh, 7), ms(d, hh, 7, ver), ver=ver, severity=sev,
                                carrier=carrier, gateway=GATEWAYS[carrier][0]))
        return aid

    m = masking(DAY, 0, C1, [1, 2, 3, 4, 5], "HIGH")
    masking(DAY, 0, C1, [1, 2, 3, 4, 5, 6, 7], "CRITICAL", ver=2, aid=m)  # escalates
    masking(DAY, 9, C1, [5, 6, 7], "LOW")          # shares A-numbers with the first
    masking(DAY, 14, C2, [20, 21, 22, 23, 24], "HIGH")
    masking(DAY, 23, "", [30, 31, 32], "LOW")
    masking(DAY, 2, "", [33, 34, 35, 36, 37], "HIGH", attributed=False)  # old record
    f = fanout(DAY, 2, C1, 5, 5, "HIGH")           # its A-number is in C1's masking alerts too
    fanout(DAY, 2, C1, 5, 8, "CRITICAL", ver=2, aid=f)
    fanout(DAY, 9, C2, 40, 3, "LOW")
    fanout(DAY, 14, C2, 41, 6, "HIGH")
    fanout(DAY, 23, "", 42, 4, "LOW")
    masking(PREV, 23, C1, [1, 2, 3], "LOW")        # not in the day
    fanout(NEXT, 0, C2, 43, 5, "HIGH")             # not in the day
    return out


def expected(store_url: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Return the day's per-carrier figures and alerts by type, from the durable streams."""
    decisions, changes = parsed(store_url)

    def in_day(ts_ms: int) -> bool:
        return datetime.fromtimestamp(ts_ms / 1000, TZ).date() == DAY

    by: dict[str, dict[str, Any]] = {}
    a_numbers: dict[str, set[str]] = {}

    def row(c: str) -> dict[str, Any]:
        if c not in by:
            by[c] = {"carrier_id": c, "calls_decided": 0, "calls_dropped": 0,
                     "calls_dropped_by_reason": dict.fromkeys(DROP_REASONS, 0),
                     "calls_store_unavailable": 0, "alerts_total": 0,
                     "alerts_by_type": {"masking": 0, "fanout": 0},
                     "alerts_by_type_severity": {t: {"LOW": 0, "HIGH": 0, "CRITICAL": 0}
                                                 for t in ("masking", "fanout")},
                     "distinct_a_numbers": 0}
            a_numbers[c] = set()
        return by[c]

    for d in decisions:
        if in_day(d.ts_ms):
            r = row(d.carrier_id)
            r["calls_decided"] += 1
            if d.verdict == "drop":
                r["calls_dropped"] += 1
                r["calls_dropped_by_reason"][d.reason] += 1
    by_type = {"masking": 0, "fanout": 0}
    for a in rec.latest_versions(changes):
        if in_day(a.first_ms):
            r = row(a.carrier_id)
            r["alerts_total"] += 1
            r["alerts_by_type"][a.typ] += 1
            r["alerts_by_type_severity"][a.typ][a.severity] += 1
            a_numbers[a.carrier_id].update(a.a_numbers)
            by_type[a.typ] += 1
    for c, r in by.items():
        r["distinct_a_numbers"] = len(a_numbers[c])
    return [by[c] for c in sorted(by, key=lambda c: (c == "", c))], by_type


def stored(database_url: str, questdb_url: str) -> dict[str, dict[str, Any]]:
    """Return the day's per-carrier figures straight from fraud_alerts and call_events."""
    out: dict[str, dict[str, Any]] = {}
    with psycopg.connect(database_url) as db:
        day_sql = "(detected_at AT TIME ZONE 'Africa/Lagos')::date = %s"
        for c, typ, sev, n in db.execute(
                "SELECT COALESCE(carrier_id, ''), alert_type, severity, count(*) FROM "
                f"fraud_alerts WHERE {day_sql} GROUP BY 1, 2, 3", (DAY,)):
            t = {"MULTICALL_MASKING": "masking", "MULTICALL_FANOUT": "fanout"}[typ]
            out.setdefault(c, {}).setdefault("alerts", {})[(t, sev)] = n
        for c, n in db.execute(
                "SELECT COALESCE(carrier_id, ''), count(DISTINCT a) FROM fraud_alerts, "
                f"jsonb_array_elements_text(a_numbers) AS a WHERE {day_sql} GROUP BY 1",
                (DAY,)):
            out.setdefault(c, {})["distinct_a_numbers"] = n
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=TZ)
    lo = datetime.fromtimestamp(start.timestamp(), ZoneInfo("UTC"))
    hi = datetime.fromtimestamp(start.timestamp() + 86400, ZoneInfo("UTC"))
    q = QuestDB(questdb_url)
    for c, v, r, n in q.rows(
            "SELECT carrier_id, verdict, reason, count() FROM call_events WHERE timestamp >= "
            f"'{lo:%Y-%m-%dT%H:%M:%S}.000000Z' AND timestamp < '{hi:%Y-%m-%dT%H:%M:%S}.000000Z'"):
        d = out.setdefault(c or "", {})
        d["calls"] = d.get("calls", 0) + n
        if v == "drop":
            d.setdefault("dropped", {})[r] = n
    return out


def test_daily_report_per_carrier_equals_the_stored_data(
        store_url: str, database_url: str, questdb_url: str, writer_factory: Any,
        tmp_path: Path) -> None:
    add_tap(store_url)
    xadd(store_url, traffic())
    want, want_by_type = expected(store_url)
    writer = writer_factory(env={"DATABASE_URL": database_url, "QUESTDB_URL": questdb_url},
                            args=["--sinks", "pg,questdb"])
    wait_drained(store_url, ["pg", "questdb"], writer=writer)
    assert writer.stop() == 0
    assert QuestDB(questdb_url).wait_applied(("call_events",))

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACM_")}
    r = subprocess.run(
        [sys.executable, "-m", "acm_module.cli", "report", "daily", "--date", DAY.isoformat(),
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**env, "DATABASE_URL": database_url, "QUESTDB_URL": questdb_url})
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / f"acm-daily-{DAY}.json").read_text())

    # The report equals the stream's account of the day ...
    assert [c["carrier_id"] for c in out["carriers"]] == [C1, C2, ""]
    assert out["carriers"] == want
    assert out["alerts_by_type"] == want_by_type == {"masking": 5, "fanout": 4}
    assert sum(c["calls_decided"] for c in want) == 5 * 30
    assert all(c["calls_dropped_by_reason"][r] for c in want[:2] for r in DROP_REASONS)
    # ... and what the databases hold.
    db = stored(database_url, questdb_url)
    assert set(db) == {c["carrier_id"] for c in out["carriers"]}
    for c in out["carriers"]:
        s = db[c["carrier_id"]]
        assert c["calls_decided"] == s["calls"]
        assert c["calls_dropped"] == sum(s.get("dropped", {}).values())
        assert {k: v for k, v in c["calls_dropped_by_reason"].items() if v} == s.get("dropped",
                                                                                      {})
        assert {(t, v): n for t, sevs in c["alerts_by_type_severity"].items()
                for v, n in sevs.items() if n} == s["alerts"]
        assert c["distinct_a_numbers"] == s["distinct_a_numbers"]
    assert out["calls_dropped"] == sum(c["calls_dropped"] for c in out["carriers"])
    assert out["alerts_total"] == sum(c["alerts_total"] for c in out["carriers"]) == 9
    fanout = [a for a in out["alerts"] if a["type"] == "fanout"]
    assert len(fanout) == 4 and all(a["a_number"] and not a["b_number"] for a in fanout)

    # The CSVs and the page carry the same figures.
    with open(tmp_path / f"acm-daily-{DAY}-carriers.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == carrier_columns()
    for c, line in zip(out["carriers"], rows[1:], strict=True):
        got = dict(zip(rows[0], line, strict=True))
        assert got["carrier_id"] == c["carrier_id"]
        assert int(got["calls_decided"]) == c["calls_decided"]
        assert int(got["dropped_rate_limited"]) == c["calls_dropped_by_reason"]["rate_limited"]
        assert int(got["alerts_fanout_critical"]) == \
            c["alerts_by_type_severity"]["fanout"]["CRITICAL"]
        assert int(got["distinct_a_numbers"]) == c["distinct_a_numbers"]
    with open(tmp_path / f"acm-daily-{DAY}-summary.csv") as f:
        summary = dict(csv.reader(f))
    assert (summary["alerts_type_masking"], summary["alerts_type_fanout"]) == ("5", "4")
    with open(tmp_path / f"acm-daily-{DAY}-alerts.csv") as f:
        alerts = list(csv.DictReader(f))
    assert sorted((a["type"], a["carrier_id"]) for a in alerts) == sorted(
        (a["type"], a["carrier_id"]) for a in out["alerts"])
    page = (tmp_path / f"acm-daily-{DAY}.html").read_text()
    assert "<h2>Per carrier</h2>" in page
    table = page.split("<h2>Per carrier</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + len(out["carriers"])
    c1 = out["carriers"][0]
    assert (f"<td>{C1}</td><td>{c1['calls_decided']}</td><td>{c1['calls_dropped']}</td>"
            in table)
    assert "<td>(unattributed)</td>" in table

    # The PDF carries the same figures; a carrier named outside Latin-1 does not break it.
    text = assert_same_figures((tmp_path / f"acm-daily-{DAY}.pdf").read_bytes(), out)
    assert "(unattributed)" in text
    named = DailyStats(**{**out, "carriers": [{**out["carriers"][0],
                                               "carrier_id": "Śląsk-电信 Ελλάς"}]})
    assert "Slask-?? ????? " in pdf_text(to_pdf(named))


def test_report_without_questdb_has_alerts_per_carrier_and_no_call_counts(
        store_url: str, database_url: str, writer_factory: Any, tmp_path: Path) -> None:
    xadd(store_url, traffic())
    _, want_by_type = expected(store_url)
    writer = writer_factory(env={"DATABASE_URL": database_url}, args=["--sinks", "pg"])
    wait_drained(store_url, ["pg"], writer=writer)
    assert writer.stop() == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACM_")}
    r = subprocess.run(
        [sys.executable, "-m", "acm_module.cli", "report", "daily", "--date", DAY.isoformat(),
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**env, "DATABASE_URL": database_url, "QUESTDB_URL": ""})
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / f"acm-daily-{DAY}.json").read_text())
    assert out["alerts_by_type"] == want_by_type
    assert [c["carrier_id"] for c in out["carriers"]] == [C1, C2, ""]
    for c in out["carriers"]:
        assert (c["calls_decided"], c["calls_dropped"], c["calls_dropped_by_reason"],
                c["calls_store_unavailable"]) == (None, None, {}, None)
        assert c["alerts_total"] > 0
    with open(tmp_path / f"acm-daily-{DAY}-carriers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [x["calls_decided"] for x in rows] == ["", "", ""]
    assert "n/a" in (tmp_path / f"acm-daily-{DAY}.html").read_text()
    # --format pdf writes only the PDF.
    r = subprocess.run(
        [sys.executable, "-m", "acm_module.cli", "report", "daily", "--date", DAY.isoformat(),
         "--out", str(tmp_path / "pdf"), "--format", "pdf"], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**env, "DATABASE_URL": database_url, "QUESTDB_URL": ""})
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "pdf").iterdir()] == [f"acm-daily-{DAY}.pdf"]
    assert_same_figures((tmp_path / "pdf" / f"acm-daily-{DAY}.pdf").read_bytes(), out)
