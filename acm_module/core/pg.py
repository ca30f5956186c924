"""PostgreSQL plumbing shared by the writer's sink, the control repository and the actions trail.

Needs no psycopg import: what it does works on any DB-API connection.
"""

from __future__ import annotations

import contextlib
from typing import Any


def close_quietly(conn: Any) -> None:
    """Close a database connection (None, or one already broken, too); never raise."""
    if conn is not None:
        with contextlib.suppress(Exception):  # closing a broken connection must not raise
            conn.close()
