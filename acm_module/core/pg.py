"""PostgreSQL plumbing shared by the writer's sink, the control repository and the actions trail.

Imports psycopg only when asked for its error classes: close_quietly works on any DB-API
connection.
"""

from __future__ import annotations

import contextlib
from typing import Any


def close_quietly(conn: Any) -> None:
    """Close a database connection (None, or one already broken, too); never raise."""
    if conn is not None:
        with contextlib.suppress(Exception):  # closing a broken connection must not raise
            conn.close()


def retryable_errors() -> tuple[type[BaseException], ...]:
    """Return the psycopg errors that say the server or the link is in trouble, not the data."""
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.AdminShutdown,
            psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected, OSError)
