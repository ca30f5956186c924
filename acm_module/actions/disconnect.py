"""End the attack's calls that are already up, through OpenSIPS MI `dlg_end_dlg`.

Which calls: those the decision path *allowed* as clean (verdict allow, reason clean) from the
alert's A-numbers to its B-number within the alert's window (first detection - window .. last
detection). Their Call-IDs come from the decision records of the B-number's partition stream,
read backwards from the alert record. The routing script creates a dialog for every allowed
INVITE, so each of them is a dialog OpenSIPS can end.

OpenSIPS 3.x (modules/dialog, `dlg_end_dlg`): params `dialog_id` (the numeric dialog id *or* the
SIP Call-ID) and optional `extra_hdrs` (added to both BYEs, CRLF-terminated). It answers
`"result": "OK"`, or the JSON-RPC errors 404 "Requested Dialog not found" (already over),
403 (backup node of a replicated dialog) and 500 "Operation failed"; -32602 for bad params.
A dialog still ringing is CANCELled instead. mi_http answers HTTP 200 for results and errors
alike; mi_datagram sends the same JSON back to the sender's address.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from acm_module.control.mi_client import MIClient
from acm_module.core import records
from acm_module.core.errors import MIReplyError, MIUnavailable
from acm_module.core.records import AlertChange
from acm_module.core.redis import Client

log = logging.getLogger("acm.actions.disconnect")

END_COMMAND = "dlg_end_dlg"
NOT_FOUND = 404


def reason_header(alert_id: str, cause: int = 21) -> str:
    """Return the `extra_hdrs` value: a Q.850 Reason header naming the alert, CRLF-terminated."""
    return f'Reason: Q.850;cause={int(cause)};text="acm masking alert {alert_id}"\r\n'


def opensips_mi(url: str, timeout: float = 2.0) -> MIClient:
    """Return the client of OpenSIPS's MI at url (opensips_mi_url: http(s)://, udp: or unix:).
    Raises ValueError for another URL."""
    return MIClient(url, timeout, name="OpenSIPS MI")


# -- which calls ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackCall:
    """An allowed call of the attack, still possibly up."""

    call_id: str
    a: str
    ts_ms: int


def entry_ms(entry_id: str) -> int:
    """Return the millisecond part of a stream entry id."""
    return int(entry_id.split("-", 1)[0])


def find_attack_calls(conn: Client, alert: AlertChange, *, page: int = 1000,
                      max_scan: int = 200_000, slack_ms: int = 30_000) -> list[AttackCall]:
    """Return the clean, allowed calls from the alert's A-numbers to its B-number in its window.

    Reads the partition stream backwards from the alert record (`alert.sid` is
    "<stream>/<entry id>") until entries are older than the window plus `slack_ms` of append
    time, or `max_scan` entries. Raises StoreError.
    """
    stream, _, alert_entry = alert.sid.partition("/")
    a_numbers = set(alert.a_numbers)
    lo_ts = alert.first_ms - alert.window_ms
    stop_ms = entry_ms(alert_entry) - alert.window_ms - (alert.last_ms - alert.first_ms) - slack_ms
    found: dict[str, AttackCall] = {}
    end = "(" + alert_entry
    scanned = 0
    while scanned < max_scan:
        raw = conn.xrevrange(stream, end, "-", count=page)
        if not raw:
            break
        for eid, entry in raw:
            scanned += 1
            f = records.fields(entry)
            if f.get("k") != "d" or f.get("b") != alert.b:
                continue
            try:
                d = records.parse_decision(f"{stream}/{eid.decode()}", f)
            except records.RecordError:
                continue  # poison: the writer dead-letters it
            if (d.verdict == "allow" and d.reason == "clean" and d.a in a_numbers
                    and lo_ts <= d.ts_ms <= alert.last_ms):
                found.setdefault(d.call_id, AttackCall(d.call_id, d.a, d.ts_ms))
        last = raw[-1][0].decode()
        if entry_ms(last) < stop_ms or len(raw) < page:
            break
        end = "(" + last
    return sorted(found.values(), key=lambda c: (c.ts_ms, c.call_id))


# -- ending them ----------------------------------------------------------------------------
@dataclass
class DisconnectResult:
    """What happened to each call: ended, already gone (404) or failed (with the reason)."""

    ended: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """Return ok (nothing failed), partial, failed (all failed) or noop (no call)."""
        total = len(self.ended) + len(self.not_found) + len(self.failed)
        if total == 0:
            return "noop"
        if not self.failed:
            return "ok"
        return "failed" if len(self.failed) == total else "partial"

    def to_json(self) -> dict[str, Any]:
        return {"ended": self.ended, "not_found": self.not_found, "failed": self.failed}


class Disconnector:
    """Ends calls by Call-ID through `dlg_end_dlg`, retrying an unreachable endpoint."""

    def __init__(self, mi: MIClient, cause: int = 21, attempts: int = 3,
                 retry_wait_s: float = 0.2) -> None:
        self.mi = mi
        self.cause = cause
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s

    def end_calls(self, alert_id: str, call_ids: list[str]) -> DisconnectResult:
        """End every call; never raises (each call's fate is in the result)."""
        out = DisconnectResult()
        hdrs = reason_header(alert_id, self.cause)
        for cid in call_ids:
            for attempt in range(1, self.attempts + 1):
                try:
                    self.mi.execute(END_COMMAND, {"dialog_id": cid, "extra_hdrs": hdrs})
                except MIReplyError as e:
                    if e.code == NOT_FOUND:
                        out.not_found.append(cid)
                    else:
                        out.failed[cid] = f"{e.code} {e.message}"
                    break
                except MIUnavailable as e:
                    if attempt == self.attempts:
                        out.failed[cid] = str(e)
                    else:
                        time.sleep(self.retry_wait_s * attempt)
                else:
                    out.ended.append(cid)
                    break
        log.info("alert %s: ended %d call(s), %d already gone, %d failed", alert_id,
                 len(out.ended), len(out.not_found), len(out.failed))
        return out

