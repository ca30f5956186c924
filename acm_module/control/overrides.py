"""Runtime overrides: the settings changed through MI, kept with the deployment's shared
configuration, so every node of a deployment applies the same ones, a node that joins gets
them, and a restart keeps them.

Where they live is the control repository's (`ControlRepository.overrides_get/_put`): the
`config_overrides` row of the `deployment` setting when `database_url` is set (migration 0007),
else the store key `{acm.cfg}:overrides` (the store is then the deployment). Every write is a
compare-and-set on the overrides' generation, so two nodes changing settings at once never lose
an update. Workers never read them: the control plane publishes them into the live config
(`{acm.cfg}:detect`), which is all the hot path reads.

Precedence, lowest to highest: default < config file < environment < CLI flag < override. An MI
change is the operator's latest word; `acm_reload reset=true` empties them and hands control
back to the config file and environment.

`acm serve` must call `apply_overrides(settings, open_repository)` after loading its settings
and before starting workers, because each supervisor boot publishes its settings as the live
config. Overrides used to live in a host-local file (`<state_dir>/overrides.json`): two nodes
diverged and a new instance on the same host inherited another's; such a file is now reported
and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acm_module.control.repository import OVERRIDES_KEY, ControlRepository, StoreRepository
from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError, StoreError
from acm_module.core.redis import LazyRedis

log = logging.getLogger("acm.control")

LEGACY_FILENAME = "overrides.json"

__all__ = ["LEGACY_FILENAME", "OVERRIDES_KEY", "Saved", "apply_overrides", "location",
           "read_overrides", "store_overrides"]


@dataclass(frozen=True)
class Saved:
    """A deployment's overrides as read: their generation (0: never written), the validated
    values, and why they are unreadable ("" when they are not)."""

    generation: int
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def checked(self) -> dict[str, Any]:
        """Return the values. Raises ConfigError if the stored ones are unreadable."""
        if self.error:
            raise ConfigError(self.error)
        return dict(self.values)


def location(repo: ControlRepository, deployment: str) -> str:
    """Say where a deployment's overrides live (for messages and acm_get_config)."""
    if repo.name == "store":
        return OVERRIDES_KEY
    return f"{repo.name}:config_overrides[{deployment}]"


def read_overrides(repo: ControlRepository, deployment: str) -> Saved:
    """Return a deployment's overrides, validated. Raises StoreError when the repository fails.

    Names that are not runtime settings are logged and ignored; an invalid value makes the
    whole document unreadable (Saved.error), which acm_set replaces and acm_reload reports.
    """
    where = location(repo, deployment)
    gen, raw = repo.overrides_get(deployment)
    if not isinstance(raw, dict):
        return Saved(gen, error=f"{where}: expected {{\"values\": {{...}}}} in JSON; reset it "
                                "(acm_reload reset=true)")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in settings_mod.RUNTIME:
            log.warning("%s: ignoring %r (not a runtime setting)", where, name)
            continue
        try:
            out[name] = settings_mod.BY_NAME[name].parse(value)
        except ConfigError as e:
            return Saved(gen, error=f"{where}: {e}; fix or reset it")
    return Saved(gen, out)


def store_overrides(repo: ControlRepository, conn: Any) -> dict[str, Any]:
    """Return the overrides the store holds when repo is another repository: those of a
    deployment from before it had a database, which its repository starts from ({} when none or
    unreadable). conn: a redis-py client or LazyRedis. Raises StoreError."""
    if repo.name == "store":
        return {}
    legacy = read_overrides(StoreRepository(conn, 1), "")
    if legacy.values:
        log.warning("taking the MI overrides of the store (%s) into the repository: %s",
                    OVERRIDES_KEY, legacy.values)
    return legacy.values


def apply_overrides(settings: Any,
                    open_repository: Callable[[Any, LazyRedis], ControlRepository]
                    ) -> dict[str, Any]:
    """Put the deployment's MI overrides into resolved settings; return what was applied.

    open_repository(settings, store connection) opens the control repository (cli.py hands in
    control.commands.open_repository). A repository that does not answer leaves the settings
    as they are (the control plane publishes the overrides once it does). Raises ConfigError
    if they are unreadable or the result is inconsistent.
    """
    legacy = Path(settings.state_dir) / LEGACY_FILENAME
    if legacy.exists():
        log.warning("%s: ignored; MI overrides now live with the deployment (%s)", legacy,
                    "the repository" if settings.database_url else OVERRIDES_KEY)
    # Opened on first use: a store that is down is one more StoreError below.
    conn = LazyRedis(settings.store, timeout=2.0, connect_timeout=2.0)
    repo = open_repository(settings, conn)
    where = location(repo, settings.deployment)
    try:
        saved = read_overrides(repo, settings.deployment)
        values = saved.checked() if saved.generation or saved.values or saved.error else (
            store_overrides(repo, conn))
    except StoreError as e:
        # The supervisor says when the store is down (check_store); the database is ours.
        log.log(logging.WARNING if repo.name != "store" else logging.DEBUG,
                "MI overrides not read (%s); the control plane applies them later", e)
        return {}
    finally:
        repo.close()
        conn.close()
    for name, value in values.items():
        if settings.values.get(name) != value and settings.source.get(name) != "default":
            log.info("%s: %s=%r overrides %r from %s", where, name, value,
                     settings.values.get(name), settings.source.get(name))
        settings.values[name] = value
        settings.source[name] = f"override:{where}"
    settings_mod.validate_combination(settings.values)
    return values
