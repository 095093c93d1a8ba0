"""The hub's feed and publishing tables in PostgreSQL, as sync/feeds.py keeps them in SQLite.

The tables, migrations and results match ``FeedStore``, with PostgreSQL types: ``BIGINT``
times in seconds, ``BYTEA`` dataset files. ``publish_transaction`` takes a transaction-level
advisory lock on the site, so publishers on several machines build one site's versions one
after another, and builds for other sites run at the same time.

A lost connection raises ``StoreUnavailable``, and the next call connects again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg

from edgenode.sqlite_db import split_statements
from sync.feed_backend import TRANSFER_COLUMNS, PublishedState, Transfer, transfer_from_row
from sync.feeds import HealthRow, RosterRow
from sync.hub_store_pg import CONNECT_TIMEOUT_S, MIGRATION_LOCK_ID, PostgresSession

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

# The first key of the two-key advisory lock that ``publish_transaction`` takes. The second is
# hashtext() of the site name, so two sites with the same hash only wait for each other.
PUBLISH_LOCK_CLASS = 0x6564_6670  # "edfp"

# Numbered like sync/feeds.py's MIGRATIONS, with the same effect.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE feed_residents (
        site TEXT NOT NULL,
        subject TEXT NOT NULL,
        health_subject TEXT NOT NULL,
        display_name TEXT NOT NULL,
        building TEXT NOT NULL,
        unit TEXT NOT NULL,
        role TEXT NOT NULL,
        valid_from BIGINT NOT NULL,
        valid_until BIGINT NOT NULL,
        imported_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (site, subject)
    );
    CREATE TABLE feed_health (
        health_subject TEXT PRIMARY KEY,
        colour TEXT NOT NULL,
        as_of BIGINT NOT NULL,
        imported_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE published_sites (
        site TEXT PRIMARY KEY,
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        issued_at BIGINT NOT NULL
    );
    CREATE TABLE published_records (
        site TEXT NOT NULL,
        record_key TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (site, record_key)
    );
    CREATE TABLE published_transfers (
        transfer_id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        kind TEXT NOT NULL,
        version BIGINT NOT NULL,
        base_version BIGINT,
        chunk_size INTEGER NOT NULL,
        data BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX published_transfers_site ON published_transfers (site, created_at);
    """,
    # 2: the keyed hash of the resident's ID number (hex), published for checks by ID number.
    """
    ALTER TABLE feed_residents ADD COLUMN id_hash TEXT;
    """,
)

_RESIDENT_COLUMNS = (
    "site, subject, health_subject, display_name, building, unit, role, valid_from, "
    "valid_until, id_hash"
)


class PostgresFeedStore:
    """The feed and publishing tables in PostgreSQL, over one connection of their own.

    Use from one thread at a time. Raises StoreUnavailable when the server cannot be reached,
    here and in every method.
    """

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self._session = PostgresSession(url, connect_timeout_s=connect_timeout_s)
        self.location = self._session.location
        # The connection of the open publish_transaction, which the other methods then use.
        self._transaction: Connection | None = None
        for version, script in enumerate(MIGRATIONS, start=1):
            self._session.run(functools.partial(_apply_migration, version=version, script=script))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PostgresFeedStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in the open publish transaction, else in a transaction of its own."""
        if self._transaction is not None:
            return work(self._transaction)
        return self._session.run(work)

    def schema_version(self) -> int:
        row = self._run(
            lambda db: db.execute("SELECT MAX(version) FROM feeds_migrations").fetchone()
        )
        return 0 if row is None else int(row[0] or 0)

    # --- feeds ---

    def store_roster(
        self, rows: Sequence[RosterRow], seen: Mapping[str, set[str]], *, now: float
    ) -> int:
        """Upsert roster rows and remove missing residents, as ``FeedStore.store_roster`` does."""

        def store(db: Connection) -> int:
            with db.cursor() as cursor:
                if rows:
                    cursor.executemany(
                        f"INSERT INTO feed_residents ({_RESIDENT_COLUMNS}, imported_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (site, subject) DO UPDATE SET "
                        "health_subject = excluded.health_subject, "
                        "display_name = excluded.display_name, building = excluded.building, "
                        "unit = excluded.unit, role = excluded.role, "
                        "valid_from = excluded.valid_from, valid_until = excluded.valid_until, "
                        "id_hash = excluded.id_hash, imported_at = excluded.imported_at",
                        [_resident_row(row, now) for row in rows],
                    )
                removed = 0
                for site, subjects in seen.items():
                    cursor.execute(
                        "DELETE FROM feed_residents WHERE site = %s AND subject <> ALL(%s)",
                        (site, sorted(subjects)),
                    )
                    removed += max(cursor.rowcount, 0)
            return removed

        return self._run(store)

    def store_health(self, rows: Sequence[HealthRow], *, now: float) -> int:
        """Upsert health statuses, except over a newer stored ``as_of``. Returns the number
        stored."""
        if not rows:
            return 0

        def store(db: Connection) -> int:
            with db.cursor() as cursor:
                # psycopg 3.1 and later sum rowcount over the statements of executemany, and an
                # update that the WHERE clause skips counts 0.
                cursor.executemany(
                    "INSERT INTO feed_health (health_subject, colour, as_of, imported_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (health_subject) DO UPDATE SET "
                    "colour = excluded.colour, as_of = excluded.as_of, "
                    "imported_at = excluded.imported_at "
                    "WHERE excluded.as_of >= feed_health.as_of",
                    [(row.health_subject, row.colour, row.as_of, now) for row in rows],
                )
                return max(cursor.rowcount, 0)

        return self._run(store)

    def residents(self, site: str) -> list[RosterRow]:
        # COLLATE "C" orders the hex subjects byte by byte, as SQLite does, whatever the
        # database's collation; site_records relies on that order.
        rows = self._run(
            lambda db: db.execute(
                f"SELECT {_RESIDENT_COLUMNS} FROM feed_residents WHERE site = %s "
                'ORDER BY subject COLLATE "C"',
                (site,),
            ).fetchall()
        )
        return [RosterRow(*row) for row in rows]

    def health(self, health_subjects: Sequence[str]) -> dict[str, HealthRow]:
        """Return the stored status of each of these health subjects that has one."""
        keys = sorted(set(health_subjects))
        if not keys:
            return {}
        rows = self._run(
            lambda db: db.execute(
                "SELECT health_subject, colour, as_of FROM feed_health "
                "WHERE health_subject = ANY(%s)",
                (keys,),
            ).fetchall()
        )
        return {str(row[0]): HealthRow(str(row[0]), str(row[1]), int(row[2])) for row in rows}

    # --- published datasets (sync/publisher.py) ---

    def publish_transaction(self, site: str, work: Callable[[], T]) -> T:
        """Call ``work`` in one transaction that holds the site's advisory lock.

        The lock is taken first, and the default READ COMMITTED isolation gives each later
        statement a fresh snapshot, so ``work`` reads the version that the previous holder
        committed.

        NOTE: unlike SQLite's BEGIN IMMEDIATE, this lock does not hold back feed imports. An
        import that commits while a build runs may be seen in part (the residents read before
        it, the statuses after), and the next build publishes the rest.
        """
        if self._transaction is not None:
            raise RuntimeError("publish_transaction cannot be nested")

        def locked(db: Connection) -> T:
            db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (PUBLISH_LOCK_CLASS, site))
            self._transaction = db
            try:
                return work()
            finally:
                self._transaction = None

        return self._session.run(locked)

    def published_state(self, site: str) -> PublishedState | None:
        row = self._run(
            lambda db: db.execute(
                "SELECT version, kind, issued_at FROM published_sites WHERE site = %s", (site,)
            ).fetchone()
        )
        return None if row is None else PublishedState(int(row[0]), str(row[1]), int(row[2]))

    def published_digests(self, site: str) -> dict[str, str]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT record_key, digest FROM published_records WHERE site = %s", (site,)
            ).fetchall()
        )
        return {str(key): str(digest) for key, digest in rows}

    def store_transfer(
        self,
        transfer: Transfer,
        digests: Mapping[str, str] | None,
        *,
        changed: Sequence[str] | None,
        removed: Sequence[str],
        keep_transfers: int,
    ) -> None:
        """Store the transfer and the site's published state, as ``FeedBackend`` describes."""
        self._run(
            functools.partial(
                _store_transfer,
                transfer=transfer,
                digests=digests,
                changed=changed,
                removed=removed,
                keep_transfers=keep_transfers,
            )
        )

    def transfer(self, transfer_id: str) -> Transfer | None:
        row = self._run(
            lambda db: db.execute(
                f"SELECT {TRANSFER_COLUMNS} FROM published_transfers WHERE transfer_id = %s",
                (transfer_id,),
            ).fetchone()
        )
        return None if row is None else transfer_from_row(row)

    def stored_snapshot(self, site: str, version: int) -> Transfer | None:
        row = self._run(
            lambda db: db.execute(
                f"SELECT {TRANSFER_COLUMNS} FROM published_transfers WHERE site = %s "
                "AND kind = 'snapshot' AND version = %s ORDER BY created_at DESC LIMIT 1",
                (site, version),
            ).fetchone()
        )
        return None if row is None else transfer_from_row(row)


def _store_transfer(
    db: Connection,
    *,
    transfer: Transfer,
    digests: Mapping[str, str] | None,
    changed: Sequence[str] | None,
    removed: Sequence[str],
    keep_transfers: int,
) -> None:
    site = transfer.site
    if digests is not None:
        db.execute(
            "INSERT INTO published_sites (site, version, kind, issued_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (site) DO UPDATE SET "
            "version = excluded.version, kind = excluded.kind, issued_at = excluded.issued_at",
            (site, transfer.version, transfer.kind, int(transfer.created_at)),
        )
        if changed is None:
            db.execute("DELETE FROM published_records WHERE site = %s", (site,))
            rows = [(site, key, digest) for key, digest in digests.items()]
        else:
            db.execute(
                "DELETE FROM published_records WHERE site = %s AND record_key = ANY(%s)",
                (site, [*removed, *changed]),
            )
            rows = [(site, key, digests[key]) for key in changed]
        # COPY, because a snapshot writes a digest per record: thousands for a large site.
        with (
            db.cursor() as cursor,
            cursor.copy("COPY published_records (site, record_key, digest) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
    db.execute(
        f"INSERT INTO published_transfers ({TRANSFER_COLUMNS}) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            transfer.transfer_id,
            site,
            transfer.kind,
            transfer.version,
            transfer.base_version,
            transfer.chunk_size,
            transfer.data,
            transfer.created_at,
        ),
    )
    db.execute(
        "DELETE FROM published_transfers WHERE site = %s AND transfer_id NOT IN ("
        "SELECT transfer_id FROM published_transfers WHERE site = %s "
        "ORDER BY created_at DESC, version DESC LIMIT %s)",
        (site, site, keep_transfers),
    )


def _apply_migration(db: Connection, *, version: int, script: str) -> None:
    """Apply one migration unless feeds_migrations records it. Run inside a transaction."""
    # The hub store's migration lock, so hubs that start together apply each migration of
    # either store once.
    db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
    db.execute(
        "CREATE TABLE IF NOT EXISTS feeds_migrations "
        "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    applied = db.execute("SELECT 1 FROM feeds_migrations WHERE version = %s", (version,)).fetchone()
    if applied is not None:
        return
    for statement in split_statements(script):
        db.execute(statement)
    db.execute(
        "INSERT INTO feeds_migrations (version, applied_at) VALUES (%s, %s)",
        (version, time.time()),
    )


def _resident_row(row: RosterRow, now: float) -> tuple[Any, ...]:
    return (
        row.site,
        row.subject,
        row.health_subject,
        row.display_name,
        row.building,
        row.unit,
        row.role,
        row.valid_from,
        row.valid_until,
        row.id_hash,
        now,
    )
