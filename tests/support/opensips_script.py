"""Load opensips_scripts/acm_opensips.py, the script OpenSIPS runs, as its python module does."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.support.servers import REPO

SCRIPT = REPO / "opensips_scripts" / "acm_opensips.py"


def load_acm_opensips(name: str = "acm_opensips",
                      monkeypatch: pytest.MonkeyPatch | None = None) -> ModuleType:
    """Import a fresh copy of the script by file under `name`.

    OpenSIPS imports the file by path, not as a package module; it is registered in sys.modules
    before it runs, as an import would (dataclasses look their module up there), through
    `monkeypatch` when given so that it is gone after the test.
    """
    spec = importlib.util.spec_from_file_location(name, SCRIPT)  # noqa: TID251 - run by path
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, mod)
    else:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
