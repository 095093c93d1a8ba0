"""The district hub's SQLite store: the device registry and the journal records of every gate.

A record is stored once per (device, seq), where the device is a row of the registry, so the
same device id at two sites never collides. ``insert_batch`` commits a whole batch in one
transaction and ignores records already present, which makes a batch sent again harmless.

Several hub processes may share one store file: WAL lets readers run beside the writer, and
writers wait up to ``edgenode.sqlite_db.BUSY_TIMEOUT_MS`` for each other.
``synchronous=FULL`` makes a commit durable before the hub sends its ack.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgenode.sqlite_db import apply_migrations, open_durable, schema_version

PUBLIC_KEY_BYTES = 32

# Numbered migrations. Each one runs in a transaction that also records its number, so a
# crash leaves either the old schema or the new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        site TEXT NOT NULL,
        device_id TEXT NOT NULL,
        public_key BLOB NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        registered_at REAL NOT NULL,
        UNIQUE (site, device_id)
    );
    CREATE TABLE records (
        device INTEGER NOT NULL REFERENCES devices (id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        recorded_at REAL NOT NULL,
        age_s REAL NOT NULL,
        station TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reasons TEXT NOT NULL,
        health_subject TEXT,
        community_subject TEXT,
        latency_ms REAL,
        clock_trusted INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        lane TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    """,
)


class HubStoreError(Exception):
    """A registry change that cannot be made, with a message for the operator."""


class WireRecord(BaseModel):
    """One journal record as a gate sends it in a ``batch`` (docs/mqtt.md).

    Fields that a later gate version adds are ignored, and a missing or mistyped field makes
    the whole batch invalid.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    seq: int = Field(ge=1)
    kind: str
    recorded_at: float
    age_s: float
    station: str
    verdict: str
    reasons: list[str]
    health_subject: str | None
    community_subject: str | None
    latency_ms: float | None
    clock_trusted: bool
    prev_hash: str
    hash: str


def parse_records(raw: object) -> list[WireRecord]:
    """Validate a batch's ``records`` list. Raises ValueError on any invalid record."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("records is not a non-empty list")
    try:
        return [WireRecord.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise ValueError(f"invalid record: {exc.error_count()} errors") from exc


@dataclass(frozen=True, slots=True)
class Device:
    """A gate in the registry. ``id`` is the store's key for the device."""

    id: int
    site: str
    device_id: str
    public_key: bytes
    enabled: bool
    registered_at: float


class HubStore:
    """The hub's SQLite database. Use one instance from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_durable(path)
        self._db.execute("PRAGMA foreign_keys=ON")
        apply_migrations(self._db, "schema_migrations", MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HubStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        return schema_version(self._db, "schema_migrations")

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
        try:
            self._db.execute(
                "INSERT INTO devices (site, device_id, public_key, enabled, registered_at) "
                "VALUES (?, ?, ?, 1, ?)",
                (site, device_id, public_key, time.time() if now is None else now),
            )
        except sqlite3.IntegrityError as exc:
            raise HubStoreError(f"device {device_id} at site {site} is already registered") from exc
        device = self.get_device(site, device_id)
        assert device is not None
        return device

    def get_device(self, site: str, device_id: str) -> Device | None:
        row = self._db.execute(
            "SELECT id, site, device_id, public_key, enabled, registered_at FROM devices "
            "WHERE site = ? AND device_id = ?",
            (site, device_id),
        ).fetchone()
        return None if row is None else _device(row)

    def list_devices(self) -> list[Device]:
        rows = self._db.execute(
            "SELECT id, site, device_id, public_key, enabled, registered_at FROM devices "
            "ORDER BY site, device_id"
        ).fetchall()
        return [_device(row) for row in rows]

    def set_enabled(self, site: str, device_id: str, enabled: bool) -> None:
        """Enable or disable a gate. Raises HubStoreError if it is not registered."""
        cursor = self._db.execute(
            "UPDATE devices SET enabled = ? WHERE site = ? AND device_id = ?",
            (int(enabled), site, device_id),
        )
        if cursor.rowcount == 0:
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
    ) -> tuple[int, int]:
        """Store a batch in one transaction. Return (new records, duplicates ignored).

        A record whose (device, seq) is already stored is left as it is, whatever the new copy
        contains.
        """
        received_at = time.time() if received_at is None else received_at
        rows = [_record_row(device.id, record, lane, batch_id, received_at) for record in records]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO records (device, seq, kind, recorded_at, age_s, station, "
                "verdict, reasons, health_subject, community_subject, latency_ms, clock_trusted, "
                "prev_hash, hash, lane, batch_id, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            new = self._db.total_changes - before
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return new, len(rows) - new

    def stored_seqs(self, device: Device) -> list[int]:
        rows = self._db.execute(
            "SELECT seq FROM records WHERE device = ? ORDER BY seq", (device.id,)
        ).fetchall()
        return [int(row[0]) for row in rows]

    def record_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def records(self, device: Device) -> list[dict[str, Any]]:
        """Return a device's stored records in seq order, as dictionaries of their columns."""
        cursor = self._db.execute(
            "SELECT * FROM records WHERE device = ? ORDER BY seq", (device.id,)
        )
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _device(row: tuple[Any, ...]) -> Device:
    return Device(
        id=int(row[0]),
        site=str(row[1]),
        device_id=str(row[2]),
        public_key=bytes(row[3]),
        enabled=bool(row[4]),
        registered_at=float(row[5]),
    )


def _record_row(
    device_pk: int, record: WireRecord, lane: str, batch_id: str, received_at: float
) -> tuple[Any, ...]:
    return (
        device_pk,
        record.seq,
        record.kind,
        record.recorded_at,
        record.age_s,
        record.station,
        record.verdict,
        json.dumps(record.reasons),
        record.health_subject,
        record.community_subject,
        record.latency_ms,
        int(record.clock_trusted),
        record.prev_hash,
        record.hash,
        lane,
        batch_id,
        received_at,
    )
