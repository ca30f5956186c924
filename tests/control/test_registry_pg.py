"""The carrier registry on PostgreSQL (DATABASE_URL set): the MI commands write the tables
carriers / carrier_gateways / carrier_routes (migration 0004) in one transaction, and the control
plane publishes what they hold.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from acm_module.control import jsonrpc
from acm_module.control.pg_repository import PostgresControlRepository
from acm_module.core import registry
from acm_module.core.errors import StoreError
from acm_module.decide.store.conn import StoreConnection
from acm_module.write.migrate import MIGRATIONS_DIR
from tests.control.test_mi import wait_for
from tests.control.test_pg_repository import rows
from tests.control.test_registry_mi import BAD, call_error, populate
from tests.support.servers import flush, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

_TABLES = {"carriers": "SELECT * FROM carriers ORDER BY id",
           "gateways": "SELECT * FROM carrier_gateways ORDER BY id",
           "routes": "SELECT * FROM carrier_routes ORDER BY id"}


def tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    return {k: rows(url, sql) for k, sql in _TABLES.items()}


def published(store_url: str) -> tuple[int, dict[str, Any]]:
    c = StoreConnection(store_url, timeout=2.0)
    try:
        return registry.read(c)
    finally:
        c.close()


def test_commands_write_the_three_tables(mi_factory, database_url: str,  # type: ignore[no-untyped-def]
                                         store_url: str) -> None:
    with mi_factory(workers=1, env={"DATABASE_URL": database_url}) as (mi, _):
        http = mi.http()
        assert http.execute("acm_registry_show")["repository"] == "postgres"
        populate(http)
        assert rows(database_url, "SELECT id, name, licence, contact, cli_rule FROM carriers "
                                  "ORDER BY id") == [
            ("glo-ig", "Globacom IGW", "international_gateway", "noc@example.ng", None),
            ("mtn", "MTN", "mno", None, None)]
        assert rows(database_url, "SELECT id, carrier_id, addresses, trunks, rate_limit_cps, "
                                  "rate_window_s FROM carrier_gateways ORDER BY id") == [
            ("glo-lag-1", "glo-ig", ["198.51.100.7", "203.0.113.0/24"], ["tg-101"], 50, 1.0),
            ("mtn-1", "mtn", ["2001:db8::1"], [], 0, 1.0)]
        assert rows(database_url, "SELECT id, carrier_id, gateway_id, trunk, direction, "
                                  "cli_rule FROM carrier_routes ORDER BY id") == [
            ("glo-intl", "glo-ig", None, None, "international", None),
            ("glo-lag-nat", "glo-ig", "glo-lag-1", "tg-101", "national", "monitor")]
        show = http.execute("acm_registry_show")
        assert show["in_sync"] is True and (show["version"], show["document"]) == published(
            store_url)

        # Replacing one row moves its updated_at only; created_at stays.
        before = tables(database_url)
        time.sleep(0.01)
        r = http.execute("acm_carrier_add", {"id": "mtn", "name": "MTN Nigeria",
                                             "licence": "mno"})
        assert r["replaced"] is True
        after = tables(database_url)
        assert after["carriers"][0] == before["carriers"][0]  # glo-ig untouched
        (_, _, _, _, _, created, updated) = after["carriers"][1]
        assert created == before["carriers"][1][5] and updated > before["carriers"][1][6]
        assert after["gateways"] == before["gateways"] and after["routes"] == before["routes"]
        http.execute("acm_gateway_set_limit", {"id": "mtn-1", "cps": 7, "window": 0.5})
        assert rows(database_url, "SELECT rate_limit_cps, rate_window_s FROM carrier_gateways "
                                  "WHERE id = 'mtn-1'") == [(7, 0.5)]

        # Bad input: an error, and no row, version or audit record changes.
        before = tables(database_url)
        ver = published(store_url)[0]
        audits = rows(database_url, "SELECT count(*) FROM audit_log")
        for method, params, text in BAD:
            code, msg = call_error(http, method, params)
            assert code == jsonrpc.INVALID_PARAMS and text in msg, (method, params, msg)
        assert tables(database_url) == before
        assert published(store_url)[0] == ver
        assert rows(database_url, "SELECT count(*) FROM audit_log") == audits

        # A cascade removes the rows in an order the foreign keys accept, in one transaction.
        r = http.execute("acm_carrier_remove", {"id": "glo-ig", "cascade": True,
                                                "actor": "bob"})
        assert r["version"] > ver
        assert [x[0] for x in rows(database_url, "SELECT id FROM carrier_gateways")] == [
            "mtn-1"]
        assert rows(database_url, "SELECT count(*) FROM carrier_routes") == [(0,)]
        assert published(store_url)[1] == http.execute("acm_registry_show")["document"]
        audit = rows(database_url, "SELECT actor, action, target, old, new FROM audit_log "
                                   "ORDER BY id")
        assert [a[1:3] for a in audit] == [
            ("acm_carrier_add", "carrier:glo-ig"), ("acm_carrier_add", "carrier:mtn"),
            ("acm_gateway_add", "gateway:glo-lag-1"), ("acm_gateway_add", "gateway:mtn-1"),
            ("acm_route_add", "route:glo-intl"), ("acm_route_add", "route:glo-lag-nat"),
            ("acm_carrier_add", "carrier:mtn"), ("acm_gateway_set_limit", "gateway:mtn-1"),
            ("acm_carrier_remove", "carrier:glo-ig")]
        assert audit[0][0] == "alice" and audit[-1][0] == "bob"
        assert audit[6][3]["name"] == "MTN" and audit[6][4]["name"] == "MTN Nigeria"
        assert audit[-1][4] is None and len(audit[-1][3]["routes"]) == 2


def test_a_new_store_gets_the_registry_from_the_database(mi_factory, database_url: str,  # type: ignore[no-untyped-def]
                                                         store_url: str) -> None:
    # Rows written by someone else (a restore, SQL): the start-up publishes them.
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO carriers (id, name, licence) VALUES ('c1', 'One', 'pnl')")
        c.execute("INSERT INTO carrier_gateways (id, carrier_id, addresses) "
                  "VALUES ('g1', 'c1', ARRAY['192.0.2.0/24'])")
    expected = registry.validate({
        "carriers": [{"id": "c1", "name": "One", "licence": "pnl"}],
        "gateways": [{"id": "g1", "carrier_id": "c1", "addresses": ["192.0.2.0/24"]}]})
    with mi_factory(workers=1, env={"DATABASE_URL": database_url}) as (mi, _):
        wait_for(lambda: published(store_url)[1] == expected, 10, "the start-up publish")
        populate(mi.http())
        doc = published(store_url)[1]
    flush(store_url)  # a fresh Dragonfly
    with mi_factory(workers=1, env={"DATABASE_URL": database_url}) as (mi, _):
        wait_for(lambda: published(store_url)[1] == doc, 10, "the start-up publish")
        assert mi.http().execute("acm_registry_show")["in_sync"] is True


def test_repository_replaces_the_document(database_url: str) -> None:
    repo = PostgresControlRepository(SimpleNamespace(database_url=database_url))
    try:
        assert repo.registry_get() == registry.EMPTY
        one = registry.validate({
            "carriers": [{"id": "a", "name": "A", "licence": "mno"},
                         {"id": "b", "name": "B", "licence": "leo", "cli_rule": "off"}],
            "gateways": [{"id": "ga", "carrier_id": "a", "addresses": ["10.0.0.0/8"],
                          "trunks": ["t1"], "rate_limit_cps": 3, "rate_window_s": 0.25}],
            "routes": [{"id": "ra", "carrier_id": "a", "gateway_id": "ga",
                        "direction": "national"}]})
        repo.registry_put(one)
        assert repo.registry_get() == one
        # The gateway moves to carrier b with its route, and carrier a goes: the route is
        # updated before the carrier row is deleted.
        two = registry.validate({
            "carriers": [{"id": "b", "name": "B", "licence": "leo"}],
            "gateways": [{"id": "ga", "carrier_id": "b", "addresses": ["10.0.0.0/8"]},
                         {"id": "gb", "carrier_id": "b", "addresses": ["::1"]}],
            "routes": [{"id": "ra", "carrier_id": "b", "gateway_id": "gb",
                        "trunk": "t9", "direction": "international", "cli_rule": "enforce"}]})
        repo.registry_put(two)
        assert repo.registry_get() == two
        repo.registry_put(registry.EMPTY)
        assert repo.registry_get() == registry.EMPTY
        # The migration is re-runnable.
        sql = (MIGRATIONS_DIR / "0004_gateway_registry.sql").read_text()
        with psycopg.connect(database_url, autocommit=True) as c:
            c.execute(sql)  # type: ignore[arg-type]
    finally:
        repo.close()
    down = PostgresControlRepository(SimpleNamespace(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"))
    try:
        with pytest.raises(StoreError):
            down.registry_get()
        with pytest.raises(StoreError):
            down.registry_put(registry.EMPTY)
    finally:
        down.close()
