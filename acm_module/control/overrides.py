"""Runtime overrides: the settings changed through MI, kept with the deployment's shared state
(the store key `{acm.cfg}:overrides`), so every node of a deployment applies the same ones, a
node that joins gets them, and a restart keeps them.

Precedence, lowest to highest: default < config file < environment < CLI flag < override. An MI
change is the operator's latest word; `acm_reload reset=true` deletes them and hands control
back to the config file and environment.

`acm serve` must call `apply_overrides(settings)` after loading its settings and before starting
workers, because each supervisor boot publishes its settings as the live config. Overrides used
to live in a host-local file (`<state_dir>/overrides.json`): two nodes diverged and a new
instance on the same host inherited another's; such a file is now reported and ignored.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from acm_module.control.audit import iso_ms
from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError, StoreError
from acm_module.decide.store.cluster import StoreClient

log = logging.getLogger("acm.control")

OVERRIDES_KEY = "{acm.cfg}:overrides"
LEGACY_FILENAME = "overrides.json"
_VERSION = 1


def read_overrides(conn: StoreClient) -> dict[str, Any]:
    """Return the deployment's validated overrides ({} when there are none).

    Raises ConfigError for an unreadable document, StoreError when the store fails.
    """
    raw = conn.call("GET", OVERRIDES_KEY)
    if raw is None:
        return {}
    path = OVERRIDES_KEY
    try:
        doc = json.loads(raw)  # type: ignore[arg-type]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); reset it (acm_reload reset=true)"
                          ) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict):
        raise ConfigError(f"{path}: expected {{\"values\": {{...}}}}; reset it")
    out: dict[str, Any] = {}
    for name, value in doc["values"].items():
        if name not in settings_mod.RUNTIME:
            log.warning("%s: ignoring %r (not a runtime setting)", path, name)
            continue
        try:
            out[name] = settings_mod.BY_NAME[name].parse(value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}; fix or delete it") from e
    return out


def write_overrides(conn: StoreClient, values: dict[str, Any], updated_by: str) -> None:
    """Replace the deployment's overrides (one SET). Raises StoreError."""
    doc = {"version": _VERSION, "updated_at": iso_ms(time.time() * 1000),
           "updated_by": updated_by, "values": dict(sorted(values.items()))}
    conn.call("SET", OVERRIDES_KEY, json.dumps(doc, sort_keys=True))


def delete_overrides(conn: StoreClient) -> bool:
    """Remove the deployment's overrides; return whether there were some. Raises StoreError."""
    return bool(conn.call("DEL", OVERRIDES_KEY))


def apply_overrides(settings: Any) -> dict[str, Any]:
    """Put the deployment's MI overrides into resolved settings; return what was applied.

    A store that does not answer leaves the settings as they are (the control plane publishes
    the overrides once it does). Raises ConfigError if they are unreadable or the result is
    inconsistent.
    """
    legacy = Path(settings.state_dir) / LEGACY_FILENAME
    if legacy.exists():
        log.warning("%s: ignored; MI overrides now live with the deployment's store (%s)",
                    legacy, OVERRIDES_KEY)
    conn = StoreClient(settings.store, timeout=2.0, connect_timeout=2.0)
    try:
        values = read_overrides(conn)
    except StoreError as e:
        # The supervisor says the store is down (check_store); nothing more to say here.
        log.debug("MI overrides not read (store: %s); the control plane applies them later", e)
        return {}
    finally:
        conn.close()
    for name, value in values.items():
        if settings.values.get(name) != value and settings.source.get(name) != "default":
            log.info("%s: %s=%r overrides %r from %s", OVERRIDES_KEY, name, value,
                     settings.values.get(name), settings.source.get(name))
        settings.values[name] = value
        settings.source[name] = f"override:{OVERRIDES_KEY}"
    settings_mod.validate_combination(settings.values)
    return values
