"""PostgreSQL / YugabyteDB sink: fraud_alerts, inserted when an alert opens, updated as it
escalates. The `version` guard in the upsert makes every write idempotent and order-proof: a
replayed or late older change never overwrites a newer one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import psycopg

from acm_module.core.pg import close_quietly
from acm_module.persist.base import Sink, SinkRejected, SinkUnavailable
from acm_module.persist.records import ALERT_TYPE_COLUMN, AlertChange, Decision, latest_versions

log = logging.getLogger("acm.persist.pg")

# The detection facts of an alert, in alert_row()'s order: the writer's upsert and the NCC
# runner's insert-if-absent (compliance/ncc.py) write the same columns.
ALERT_COLUMNS = ("alert_id", "alert_type", "severity", "b_number", "a_numbers",
                 "detection_window_ms", "detected_at", "last_detected_at", "distinct_count",
                 "block_ttl_ms", "version", "carrier_id", "gateway_id", "a_number", "b_numbers")
INSERT_ALERT = (f"INSERT INTO fraud_alerts ({', '.join(ALERT_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(ALERT_COLUMNS))})")

# Operator-owned columns (status, assigned_to, notes, ncc_incident_id, resolved_at) are never
# touched by the writer; only the detection facts are.
_UPSERT = INSERT_ALERT + """
ON CONFLICT (alert_id) DO UPDATE SET
""" + ",\n".join(f"    {c} = EXCLUDED.{c}" for c in ALERT_COLUMNS if c != "alert_id") + """,
    updated_at = NOW()
WHERE fraud_alerts.version < EXCLUDED.version
"""

# Errors that say the server or the link is in trouble, not the data: retry later.
RETRYABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.AdminShutdown,
    psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected, OSError,
)
# The schema is older than this writer (`acm db migrate` not run yet): not the rows' fault, so
# the batch waits (retried) instead of going to the dead-letter stream.
SCHEMA_BEHIND: tuple[type[BaseException], ...] = (
    psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable)


def ms_to_dt(ms: int) -> datetime:
    """Return the UTC datetime of epoch milliseconds."""
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


def alert_row(a: AlertChange) -> tuple:
    """Return the upsert parameters of one alert change."""
    fanout = a.typ == "fanout"
    return (a.alert_id, ALERT_TYPE_COLUMN[a.typ], a.severity, a.b, json.dumps(list(a.a_numbers)),
            a.window_ms, ms_to_dt(a.first_ms), ms_to_dt(a.last_ms), a.distinct, a.block_ttl_ms,
            a.ver, a.carrier_id, a.gateway_id, a.a if fanout else None,
            json.dumps(list(a.b_numbers)) if fanout else None)


class PostgresSink(Sink):
    """fraud_alerts in PostgreSQL 15 or YugabyteDB YSQL (psycopg 3)."""

    name = "pg"
    kinds = frozenset({"a"})

    def __init__(self, database_url: str, connect_timeout: float = 5.0,
                 statement_timeout_ms: int = 30000) -> None:
        self.url = database_url
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.Connection | None = None

    def open(self) -> None:
        """Connect (the schema comes from `acm db migrate`). Raises SinkUnavailable."""
        self.close()
        try:
            self._conn = psycopg.connect(
                self.url, connect_timeout=max(1, int(self.connect_timeout)),
                options=f"-c statement_timeout={int(self.statement_timeout_ms)}")
        except psycopg.Error as e:
            raise SinkUnavailable(f"postgres: {type(e).__name__}: {_first_line(e)}") from e

    def write(self, decisions: list[Decision], alerts: list[AlertChange]) -> None:
        """Upsert the newest change of each alert in one transaction."""
        if not alerts:
            return
        if self._conn is None or self._conn.closed:
            self.open()
        conn = self._conn
        assert conn is not None
        rows = [alert_row(a) for a in latest_versions(alerts)]
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPSERT, rows)
        except RETRYABLE as e:
            self.close()
            raise SinkUnavailable(f"postgres: {type(e).__name__}: {_first_line(e)}") from e
        except SCHEMA_BEHIND as e:
            raise SinkUnavailable(f"postgres: schema not migrated (run `acm db migrate`): "
                                  f"{_first_line(e)}") from e
        except psycopg.Error as e:
            raise SinkRejected(f"postgres: {type(e).__name__}: {_first_line(e)}") from e

    def close(self) -> None:
        close_quietly(self._conn)
        self._conn = None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]
