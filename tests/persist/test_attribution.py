"""Gateway attribution and fan-out alerts through the writer (docs/GATEWAY.md, "Stream
records"): records with cr/gw/typ parse strictly, reach every sink, old records without them
still do, malformed ones are dead-lettered, and tables of existing deployments are migrated.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from acm_module.core import records as rec
from acm_module.write.base import SinkUnavailable
from acm_module.write.migrate import MIGRATIONS_DIR, migrate
from acm_module.write.pg import PostgresSink
from acm_module.write.questdb import QuestDB
from tests.support.numbers import a_num, b_num
from tests.support.pgqdb import ALL_SINKS, add_tap, ch_query, wait_drained, writer_env
from tests.support.streamrec import (
    dead_letters,
    decision,
    fanout_alert,
    masking_alert,
    parsed,
    xadd,
)

T0 = 1_800_500_000_000
C1, G1, G1B = "glo-ig", "glo-lag-1", "glo-lag-2"
C2, G2 = "mtn.ng_1", "mtn-gw.2"
REASONS = [("allow", "clean"), ("drop", "masking"), ("drop", "rate_limited"),
           ("drop", "national_cli_on_international_route"), ("drop", "blocked"),
           ("allow", "national_cli_on_international_route")]  # the last: CLI rule in monitor


def _fields(**over: str) -> dict[str, str]:
    return {"k": "d", "id": "c1", "a": a_num(1), "b": b_num(1), "ts": str(T0), "v": "drop",
            "r": "rate_limited", "n": "0", "al": "", "sv": "", "ip": "198.51.100.7",
            "tr": "tg-101", "rx": str(T0 * 1000), "md": "block", "cr": C1, "gw": G1, **over}


def _alert_fields(**over: str) -> dict[str, str]:
    return {"k": "a", "al": str(uuid.uuid4()), "op": "open", "typ": "masking", "b": b_num(1),
            "sv": "HIGH", "n": "5", "an": ",".join(a_num(i) for i in range(5)), "t0": str(T0),
            "t1": str(T0 + 10), "ver": "1", "wms": "5000", "blk": "0", "cr": C1, "gw": G1,
            **over}


@pytest.mark.timeout(10)
def test_records_with_attribution_parse_strictly() -> None:
    d = rec.parse_decision("s/1", _fields())
    assert (d.carrier_id, d.gateway_id, d.reason) == (C1, G1, "rate_limited")
    d = rec.parse_decision("s/1", _fields(r="national_cli_on_international_route", cr="", gw=""))
    assert (d.carrier_id, d.gateway_id) == ("", "")
    old = {k: v for k, v in _fields(v="allow", r="clean").items() if k not in ("cr", "gw")}
    assert (rec.parse_decision("s/1", old).carrier_id, rec.parse_decision("s/1", old).gateway_id
            ) == ("", "")
    longest = "a.B_9-" * 10 + "abcd"
    assert rec.parse_decision("s/1", _fields(cr=longest)).carrier_id == longest

    m = rec.parse_alert("s/2", _alert_fields(cr=C2, gw=G2))
    assert (m.typ, m.carrier_id, m.gateway_id, m.a, m.b_numbers) == ("masking", C2, G2, "", ())
    assert len(m.a_numbers) == 5
    old_a = {k: v for k, v in _alert_fields().items() if k not in ("typ", "cr", "gw")}
    m = rec.parse_alert("s/2", old_a)
    assert (m.typ, m.carrier_id, m.gateway_id) == ("masking", "", "")
    bs = [b_num(i) for i in range(6)]
    fo = rec.parse_alert("s/3", _alert_fields(typ="fanout", a=a_num(7), b="", an=",".join(bs)))
    assert (fo.typ, fo.a, fo.b, fo.a_numbers, fo.b_numbers) == (
        "fanout", a_num(7), "", (a_num(7),), tuple(bs))

    bad_decisions = [_fields(cr="glo ig"), _fields(gw="x" * 65), _fields(cr="glo/ig"),
                     _fields(gw="gw\u00e9"), _fields(r="spam"), _fields(cr="a\nb")]
    for f in bad_decisions:
        with pytest.raises(rec.RecordError):
            rec.parse_decision("s/1", f)
    bad_alerts = [_alert_fields(typ="robocall"), _alert_fields(typ="fanout", b=""),
                  _alert_fields(typ="fanout", a="", b=""),
                  _alert_fields(typ="fanout", a=a_num(1), b=b_num(1)),
                  _alert_fields(b=""), _alert_fields(cr="glo:ig"), _alert_fields(gw="g" * 65),
                  {k: v for k, v in _alert_fields(b="").items() if k != "typ"}]
    for f in bad_alerts:
        with pytest.raises(rec.RecordError):
            rec.parse_alert("s/2", f)


@pytest.mark.server
@pytest.mark.timeout(150)
def test_malformed_attribution_is_dead_lettered(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    add_tap(store_url)
    good = [decision(f"g{i}", a_num(i), b_num(i), T0 + i, carrier=C1, gateway=G1)
            for i in range(20)]
    good_alerts = [masking_alert(str(uuid.uuid4()), b_num(i), [a_num(j) for j in range(5)],
                                 T0 + i, T0 + i + 5, carrier=C2, gateway=G2) for i in range(3)]
    bad_d = [decision("bad-cr", a_num(1), b_num(1), T0, carrier="glo ig"),
             decision("bad-gw", a_num(1), b_num(1), T0, gateway="g" * 65),
             decision("bad-r", a_num(1), b_num(1), T0, reason="spam", carrier=C1)]
    bad_a = [fanout_alert(str(uuid.uuid4()), "", [b_num(1)], T0, T0),        # fan-out, no A
             masking_alert(str(uuid.uuid4()), "", [a_num(1)], T0, T0),        # masking, no B
             (masking_alert(str(uuid.uuid4()), b_num(2), [a_num(1)], T0, T0)[0],
              {**masking_alert(str(uuid.uuid4()), b_num(2), [a_num(1)], T0, T0)[1],
               "typ": "robocall"}),
             masking_alert(str(uuid.uuid4()), b_num(3), [a_num(1)], T0, T0, carrier="x/y")]
    ids_d = xadd(store_url, [*good[:10], *bad_d])
    ids_a = xadd(store_url, [*bad_a, *good_alerts, *good[10:]])
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path))
    wait_drained(store_url, ALL_SINKS, writer=w)
    assert w.stop() == 0
    dlq = dead_letters(store_url)
    got = {(d["stream"], d["id"], d["sink"]) for d in dlq}
    want = {(s, i, "questdb") for (s, _), i in zip(bad_d, ids_d[10:], strict=True)}
    want |= {(s, i, sink) for (s, _), i in zip(bad_a, ids_a[:4], strict=True)
             for sink in ("pg", "clickhouse")}
    assert got == want
    assert all(d["reason"].startswith("unparsable:") for d in dlq)
    # Everything well-formed went through, attributed.
    q = QuestDB(questdb_url)
    assert q.wait_applied(("call_events",))
    assert q.rows("SELECT carrier_id, gateway_id, count() FROM call_events") == [[C1, G1, 20]]
    with psycopg.connect(database_url) as db:
        rows = db.execute("SELECT carrier_id, gateway_id, count(*) FROM fraud_alerts "
                          "GROUP BY 1, 2").fetchall()
    assert rows == [(C2, G2, 3)]
    ch = ch_query(chdb_path, "SELECT carrier_id, gateway_id, count() AS n "
                             "FROM acm.fraud_alerts_analytics FINAL GROUP BY 1, 2")
    assert [(r["carrier_id"], r["gateway_id"], int(r["n"])) for r in ch] == [(C2, G2, 3)]


# The tables as deployments created them before attribution (QuestDB: no gateway_id;
# ClickHouse: no carrier_id, gateway_id, a_number).
OLD_CALL_EVENTS = """CREATE TABLE call_events (
    call_id VARCHAR, a_number VARCHAR, b_number VARCHAR, status SYMBOL, source_ip SYMBOL,
    carrier_id SYMBOL, detection_latency_us LONG, fraud_detected BOOLEAN, verdict SYMBOL,
    reason SYMBOL, distinct_count INT, alert_id VARCHAR, severity SYMBOL, trunk SYMBOL,
    mode SYMBOL, timestamp TIMESTAMP
) TIMESTAMP(timestamp) PARTITION BY DAY WAL DEDUP UPSERT KEYS(timestamp, call_id)"""
OLD_ALERTS_ANALYTICS = """CREATE TABLE acm.fraud_alerts_analytics (
    alert_id UUID, alert_type LowCardinality(String), severity LowCardinality(String),
    b_number String, a_number_count UInt32, detection_window_ms UInt32, detected_at DateTime,
    resolved_at Nullable(DateTime), resolution_time_seconds Nullable(UInt32), version UInt32,
    is_deleted UInt8
) ENGINE = ReplacingMergeTree(version, is_deleted) PARTITION BY toYYYYMM(detected_at)
ORDER BY (detected_at, alert_id)"""


def _traffic() -> tuple[list[Any], str, str]:
    """Return the records of a mixed day: attributed and old decisions and alerts, fan-out
    alerts with updates; and the ids of the alert already in ClickHouse and a fan-out one."""
    out: list[Any] = []
    carriers = [(C1, G1), (C1, G1B), (C2, G2), ("", "")]
    for i in range(120):
        cr, gw = carriers[i % 4]
        v, r = REASONS[i % len(REASONS)]
        out.append(decision(f"d{i}", a_num(i % 17), b_num(i % 13), T0 + i * 10, verdict=v,
                            reason=r, carrier=cr, gateway=gw,
                            mode="monitor" if v == "allow" and r != "clean" else "block"))
    for i in range(15):  # written before attribution
        out.append(decision(f"old{i}", a_num(i), b_num(i), T0 + 5000 + i, attributed=False))
    pre, fo = str(uuid.uuid4()), str(uuid.uuid4())
    an = [a_num(i) for i in range(7)]
    m1 = str(uuid.uuid4())
    out += [masking_alert(m1, b_num(1), an[:5], T0, T0 + 5, carrier=C1, gateway=G1),
            # the call that updated it came through another gateway: the alert follows it
            masking_alert(m1, b_num(1), an, T0, T0 + 9, ver=2, severity="CRITICAL",
                          carrier=C1, gateway=G1B),
            masking_alert(str(uuid.uuid4()), b_num(2), an[:5], T0 + 50, T0 + 55,
                          attributed=False),
            masking_alert(pre, b_num(3), an[:6], T0 + 70, T0 + 75, ver=2, carrier=C2,
                          gateway=G2),
            fanout_alert(fo, a_num(40), [b_num(i) for i in range(5)], T0 + 90, T0 + 95,
                         carrier=C2, gateway=G2),
            fanout_alert(fo, a_num(40), [b_num(i) for i in range(8)], T0 + 90, T0 + 99,
                         ver=2, severity="CRITICAL", carrier=C2, gateway=G2),
            fanout_alert(str(uuid.uuid4()), a_num(41), [b_num(i) for i in range(3)], T0 + 100,
                         T0 + 101, severity="LOW")]
    return out, pre, fo


@pytest.mark.server
@pytest.mark.timeout(180)
def test_writer_persists_attribution_to_every_sink(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    # Tables of an existing deployment, one row each, created before attribution.
    q = QuestDB(questdb_url)
    q.exec(OLD_CALL_EVENTS)
    q.exec("INSERT INTO call_events (call_id, verdict, reason, timestamp) "
           "VALUES ('before', 'allow', 'clean', '2026-01-01T00:00:00.000000Z')")
    records, pre, fo = _traffic()
    ch_query(chdb_path, "CREATE DATABASE IF NOT EXISTS acm")
    ch_query(chdb_path, OLD_ALERTS_ANALYTICS)
    ch_query(chdb_path, "INSERT INTO acm.fraud_alerts_analytics (alert_id, alert_type, severity,"
                        " b_number, a_number_count, detection_window_ms, detected_at, version, "
                        f"is_deleted) VALUES ('{pre}', 'MULTICALL_MASKING', 'HIGH', "
                        f"'{b_num(3)}', 5, 5000, {(T0 + 70) // 1000}, 1, 0)")
    add_tap(store_url)
    xadd(store_url, records)
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path))
    wait_drained(store_url, ALL_SINKS, writer=w)
    assert w.stop() == 0

    # What the stream holds, parsed the strict way (every record here is well-formed).
    decisions, changes = parsed(store_url)
    alerts = {a.alert_id: a for a in rec.latest_versions(changes)}
    assert len(decisions) == 135 and len(alerts) == 5

    # QuestDB: every decision with its carrier and gateway (null when unattributed), the
    # reasons that are fraud flagged; the row from before the upgrade is still there.
    assert q.wait_applied(("call_events",))
    rows = q.rows("SELECT call_id, carrier_id, gateway_id, verdict, reason, fraud_detected "
                  "FROM call_events")
    by_id = {r[0]: r for r in rows}
    assert len(rows) == len(by_id) == len(decisions) + 1
    assert by_id["before"][1:3] == [None, None]
    for d in decisions:
        assert by_id[d.call_id][1:] == [d.carrier_id or None, d.gateway_id or None, d.verdict,
                                        d.reason, d.reason in rec.FRAUD_REASONS]
    counts = {(r[0] or "", r[1] or "", r[2], r[3]): r[4] for r in q.rows(
        "SELECT carrier_id, gateway_id, verdict, reason, count() FROM call_events "
        "WHERE call_id != 'before'")}
    want: dict[tuple[str, str, str, str], int] = {}
    for d in decisions:
        k = (d.carrier_id, d.gateway_id, d.verdict, d.reason)
        want[k] = want.get(k, 0) + 1
    assert counts == want
    assert {k[3] for k in want} >= {"rate_limited", "national_cli_on_international_route"}

    # PostgreSQL: type, carrier and gateway of each alert's latest change; fan-out numbers.
    with psycopg.connect(database_url) as db:
        pg = {str(r[0]): r[1:] for r in db.execute(
            "SELECT alert_id, alert_type, carrier_id, gateway_id, a_number, b_number, a_numbers, "
            "b_numbers, distinct_count, severity FROM fraud_alerts")}
    assert set(pg) == set(alerts)
    for aid, a in alerts.items():
        fan = a.typ == "fanout"
        assert pg[aid] == (rec.ALERT_TYPE_COLUMN[a.typ], a.carrier_id, a.gateway_id,
                           a.a if fan else None, a.b, list(a.a_numbers),
                           list(a.b_numbers) if fan else None, a.distinct, a.severity)
    assert pg[fo][:5] == ("MULTICALL_FANOUT", C2, G2, a_num(40), "")
    assert pg[fo][6] == [b_num(i) for i in range(8)]

    # ClickHouse: the old table gained the columns; one current row per alert, attributed;
    # the pre-existing row was superseded (cancelled) by its attributed version 2.
    ch = {r["id"]: r for r in ch_query(
        chdb_path, "SELECT toString(alert_id) AS id, alert_type, carrier_id, gateway_id, "
                   "a_number, version FROM acm.fraud_alerts_analytics FINAL")}
    assert set(ch) == set(alerts)
    for aid, a in alerts.items():
        r = ch[aid]
        assert (r["alert_type"], r["carrier_id"], r["gateway_id"], r["a_number"],
                int(r["version"])) == (rec.ALERT_TYPE_COLUMN[a.typ], a.carrier_id,
                                       a.gateway_id, a.a, a.ver)
    daily = ch_query(chdb_path, "SELECT sum(alert_count) AS n FROM acm.daily_stats_mv")
    assert int(daily[0]["n"]) == len(alerts)
    # Per carrier and type, each alert once: the old row counted under '' until superseded.
    carriers = ch_query(chdb_path, "SELECT carrier_id, alert_type, sum(alert_count) AS n "
                                   "FROM acm.daily_carrier_stats_mv GROUP BY 1, 2 HAVING n != 0")
    assert {(r["carrier_id"], r["alert_type"]): int(r["n"]) for r in carriers} == Counter(
        (a.carrier_id, rec.ALERT_TYPE_COLUMN[a.typ]) for a in alerts.values())


@pytest.fixture
def old_database_url(pg_server: Any, tmp_path: Path) -> Iterator[str]:
    """A fresh database migrated only up to 0003 (a deployment before attribution)."""
    admin = pg_server if isinstance(pg_server, str) else pg_server.url
    name = f"acm_test_old_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = admin.rsplit("/", 1)[0] + "/" + name
    old_dir = tmp_path / "migrations"
    old_dir.mkdir()
    for f in sorted(MIGRATIONS_DIR.glob("*.sql"))[:3]:
        shutil.copy(f, old_dir / f.name)
    try:
        assert migrate(url, old_dir) == ["0001_init", "0002_actions_compliance",
                                         "0003_control_repo"]
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.server
@pytest.mark.timeout(90)
def test_migration_0005_upgrades_an_existing_database(old_database_url: str) -> None:
    url = old_database_url
    old_alert = str(uuid.uuid4())
    with psycopg.connect(url) as db:
        db.execute("INSERT INTO fraud_alerts (alert_id, alert_type, severity, b_number, "
                   "a_numbers, detection_window_ms, status) VALUES (%s, "
                   "'MULTICALL_MASKING', 'HIGH', %s, %s, 5000, 'INVESTIGATING')",
                   (old_alert, b_num(1), json.dumps([a_num(1), a_num(2)])))
    assert "0005_attribution" in migrate(url)
    assert migrate(url) == []
    sql = (MIGRATIONS_DIR / "0005_attribution.sql").read_text()
    with psycopg.connect(url) as db:
        db.execute(sql)  # every statement is re-runnable
        db.execute(sql)
        cols = {r[0]: r[1:] for r in db.execute(
            "SELECT column_name, data_type, column_default FROM information_schema.columns "
            "WHERE table_name = 'fraud_alerts'")}
        idx = {r[0] for r in db.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'fraud_alerts'")}
        old = db.execute("SELECT COALESCE(carrier_id, ''), COALESCE(gateway_id, ''), "
                         "a_number, b_numbers, alert_type FROM fraud_alerts").fetchall()
        # A row inserted without a type is a masking alert.
        db.execute("INSERT INTO fraud_alerts (severity, b_number, a_numbers, "
                   "detection_window_ms) VALUES ('LOW', %s, '[]', 5000)", (b_num(2),))
        default_type = db.execute("SELECT alert_type FROM fraud_alerts WHERE b_number = %s",
                                  (b_num(2),)).fetchone()
    assert {"carrier_id", "gateway_id", "a_number", "b_numbers"} <= set(cols)
    assert cols["b_numbers"][0] == "jsonb"
    assert {"idx_alerts_carrier_detected_at", "idx_alerts_type_detected_at",
            "idx_alerts_a_number"} <= idx
    assert old == [("", "", None, None, "MULTICALL_MASKING")]
    assert default_type == ("MULTICALL_MASKING",)

    # The writer's upsert on the migrated table: the old alert's next version gets its
    # attribution (operator data stays); a fan-out alert lands with its numbers.
    sink = PostgresSink(url)
    sink.open()
    try:
        change = rec.parse_alert("s/1", _alert_fields(al=old_alert, op="update", ver="2",
                                                      cr=C2, gw=G2))
        fo = rec.parse_alert("s/2", _alert_fields(typ="fanout", a=a_num(9), b="",
                                                  an=f"{b_num(1)},{b_num(2)}", n="2"))
        sink.write([], [change, fo])
    finally:
        sink.close()
    with psycopg.connect(url) as db:
        rows = {str(r[0]): r[1:] for r in db.execute(
            "SELECT alert_id, alert_type, carrier_id, gateway_id, a_number, b_numbers, "
            "status FROM fraud_alerts WHERE alert_id IN (%s, %s)", (old_alert, fo.alert_id))}
    assert rows[old_alert] == ("MULTICALL_MASKING", C2, G2, None, None, "INVESTIGATING")
    assert rows[fo.alert_id] == ("MULTICALL_FANOUT", C1, G1, a_num(9),
                                 [b_num(1), b_num(2)], "NEW")


@pytest.mark.server
@pytest.mark.timeout(60)
def test_pg_sink_waits_for_the_migration(old_database_url: str) -> None:
    """A writer newer than the schema retries (nothing is dead-lettered) until it is migrated."""
    sink = PostgresSink(old_database_url)
    sink.open()
    a = rec.parse_alert("s/1", _alert_fields())
    try:
        with pytest.raises(SinkUnavailable, match="acm db migrate"):
            sink.write([], [a])
        migrate(old_database_url)
        sink.write([], [a])
    finally:
        sink.close()
    with psycopg.connect(old_database_url) as db:
        assert db.execute("SELECT carrier_id FROM fraud_alerts").fetchall() == [(C1,)]
