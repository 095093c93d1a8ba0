"""Durable SQLite files and their numbered migrations, shared by the district's stores.

Each migration runs in its own BEGIN IMMEDIATE transaction together with the row that records
it. The write lock is taken first, so two processes starting together apply each migration
once: the second finds the version recorded.
"""

from __future__ import annotations

import os
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


# SQLite result codes that mean the file itself is damaged or is not a database.
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDE_FILES = ("-wal", "-shm", "-journal")


def is_corruption(exc: sqlite3.Error) -> bool:
    """Return whether an error reports a corrupt database file or a file that is no database."""
    return getattr(exc, "sqlite_errorcode", None) in _CORRUPTION_CODES


def move_aside(path: Path, now: float | None = None) -> Path:
    """Rename a damaged database and its side files with a UTC timestamp, deleting nothing.

    Returns the new path of the main file, such as ``journal.db.corrupt-20261204T223000Z``.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    fsync_dir(path.parent)
    return target


def backup_before_migration(db: sqlite3.Connection, path: Path, version: int) -> Path:
    """Copy the database with SQLite's online backup API to a file beside it.

    The copy is named ``<name>.v<version>.bak`` after the schema version it holds.
    """
    target = path.with_name(f"{path.name}.v{version}.bak")
    temporary = target.with_name(target.name + ".tmp")
    copy = sqlite3.connect(temporary)
    try:
        db.backup(copy)
    finally:
        copy.close()
    temporary.replace(target)
    fsync_dir(path.parent)
    return target


def remove_old_backups(path: Path, keep: Path) -> list[Path]:
    """Delete the migration backups of ``path`` other than ``keep``, after a migration worked."""
    removed = []
    for backup in path.parent.glob(f"{path.name}.v*.bak"):
        if backup != keep:
            backup.unlink(missing_ok=True)
            removed.append(backup)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable. Some file systems reject fsync on a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
