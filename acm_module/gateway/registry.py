"""The carrier registry as the hot path sees it: one JSON document in the store.

The control plane owns the system of record (YugabyteDB) and publishes the whole registry here
on every change; workers poll `ver` with the live config and reload `doc` when it moves.
"""

from __future__ import annotations

import json
from typing import Any

from acm_module.store.conn import StoreConnection

REGISTRY_KEY = "{acm.cfg}:gw"

EMPTY: dict[str, list[Any]] = {"carriers": [], "gateways": [], "routes": []}

# Replace the document and bump the version in one atomic step.
_PUBLISH = """
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('HSET', KEYS[1], 'doc', ARGV[1])
return ver
"""


def publish(conn: StoreConnection, doc: dict[str, Any]) -> int:
    """Publish a (validated) registry document; return its new version."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return int(conn.call("EVAL", _PUBLISH, 1, REGISTRY_KEY, body))  # type: ignore[arg-type]


def read(conn: StoreConnection) -> tuple[int, dict[str, Any]]:
    """Return (version, document); (0, EMPTY) when nothing was ever published."""
    r = conn.call("HMGET", REGISTRY_KEY, "ver", "doc")
    assert isinstance(r, list)
    if r[0] is None or r[1] is None:
        return 0, {k: [] for k in EMPTY}
    return int(r[0]), json.loads(r[1])


def version(conn: StoreConnection) -> int:
    """Return the published version (0 when none)."""
    r = conn.call("HGET", REGISTRY_KEY, "ver")
    return 0 if r is None else int(r)  # type: ignore[arg-type]
