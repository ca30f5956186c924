"""NCC incident ids: one per alert when reporting is enabled (`ncc_reporting`).

Format: `NCC-<OPERATOR>-<YYYYMMDD>-<SEQ>`, e.g. `NCC-MTN-20261126-00042`:
- OPERATOR: `operator_code`, upper-cased, 2-16 letters or digits;
- YYYYMMDD: the day the alert was first detected, in `report_timezone` (Africa/Lagos);
- SEQ: that operator's running number of the day, from 1, zero-padded to 5 digits (wider past
  99999). Numbers come from `ncc_incident_seq` in the same transaction that sets the id, so they
  are unique, and an alert keeps the id it got first (assigning again is a no-op).

The id is stored in fraud_alerts.ncc_incident_id. When the actions runner gets to an alert before
the writer has persisted it, the runner inserts the row from the same stream record the writer
uses (identical values, same version): the writer's versioned upsert then leaves it as it is, and
later escalations update it as usual.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from zoneinfo import ZoneInfo

import psycopg

from acm_module.core.records import AlertChange
from acm_module.write.pg import INSERT_ALERT, alert_row

_OPERATOR_RE = re.compile(r"^[A-Z0-9]{2,16}$")
_ID_RE = re.compile(r"^NCC-([A-Z0-9]{2,16})-(\d{8})-(\d{5,})$")

# Same columns, in alert_row()'s order, as the writer's upsert; a row already there is kept.
_INSERT_IF_ABSENT = INSERT_ALERT + " ON CONFLICT (alert_id) DO NOTHING"
_NEXT_SEQ = """
INSERT INTO ncc_incident_seq (operator_code, day, last_seq) VALUES (%s, %s, 1)
ON CONFLICT (operator_code, day) DO UPDATE SET last_seq = ncc_incident_seq.last_seq + 1
RETURNING last_seq
"""


def operator(code: str) -> str:
    """Return the normalised operator code. Raises ValueError."""
    c = code.strip().upper()
    if not _OPERATOR_RE.match(c):
        raise ValueError(f"operator_code {code!r}: must be 2-16 letters or digits")
    return c


def incident_id(operator_code: str, day: date, seq: int) -> str:
    """Return the incident id of an operator's `seq`-th alert of `day`."""
    return f"NCC-{operator(operator_code)}-{day:%Y%m%d}-{seq:05d}"


def parse_incident_id(value: str) -> tuple[str, date, int]:
    """Return (operator, day, seq) of an incident id. Raises ValueError."""
    m = _ID_RE.match(value)
    if not m:
        raise ValueError(f"not an NCC incident id: {value!r}")
    return m.group(1), datetime.strptime(m.group(2), "%Y%m%d").date(), int(m.group(3))


def assign(conn: psycopg.Connection, alert_id: str, operator_code: str, tz: str
           ) -> tuple[str, bool]:
    """Give an alert its incident id in one transaction; return (id, newly assigned).

    Raises LookupError when the alert has no fraud_alerts row, psycopg.Error.
    """
    op = operator(operator_code)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT ncc_incident_id, detected_at FROM fraud_alerts "
                    "WHERE alert_id = %s FOR UPDATE", (alert_id,))
        row = cur.fetchone()
        if row is None:
            raise LookupError(f"alert {alert_id} is not in fraud_alerts")
        if row[0]:
            return row[0], False
        day = row[1].astimezone(ZoneInfo(tz)).date()
        cur.execute(_NEXT_SEQ, (op, day))
        seq_row = cur.fetchone()
        assert seq_row is not None
        nid = incident_id(op, day, int(seq_row[0]))
        cur.execute("UPDATE fraud_alerts SET ncc_incident_id = %s, updated_at = NOW() "
                    "WHERE alert_id = %s", (nid, alert_id))
        return nid, True


def assign_for_change(conn: psycopg.Connection, alert: AlertChange, operator_code: str,
                      tz: str) -> tuple[str, bool]:
    """Assign the id of a streamed alert, inserting its row first if the writer has not yet."""
    with conn.transaction():
        conn.execute(_INSERT_IF_ABSENT, alert_row(alert))
    return assign(conn, alert.alert_id, operator_code, tz)


def assign_missing(conn: psycopg.Connection, start: datetime, end: datetime,
                   operator_code: str, tz: str) -> list[str]:
    """Give every alert detected in [start, end) without an id one, oldest first."""
    rows = conn.execute("SELECT alert_id FROM fraud_alerts WHERE detected_at >= %s AND "
                        "detected_at < %s AND ncc_incident_id IS NULL ORDER BY detected_at, "
                        "alert_id", (start, end)).fetchall()
    conn.commit()
    return [assign(conn, str(r[0]), operator_code, tz)[0] for r in rows]
