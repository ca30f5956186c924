"""The carrier registry (docs/GATEWAY.md): carriers, their gateways and routes, kept in the
repository and published to the workers as one versioned document."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from acm_module.control import audit, jsonrpc
from acm_module.control.audit import Caller
from acm_module.control.commands.base import (
    Command,
    Domain,
    Param,
    p_float,
    p_id,
    p_int,
    p_list,
    p_rule,
)
from acm_module.control.jsonrpc import MIError, bad_params, param_bool, param_str
from acm_module.core import registry
from acm_module.core.errors import ConfigError, StoreError

log = logging.getLogger("acm.control")


class Registry(Domain):
    """Change the registry through the repository, then publish it; keep the store's copy."""

    def declare(self) -> list[Command]:
        """Return the command declarations."""
        eid = Param("id", p_id, required=True)
        carrier = Param("carrier", p_id, required=True)
        cascade = Param("cascade", param_bool, default=False)
        rule = Param("cli_rule", p_rule)
        return [
            Command("acm_carrier_add", self.acm_carrier_add, True,
                    "Add or replace a carrier: id, name, licence, [contact], [cli_rule].",
                    (eid, Param("name", param_str, required=True),
                     Param("licence", param_str, required=True), Param("contact", param_str),
                     rule)),
            Command("acm_carrier_remove", self.acm_carrier_remove, True,
                    "Remove a carrier: id, [cascade=true also removes its gateways and "
                    "routes].", (eid, cascade)),
            Command("acm_carrier_list", self.acm_carrier_list, False,
                    "List the carriers with the ids of their gateways and routes."),
            Command("acm_gateway_add", self.acm_gateway_add, True,
                    "Add or replace a gateway: id, carrier, addresses (list or a,b,c), "
                    "[trunks], [rate_limit_cps], [rate_window_s].",
                    (eid, carrier, Param("addresses", p_list, required=True),
                     Param("trunks", p_list), Param("rate_limit_cps", p_int, default=0),
                     Param("rate_window_s", p_float, default=registry.WINDOW_DEFAULT_S))),
            Command("acm_gateway_remove", self.acm_gateway_remove, True,
                    "Remove a gateway: id, [cascade=true also removes its routes].",
                    (eid, cascade)),
            Command("acm_gateway_set_limit", self.acm_gateway_set_limit, True,
                    "Set a gateway's rate limit: id, cps (0 = none), [window] (s).",
                    (eid, Param("cps", p_int, required=True), Param("window", p_float))),
            Command("acm_route_add", self.acm_route_add, True,
                    "Add or replace a route: id, carrier, direction (international, "
                    "national), [gateway], [trunk], [cli_rule].",
                    (eid, carrier, Param("direction", param_str, required=True),
                     Param("gateway", p_id), Param("trunk", param_str), rule)),
            Command("acm_route_remove", self.acm_route_remove, True,
                    "Remove a route: id.", (eid,)),
            Command("acm_registry_show", self.acm_registry_show, False,
                    "The carrier registry as published to the workers, with its version."),
        ]

    # -- changing it -----------------------------------------------------------------------
    def _change_registry(self, caller: Caller, action: str, kind: str, eid: str,
                         edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Read the document from the repository, `edit` it in place (returning the audit
        record's old value), validate, store, audit and publish it.

        Bad input raises before anything is written. Returns old, new (the entry as stored,
        None once removed), the published version and the audit record's id.
        """
        repo = self.plane.repo
        doc = repo.registry_get()
        old = edit(doc)
        doc = registry.validate(doc)
        new = _registry_entry(doc, kind, eid)
        repo.registry_put(doc)
        try:
            audit_id: str | None = audit.record(repo, caller, action, f"{kind}:{eid}",
                                                old, new).id
        except Exception as e:  # the change is made; say the trail missed it
            log.error("audit of %s by %s failed: %s", action, caller, e)
            audit_id = None
        try:
            version = registry.publish(self.plane.conn, doc)
        except StoreError as e:
            raise MIError(jsonrpc.STORE_UNAVAILABLE,
                          f"{kind} {eid!r} saved in the {repo.name} repository but not "
                          f"published to the store ({e}); acm_reload publishes it") from e
        log.info("%s by %s: %s %r -> registry version %d", action, caller, kind, eid, version)
        return {"old": old, "new": new, "version": version, "audit_id": audit_id}

    def _put_registry_entry(self, caller: Caller, action: str, kind: str,
                            entry: dict[str, Any]) -> dict[str, Any]:
        """Add or replace one entry."""
        def edit(doc: dict[str, Any]) -> Any:
            old = _registry_entry(doc, kind, entry["id"])
            doc[kind + "s"] = [e for e in doc[kind + "s"] if e["id"] != entry["id"]] + [entry]
            return old

        r = self._change_registry(caller, action, kind, entry["id"], edit)
        return {kind: r["new"], "replaced": r["old"] is not None, "version": r["version"],
                "audit_id": r["audit_id"]}

    def _remove_registry_entry(self, caller: Caller, action: str, kind: str, eid: str,
                               cascade: bool) -> dict[str, Any]:
        """Remove one entry; with cascade also what references it (else refuse)."""
        def edit(doc: dict[str, Any]) -> Any:
            entry = _registry_entry(doc, kind, eid)
            if entry is None:
                raise MIError(jsonrpc.NOT_FOUND, f"no {kind} {eid!r}")
            field = f"{kind}_id"
            refs = {k: [e for e in doc[k] if e.get(field) == eid] for k in ("gateways", "routes")}
            names = [f"{k[:-1]}(s) {', '.join(e['id'] for e in v)}" for k, v in refs.items() if v]
            if names and not cascade:
                raise bad_params(f"{kind} {eid!r} is still referenced by {' and '.join(names)}; "
                                 "remove them first or pass cascade=true")
            gone = {id(entry)} | {id(e) for v in refs.values() for e in v}
            for k in ("carriers", "gateways", "routes"):
                doc[k] = [e for e in doc[k] if id(e) not in gone]
            return {**entry, **{k: v for k, v in refs.items() if v}}

        r = self._change_registry(caller, action, kind, eid, edit)
        return {"removed": eid, kind: r["old"], "version": r["version"],
                "audit_id": r["audit_id"]}

    # -- commands --------------------------------------------------------------------------
    def acm_carrier_add(self, caller: Caller, id: str, name: str, licence: str,
                        contact: str | None = None, cli_rule: str | None = None
                        ) -> dict[str, Any]:
        """Add or replace a carrier (its gateways and routes stay)."""
        return self._put_registry_entry(caller, "acm_carrier_add", "carrier", {
            "id": id, "name": name, "licence": licence, "contact": contact,
            "cli_rule": cli_rule})

    def acm_carrier_remove(self, caller: Caller, id: str, cascade: bool = False
                           ) -> dict[str, Any]:
        """Remove a carrier (and, with cascade, its gateways and routes)."""
        return self._remove_registry_entry(caller, "acm_carrier_remove", "carrier", id, cascade)

    def acm_carrier_list(self, caller: Caller) -> dict[str, Any]:
        """List the carriers of the repository, with their gateway and route ids."""
        doc = self.plane.repo.registry_get()
        carriers = [{**c, **{k: [e["id"] for e in doc[k] if e["carrier_id"] == c["id"]]
                             for k in ("gateways", "routes")}} for c in doc["carriers"]]
        return {"count": len(carriers), "carriers": carriers}

    def acm_gateway_add(self, caller: Caller, id: str, carrier: str, addresses: list[str],
                        trunks: list[str] | None = None, rate_limit_cps: int = 0,
                        rate_window_s: float = registry.WINDOW_DEFAULT_S) -> dict[str, Any]:
        """Add or replace a gateway (every field: omitted ones take their defaults)."""
        return self._put_registry_entry(caller, "acm_gateway_add", "gateway", {
            "id": id, "carrier_id": carrier, "addresses": addresses, "trunks": trunks or [],
            "rate_limit_cps": rate_limit_cps, "rate_window_s": rate_window_s})

    def acm_gateway_remove(self, caller: Caller, id: str, cascade: bool = False
                           ) -> dict[str, Any]:
        """Remove a gateway (and, with cascade, the routes naming it)."""
        return self._remove_registry_entry(caller, "acm_gateway_remove", "gateway", id, cascade)

    def acm_gateway_set_limit(self, caller: Caller, id: str, cps: int,
                              window: float | None = None) -> dict[str, Any]:
        """Set a gateway's rate limit (the window stays when not given)."""
        def edit(doc: dict[str, Any]) -> Any:
            g = _registry_entry(doc, "gateway", id)
            if g is None:
                raise MIError(jsonrpc.NOT_FOUND, f"no gateway {id!r}")
            old = {k: g[k] for k in ("rate_limit_cps", "rate_window_s")}
            g["rate_limit_cps"] = cps
            if window is not None:
                g["rate_window_s"] = window
            return old

        r = self._change_registry(caller, "acm_gateway_set_limit", "gateway", id, edit)
        return {"gateway": r["new"], "old": r["old"], "version": r["version"],
                "audit_id": r["audit_id"]}

    def acm_route_add(self, caller: Caller, id: str, carrier: str, direction: str,
                      gateway: str | None = None, trunk: str | None = None,
                      cli_rule: str | None = None) -> dict[str, Any]:
        """Add or replace a route."""
        return self._put_registry_entry(caller, "acm_route_add", "route", {
            "id": id, "carrier_id": carrier, "gateway_id": gateway, "trunk": trunk,
            "direction": direction, "cli_rule": cli_rule})

    def acm_route_remove(self, caller: Caller, id: str) -> dict[str, Any]:
        """Remove a route."""
        return self._remove_registry_entry(caller, "acm_route_remove", "route", id, False)

    def acm_registry_show(self, caller: Caller) -> dict[str, Any]:
        """Return the published document and version, and whether the repository agrees."""
        ver, published = registry.read(self.plane.conn)
        out: dict[str, Any] = {"version": ver, "document": published,
                               "repository": self.plane.repo.name}
        try:
            out["in_sync"] = registry.validate(self.plane.repo.registry_get()) == published
        except (StoreError, ConfigError) as e:
            out["in_sync"] = None
            out["repository_error"] = str(e)
        return out

    # -- keeping the store's copy ----------------------------------------------------------
    def sync_registry(self) -> dict[str, Any]:
        """Publish the repository's registry when the store's copy differs (a flushed store,
        a new Dragonfly); return {"version", "published"}.

        An empty repository never clears a published document: entries are removed through
        MI, which publishes at once. Raises StoreError, ConfigError (an invalid repository).
        """
        with self.plane._lock:
            doc = self.plane.repo.registry_get()
            ver, published = registry.read(self.plane.conn)
            if not any(doc.values()):
                return {"version": ver, "published": False}
            doc = registry.validate(doc)
            if ver and doc == published:
                return {"version": ver, "published": False}
            ver = registry.publish(self.plane.conn, doc)
            log.info("published the %s repository's carrier registry as version %d",
                     self.plane.repo.name, ver)
            return {"version": ver, "published": True}

    def registry_lost(self) -> bool:
        """Say whether the store has no published registry (a cheap check for the watch)."""
        with self.plane._lock:
            return registry.version(self.plane.conn) == 0


def _registry_entry(doc: dict[str, Any], kind: str, eid: str) -> dict[str, Any] | None:
    return next((e for e in doc[kind + "s"] if e["id"] == eid), None)
