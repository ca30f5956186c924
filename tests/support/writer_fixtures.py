"""Fixtures of the writer's databases, for every directory (a plugin tests/conftest.py loads):
PostgreSQL and QuestDB (one each per session, reused by URL if given), a fresh database / empty
tables / chdb directory per test, and `acm writer` run as a real subprocess that tests may SIGTERM
or SIGKILL.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from acm_module.write.migrate import migrate
from acm_module.write.questdb import QuestDB
from tests.support.pgqdb import PostgresServer, QuestDBServer, WriterProcess

_dbs = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | str]:
    """A PostgreSQL server URL (ACM_TEST_DATABASE_URL) or a temporary cluster."""
    url = os.environ.get("ACM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    srv = PostgresServer().init()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


def _pg_url(pg: PostgresServer | str) -> str:
    return pg if isinstance(pg, str) else pg.url


@pytest.fixture
def database_url(pg_server: PostgresServer | str) -> Iterator[str]:
    """A fresh, migrated database; dropped afterwards."""
    admin = _pg_url(pg_server)
    name = f"acm_test_{os.getpid()}_{next(_dbs)}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = admin.rsplit("/", 1)[0] + "/" + name
    migrate(url)
    try:
        yield url
    finally:
        if isinstance(pg_server, PostgresServer) and not (
                pg_server.data / "postmaster.pid").exists():
            pg_server.start()  # a test stopped it
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def questdb_server() -> Iterator[QuestDBServer | str]:
    """A QuestDB URL (ACM_TEST_QUESTDB_URL) or a temporary server started once per session."""
    url = os.environ.get("ACM_TEST_QUESTDB_URL")
    if url:
        yield url
        return
    srv = QuestDBServer().start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def questdb_url(questdb_server: QuestDBServer | str) -> Iterator[str]:
    """The QuestDB URL with the acm tables dropped before and after the test."""
    srv = questdb_server
    url = srv if isinstance(srv, str) else srv.url
    q = QuestDB(url)

    def drop() -> None:
        for t in ("call_events", "detection_metrics"):
            q.exec(f"DROP TABLE IF EXISTS {t}")

    drop()
    try:
        yield url
    finally:
        if isinstance(srv, QuestDBServer) and srv.proc is None:
            srv.start()  # a test stopped it
        drop()


@pytest.fixture
def chdb_path(tmp_path: Path) -> str:
    """A fresh data directory for the embedded ClickHouse."""
    return str(tmp_path / "chdb")


@pytest.fixture
def writer_factory(store_url: str) -> Iterator[Callable[..., WriterProcess]]:
    """Start `acm writer` processes; every one is stopped at teardown."""
    started: list[WriterProcess] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None
              ) -> WriterProcess:
        w = WriterProcess(store_url, env or {}, args or []).start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL if w.alive() else signal.SIGTERM, timeout=10)


