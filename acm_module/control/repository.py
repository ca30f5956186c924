"""Where the control plane keeps its records: whitelist entries, the audit trail, alert listings,
the carrier registry, the deployment's runtime overrides.

`ControlRepository` is the seam. Two implementations:

- `StoreRepository` (here, always available): whitelist entries in HASH `{acm.ctl}:whitelist`,
  the audit trail in STREAM `{acm.ctl}:audit`, alerts read back from the newest alert records
  (`k=a`) of the partitions' durable streams, the carrier registry document in HASH
  `{acm.ctl}:registry`, the runtime overrides in STRING `{acm.cfg}:overrides` (the store is
  the deployment: its `deployment` argument is not used).
- A PostgreSQL one (tables whitelist / audit_log / fraud_alerts, carriers / carrier_gateways /
  carrier_routes, config_overrides: one row per deployment), provided by the persistence writer as
  `acm_module.control.pg_repository.PostgresControlRepository(settings)`; the control plane
  (`commands.base.open_repository`) uses it when `database_url` is set and that module imports.

The repository is the system of record only. The whitelist *markers* the decision script reads
(`{acm.<p>}:wl:<b>`) and the published registry (`{acm.cfg}:gw`) are desired state that the
control plane always writes to the store itself, whichever repository is in use.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from acm_module.control.audit import AuditRecord, iso_ms
from acm_module.core import keys, numbers, records
from acm_module.core.liveconfig import Store
from acm_module.core.types import SEVERITIES

WHITELIST_KEY = "{acm.ctl}:whitelist"
AUDIT_STREAM = "{acm.ctl}:audit"
REGISTRY_RECORD_KEY = "{acm.ctl}:registry"
OVERRIDES_KEY = "{acm.cfg}:overrides"
AUDIT_MAXLEN = 100_000
# Lifecycle changes (status, assignee) as they commit, for the consoles' live queues: a short
# notification stream (the audit trail and fraud_alerts keep the record), read by every web
# process's feed.
LIFECYCLE_STREAM = "{acm.ctl}:lifecycle"
LIFECYCLE_MAXLEN = 1000
LIFECYCLE_FIELDS = ("alert_id", "b_number", "severity", "status", "assigned_to")


@dataclass(frozen=True)
class WhitelistEntry:
    """One whitelisted B-number, as in the seed's `whitelist` table."""

    b_number: str  # E.164
    reason: str
    created_by: str
    created_at_ms: int
    expires_at_ms: int | None = None  # None: never expires

    def expired(self, now_ms: int) -> bool:
        return self.expires_at_ms is not None and self.expires_at_ms <= now_ms

    def to_json(self) -> dict[str, Any]:
        """Return the entry with ISO 8601 timestamps."""
        return {"b_number": self.b_number, "reason": self.reason, "created_by": self.created_by,
                "created_at": iso_ms(self.created_at_ms), "expires_at": iso_ms(self.expires_at_ms)}


@dataclass(frozen=True)
class AlertQuery:
    """Filters of acm_alert_list."""

    b_number: str | None = None
    min_severity: str | None = None  # LOW < HIGH < CRITICAL
    since_ms: int | None = None  # last detection at or after (call time)
    until_ms: int | None = None  # first detection at or before
    limit: int = 50
    scan: int = 5000  # stream records read per partition (store repository only)


@runtime_checkable
class ControlRepository(Protocol):
    """Records of the control plane. Implementations raise StoreError/OSError when unavailable."""

    name: str

    def whitelist_get(self, b_number: str) -> WhitelistEntry | None:
        """Return the entry of a B-number (expired ones included), or None."""

    def whitelist_put(self, entry: WhitelistEntry) -> WhitelistEntry | None:
        """Insert or replace an entry; return the one it replaced."""

    def whitelist_delete(self, b_number: str) -> WhitelistEntry | None:
        """Remove an entry; return it, or None if there was none."""

    def whitelist_list(self, *, b_number: str | None = None, limit: int = 100,
                       now_ms: int | None = None) -> list[WhitelistEntry]:
        """Return entries sorted by B-number, without those expired at now_ms (if given)."""

    def audit_append(self, rec: AuditRecord) -> str:
        """Store a change record; return its id."""

    def audit_list(self, *, limit: int = 50, since_ms: int | None = None,
                   action: str | None = None, target: str | None = None) -> list[AuditRecord]:
        """Return the newest change records first."""

    def alert_list(self, query: AlertQuery) -> list[dict[str, Any]]:
        """Return alerts newest first, each shaped like a fraud_alerts row (see _alert_view)."""

    def registry_get(self) -> dict[str, Any]:
        """Return the whole carrier registry document (empty lists when there is none)."""

    def registry_put(self, doc: dict[str, Any]) -> None:
        """Replace the whole registry document (validated by the caller) in one step."""

    def overrides_get(self, deployment: str) -> tuple[int, Any]:
        """Return (generation, values as stored) of a deployment's runtime overrides; (0, {})
        when none were ever written. The values are not validated (control.overrides does)."""

    def overrides_put(self, deployment: str, expected: int, values: dict[str, Any],
                      updated_by: str) -> int:
        """Replace the overrides if they are still at generation `expected`; return the new
        generation, or -1 when another change came first (read again, merge, retry)."""

    def close(self) -> None:
        """Release connections."""


class StoreRepository:
    """The repository on the Redis-protocol store; the caller serialises access to `conn`.

    `conn` is redis-py's client (core.redis.open_redis) or the worker's StoreClient: only their
    common interface is used (execute_command, pipeline).
    """

    name = "store"

    def __init__(self, conn: Store, partitions: int) -> None:
        self.conn = conn
        self.partitions = partitions

    # -- whitelist -------------------------------------------------------------------------
    def whitelist_get(self, b_number: str) -> WhitelistEntry | None:
        raw = self.conn.execute_command("HGET", WHITELIST_KEY, b_number)
        return _entry(b_number, raw) if raw is not None else None

    def whitelist_put(self, entry: WhitelistEntry) -> WhitelistEntry | None:
        old = self.whitelist_get(entry.b_number)
        self.conn.execute_command("HSET", WHITELIST_KEY, entry.b_number, json.dumps({
            "reason": entry.reason, "created_by": entry.created_by,
            "created_at": entry.created_at_ms, "expires_at": entry.expires_at_ms}))
        return old

    def whitelist_delete(self, b_number: str) -> WhitelistEntry | None:
        old = self.whitelist_get(b_number)
        if old is not None:
            self.conn.execute_command("HDEL", WHITELIST_KEY, b_number)
        return old

    def whitelist_list(self, *, b_number: str | None = None, limit: int = 100,
                       now_ms: int | None = None) -> list[WhitelistEntry]:
        if b_number is not None:
            e = self.whitelist_get(b_number)
            entries = [e] if e is not None else []
        else:
            raw = self.conn.execute_command("HGETALL", WHITELIST_KEY)
            entries = [_entry(b.decode(), v) for b, v in raw.items()]
        if now_ms is not None:
            expired = [e.b_number for e in entries if e.expired(now_ms)]
            if expired:  # the markers expired by TTL already; drop the records too
                self.conn.execute_command("HDEL", WHITELIST_KEY, *expired)
            entries = [e for e in entries if not e.expired(now_ms)]
        return sorted(entries, key=lambda e: e.b_number)[:limit]

    # -- audit -----------------------------------------------------------------------------
    def audit_append(self, rec: AuditRecord) -> str:
        rid = self.conn.execute_command(
            "XADD", AUDIT_STREAM, "MAXLEN", "~", AUDIT_MAXLEN, "*",
            "ts", rec.ts_ms, "actor", rec.actor, "via", rec.via, "action", rec.action,
            "target", rec.target, "old", json.dumps(rec.old, default=str),
            "new", json.dumps(rec.new, default=str))
        assert isinstance(rid, bytes)
        return rid.decode()

    def audit_list(self, *, limit: int = 50, since_ms: int | None = None,
                   action: str | None = None, target: str | None = None) -> list[AuditRecord]:
        start = f"{since_ms}-0" if since_ms is not None else "-"
        filtered = action is not None or target is not None
        raw = self.conn.execute_command("XREVRANGE", AUDIT_STREAM, "+", start, "COUNT",
                                        10_000 if filtered else limit)
        assert isinstance(raw, list)
        out: list[AuditRecord] = []
        for rid, entry in raw:
            f = records.fields(entry)
            if (action is not None and f["action"] != action) or (
                    target is not None and f["target"] != target):
                continue
            out.append(AuditRecord(action=f["action"], actor=f["actor"], via=f["via"],
                                   target=f["target"], old=json.loads(f["old"]),
                                   new=json.loads(f["new"]), ts_ms=int(f["ts"]),
                                   id=rid.decode()))
            if len(out) >= limit:
                break
        return out

    # -- alerts ----------------------------------------------------------------------------
    def alert_list(self, query: AlertQuery) -> list[dict[str, Any]]:
        latest: dict[str, records.AlertChange] = {}
        parts = (range(self.partitions) if query.b_number is None else
                 [numbers.partition_of(query.b_number, self.partitions)])
        # Every partition's newest records in one pipeline (one buffer per master in a cluster).
        pipe = self.conn.pipeline(transaction=False)
        for p in parts:
            pipe.execute_command("XREVRANGE", keys.stream(p), "+", "-", "COUNT", query.scan)
        for p, raw in zip(parts, pipe.execute(), strict=True):
            stream = keys.stream(p)
            for rid, entry in raw:
                f = records.fields(entry)
                if f.get("k") != "a":
                    continue
                try:  # the writer's parser: one reading of a record everywhere
                    a = records.parse_alert(f"{stream}/{rid.decode()}", f)
                except records.RecordError:
                    continue  # poison: the writer dead-letters it
                prev = latest.get(a.alert_id)
                if prev is None or a.ver > prev.ver:
                    latest[a.alert_id] = a
        rank = {s: i for i, s in enumerate(SEVERITIES)}
        floor = rank[query.min_severity] if query.min_severity else 0
        views = []
        for a in latest.values():
            if query.b_number is not None and a.b != query.b_number:
                continue
            if rank.get(a.severity, 0) < floor:
                continue
            if query.since_ms is not None and a.last_ms < query.since_ms:
                continue
            if query.until_ms is not None and a.first_ms > query.until_ms:
                continue
            views.append(_alert_view(a))
        views.sort(key=lambda v: (v["last_detection_ms"], v["alert_id"]), reverse=True)
        return views[:query.limit]

    # -- carrier registry ------------------------------------------------------------------
    def registry_get(self) -> dict[str, Any]:
        raw = self.conn.execute_command("HGET", REGISTRY_RECORD_KEY, "doc")
        if raw is None:
            return {"carriers": [], "gateways": [], "routes": []}
        doc: dict[str, Any] = json.loads(raw)  # type: ignore[arg-type]
        return doc

    def registry_put(self, doc: dict[str, Any]) -> None:
        self.conn.execute_command("HSET", REGISTRY_RECORD_KEY, "doc",
                                  json.dumps(doc, sort_keys=True, separators=(",", ":")),
                                  "updated", int(time.time() * 1000))

    # -- runtime overrides -----------------------------------------------------------------
    def overrides_get(self, deployment: str) -> tuple[int, Any]:
        raw = self.conn.execute_command("GET", OVERRIDES_KEY)
        if raw is None:
            return 0, {}
        assert isinstance(raw, bytes)
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        values = doc.get("values") if isinstance(doc, dict) else None
        return _overrides_gen(raw), values

    def overrides_put(self, deployment: str, expected: int, values: dict[str, Any],
                      updated_by: str) -> int:
        gen = expected + 1
        doc = {"version": 1, "generation": gen, "updated_at": iso_ms(time.time() * 1000),
               "updated_by": updated_by, "values": dict(sorted(values.items()))}
        r = self.conn.execute_command("EVAL", _OVERRIDES_CAS, 1, OVERRIDES_KEY, expected,
                                      json.dumps(doc, sort_keys=True))
        return gen if r == 1 else -1

    def close(self) -> None:
        self.conn.close()


# The overrides document is written here only, by json.dumps(sort_keys=True), so its top-level
# "generation" is the first one in the text (before "values"). A document without one (written
# before generations, or unreadable) is generation 0. No cjson: the same script runs anywhere.
_GEN_RE = re.compile(rb'"generation": (\d+)')
_OVERRIDES_CAS = """
local cur = redis.call('GET', KEYS[1])
local gen = cur and tonumber(string.match(cur, '"generation": (%d+)')) or 0
if gen ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _overrides_gen(raw: bytes) -> int:
    m = _GEN_RE.search(raw)
    return int(m.group(1)) if m else 0


def _entry(b_number: str, raw: Any) -> WhitelistEntry:
    d = json.loads(raw)
    return WhitelistEntry(b_number=b_number, reason=d.get("reason", ""),
                          created_by=d.get("created_by", ""),
                          created_at_ms=int(d.get("created_at") or 0),
                          expires_at_ms=None if d.get("expires_at") is None
                          else int(d["expires_at"]))


def _alert_view(a: records.AlertChange) -> dict[str, Any]:
    """Shape an alert change like a fraud_alerts row (plus the episode's call-time bounds)."""
    return {
        "alert_id": a.alert_id,
        "alert_type": records.ALERT_TYPE_COLUMN[a.typ],
        "severity": a.severity,
        "b_number": a.b,
        "a_numbers": list(a.a_numbers),
        "a_number_count": len(a.a_numbers),
        "a_number": a.a,
        "b_numbers": list(a.b_numbers),
        "distinct_max": a.distinct,
        "detection_window_ms": a.window_ms,
        "detected_at": iso_ms(a.first_ms),
        "last_detection_at": iso_ms(a.last_ms),
        "first_detection_ms": a.first_ms,
        "last_detection_ms": a.last_ms,
        "version": a.ver,
        "block_ttl_ms": a.block_ttl_ms,
        "carrier_id": a.carrier_id,
        "gateway_id": a.gateway_id,
        "source": "store",
    }

