"""The audit trail: who changed what, when, from which value to which.

Every state change made through MI (settings, whitelist, blocks) becomes one AuditRecord, written
through the control repository (a store stream now, the audit_log table once the writer's
PostgreSQL repository is plugged in). Tokens and other secrets never enter a record.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

_SECRET_KEYS = frozenset({"token", "mi_token", "password"})


@dataclass(frozen=True)
class Caller:
    """Who is calling and through what: the audit trail's "who"."""

    actor: str  # name given by the caller (acm mi sends the login name), else "anonymous"
    via: str  # transport and peer, e.g. "http:127.0.0.1:53122", "datagram:unix", "event"
    role: str = "read"  # "admin" or "read"

    def __str__(self) -> str:
        return f"{self.actor}@{self.via}"


@dataclass(frozen=True)
class AuditRecord:
    """One change."""

    action: str  # the MI method, e.g. acm_set
    actor: str
    via: str
    target: str  # what changed: "config", a B-number, an A-number
    old: Any
    new: Any
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    id: str = ""  # set by the repository

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict (with an ISO 8601 `at`)."""
        d = asdict(self)
        d["at"] = iso_ms(self.ts_ms)
        return d


def iso_ms(ms: int | float | None) -> str | None:
    """Format epoch milliseconds as ISO 8601 UTC, or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000.0, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def redact(value: Any) -> Any:
    """Return value with secret-looking entries replaced, for records and logs."""
    if isinstance(value, dict):
        return {k: ("***" if k in _SECRET_KEYS else redact(v)) for k, v in value.items()}
    return value


def record(repo: Any, caller: Caller, action: str, target: str, old: Any, new: Any
           ) -> AuditRecord:
    """Build a change record, write it through the repository and return it (with its id)."""
    rec = AuditRecord(action=action, actor=caller.actor, via=caller.via, target=target,
                      old=redact(old), new=redact(new))
    rid = repo.audit_append(rec)
    return AuditRecord(**{**asdict(rec), "id": rid})
