"""Shared fixtures: a real Redis-protocol server, the service, clients that are always closed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import zmq

from acm_module.decide.client import Client
from acm_module.decide.engine import IMPLEMENTATION
from acm_module.decide.store.cluster import StoreClient
from tests.support.servers import (
    RedisCluster,
    RedisServer,
    Service,
    flush,
    redis_url_from_env,
)

# PostgreSQL, QuestDB, chdb and `acm writer`, used by persist/, actions/, control/ and web/.
pytest_plugins = ["tests.support.writer_fixtures"]

def pytest_report_header(config: pytest.Config) -> str:
    return f"acm hot path: {IMPLEMENTATION} (ACM_PUREPYTHON={os.environ.get('ACM_PUREPYTHON', '')})"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of the suite's Redis-protocol server (given by ACM_TEST_REDIS_URL or started here)."""
    url = redis_url_from_env()
    if url:
        yield url
        return
    srv = RedisServer().start()
    try:
        yield srv.url
    finally:
        srv.cleanup()


@pytest.fixture
def store_url(redis_server: str) -> Iterator[str]:
    """The store URL with an empty database, emptied again afterwards."""
    flush(redis_server)
    yield redis_server
    flush(redis_server)


@pytest.fixture
def store(store_url: str) -> Iterator[StoreClient]:
    """A connection to the (empty) store, as acm opens one (StoreClient)."""
    c = StoreClient(store_url, timeout=2.0)
    c.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """`acm serve` processes a test starts (it appends them); every one stopped at teardown."""
    started: list[Service] = []
    yield started
    for svc in started:
        svc.cleanup()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A ZeroMQ context whose sockets are all closed with linger=0 at teardown."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def module_redis() -> Iterator[str]:
    """A redis-server of the module's own (for tests that stop/restart or share a service)."""
    srv = RedisServer().start()
    try:
        yield srv.url
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def service(module_redis: str) -> Iterator[Service]:
    """`acm serve` with 2 workers against the module's redis; shared by a test module."""
    svc = Service(module_redis, workers=2)
    try:
        svc.start()
        yield svc
    finally:
        svc.cleanup()


@pytest.fixture
def client(service: Service, zctx: zmq.Context) -> Iterator[Client]:
    """A client of the shared service; the store is emptied first."""
    flush(service.store_url)
    c = Client(service.endpoint, timeout=10.0, context=zctx)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def service_factory(store_url: str, zctx: zmq.Context):
    """Start a dedicated `acm serve` (with extra env) and a client; both stopped afterwards."""
    import contextlib

    @contextlib.contextmanager
    def start(env: dict[str, str] | None = None, workers: int = 2, args: list[str] | None = None):
        svc = Service(store_url, workers=workers, extra_env=env, args=args)
        c = None
        try:
            svc.start()
            c = Client(svc.endpoint, timeout=10.0, context=zctx)
            yield svc, c
        finally:
            if c is not None:
                c.close()
            svc.cleanup()

    return start


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters and 3 replicas, stopped after the session."""
    c = RedisCluster(masters=3, replicas=1).start()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def empty_cluster(cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The session's cluster, whole again and with every master emptied, before and after."""
    def flush() -> None:
        cluster.restore()  # nodes a test stopped rejoin (as replicas)
        s = StoreClient(cluster.seeds_url, timeout=5.0)
        try:
            s.connect()
            s.on_each_master("FLUSHALL")
        finally:
            s.close()
    flush()
    yield cluster
    flush()
