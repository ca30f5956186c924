"""The MI control plane on PostgreSQL (DATABASE_URL set): whitelist rows, audit_log, fraud_alerts.

Real servers throughout: a PostgreSQL started by tests.support.writer_fixtures,
`acm serve` driven by the `opensips` package's MI client, the writer's own whitelist reconcile and
a real `acm writer`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from opensips.mi import OpenSIPSMIException

from acm_module.control import jsonrpc, whitelist_sync
from acm_module.control.audit import AuditRecord
from acm_module.control.pg_repository import PostgresControlRepository
from acm_module.control.repository import AlertQuery, WhitelistEntry
from acm_module.core import liveconfig as store_config
from acm_module.decide.store.cluster import StoreClient
from acm_module.decide.store.conn import StoreConnection
from tests.support.numbers import a_num, cid
from tests.support.servers import free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

PARTITIONS = 16
B = "+2348037771234"
B_ATTACK = "+2348037775555"
B_STALE = "+2348037779999"
# Reaches PostgreSQL only as bound parameters: must come back byte for byte.
EVIL_REASON = "bank IVR'); DROP TABLE whitelist; -- \"x\" \\ ;"
EVIL_BY = "noc' OR '1'='1"


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute(sql, params).fetchall()  # type: ignore[arg-type]


def marker(store_url: str, b: str) -> bytes | None:
    c = StoreConnection(store_url, timeout=2.0)
    try:
        v = c.call("GET", store_config.whitelist_key(b, PARTITIONS))
        return v if isinstance(v, bytes) else None
    finally:
        c.close()


def reconcile(database_url: str, store_url: str) -> whitelist_sync.SyncResult:
    """Run the writer's whitelist reconcile once (table -> store markers)."""
    store = StoreClient(store_url, timeout=5.0)
    try:
        with psycopg.connect(database_url, connect_timeout=5) as db:
            return whitelist_sync.reconcile(db, store, PARTITIONS)
    finally:
        store.close()


def mi_error(exc: OpenSIPSMIException) -> tuple[int, str]:
    """Return (code, message) of the JSON-RPC error behind an OpenSIPSMI exception."""
    cause = exc.__cause__
    assert cause is not None and hasattr(cause, "code"), exc
    return int(cause.code), str(cause.message)  # type: ignore[attr-defined]


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_whitelist_and_audit_live_in_postgres(mi_factory, database_url: str,  # type: ignore[no-untyped-def]
                                              store_url: str) -> None:
    with mi_factory(env={"DATABASE_URL": database_url}) as (mi, client):
        http = mi.http()
        assert http.execute("acm_get_config")["repository"] == "postgres"
        before = time.time()
        e = http.execute("acm_whitelist_add", {
            "number": "0803 777 1234", "reason": "first", "ttl": 600, "actor": "alice"})
        assert e["b_number"] == B and e["replaced"] is False
        e = http.execute("acm_whitelist_add", {
            "number": B, "reason": EVIL_REASON, "created_by": EVIL_BY, "ttl": 3600,
            "actor": "alice"})
        assert e["replaced"] is True and e["reason"] == EVIL_REASON

        # The row is in the table, literally, with its expiry.
        (row,) = rows(database_url,
                      "SELECT b_number, reason, created_by, expires_at FROM whitelist")
        assert row[:3] == (B, EVIL_REASON, EVIL_BY)
        assert abs(row[3].timestamp() - (before + 3600)) < 30
        assert rows(database_url, "SELECT count(*) FROM fraud_alerts") == [(0,)]

        # The writer's reconcile keeps it (and does delete a marker the table lacks).
        c = StoreConnection(store_url, timeout=2.0)
        try:
            store_config.whitelist_set(c, B_STALE, PARTITIONS, "not in the table")
        finally:
            c.close()
        r = reconcile(database_url, store_url)
        assert (r.active, r.removed) == (1, 1), r
        assert marker(store_url, B) == EVIL_REASON.encode() and marker(store_url, B_STALE) is None
        t0 = 1_800_000_000.0
        replies = [client.decide(cid(), a_num(i), B, ts=t0 + i * 0.1) for i in range(7)]
        assert {x["reason"] for x in replies} == {"whitelisted"}
        listed = http.execute("acm_whitelist_list")["entries"]
        assert [(x["b_number"], x["reason"], x["created_by"]) for x in listed] == [
            (B, EVIL_REASON, EVIL_BY)]

        # Remove: row and marker gone, the decision path no longer whitelists.
        assert http.execute("acm_whitelist_remove", {"number": B, "actor": "bob"}) == {
            "removed": B}
        assert rows(database_url, "SELECT count(*) FROM whitelist") == [(0,)]
        assert marker(store_url, B) is None
        assert client.decide(cid(), a_num(50), B, ts=t0 + 10)["reason"] == "clean"
        assert reconcile(database_url, store_url).active == 0
        with pytest.raises(OpenSIPSMIException) as ex:
            http.execute("acm_whitelist_remove", {"number": B})
        assert mi_error(ex.value)[0] == jsonrpc.NOT_FOUND

        # One audit_log row per change, with actor, via (in details), old and new.
        audit = rows(database_url, "SELECT actor, action, target, old, new, outcome, details "
                                   "FROM audit_log ORDER BY id")
        assert [(a[0], a[1], a[2]) for a in audit] == [
            ("alice", "acm_whitelist_add", B), ("alice", "acm_whitelist_add", B),
            ("bob", "acm_whitelist_remove", B)]
        first, second, removal = audit
        assert first[3] is None and first[4]["reason"] == "first"
        assert second[3]["reason"] == "first" and second[4]["reason"] == EVIL_REASON
        assert second[4]["created_by"] == EVIL_BY
        assert removal[3]["reason"] == EVIL_REASON and removal[4] is None
        assert all(a[5] == "ok" and json.loads(a[6])["via"].startswith("http:127.0.0.1:")
                   for a in audit)
        # ... and read back over MI, newest first.
        recs = http.execute("acm_audit_list", {"target": "0803 777 1234"})["records"]
        assert [(x["action"], x["actor"]) for x in recs] == [
            ("acm_whitelist_remove", "bob"), ("acm_whitelist_add", "alice"),
            ("acm_whitelist_add", "alice")]
        assert all(x["via"].startswith("http:127.0.0.1:") for x in recs)
        assert recs[1]["new"]["reason"] == EVIL_REASON and recs[0]["new"] is None

        # Settings changes are audited in audit_log too, over both transports.
        mi.datagram().execute("acm_set", {"threshold": 7, "actor": "carol"})
        (cfg,) = rows(database_url, "SELECT actor, old, new, details FROM audit_log "
                                    "WHERE action = 'acm_set'")
        assert cfg[:3] == ("carol", {"threshold": 5}, {"threshold": 7})
        assert json.loads(cfg[3])["via"].startswith("datagram:")


def test_restart_reasserts_markers_from_the_table(mi_factory, database_url: str,  # type: ignore[no-untyped-def]
                                                  store_url: str) -> None:
    # A row written by someone else (SQL, the alert lifecycle): the boot resync loads it.
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO whitelist (b_number, reason, created_by) VALUES (%s, %s, %s)",
                  (B, "from SQL", "dba"))
    with mi_factory(env={"DATABASE_URL": database_url}) as (mi, client):
        wait_for(lambda: marker(store_url, B) == b"from SQL", 10, "the boot resync")
        assert client.decide(cid(), a_num(1), B, ts=1_800_000_000.0)["reason"] == "whitelisted"
        (e,) = mi.http().execute("acm_whitelist_list", {"number": B})["entries"]
        assert (e["reason"], e["created_by"], e["expires_at"]) == ("from SQL", "dba", None)


def test_database_down_is_store_unavailable_and_changes_nothing(mi_factory, store_url: str  # type: ignore[no-untyped-def]
                                                                ) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with mi_factory(env={"DATABASE_URL": url}) as (mi, client):
        http = mi.http()
        assert http.execute("acm_get_config")["repository"] == "postgres"
        with pytest.raises(OpenSIPSMIException) as ex:
            http.execute("acm_whitelist_add", {"number": B, "reason": "x"})
        code, msg = mi_error(ex.value)
        assert code == jsonrpc.STORE_UNAVAILABLE and "postgres" in msg
        assert marker(store_url, B) is None
        assert client.decide(cid(), a_num(1), B, ts=1_800_000_000.0)["reason"] == "clean"
        # Settings do not need the database.
        assert http.execute("acm_set", {"threshold": 6})["changed"]["threshold"]["new"] == 6


def test_alert_list_reads_what_a_real_writer_wrote(mi_factory, database_url: str,  # type: ignore[no-untyped-def]
                                                   store_url: str, writer_factory) -> None:
    with mi_factory(env={"DATABASE_URL": database_url}) as (mi, client):
        http = mi.http()
        http.execute("acm_whitelist_add", {"number": B, "reason": "bank IVR"})
        t0 = time.time()
        replies = [client.decide(cid(), a_num(i), B_ATTACK, ts=t0 + i * 0.3) for i in range(7)]
        assert [x["verdict"] for x in replies].count("drop") >= 1, replies
        w = writer_factory(env={"DATABASE_URL": database_url, "ACM_WRITER_SINKS": "pg",
                                "ACM_WHITELIST_SYNC_INTERVAL": "0.3"})
        wait_for(lambda: rows(database_url, "SELECT count(*) FROM fraud_alerts")[0][0] >= 1,
                 30, f"fraud_alerts rows\n{w.read_log()[-2000:]}")
        time.sleep(1.0)  # a few whitelist reconciles of the running writer
        assert w.alive(), w.read_log()[-2000:]
        assert marker(store_url, B) == b"bank IVR"
        assert client.decide(cid(), a_num(99), B, ts=t0 + 20)["reason"] == "whitelisted"

        (db_id, db_sev, db_n, db_ver) = rows(
            database_url, "SELECT alert_id, severity, distinct_count, version "
                          "FROM fraud_alerts")[0]
        out = http.execute("acm_alert_list", {"number": "0803 777 5555"})
        assert out["source"] == "postgres" and out["count"] == 1
        (a,) = out["alerts"]
        assert a["alert_id"] == str(db_id) and a["b_number"] == B_ATTACK
        assert (a["severity"], a["distinct_max"], a["version"]) == (db_sev, db_n, db_ver)
        assert set(a["a_numbers"]) <= {a_num(i) for i in range(7)}
        assert a["a_number_count"] == len(a["a_numbers"]) >= 5
        assert a["first_detection_ms"] <= a["last_detection_ms"]
        assert abs(a["last_detection_ms"] / 1000 - t0) < 10 and a["status"] == "NEW"
        assert http.execute("acm_alert_list", {"severity": "LOW"})["count"] == 1
        assert http.execute("acm_alert_list", {"number": B})["count"] == 0
        assert http.execute("acm_alert_list", {"since": t0 + 60})["count"] == 0
        assert http.execute("acm_alert_list", {"until": t0 - 60})["count"] == 0


def test_repository_contract_and_reconnect(database_url: str, pg_server: Any) -> None:
    """The repository itself: round trips, actions' audit rows, a dropped connection."""
    repo = PostgresControlRepository(SimpleNamespace(database_url=database_url))
    try:
        now = int(time.time() * 1000)
        e = WhitelistEntry(B, "r", "me", created_at_ms=now + 1, expires_at_ms=now + 123_457)
        assert repo.whitelist_put(e) is None
        assert repo.whitelist_get(B) == e  # millisecond timestamps survive exactly
        expired = WhitelistEntry(B_STALE, "old", "me", now - 5000, now - 1000)
        assert repo.whitelist_put(expired) is None
        assert repo.whitelist_list(now_ms=now) == [e]
        assert repo.whitelist_list() == [e, expired]
        assert repo.whitelist_get(B_STALE) == expired
        assert repo.whitelist_delete(B_STALE) == expired and repo.whitelist_delete(B_STALE) is None

        rid = repo.audit_append(AuditRecord("acm_set", "alice", "event", "config",
                                            {"window": 2.5}, {"when": datetime.now(UTC)},
                                            ts_ms=now))
        (got,) = repo.audit_list(action="acm_set")
        assert (got.id, got.via, got.ts_ms, got.old) == (rid, "event", now, {"window": 2.5})
        assert isinstance(got.new["when"], str)
        # Rows of the alert lifecycle carry "via <peer>" as text in details.
        with psycopg.connect(database_url, autocommit=True) as c:
            c.execute("INSERT INTO audit_log (actor, action, target, details) VALUES "
                      "('bob', 'acm_alert_status', 'x', 'via http:127.0.0.1:1')")
        assert [r.via for r in repo.audit_list()] == ["http:127.0.0.1:1", "event"]
        assert repo.audit_list(since_ms=now + 60_000, action="acm_set") == []
        assert repo.audit_list(target="config")[0].id == rid

        # The server drops the connection (a restart, a failover): the next call reconnects.
        with psycopg.connect(database_url, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert repo.whitelist_get(B) == e
        assert repo.alert_list(AlertQuery(min_severity="CRITICAL")) == []
    finally:
        repo.close()


def test_both_repositories_list_fanout_and_masking_alerts_alike(
        service_factory: Any, writer_factory: Any, store_url: str, database_url: str) -> None:
    from acm_module.control.repository import StoreRepository
    from tests.control.test_alert_list import IGW_IP, REGISTRY
    from tests.support.servers import publish_registry

    with service_factory(env={"ACM_FANOUT_THRESHOLD": "4", "ACM_FANOUT_WINDOW": "60"}) as (
            _svc, client):
        publish_registry(store_url, REGISTRY)
        t0 = time.time()
        for i in range(6):
            client.decide(cid(), "+2348031000007", f"+23480399{i:05d}", ts=t0 + i,
                          src_ip=IGW_IP)
            client.decide(cid(), a_num(i), B_ATTACK, ts=t0 + i * 0.3, src_ip=IGW_IP)
    store = StoreRepository(StoreConnection(store_url, timeout=5.0), PARTITIONS)
    try:
        in_store = {a["alert_id"]: a for a in store.alert_list(AlertQuery())}
    finally:
        store.close()
    assert {a["alert_type"] for a in in_store.values()} == {"MULTICALL_FANOUT",
                                                            "MULTICALL_MASKING"}
    w = writer_factory(env={"DATABASE_URL": database_url, "ACM_WRITER_SINKS": "pg"})
    versions = {aid: a["version"] for aid, a in in_store.items()}
    wait_for(lambda: {str(r[0]): r[1] for r in rows(
        database_url, "SELECT alert_id, version FROM fraud_alerts")} == versions,
             30, f"fraud_alerts rows\n{w.read_log()[-2000:]}")
    repo = PostgresControlRepository(SimpleNamespace(database_url=database_url))
    try:
        in_pg = {a["alert_id"]: a for a in repo.alert_list(AlertQuery())}
    finally:
        repo.close()
    assert set(in_pg) == set(in_store)
    for aid, view in in_store.items():
        same = {k: v for k, v in view.items() if k != "source"}
        assert {k: in_pg[aid][k] for k in same} == same
