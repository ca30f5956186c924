"""The whitelist (B-numbers never alerted on) and the block list (A-numbers dropped after a
detection): acm_whitelist_add/remove/list, acm_block_list, acm_unblock."""

from __future__ import annotations

from typing import Any

from acm_module.control import audit, jsonrpc
from acm_module.control.audit import Caller, iso_ms
from acm_module.control.commands.base import (
    MAX_TIME_MS,
    Command,
    Domain,
    Param,
    now_ms,
    p_int,
    p_limit,
    p_number,
    p_time_ms,
)
from acm_module.control.jsonrpc import MIError, bad_params, param_str
from acm_module.control.repository import WhitelistEntry
from acm_module.core import liveconfig as store_config


class Lists(Domain):
    """Whitelist entries (record + the marker the decision script reads) and blocks."""

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        num = Param("number", p_number, required=True)
        opt_num = Param("number", p_number)
        limit = Param("limit", p_limit, default=100)
        return [
            Command("acm_whitelist_add", self.acm_whitelist_add, True,
                    "Whitelist a B-number: number, reason, [created_by], [expires_at | ttl].",
                    (num, Param("reason", param_str, required=True),
                     Param("created_by", param_str), Param("expires_at", p_time_ms),
                     Param("ttl", p_int))),
            Command("acm_whitelist_remove", self.acm_whitelist_remove, True,
                    "Remove a B-number from the whitelist.", (num,)),
            Command("acm_whitelist_list", self.acm_whitelist_list, False,
                    "List whitelisted B-numbers (expired entries are dropped).",
                    (opt_num, limit)),
            Command("acm_block_list", self.acm_block_list, False,
                    "List blocked A-numbers.", (opt_num, limit)),
            Command("acm_unblock", self.acm_unblock, True,
                    "Release a blocked A-number.", (num,)),
        ]

    # -- whitelist -------------------------------------------------------------------------
    def acm_whitelist_add(self, caller: Caller, number: str, reason: str,
                          created_by: str | None = None, expires_at: int | None = None,
                          ttl: int | None = None) -> dict[str, Any]:
        """Whitelist a B-number (record + the marker the decision script reads)."""
        now = now_ms()
        if not reason.strip() or len(reason) > 255:
            raise bad_params("reason: must be 1 to 255 characters")
        if created_by is not None and not 0 < len(created_by) <= 255:
            raise bad_params("created_by: must be 1 to 255 characters")
        if expires_at is not None and ttl is not None:
            raise bad_params("give expires_at or ttl, not both")
        if ttl is not None:
            if ttl <= 0:
                raise bad_params("ttl: must be > 0 seconds")
            expires_at = now + ttl * 1000
            if expires_at >= MAX_TIME_MS:  # an expiry must have a date, or nothing lists it
                raise bad_params("ttl: the expiry must fall before the year 10000")
        if expires_at is not None and expires_at <= now:
            raise bad_params(f"expires_at: {iso_ms(expires_at)} is in the past")
        entry = WhitelistEntry(b_number=number, reason=reason.strip(),
                               created_by=created_by or caller.actor, created_at_ms=now,
                               expires_at_ms=expires_at)
        old = self.plane.repo.whitelist_put(entry)
        store_config.whitelist_set(self.plane.conn, number, self.settings.partitions,
                                   entry.reason, None if expires_at is None else expires_at - now)
        audit.record(self.plane.repo, caller, "acm_whitelist_add", number,
                     old.to_json() if old else None, entry.to_json())
        return {**entry.to_json(), "replaced": old is not None}

    def acm_whitelist_remove(self, caller: Caller, number: str) -> dict[str, Any]:
        """Remove a B-number's whitelist record and marker."""
        old = self.plane.repo.whitelist_delete(number)
        had_marker = store_config.whitelist_del(self.plane.conn, number,
                                                self.settings.partitions)
        if old is None and not had_marker:
            raise MIError(jsonrpc.NOT_FOUND, f"{number} is not whitelisted")
        audit.record(self.plane.repo, caller, "acm_whitelist_remove", number,
                     old.to_json() if old else {"b_number": number}, None)
        return {"removed": number}

    def acm_whitelist_list(self, caller: Caller, number: str | None = None,
                           limit: int = 100) -> dict[str, Any]:
        """List whitelist entries."""
        entries = self.plane.repo.whitelist_list(b_number=number, limit=limit, now_ms=now_ms())
        return {"count": len(entries), "entries": [e.to_json() for e in entries]}

    def resync_whitelist(self) -> int:
        """Re-assert the markers of every live whitelist record; return how many."""
        now = now_ms()
        n = 0
        with self.plane._lock:
            for e in self.plane.repo.whitelist_list(limit=1 << 30, now_ms=now):
                ttl = None if e.expires_at_ms is None else e.expires_at_ms - now
                store_config.whitelist_set(self.plane.conn, e.b_number, self.settings.partitions,
                                           e.reason, ttl)
                n += 1
        return n

    # -- blocks ----------------------------------------------------------------------------
    def acm_block_list(self, caller: Caller, number: str | None = None,
                       limit: int = 100) -> dict[str, Any]:
        """List blocked A-numbers (expiry is in call time, ~ wall time when live)."""
        now = now_ms()
        blocks = [b for b in store_config.list_blocks(self.plane.conn, self.settings.partitions)
                  if number is None or b["a_number"] == number][:limit]
        for b in blocks:
            b["expires_at"] = iso_ms(b["expires_ms"])
            b["expired"] = b["expires_ms"] <= now
        return {"count": len(blocks), "blocks": blocks}

    def acm_unblock(self, caller: Caller, number: str) -> dict[str, Any]:
        """Release one blocked A-number."""
        conn, partitions = self.plane.conn, self.settings.partitions
        old = next((b for b in store_config.list_blocks(conn, partitions)
                    if b["a_number"] == number), None)
        if not store_config.unblock(conn, number, partitions):
            raise MIError(jsonrpc.NOT_FOUND, f"{number} is not blocked")
        audit.record(self.plane.repo, caller, "acm_unblock", number, old, None)
        return {"unblocked": number}
