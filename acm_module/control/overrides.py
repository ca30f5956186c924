"""Runtime overrides: the settings changed through MI, kept in `<state_dir>/overrides.json` so they
survive a restart.

Precedence, lowest to highest: default < config file < environment < CLI flag < override. An MI
change is the operator's latest word; `acm_reload reset=true` deletes the file and hands control
back to the config file and environment.

`acm serve` must call `apply_overrides(settings)` after loading its settings and before starting
workers, because each supervisor boot publishes its settings as the live config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from acm_module.control.audit import iso_ms
from acm_module.core import settings as settings_mod
from acm_module.core.errors import ConfigError

log = logging.getLogger("acm.control")

FILENAME = "overrides.json"
_VERSION = 1


def overrides_path(settings: Any) -> Path:
    """Return the override file of a Settings object."""
    return Path(settings.state_dir) / FILENAME


def read_overrides(path: Path) -> dict[str, Any]:
    """Return the validated overrides in a file ({} when there is none). Raises ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or delete it") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict):
        raise ConfigError(f"{path}: expected {{\"values\": {{...}}}}; fix or delete it")
    out: dict[str, Any] = {}
    for name, raw in doc["values"].items():
        if name not in settings_mod.RUNTIME:
            log.warning("%s: ignoring %r (not a runtime setting)", path, name)
            continue
        try:
            out[name] = settings_mod.BY_NAME[name].parse(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}; fix or delete it") from e
    return out


def write_overrides(path: Path, values: dict[str, Any], updated_by: str) -> None:
    """Replace the override file atomically (write a temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": _VERSION, "updated_at": iso_ms(time.time() * 1000),
           "updated_by": updated_by, "values": dict(sorted(values.items()))}
    fd, tmp = tempfile.mkstemp(prefix=".overrides-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def delete_overrides(path: Path) -> bool:
    """Remove the override file; return whether there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def apply_overrides(settings: Any) -> dict[str, Any]:
    """Put the saved MI overrides into resolved settings; return what was applied.

    Raises ConfigError if the file is unreadable or the result is inconsistent.
    """
    path = overrides_path(settings)
    values = read_overrides(path)
    for name, value in values.items():
        if settings.values.get(name) != value and settings.source.get(name) != "default":
            log.info("%s: %s=%r overrides %r from %s", path, name, value,
                     settings.values.get(name), settings.source.get(name))
        settings.values[name] = value
        settings.source[name] = f"override:{path}"
    settings_mod.validate_combination(settings.values)
    return values
