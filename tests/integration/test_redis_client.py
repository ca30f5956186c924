"""open_redis: the redis-py client everything off the decision path uses, from the same URLs."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster as RedisPyCluster

from acm_module.core.errors import ConfigError, StoreError, StoreReplyError
from acm_module.core.redis import CLUSTER_POLL_MS, open_redis, read_groups
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


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_read_groups_reads_every_partition_parsed_or_raw(kind: str,
                                                         request: pytest.FixtureRequest) -> None:
    """The writer (raw replies) and the actions runner (redis-py's) read a group over the 16
    partition streams through read_groups: the same entries either way, an error reply as
    StoreReplyError, and on a cluster an empty read waits one poll through the given wait."""
    if kind == "cluster":
        url = request.getfixturevalue("empty_cluster").seeds_url
    else:
        url = request.getfixturevalue("store_url")
    r = open_redis(url, timeout=2.0)
    streams = [f"{{acm.{p}}}:s" for p in range(16)]
    try:
        ids = {}
        for s in streams:
            r.xgroup_create(s, "g", "0", mkstream=True)
            ids[s] = r.xadd(s, {"k": "d", "p": s}).decode()
        waits: list[float] = []
        parsed = read_groups(r, "g", "c", {s: ">" for s in streams}, 10, 1000, waits.append)
        assert sorted((s.decode(), [(i.decode(), f) for i, f in e]) for s, e in parsed) == \
            [(s, [(ids[s], {b"k": b"d", b"p": s.encode()})]) for s in sorted(streams)]
        raw = read_groups(r, "g", "c", {s: "0" for s in streams}, 10, raw=True)
        assert sorted((s.decode(), [(i.decode(), f) for i, f in e]) for s, e in raw) == \
            [(s, [(ids[s], [b"k", b"d", b"p", s.encode()])]) for s in sorted(streams)]
        assert waits == []
        # Nothing new: one server blocks 100 ms, a cluster waits one poll instead.
        assert read_groups(r, "g", "c", {s: ">" for s in streams}, 10, 100, waits.append,
                           raw=True) == []
        assert waits == ([CLUSTER_POLL_MS / 1000.0] if kind == "cluster" else [])
        for raw_reply in (False, True):
            with pytest.raises(StoreReplyError, match="NOGROUP"):
                read_groups(r, "nobody", "c", {s: ">" for s in streams}, 10, raw=raw_reply)
    finally:
        r.close()  # the fixture empties the store
