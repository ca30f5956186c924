"""The alert lifecycle of the fraud team: NEW -> INVESTIGATING -> CONFIRMED | FALSE_POSITIVE,
CONFIRMED -> RESOLVED (domain.alerts.TRANSITIONS).

State lives in fraud_alerts (status, assigned_to, resolved_at, notes; the writer never touches
those columns). Each change is one transaction: the row is locked, the move is checked against
acm_module.domain.alerts.TRANSITIONS, the row is updated and its audit_log row inserted; a
FALSE_POSITIVE with `whitelist` also upserts the B-number into `whitelist` (and audits that) in
the same transaction. A refused change (an invalid transition, a final alert) is rolled back and
audited with outcome `rejected`.

- assign: sets assigned_to; a NEW alert moves to INVESTIGATING (taking an alert is starting to
  investigate it). A RESOLVED or FALSE_POSITIVE alert cannot be assigned.
- status: any allowed move; RESOLVED and FALSE_POSITIVE set resolved_at (now).
- note: appends "<ISO time> <actor>: <text>" as a line of notes (any status).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from acm_module.actions.errors import AlertNotFound, DatabaseUnavailable, InvalidTransition
from acm_module.domain.alerts import TRANSITIONS, AlertStatus

_COLUMNS = ("alert_id, alert_type, severity, b_number, a_numbers, detection_window_ms, "
            "detected_at, last_detected_at, distinct_count, status, ncc_incident_id, "
            "assigned_to, resolved_at, notes, created_at, updated_at, version")
_AUDIT = """
INSERT INTO audit_log (actor, action, target, old, new, outcome, details)
VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id
"""
MAX_NOTE = 4000
MAX_NAME = 255


@dataclass(frozen=True)
class Change:
    """The result of one lifecycle command."""

    alert: dict[str, Any]
    audit_ids: list[int]
    whitelisted: dict[str, Any] | None = None  # the whitelist row, when FALSE_POSITIVE did it


def _iso(v: Any) -> Any:
    return v.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") \
        if isinstance(v, datetime) else v


def _view(cols: list[str], row: tuple) -> dict[str, Any]:
    d = {c: _iso(v) for c, v in zip(cols, row, strict=True)}
    d["alert_id"] = str(d["alert_id"])
    return d


def _state(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a.get(k) for k in ("status", "assigned_to", "resolved_at")}


class Lifecycle:
    """Lifecycle commands on PostgreSQL/YugabyteDB; one short connection per command."""

    def __init__(self, database_url: str, connect_timeout: float = 5.0,
                 statement_timeout_ms: int = 10000) -> None:
        if not database_url:
            raise ValueError("the alert lifecycle needs database_url (fraud_alerts)")
        self.database_url = database_url
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.database_url,
                                   connect_timeout=max(1, int(self.connect_timeout)),
                                   options=f"-c statement_timeout={self.statement_timeout_ms}")
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(f"database unavailable: {type(e).__name__}") from e

    # -- reads -----------------------------------------------------------------------------
    def get(self, alert_id: str) -> dict[str, Any]:
        """Return an alert row. Raises AlertNotFound, DatabaseUnavailable."""
        with self._connect() as conn:
            return self._load(conn, alert_id, lock=False)

    def _load(self, conn: psycopg.Connection, alert_id: str, lock: bool) -> dict[str, Any]:
        cur = conn.execute(f"SELECT {_COLUMNS} FROM fraud_alerts WHERE alert_id = %s"
                           + (" FOR UPDATE" if lock else ""), (alert_id,))
        row = cur.fetchone()
        if row is None:
            raise AlertNotFound(f"alert {alert_id} not found (not persisted yet?)")
        assert cur.description is not None
        return _view([d.name for d in cur.description], row)

    # -- commands --------------------------------------------------------------------------
    def assign(self, alert_id: str, assignee: str, actor: str, via: str = "",
               note: str | None = None) -> Change:
        """Set assigned_to (NEW moves to INVESTIGATING). Raises InvalidTransition, ..."""
        assignee = assignee.strip()
        if not 0 < len(assignee) <= MAX_NAME:
            raise ValueError(f"assignee: must be 1 to {MAX_NAME} characters")

        def apply(conn: psycopg.Connection, old: dict[str, Any]) -> tuple[str, list[Any]]:
            status = AlertStatus(old["status"])
            if not TRANSITIONS[status]:
                raise InvalidTransition(f"alert {alert_id} is {status.value}: it cannot be "
                                        "assigned")
            new_status = AlertStatus.INVESTIGATING if status is AlertStatus.NEW else status
            return ("status = %s, assigned_to = %s", [new_status.value, assignee])

        return self._change(alert_id, "acm_alert_assign", actor, via, apply, note)

    def set_status(self, alert_id: str, status: str, actor: str, via: str = "",
                   note: str | None = None, whitelist: bool = False,
                   whitelist_reason: str | None = None) -> Change:
        """Move an alert to `status`; FALSE_POSITIVE may whitelist its B-number in the same step.

        Raises InvalidTransition, AlertNotFound, DatabaseUnavailable, ValueError.
        """
        try:
            target = AlertStatus(status.strip().upper())
        except ValueError as e:
            raise ValueError(f"status: must be one of "
                             f"{', '.join(s.value for s in AlertStatus)}") from e
        if whitelist and target is not AlertStatus.FALSE_POSITIVE:
            raise ValueError("whitelist: only with status FALSE_POSITIVE")

        def apply(conn: psycopg.Connection, old: dict[str, Any]) -> tuple[str, list[Any]]:
            current = AlertStatus(old["status"])
            if target not in TRANSITIONS[current]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
                raise InvalidTransition(f"alert {alert_id}: {current.value} -> {target.value} "
                                        f"is not allowed (allowed: {allowed})")
            if target in (AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE):
                return "status = %s, resolved_at = NOW()", [target.value]
            return "status = %s", [target.value]

        wl = None
        if whitelist:
            wl = (whitelist_reason or "").strip() or f"false positive of alert {alert_id}"
            if len(wl) > MAX_NAME:
                raise ValueError(f"reason: at most {MAX_NAME} characters")
        return self._change(alert_id, "acm_alert_status", actor, via, apply, note, wl)

    def add_note(self, alert_id: str, note: str, actor: str, via: str = "") -> Change:
        """Append a note line. Raises AlertNotFound, DatabaseUnavailable, ValueError."""
        if not note.strip():
            raise ValueError("note: must not be empty")

        def apply(conn: psycopg.Connection, old: dict[str, Any]) -> tuple[str, list[Any]]:
            return "", []

        return self._change(alert_id, "acm_alert_note", actor, via, apply, note)

    # -- the one transaction ---------------------------------------------------------------
    def _change(self, alert_id: str, action: str, actor: str, via: str, apply: Any,
                note: str | None, whitelist_reason: str | None = None) -> Change:
        if note is not None and len(note) > MAX_NOTE:
            raise ValueError(f"note: at most {MAX_NOTE} characters")
        details = f"via {via}" if via else None
        with self._connect() as conn:
            try:
                with conn.transaction():
                    old = self._load(conn, alert_id, lock=True)
                    sets, params = apply(conn, old)
                    parts = [sets] if sets else []
                    if note is not None and note.strip():
                        line = f"{_iso(datetime.now(UTC))} {actor}: {note.strip()}"
                        parts.append("notes = CASE WHEN notes IS NULL OR notes = '' THEN %s "
                                     "ELSE notes || E'\\n' || %s END")
                        params += [line, line]
                    parts.append("updated_at = NOW()")
                    conn.execute(f"UPDATE fraud_alerts SET {', '.join(parts)} "
                                 "WHERE alert_id = %s", [*params, alert_id])
                    new = self._load(conn, alert_id, lock=False)
                    old_j, new_j = _state(old), _state(new)
                    if note is not None:
                        new_j["note"] = note.strip()
                    ids = [self._audit(conn, actor, action, alert_id, old_j, new_j, "ok",
                                       details)]
                    wl_row = None
                    if whitelist_reason is not None:
                        wl_row, wl_old = self._whitelist(conn, new["b_number"],
                                                         whitelist_reason, actor)
                        ids.append(self._audit(conn, actor, "acm_whitelist_add",
                                               new["b_number"], wl_old, wl_row, "ok",
                                               f"false positive of alert {alert_id}"
                                               + (f"; {details}" if details else "")))
                    return Change(new, ids, wl_row)
            except InvalidTransition as e:
                self._audit(conn, actor, action, alert_id, _state(old), None, "rejected",
                            str(e)[:1000])
                conn.commit()
                raise
            except psycopg.OperationalError as e:
                raise DatabaseUnavailable(f"database unavailable: {type(e).__name__}") from e

    @staticmethod
    def _audit(conn: psycopg.Connection, actor: str, action: str, target: str, old: Any,
               new: Any, outcome: str, details: str | None) -> int:
        row = conn.execute(_AUDIT, (actor, action, target,
                                    None if old is None else Jsonb(old),
                                    None if new is None else Jsonb(new), outcome,
                                    details)).fetchone()
        assert row is not None
        return int(row[0])

    @staticmethod
    def _whitelist(conn: psycopg.Connection, b_number: str, reason: str, actor: str
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        cur = conn.execute("SELECT b_number, reason, created_by, created_at, expires_at "
                           "FROM whitelist WHERE b_number = %s FOR UPDATE", (b_number,))
        prev = cur.fetchone()
        keys = ("b_number", "reason", "created_by", "created_at", "expires_at")
        old = None if prev is None else {k: _iso(v) for k, v in zip(keys, prev, strict=True)}
        row = conn.execute(
            "INSERT INTO whitelist (b_number, reason, created_by) VALUES (%s, %s, %s) "
            "ON CONFLICT (b_number) DO UPDATE SET reason = EXCLUDED.reason, "
            "created_by = EXCLUDED.created_by, created_at = NOW(), expires_at = NULL "
            "RETURNING b_number, reason, created_by, created_at, expires_at",
            (b_number, reason, actor[:MAX_NAME])).fetchone()
        assert row is not None
        return {k: _iso(v) for k, v in zip(keys, row, strict=True)}, old
