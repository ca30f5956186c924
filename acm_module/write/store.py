"""The writer's store client: core.redis's LazyRedis (redis-py, replies parsed by hiredis).

One client per thread, opened on first use and reopened after a failure that may mean a stale
cluster map, so a failover or a store restart is one retried step. Errors are acm's:
StoreReplyError for an error reply, StoreError for everything else (a broken or slow link, a
cluster in the middle of a failover), which the writer's backoff and logs already handle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError

from acm_module.core.errors import StoreError, StoreReplyError
from acm_module.core.redis import Client, LazyRedis
from acm_module.core.storeurl import safe_url

# Error replies about where a slot lives or whether the cluster serves it: the client's map is
# stale (a failover, a resharding), so the next attempt starts from a fresh one.
_MAP_ERRORS = (ClusterError, AskError, TryAgainError)


class StreamStore(LazyRedis):
    """The writer's lazily (re)opened client: str replies, raising StoreError."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        # str replies (hiredis decodes in C); a record with invalid UTF-8 still reads, to be
        # dead-lettered, instead of failing its whole batch for ever.
        # Reads of 1 MiB: a batch's XREADGROUP reply is megabytes (redis-py reads 64 KiB).
        super().__init__(url, timeout=timeout, decode_responses=True, encoding_errors="replace",
                         socket_read_size=1 << 20)

    @property
    def client(self) -> Client:
        """Return the client, connecting first if needed. Raises StoreError."""
        return self.get()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Raise every store failure inside the block as StoreReplyError / StoreError, and drop
        the client after one that may mean a stale cluster map."""
        try:
            yield
        except StoreReplyError as e:
            if isinstance(e.__cause__, _MAP_ERRORS):
                self.reset()
            raise
        except StoreError:
            self.reset()
            raise
        except redis.ResponseError as e:  # not through open_redis's client (none expected)
            raise StoreReplyError(str(e)) from e
        except (redis.RedisError, RedisClusterException) as e:
            self.reset()
            raise StoreError(f"store {safe_url(self.url)}: {e}") from e

    def call(self, *args: Any, **options: Any) -> Any:
        """Run one command (redis-py's reply parsing). Raises StoreError/StoreReplyError."""
        with self.errors():
            return self.get().execute_command(*args, **options)

    def pipeline(self, cmds: Sequence[tuple[Any, ...]],  # type: ignore[override]
                 route: Sequence[str] | None = None) -> list[Any]:
        """Run commands pipelined without a transaction; return their replies, an error reply
        as its StoreReplyError. On a cluster the commands go in one buffer per master (route[i],
        when given, is the key of cmds[i], for commands redis-py cannot find the key of without
        asking the server). Raises StoreError when the store cannot be reached."""
        if not cmds:
            return []
        with self.errors():
            c = self.get()
            p = c.pipeline(transaction=False)
            if route is not None and isinstance(c, RedisCluster):
                for args, key in zip(cmds, route, strict=True):
                    p.execute_command(*args, target_nodes=c.get_node_from_key(key))
            else:
                for args in cmds:
                    p.execute_command(*args)
            replies = p.execute(raise_on_error=False)
        out = []
        for r in replies:
            if isinstance(r, StoreReplyError) and not isinstance(r.__cause__, _MAP_ERRORS):
                out.append(r)
            elif isinstance(r, redis.ResponseError) and not isinstance(r, _MAP_ERRORS):
                out.append(StoreReplyError(str(r)))
            elif isinstance(r, BaseException):
                self.reset()
                raise StoreError(f"store {safe_url(self.url)}: {r}") from r
            else:
                out.append(r)
        return out
