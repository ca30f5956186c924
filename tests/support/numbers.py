"""Call-IDs and phone numbers for tests: fresh, valid E.164, the same shape in every directory."""

from __future__ import annotations

import itertools
import time

_ids = itertools.count()


def cid() -> str:
    """Return a call-ID no other call of the session has."""
    return f"c{next(_ids)}-{time.monotonic_ns()}"


def a_num(i: int) -> str:
    """Return the i-th caller (A) number."""
    return f"+23480310{i:05d}"


def b_num(i: int) -> str:
    """Return the i-th called (B) number."""
    return f"+23480399{i:05d}"
