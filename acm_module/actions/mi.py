"""MI commands of the alert lifecycle, added to the control plane by cli.py
(`Control(..., extra_commands=[lifecycle_commands])`).

| command | admin | parameters |
|---|---|---|
| `acm_alert_show` | no | `alert_id` |
| `acm_alert_assign` | yes | `alert_id`, `assignee`, `note`? |
| `acm_alert_status` | yes | `alert_id`, `status`, `note`?, `whitelist`? (bool), `reason`? |
| `acm_alert_note` | yes | `alert_id`, `note` |

`status` is INVESTIGATING, CONFIRMED, RESOLVED or FALSE_POSITIVE; `whitelist` goes only with
FALSE_POSITIVE and also sets, at once, the whitelist marker the decision script reads; `reason`
is the whitelist entry's. They need `database_url` (the alerts live in fraud_alerts).

Errors: -32602 bad parameters or an invalid transition (audited as `rejected`), -32004 unknown
alert, -32000 database unavailable, -32002 no database configured.

A committed assign or status change is also appended to the store's capped stream
`{acm.ctl}:lifecycle` (alert id, B-number, severity, status, assignee): the consoles' live
queues follow it, whichever client (console, REST API, MI, `acm alert`) made the change.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from acm_module.actions.errors import AlertNotFound, DatabaseUnavailable, InvalidTransition
from acm_module.control import jsonrpc
from acm_module.control.audit import Caller
from acm_module.control.commands import Command, Param
from acm_module.control.jsonrpc import MIError, bad_params, param_bool, param_str
from acm_module.control.repository import (
    LIFECYCLE_FIELDS,
    LIFECYCLE_MAXLEN,
    LIFECYCLE_STREAM,
    WhitelistEntry,
)
from acm_module.core import liveconfig as store_config
from acm_module.core.errors import StoreError

log = logging.getLogger("acm.actions")


def _p_uuid(v: Any) -> str:
    try:
        return str(uuid.UUID(str(v)))
    except ValueError as e:
        raise ValueError("must be an alert id (UUID)") from e


class LifecycleCommands:
    """The handlers; `settings` is the control plane's (used to normalise numbers)."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.settings = control.settings

    def _lifecycle(self) -> Any:
        from acm_module.actions.lifecycle import Lifecycle  # psycopg: the writer extra

        url = getattr(self.settings, "database_url", "")
        if not url:
            raise MIError(jsonrpc.CONFIG_INVALID,
                          "the alert lifecycle needs database_url (DATABASE_URL)")
        return Lifecycle(url)

    def _run(self, fn: Any) -> Any:
        try:
            return fn(self._lifecycle())
        except AlertNotFound as e:
            raise MIError(jsonrpc.NOT_FOUND, str(e)) from e
        except InvalidTransition as e:
            raise bad_params(str(e)) from e
        except DatabaseUnavailable as e:
            raise MIError(jsonrpc.STORE_UNAVAILABLE, str(e)) from e
        except ValueError as e:
            raise bad_params(str(e)) from e

    def _announce(self, alert: dict[str, Any]) -> None:
        """Append a committed change to the lifecycle stream the consoles' live queues follow.

        Best effort: the change is in fraud_alerts and the audit trail already; a store that
        fails here costs the open queues a live update, not the caller its answer.
        """
        fields: list[Any] = []
        for k in LIFECYCLE_FIELDS:
            fields += [k, str(alert.get(k) or "")]
        try:
            self.control.conn.execute_command("XADD", LIFECYCLE_STREAM, "MAXLEN", "~",
                                              LIFECYCLE_MAXLEN, "*", *fields)
        except (StoreError, OSError) as e:
            log.warning("alert %s: live queues not told of its change: %s",
                        alert.get("alert_id"), e)

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        aid = Param("alert_id", _p_uuid, required=True)
        note = Param("note", param_str)
        return [
            Command("acm_alert_show", self.show, False,
                    "Show one alert with its lifecycle state: alert_id.", (aid,)),
            Command("acm_alert_assign", self.assign, True,
                    "Assign an alert (NEW becomes INVESTIGATING): alert_id, assignee, [note].",
                    (aid, Param("assignee", param_str, required=True), note)),
            Command("acm_alert_status", self.status, True,
                    "Move an alert: alert_id, status (INVESTIGATING, CONFIRMED, RESOLVED, "
                    "FALSE_POSITIVE), "
                    "[note], [whitelist=true with FALSE_POSITIVE], [reason].",
                    (aid, Param("status", param_str, required=True), note,
                     Param("whitelist", param_bool, default=False), Param("reason", param_str))),
            Command("acm_alert_note", self.note, True,
                    "Add a note to an alert: alert_id, note.",
                    (aid, Param("note", param_str, required=True))),
        ]

    def show(self, caller: Caller, alert_id: str) -> dict[str, Any]:
        return self._run(lambda lc: lc.get(alert_id))

    def assign(self, caller: Caller, alert_id: str, assignee: str,
               note: str | None = None) -> dict[str, Any]:
        ch = self._run(lambda lc: lc.assign(alert_id, assignee, caller.actor, caller.via, note))
        self._announce(ch.alert)
        return {**ch.alert, "audit_ids": ch.audit_ids}

    def note(self, caller: Caller, alert_id: str, note: str) -> dict[str, Any]:
        ch = self._run(lambda lc: lc.add_note(alert_id, note, caller.actor, caller.via))
        return {**ch.alert, "audit_ids": ch.audit_ids}

    def status(self, caller: Caller, alert_id: str, status: str, note: str | None = None,
               whitelist: bool = False, reason: str | None = None) -> dict[str, Any]:
        ch = self._run(lambda lc: lc.set_status(alert_id, status, caller.actor, caller.via,
                                                note, whitelist, reason))
        self._announce(ch.alert)
        out = {**ch.alert, "audit_ids": ch.audit_ids}
        if ch.whitelisted is not None:
            wl = ch.whitelisted
            store_config.whitelist_set(self.control.conn, wl["b_number"],
                                       self.settings.partitions, wl["reason"])
            if getattr(self.control.repo, "name", "") == "store":
                # Keep the store repository's record (acm_whitelist_list) in step.
                self.control.repo.whitelist_put(WhitelistEntry(
                    b_number=wl["b_number"], reason=wl["reason"], created_by=wl["created_by"],
                    created_at_ms=int(time.time() * 1000)))
            out["whitelisted"] = wl
        return out


def lifecycle_commands(control: Any) -> list[Command]:
    """Return the lifecycle commands of a control plane (acm_module.control.commands.Control)."""
    return LifecycleCommands(control).declare()
