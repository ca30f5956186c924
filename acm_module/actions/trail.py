"""Where actions are recorded: the audit trail (one row per action, with its outcome) and the
ledger that makes the runner idempotent.

Audit: the `audit_log` table (PostgreSQL/YugabyteDB) when `database_url` is set, else the control
plane's audit stream `{acm.ctl}:audit` in the store (the outcome inside `new`), so
`acm mi acm_audit_list action=action.disconnect` shows actions either way. A database that is
down does not lose the row: it goes to the store stream with a note.

Ledger: HASH `{acm.act}:<alert_id>` in the store: `<trigger>:<action>` -> outcome once done, and
`sev` -> the highest severity acted on (for escalations). Kept 7 days. A runner killed between
an action and its ledger entry repeats that action on restart (at-least-once): `dlg_end_dlg`
then answers 404 for a call already ended, and the webhook carries the same event id.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from acm_module.control.audit import AuditRecord, redact
from acm_module.control.repository import StoreRepository
from acm_module.core.pg import close_quietly
from acm_module.core.redis import Client

log = logging.getLogger("acm.actions")

ACTOR = "acm-actions"
LEDGER_TTL_MS = 7 * 86400 * 1000

_INSERT_AUDIT = """
INSERT INTO audit_log (actor, action, target, old, new, outcome, details)
VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id
"""


class ActionAudit:
    """Append action records to audit_log (or the store's audit stream)."""

    def __init__(self, store: Client, partitions: int, database_url: str = "",
                 connect_timeout: float = 5.0) -> None:
        self.store_repo = StoreRepository(store, partitions)
        self.database_url = database_url
        self.connect_timeout = connect_timeout
        self._db: psycopg.Connection | None = None

    def record(self, action: str, target: str, outcome: str, new: Any, details: str = "",
               old: Any = None, actor: str = ACTOR) -> str:
        """Write one row; return its id ("pg:<id>" or the stream entry id). Raises StoreError."""
        new, old = redact(new), redact(old)
        if self.database_url:
            try:
                return "pg:" + self._pg(actor, action, target, old, new, outcome, details)
            except psycopg.Error as e:
                log.error("audit_log unavailable (%s); %s %s recorded in the store",
                          type(e).__name__, action, target)
                details = f"{details} [audit_log unavailable: {type(e).__name__}]".strip()
        rec = AuditRecord(action=action, actor=actor, via="actions", target=target, old=old,
                          new={"outcome": outcome, "details": details, **(
                              new if isinstance(new, dict) else {"value": new})})
        return self.store_repo.audit_append(rec)

    def _pg(self, actor: str, action: str, target: str, old: Any, new: Any, outcome: str,
            details: str) -> str:
        for attempt in (1, 2):  # one reconnect: a server restart drops idle connections
            if self._db is None or self._db.closed:
                self._db = psycopg.connect(self.database_url, autocommit=True,
                                           connect_timeout=max(1, int(self.connect_timeout)))
            try:
                row = self._db.execute(_INSERT_AUDIT, (
                    actor, action, target[:255], None if old is None else Jsonb(old),
                    None if new is None else Jsonb(new), outcome[:20], details or None)
                ).fetchone()
                assert row is not None
                return str(row[0])
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the database connection (the store connection belongs to the caller)."""
        close_quietly(self._db)
        self._db = None


class Ledger:
    """What the runner has done per alert, in the store."""

    def __init__(self, store: Client) -> None:
        self.store = store

    @staticmethod
    def key(alert_id: str) -> str:
        return "{acm.act}:" + alert_id

    def done(self, alert_id: str, trigger: str, action: str) -> str | None:
        """Return the recorded outcome of an action, or None if it was not done."""
        r = self.store.hget(self.key(alert_id), f"{trigger}:{action}")
        return r.decode() if isinstance(r, bytes) else None

    def mark(self, alert_id: str, trigger: str, action: str, outcome: str) -> None:
        """Record that an action was done with this outcome."""
        self._set(alert_id, f"{trigger}:{action}", outcome)

    def severity(self, alert_id: str) -> str | None:
        """Return the highest severity acted on for an alert, or None."""
        r = self.store.hget(self.key(alert_id), "sev")
        return r.decode() if isinstance(r, bytes) else None

    def set_severity(self, alert_id: str, severity: str) -> None:
        self._set(alert_id, "sev", severity)

    def _set(self, alert_id: str, name: str, value: str) -> None:
        k = self.key(alert_id)
        pipe = self.store.pipeline(transaction=False)
        pipe.hset(k, name, value)
        pipe.pexpire(k, LEDGER_TTL_MS)
        pipe.execute()


def summary(d: dict[str, Any]) -> str:
    """Return a short one-line JSON of a details dict (for audit_log.details)."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)[:2000]
