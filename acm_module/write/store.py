"""The writer's store client: redis-py (replies parsed by hiredis) through core.redis.open_redis.

One client per thread, opened on first use and reopened after a failure, so a failover or a
store restart is one retried step. redis-py's errors leave as acm's: StoreReplyError for an
error reply, StoreError for everything else (a broken or slow link, a cluster in the middle of
a failover), which the writer's backoff and logs already handle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError

from acm_module.core.errors import ConfigError, StoreError, StoreReplyError
from acm_module.core.redis import Client, open_redis
from acm_module.core.storeurl import safe_url

# Error replies about where a slot lives or whether the cluster serves it: the client's map is
# stale (a failover, a resharding), so the next attempt starts from a fresh one.
_MAP_ERRORS = (ClusterError, AskError, TryAgainError)


class StreamStore:
    """A lazily (re)opened redis-py client whose errors are raised as StoreError."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Client | None = None

    def safe_url(self) -> str:
        """Return the URL without its password, for logs."""
        return safe_url(self.url)

    @property
    def client(self) -> Client:
        """Return the client, connecting first if needed. Raises StoreError."""
        if self._client is None:
            with self.errors():
                # str replies (hiredis decodes in C); a record with invalid UTF-8 still reads,
                # to be dead-lettered, instead of failing its whole batch for ever.
                self._client = open_redis(self.url, timeout=self.timeout,
                                          decode_responses=True, encoding_errors="replace")
        return self._client

    @property
    def cluster(self) -> bool:
        """Say whether the store is a cluster (connects first)."""
        return isinstance(self.client, RedisCluster)

    def close(self) -> None:
        """Drop the client (and its connections); the next use reconnects."""
        c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except Exception:  # closing must not raise
                pass

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Raise redis-py's errors inside the block as StoreReplyError / StoreError."""
        try:
            yield
        except StoreError:
            raise
        except redis.ResponseError as e:
            if isinstance(e, _MAP_ERRORS):
                self.close()
                raise StoreError(f"store {self.safe_url()}: {e}") from e
            raise StoreReplyError(str(e)) from e
        except (redis.RedisError, RedisClusterException) as e:
            self.close()
            raise StoreError(f"store {self.safe_url()}: {e}") from e
        except ConfigError as e:  # refused credentials: retried with a backoff, as a link error
            raise StoreError(str(e)) from e

    def call(self, *args: Any, **options: Any) -> Any:
        """Run one command (redis-py's reply parsing). Raises StoreError/StoreReplyError."""
        with self.errors():
            return self.client.execute_command(*args, **options)

    def pipeline(self, cmds: Sequence[tuple[Any, ...]], route: Sequence[str] | None = None
                 ) -> list[Any]:
        """Run commands pipelined without a transaction; return their replies, an error reply
        as its StoreReplyError. On a cluster the commands go in one buffer per master (route[i],
        when given, is the key of cmds[i], for commands redis-py cannot find the key of without
        asking the server). Raises StoreError when the store cannot be reached."""
        if not cmds:
            return []
        with self.errors():
            c = self.client
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
            if isinstance(r, redis.ResponseError) and not isinstance(r, _MAP_ERRORS):
                out.append(StoreReplyError(str(r)))
            elif isinstance(r, BaseException):
                self.close()
                raise StoreError(f"store {self.safe_url()}: {r}") from r
            else:
                out.append(r)
        return out
