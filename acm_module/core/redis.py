"""redis-py clients for everything off the decision path: a store URL in, a client out.

The worker's pipelined batch keeps its own client (decide/store); the control plane, the writer,
metrics, actions, replay and the web API use redis-py, whose cluster client routes by slot, follows
MOVED/ASK and refreshes its map on its own. `open_redis` reads the same URLs as the worker
(seeds, `rediss://`, ACL users, `unix://`) and detects a cluster the same way: CLUSTER SHARDS or
CLUSTER SLOTS answering on the first seed that answers.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis
from redis.cluster import ClusterNode, RedisCluster

from acm_module.core.errors import ConfigError, StoreError
from acm_module.core.storeurl import StoreAddress, parse_seeds, safe_url

Client: TypeAlias = "redis.Redis | RedisCluster"

# Error replies of a server that runs without cluster support (Redis, Valkey, Dragonfly).
_NOT_CLUSTER = ("disabled", "not enabled", "cluster mode", "cluster support", "unknown command")


def _options(a: StoreAddress, timeout: float, connect_timeout: float,
             decode_responses: bool, encoding_errors: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "username": a.username, "password": a.password, "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout, "decode_responses": decode_responses,
        "encoding_errors": encoding_errors,
    }
    if a.tls:
        opts.update(ssl=True, ssl_cert_reqs="required" if a.tls_verify else "none",
                    ssl_ca_certs=a.ca_certs, ssl_check_hostname=a.tls_verify)
    return opts


def _is_cluster(r: redis.Redis) -> bool:
    try:
        r.execute_command("CLUSTER", "SHARDS")
        return True
    except redis.ResponseError as e:
        if any(m in str(e).lower() for m in _NOT_CLUSTER):
            return False
        r.execute_command("CLUSTER", "SLOTS")  # an older server: SLOTS answers, or raises
        return True


def open_redis(url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0,
               decode_responses: bool = False, encoding_errors: str = "strict") -> Client:
    """Return a connected redis-py client for a store URL: RedisCluster for a cluster, else Redis.

    encoding_errors applies to decoded replies ("replace": a record with invalid UTF-8 still
    reads, for the writer to dead-letter it, instead of failing the whole reply).

    Seeds are tried in order until one answers. Raises ConfigError when the store refuses the
    URL's credentials or database (no retry can fix that), StoreError when no seed answers.
    """
    seeds = parse_seeds(url)
    first = seeds[0]
    opts = _options(first, timeout, connect_timeout, decode_responses, encoding_errors)
    if first.unix:
        return _checked(redis.Redis(unix_socket_path=first.path, db=first.db, **opts), url)
    err: Exception | None = None
    for a in seeds:
        r = redis.Redis(host=a.host, port=a.port, db=a.db, **opts)
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
        return RedisCluster(startup_nodes=[ClusterNode(s.host, s.port) for s in seeds],
                            **opts)
    raise StoreError(f"cannot connect to store {safe_url(url)}: {err}")


def _checked(r: redis.Redis, url: str) -> redis.Redis:
    try:
        r.ping()
    except redis.AuthenticationError as e:
        r.close()
        raise ConfigError(f"store {safe_url(url)}: the store refused the login ({e})") from e
    except redis.RedisError as e:
        r.close()
        raise StoreError(f"cannot connect to store {safe_url(url)}: {e}") from e
    return r
