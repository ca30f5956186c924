"""The live detection config: acm_set, acm_reload, E_ACM_RELOAD, acm_log_level, acm_get_config.

Settings changes are persisted as the deployment's overrides (in the repository: compare-and-set
on their generation), published as a new generation of the live config (compare-and-set too), so
two admins on two nodes never lose each other's update; every worker picks it up within
`config_poll_ms`. Every change is written to the audit trail.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acm_module.control import audit, jsonrpc, overrides
from acm_module.control.audit import Caller
from acm_module.control.commands.base import EVENT_RELOAD, Command, Domain, Param, Plane
from acm_module.control.jsonrpc import MIError, bad_params, param_bool, param_str
from acm_module.core import liveconfig as store_config
from acm_module.core import settings as settings_mod
from acm_module.core import stats as stats_mod
from acm_module.core.errors import ConfigError, StoreError
from acm_module.core.logs import apply_log_level

log = logging.getLogger("acm.control")

# The deployment whose nodes use the store (the first node's `deployment` setting).
DEPLOYMENT_KEY = "{acm.cfg}:deployment"
_CAS_ATTEMPTS = 20
_SECRET_SETTINGS = ("mi_token", "webhook_secret")
_URL_SETTINGS = ("store", "database_url", "questdb_url", "clickhouse_url")


class LiveConfig(Domain):
    """Publish, persist, restore and show the live config."""

    def __init__(self, plane: Plane, boot_id: str,
                 sync_registry: Callable[[], dict[str, Any]]) -> None:
        """boot_id: the supervisor's (a restored config carries it); sync_registry: what
        acm_reload calls to publish the carrier registry again."""
        super().__init__(plane)
        self.boot_id = boot_id
        self.sync_registry = sync_registry
        # The live config as last read from or written to the store: what goes back when the
        # store loses it.
        self._last_live: dict[str, Any] | None = None
        self.deployment: str = plane.settings.deployment
        # The deployment's overrides as last read or written: what goes back when the store
        # loses them (None: not known yet).
        self._saved: dict[str, Any] | None = None
        # Changes made live while the repository was down, written to it when it is back.
        self._pending: dict[str, Any] = {}

    def declare(self) -> list[Command]:
        """Return the command declarations."""
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
        ]

    # -- commands --------------------------------------------------------------------------
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
        # (base.named turns that into the same {"": ...}).
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
            audit.record(self.plane.repo, caller, action, "overrides", previous, None)
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

    def acm_get_config(self, caller: Caller) -> dict[str, Any]:
        """Return the live config, its generation, the overrides and every setting's source."""
        gen, live = store_config.read(self.plane.conn)
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
            "overrides_key": overrides.location(self.plane.repo, self.deployment),
            "deployment": self.deployment,
            "settings": {n: _redact_setting(n, v) for n, v in sorted(s.values.items())},
            "sources": dict(sorted(s.source.items())),
            "runtime": sorted(settings_mod.RUNTIME),
            "repository": self.plane.repo.name,
        }

    # -- the overrides and publishing ----------------------------------------------------
    def publish(self, changes: dict[str, Any], caller: Caller, action: str,
                persist: bool = True) -> dict[str, Any]:
        """Persist changes as overrides (unless persist=False), publish them as a new config
        generation (both compare-and-set, retried), audit."""
        _, live = store_config.read(self.plane.conn)
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
                    self.plane.repo, caller, action, "config",
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
            gen, live = store_config.read(self.plane.conn)
            base = live if live is not None else self.desired_config()
            merged = {**base, **changes}
            try:
                settings_mod.validate_combination(merged)
            except ConfigError as e:
                raise bad_params(f"{e}; old config kept") from e
            if merged == base and live is not None:
                self._last_live = merged
                return gen, merged
            new_gen = store_config.compare_and_set(self.plane.conn, gen, merged)
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
                      overrides.location(self.plane.repo, self.deployment), e)
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
            if self.plane.repo.overrides_put(self.deployment, saved.generation, new, by) != -1:
                self._saved = new
                return True
            _backoff(attempt)
        raise MIError(jsonrpc.CONFLICT, "overrides changed concurrently too often; retry")

    def flush_pending(self) -> bool:
        """Write the changes made while the repository was down, then publish the overrides
        where the live config differs; return whether there were some. Raises StoreError."""
        with self.plane._lock:
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
            gen, live = store_config.read(self.plane.conn)
            if live is None:
                return 0
            diff = {k: v for k, v in self.saved_overrides().items() if live.get(k) != v}
            if not diff:
                return 0
            merged = {**live, **diff}
            settings_mod.validate_combination(merged)
            new_gen = store_config.compare_and_set(self.plane.conn, gen, merged)
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
        with self.plane._lock:
            saved = overrides.read_overrides(self.plane.repo, self.deployment)
            if saved.generation == 0 and not saved.values and not saved.error:
                # None ever written (or wiped): the ones this process knew, else those the
                # store holds from before the deployment had a database.
                known = self._saved or overrides.store_overrides(self.plane.repo, self.plane.conn)
                if known:
                    gen = self.plane.repo.overrides_put(self.deployment, 0, known, "restore")
                    if gen != -1:
                        log.warning("%s had no MI overrides: restored %s",
                                    overrides.location(self.plane.repo, self.deployment), known)
                        self._saved = dict(known)
                        return overrides.Saved(gen, dict(known))
                    saved = overrides.read_overrides(self.plane.repo, self.deployment)
            if not saved.error:
                self._saved = dict(saved.values)
            return saved

    def check_deployment(self) -> str:
        """Name this node's deployment in the store unless another one is named there; return
        the name the store holds (logged as an error when it is not ours: two deployments on
        one store share one live config but not their overrides). Raises StoreError."""
        with self.plane._lock:
            self.plane.conn.execute_command("SET", DEPLOYMENT_KEY, self.deployment, "NX")
            raw = self.plane.conn.execute_command("GET", DEPLOYMENT_KEY)
        owner = raw.decode(errors="replace") if isinstance(raw, bytes) else self.deployment
        if owner != self.deployment:
            log.error("this store belongs to deployment %r (%s), this node to %r: nodes that "
                      "share a store share its live config; give them the same deployment "
                      "setting", owner, DEPLOYMENT_KEY, self.deployment)
        return owner

    def _reset_overrides(self, caller: Caller) -> bool:
        """Empty the deployment's overrides; return whether there were some. Raises
        StoreError."""
        with self.plane._lock:
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

    # -- keeping the store's copy ----------------------------------------------------------
    def restore_config(self) -> int:
        """Put the live config back if the store has none (flushed, restarted empty); return
        the new generation, or 0 when the store had one. Raises StoreError."""
        with self.plane._lock:
            gen, live, boot, src = store_config.read_origin(self.plane.conn)
            if live is not None:
                if (src == "boot" and self.boot_id and boot == self.boot_id
                        and self._last_live is not None and live != self._last_live):
                    # A worker of this boot (re)started into the wiped store before this
                    # check and published its start-up settings over what MI had set.
                    new_gen = store_config.compare_and_set(self.plane.conn, gen, self._last_live)
                    if new_gen > 0:
                        log.warning("a worker republished its start-up settings over the live "
                                    "config; restored it as generation %d", new_gen)
                        return new_gen
                self._last_live = live
                return 0
            values = self.desired_config()
            gen = store_config.restore(self.plane.conn, values, self.boot_id)
            if gen:
                self._last_live = values
                log.warning("the store had no live config: restored it as generation %d (%s)",
                            gen, ", ".join(f"{k}={v!r}" for k, v in sorted(values.items())))
            return gen

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
                with self.plane._lock:
                    if _sibling_booted(self.plane.conn):
                        _, live = store_config.read(self.plane.conn)
            except StoreError:
                live = None
            if live is not None:
                break
            stop.wait(0.05)
        if live is None:
            return
        diff = {k: v for k, v in saved.items() if live.get(k) != v}
        if diff:
            with self.plane._lock:
                self.publish(diff, Caller(actor="acm", via="boot", role="admin"),
                             "boot_overrides", persist=False)


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


def _redact_setting(name: str, value: Any) -> Any:
    # Read-only commands need no token even on exposed binds: hide anything secret-shaped.
    if name in _SECRET_SETTINGS or any(w in name for w in ("secret", "token", "password")):
        return "***" if value else ""
    if (name in _URL_SETTINGS or name.endswith("_url")) and isinstance(value, str) \
            and "@" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.001, 0.005 * (attempt + 1)))


def _sibling_booted(conn: store_config.Store) -> bool:
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
