"""The whitelist: PostgreSQL/YugabyteDB is the source of truth, the store holds the markers the
decision script reads. Without LISTEN/NOTIFY (YSQL lacks it), a periodic reconcile keeps the
markers equal to the table; `add`/`remove` also apply a change to the store at once, so an
operator does not wait for the next reconcile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from acm_module.core import liveconfig as store_config
from acm_module.core import numbers
from acm_module.core.redis import open_redis

log = logging.getLogger("acm.whitelist")

MARKER_PATTERN = "{acm.*}:wl:*"

_ACTIVE = """
SELECT b_number, reason, expires_at,
       CAST(EXTRACT(EPOCH FROM (expires_at - NOW())) * 1000 AS BIGINT) AS ttl_ms
FROM whitelist WHERE expires_at IS NULL OR expires_at > NOW()
"""


@dataclass(frozen=True)
class SyncResult:
    """What one reconcile changed in the store."""

    active: int
    set: int
    removed: int
    invalid: int


def _markers(store: store_config.Store) -> dict[str, str]:
    """Return {store key: reason} of every whitelist marker in the store."""
    out: dict[str, str] = {}
    found = list(store.scan_iter(match=MARKER_PATTERN, count=1000))  # every master's
    for i in range(0, len(found), 1000):
        chunk = found[i:i + 1000]
        # One pipelined GET per key: MGET across hash tags is cross-slot on a cluster.
        pipe = store.pipeline(transaction=False)
        for k in chunk:
            pipe.execute_command("GET", k)
        for k, v in zip(chunk, pipe.execute(), strict=True):
            if isinstance(v, bytes):
                out[k.decode()] = v.decode(errors="replace")
    return out


def reconcile(db: psycopg.Connection, store: store_config.Store, partitions: int,
              country_code: str = "234") -> SyncResult:
    """Make the store's whitelist markers equal the whitelist table's active rows.

    Raises psycopg.Error or StoreError; a failed reconcile changes nothing it did not finish
    and the next one starts over.
    """
    with db.cursor() as cur:
        cur.execute(_ACTIVE)
        rows = cur.fetchall()
    db.commit()
    want: dict[str, tuple[str, int | None]] = {}
    invalid = 0
    for b, reason, _expires, ttl_ms in rows:
        n = numbers.normalise(b, country_code)
        if n is None:
            invalid += 1
            log.warning("whitelist: %r is not a valid B-number; not loaded", b)
            continue
        if ttl_ms is not None and ttl_ms <= 0:
            continue
        want[store_config.whitelist_key(n, partitions)] = (reason or "-", ttl_ms)
    have = _markers(store)
    changed = 0
    pipe = store.pipeline(transaction=False)
    for key, (reason, ttl_ms) in want.items():
        if have.get(key) == reason and ttl_ms is None:
            continue
        # A TTL is refreshed every time: the table's expiry may have moved.
        if ttl_ms:
            pipe.execute_command("SET", key, reason, "PX", int(ttl_ms))
        else:
            pipe.execute_command("SET", key, reason)
        if have.get(key) != reason:
            changed += 1
    stale = [k for k in have if k not in want]
    for k in stale:
        pipe.execute_command("DEL", k)
    pipe.execute()
    if changed or stale:
        log.info("whitelist: %d active, %d markers set, %d removed", len(want), changed,
                 len(stale))
    return SyncResult(active=len(want), set=changed, removed=len(stale), invalid=invalid)


def audit(db: psycopg.Connection, actor: str, action: str, target: str,
          old: Any = None, new: Any = None, outcome: str = "ok", details: str = "") -> None:
    """Append one row to audit_log (in the caller's transaction)."""
    with db.cursor() as cur:
        cur.execute("INSERT INTO audit_log (actor, action, target, old, new, outcome, details) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (actor, action, target, None if old is None else Jsonb(old),
                     None if new is None else Jsonb(new), outcome, details))


def add(db: psycopg.Connection, store: store_config.Store | None, b_number: str, reason: str,
        created_by: str, expires_at: datetime | None = None, partitions: int = 16,
        country_code: str = "234") -> str:
    """Whitelist a B-number: table row + audit row in one transaction, then the store marker.

    Returns the normalised number. Raises ValueError for an invalid number, psycopg.Error.
    """
    n = numbers.normalise(b_number, country_code)
    if n is None:
        raise ValueError(f"not a valid B-number: {b_number!r}")
    with db.transaction(), db.cursor() as cur:
        cur.execute("SELECT reason, expires_at FROM whitelist WHERE b_number = %s", (n,))
        old = cur.fetchone()
        cur.execute(
            "INSERT INTO whitelist (b_number, reason, created_by, expires_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (b_number) DO UPDATE SET "
            "reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at",
            (n, reason, created_by, expires_at))
        audit(db, created_by, "whitelist.add", n,
              None if old is None else {"reason": old[0], "expires_at": _iso(old[1])},
              {"reason": reason, "expires_at": _iso(expires_at)})
    if store is not None:
        ttl = None
        if expires_at is not None:
            ttl = int((expires_at.timestamp() - time.time()) * 1000)
            if ttl <= 0:
                return n
        store_config.whitelist_set(store, n, partitions, reason, ttl)
    return n


def remove(db: psycopg.Connection, store: store_config.Store | None, b_number: str, actor: str,
           partitions: int = 16, country_code: str = "234") -> bool:
    """Remove a B-number from the whitelist (table, audit, store); return whether it was there."""
    n = numbers.normalise(b_number, country_code) or b_number
    with db.transaction(), db.cursor() as cur:
        cur.execute("DELETE FROM whitelist WHERE b_number = %s RETURNING reason", (n,))
        row = cur.fetchone()
        audit(db, actor, "whitelist.remove", n, None if row is None else {"reason": row[0]},
              None, "ok" if row else "not_found")
    if store is not None:
        store_config.whitelist_del(store, n, partitions)
    return row is not None


def _iso(d: datetime | None) -> str | None:
    return None if d is None else d.isoformat()


def writer_jobs(v: dict[str, Any]) -> list[tuple[float, Any]]:
    """Return the writer's periodic whitelist reconciliation, when the settings ask for it."""
    if v["database_url"] and v["whitelist_sync_interval"] > 0:
        return [(v["whitelist_sync_interval"], _syncer(v))]
    return []


def _syncer(v: dict[str, Any]) -> Any:
    state: dict[str, Any] = {}

    def whitelist_sync_tick() -> None:
        try:
            if state.get("db") is None or state["db"].closed:
                state["db"] = psycopg.connect(v["database_url"], connect_timeout=5)
            if state.get("store") is None:
                state["store"] = open_redis(v["store"], timeout=5.0)
            reconcile(state["db"], state["store"], v["partitions"], v["default_country_code"])
        except Exception:
            for k in ("db", "store"):
                if state.get(k) is not None:
                    state[k].close()
                    state[k] = None
            raise

    return whitelist_sync_tick
