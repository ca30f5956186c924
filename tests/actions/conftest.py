"""Fixtures of the actions tests: the persist tests' PostgreSQL fixtures (imported, not copied),
a fake OpenSIPS MI endpoint and webhook receivers that are always closed."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_PERSIST = Path(__file__).resolve().parent.parent / "persist"
sys.path.insert(0, str(_PERSIST))  # pgqdb, as the persist conftest imports it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakes

_spec = importlib.util.spec_from_file_location("acm_persist_fixtures", _PERSIST / "conftest.py")
assert _spec is not None and _spec.loader is not None
_persist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_persist)

pg_server = _persist.pg_server
database_url = _persist.database_url
writer_factory = _persist.writer_factory
questdb_server = _persist.questdb_server
questdb_url = _persist.questdb_url

from fakes import FakeOpenSIPS  # noqa: E402


@pytest.fixture
def opensips() -> Iterator[FakeOpenSIPS]:
    """A fake OpenSIPS MI (mi_http + mi_datagram) answering dlg_end_dlg like 3.6."""
    f = FakeOpenSIPS()
    try:
        yield f
    finally:
        f.close()
