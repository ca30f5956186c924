"""open_redis: the redis-py client everything off the decision path uses, from the same URLs."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster as RedisPyCluster

from acm_module.core.errors import ConfigError, StoreError, StoreReplyError
from acm_module.core.redis import open_redis
from tests.support.servers import RedisCluster, RedisServer, free_port

pytestmark = pytest.mark.timeout(60)


def test_a_standalone_store_gets_a_plain_client(redis_server: str) -> None:
    r = open_redis(redis_server, timeout=2.0)
    try:
        assert isinstance(r, redis.Redis) and not isinstance(r, RedisPyCluster)
        r.set("{acm.t}:x", b"1")
        assert r.get("{acm.t}:x") == b"1"
    finally:
        r.delete("{acm.t}:x")
        r.close()


def test_the_first_seed_down_the_second_answers(redis_server: str) -> None:
    dead = free_port()
    seeds = redis_server.replace("redis://", f"redis://127.0.0.1:{dead},", 1)
    r = open_redis(seeds, timeout=2.0, connect_timeout=0.5)
    try:
        assert r.ping()
    finally:
        r.close()


def test_no_seed_answers_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        open_redis(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)


def test_a_wrong_password_is_a_config_error_without_the_password() -> None:
    srv = RedisServer(password="right-one").start()
    try:
        with pytest.raises(ConfigError) as e:
            open_redis(f"redis://:wrong-one@127.0.0.1:{srv.port}/0", timeout=2.0)
        assert "wrong-one" not in str(e.value)
        r = open_redis(srv.url, timeout=2.0)
        assert r.ping()
        r.close()
    finally:
        srv.cleanup()


def test_any_node_of_a_cluster_gives_a_cluster_client(cluster: RedisCluster) -> None:
    r = open_redis(cluster.url(len(cluster.ports) - 1), timeout=2.0)
    try:
        assert isinstance(r, RedisPyCluster)
        # Keys of every partition land on the master owning their slot, wherever the seed was.
        for p in range(16):
            r.set("{acm.%d}:probe" % p, str(p))
        assert [r.get("{acm.%d}:probe" % p) for p in range(16)] == \
            [str(p).encode() for p in range(16)]
        owners = {r.get_node_from_key("{acm.%d}:probe" % p).port for p in range(16)}
        assert len(owners) > 1
    finally:
        for p in range(16):
            r.delete("{acm.%d}:probe" % p)
        r.close()


def test_store_failures_are_store_errors_without_the_password() -> None:
    """Callers keep one `except StoreError`: an error reply is a StoreReplyError (raised, or in
    a pipeline's results), a store that went away a StoreError naming the URL without its
    password; both are redis-py's errors too."""
    srv = RedisServer(password="pw-secret-1").start()
    try:
        r = open_redis(srv.url, timeout=1.0, connect_timeout=0.5)
        r.set("{acm.t}:s", "x")
        with pytest.raises(StoreReplyError, match="WRONGTYPE") as reply:
            r.hget("{acm.t}:s", "f")
        assert isinstance(reply.value, redis.ResponseError)
        pipe = r.pipeline(transaction=False)
        pipe.get("{acm.t}:s")
        pipe.hget("{acm.t}:s", "f")
        ok, err = pipe.execute(raise_on_error=False)
        assert ok == b"x" and isinstance(err, StoreReplyError)
        srv.stop()
        with pytest.raises(StoreError) as down:
            r.get("{acm.t}:s")
        assert isinstance(down.value, redis.ConnectionError)
        assert "pw-secret-1" not in str(down.value) and f":{srv.port}" in str(down.value)
        r.close()
    finally:
        srv.cleanup()
