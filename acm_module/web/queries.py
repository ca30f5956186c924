"""Reads the API composes from several sources: an alert's detail, the daily report's figures."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from fastapi import Request

from acm_module.control.audit import iso_ms
from acm_module.control.repository import AlertQuery
from acm_module.core import keys, numbers, records
from acm_module.web.security import ApiError, Principal
from acm_module.write.base import SinkRejected, SinkUnavailable

_STREAM_SCAN = 5000  # decision records read back from the B-number's partition stream
_CALLS_MAX = 500
_QUESTDB_TIMEOUT_S = 2.0  # an episode page never waits longer on QuestDB: it degrades


def find_alert(svc: Any, p: Principal, request: Request, alert_id: str) -> dict[str, Any]:
    """Return the alert: its fraud_alerts row (database), else its latest stream record."""
    if svc.settings.database_url:
        row: dict[str, Any] = svc.run(p, request, "acm_alert_show", alert_id=alert_id)
        row.setdefault("a_number_count", len(row.get("a_numbers") or []))
        row.setdefault("last_detection_at", row.get("last_detected_at"))
        for key, at in (("first_detection_ms", "detected_at"),
                        ("last_detection_ms", "last_detection_at")):
            if row.get(at):
                row[key] = int(datetime.fromisoformat(row[at]).timestamp() * 1000)
        return row
    with svc.control._lock:
        alerts = svc.control.repo.alert_list(AlertQuery(limit=10_000, scan=_STREAM_SCAN))
    for a in alerts:
        if a["alert_id"] == alert_id:
            a.setdefault("status", "NEW")
            return dict(a)
    raise ApiError(404, "not_found", f"alert {alert_id} not found")


def alert_calls(svc: Any, alert: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
    """Return the calls to the alert's B-number during its episode (from one window before its
    first detection to its last), oldest first, where they were read, and why QuestDB was not.

    The stream holds only what `acm writer` has not trimmed yet; QuestDB's call_events (when
    questdb_url is set) holds the rest. Both are read and merged by call id; a QuestDB that
    fails or is slower than _QUESTDB_TIMEOUT_S leaves the stream's calls and a warning.
    """
    first = int(alert.get("first_detection_ms") or 0) - int(
        alert.get("detection_window_ms") or 0)
    last = int(alert.get("last_detection_ms") or 0)
    calls = {c["call_id"]: c for c in _stream_calls(svc, alert, first, last)}
    source, warning = "stream", None
    if svc.settings.questdb_url and last > 0:  # bounds known: QuestDB scans only the episode
        try:
            stored = _questdb_calls(svc.settings.questdb_url, alert["b_number"], first, last)
        except (SinkUnavailable, SinkRejected, ValueError) as e:
            warning = f"questdb unavailable, calls from the stream only: {e}"[:300]
        else:
            source = "questdb+stream"
            for c in stored:
                calls.setdefault(c["call_id"], c)
    elif svc.settings.questdb_url:
        warning = "the alert has no detection times: calls from the stream only"
    out = sorted(calls.values(), key=lambda c: (c["ts_ms"], c["call_id"]))
    return out[-_CALLS_MAX:], source, warning


def _call(call_id: str, a: str, ts_ms: int, verdict: str, reason: str, distinct: int,
          carrier: str | None, gateway: str | None) -> dict[str, Any]:
    return {"call_id": call_id, "a_number": a, "at": iso_ms(ts_ms), "ts_ms": ts_ms,
            "verdict": verdict, "reason": reason, "distinct": distinct,
            "carrier_id": carrier or "", "gateway_id": gateway or ""}


def _stream_calls(svc: Any, alert: dict[str, Any], first: int, last: int
                  ) -> list[dict[str, Any]]:
    """Return the episode's calls still in the B-number's partition stream, newest first."""
    b_number, alert_id = alert["b_number"], alert["alert_id"]
    part = numbers.partition_of(b_number, svc.settings.partitions)
    with svc.control._lock:
        raw = svc.control.conn.execute_command("XREVRANGE", keys.stream(part), "+", "-",
                                               "COUNT", _STREAM_SCAN)
    calls = []
    stream = keys.stream(part)
    for rid, entry in raw:
        f = records.fields(entry)
        if f.get("k") != "d" or f.get("b") != b_number:
            continue
        try:
            d = records.parse_decision(f"{stream}/{rid.decode()}", f)
        except records.RecordError:
            continue  # poison: the writer dead-letters it
        if d.alert_id != alert_id and not first <= d.ts_ms <= last:
            continue
        calls.append(_call(d.call_id, d.a, d.ts_ms, d.verdict, d.reason, d.distinct,
                           d.carrier_id, d.gateway_id))
        if len(calls) >= _CALLS_MAX:
            break
    return calls


def _questdb_calls(questdb_url: str, b_number: str, first: int, last: int
                   ) -> list[dict[str, Any]]:
    """Return the episode's newest _CALLS_MAX calls in QuestDB's call_events.

    Raises SinkUnavailable (unreachable, timed out), SinkRejected (an SQL error).
    """
    from acm_module.write.questdb import QuestDB, literal, parse_conf  # the writer extra

    _, base, auth = parse_conf(questdb_url)
    q = QuestDB(base, auth, timeout=_QUESTDB_TIMEOUT_S)
    # The B-number is quoted by literal(); the bounds are integers (microseconds).
    rows = q.rows(
        "SELECT call_id, a_number, cast(timestamp AS LONG), verdict, reason, distinct_count, "
        f"carrier_id, gateway_id FROM call_events WHERE b_number = {literal(b_number)} "
        f"AND timestamp BETWEEN {int(first) * 1000} AND {int(last) * 1000} "
        f"ORDER BY timestamp DESC LIMIT {_CALLS_MAX}")
    return [_call(str(r[0]), str(r[1]), int(r[2]) // 1000, str(r[3]), str(r[4]),
                  int(r[5] or 0), r[6], r[7]) for r in rows]


def alert_detail(svc: Any, p: Principal, request: Request, alert_id: str) -> dict[str, Any]:
    """Return an alert with its calls, a timeline and the actions taken on it."""
    alert = find_alert(svc, p, request, alert_id)
    calls, source, warning = (alert_calls(svc, alert) if alert.get("b_number")
                              else ([], "stream", None))
    with svc.control._lock:
        recs = svc.control.repo.audit_list(limit=500, target=alert_id)
    actions = [r.to_json() for r in reversed(recs)]
    timeline: list[dict[str, Any]] = [
        {"at": c["at"], "kind": "call", "a_number": c["a_number"], "distinct": c["distinct"],
         "verdict": c["verdict"]} for c in calls]
    timeline += [{"at": a["at"], "kind": "action", "action": a["action"], "actor": a["actor"]}
                 for a in actions]
    timeline.sort(key=lambda e: e["at"] or "")
    notes = [n for n in (alert.get("notes") or "").splitlines() if n.strip()]
    return {"alert": alert, "calls": calls, "calls_source": source, "calls_warning": warning,
            "timeline": timeline, "actions": actions, "notes": notes}


def daily_stats(svc: Any, day: date) -> Any:
    """Compute a day's report statistics (needs database_url). Raises ApiError."""
    s = svc.settings
    if not s.database_url:
        raise ApiError(503, "not_configured", "daily reports need database_url")
    import psycopg

    from acm_module.compliance import stats

    try:
        with psycopg.connect(s.database_url, connect_timeout=5) as conn:
            return stats.compute(conn, day, s.report_timezone, s.operator_code, s.questdb_url)
    except psycopg.Error as e:
        raise ApiError(503, "unavailable",
                         f"database error: {type(e).__name__}".splitlines()[0]) from e
