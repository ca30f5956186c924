"""Daily statistics for the regulator, computed from the stored data only.

A report day is a calendar day in `report_timezone` (Africa/Lagos by default), [00:00, 24:00).

- alerts: the fraud_alerts rows whose `detected_at` (first detection, call time) is in the day,
  by their current severity (the band of the largest distinct count of the episode) and status;
- distinct A-numbers / B-numbers: over those alerts' `a_numbers` / `b_number`;
- calls dropped: QuestDB `call_events` rows of the day with verdict `drop` (by reason), when
  `questdb_url` is set; otherwise null, with the reason in `calls_dropped_source`;
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

SEVERITIES = ("LOW", "HIGH", "CRITICAL")
STATUSES = ("NEW", "INVESTIGATING", "RESOLVED", "FALSE_POSITIVE")
LIFECYCLE_ACTIONS = ("acm_alert_assign", "acm_alert_status", "acm_alert_note")

_ALERTS = """
SELECT alert_id, ncc_incident_id, alert_type, severity, b_number, a_numbers, distinct_count,
       detection_window_ms, detected_at, last_detected_at, status, assigned_to, resolved_at
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
    alerts: list[dict[str, Any]] = field(default_factory=list)

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
    a_numbers: set[str] = set()
    b_numbers: set[str] = set()
    per_hour = [{"hour": h, **dict.fromkeys(SEVERITIES, 0)} for h in range(24)]
    ttr: list[float] = []
    alerts: list[dict[str, Any]] = []
    for r in rows:
        an = r["a_numbers"] if isinstance(r["a_numbers"], list) else json.loads(r["a_numbers"])
        by_sev[r["severity"]] = by_sev.get(r["severity"], 0) + 1
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        a_numbers.update(an)
        b_numbers.add(r["b_number"])
        per_hour[r["detected_at"].astimezone(z).hour][r["severity"]] += 1
        resolved = r["resolved_at"] if r["status"] in ("RESOLVED", "FALSE_POSITIVE") else None
        secs = (resolved - r["detected_at"]).total_seconds() if resolved is not None else None
        if secs is not None:
            ttr.append(secs)
        alerts.append({
            "ncc_incident_id": r["ncc_incident_id"], "alert_id": str(r["alert_id"]),
            "alert_type": r["alert_type"], "severity": r["severity"],
            "b_number": r["b_number"], "a_number_count": len(an),
            "distinct_count": r["distinct_count"],
            "detection_window_ms": r["detection_window_ms"],
            "detected_at": _iso(r["detected_at"]),
            "last_detected_at": _iso(r["last_detected_at"]), "status": r["status"],
            "assigned_to": r["assigned_to"], "resolved_at": _iso(r["resolved_at"]),
            "time_to_resolve_s": None if secs is None else round(secs, 3),
            "a_numbers": an})
    actions, lifecycle, disconnected = _audit(conn, [a["alert_id"] for a in alerts])
    dropped, dropped_by, source = _calls_dropped(questdb_url, start, end)
    conn.commit()
    return DailyStats(
        date=day.isoformat(), timezone=tz, period_start=_iso(start) or "",
        period_end=_iso(end) or "", generated_at=_iso(now or datetime.now(UTC)) or "",
        operator_code=operator_code, alerts_total=len(rows), alerts_by_severity=by_sev,
        alerts_by_status=by_status, distinct_a_numbers=len(a_numbers),
        distinct_b_numbers=len(b_numbers), calls_dropped=dropped,
        calls_dropped_by_reason=dropped_by, calls_dropped_source=source, actions=actions,
        calls_disconnected=disconnected, lifecycle_changes=lifecycle,
        time_to_resolve_s=_summary(ttr), alerts_per_hour=per_hour, alerts=alerts)


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


def _calls_dropped(questdb_url: str, start: datetime, end: datetime
                   ) -> tuple[int | None, dict[str, int], str]:
    if not questdb_url:
        return None, {}, "unavailable: questdb_url is not set (call_events live in QuestDB)"
    from acm_module.persist.questdb import QuestDB, parse_conf

    _, base, auth = parse_conf(questdb_url)
    q = QuestDB(base, auth)
    # QuestDB timestamps are UTC: a day in the report's time zone is converted first.
    lo = start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    hi = end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    # Timestamps are literals built from datetimes, never user text.
    rows = q.rows("SELECT reason, count() FROM call_events WHERE verdict = 'drop' AND "
                  f"timestamp >= '{lo}' AND timestamp < '{hi}'")
    by = {str(r[0]): int(r[1]) for r in rows}
    return sum(by.values()), by, "questdb:call_events"


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    s = sorted(values)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"count": len(s), "mean": round(statistics.fmean(s), 3),
            "median": round(statistics.median(s), 3), "p90": round(p90, 3),
            "max": round(s[-1], 3)}
