"""The control plane's repository on PostgreSQL / YugabyteDB YSQL: tables whitelist, audit_log,
fraud_alerts, the carrier registry's carriers / carrier_gateways / carrier_routes, and the
deployments' runtime overrides, config_overrides (see acm_module/control/repository.py for the
interface).

The database is the system of record: a whitelist entry added over MI is a `whitelist` row, so
the writer's reconcile (whitelist_sync.reconcile, table -> store markers) keeps its marker
instead of deleting it. The control plane writes the markers itself and audits every change
through `audit_append`; this module does neither on its own.

One connection behind a lock (the control process is threaded; commands are rare), opened on
first use, so `acm serve` starts and serves settings commands while the database is down.
A failed statement is retried once on a fresh connection: a server restart drops idle
connections. Failures raise StoreError, which MI answers with -32000.

psycopg is imported on first use, not with this module: `acm serve`'s control process binds its
MI endpoints before paying for it (~150 ms), as acm_module.actions.mi defers the lifecycle.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from acm_module.control.audit import AuditRecord, iso_ms
from acm_module.control.repository import AlertQuery, WhitelistEntry
from acm_module.core.errors import StoreError
from acm_module.core.pg import close_quietly
from acm_module.core.redaction import redact_url
from acm_module.core.types import SEVERITIES

if TYPE_CHECKING:
    import psycopg
    from psycopg.types.json import Jsonb

log = logging.getLogger("acm.control.pg")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 3
# An MI caller waits for the answer: a stuck statement must fail rather than hang the endpoint.
STATEMENT_TIMEOUT_MS = 5000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WL_COLUMNS = "b_number, reason, created_by, created_at, expires_at"
_VIA_RE = re.compile(r"(?:^|;\s*)via (\S+)")

_WL_UPSERT = f"""
INSERT INTO whitelist (b_number, reason, created_by, created_at, expires_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (b_number) DO UPDATE SET
    reason = EXCLUDED.reason,
    created_by = EXCLUDED.created_by,
    created_at = EXCLUDED.created_at,
    expires_at = EXCLUDED.expires_at
RETURNING {_WL_COLUMNS}
"""

_AUDIT_INSERT = """
INSERT INTO audit_log (at, actor, action, target, old, new, outcome, details)
VALUES (%s, %s, %s, %s, %s, %s, 'ok', %s) RETURNING id
"""

_OVERRIDES_INSERT = """
INSERT INTO config_overrides (deployment, generation, overrides, updated_by)
VALUES (%s, 1, %s, %s) ON CONFLICT (deployment) DO NOTHING RETURNING generation
"""
_OVERRIDES_UPDATE = """
UPDATE config_overrides SET generation = generation + 1, overrides = %s, updated_by = %s,
    updated_at = NOW()
WHERE deployment = %s AND generation = %s RETURNING generation
"""

# The carrier registry (migration 0004): a row is updated (and its updated_at moved) only when
# a value changed, so replacing the whole document keeps the history of the untouched rows.
_CARRIER_COLUMNS = ("id", "name", "licence", "contact", "cli_rule")
_GATEWAY_COLUMNS = ("id", "carrier_id", "addresses", "trunks", "rate_limit_cps",
                    "rate_window_s")
_ROUTE_COLUMNS = ("id", "carrier_id", "gateway_id", "trunk", "direction", "cli_rule")
_REGISTRY_TABLES = (("carriers", "carriers", _CARRIER_COLUMNS),
                    ("gateways", "carrier_gateways", _GATEWAY_COLUMNS),
                    ("routes", "carrier_routes", _ROUTE_COLUMNS))


def _registry_upsert(table: str, columns: tuple[str, ...]) -> str:
    values = ", ".join("%s::text[]" if c in ("addresses", "trunks") else "%s" for c in columns)
    rest = columns[1:]
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values}) "
            f"ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in rest) + ", updated_at = NOW() "
            f"WHERE ({', '.join(f'{table}.{c}' for c in rest)}) IS DISTINCT FROM "
            f"({', '.join(f'EXCLUDED.{c}' for c in rest)})")


_ALERT_COLUMNS = """
alert_id, alert_type, severity, b_number, a_numbers, detection_window_ms, detected_at,
COALESCE(last_detected_at, detected_at), distinct_count, version, status, assigned_to,
ncc_incident_id, resolved_at, block_ttl_ms, a_number, b_numbers, carrier_id, gateway_id
"""


class PostgresControlRepository:
    """ControlRepository on the whitelist / audit_log / fraud_alerts tables."""

    name = "postgres"

    def __init__(self, settings: Any, connect_timeout: float = CONNECT_TIMEOUT_S,
                 statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        self.url: str = settings.database_url
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                options=f"-c statement_timeout={int(self.statement_timeout_ms)}")
        return self._conn

    def _drop(self) -> None:
        close_quietly(self._conn)
        self._conn = None

    def _run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run fn on the connection, once more on a fresh one if the link failed.

        Raises StoreError when the database is unreachable or keeps failing.
        """
        import psycopg

        from acm_module.core.pg import retryable_errors

        with self._lock:
            for attempt in (1, 2):
                try:
                    return fn(self._connection())
                except retryable_errors() as e:
                    self._drop()
                    if attempt == 2:
                        raise StoreError(f"postgres: {type(e).__name__}: {_first_line(e)}"
                                         ) from e
                    log.info("database link failed (%s); retrying on a new connection",
                             type(e).__name__)
                except psycopg.Error as e:  # e.g. UndefinedTable: `acm db migrate` not run
                    raise StoreError(f"postgres: {type(e).__name__}: {_first_line(e)}") from e
        raise AssertionError("unreachable")

    # -- whitelist -------------------------------------------------------------------------
    def _one_entry(self, sql: str, b_number: str) -> WhitelistEntry | None:
        """Run a statement on one B-number's row; return the row it read or removed."""
        def one(c: psycopg.Connection) -> WhitelistEntry | None:
            row = c.execute(sql, (b_number,)).fetchone()
            return None if row is None else _entry(row)
        return self._run(one)

    def whitelist_get(self, b_number: str) -> WhitelistEntry | None:
        return self._one_entry(f"SELECT {_WL_COLUMNS} FROM whitelist WHERE b_number = %s",
                               b_number)

    def whitelist_put(self, entry: WhitelistEntry) -> WhitelistEntry | None:
        """Insert or replace the row (no audit row: the control plane audits)."""
        def put(c: psycopg.Connection) -> WhitelistEntry | None:
            with c.transaction():
                old = c.execute(f"SELECT {_WL_COLUMNS} FROM whitelist WHERE b_number = %s "
                                "FOR UPDATE", (entry.b_number,)).fetchone()
                c.execute(_WL_UPSERT, (
                    entry.b_number, entry.reason, entry.created_by,
                    ms_to_dt(entry.created_at_ms),
                    None if entry.expires_at_ms is None else ms_to_dt(entry.expires_at_ms)))
            return None if old is None else _entry(old)
        return self._run(put)

    def whitelist_delete(self, b_number: str) -> WhitelistEntry | None:
        return self._one_entry(
            f"DELETE FROM whitelist WHERE b_number = %s RETURNING {_WL_COLUMNS}", b_number)

    def whitelist_list(self, *, b_number: str | None = None, limit: int = 100,
                       now_ms: int | None = None) -> list[WhitelistEntry]:
        where: list[str] = []
        params: list[Any] = []
        if b_number is not None:
            where.append("b_number = %s")
            params.append(b_number)
        if now_ms is not None:
            # Expired rows stay in the table (the writer's reconcile skips them); not listed.
            where.append("(expires_at IS NULL OR expires_at > %s)")
            params.append(ms_to_dt(now_ms))
        sql = (f"SELECT {_WL_COLUMNS} FROM whitelist"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY b_number LIMIT %s")
        params.append(limit)
        return self._run(lambda c: [_entry(r) for r in c.execute(sql, params).fetchall()])

    # -- audit -----------------------------------------------------------------------------
    def audit_append(self, rec: AuditRecord) -> str:
        """Insert one audit_log row (`via` goes to details as JSON); return its id."""
        params = (ms_to_dt(rec.ts_ms), rec.actor[:255], rec.action[:64], rec.target[:255],
                  _jsonb(rec.old), _jsonb(rec.new), json.dumps({"via": rec.via}))

        def append(c: psycopg.Connection) -> str:
            row = c.execute(_AUDIT_INSERT, params).fetchone()
            assert row is not None
            return str(row[0])
        return self._run(append)

    def audit_list(self, *, limit: int = 50, since_ms: int | None = None,
                   action: str | None = None, target: str | None = None) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        if since_ms is not None:
            where.append("at >= %s")
            params.append(ms_to_dt(since_ms))
        if action is not None:
            where.append("action = %s")
            params.append(action)
        if target is not None:
            where.append("target = %s")
            params.append(target)
        sql = ("SELECT id, at, actor, action, target, old, new, details FROM audit_log"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY at DESC, id DESC LIMIT %s")
        params.append(limit)
        rows = self._run(lambda c: c.execute(sql, params).fetchall())
        return [AuditRecord(action=action_, actor=actor, via=_via(details), target=target_,
                            old=old, new=new, ts_ms=_ms(at), id=str(rid))
                for rid, at, actor, action_, target_, old, new, details in rows]

    # -- alerts ----------------------------------------------------------------------------
    def alert_list(self, query: AlertQuery) -> list[dict[str, Any]]:
        """Return fraud_alerts rows newest last detection first (`scan` does not apply)."""
        where: list[str] = []
        params: list[Any] = []
        if query.b_number is not None:
            where.append("b_number = %s")
            params.append(query.b_number)
        if query.min_severity is not None:
            floor = SEVERITIES.index(query.min_severity)
            where.append("severity = ANY(%s)")
            params.append(list(SEVERITIES[floor:]))
        if query.since_ms is not None:
            where.append("COALESCE(last_detected_at, detected_at) >= %s")
            params.append(ms_to_dt(query.since_ms))
        if query.until_ms is not None:
            where.append("detected_at <= %s")
            params.append(ms_to_dt(query.until_ms))
        sql = (f"SELECT {_ALERT_COLUMNS} FROM fraud_alerts"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY COALESCE(last_detected_at, detected_at) DESC, alert_id DESC"
               " LIMIT %s")
        params.append(query.limit)
        rows = self._run(lambda c: c.execute(sql, params).fetchall())
        return [_alert_view(r) for r in rows]

    # -- carrier registry ------------------------------------------------------------------
    def registry_get(self) -> dict[str, Any]:
        """Return the registry document from the three tables, each kind sorted by id."""
        def get(c: psycopg.Connection) -> dict[str, Any]:
            doc: dict[str, Any] = {}
            with c.transaction():  # one snapshot of the three tables
                for kind, table, columns in _REGISTRY_TABLES:
                    rows = c.execute(f"SELECT {', '.join(columns)} FROM {table} "
                                     "ORDER BY id").fetchall()
                    doc[kind] = [dict(zip(columns, r, strict=True)) for r in rows]
            for g in doc["gateways"]:
                g["addresses"], g["trunks"] = list(g["addresses"]), list(g["trunks"])
                g["rate_window_s"] = float(g["rate_window_s"])
            return doc
        return self._run(get)

    def registry_put(self, doc: dict[str, Any]) -> None:
        """Replace the registry in one transaction: rows not in doc are deleted, the others
        inserted or updated (in an order the foreign keys accept)."""
        ids = {kind: [e["id"] for e in doc[kind]] for kind, _, _ in _REGISTRY_TABLES}

        def put(c: psycopg.Connection) -> None:
            with c.transaction(), c.cursor() as cur:
                cur.execute("DELETE FROM carrier_routes WHERE NOT (id = ANY(%s::text[]))",
                            (ids["routes"],))
                for kind, table, columns in _REGISTRY_TABLES:
                    if doc[kind]:
                        cur.executemany(_registry_upsert(table, columns),
                                        [tuple(e[col] for col in columns) for e in doc[kind]])
                for kind, table in (("gateways", "carrier_gateways"), ("carriers", "carriers")):
                    cur.execute(f"DELETE FROM {table} WHERE NOT (id = ANY(%s::text[]))",
                                (ids[kind],))
        self._run(put)

    # -- runtime overrides (migration 0007) ------------------------------------------------
    def overrides_get(self, deployment: str) -> tuple[int, Any]:
        def get(c: psycopg.Connection) -> tuple[int, Any]:
            row = c.execute("SELECT generation, overrides FROM config_overrides "
                            "WHERE deployment = %s", (deployment,)).fetchone()
            return (0, {}) if row is None else (int(row[0]), row[1])
        return self._run(get)

    def overrides_put(self, deployment: str, expected: int, values: dict[str, Any],
                      updated_by: str) -> int:
        """Compare-and-set on the generation: the first row of a deployment is inserted
        (DO NOTHING when another node inserted it first), later ones updated only while the
        generation is still `expected`. No lock is held between the read and this."""
        params: tuple[Any, ...]
        if expected == 0:
            sql = _OVERRIDES_INSERT
            params = (deployment, _jsonb(values), updated_by[:255])
        else:
            sql = _OVERRIDES_UPDATE
            params = (_jsonb(values), updated_by[:255], deployment, expected)

        def put(c: psycopg.Connection) -> int:
            row = c.execute(sql, params).fetchone()
            return -1 if row is None else int(row[0])
        return self._run(put)

    def close(self) -> None:
        with self._lock:
            self._drop()


# -- rows ----------------------------------------------------------------------------------
def ms_to_dt(ms: int) -> datetime:
    """Return the UTC datetime of epoch milliseconds, exactly (no float on the way)."""
    return _EPOCH + timedelta(milliseconds=ms)


def _ms(dt: datetime) -> int:
    """Return the epoch milliseconds of an aware datetime, exactly."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _entry(row: tuple[Any, ...]) -> WhitelistEntry:
    b, reason, created_by, created_at, expires_at = row
    return WhitelistEntry(b_number=b, reason=reason, created_by=created_by,
                          created_at_ms=_ms(created_at),
                          expires_at_ms=None if expires_at is None else _ms(expires_at))


def _jsonb(value: Any) -> Jsonb | None:
    # Records hold JSON-ready values; default=str as in the store stream, for anything else.
    from psycopg.types.json import Jsonb

    return None if value is None else Jsonb(value, dumps=lambda v: json.dumps(v, default=str))


def _via(details: str | None) -> str:
    """Return `via` from audit_log.details: our JSON, or the actions' "... via <peer>" text."""
    if not details:
        return ""
    try:
        d = json.loads(details)
    except ValueError:
        d = None
    if isinstance(d, dict):
        return str(d.get("via", ""))
    m = _VIA_RE.search(details)
    return m.group(1) if m else ""


def _alert_view(row: tuple[Any, ...]) -> dict[str, Any]:
    """Shape a fraud_alerts row like the store repository's _alert_view (plus operator
    columns)."""
    (alert_id, alert_type, severity, b, a_numbers, window_ms, detected_at, last_at, distinct,
     version, status, assigned_to, incident, resolved_at, block_ttl_ms, a_number, b_numbers,
     carrier_id, gateway_id) = row
    a_list = [str(a) for a in a_numbers] if isinstance(a_numbers, list) else []
    first_ms, last_ms = _ms(detected_at), _ms(last_at)
    return {
        "alert_id": str(alert_id),
        "alert_type": alert_type,
        "severity": severity,
        "b_number": b,
        "a_numbers": a_list,
        "a_number_count": len(a_list),
        "a_number": a_number or "",
        "b_numbers": [str(x) for x in b_numbers] if isinstance(b_numbers, list) else [],
        "distinct_max": int(distinct) or len(a_list),
        "detection_window_ms": int(window_ms),
        "detected_at": iso_ms(first_ms),
        "last_detection_at": iso_ms(last_ms),
        "first_detection_ms": first_ms,
        "last_detection_ms": last_ms,
        "version": int(version),
        "status": status,
        "assigned_to": assigned_to,
        "ncc_incident_id": incident,
        "resolved_at": iso_ms(None if resolved_at is None else _ms(resolved_at)),
        "block_ttl_ms": int(block_ttl_ms),
        "carrier_id": carrier_id or "",
        "gateway_id": gateway_id or "",
        "source": "postgres",
    }


def _first_line(e: BaseException) -> str:
    # psycopg quotes a bad conninfo whole: its password must not reach a reply or a log.
    return redact_url((str(e).splitlines() or [""])[0])[:300]
