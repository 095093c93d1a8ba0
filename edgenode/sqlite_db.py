"""Durable SQLite files and their numbered migrations, shared by the district's stores.

Each migration runs in its own BEGIN IMMEDIATE transaction together with the row that records
it. The write lock is taken first, so two processes starting together apply each migration
once: the second finds the version recorded.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

# Writers wait this long for each other before SQLite raises "database is locked".
BUSY_TIMEOUT_MS = 10_000


def open_durable(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) a database in WAL mode where a commit survives power loss.

    The connection is in autocommit mode: callers open every transaction with an explicit
    BEGIN, and may use it from another thread, one thread at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def apply_migrations(db: sqlite3.Connection, table: str, migrations: Sequence[str]) -> None:
    """Apply the migrations not yet recorded in ``table``, numbered from 1 in list order."""
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {table} "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for version, script in enumerate(migrations, start=1):
        db.execute("BEGIN IMMEDIATE")
        try:
            applied = db.execute(f"SELECT 1 FROM {table} WHERE version = ?", (version,))
            if applied.fetchone() is None:
                for statement in split_statements(script):
                    db.execute(statement)
                db.execute(
                    f"INSERT INTO {table} (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def schema_version(db: sqlite3.Connection, table: str) -> int:
    row = db.execute(f"SELECT MAX(version) FROM {table}").fetchone()
    return int(row[0] or 0)


def split_statements(script: str) -> list[str]:
    """Split a migration script at semicolons. Scripts must not contain ';' in literals."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
