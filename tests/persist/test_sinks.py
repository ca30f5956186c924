"""Sinks and admin commands one at a time, against real servers: migrations, the alert version
guard, ClickHouse replays, the whitelist reconcile, and SIGTERM finishing the batch in hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from acm_module.control import whitelist_sync
from acm_module.core import keys
from acm_module.core import liveconfig as store_config
from acm_module.core.records import AlertChange
from acm_module.decide.store.cluster import StoreClient
from acm_module.decide.store.conn import StoreConnection
from acm_module.write.clickhouse import ClickHouseSink
from acm_module.write.migrate import migrations
from acm_module.write.pg import PostgresSink
from acm_module.write.writer import GROUP_PREFIX
from tests.support.pgqdb import ALL_SINKS, add_tap, ch_query, qdb_count, synthetic, writer_env
from tests.support.servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]


def change(aid: str, ver: int, sev: str = "HIGH", first_ms: int = 1_800_000_000_000) -> AlertChange:
    n = 4 + ver
    return AlertChange(sid=f"s/{ver}", alert_id=aid, op="open" if ver == 1 else "update",
                       b="+2348039999999", severity=sev, distinct=n,
                       a_numbers=tuple(f"+23480310{i:05d}" for i in range(n)),
                       first_ms=first_ms, last_ms=first_ms + ver, ver=ver, window_ms=5000,
                       block_ttl_ms=0)


def test_db_migrate_is_idempotent(database_url: str) -> None:
    cmd = [sys.executable, "-m", "acm_module.cli", "db", "migrate", "--database-url",
           database_url]
    # The fixture migrated already: a second and third run apply nothing and change nothing.
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "none pending" in out.stdout
    with psycopg.connect(database_url) as c:
        versions = [r[0] for r in c.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in migrations()] and versions[0] == "0001_init"
        cols = {r[0] for r in c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit_log'")}
    assert {"id", "at", "actor", "action", "target", "old", "new", "outcome", "details"} <= cols


def test_pg_version_guard_keeps_the_newest_change(database_url: str) -> None:
    sink = PostgresSink(database_url)
    sink.open()
    aid = str(uuid.uuid4())
    try:
        sink.write([], [change(aid, 1)])
        sink.write([], [change(aid, 3, "CRITICAL"), change(aid, 2)])
        sink.write([], [change(aid, 2), change(aid, 1)])  # a replay of older changes
        with psycopg.connect(database_url) as c:
            c.execute("UPDATE fraud_alerts SET status = 'INVESTIGATING', notes = 'on it'")
            c.commit()
        sink.write([], [change(aid, 3, "CRITICAL")])  # replay of the same: operator data stays
        with psycopg.connect(database_url) as c:
            rows = c.execute("SELECT version, severity, jsonb_array_length(a_numbers), status, "
                             "notes FROM fraud_alerts").fetchall()
    finally:
        sink.close()
    assert rows == [(3, "CRITICAL", 7, "INVESTIGATING", "on it")]


def test_clickhouse_replays_and_escalations_count_once(tmp_path: Any) -> None:
    path = str(tmp_path / "chdb")
    code = f"""
from acm_module.write.clickhouse import ClickHouseSink
from tests.persist.test_sinks import change
a, b = "{uuid.uuid4()}", "{uuid.uuid4()}"
s = ClickHouseSink(chdb_path={path!r})
s.open()
s.write([], [change(a, 1)])
s.write([], [change(a, 1), change(b, 1)])           # replay + a new alert
s.write([], [change(a, 2), change(a, 3, "CRITICAL")])  # escalation in one batch
s.write([], [change(a, 2)])                            # late older version
s.write([], [change(b, 2), change(b, 1)])
s.write([], [change(b, 2)])
rows = sorted((r["severity"], r["version"]) for r in s.query_alerts())
daily = sorted((r["severity"], int(r["alert_count"]), int(r["total_a_numbers"]))
               for r in s.daily_stats())
s.close()
print(rows, daily)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(REPO / "tests" / "persist"),
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ("[('CRITICAL', 3), ('HIGH', 2)] "
                                  "[('CRITICAL', 1, 7), ('HIGH', 1, 6)]")
    # The view is rebuilt from the current rows when the sink opens: still the same.
    assert ClickHouseSink  # the module is importable without chdb state in this process
    daily = ch_query(path, "SELECT severity, sum(alert_count) AS n FROM acm.daily_stats_mv "
                           "GROUP BY severity ORDER BY severity")
    assert [(r["severity"], int(r["n"])) for r in daily] == [("CRITICAL", 1), ("HIGH", 1)]


def test_whitelist_reconcile_follows_the_table(database_url: str, store: StoreClient) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    past = datetime.now(UTC) - timedelta(hours=1)
    with psycopg.connect(database_url) as db:
        whitelist_sync.add(db, None, "0803 111 1111", "bank IVR", "alice")
        whitelist_sync.add(db, None, "+2348032222222", "call centre", "bob", expires_at=soon)
        with db.cursor() as cur:  # an expired row and an invalid one are not loaded
            cur.execute("INSERT INTO whitelist (b_number, reason, created_by, expires_at) "
                        "VALUES (%s, %s, %s, %s), (%s, %s, %s, NULL)",
                        ("+2348033333333", "old", "carol", past, "anonymous", "bad", "dave"))
        db.commit()
        # A stale marker the table does not have is removed.
        store_config.whitelist_set(store, "+2348034444444", 16, "stale")
        r = whitelist_sync.reconcile(db, store, 16)
        assert (r.active, r.removed, r.invalid) == (2, 1, 1)
        k1 = store_config.whitelist_key("+2348031111111", 16)
        k2 = store_config.whitelist_key("+2348032222222", 16)
        assert store.call("GET", k1) == b"bank IVR" and store.call("PTTL", k1) == -1
        assert 3_500_000 < store.call("PTTL", k2) <= 3_600_000  # type: ignore[operator]
        assert store.call("EXISTS", store_config.whitelist_key("+2348033333333", 16)) == 0
        assert store.call("EXISTS", store_config.whitelist_key("+2348034444444", 16)) == 0
        # Removal through the API: table, audit, store at once; reconcile agrees.
        assert whitelist_sync.remove(db, store, "+2348031111111", "alice")
        assert store.call("EXISTS", k1) == 0
        assert whitelist_sync.reconcile(db, store, 16).active == 1
        audit = db.execute("SELECT actor, action, target, outcome FROM audit_log ORDER BY id"
                           ).fetchall()
    assert audit == [("alice", "whitelist.add", "+2348031111111", "ok"),
                     ("bob", "whitelist.add", "+2348032222222", "ok"),
                     ("alice", "whitelist.remove", "+2348031111111", "ok")]


def test_writer_syncs_the_whitelist_into_the_service(
        service_factory: Any, writer_factory: Any, store_url: str, database_url: str,
        questdb_url: str, chdb_path: str) -> None:
    with psycopg.connect(database_url) as db:
        whitelist_sync.add(db, None, "+2348035555555", "hospital", "ops")
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path),
                       args=["--sinks", "pg"])
    with service_factory() as (_svc, client):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = client.decide(f"wl-{time.monotonic_ns()}", "+2348031000001", "+2348035555555",
                              ts=1_800_000_000.0)
            if r["reason"] == "whitelisted":
                break
            time.sleep(0.2)
        assert r["reason"] == "whitelisted"
    assert w.stop() == 0


def test_sigterm_finishes_the_batch_in_hand(
        writer_factory: Any, store_url: str, database_url: str, questdb_url: str,
        chdb_path: str) -> None:
    add_tap(store_url)
    synthetic(store_url, 30_000, seed=3)
    w = writer_factory(env=writer_env(database_url, questdb_url, chdb_path,
                                      ACM_WRITER_BATCH="4000"))
    deadline = time.monotonic() + 60
    while qdb_count(questdb_url) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.stop(signal.SIGTERM) == 0
    # Whatever each sink had been delivered, it wrote and acknowledged: nothing left pending.
    c = StoreConnection(store_url, timeout=5.0)
    try:
        for s in keys.streams(16):
            for sink in ALL_SINKS:
                assert c.call("XPENDING", s, GROUP_PREFIX + sink)[0] == 0  # type: ignore[index]
    finally:
        c.close()


@pytest.mark.timeout(120)
def test_clickhouse_server_replays_and_escalations_count_once() -> None:
    """The same DDL and queries through clickhouse-connect, when CLICKHOUSE_URL names a server.

    No ClickHouse server can run here (the embedded engine, chdb, is what the other tests use),
    so this runs only where an operator points CLICKHOUSE_URL at one.
    """
    url = os.environ.get("CLICKHOUSE_URL", "")
    if not url:
        pytest.skip("CLICKHOUSE_URL is not set: no ClickHouse server to test against")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    s = ClickHouseSink(clickhouse_url=url)
    s.open()
    try:
        s.write([], [change(a, 1)])
        s.write([], [change(a, 1), change(b, 1)])
        s.write([], [change(a, 2), change(a, 3, "CRITICAL")])
        s.write([], [change(a, 2)])
        # clickhouse-connect returns UUID objects where chdb returns strings.
        rows = {str(r["alert_id"]): (r["severity"], int(r["version"]))
                for r in s.query_alerts() if str(r["alert_id"]) in (a, b)}
        assert rows == {a: ("CRITICAL", 3), b: ("HIGH", 1)}
    finally:
        s.close()
