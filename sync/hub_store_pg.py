"""The district hub's PostgreSQL store: the same registry and records as sync/hub_store.py.

The tables, migrations and results match the SQLite store, with PostgreSQL types:
``BYTEA`` keys, ``BOOLEAN`` flags, ``DOUBLE PRECISION`` times in seconds since the epoch.
``insert_batch`` commits a whole batch in one transaction and ignores records already
present (``INSERT ... ON CONFLICT DO NOTHING``), so hubs on several machines may write the
same records at once, and each is stored once.

A lost connection raises ``StoreUnavailable``, and the next call connects again. The URL's
password is never logged: messages name the server by ``redact_url``. A password is better
kept out of the URL, in libpq's password file (``~/.pgpass`` or the ``passfile`` parameter).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors

from edgenode.sqlite_db import split_statements
from sync.hub_store import (
    PUBLIC_KEY_BYTES,
    BatchInsert,
    BatchResult,
    Device,
    HubStoreError,
    InvalidRecord,
    TokenRejected,
    WireRecord,
    batch_result,
    device_from_row,
    record_row,
)
from sync.report import (
    LAST_RECEIVED_QUERY,
    RECORD_COLUMNS,
    StoredRecord,
    last_received_rows,
    record_filter,
    stored_record,
)
from sync.store_backend import StoreUnavailable, redact_url

log = structlog.get_logger("sync.hub_store_pg")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10
# Held during each migration, so hubs that start together apply each one once. The value is
# arbitrary; it only has to differ from other advisory locks in the same database.
MIGRATION_LOCK_ID = 0x6564_6765_6875_6231

# Numbered like the SQLite store's migrations, with the same effect.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        site TEXT NOT NULL,
        device_id TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        enabled BOOLEAN NOT NULL DEFAULT TRUE,
        registered_at DOUBLE PRECISION NOT NULL,
        UNIQUE (site, device_id)
    );
    CREATE TABLE records (
        device BIGINT NOT NULL REFERENCES devices (id),
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL,
        age_s DOUBLE PRECISION NOT NULL,
        station TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reasons TEXT NOT NULL,
        health_subject TEXT,
        community_subject TEXT,
        latency_ms DOUBLE PRECISION,
        clock_trusted BOOLEAN NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        lane TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, seq)
    )
    """,
    """
    CREATE INDEX records_by_community_subject ON records (community_subject, recorded_at)
        WHERE community_subject IS NOT NULL;
    CREATE INDEX records_by_received_at ON records (device, received_at);
    CREATE TABLE rejected_records (
        device BIGINT NOT NULL REFERENCES devices (id),
        seq BIGINT NOT NULL,
        reason TEXT NOT NULL,
        body TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, seq)
    )
    """,
    """
    CREATE TABLE enrollment_tokens (
        token_hash BYTEA PRIMARY KEY,
        site TEXT NOT NULL,
        device_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION,
        public_key BYTEA
    )
    """,
    # Fields of ID-number checks and guard overrides, as in the SQLite store.
    """
    ALTER TABLE records
        ADD COLUMN method TEXT,
        ADD COLUMN verdict_seq BIGINT,
        ADD COLUMN guard_id TEXT
    """,
)

_DEVICE_COLUMNS = "id, site, device_id, public_key, enabled, registered_at"
_INSERT_RECORD = (
    "INSERT INTO records (device, seq, kind, recorded_at, age_s, station, verdict, reasons, "
    "health_subject, community_subject, latency_ms, clock_trusted, prev_hash, hash, lane, "
    "batch_id, received_at, method, verdict_seq, guard_id) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (device, seq) DO NOTHING"
)
_INSERT_REJECTED = (
    "INSERT INTO rejected_records (device, seq, reason, body, batch_id, received_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device, seq) DO NOTHING"
)


class PostgresSession:
    """One connection to a PostgreSQL store, opened on first use and again after a loss."""

    def __init__(
        self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S, read_only: bool = False
    ) -> None:
        self._url = url
        self.location = redact_url(url)
        self._connect_timeout_s = connect_timeout_s
        self._read_only = read_only
        self._connection: psycopg.Connection[tuple[Any, ...]] | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        """Return the open connection, connecting first if there is none.

        Raises StoreUnavailable if the server cannot be reached.
        """
        if self._connection is not None and not self._connection.closed:
            return self._connection
        self._connection = None
        try:
            # Autocommit, so that each call opens its own transaction with transaction().
            connection = psycopg.connect(
                self._url, autocommit=True, connect_timeout=self._connect_timeout_s
            )
            if self._read_only:
                connection.execute("SET default_transaction_read_only = on")
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(
                f"cannot connect to the PostgreSQL store {self.location}: {_first_line(exc)}"
            ) from exc
        self._connection = connection
        log.info("store_connected", store=self.location, read_only=self._read_only)
        return connection

    def run(self, work: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        """Run ``work`` in one transaction. Raises StoreUnavailable if the server is gone.

        A lost connection is closed, so the next call connects again.
        """
        connection = self.connect()
        try:
            with connection.transaction():
                return work(connection)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if not connection.broken and not connection.closed:
                raise
            self._connection = None
            connection.close()
            log.warning("store_connection_lost", store=self.location, error=_first_line(exc))
            raise StoreUnavailable(
                f"lost the connection to the PostgreSQL store {self.location}: {_first_line(exc)}"
            ) from exc


class PostgresHubStore:
    """The hub's PostgreSQL database, over one connection. Use from one thread at a time.

    Raises StoreUnavailable when the server cannot be reached, here and in every method.
    """

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self._session = PostgresSession(url, connect_timeout_s=connect_timeout_s)
        self.location = self._session.location
        self._run = self._session.run
        self._migrate()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PostgresHubStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        row = self._run(lambda db: db.execute("SELECT MAX(version) FROM schema_migrations"))
        return int(row.fetchone()[0] or 0)  # type: ignore[index]

    # --- the device registry ---

    def register_device(
        self, site: str, device_id: str, public_key: bytes, *, now: float | None = None
    ) -> Device:
        """Add a gate to the registry, enabled. Raises HubStoreError if it is already there."""
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise HubStoreError(
                f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, this one has "
                f"{len(public_key)}"
            )
        registered_at = time.time() if now is None else now

        def insert(db: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...] | None:
            return db.execute(
                "INSERT INTO devices (site, device_id, public_key, enabled, registered_at) "
                f"VALUES (%s, %s, %s, TRUE, %s) RETURNING {_DEVICE_COLUMNS}",
                (site, device_id, public_key, registered_at),
            ).fetchone()

        try:
            row = self._run(insert)
        except errors.UniqueViolation as exc:
            raise HubStoreError(f"device {device_id} at site {site} is already registered") from exc
        if row is None:
            raise HubStoreError(f"device {device_id} at site {site} was not stored")
        return device_from_row(row)

    def get_device(self, site: str, device_id: str) -> Device | None:
        return self._run(lambda db: _get_device(db, site, device_id))

    def list_devices(self) -> list[Device]:
        rows = self._run(
            lambda db: db.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY site, device_id"
            ).fetchall()
        )
        return [device_from_row(row) for row in rows]

    def set_enabled(self, site: str, device_id: str, enabled: bool) -> None:
        """Enable or disable a gate. Raises HubStoreError if it is not registered."""
        updated = self._run(
            lambda db: (
                db.execute(
                    "UPDATE devices SET enabled = %s WHERE site = %s AND device_id = %s",
                    (enabled, site, device_id),
                ).rowcount
            )
        )
        if updated == 0:
            raise HubStoreError(f"device {device_id} at site {site} is not registered")

    def disable_device(self, site: str, device_id: str) -> None:
        self.set_enabled(site, device_id, False)

    def enable_device(self, site: str, device_id: str) -> None:
        self.set_enabled(site, device_id, True)

    # --- records ---

    def insert_batch(
        self,
        device: Device,
        records: Sequence[WireRecord],
        *,
        lane: str,
        batch_id: str,
        received_at: float | None = None,
        invalid: Sequence[InvalidRecord] = (),
    ) -> BatchResult:
        """Store a batch in one transaction, with its invalid records kept apart.

        The same contract as ``HubStore.insert_batch``: a stored (device, seq) is left as it
        is, a stored copy with another hash is reported in ``conflicts``, and invalid records
        without a seq are not stored.
        """
        batch = BatchInsert(device, tuple(records), lane, batch_id, tuple(invalid), received_at)
        return self.insert_batches([batch])[0]

    def insert_batches(self, batches: Sequence[BatchInsert]) -> list[BatchResult]:
        """Store several batches in one transaction, as ``HubStore.insert_batches`` does."""
        return self._run(lambda db: [_insert(db, batch) for batch in batches])

    def stored_seqs(self, device: Device) -> list[int]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT seq FROM records WHERE device = %s ORDER BY seq", (device.id,)
            ).fetchall()
        )
        return [int(row[0]) for row in rows]

    def record_count(self) -> int:
        row = self._run(lambda db: db.execute("SELECT COUNT(*) FROM records").fetchone())
        return 0 if row is None else int(row[0])

    def records(self, device: Device) -> list[dict[str, Any]]:
        """Return a device's stored records in seq order, as dictionaries of their columns."""

        def select(db: psycopg.Connection[tuple[Any, ...]]) -> list[dict[str, Any]]:
            cursor = db.execute(
                "SELECT * FROM records WHERE device = %s ORDER BY seq", (device.id,)
            )
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return self._run(select)

    # --- enrollment tokens ---

    def add_enrollment_token(
        self,
        token_hash: bytes,
        site: str,
        device_id: str,
        *,
        expires_at: float,
        now: float | None = None,
    ) -> None:
        """Store the hash of a gate's one-time token. Raises HubStoreError if it is registered."""
        created_at = time.time() if now is None else now

        def insert(db: psycopg.Connection[tuple[Any, ...]]) -> None:
            if _get_device(db, site, device_id) is not None:
                raise HubStoreError(f"device {device_id} at site {site} is already registered")
            db.execute(
                "INSERT INTO enrollment_tokens (token_hash, site, device_id, created_at, "
                "expires_at) VALUES (%s, %s, %s, %s, %s)",
                (token_hash, site, device_id, created_at, expires_at),
            )

        self._run(insert)

    def redeem_enrollment_token(
        self,
        token_hash: bytes,
        site: str,
        device_id: str,
        public_key: bytes,
        *,
        now: float | None = None,
    ) -> Device:
        """Check a token and register the gate with ``public_key``, in one transaction.

        The same contract as ``HubStore.redeem_enrollment_token``: raises TokenRejected with
        reason unknown_token, token_mismatch, token_used, token_expired or device_registered,
        and returns the gate again for a token that this same key already redeemed.
        """
        redeemed_at = time.time() if now is None else now
        return self._run(
            functools.partial(
                _redeem,
                token_hash=token_hash,
                site=site,
                device_id=device_id,
                public_key=public_key,
                now=redeemed_at,
            )
        )

    def _migrate(self) -> None:
        """Apply the migrations not yet recorded in ``schema_migrations``, each in its own
        transaction together with the row that records it."""
        for version, script in enumerate(MIGRATIONS, start=1):
            self._run(functools.partial(_apply_migration, version=version, script=script))


def _apply_migration(db: psycopg.Connection[tuple[Any, ...]], *, version: int, script: str) -> None:
    """Apply one migration unless it is recorded. Run inside a transaction."""
    # Taken first, so a second hub that starts at the same time waits here and then finds
    # the version recorded. The lock ends with the transaction.
    db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    applied = db.execute(
        "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
    ).fetchone()
    if applied is not None:
        return
    for statement in split_statements(script):
        db.execute(statement)
    db.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
        (version, time.time()),
    )


def _redeem(
    db: psycopg.Connection[tuple[Any, ...]],
    *,
    token_hash: bytes,
    site: str,
    device_id: str,
    public_key: bytes,
    now: float,
) -> Device:
    """Redeem a token inside a transaction. The row lock makes a second redeem wait."""
    row = db.execute(
        "SELECT site, device_id, expires_at, used_at, public_key FROM enrollment_tokens "
        "WHERE token_hash = %s FOR UPDATE",
        (token_hash,),
    ).fetchone()
    if row is None:
        raise TokenRejected("unknown_token", "no enrollment token has this hash")
    if (row[0], row[1]) != (site, device_id):
        raise TokenRejected("token_mismatch", f"the token is not for {device_id} at {site}")
    existing = _get_device(db, site, device_id)
    if row[3] is not None:
        if existing is not None and bytes(row[4]) == public_key == existing.public_key:
            return existing
        raise TokenRejected("token_used", "the token was used at " + str(row[3]))
    if now > float(row[2]):
        raise TokenRejected("token_expired", f"the token expired at {row[2]}")
    if existing is not None:
        raise TokenRejected("device_registered", f"{device_id} at {site} is registered")
    db.execute(
        "UPDATE enrollment_tokens SET used_at = %s, public_key = %s WHERE token_hash = %s",
        (now, public_key, token_hash),
    )
    inserted = db.execute(
        "INSERT INTO devices (site, device_id, public_key, enabled, registered_at) "
        f"VALUES (%s, %s, %s, TRUE, %s) RETURNING {_DEVICE_COLUMNS}",
        (site, device_id, public_key, now),
    ).fetchone()
    if inserted is None:
        raise HubStoreError(f"device {device_id} at site {site} was not stored")
    return device_from_row(inserted)


def _get_device(
    db: psycopg.Connection[tuple[Any, ...]], site: str, device_id: str
) -> Device | None:
    row = db.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE site = %s AND device_id = %s",
        (site, device_id),
    ).fetchone()
    return None if row is None else device_from_row(row)


def _insert(db: psycopg.Connection[tuple[Any, ...]], batch: BatchInsert) -> BatchResult:
    """Insert one batch inside the caller's transaction."""
    device, records, batch_id = batch.device, batch.records, batch.batch_id
    received_at = time.time() if batch.received_at is None else batch.received_at
    rows = [record_row(device.id, record, batch.lane, batch_id, received_at) for record in records]
    rejected_rows = [
        (device.id, item.seq, item.reason, item.body, batch_id, received_at)
        for item in batch.invalid
        if item.seq is not None
    ]
    stored = _stored_hashes(db, device, records)
    new = 0
    with db.cursor() as cursor:
        if rows:
            # psycopg 3.1 and later sum rowcount over the statements of executemany.
            cursor.executemany(_INSERT_RECORD, rows)
            new = max(cursor.rowcount, 0)
        if rejected_rows:
            cursor.executemany(_INSERT_REJECTED, rejected_rows)
    return batch_result(records, stored, new, len(rejected_rows))


def _stored_hashes(
    db: psycopg.Connection[tuple[Any, ...]], device: Device, records: Sequence[WireRecord]
) -> dict[int, tuple[str, str]]:
    """Return seq -> (prev_hash, hash) of the stored records from just before the batch's first
    seq to just after its last."""
    if not records:
        return {}
    seqs = sorted({record.seq for record in records})
    rows = db.execute(
        "SELECT seq, prev_hash, hash FROM records WHERE device = %s AND seq BETWEEN %s AND %s",
        (device.id, seqs[0] - 1, seqs[-1] + 1),
    ).fetchall()
    return {int(seq): (str(prev), str(hash_)) for seq, prev, hash_ in rows}


def _first_line(exc: BaseException) -> str:
    """Return the first line of a libpq error, which names the server but not the password."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStoreReader:
    """Read-only queries over a PostgreSQL hub store, as ``sync.report.StoreReader`` makes
    over a SQLite file, for reports and alarm checks.

    Raises StoreUnavailable when the server cannot be reached.
    """

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self._session = PostgresSession(url, connect_timeout_s=connect_timeout_s, read_only=True)
        self.location = self._session.location

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PostgresStoreReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def records(
        self,
        *,
        time_column: str = "recorded_at",
        start: float | None = None,
        end: float | None = None,
        site: str | None = None,
        device: str | None = None,
    ) -> list[StoredRecord]:
        """Return verdict records with ``start <= time_column < end``, in time order."""
        where, params = record_filter(time_column, start, end, site, device, mark="%s")
        query = (
            f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
            f"WHERE {where} ORDER BY r.{time_column}, d.site, d.device_id, r.seq"
        )
        rows = self._session.run(lambda db: db.execute(query.encode(), params).fetchall())
        return [stored_record(row) for row in rows]

    def admits_of(
        self, site: str, community_subject: str, start: float, end: float
    ) -> list[StoredRecord]:
        """Return the site's admits of one community subject recorded in ``[start, end]``."""
        query = (
            f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
            "WHERE d.site = %s AND r.community_subject = %s AND r.verdict = 'admit' "
            "AND r.kind = 'verdict' AND r.recorded_at BETWEEN %s AND %s "
            "ORDER BY r.recorded_at, d.device_id, r.seq"
        )
        rows = self._session.run(
            lambda db: db.execute(query.encode(), (site, community_subject, start, end)).fetchall()
        )
        return [stored_record(row) for row in rows]

    def admits_of_subjects(
        self, site: str, subjects: Sequence[str], start: float, end: float
    ) -> list[StoredRecord]:
        """Return the site's admits of any of ``subjects`` recorded in ``[start, end]``."""
        query = (
            f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
            "WHERE d.site = %s AND r.community_subject = ANY(%s) AND r.verdict = 'admit' "
            "AND r.kind = 'verdict' AND r.recorded_at BETWEEN %s AND %s "
            "ORDER BY r.recorded_at, d.device_id, r.seq"
        )
        rows = self._session.run(
            lambda db: db.execute(query.encode(), (site, list(subjects), start, end)).fetchall()
        )
        return [stored_record(row) for row in rows]

    def last_received(self) -> list[tuple[str, str, bool, float, float | None]]:
        """Return (site, device, enabled, registered_at, last received_at or None) per gate."""
        rows = self._session.run(lambda db: db.execute(LAST_RECEIVED_QUERY).fetchall())
        return last_received_rows(rows)
