"""`acm db migrate`: apply the bundled SQL migrations in order, each exactly once.

Applied versions are recorded in schema_migrations. Each migration runs in one transaction
together with its record, and every statement is itself re-runnable (IF NOT EXISTS), so two
migrators racing, or a migrator killed half-way on a database without transactional DDL
(YugabyteDB), converge on the same schema. No advisory locks: YSQL does not have them everywhere.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger("acm.migrate")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version VARCHAR(255) PRIMARY KEY,
    checksum VARCHAR(64) NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
)
"""


@dataclass(frozen=True)
class Migration:
    """One bundled migration file."""

    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Return the bundled migrations in the order they apply (by file name)."""
    return [Migration(p.stem, p) for p in sorted(directory.glob("*.sql"))]


def applied(conn: psycopg.Connection) -> dict[str, str]:
    """Return {version: checksum} of the migrations already applied."""
    with conn.cursor() as cur:
        cur.execute(_CREATE_TABLE)
        cur.execute("SELECT version, checksum FROM schema_migrations")
        rows = cur.fetchall()
    conn.commit()
    return {v: c for v, c in rows}


def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration; return the versions applied now.

    A migration whose file changed after it was applied is reported, never re-run.
    Raises psycopg.Error.
    """
    done: list[str] = []
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        have = applied(conn)
        for m in migrations(directory):
            if m.version in have:
                if have[m.version] != m.checksum:
                    log.warning("migration %s changed after it was applied; not re-run",
                                m.version)
                continue
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(m.sql)  # type: ignore[arg-type] - a trusted bundled file
                    cur.execute("INSERT INTO schema_migrations (version, checksum) "
                                "VALUES (%s, %s)", (m.version, m.checksum))
            except psycopg.errors.UniqueViolation:
                log.info("migration %s applied concurrently by another migrator", m.version)
                continue
            log.info("applied migration %s", m.version)
            done.append(m.version)
    return done
