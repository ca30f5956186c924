"""Daily statistics for the regulator, computed from the stored data only.

A report day is a calendar day in `report_timezone` (Africa/Lagos by default), [00:00, 24:00).

- alerts: the fraud_alerts rows whose `detected_at` (first detection, call time) is in the day,
  by their current severity (the band of the largest distinct count of the episode), status and
  type (`masking`, `fanout`: alert_type MULTICALL_MASKING / MULTICALL_FANOUT);
- distinct A-numbers / B-numbers: over those alerts' `a_numbers` (a fan-out alert's is its one
  A-number) / their B-numbers (a masking alert's `b_number`, a fan-out alert's `b_numbers`);
- calls dropped: QuestDB `call_events` rows of the day with verdict `drop` (by reason), when
  `questdb_url` is set; otherwise null, with the reason in `calls_dropped_source`;
- calls answered store_unavailable: rows with status STORE_UNAVAILABLE, decisions the store
  recorded after the worker had given up on it, so the caller applied its own fail policy.
  They are counted apart and never as decided, dropped or clean: nobody knows what happened
  to those calls. (A store_unavailable reply means "unknown, maybe recorded"; the rows the
  writer could not match to such a reply stay counted as the store decided them.)
- per carrier (docs/GATEWAY.md; carrier "" = calls and alerts from no registered gateway):
  calls decided and dropped by reason (QuestDB call_events by carrier_id, null without
  QuestDB), alerts by type and severity and the distinct A-numbers in them (fraud_alerts by
  carrier_id: the carrier of the call that opened or last updated the alert);
- actions: the audit_log rows of the day's alerts whose action starts with `action.`
  (disconnect, ncc, notify), counted by action and outcome; disconnect totals the calls ended;
- lifecycle: audit_log rows of the lifecycle commands on the day's alerts, by action and outcome;
- time to resolve: resolved_at - detected_at of the day's alerts that are RESOLVED or
  FALSE_POSITIVE (count, mean, median, p90, max; seconds);
- per hour: the day's alerts by local hour of detection and severity (the report's chart).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from acm_module.engine.types import SEVERITIES
from acm_module.persist.records import ALERT_TYPE_COLUMN

STATUSES = ("NEW", "INVESTIGATING", "CONFIRMED", "RESOLVED", "FALSE_POSITIVE")
LIFECYCLE_ACTIONS = ("acm_alert_assign", "acm_alert_status", "acm_alert_note")
ALERT_TYPES = tuple(ALERT_TYPE_COLUMN)  # masking, fanout
# The reasons a call can be dropped for (docs/GATEWAY.md); each carrier row shows all of them.
DROP_REASONS = ("masking", "blocked", "rate_limited", "national_cli_on_international_route")
_TYPE_OF_COLUMN = {v: k for k, v in ALERT_TYPE_COLUMN.items()}
UNANSWERED = "store_unavailable"  # the call counts' verdict of a call whose caller got that

# Columns added by migration 0005 are NULL on rows older than it: read as the defaults.
_ALERTS = """
SELECT alert_id, ncc_incident_id, alert_type, severity, b_number, a_numbers, distinct_count,
       detection_window_ms, detected_at, last_detected_at, status, assigned_to, resolved_at,
       COALESCE(carrier_id, '') AS carrier_id, COALESCE(gateway_id, '') AS gateway_id,
       a_number, b_numbers
FROM fraud_alerts WHERE detected_at >= %s AND detected_at < %s
ORDER BY detected_at, alert_id
"""
_AUDIT = """
SELECT action, outcome, new FROM audit_log
WHERE target = ANY(%s) AND (action LIKE 'action.%%' OR action = ANY(%s))
"""


@dataclass
class DailyStats:
    """Everything the daily report shows."""

    date: str
    timezone: str
    period_start: str
    period_end: str
    generated_at: str
    operator_code: str
    alerts_total: int
    alerts_by_severity: dict[str, int]
    alerts_by_status: dict[str, int]
    distinct_a_numbers: int
    distinct_b_numbers: int
    calls_dropped: int | None
    calls_dropped_by_reason: dict[str, int]
    calls_dropped_source: str
    actions: dict[str, dict[str, int]]
    calls_disconnected: int
    lifecycle_changes: dict[str, dict[str, int]]
    time_to_resolve_s: dict[str, float | int | None]
    alerts_per_hour: list[dict[str, int]]
    alerts_by_type: dict[str, int] = field(default_factory=dict)
    carriers: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    calls_store_unavailable: int | None = None  # None without QuestDB

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def day_bounds(day: date, tz: str) -> tuple[datetime, datetime]:
    """Return [start, end) of a local calendar day as aware UTC datetimes."""
    z = ZoneInfo(tz)
    start = datetime.combine(day, time.min, tzinfo=z)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=z)
    return start.astimezone(UTC), end.astimezone(UTC)


def _iso(v: datetime | None) -> str | None:
    if v is None:
        return None
    return v.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def compute(conn: psycopg.Connection, day: date, tz: str, operator_code: str = "",
            questdb_url: str = "", now: datetime | None = None) -> DailyStats:
    """Compute one day's statistics. Raises psycopg.Error (and SinkUnavailable from QuestDB)."""
    start, end = day_bounds(day, tz)
    z = ZoneInfo(tz)
    cur = conn.execute(_ALERTS, (start, end))
    assert cur.description is not None
    cols = [d.name for d in cur.description]
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    by_sev = dict.fromkeys(SEVERITIES, 0)
    by_status = dict.fromkeys(STATUSES, 0)
    by_type = dict.fromkeys(ALERT_TYPES, 0)
    a_numbers: set[str] = set()
    b_numbers: set[str] = set()
    per_hour = [{"hour": h, **dict.fromkeys(SEVERITIES, 0)} for h in range(24)]
    ttr: list[float] = []
    alerts: list[dict[str, Any]] = []
    carriers = _Carriers()
    for r in rows:
        an = _json_list(r["a_numbers"])
        bn = _json_list(r["b_numbers"]) if r["b_numbers"] is not None else []
        typ = _TYPE_OF_COLUMN.get(r["alert_type"], r["alert_type"])
        by_sev[r["severity"]] = by_sev.get(r["severity"], 0) + 1
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        by_type[typ] = by_type.get(typ, 0) + 1
        a_numbers.update(an)
        b_numbers.update(bn)
        if r["b_number"]:
            b_numbers.add(r["b_number"])
        carriers.alert(r["carrier_id"], typ, r["severity"], an)
        per_hour[r["detected_at"].astimezone(z).hour][r["severity"]] += 1
        resolved = r["resolved_at"] if r["status"] in ("RESOLVED", "FALSE_POSITIVE") else None
        secs = (resolved - r["detected_at"]).total_seconds() if resolved is not None else None
        if secs is not None:
            ttr.append(secs)
        alerts.append({
            "ncc_incident_id": r["ncc_incident_id"], "alert_id": str(r["alert_id"]),
            "alert_type": r["alert_type"], "type": typ, "severity": r["severity"],
            "b_number": r["b_number"], "a_number_count": len(an),
            "distinct_count": r["distinct_count"],
            "detection_window_ms": r["detection_window_ms"],
            "detected_at": _iso(r["detected_at"]),
            "last_detected_at": _iso(r["last_detected_at"]), "status": r["status"],
            "assigned_to": r["assigned_to"], "resolved_at": _iso(r["resolved_at"]),
            "time_to_resolve_s": None if secs is None else round(secs, 3),
            "carrier_id": r["carrier_id"], "gateway_id": r["gateway_id"],
            "a_number": r["a_number"] or "", "a_numbers": an, "b_numbers": bn})
    actions, lifecycle, disconnected = _audit(conn, [a["alert_id"] for a in alerts])
    calls, source = _call_counts(questdb_url, start, end)
    dropped, dropped_by = _dropped(calls)
    if calls is not None:
        carriers.calls(calls)
    conn.commit()
    return DailyStats(
        date=day.isoformat(), timezone=tz, period_start=_iso(start) or "",
        period_end=_iso(end) or "", generated_at=_iso(now or datetime.now(UTC)) or "",
        operator_code=operator_code, alerts_total=len(rows), alerts_by_severity=by_sev,
        alerts_by_status=by_status, distinct_a_numbers=len(a_numbers),
        distinct_b_numbers=len(b_numbers), calls_dropped=dropped,
        calls_dropped_by_reason=dropped_by, calls_dropped_source=source, actions=actions,
        calls_store_unavailable=None if calls is None else sum(
            n for _, v, _, n in calls if v == UNANSWERED),
        calls_disconnected=disconnected, lifecycle_changes=lifecycle,
        time_to_resolve_s=_summary(ttr), alerts_per_hour=per_hour, alerts_by_type=by_type,
        carriers=carriers.rows(with_calls=calls is not None), alerts=alerts)


def _json_list(v: Any) -> list[str]:
    return v if isinstance(v, list) else json.loads(v)


class _Carriers:
    """The per-carrier breakdown, filled from the day's alerts and call counts."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, Any]] = {}
        self.a_numbers: dict[str, set[str]] = {}

    def _row(self, carrier_id: str) -> dict[str, Any]:
        row = self.by.get(carrier_id)
        if row is None:
            row = self.by[carrier_id] = {
                "carrier_id": carrier_id, "calls_decided": 0, "calls_dropped": 0,
                "calls_dropped_by_reason": dict.fromkeys(DROP_REASONS, 0),
                "calls_store_unavailable": 0, "alerts_total": 0,
                "alerts_by_type": dict.fromkeys(ALERT_TYPES, 0),
                "alerts_by_type_severity": {t: dict.fromkeys(SEVERITIES, 0)
                                            for t in ALERT_TYPES},
                "distinct_a_numbers": 0}
            self.a_numbers[carrier_id] = set()
        return row

    def alert(self, carrier_id: str, typ: str, severity: str, a_numbers: list[str]) -> None:
        row = self._row(carrier_id)
        row["alerts_total"] += 1
        row["alerts_by_type"][typ] = row["alerts_by_type"].get(typ, 0) + 1
        sev = row["alerts_by_type_severity"].setdefault(typ, dict.fromkeys(SEVERITIES, 0))
        sev[severity] = sev.get(severity, 0) + 1
        self.a_numbers[carrier_id].update(a_numbers)

    def calls(self, counts: list[tuple[str, str, str, int]]) -> None:
        for carrier_id, verdict, reason, n in counts:
            row = self._row(carrier_id)
            if verdict == UNANSWERED:
                row["calls_store_unavailable"] += n
                continue
            row["calls_decided"] += n
            if verdict == "drop":
                row["calls_dropped"] += n
                by = row["calls_dropped_by_reason"]
                by[reason] = by.get(reason, 0) + n

    def rows(self, with_calls: bool) -> list[dict[str, Any]]:
        """Return one row per carrier, by id, the unattributed ("") last."""
        out = []
        for cid in sorted(self.by, key=lambda c: (c == "", c)):
            row = self.by[cid]
            row["distinct_a_numbers"] = len(self.a_numbers[cid])
            if not with_calls:  # no QuestDB: unknown, not zero
                row.update(calls_decided=None, calls_dropped=None, calls_dropped_by_reason={},
                           calls_store_unavailable=None)
            out.append(row)
        return out


def _audit(conn: psycopg.Connection, alert_ids: list[str]
           ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], int]:
    actions: dict[str, dict[str, int]] = {}
    lifecycle: dict[str, dict[str, int]] = {}
    disconnected = 0
    if not alert_ids:
        return actions, lifecycle, 0
    for action, outcome, new in conn.execute(_AUDIT, (alert_ids, list(LIFECYCLE_ACTIONS))):
        if action.startswith("action."):
            name = action[len("action."):]
            bucket = actions.setdefault(name, {})
            if name == "disconnect" and isinstance(new, dict):
                disconnected += len(new.get("ended") or ())
        else:
            bucket = lifecycle.setdefault(action, {})
        bucket[outcome] = bucket.get(outcome, 0) + 1
    return actions, lifecycle, disconnected


def _call_counts(questdb_url: str, start: datetime, end: datetime
                 ) -> tuple[list[tuple[str, str, str, int]] | None, str]:
    """Return the day's call_events counted by (carrier, verdict, reason) and their source;
    None when QuestDB is not configured."""
    if not questdb_url:
        return None, "unavailable: questdb_url is not set (call_events live in QuestDB)"
    from acm_module.persist.questdb import QuestDB, parse_conf

    _, base, auth = parse_conf(questdb_url)
    q = QuestDB(base, auth)
    # QuestDB timestamps are UTC: a day in the report's time zone is converted first.
    lo = start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    hi = end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    # Timestamps are literals built from datetimes, never user text. An unattributed call's
    # carrier_id is null.
    rows = q.rows("SELECT carrier_id, verdict, reason, status, count() FROM call_events WHERE "
                  f"timestamp >= '{lo}' AND timestamp < '{hi}'")
    # A call whose caller got store_unavailable is neither decided nor clean: counted apart.
    return [(r[0] or "", UNANSWERED if r[3] == "STORE_UNAVAILABLE" else str(r[1]), str(r[2]),
             int(r[4])) for r in rows], "questdb:call_events"


def _dropped(calls: list[tuple[str, str, str, int]] | None) -> tuple[int | None, dict[str, int]]:
    """Return (calls dropped, by reason) of the call counts (None, {} without them)."""
    if calls is None:
        return None, {}
    by: dict[str, int] = {}
    for _, verdict, reason, n in calls:
        if verdict == "drop":
            by[reason] = by.get(reason, 0) + n
    return sum(by.values()), by


def _calls_dropped(questdb_url: str, start: datetime, end: datetime
                   ) -> tuple[int | None, dict[str, int], str]:
    """Return (calls dropped, by reason, source) of a period."""
    calls, source = _call_counts(questdb_url, start, end)
    return (*_dropped(calls), source)


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    s = sorted(values)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"count": len(s), "mean": round(statistics.fmean(s), 3),
            "median": round(statistics.median(s), 3), "p90": round(p90, 3),
            "max": round(s[-1], 3)}
