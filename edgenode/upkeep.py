"""Field upkeep for the daemon: opening state files that may be corrupt, retention, reloads.

The daemon calls these at start, on a timer and on SIGHUP. They hold no state of their own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from edgenode.cache import Cache
from edgenode.config import Config, ConfigError
from edgenode.journal import Journal
from edgenode.policy import ClockReading
from edgenode.sqlite_db import is_corruption, move_aside

log = structlog.get_logger("edgenode.upkeep")

DAY_S = 86_400
# Records purged per pipeline-thread call, so scans wait at most one chunk for the thread.
PURGE_STEP_RECORDS = 2_000
# Config sections that SIGHUP applies. Other sections are read once at start.
RELOADABLE_SECTIONS = ("policy", "display")
ALARM_FILE_CORRUPT = "file_corrupt"


@dataclass(frozen=True, slots=True)
class StorageAlarm:
    """A state file found corrupt at start and renamed: ``file`` is 'journal' or 'cache'."""

    file: str
    path: Path
    moved_to: Path

    def as_alarm(self) -> dict[str, str]:
        """Return the fields of the gate alarm sent upstream (file names only, no folders)."""
        return {"alarm": ALARM_FILE_CORRUPT, "file": self.file, "moved_to": self.moved_to.name}


def set_aside_corrupt_cache(config: Config) -> list[StorageAlarm]:
    """Move the cache file aside if SQLite finds it corrupt; return the alarm, if any.

    Other SQLite errors propagate. The gate then has no cache, so no verdict is admit until a
    snapshot arrives.
    """
    cache = Cache(config.cache_path)
    try:
        cache.refresh()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        cache.close()
        moved_to = move_aside(config.cache_path)
        log.error(
            "cache_corrupt",
            path=str(config.cache_path),
            moved_to=str(moved_to),
            error=str(exc),
            device=config.device.id,
        )
        return [StorageAlarm("cache", config.cache_path, moved_to)]
    finally:
        cache.close()
    return []


def open_storage(config: Config) -> tuple[Cache, Journal, list[StorageAlarm]]:
    """Open the cache and the journal, moving aside either file if SQLite finds it corrupt.

    The gate then runs on a fresh journal, and on an empty cache until the district sends a
    snapshot (an empty cache never admits). Other SQLite errors propagate.
    """
    alarms = set_aside_corrupt_cache(config)
    cache = Cache(config.cache_path)
    cache.refresh()
    journal = Journal(config.journal_path, config.device.id, recover_corrupt=True)
    if journal.moved_aside is not None:
        alarms.append(StorageAlarm("journal", config.journal_path, journal.moved_aside))
    return cache, journal, alarms


def purge_step(journal: Journal, clock: ClockReading, retention_days: int) -> bool:
    """Purge one step of expired records. Return whether more may be waiting.

    Nothing is purged while the clock is untrusted, because a clock days behind or ahead
    would make records look older than they are.
    """
    if not clock.synchronised:
        log.info("journal_purge_skipped", reason="clock_untrusted")
        return False
    older_than = clock.now - retention_days * DAY_S
    deleted = journal.purge(older_than, chunk=PURGE_STEP_RECORDS, max_chunks=1)
    return deleted == PURGE_STEP_RECORDS


def reload_config(current: Config, load: Callable[[], Config]) -> Config | None:
    """Load the config file again and return ``current`` with its reloadable sections replaced.

    Returns None, and logs every key path at fault, when the new file is invalid: the caller
    keeps ``current``. Changes outside RELOADABLE_SECTIONS are logged and not applied.
    """
    try:
        new = load()
    except ConfigError as exc:
        log.error(
            "config_reload_rejected",
            path=str(exc.path),
            issues=[f"{issue.key_path}: {issue.message}" for issue in exc.issues],
        )
        return None
    changed = [
        name for name in type(current).model_fields if getattr(new, name) != getattr(current, name)
    ]
    ignored = [name for name in changed if name not in RELOADABLE_SECTIONS]
    if ignored:
        log.warning("config_reload_needs_restart", sections=ignored)
    applied = [name for name in changed if name in RELOADABLE_SECTIONS]
    log.info("config_reloaded", sections=applied)
    return current.model_copy(update={name: getattr(new, name) for name in applied})
