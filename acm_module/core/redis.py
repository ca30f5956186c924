"""redis-py clients for everything off the decision path: a store URL in, a client out.

The worker's pipelined batch keeps its own client (decide/store); the control plane, the writer,
metrics, actions, replay and the web API use redis-py, whose cluster client routes by slot, follows
MOVED/ASK and refreshes its map on its own. `open_redis` reads the same URLs as the worker
(seeds, `rediss://`, ACL users, `unix://`) and detects a cluster the same way: CLUSTER SHARDS or
CLUSTER SLOTS answering on the first seed that answers.

Its errors are the project's: a failing or unreachable store raises StoreError, an error reply
StoreReplyError, as the worker's client does, so every caller keeps one `except StoreError`
(and redacted URLs). They are redis-py's exceptions too, for code written against redis-py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeAlias

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from acm_module.core.errors import ConfigError, StoreError, StoreReplyError
from acm_module.core.storeurl import StoreAddress, parse_seeds, safe_url

Client: TypeAlias = "redis.Redis | RedisCluster"


class StoreReplyRedisError(StoreReplyError, redis.ResponseError):
    """An error reply, as StoreReplyError and as redis-py's ResponseError."""


class StoreTimeoutError(StoreError, redis.TimeoutError):
    """A store slower than the client's timeout, as StoreError and as redis-py's."""


class StoreDownError(StoreError, redis.ConnectionError):
    """A store unreachable or failing, as StoreError and as redis-py's ConnectionError."""


# redis-py's errors, and the one its cluster client raises when no node answers (a plain
# Exception, not a RedisError).
ERRORS = (redis.RedisError, RedisClusterException)


def store_error(e: Exception, url: str) -> StoreError:
    """Return redis-py's error as the project's (the URL in the message without password)."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, redis.ResponseError):
        return StoreReplyRedisError(str(e))
    if isinstance(e, redis.TimeoutError):
        return StoreTimeoutError(f"store {safe_url(url)}: {e}")
    return StoreDownError(f"store {safe_url(url)}: {e}")


class _Pipeline:
    """A redis-py pipeline whose errors are StoreError (see store_error)."""

    def __init__(self, pipe: Any, url: str) -> None:
        self._pipe = pipe
        self._url = url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __len__(self) -> int:
        return len(self._pipe)

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pipe.reset()

    def execute(self, raise_on_error: bool = True) -> list:
        """Run the queued commands; error replies come back as StoreReplyError when not raised."""
        try:
            out = self._pipe.execute(raise_on_error=raise_on_error)
        except ERRORS as e:
            raise store_error(e, self._url) from e
        return [store_error(r, self._url) if isinstance(r, ERRORS) else r for r in out]


class _StoreErrors:
    """Mixin of the clients open_redis returns: redis-py's errors raised as StoreError."""

    acm_url = ""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command (every redis-py method goes through here). Raises StoreError."""
        try:
            return super().execute_command(*args, **options)  # type: ignore[misc]
        except ERRORS as e:
            raise store_error(e, self.acm_url) from e

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        """Return redis-py's pipeline, whose execute() raises StoreError."""
        return _Pipeline(super().pipeline(*args, **kwargs), self.acm_url)  # type: ignore[misc]


class StoreRedis(_StoreErrors, redis.Redis):
    """redis-py's client for one standalone server, raising StoreError."""


class StoreRedisCluster(_StoreErrors, RedisCluster):
    """redis-py's cluster client, raising StoreError."""


# Error replies of a server that runs without cluster support (Redis, Valkey, Dragonfly).
_NOT_CLUSTER = ("disabled", "not enabled", "cluster mode", "cluster support", "unknown command")


def _options(a: StoreAddress, timeout: float, connect_timeout: float,
             decode_responses: bool, encoding_errors: str,
             socket_read_size: int) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "username": a.username, "password": a.password, "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout, "decode_responses": decode_responses,
        "encoding_errors": encoding_errors, "socket_read_size": socket_read_size,
        # No retry of a command on one server: a reconnect after the server closed an idle
        # connection is the pool's (it checks a connection before lending it), and a retry
        # would double the caller's timeout or run a write twice (the worker's client never
        # does either).
        "retry": Retry(NoBackoff(), 0),
        # RESP2, as the worker's client speaks: Redis before 6 has no HELLO, and replies are
        # parsed into the same shapes as StoreClient.execute_command's.
        "protocol": 2,
    }
    if a.tls:
        opts.update(ssl=True, ssl_cert_reqs="required" if a.tls_verify else "none",
                    ssl_ca_certs=a.ca_certs, ssl_check_hostname=a.tls_verify)
    return opts


def _is_cluster(r: redis.Redis) -> bool:
    # redis-py's own execute_command: its errors (a refused login) as redis-py raises them.
    try:
        redis.Redis.execute_command(r, "CLUSTER", "SHARDS")
        return True
    except redis.ResponseError as e:
        if any(m in str(e).lower() for m in _NOT_CLUSTER):
            return False
        # An older server: SLOTS answers, or raises.
        redis.Redis.execute_command(r, "CLUSTER", "SLOTS")
        return True


def open_redis(url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0,
               decode_responses: bool = False, encoding_errors: str = "strict",
               socket_read_size: int = 65536) -> Client:
    """Return a connected redis-py client for a store URL: RedisCluster for a cluster, else Redis.

    encoding_errors applies to decoded replies ("replace": a record with invalid UTF-8 still
    reads, for the writer to dead-letter it, instead of failing the whole reply).
    socket_read_size: bytes per read from the socket (the writer's replies are megabytes).

    Seeds are tried in order until one answers. Raises ConfigError when the store refuses the
    URL's credentials or database (no retry can fix that), StoreError when no seed answers.
    The client raises StoreError (StoreReplyError for an error reply) from then on.
    """
    seeds = parse_seeds(url)
    first = seeds[0]
    opts = _options(first, timeout, connect_timeout, decode_responses, encoding_errors,
                    socket_read_size)
    if first.unix:
        return _checked(_tagged(StoreRedis(unix_socket_path=first.path, db=first.db, **opts),
                                url), url)
    err: Exception | None = None
    for a in seeds:
        r = _tagged(StoreRedis(host=a.host, port=a.port, db=a.db, **opts), url)
        try:
            cluster = _is_cluster(r)
        except redis.AuthenticationError as e:
            r.close()
            raise ConfigError(f"store {safe_url(url)}: the store refused the login ({e})") from e
        except redis.ResponseError as e:
            r.close()
            if "WRONGPASS" in str(e) or "NOAUTH" in str(e) or "DB index" in str(e):
                raise ConfigError(f"store {safe_url(url)}: {e}") from e
            err = e
            continue
        except redis.RedisError as e:
            r.close()
            err = e
            continue
        if not cluster:
            return r
        r.close()
        # Across nodes a retry is what follows a failover: the map is read again in between.
        opts["retry"] = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), 3)
        try:
            return _tagged(StoreRedisCluster(
                startup_nodes=[ClusterNode(s.host, s.port) for s in seeds], **opts), url)
        except ERRORS as e:  # the nodes went down after the seed answered
            raise StoreError(f"cannot connect to store {safe_url(url)}: {e}") from e
    raise StoreError(f"cannot connect to store {safe_url(url)}: {err}")


def _tagged(r: Any, url: str) -> Any:
    r.acm_url = url
    return r


def _checked(r: redis.Redis, url: str) -> redis.Redis:
    try:
        redis.Redis.execute_command(r, "PING")
    except redis.AuthenticationError as e:
        r.close()
        raise ConfigError(f"store {safe_url(url)}: the store refused the login ({e})") from e
    except redis.RedisError as e:
        r.close()
        raise StoreError(f"cannot connect to store {safe_url(url)}: {e}") from e
    return r


class LazyRedis:
    """A store URL's client for a long-lived component: opened on first use, so the component
    starts while the store is down, and again after reset() (a failure closed it).

    It stands for the client: every other attribute is the current client's.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0,
                 **options: Any) -> None:
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.options = options  # more of open_redis's keywords (decode_responses, ...)
        self._client: Client | None = None

    def get(self) -> Client:
        """Return the client, opening it if needed. Raises StoreError.

        A refused login is a StoreError here too: a long-lived component retries it, as it did
        any store failure, while the store's users are fixed.
        """
        if self._client is None:
            try:
                self._client = open_redis(self.url, timeout=self.timeout,
                                          connect_timeout=self.connect_timeout, **self.options)
            except ConfigError as e:
                raise StoreError(str(e)) from e
        return self._client

    def reset(self) -> None:
        """Close the client (the next get() opens a new one, reading the cluster map again)."""
        c, self._client = self._client, None
        if c is not None:
            c.close()

    close = reset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


# A cluster cannot block on streams of several slots in one command: how long to wait between
# two non-blocking reads that found nothing. 50 ms, the writer's since it moved to redis-py: an
# idle reader costs the cluster one pipelined XREADGROUP per stream 20 times a second, and a
# record waits at most 50 ms longer than on a standalone store (the actions runner waited
# 100 ms; nothing measured needs it to poll less often).
CLUSTER_POLL_MS = 50


def read_groups(r: Client, group: str, consumer: str, ids: dict[str, str], count: int,
                block_ms: int | None = None, wait: Callable[[float], object] = time.sleep,
                raw: bool = False) -> list:
    """XREADGROUP of `count` entries per stream; return [[stream, entries], ...].

    Entries are redis-py's [(id, {field: value} or None)], or with raw the server's
    [[id, [field, value, ...] or None]], for a caller that parses megabytes in one pass.

    One command on one server (BLOCK block_ms when given). A cluster refuses one command over
    streams of several slots (CROSSSLOT), and blocking commands pipelined to one master would
    wait one after another: one XREADGROUP per stream without BLOCK, pipelined (one buffer per
    master), and when nothing came, wait(CLUSTER_POLL_MS) (at most block_ms) instead: pass an
    interruptible wait (threading.Event.wait) to stop sooner.
    Raises StoreError, StoreReplyError for an error reply.
    """
    # "XREADGROUP GROUP" as one command name: redis-py sends it as two words and, knowing no
    # reply callback by that name, hands back the raw reply.
    head = ("XREADGROUP GROUP",) if raw else ("XREADGROUP", "GROUP")
    head += (group, consumer, "COUNT", count)
    if not isinstance(r, RedisCluster):
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        return _streams(r.execute_command(*head, *block, "STREAMS", *ids, *ids.values()))
    pipe = r.pipeline(transaction=False)
    try:
        for s, i in ids.items():
            # The node by key: XREADGROUP's keys move, and redis-py would ask a server for
            # them (COMMAND GETKEYS), one more round trip per stream.
            pipe.execute_command(*head, "STREAMS", s, i, target_nodes=r.get_node_from_key(s))
    except ERRORS as e:  # a slot the client's map has no node for
        raise store_error(e, getattr(r, "acm_url", "")) from e
    out = [x for reply in pipe.execute() for x in _streams(reply)]
    if not out and block_ms:
        wait(min(block_ms, CLUSTER_POLL_MS) / 1000.0)
    return out


def _streams(reply: Any) -> list:
    # RESP3 answers a map of streams, RESP2 a list of pairs, or nothing.
    return list(reply.items()) if isinstance(reply, dict) else reply or []
