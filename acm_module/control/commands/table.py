"""The command table: every domain's MI commands (and those other rooms hand in) in one dict,
and `Control.dispatch(raw, ...)`, the whole protocol: bytes in, bytes (or None for a
notification) out. The transports in control/server.py only move bytes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from acm_module.control import jsonrpc
from acm_module.control.audit import Caller
from acm_module.control.auth import Authorizer
from acm_module.control.commands.base import Command, CommandFactory, Plane, bind, named, shown
from acm_module.control.commands.gateways import Registry
from acm_module.control.commands.history import History
from acm_module.control.commands.lists import Lists
from acm_module.control.commands.live_config import LiveConfig
from acm_module.control.commands.stats import Stats
from acm_module.control.jsonrpc import MIError, bad_params
from acm_module.control.repository import ControlRepository
from acm_module.core.errors import ConfigError, StoreError

log = logging.getLogger("acm.control")

_ACTOR_RE = re.compile(r"[^A-Za-z0-9_.@:+-]")


@dataclass(frozen=True)
class Reply:
    """The encoded response to one request (None for a notification), and whether the caller
    presented the right token (the datagram endpoint caps what it sends to anyone else)."""

    body: bytes | None
    authenticated: bool = False


class Control(Plane):
    """The control plane: the command domains on one store connection, repository and lock."""

    def __init__(self, settings: Any, repo: ControlRepository | None = None,
                 boot_id: str = "", extra_commands: Sequence[CommandFactory] = ()) -> None:
        """boot_id: the supervisor's (a restored config carries it). extra_commands: what other
        rooms add (the alert lifecycle of actions/), each called with this control plane;
        cli.py hands them in, so this package imports none of them."""
        super().__init__(settings, repo)
        self.auth = Authorizer(settings.mi_token or "")
        self.registry = Registry(self)
        self.live = LiveConfig(self, boot_id, self.registry.sync_registry)
        self.lists = Lists(self)
        self.stats = Stats(self)
        self.history = History(self)
        declared = [*self.live.declare(), *self.stats.declare(), *self.lists.declare(),
                    *self.history.declare(), *self.registry.declare(),
                    Command("which", self.which, False, "List the MI commands.")]
        self.commands: dict[str, Command] = {c.name: c for c in declared}
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
                          f"unknown method {shown(method)}; `which` lists the commands")
        given = named(cmd, params)
        token = given.pop("token", None)
        actor = given.pop("actor", None)
        presented = bearer if bearer is not None else (
            None if token is None else str(token))
        role = self.auth.check(admin=cmd.admin, loopback_bind=loopback_bind,
                               presented=presented, token_always=token_always)
        if seen is not None:
            seen["token"] = presented is not None
        caller = Caller(actor=_clean_actor(actor, role, presented is not None), via=via,
                        role=role)
        return self.invoke(caller, method, given)

    def invoke(self, caller: Caller, method: str, given: dict[str, Any]) -> Any:
        """Run one command for a caller already authorised (MI, or the REST API with its own
        users); return its result. Raises MIError."""
        cmd = self.commands.get(method)
        if cmd is None:
            raise MIError(jsonrpc.METHOD_NOT_FOUND, f"unknown method {method!r}")
        args = bind(cmd, given, self.settings.default_country_code)
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

    def which(self, caller: Caller) -> dict[str, Any]:
        """Describe every command."""
        return {name: {"admin": c.admin, "help": c.help,
                       "params": ["name=value ..."] if c.settings_params else
                       [p.name + ("" if p.required else "?") for p in c.params]}
                for name, c in sorted(self.commands.items())}


def _clean_actor(actor: Any, role: str, has_token: bool) -> str:
    if actor is not None and str(actor).strip():
        return _ACTOR_RE.sub("_", str(actor).strip())[:64]
    return "token-holder" if has_token else "anonymous"
