"""One live configuration per deployment with DATABASE_URL set (issue 14): the MI overrides are
the `config_overrides` row of the deployment (migration 0007), written by compare-and-set.

Real servers throughout: PostgreSQL (the persist fixtures), redis-server stores, `acm serve`
nodes driven over MI HTTP.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from opensips.mi import OpenSIPSMI

from acm_module.control.audit import Caller
from acm_module.control.commands import Control
from acm_module.control.overrides import OVERRIDES_KEY
from acm_module.control.pg_repository import PostgresControlRepository
from acm_module.control.repository import StoreRepository
from acm_module.core import settings as settings_mod
from acm_module.decide.store.cluster import StoreClient
from acm_module.decide.store.conn import StoreConnection
from tests.control.test_mi import wait_for
from tests.control.test_pg_repository import rows
from tests.support.servers import DelayProxy, RedisServer, Service, flush, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]

DEPLOYMENT = "ng-lagos"


def mi(svc: Service, method: str, params: dict[str, Any] | None = None) -> Any:
    return OpenSIPSMI(conn="http", url=f"http://{svc.mi_http}/mi").execute(method,
                                                                          params or {})


def node(store_url: str, db: str, deployment: str = DEPLOYMENT) -> Service:
    return Service(store_url, workers=1,
                   extra_env={"DATABASE_URL": db, "ACM_DEPLOYMENT": deployment})


def live(svc: Service) -> tuple[Any, Any]:
    cfg = mi(svc, "acm_get_config")["live"] or {}
    return cfg.get("threshold"), cfg.get("mode")


def store_get(url: str, key: str) -> Any:
    c = StoreConnection(url, timeout=2.0)
    try:
        return c.call("GET", key)
    finally:
        c.close()


def start(services: list[Service], svc: Service) -> Service:
    services.append(svc)
    return svc.start()


def test_the_deployment_shares_its_overrides_through_the_repository(
        services: list[Service], store_url: str, database_url: str) -> None:
    a = start(services, node(store_url, database_url))
    b = start(services, node(store_url, database_url))
    r = mi(a, "acm_set", {"threshold": 3, "mode": "monitor", "actor": "alice"})
    assert r["persisted"] is True
    got = mi(b, "acm_get_config")
    assert got["overrides"] == {"threshold": 3, "mode": "monitor"}
    assert (got["live"]["threshold"], got["live"]["mode"]) == (3, "monitor")
    assert got["deployment"] == DEPLOYMENT and got["overrides_generation"] == 1
    assert got["overrides_key"] == f"postgres:config_overrides[{DEPLOYMENT}]"
    # The repository holds them, not the store.
    assert store_get(store_url, OVERRIDES_KEY) is None
    assert rows(database_url, "SELECT deployment, generation, overrides FROM config_overrides"
                ) == [(DEPLOYMENT, 1, {"threshold": 3, "mode": "monitor"})]
    mi(b, "acm_set", {"threshold": 4, "actor": "bob"})
    assert mi(a, "acm_get_config")["overrides"] == {"threshold": 4, "mode": "monitor"}
    audit = rows(database_url, "SELECT actor, old, new FROM audit_log WHERE action = 'acm_set' "
                               "ORDER BY id")
    assert audit == [("alice", {"threshold": 5, "mode": "block"},
                      {"threshold": 3, "mode": "monitor"}),
                     ("bob", {"threshold": 3}, {"threshold": 4})]

    def all_in_sync() -> bool:
        st = mi(a, "acm_stats")
        return len(st["nodes"]) == 2 and all(n["in_sync"] for n in st["nodes"])
    wait_for(all_in_sync, 10, "both nodes applying the current generation")

    # The store loses everything: the live config comes back with the deployment's overrides.
    flush(store_url)
    wait_for(lambda: live(a) == (4, "monitor") and live(b) == (4, "monitor"), 10,
             "the live config restored from the repository")
    assert mi(b, "acm_get_config")["overrides"] == {"threshold": 4, "mode": "monitor"}
    wait_for(all_in_sync, 10, "both nodes in sync after the wipe")

    # A node that joins with a new, empty store and the same database starts with them ...
    other = RedisServer().start()
    try:
        c = start(services, node(other.url, database_url))
        cfg = mi(c, "acm_get_config")
        assert (cfg["live"]["threshold"], cfg["live"]["mode"]) == (4, "monitor")
        assert cfg["sources"]["threshold"].startswith("override:postgres:")
        c.stop()
        # ... and one of another deployment does not (on that store, it says whose it is).
        d = start(services, node(other.url, database_url, deployment="ng-abuja"))
        cfg = mi(d, "acm_get_config")
        assert (cfg["live"]["threshold"], cfg["live"]["mode"]) == (5, "block")
        assert cfg["overrides"] == {} and cfg["overrides_generation"] == 0
        d.wait_log("this store belongs to deployment 'ng-lagos'", timeout=10)
    finally:
        other.cleanup()
    assert "Traceback" not in a.read_log() + b.read_log()


def test_concurrent_changes_on_two_nodes_lose_no_update(
        services: list[Service], store_url: str, database_url: str) -> None:
    a = start(services, node(store_url, database_url))
    b = start(services, node(store_url, database_url))
    rounds = [({"threshold": 10 + i}, {"block_ttl": 100 + i}) for i in range(4)]
    rounds.append(({"threshold": 20}, {"threshold": 21}))  # the same setting: one of them wins
    for i, (on_a, on_b) in enumerate(rounds):
        go = threading.Barrier(2)
        errors: list[BaseException] = []
        ts = [threading.Thread(target=_set_at_once, args=(go, errors, a, on_a, f"a{i}")),
              threading.Thread(target=_set_at_once, args=(go, errors, b, on_b, f"b{i}"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not errors, errors
    saved = mi(a, "acm_get_config")
    assert saved["overrides"]["block_ttl"] == 103  # every change of the other node kept
    assert saved["overrides"]["threshold"] in (20, 21)
    # Ten changes, ten generations: none overwrote another unseen.
    assert rows(database_url, "SELECT generation FROM config_overrides") == [(10,)]
    # The live config is what the repository says, on both nodes.
    for svc in (a, b):
        cfg = mi(svc, "acm_get_config")
        assert cfg["overrides"] == saved["overrides"]
        assert {k: cfg["live"][k] for k in saved["overrides"]} == saved["overrides"]
    # Every change is audited, by the node that made it.
    audit = rows(database_url, "SELECT actor FROM audit_log WHERE action = 'acm_set'")
    assert sorted(x for (x,) in audit) == sorted(f"{n}{i}" for i in range(5) for n in "ab")


def test_a_change_made_while_the_database_is_down_is_written_when_it_is_back(
        services: list[Service], store_url: str, database_url: str) -> None:
    repo = PostgresControlRepository(SimpleNamespace(database_url=database_url))
    try:  # the deployment's overrides, set earlier
        assert repo.overrides_put(DEPLOYMENT, 0, {"mode": "monitor"}, "earlier") == 1
    finally:
        repo.close()
    u = urlsplit(database_url)
    proxy = DelayProxy(free_port())  # to nothing: the database is down
    try:
        down = u._replace(netloc=f"{u.username}@127.0.0.1:{proxy.port}").geturl()
        a = start(services, node(store_url, down))
        assert live(a) == (5, "block")  # started on its own settings
        r = mi(a, "acm_set", {"threshold": 3})  # settings do not wait for the database
        assert r["changed"] == {"threshold": {"old": 5, "new": 3}} and r["persisted"] is False
        assert live(a)[0] == 3
        assert mi(a, "acm_get_config")["overrides"].startswith("unavailable: postgres")
        proxy.target_port = u.port  # the database is back
        wait_for(lambda: rows(database_url, "SELECT generation, overrides FROM "
                                            "config_overrides")
                 == [(2, {"mode": "monitor", "threshold": 3})],
                 10, "the change written to the repository")
        # ... and the node applies the deployment's overrides it could not read at start.
        wait_for(lambda: live(a) == (3, "monitor"), 10, "the overrides applied")
        assert mi(a, "acm_get_config")["overrides"] == {"mode": "monitor", "threshold": 3}
    finally:
        proxy.close()


def test_a_deployment_that_gets_a_database_keeps_its_overrides(
        services: list[Service], store_url: str, database_url: str) -> None:
    conn = StoreClient(store_url, timeout=2.0)
    try:  # set through MI before the deployment had DATABASE_URL
        assert StoreRepository(conn, 16).overrides_put("", 0, {"threshold": 3}, "old") == 1
    finally:
        conn.close()
    a = start(services, node(store_url, database_url))
    assert live(a)[0] == 3
    wait_for(lambda: rows(database_url, "SELECT generation, overrides FROM config_overrides")
             == [(1, {"threshold": 3})], 10, "the store's overrides taken into the repository")
    # From then on the repository is the one: a reset there is not undone by the store's copy.
    mi(a, "acm_reload", {"reset": True})
    assert mi(a, "acm_get_config")["overrides"] == {} and live(a)[0] == 5
    assert rows(database_url, "SELECT generation, overrides FROM config_overrides") == [(2, {})]


def _set_at_once(go: threading.Barrier, errors: list[BaseException], svc: Service,
                 params: dict[str, Any], actor: str) -> None:
    try:
        go.wait(5)
        mi(svc, "acm_set", {**params, "actor": actor})
    except BaseException as e:
        errors.append(e)


@pytest.mark.parametrize("where", ["postgres", "store"])
def test_two_control_planes_hammering_the_overrides_lose_no_update(
        where: str, store_url: str, database_url: str) -> None:
    """The same race as above, 2 x 40 times: two nodes' control planes, each changing its own
    setting, at once; every change must survive in the overrides and the live config."""
    env = {"ACM_STORE_URL": store_url, "ACM_DEPLOYMENT": DEPLOYMENT,
           "DATABASE_URL": database_url if where == "postgres" else ""}
    planes = [Control(settings_mod.load(None, env=env)) for _ in range(2)]
    n = 40
    go = threading.Barrier(2)
    errors: list[BaseException] = []
    lost = {"threshold": 0, "block_ttl": 0}

    def hammer(c: Control, name: str, first: int) -> None:
        try:
            go.wait(5)
            for i in range(n):
                c.invoke(Caller(name, "test", "admin"), "acm_set", {name: first + i})
                # What was acknowledged stays: the other plane's change of another setting,
                # based on an older read, must not have put the old value back.
                lost[name] += c.live.saved_overrides()[name] != first + i
        except BaseException as e:
            errors.append(e)
    try:
        assert planes[0].repo.name == where
        ts = [threading.Thread(target=hammer, args=(planes[0], "threshold", 10)),
              threading.Thread(target=hammer, args=(planes[1], "block_ttl", 100))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors
        assert lost == {"threshold": 0, "block_ttl": 0}
        final = {"threshold": 10 + n - 1, "block_ttl": 100.0 + n - 1}
        for c in planes:
            cfg = c.live.acm_get_config(Caller("t", "test"))
            assert cfg["overrides"] == final and cfg["overrides_generation"] == 2 * n
            assert {k: cfg["live"][k] for k in final} == final
        assert len(planes[0].repo.audit_list(limit=1000, action="acm_set")) == 2 * n
    finally:
        for c in planes:
            c.close()


def test_repository_compare_and_set(database_url: str) -> None:
    repo = PostgresControlRepository(SimpleNamespace(database_url=database_url))
    try:
        assert repo.overrides_get("x") == (0, {})
        assert repo.overrides_put("x", 0, {"threshold": 3}, "alice") == 1
        assert repo.overrides_put("x", 0, {"threshold": 4}, "bob") == -1  # inserted first
        assert repo.overrides_put("x", 2, {"threshold": 4}, "bob") == -1
        assert repo.overrides_put("x", 1, {"threshold": 4, "mode": "off"}, "bob") == 2
        assert repo.overrides_get("x") == (2, {"threshold": 4, "mode": "off"})
        assert repo.overrides_get("y") == (0, {})  # deployments are apart
    finally:
        repo.close()
