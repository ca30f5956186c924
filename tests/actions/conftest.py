"""Fixtures of the actions tests: a fake OpenSIPS MI endpoint that is always closed (PostgreSQL
and the writer come from tests.support.writer_fixtures)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fakes import FakeOpenSIPS


@pytest.fixture
def opensips() -> Iterator[FakeOpenSIPS]:
    """A fake OpenSIPS MI (mi_http + mi_datagram) answering dlg_end_dlg like 3.6."""
    f = FakeOpenSIPS()
    try:
        yield f
    finally:
        f.close()
