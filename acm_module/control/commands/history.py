"""What happened: acm_alert_list (recent alerts) and acm_audit_list (the audit trail)."""

from __future__ import annotations

from typing import Any

from acm_module.control.audit import Caller
from acm_module.control.commands.base import (
    Command,
    Domain,
    Param,
    p_limit,
    p_number,
    p_severity,
    p_time_ms,
)
from acm_module.control.jsonrpc import param_str
from acm_module.control.repository import AlertQuery
from acm_module.core import numbers


class History(Domain):
    """Read alerts and audit records from the repository."""

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        return [
            Command("acm_alert_list", self.acm_alert_list, False,
                    "Recent alerts, newest first: [number] [severity] [since] [until] [limit].",
                    (Param("number", p_number), Param("severity", p_severity),
                     Param("since", p_time_ms), Param("until", p_time_ms),
                     Param("limit", p_limit, default=50), Param("scan", p_limit, default=5000))),
            Command("acm_audit_list", self.acm_audit_list, False,
                    "The audit trail, newest first: [action] [target] [since] [limit].",
                    (Param("action", param_str), Param("target", param_str),
                     Param("since", p_time_ms), Param("limit", p_limit, default=50))),
        ]

    def acm_alert_list(self, caller: Caller, number: str | None = None,
                       severity: str | None = None, since: int | None = None,
                       until: int | None = None, limit: int = 50, scan: int = 5000
                       ) -> dict[str, Any]:
        """List recent alerts (store: the newest `scan` records of each partition stream)."""
        alerts = self.plane.repo.alert_list(AlertQuery(
            b_number=number, min_severity=severity, since_ms=since, until_ms=until, limit=limit,
            scan=scan))
        return {"count": len(alerts), "alerts": alerts, "source": self.plane.repo.name}

    def acm_audit_list(self, caller: Caller, action: str | None = None,
                       target: str | None = None, since: int | None = None, limit: int = 50
                       ) -> dict[str, Any]:
        """List audit records, newest first."""
        if target is not None:
            target = numbers.normalise(target, self.settings.default_country_code) or target
        recs = self.plane.repo.audit_list(limit=limit, since_ms=since, action=action,
                                          target=target)
        return {"count": len(recs), "records": [r.to_json() for r in recs]}
