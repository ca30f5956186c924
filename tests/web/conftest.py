"""Fixtures of the REST API tests: `acm serve` (pool + web process) against real servers, with
users of every role (tests.support.web). PostgreSQL and the writer come from
tests.support.writer_fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.web import Web, running_web


@pytest.fixture(scope="module")
def web(module_redis: str) -> Iterator[Web]:
    """One service per test module (store repository), with users of every role."""
    with running_web(module_redis) as w:
        w.make_users()
        yield w
