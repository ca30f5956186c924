"""MI command handlers: change the desired state in the store; the workers apply it.

Settings changes are persisted as the deployment's overrides (in the repository: compare-and-set
on their generation), published as a new generation of the live config (compare-and-set too), so
two admins on two nodes never lose each other's update; every worker picks it up within
`config_poll_ms`. Every change is written to the audit trail.

`Control.dispatch(raw, ...)` is the whole protocol: bytes in, bytes (or None for a
notification) out. The transports in server.py only move bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from acm_module.control import audit, jsonrpc, overrides
from acm_module.control.audit import Caller, iso_ms
from acm_module.control.auth import Authorizer
from acm_module.control.jsonrpc import MIError, bad_params, param_bool, param_str
from acm_module.control.repository import (
    SEVERITIES,
    AlertQuery,
    ControlRepository,
    StoreRepository,
    WhitelistEntry,
)
from acm_module.core import liveconfig as store_config
from acm_module.core import numbers, registry
from acm_module.core import settings as settings_mod
from acm_module.core import stats as stats_mod
from acm_module.core.errors import ConfigError, StoreError
from acm_module.core.logs import apply_log_level
from acm_module.decide.store.cluster import StoreClient

log = logging.getLogger("acm.control")

EVENT_RELOAD = "E_ACM_RELOAD"
# The deployment whose nodes use the store (the first node's `deployment` setting).
DEPLOYMENT_KEY = "{acm.cfg}:deployment"
_CAS_ATTEMPTS = 20
_ACTOR_RE = re.compile(r"[^A-Za-z0-9_.@:+-]")
_SECRET_SETTINGS = ("mi_token", "webhook_secret")
_URL_SETTINGS = ("store", "database_url", "questdb_url", "clickhouse_url")


# -- parameter parsing ---------------------------------------------------------------------
_MAX_INT = 2**53  # no MI integer is larger; JSON numbers beyond it are not exact anyway
_MAX_TIME_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z


def _p_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError("must be an integer")
    if isinstance(v, float) and not v.is_integer():  # NaN and infinities are not integers
        raise ValueError("must be an integer")
    try:
        n = int(v)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError("must be an integer") from e
    if abs(n) > _MAX_INT:
        raise ValueError(f"must be an integer within ±{_MAX_INT}")
    return n


def _p_time_ms(v: Any) -> int:
    """Parse epoch seconds or ISO 8601 (naive = UTC) into epoch milliseconds."""
    what = "must be epoch seconds or an ISO 8601 time, from 1970 to 9999"
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(what)
    try:
        secs: float | None = float(v)
    except OverflowError as e:  # an integer beyond any float
        raise ValueError(what) from e
    except ValueError:
        secs = None
    if secs is not None:
        ms = secs * 1000
    else:
        try:
            dt = datetime.fromisoformat(jsonrpc.valid_text(str(v).strip()))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            ms = dt.timestamp() * 1000
        except (ValueError, OverflowError, OSError) as e:  # 0001-01-01 with a +hh offset
            raise ValueError(what) from e
    # Before 1970 is no time of this service's (and a negative stream id to the store).
    if not (math.isfinite(ms) and 0 <= ms < _MAX_TIME_MS):
        raise ValueError(what)
    return int(ms)


def _p_severity(v: Any) -> str:
    s = param_str(v).strip().upper()
    if s not in SEVERITIES:
        raise ValueError(f"must be one of {', '.join(SEVERITIES)}")
    return s


def _p_limit(v: Any) -> int:
    n = _p_int(v)
    if not 1 <= n <= 10_000:
        raise ValueError("must be between 1 and 10000")
    return n


def _p_id(v: Any) -> str:
    s = param_str(v).strip()
    if not registry.ID_RE.fullmatch(s):
        raise ValueError(f"must be 1 to {registry.MAX_ID} characters of A-Z a-z 0-9 . _ -")
    return s


def _p_list(v: Any) -> list[str]:
    """A list, or a comma-separated string (`addresses=198.51.100.7,203.0.113.0/24`)."""
    items = v if isinstance(v, list) else param_str(v).split(",")
    return [param_str(x).strip() for x in items if not isinstance(x, str) or x.strip()]


def _p_rule(v: Any) -> str | None:
    """cli_rule: enforce, monitor, off; null (or none, inherit, "") inherits."""
    s = param_str(v).strip().lower()
    return None if s in ("", "null", "none", "inherit") else s


def _p_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError("must be a number")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError("must be a number") from e
    if not math.isfinite(f):
        raise ValueError("must be a finite number")
    return f


@dataclass(frozen=True)
class Param:
    """A declared command parameter."""

    name: str
    parse: Callable[[Any], Any]
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Command:
    """A declared MI command."""

    name: str
    handler: Callable[..., Any]
    admin: bool
    help: str
    params: tuple[Param, ...] = ()
    settings_params: bool = False  # takes setting=value pairs (acm_set, E_ACM_RELOAD)


# Declares commands another room adds to a control plane (given the Control they run on).
CommandFactory = Callable[["Control"], Iterable[Command]]

_NUMBER = "number"


@dataclass(frozen=True)
class Reply:
    """The encoded response to one request (None for a notification), and whether the caller
    presented the right token (the datagram endpoint caps what it sends to anyone else)."""

    body: bytes | None
    authenticated: bool = False


def open_repository(settings: Any, conn: StoreClient) -> ControlRepository:
    """Return the PostgreSQL repository when configured and installed, else the store one."""
    if getattr(settings, "database_url", ""):
        try:
            from acm_module.control.pg_repository import (  # type: ignore[import-not-found]
                PostgresControlRepository,
            )
        except ImportError:
            log.warning("database_url is set but acm_module.control.pg_repository is not "
                        "available: whitelist/audit/alerts use the store")
        else:
            repo: ControlRepository = PostgresControlRepository(settings)
            return repo
    return StoreRepository(conn, settings.partitions)


# -- the control plane ---------------------------------------------------------------------
class Control:
    """The state behind the MI endpoint: one store connection, one repository, one lock."""

    def __init__(self, settings: Any, repo: ControlRepository | None = None,
                 boot_id: str = "", extra_commands: Sequence[CommandFactory] = ()) -> None:
        """extra_commands: what other rooms add (the alert lifecycle of actions/), each called
        with this control plane; cli.py hands them in, so this module imports none of them."""
        self.settings = settings
        self.boot_id = boot_id  # the supervisor's: a restored config carries it
        # The live config as last read from or written to the store: what goes back when the
        # store loses it.
        self._last_live: dict[str, Any] | None = None
        self.conn = StoreClient(settings.store, timeout=1.0, connect_timeout=1.0)
        self.repo = repo if repo is not None else open_repository(settings, self.conn)
        self.auth = Authorizer(settings.mi_token or "")
        self.deployment: str = settings.deployment
        # The deployment's overrides as last read or written: what goes back when the store
        # loses them (None: not known yet).
        self._saved: dict[str, Any] | None = None
        # Changes made live while the repository was down, written to it when it is back.
        self._pending: dict[str, Any] = {}
        # Commands are rare; one lock serialises store access (StoreClient is not
        # thread-safe) and makes each read-modify-write atomic within this process.
        self._lock = threading.RLock()
        self.commands: dict[str, Command] = {c.name: c for c in self._declare()}
        for factory in extra_commands:
            self.commands.update((c.name, c) for c in factory(self))

    def close(self) -> None:
        """Close the repository and the store connection."""
        with self._lock:
            with contextlib.suppress(Exception):
                self.repo.close()
            self.conn.close()

    # -- protocol --------------------------------------------------------------------------
    def dispatch(self, raw: bytes, *, via: str, loopback_bind: bool,
                 bearer: str | None = None, token_always: bool = False) -> bytes | None:
        """Run one JSON-RPC request; return the encoded response (None for a notification)."""
        return self.handle(raw, via=via, loopback_bind=loopback_bind, bearer=bearer,
                           token_always=token_always).body

    def handle(self, raw: bytes, *, via: str, loopback_bind: bool, bearer: str | None = None,
               token_always: bool = False) -> Reply:
        """Run one JSON-RPC request; return its response and whether the caller proved the
        token. token_always: every command needs the token (an exposed datagram bind)."""
        try:
            req = jsonrpc.parse(raw)
        except MIError as e:
            return Reply(jsonrpc.error(jsonrpc.error_id(e), e))
        seen: dict[str, bool] = {}
        try:
            value = self.execute(req.method, req.params, via=via, loopback_bind=loopback_bind,
                                 bearer=bearer, token_always=token_always, seen=seen)
        except Exception as e:  # whatever went wrong, the caller gets its one reply
            if not isinstance(e, MIError):
                log.exception("MI %s from %s failed", req.method[:64], via)
                e = MIError(jsonrpc.INTERNAL_ERROR, f"internal error: {type(e).__name__}")
            if req.is_notification:
                log.warning("MI notification %s from %s failed: %s", req.method[:64], via,
                            e.message)
                return Reply(None, seen.get("token", False))
            return Reply(jsonrpc.error(req.id, e), seen.get("token", False))
        if req.is_notification:
            return Reply(None, seen.get("token", False))
        return Reply(jsonrpc.result(req.id, value), seen.get("token", False))

    def execute(self, method: str, params: dict[str, Any] | list[Any], *, via: str,
                loopback_bind: bool, bearer: str | None = None, token_always: bool = False,
                seen: dict[str, bool] | None = None) -> Any:
        """Authorise and run one command; return its result. Raises MIError.

        seen["token"] is set when the caller presented the right token."""
        cmd = self.commands.get(method)
        if cmd is None:
            raise MIError(jsonrpc.METHOD_NOT_FOUND,
                          f"unknown method {_shown(method)}; `which` lists the commands")
        named = _named(cmd, params)
        token = named.pop("token", None)
        actor = named.pop("actor", None)
        presented = bearer if bearer is not None else (
            None if token is None else str(token))
        role = self.auth.check(admin=cmd.admin, loopback_bind=loopback_bind,
                               presented=presented, token_always=token_always)
        if seen is not None:
            seen["token"] = presented is not None
        caller = Caller(actor=_clean_actor(actor, role, presented is not None), via=via,
                        role=role)
        return self.invoke(caller, method, named)

    def invoke(self, caller: Caller, method: str, named: dict[str, Any]) -> Any:
        """Run one command for a caller already authorised (MI, or the REST API with its own
        users); return its result. Raises MIError."""
        cmd = self.commands.get(method)
        if cmd is None:
            raise MIError(jsonrpc.METHOD_NOT_FOUND, f"unknown method {method!r}")
        args = _bind(cmd, named)
        try:
            with self._lock:
                return cmd.handler(caller, **args)
        except MIError:
            raise
        except ConfigError as e:
            raise bad_params(str(e)) from e
        except StoreError as e:
            raise MIError(jsonrpc.STORE_UNAVAILABLE, f"detection store unavailable: {e}") from e
        except Exception as e:
            log.exception("MI %s failed", method)
            raise MIError(jsonrpc.INTERNAL_ERROR, f"internal error: {type(e).__name__}") from e

    # -- declarations ----------------------------------------------------------------------
    def _declare(self) -> list[Command]:
        num = Param("number", _NUMBER, required=True)  # type: ignore[arg-type]
        opt_num = Param("number", _NUMBER)  # type: ignore[arg-type]
        limit = Param("limit", _p_limit, default=100)
        return [
            Command("acm_set", self.acm_set, True,
                    "Change runtime settings: acm_set threshold=7 [window=5 mode=monitor ...].",
                    settings_params=True),
            Command("acm_reload", self.acm_reload, True,
                    "Re-read the config file and environment, re-apply the saved overrides "
                    "(reset=true drops them) and publish.",
                    (Param("reset", param_bool, default=False),)),
            Command(EVENT_RELOAD, self.event_reload, True,
                    "OpenSIPS event: settings as params are an acm_set, no params an "
                    "acm_reload.", settings_params=True),
            Command("acm_log_level", self.acm_log_level, True,
                    "Set the log level of every process (DEBUG, INFO, WARNING, ERROR).",
                    (Param("level", param_str, required=True),)),
            Command("acm_get_config", self.acm_get_config, False,
                    "Show the live detection config, its generation, sources and overrides."),
            Command("acm_stats", self.acm_stats, False,
                    "Decisions by verdict:reason, errors and latency, per worker and total; "
                    "decisions per carrier."),
            Command("acm_whitelist_add", self.acm_whitelist_add, True,
                    "Whitelist a B-number: number, reason, [created_by], [expires_at | ttl].",
                    (num, Param("reason", param_str, required=True),
                     Param("created_by", param_str), Param("expires_at", _p_time_ms),
                     Param("ttl", _p_int))),
            Command("acm_whitelist_remove", self.acm_whitelist_remove, True,
                    "Remove a B-number from the whitelist.", (num,)),
            Command("acm_whitelist_list", self.acm_whitelist_list, False,
                    "List whitelisted B-numbers (expired entries are dropped).",
                    (opt_num, limit)),
            Command("acm_block_list", self.acm_block_list, False,
                    "List blocked A-numbers.", (opt_num, limit)),
            Command("acm_unblock", self.acm_unblock, True,
                    "Release a blocked A-number.", (num,)),
            Command("acm_alert_list", self.acm_alert_list, False,
                    "Recent alerts, newest first: [number] [severity] [since] [until] [limit].",
                    (opt_num, Param("severity", _p_severity), Param("since", _p_time_ms),
                     Param("until", _p_time_ms), Param("limit", _p_limit, default=50),
                     Param("scan", _p_limit, default=5000))),
            Command("acm_audit_list", self.acm_audit_list, False,
                    "The audit trail, newest first: [action] [target] [since] [limit].",
                    (Param("action", param_str), Param("target", param_str),
                     Param("since", _p_time_ms), Param("limit", _p_limit, default=50))),
            *self._declare_registry(),
            Command("which", self.which, False, "List the MI commands."),
        ]

    def _declare_registry(self) -> list[Command]:
        eid = Param("id", _p_id, required=True)
        carrier = Param("carrier", _p_id, required=True)
        cascade = Param("cascade", param_bool, default=False)
        rule = Param("cli_rule", _p_rule)
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
                    (eid, carrier, Param("addresses", _p_list, required=True),
                     Param("trunks", _p_list), Param("rate_limit_cps", _p_int, default=0),
                     Param("rate_window_s", _p_float, default=registry.WINDOW_DEFAULT_S))),
            Command("acm_gateway_remove", self.acm_gateway_remove, True,
                    "Remove a gateway: id, [cascade=true also removes its routes].",
                    (eid, cascade)),
            Command("acm_gateway_set_limit", self.acm_gateway_set_limit, True,
                    "Set a gateway's rate limit: id, cps (0 = none), [window] (s).",
                    (eid, Param("cps", _p_int, required=True), Param("window", _p_float))),
            Command("acm_route_add", self.acm_route_add, True,
                    "Add or replace a route: id, carrier, direction (international, "
                    "national), [gateway], [trunk], [cli_rule].",
                    (eid, carrier, Param("direction", param_str, required=True),
                     Param("gateway", _p_id), Param("trunk", param_str), rule)),
            Command("acm_route_remove", self.acm_route_remove, True,
                    "Remove a route: id.", (eid,)),
            Command("acm_registry_show", self.acm_registry_show, False,
                    "The carrier registry as published to the workers, with its version."),
        ]

    # -- settings --------------------------------------------------------------------------
    def acm_set(self, caller: Caller, **raw: Any) -> dict[str, Any]:
        """Validate and publish runtime settings; persist them as overrides."""
        if not raw:
            raise bad_params("acm_set needs at least one name=value; runtime settings: "
                             + ", ".join(sorted(settings_mod.RUNTIME)))
        return self.publish(_parse_settings(raw), caller, "acm_set")

    def acm_log_level(self, caller: Caller, level: str) -> dict[str, Any]:
        """Set log_level (case-insensitive) like acm_set."""
        return self.publish(_parse_settings({"log_level": level.upper()}), caller,
                            "acm_log_level")

    def event_reload(self, caller: Caller, **raw: Any) -> dict[str, Any]:
        """Handle E_ACM_RELOAD: settings → acm_set; nothing (or reset=…) → acm_reload."""
        # `opensips-cli -x mi raise_event E_ACM_RELOAD '{"threshold": 7}'` passes the JSON
        # object as one unnamed string parameter: {"": "{\"threshold\": 7}"}.
        # OpenSIPS 3.6 hands the same parameter on as ["{...}"] about a third of the time
        # (_named turns that into the same {"": ...}).
        if set(raw) == {""}:
            try:
                inner = json.loads(raw.pop(""), object_pairs_hook=jsonrpc.unique_keys,
                                   parse_int=jsonrpc.parse_int) \
                    if isinstance(raw.get(""), str) else None
            except (ValueError, RecursionError) as e:
                raise bad_params(f"event params are not JSON: {str(e)[:200]}") from e
            if not isinstance(inner, dict):
                raise bad_params("event params must be a JSON object")
            raw = inner
        try:
            reset = param_bool(raw.pop("reset", False))
        except ValueError as e:
            raise bad_params(f"reset: {e}") from e
        if not raw:
            return self.acm_reload(caller, reset=reset, action=EVENT_RELOAD)
        return self.publish(_parse_settings(raw), caller, EVENT_RELOAD)

    def acm_reload(self, caller: Caller, reset: bool = False, action: str = "acm_reload"
                   ) -> dict[str, Any]:
        """Re-read config file + env (+ the original CLI flags) and the overrides; publish."""
        s = self.settings
        cli = {n: v for n, v in s.values.items() if s.source.get(n) == "cli"}
        path = s.config_file
        if path is not None and not Path(path).exists():
            if any(src.startswith("file:") for src in s.source.values()):
                raise MIError(jsonrpc.CONFIG_INVALID,
                              f"config file {path} is gone; old config kept")
            path = None
        try:
            previous: Any = self.saved_overrides()
        except ConfigError as e:
            if not reset:
                raise MIError(jsonrpc.CONFIG_INVALID, f"{e}; old config kept") from e
            previous = f"unreadable: {e}"
        try:
            fresh = settings_mod.load(path, env=os.environ, cli=cli)
            saved = {} if reset else previous
            values = {n: fresh.values[n] for n in settings_mod.RUNTIME} | saved
            settings_mod.validate_combination(values)
        except ConfigError as e:
            raise MIError(jsonrpc.CONFIG_INVALID, f"{e}; old config kept") from e
        if reset and self._reset_overrides(caller):
            audit.record(self.repo, caller, action, "overrides", previous, None)
        out = self.publish(values, caller, action, persist=False)
        skip = {"endpoint", "store", "workers"}
        out["restart_required"] = sorted(
            n for n in settings_mod.BY_NAME
            if n not in settings_mod.RUNTIME and n not in skip
            and fresh.values.get(n) != s.values.get(n))
        out["overrides"] = saved
        out["reset"] = reset
        try:  # the repository's carrier registry, again (the config is published anyway)
            out["registry"] = self.sync_registry()
        except (StoreError, ConfigError) as e:
            log.error("%s: carrier registry not re-published: %s", action, e)
            out["registry"] = {"error": str(e)}
        return out

    def publish(self, changes: dict[str, Any], caller: Caller, action: str,
                persist: bool = True) -> dict[str, Any]:
        """Persist changes as overrides (unless persist=False), publish them as a new config
        generation (both compare-and-set, retried), audit."""
        _, live = store_config.read(self.conn)
        base = live if live is not None else self.desired_config()
        try:
            settings_mod.validate_combination({**base, **changes})
        except ConfigError as e:
            raise bad_params(f"{e}; old config kept") from e
        # A value already in force is no change: it is neither pinned as an override nor
        # audited (a script re-applying its settings leaves no trace and pins nothing).
        changed = {k: {"old": base.get(k), "new": v} for k, v in changes.items()
                   if base.get(k) != v}
        persisted: bool | None = None
        if persist:
            # The overrides first: a node converging meanwhile publishes the new values, never
            # takes them back.
            persisted = bool(changed) and self._persist({k: changes[k] for k in changed},
                                                        caller)
        new_gen, merged = self._publish_live(changes)
        if persisted is False and changed:  # live now; the repository gets it when it is back
            self._pending |= {k: changes[k] for k in changed}
        if persisted:
            # Two nodes changing at once may publish in the other order than they persisted:
            # the last to persist puts the overrides it wrote back on top.
            try:
                new_gen = self._converge() or new_gen
            except (StoreError, ConfigError, MIError) as e:  # the change is live and saved
                log.error("overrides not re-published after %s: %s", action, e)
        result: dict[str, Any] = {"generation": new_gen, "changed": changed, "values": merged}
        if persisted is not None:
            result["persisted"] = persisted
        if "log_level" in changed:
            apply_log_level(merged["log_level"])
        if changed:
            try:
                rec = audit.record(
                    self.repo, caller, action, "config",
                    {k: c["old"] for k, c in changed.items()},
                    {k: c["new"] for k, c in changed.items()})
                result["audit_id"] = rec.id
            except Exception as e:  # the change is live; say the trail missed it
                log.error("audit of %s by %s failed: %s", action, caller, e)
                result["audit_id"] = None
            log.info("%s by %s: %s -> generation %d", action, caller,
                     ", ".join(f"{k}={c['old']!r}->{c['new']!r}" for k, c in changed.items()),
                     new_gen)
        return result

    def _publish_live(self, changes: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Put changes into the live config (compare-and-set, retried); return its generation
        and values. Raises MIError."""
        for attempt in range(_CAS_ATTEMPTS):
            gen, live = store_config.read(self.conn)
            base = live if live is not None else self.desired_config()
            merged = {**base, **changes}
            try:
                settings_mod.validate_combination(merged)
            except ConfigError as e:
                raise bad_params(f"{e}; old config kept") from e
            if merged == base and live is not None:
                self._last_live = merged
                return gen, merged
            new_gen = store_config.compare_and_set(self.conn, gen, merged)
            if new_gen != -1:
                self._last_live = merged
                return new_gen, merged
            _backoff(attempt)
        raise MIError(jsonrpc.CONFLICT, "config changed concurrently too often; retry")

    def _persist(self, changes: dict[str, Any], caller: Caller) -> bool:
        """Merge changes into the deployment's overrides (compare-and-set, retried), with any
        still pending; return False when the repository is down."""
        pending = dict(self._pending)
        try:
            self._write_overrides(lambda saved: saved | pending | changes, str(caller))
        except StoreError as e:
            log.error("cannot persist overrides to %s (written when it is back): %s",
                      overrides.location(self.repo, self.deployment), e)
            return False
        for k in pending:  # written (a newer change of one of them stays pending)
            if self._pending.get(k) == pending[k]:
                del self._pending[k]
        return True

    def _write_overrides(self, edit: Callable[[dict[str, Any]], dict[str, Any]], by: str
                         ) -> bool:
        """Replace the overrides with edit(current) by compare-and-set, retried; return
        whether they changed. Raises StoreError, MIError (conflict)."""
        for attempt in range(_CAS_ATTEMPTS):
            saved = self._read_saved()
            if saved.error:
                log.error("replacing unreadable overrides: %s", saved.error)
            new = edit({} if saved.error else saved.values)
            if new == saved.values and not saved.error:
                return False
            if self.repo.overrides_put(self.deployment, saved.generation, new, by) != -1:
                self._saved = new
                return True
            _backoff(attempt)
        raise MIError(jsonrpc.CONFLICT, "overrides changed concurrently too often; retry")

    def flush_pending(self) -> bool:
        """Write the changes made while the repository was down, then publish the overrides
        where the live config differs; return whether there were some. Raises StoreError."""
        with self._lock:
            if not self._pending:
                return False
            pending = dict(self._pending)
            self._write_overrides(lambda saved: saved | pending, "acm:pending")
            self._pending.clear()
            log.info("persisted the overrides set while the repository was down: %s", pending)
            self._converge()
            return True

    def _converge(self) -> int:
        """Publish the saved overrides the live config lacks; return the new generation, 0
        when it had them (or has no live config: restore_config's). Raises StoreError,
        ConfigError, MIError (conflict)."""
        for attempt in range(_CAS_ATTEMPTS):
            # The live config before the overrides: a CAS on an older read fails, and the
            # retry reads the overrides again.
            gen, live = store_config.read(self.conn)
            if live is None:
                return 0
            diff = {k: v for k, v in self.saved_overrides().items() if live.get(k) != v}
            if not diff:
                return 0
            merged = {**live, **diff}
            settings_mod.validate_combination(merged)
            new_gen = store_config.compare_and_set(self.conn, gen, merged)
            if new_gen != -1:
                self._last_live = merged
                log.info("published the deployment's overrides %s as generation %d", diff,
                         new_gen)
                return new_gen
            _backoff(attempt)
        raise MIError(jsonrpc.CONFLICT, "config changed concurrently too often; retry")

    def saved_overrides(self) -> dict[str, Any]:
        """Return the deployment's MI overrides. Raises ConfigError (unreadable), StoreError."""
        return self._read_saved().checked()

    def _read_saved(self) -> overrides.Saved:
        """Read the overrides; put back the last known ones if they are gone (a store wipe).
        Raises StoreError."""
        with self._lock:
            saved = overrides.read_overrides(self.repo, self.deployment)
            if saved.generation == 0 and not saved.values and not saved.error:
                # None ever written (or wiped): the ones this process knew, else those the
                # store holds from before the deployment had a database.
                known = self._saved or overrides.store_overrides(self.repo, self.conn)
                if known:
                    gen = self.repo.overrides_put(self.deployment, 0, known, "restore")
                    if gen != -1:
                        log.warning("%s had no MI overrides: restored %s",
                                    overrides.location(self.repo, self.deployment), known)
                        self._saved = dict(known)
                        return overrides.Saved(gen, dict(known))
                    saved = overrides.read_overrides(self.repo, self.deployment)
            if not saved.error:
                self._saved = dict(saved.values)
            return saved

    def check_deployment(self) -> str:
        """Name this node's deployment in the store unless another one is named there; return
        the name the store holds (logged as an error when it is not ours: two deployments on
        one store share one live config but not their overrides). Raises StoreError."""
        with self._lock:
            self.conn.call("SET", DEPLOYMENT_KEY, self.deployment, "NX")
            raw = self.conn.call("GET", DEPLOYMENT_KEY)
        owner = raw.decode(errors="replace") if isinstance(raw, bytes) else self.deployment
        if owner != self.deployment:
            log.error("this store belongs to deployment %r (%s), this node to %r: nodes that "
                      "share a store share its live config; give them the same deployment "
                      "setting", owner, DEPLOYMENT_KEY, self.deployment)
        return owner

    def _reset_overrides(self, caller: Caller) -> bool:
        """Empty the deployment's overrides; return whether there were some. Raises
        StoreError."""
        with self._lock:
            self._pending.clear()
            self._saved = {}
            return self._write_overrides(lambda saved: {}, str(caller))

    def desired_config(self) -> dict[str, Any]:
        """Return the config the store should hold: the last live one this process saw (else
        the settings it started with) with the deployment's saved MI overrides on top."""
        try:
            saved = self.saved_overrides()
        except (ConfigError, StoreError) as e:
            log.error("%s", e)
            saved = dict(self._saved or {})
        base = self._last_live if self._last_live is not None else self.settings.detection()
        return {**base, **saved, **self._pending}

    def restore_config(self) -> int:
        """Put the live config back if the store has none (flushed, restarted empty); return
        the new generation, or 0 when the store had one. Raises StoreError."""
        with self._lock:
            gen, live, boot, src = store_config.read_origin(self.conn)
            if live is not None:
                if (src == "boot" and self.boot_id and boot == self.boot_id
                        and self._last_live is not None and live != self._last_live):
                    # A worker of this boot (re)started into the wiped store before this
                    # check and published its start-up settings over what MI had set.
                    new_gen = store_config.compare_and_set(self.conn, gen, self._last_live)
                    if new_gen > 0:
                        log.warning("a worker republished its start-up settings over the live "
                                    "config; restored it as generation %d", new_gen)
                        return new_gen
                self._last_live = live
                return 0
            values = self.desired_config()
            gen = store_config.restore(self.conn, values, self.boot_id)
            if gen:
                self._last_live = values
                log.warning("the store had no live config: restored it as generation %d (%s)",
                            gen, ", ".join(f"{k}={v!r}" for k, v in sorted(values.items())))
            return gen

    def acm_get_config(self, caller: Caller) -> dict[str, Any]:
        """Return the live config, its generation, the overrides and every setting's source."""
        gen, live = store_config.read(self.conn)
        saved: dict[str, Any] | str
        try:
            st = self._read_saved()
            saved, ogen = (f"unreadable: {st.error}" if st.error else st.values), st.generation
        except StoreError as e:  # settings do not need the database: say it is down
            saved, ogen = f"unavailable: {e}", None
        s = self.settings
        return {
            "generation": gen,
            "live": live,
            "overrides": saved,
            "overrides_generation": ogen,
            "overrides_key": overrides.location(self.repo, self.deployment),
            "deployment": self.deployment,
            "settings": {n: _redact_setting(n, v) for n, v in sorted(s.values.items())},
            "sources": dict(sorted(s.source.items())),
            "runtime": sorted(settings_mod.RUNTIME),
            "repository": self.repo.name,
        }

    def acm_stats(self, caller: Caller) -> dict[str, Any]:
        """Return totals and per-worker stats (snapshots are at most ~1 s old)."""
        gen, _ = store_config.read(self.conn)
        snaps = stats_mod.read_all(self.conn)
        workers = []
        for snap in snaps:
            one = stats_mod.summarize([snap])
            one["decisions"] = _split_carriers(one["decisions"])[0]
            workers.append({
                "index": snap["index"], "pid": snap["pid"], "host": snap["host"],
                "started": iso_ms(snap["started"] * 1000),
                "updated": iso_ms(snap["updated"] * 1000),
                "config_generation": snap["config_generation"],
                "store_up": snap["store_up"], "connections": snap.get("connections", 0),
                **{k: one[k] for k in ("requests", "batches", "store_failures", "bad_frames",
                                       "decisions", "service_us", "total_us")},
            })
        total = stats_mod.summarize(snaps)
        total["decisions"], carriers = _split_carriers(total["decisions"])
        # Per node (one `acm serve` of the deployment): does every worker apply the live config?
        nodes: dict[str, dict[str, Any]] = {}
        for snap, w in zip(snaps, workers, strict=True):
            n = nodes.setdefault(snap["node"], {"node": snap["node"], "host": snap["host"],
                                                "workers": 0, "config_generations": set()})
            n["workers"] += 1
            n["config_generations"].add(w["config_generation"])
        for n in nodes.values():
            n["config_generations"] = sorted(n["config_generations"])
            n["in_sync"] = n["config_generations"] == [gen]
        return {"generation": gen,
                "in_sync": bool(snaps) and all(w["config_generation"] == gen for w in workers),
                "nodes": sorted(nodes.values(), key=lambda n: n["node"]),
                "total": total, "workers": workers, "carriers": carriers}

    # -- whitelist -------------------------------------------------------------------------
    def acm_whitelist_add(self, caller: Caller, number: str, reason: str,
                          created_by: str | None = None, expires_at: int | None = None,
                          ttl: int | None = None) -> dict[str, Any]:
        """Whitelist a B-number (record + the marker the decision script reads)."""
        now = _now_ms()
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
            if expires_at >= _MAX_TIME_MS:  # an expiry must have a date, or nothing lists it
                raise bad_params("ttl: the expiry must fall before the year 10000")
        if expires_at is not None and expires_at <= now:
            raise bad_params(f"expires_at: {iso_ms(expires_at)} is in the past")
        entry = WhitelistEntry(b_number=number, reason=reason.strip(),
                               created_by=created_by or caller.actor, created_at_ms=now,
                               expires_at_ms=expires_at)
        old = self.repo.whitelist_put(entry)
        store_config.whitelist_set(self.conn, number, self.settings.partitions, entry.reason,
                                   None if expires_at is None else expires_at - now)
        audit.record(self.repo, caller, "acm_whitelist_add", number,
                     old.to_json() if old else None, entry.to_json())
        return {**entry.to_json(), "replaced": old is not None}

    def acm_whitelist_remove(self, caller: Caller, number: str) -> dict[str, Any]:
        """Remove a B-number's whitelist record and marker."""
        old = self.repo.whitelist_delete(number)
        had_marker = store_config.whitelist_del(self.conn, number, self.settings.partitions)
        if old is None and not had_marker:
            raise MIError(jsonrpc.NOT_FOUND, f"{number} is not whitelisted")
        audit.record(self.repo, caller, "acm_whitelist_remove", number,
                     old.to_json() if old else {"b_number": number}, None)
        return {"removed": number}

    def acm_whitelist_list(self, caller: Caller, number: str | None = None,
                           limit: int = 100) -> dict[str, Any]:
        """List whitelist entries."""
        entries = self.repo.whitelist_list(b_number=number, limit=limit, now_ms=_now_ms())
        return {"count": len(entries), "entries": [e.to_json() for e in entries]}

    def resync_whitelist(self) -> int:
        """Re-assert the markers of every live whitelist record; return how many."""
        now = _now_ms()
        n = 0
        with self._lock:
            for e in self.repo.whitelist_list(limit=1 << 30, now_ms=now):
                ttl = None if e.expires_at_ms is None else e.expires_at_ms - now
                store_config.whitelist_set(self.conn, e.b_number, self.settings.partitions,
                                           e.reason, ttl)
                n += 1
        return n

    # -- blocks ----------------------------------------------------------------------------
    def acm_block_list(self, caller: Caller, number: str | None = None,
                       limit: int = 100) -> dict[str, Any]:
        """List blocked A-numbers (expiry is in call time, ~ wall time when live)."""
        now = _now_ms()
        blocks = [b for b in store_config.list_blocks(self.conn, self.settings.partitions)
                  if number is None or b["a_number"] == number][:limit]
        for b in blocks:
            b["expires_at"] = iso_ms(b["expires_ms"])
            b["expired"] = b["expires_ms"] <= now
        return {"count": len(blocks), "blocks": blocks}

    def acm_unblock(self, caller: Caller, number: str) -> dict[str, Any]:
        """Release one blocked A-number."""
        old = next((b for b in store_config.list_blocks(self.conn, self.settings.partitions)
                    if b["a_number"] == number), None)
        if not store_config.unblock(self.conn, number, self.settings.partitions):
            raise MIError(jsonrpc.NOT_FOUND, f"{number} is not blocked")
        audit.record(self.repo, caller, "acm_unblock", number, old, None)
        return {"unblocked": number}

    # -- carrier registry ------------------------------------------------------------------
    def _change_registry(self, caller: Caller, action: str, kind: str, eid: str,
                         edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Read the document from the repository, `edit` it in place (returning the audit
        record's old value), validate, store, audit and publish it.

        Bad input raises before anything is written. Returns old, new (the entry as stored,
        None once removed), the published version and the audit record's id.
        """
        doc = self.repo.registry_get()
        old = edit(doc)
        doc = registry.validate(doc)
        new = _registry_entry(doc, kind, eid)
        self.repo.registry_put(doc)
        try:
            audit_id: str | None = audit.record(self.repo, caller, action, f"{kind}:{eid}",
                                                old, new).id
        except Exception as e:  # the change is made; say the trail missed it
            log.error("audit of %s by %s failed: %s", action, caller, e)
            audit_id = None
        try:
            version = registry.publish(self.conn, doc)
        except StoreError as e:
            raise MIError(jsonrpc.STORE_UNAVAILABLE,
                          f"{kind} {eid!r} saved in the {self.repo.name} repository but not "
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
        doc = self.repo.registry_get()
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
        ver, published = registry.read(self.conn)
        out: dict[str, Any] = {"version": ver, "document": published,
                               "repository": self.repo.name}
        try:
            out["in_sync"] = registry.validate(self.repo.registry_get()) == published
        except (StoreError, ConfigError) as e:
            out["in_sync"] = None
            out["repository_error"] = str(e)
        return out

    def sync_registry(self) -> dict[str, Any]:
        """Publish the repository's registry when the store's copy differs (a flushed store,
        a new Dragonfly); return {"version", "published"}.

        An empty repository never clears a published document: entries are removed through
        MI, which publishes at once. Raises StoreError, ConfigError (an invalid repository).
        """
        with self._lock:
            doc = self.repo.registry_get()
            ver, published = registry.read(self.conn)
            if not any(doc.values()):
                return {"version": ver, "published": False}
            doc = registry.validate(doc)
            if ver and doc == published:
                return {"version": ver, "published": False}
            ver = registry.publish(self.conn, doc)
            log.info("published the %s repository's carrier registry as version %d",
                     self.repo.name, ver)
            return {"version": ver, "published": True}

    def registry_lost(self) -> bool:
        """Say whether the store has no published registry (a cheap check for the watch)."""
        with self._lock:
            return registry.version(self.conn) == 0

    # -- alerts, audit, help ---------------------------------------------------------------
    def acm_alert_list(self, caller: Caller, number: str | None = None,
                       severity: str | None = None, since: int | None = None,
                       until: int | None = None, limit: int = 50, scan: int = 5000
                       ) -> dict[str, Any]:
        """List recent alerts (store: the newest `scan` records of each partition stream)."""
        alerts = self.repo.alert_list(AlertQuery(b_number=number, min_severity=severity,
                                                 since_ms=since, until_ms=until, limit=limit,
                                                 scan=scan))
        return {"count": len(alerts), "alerts": alerts, "source": self.repo.name}

    def acm_audit_list(self, caller: Caller, action: str | None = None,
                       target: str | None = None, since: int | None = None, limit: int = 50
                       ) -> dict[str, Any]:
        """List audit records, newest first."""
        if target is not None:
            target = numbers.normalise(target, self.settings.default_country_code) or target
        recs = self.repo.audit_list(limit=limit, since_ms=since, action=action, target=target)
        return {"count": len(recs), "records": [r.to_json() for r in recs]}

    def which(self, caller: Caller) -> dict[str, Any]:
        """Describe every command."""
        return {name: {"admin": c.admin, "help": c.help,
                       "params": ["name=value ..."] if c.settings_params else
                       [p.name + ("" if p.required else "?") for p in c.params]}
                for name, c in sorted(self.commands.items())}

    # -- boot ------------------------------------------------------------------------------
    def reconcile_overrides(self, stop: threading.Event, wait_s: float = 15.0) -> None:
        """Publish saved overrides the live config lacks (a supervisor without the hook).

        Waits until a worker of this supervisor has published its stats (so this boot's
        config is in the store), then publishes the difference once.
        """
        failures = 0
        while True:
            try:
                saved = self.saved_overrides()
                break
            except ConfigError as e:
                log.error("%s", e)
                return
            except StoreError as e:  # the database may start after us: keep trying
                if not failures:
                    log.warning("MI overrides not read: %s (retrying)", e)
                failures += 1
                if stop.wait(1.0):
                    return
        if not saved:
            return
        deadline = time.monotonic() + wait_s
        live: dict[str, Any] | None = None
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with self._lock:
                    if _sibling_booted(self.conn):
                        _, live = store_config.read(self.conn)
            except StoreError:
                live = None
            if live is not None:
                break
            stop.wait(0.05)
        if live is None:
            return
        diff = {k: v for k, v in saved.items() if live.get(k) != v}
        if diff:
            with self._lock:
                self.publish(diff, Caller(actor="acm", via="boot", role="admin"),
                             "boot_overrides", persist=False)


def _registry_entry(doc: dict[str, Any], kind: str, eid: str) -> dict[str, Any] | None:
    return next((e for e in doc[kind + "s"] if e["id"] == eid), None)


def _split_carriers(decisions: dict[str, int]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split worker counters into the global ones and {carrier: {verdict:reason: n, "total"}}
    (the per-carrier keys are `@<carrier>|<verdict>:<reason>`, docs/GATEWAY.md)."""
    plain: dict[str, int] = {}
    carriers: dict[str, dict[str, int]] = {}
    for k, n in decisions.items():
        if not k.startswith("@"):
            plain[k] = n
            continue
        carrier, _, vr = k[1:].partition("|")
        c = carriers.setdefault(carrier, {"total": 0})
        c[vr] = c.get(vr, 0) + n
        c["total"] += n
    return plain, dict(sorted(carriers.items()))


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.001, 0.005 * (attempt + 1)))


def _sibling_booted(conn: StoreClient) -> bool:
    """Say whether a worker of our own supervisor (same parent pid) has published stats."""
    ppid = os.getppid()
    for snap in stats_mod.read_all(conn):
        try:
            with open(f"/proc/{snap['pid']}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            return True
    return False


# -- helpers -------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def _clean_actor(actor: Any, role: str, has_token: bool) -> str:
    if actor is not None and str(actor).strip():
        return _ACTOR_RE.sub("_", str(actor).strip())[:64]
    return "token-holder" if has_token else "anonymous"


def _redact_setting(name: str, value: Any) -> Any:
    # Read-only commands need no token even on exposed binds: hide anything secret-shaped.
    if name in _SECRET_SETTINGS or any(w in name for w in ("secret", "token", "password")):
        return "***" if value else ""
    if (name in _URL_SETTINGS or name.endswith("_url")) and isinstance(value, str) \
            and "@" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def _parse_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Parse setting=value pairs against the declarations. Raises MIError(-32602)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        s = settings_mod.BY_NAME.get(name)
        if s is None:
            raise bad_params(f"unknown setting {name!r}; runtime settings: "
                             + ", ".join(sorted(settings_mod.RUNTIME)))
        if not s.runtime:
            raise bad_params(f"{name} cannot be changed at runtime (restart acm serve)")
        try:
            out[name] = s.parse(value)
        except ConfigError as e:
            raise bad_params(f"{e}; old config kept") from e
    return out


def _split_pair(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise bad_params(f"expected name=value, got {item!r}")
    name, _, value = item.partition("=")
    return name.strip(), value.strip()


def _named(cmd: Command, params: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """Turn positional params into named ones (name=value items, else declaration order)."""
    if isinstance(params, dict):
        return dict(params)
    if cmd.name == EVENT_RELOAD and len(params) == 1 and isinstance(params[0], str) \
            and params[0].lstrip().startswith(("{", "[")):
        return {"": params[0]}  # raise_event's nameless JSON parameter, array form
    pairs = bool(params) and all(isinstance(p, str) and "=" in p for p in params)
    if cmd.settings_params or pairs:
        named = dict(_split_pair(p) for p in params)
        if len(named) != len(params):
            raise bad_params("a parameter is given more than once")
        return named
    if len(params) > len(cmd.params):
        raise bad_params(f"{cmd.name} takes at most {len(cmd.params)} positional params")
    return {p.name: v for p, v in zip(cmd.params, params, strict=False)}


def _bind(cmd: Command, named: dict[str, Any]) -> dict[str, Any]:
    """Validate named params against the declaration. Raises MIError(-32602)."""
    if cmd.settings_params:
        return named
    known = {p.name: p for p in cmd.params}
    unknown = sorted(set(named) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise bad_params(f"unknown parameter(s) {', '.join(unknown)} for {cmd.name} "
                         f"(allowed: {allowed})")
    args: dict[str, Any] = {}
    for p in cmd.params:
        if p.name not in named or named[p.name] is None:
            if p.required:
                raise bad_params(f"{cmd.name}: missing required parameter {p.name!r}")
            if p.default is not None:
                args[p.name] = p.default
            continue
        raw = named[p.name]
        if p.parse == _NUMBER:
            args[p.name] = _number(p.name, raw, cmd)
            continue
        try:
            args[p.name] = p.parse(raw)
        except (ValueError, TypeError, OverflowError) as e:
            raise bad_params(f"{p.name}: {e} (got {_shown(raw)})") from e
    return args


def _shown(raw: Any) -> str:
    """Return a value's repr for an error message, cut short (an error must not echo 30 KB)."""
    shown = repr(raw)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _number(name: str, raw: Any, cmd: Command) -> str:
    if not isinstance(raw, str | int) or isinstance(raw, bool) or (
            isinstance(raw, str) and not raw.isprintable()):
        raise bad_params(f"{name}: must be a phone number (got {_shown(raw)})")
    owner = getattr(cmd.handler, "__self__", None)
    cc = owner.settings.default_country_code if owner is not None else "234"
    n = numbers.normalise(str(raw), cc)
    if n is None:
        raise bad_params(f"{name}: {_shown(raw)} is not a phone number")
    return n
