"""ClickHouse sink: fraud_alerts_analytics, daily_stats_mv and daily_carrier_stats_mv, on chdb
(in-process, the embedded default) or on a server through clickhouse-connect (CLICKHOUSE_URL).

Exactly-once rows, the choice made here:
- fraud_alerts_analytics is a ReplacingMergeTree(version, is_deleted). An alert escalates
  (LOW -> HIGH -> CRITICAL, more A-numbers), so a newer version replaces the row; read it with
  FINAL (or `query_alerts`).
- The writer reads the stored version of the batch's alerts first and inserts only newer
  versions, so a re-sent batch inserts nothing. When it supersedes a row it also inserts a
  cancel row (the old values with is_deleted=1) in the same INSERT block.
- daily_stats_mv keeps the seed's SummingMergeTree (as a view TO the table daily_stats), but
  sums +1 for a row and -1 for a cancel row: an alert counts once, under its latest severity,
  with its latest A-number count, however many times it escalated. A plain MV over a replacing
  table would count every version. daily_carrier_stats_mv does the same per carrier and alert
  type (MULTICALL_MASKING / MULTICALL_FANOUT); carrier '' is an unattributed alert. Opening the
  sink creates what is missing and rebuilds both daily tables from the current rows, which
  repairs a view insert lost to a crash between the two inserts and fills a table created on
  a database that already held alerts.
Single writer per alert: one writer group consumer handles a partition at a time (records of
one alert live in one partition stream, in order), so the read-then-insert does not race.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import date
from typing import Any, Protocol

from acm_module.core.pg import close_quietly
from acm_module.core.records import ALERT_TYPE_COLUMN, AlertChange, Decision, latest_versions
from acm_module.write.base import Sink, SinkRejected, SinkUnavailable

log = logging.getLogger("acm.persist.clickhouse")

# The daily SummingMergeTree tables, each fed by its view <table>_mv over the replacing table:
# their key after the date (each a LowCardinality(String) column of fraud_alerts_analytics).
# A row counts +1 and its cancel row -1 (the cancel row holds the stored carrier, type and
# severity), so an alert counts once, under its latest values, however often it changed.
_DAILY: dict[str, tuple[str, ...]] = {
    "daily_stats": ("severity",),
    "daily_carrier_stats": ("carrier_id", "alert_type", "severity"),
}


def _daily_ddl(table: str) -> tuple[str, str]:
    """Return the CREATE of a daily table and of its view (both re-runnable)."""
    dims = _DAILY[table]
    cols = "".join(f"        {d} LowCardinality(String),\n" for d in dims)
    key = ", ".join(("date", *dims))
    return (f"""CREATE TABLE IF NOT EXISTS {table}
    (
        date Date,
{cols}        alert_count Int64,
        total_a_numbers Int64
    )
    ENGINE = SummingMergeTree()
    PARTITION BY toYYYYMM(date)
    ORDER BY ({key})""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table}
    AS SELECT
        toDate(detected_at) AS date,
        {", ".join(dims)},
        sum(if(is_deleted = 1, -1, 1)) AS alert_count,
        sum(if(is_deleted = 1, -1, 1) * toInt64(a_number_count)) AS total_a_numbers
    FROM fraud_alerts_analytics
    GROUP BY {key}""")


def _daily_rebuild(table: str) -> tuple[str, str]:
    """Return the statements that refill a daily table from the current alert rows."""
    key = ", ".join(("date", *_DAILY[table]))
    return (f"TRUNCATE TABLE {table}",
            f"""INSERT INTO {table}
    SELECT toDate(detected_at) AS date, {", ".join(_DAILY[table])}, count() AS alert_count,
           sum(toInt64(a_number_count)) AS total_a_numbers
    FROM fraud_alerts_analytics FINAL
    GROUP BY {key}""")


def _daily_sql(table: str) -> str:
    """Return the query of a daily view summed per key, the keys whose alerts all cancelled
    left out."""
    key = ", ".join(("date", *_DAILY[table]))
    return f"""
SELECT {key}, sum(alert_count) AS alert_count, sum(total_a_numbers) AS total_a_numbers
FROM {table}_mv GROUP BY {key} HAVING alert_count != 0 ORDER BY {key}
"""


DDL = (
    """CREATE TABLE IF NOT EXISTS fraud_alerts_analytics
    (
        alert_id UUID,
        alert_type LowCardinality(String),
        severity LowCardinality(String),
        b_number String,
        a_number_count UInt32,
        detection_window_ms UInt32,
        detected_at DateTime,
        resolved_at Nullable(DateTime),
        resolution_time_seconds Nullable(UInt32),
        version UInt32,
        is_deleted UInt8,
        carrier_id LowCardinality(String) DEFAULT '',
        gateway_id LowCardinality(String) DEFAULT '',
        a_number String DEFAULT ''
    )
    ENGINE = ReplacingMergeTree(version, is_deleted)
    PARTITION BY toYYYYMM(detected_at)
    ORDER BY (detected_at, alert_id)""",
    # A table created before gateway attribution gets the columns (old rows read as '').
    "ALTER TABLE fraud_alerts_analytics ADD COLUMN IF NOT EXISTS "
    "carrier_id LowCardinality(String) DEFAULT ''",
    "ALTER TABLE fraud_alerts_analytics ADD COLUMN IF NOT EXISTS "
    "gateway_id LowCardinality(String) DEFAULT ''",
    "ALTER TABLE fraud_alerts_analytics ADD COLUMN IF NOT EXISTS a_number String DEFAULT ''",
    *_daily_ddl("daily_stats"),
    *_daily_ddl("daily_carrier_stats"),
)

# An INSERT and its materialized-view insert are not one atomic step: a writer killed between
# them (chdb runs in the writer's process) leaves the view short. Every sink open therefore
# rebuilds the small daily tables from the replacing table's current rows.
_REBUILD = tuple(sql for t in _DAILY for sql in _daily_rebuild(t))

_COLUMNS = ("alert_id", "alert_type", "severity", "b_number", "a_number_count",
            "detection_window_ms", "detected_at", "version", "is_deleted", "carrier_id",
            "gateway_id", "a_number")

DAILY_STATS_SQL = _daily_sql("daily_stats")
DAILY_CARRIER_STATS_SQL = _daily_sql("daily_carrier_stats")


class _Backend(Protocol):
    def command(self, sql: str) -> None: ...
    def select(self, sql: str, ids: list[str] | None = None) -> list[dict[str, Any]]: ...
    def insert(self, table: str, rows: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class ChdbBackend:
    """The ClickHouse engine in this process (chdb), its data in `path`."""

    def __init__(self, path: str, database: str = "acm") -> None:
        from chdb import session

        os.makedirs(path, exist_ok=True)
        self.db = database
        self.sess = session.Session(path)
        self.sess.query(f"CREATE DATABASE IF NOT EXISTS {database}")
        self.sess.query(f"USE {database}")

    def command(self, sql: str) -> None:
        self.sess.query(sql)

    def select(self, sql: str, ids: list[str] | None = None) -> list[dict[str, Any]]:
        if ids is None:
            res = self.sess.query(sql, "JSONEachRow")
        else:
            # chdb takes query parameters in ClickHouse text format; ids are validated UUIDs.
            text = "[" + ",".join("'%s'" % uuid.UUID(i) for i in ids) + "]"
            res = self.sess.query(sql, "JSONEachRow", params={"ids": text})
        return [json.loads(line) for line in res.bytes().splitlines() if line]

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        # JSONEachRow: the data are JSON-encoded values, never spliced SQL.
        payload = "\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
        self.sess.query(f"INSERT INTO {table} FORMAT JSONEachRow\n{payload}")

    def close(self) -> None:
        self.sess.close()


class ServerBackend:
    """A ClickHouse server through clickhouse-connect (HTTP)."""

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        self.client = clickhouse_connect.get_client(dsn=url)

    def command(self, sql: str) -> None:
        self.client.command(sql)

    def select(self, sql: str, ids: list[str] | None = None) -> list[dict[str, Any]]:
        params = None if ids is None else {"ids": [str(uuid.UUID(i)) for i in ids]}
        res = self.client.query(sql, parameters=params)
        return [dict(zip(res.column_names, [_jsonable(v) for v in row], strict=True))
                for row in res.result_rows]

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        payload = "\n".join(json.dumps(r, separators=(",", ":")) for r in rows).encode()
        self.client.raw_insert(table, insert_block=payload, fmt="JSONEachRow")

    def close(self) -> None:
        self.client.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, date):  # datetime included
        return v.isoformat()
    return v


# No alias may reuse a column name here: ClickHouse resolves WHERE against SELECT aliases.
_CURRENT = """
SELECT alert_id, alert_type, severity, b_number, a_number_count,
       detection_window_ms, toUnixTimestamp(detected_at) AS detected_at, version,
       carrier_id, gateway_id, a_number
FROM fraud_alerts_analytics FINAL
WHERE alert_id IN {ids:Array(UUID)}
"""


def _row(a: AlertChange) -> dict[str, Any]:
    return {"alert_id": a.alert_id, "alert_type": ALERT_TYPE_COLUMN[a.typ],
            "severity": a.severity, "b_number": a.b,
            "a_number_count": len(a.a_numbers) or a.distinct,
            "detection_window_ms": a.window_ms,
            "detected_at": a.first_ms // 1000,  # epoch seconds: no time-zone ambiguity
            "version": a.ver, "is_deleted": 0, "carrier_id": a.carrier_id,
            "gateway_id": a.gateway_id, "a_number": a.a}


class ClickHouseSink(Sink):
    """fraud_alerts_analytics + daily_stats_mv + daily_carrier_stats_mv."""

    name = "clickhouse"
    kinds = frozenset({"a"})

    def __init__(self, clickhouse_url: str = "", chdb_path: str = "") -> None:
        if not clickhouse_url and not chdb_path:
            raise ValueError("need a ClickHouse URL or a chdb data path")
        self.url = clickhouse_url
        self.chdb_path = chdb_path
        self._b: _Backend | None = None

    def open(self) -> None:
        """Connect (or start the engine) and create the tables. Raises SinkUnavailable."""
        self.close()
        try:
            b: _Backend = ServerBackend(self.url) if self.url else ChdbBackend(self.chdb_path)
            for ddl in DDL:
                b.command(ddl)
            for sql in _REBUILD:
                b.command(sql)
        except Exception as e:
            raise SinkUnavailable(f"clickhouse: {type(e).__name__}: {_short(e)}") from e
        self._b = b

    def write(self, decisions: list[Decision], alerts: list[AlertChange]) -> None:
        """Insert the alerts' newest versions (and cancel rows of what they supersede)."""
        if not alerts:
            return
        if self._b is None:
            self.open()
        b = self._b
        assert b is not None
        latest = latest_versions(alerts)
        try:
            current = {r["alert_id"]: r for r in b.select(_CURRENT, [a.alert_id for a in latest])}
        except Exception as e:
            raise self._classify(e) from e
        rows: list[dict[str, Any]] = []
        for a in latest:
            cur = current.get(a.alert_id)
            if cur is not None and int(cur["version"]) >= a.ver:
                continue  # already stored (a replay) or superseded by a newer version
            if cur is not None:
                rows.append({**{k: cur[k] for k in _COLUMNS if k in cur}, "is_deleted": 1})
            rows.append(_row(a))
        if not rows:
            return
        try:
            b.insert("fraud_alerts_analytics", rows)
        except Exception as e:
            raise self._classify(e) from e

    def _classify(self, e: Exception) -> Exception:
        msg = f"clickhouse: {type(e).__name__}: {_short(e)}"
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or "NETWORK" in str(e) \
                or "Connection" in str(e):
            self.close()
            return SinkUnavailable(msg)
        return SinkRejected(msg)

    def query_alerts(self) -> list[dict[str, Any]]:
        """Return every alert's current row (for tests and reports)."""
        assert self._b is not None
        return self._b.select(_CURRENT.replace("WHERE alert_id IN {ids:Array(UUID)}", ""))

    def daily_stats(self) -> list[dict[str, Any]]:
        """Return daily_stats_mv summed: alerts and A-numbers per day and severity."""
        assert self._b is not None
        return self._b.select(DAILY_STATS_SQL)

    def daily_carrier_stats(self) -> list[dict[str, Any]]:
        """Return daily_carrier_stats_mv summed: alerts and A-numbers per day, carrier, alert
        type and severity."""
        assert self._b is not None
        return self._b.select(DAILY_CARRIER_STATS_SQL)

    def close(self) -> None:
        close_quietly(self._b)
        self._b = None


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]
