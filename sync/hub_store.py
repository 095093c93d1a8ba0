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
    # The code-sharing check looks up admits by community subject after every batch, and the
    # silent-gate check reads each gate's latest received_at: without these, both scan every
    # record. Records that fail validation are kept apart, so their seqs can be acked.
    """
    CREATE INDEX records_by_community_subject ON records (community_subject, recorded_at)
        WHERE community_subject IS NOT NULL;
    CREATE INDEX records_by_received_at ON records (device, received_at);
    CREATE TABLE rejected_records (
        device INTEGER NOT NULL REFERENCES devices (id),
        seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        body TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    """,
    # One-time enrollment tokens (sync/enrollment.py), stored only as their SHA-256. A used
    # token keeps the public key it registered, so a repeated request from that key gets the
    # same result.
    """
    CREATE TABLE enrollment_tokens (
        token_hash BLOB PRIMARY KEY,
        site TEXT NOT NULL,
        device_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        public_key BLOB
    ) WITHOUT ROWID;
    """,
    # Fields of ID-number checks and guard overrides (docs/mqtt.md, "batch"): the check's
    # method, and on an override the seq of the verdict it overrides and the guard on duty.
    """
    ALTER TABLE records ADD COLUMN method TEXT;
    ALTER TABLE records ADD COLUMN verdict_seq INTEGER;
    ALTER TABLE records ADD COLUMN guard_id TEXT;
    """,
)
# The chain hash before a gate's first record (edgenode.journal.GENESIS_HASH), in hex.
GENESIS_HASH_HEX = "00" * 32
# The part of an invalid record's JSON kept in rejected_records, in characters.
MAX_REJECTED_BODY_CHARS = 4096


class HubStoreError(Exception):
    """A registry change that cannot be made, with a message for the operator."""


class TokenRejected(HubStoreError):
    """An enrollment token that cannot be redeemed. ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


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
    # Set only where they apply: "id_number" on a verdict from an ID-number check, and the
    # overridden verdict's seq and the guard's on-duty id on an override.
    method: str | None = None
    verdict_seq: int | None = Field(default=None, ge=1)
    guard_id: str | None = None


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A record of a batch that failed validation.

    ``seq`` is None when the record has no usable seq, and then it cannot be acked.
    """

    seq: int | None
    reason: str
    body: str


@dataclass(frozen=True, slots=True)
class ParsedRecords:
    valid: list[WireRecord]
    invalid: list[InvalidRecord]


def parse_records(raw: object) -> ParsedRecords:
    """Validate a batch's ``records`` list record by record.

    Raises ValueError when ``records`` is not a non-empty list, or when two records of the
    batch share a seq. An invalid record does not invalidate the others.
    """
    if not isinstance(raw, list) or not raw:
        raise ValueError("records is not a non-empty list")
    valid: list[WireRecord] = []
    invalid: list[InvalidRecord] = []
    for item in raw:
        try:
            valid.append(WireRecord.model_validate(item))
        except ValidationError as exc:
            invalid.append(_invalid_record(item, exc))
    seqs = [record.seq for record in valid] + [r.seq for r in invalid if r.seq is not None]
    if len(seqs) != len(set(seqs)):
        raise ValueError("two records of the batch have the same seq")
    return ParsedRecords(valid, invalid)


def _invalid_record(item: object, exc: ValidationError) -> InvalidRecord:
    seq = item.get("seq") if isinstance(item, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        seq = None
    fields = sorted({".".join(str(part) for part in error["loc"]) for error in exc.errors()})
    try:
        body = json.dumps(item, ensure_ascii=False, sort_keys=True, default=str)
    except ValueError:
        body = repr(item)
    return InvalidRecord(
        seq, f"invalid fields: {', '.join(fields)}", body[:MAX_REJECTED_BODY_CHARS]
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of ``insert_batch`` for one batch.

    ``conflicts`` are seqs already stored with a different hash: the stored copy is kept.
    ``chain_breaks`` are new records whose ``prev_hash`` is not the hash of the gate's
    record before them, or whose hash is not the ``prev_hash`` of the one after them, where
    that neighbour is stored or in the same batch.
    """

    new: int
    duplicates: int
    rejected: int = 0
    conflicts: tuple[int, ...] = ()
    chain_breaks: tuple[int, ...] = ()


def batch_result(
    records: Sequence[WireRecord], stored: dict[int, tuple[str, str]], new: int, rejected: int
) -> BatchResult:
    """Build a batch's result from the (prev_hash, hash) by seq stored before its insert."""
    conflicts = tuple(
        record.seq
        for record in records
        if record.seq in stored and stored[record.seq][1] != record.hash
    )
    fresh = [record for record in records if record.seq not in stored]
    return BatchResult(
        new=new,
        duplicates=len(records) - new,
        rejected=rejected,
        conflicts=conflicts,
        chain_breaks=_chain_breaks(fresh, records, stored),
    )


@dataclass(frozen=True, slots=True)
class Device:
    """A gate in the registry. ``id`` is the store's key for the device."""

    id: int
    site: str
    device_id: str
    public_key: bytes
    enabled: bool
    registered_at: float


@dataclass(frozen=True, slots=True)
class BatchInsert:
    """One batch for ``insert_batches``: the arguments of ``insert_batch``."""

    device: Device
    records: tuple[WireRecord, ...]
    lane: str
    batch_id: str
    invalid: tuple[InvalidRecord, ...] = ()
    received_at: float | None = None


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
        return None if row is None else device_from_row(row)

    def list_devices(self) -> list[Device]:
        rows = self._db.execute(
            "SELECT id, site, device_id, public_key, enabled, registered_at FROM devices "
            "ORDER BY site, device_id"
        ).fetchall()
        return [device_from_row(row) for row in rows]

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
        invalid: Sequence[InvalidRecord] = (),
    ) -> BatchResult:
        """Store a batch in one transaction, with its invalid records kept apart.

        A record whose (device, seq) is already stored is left as it is, whatever the new
        copy contains. A copy with another hash is reported in ``conflicts``. Invalid records
        without a seq are not stored.
        """
        batch = BatchInsert(device, tuple(records), lane, batch_id, tuple(invalid), received_at)
        return self.insert_batches([batch])[0]

    def insert_batches(self, batches: Sequence[BatchInsert]) -> list[BatchResult]:
        """Store several batches in one transaction, as ``insert_batch`` stores one.

        The batches share one commit, and so one fsync, which is most of a small batch's cost.
        Returns one result per batch, in order. A later batch sees the records of the earlier
        ones as stored.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            results = [self._insert(batch) for batch in batches]
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return results

    def _insert(self, batch: BatchInsert) -> BatchResult:
        """Insert one batch inside the caller's transaction."""
        device, records, batch_id = batch.device, batch.records, batch.batch_id
        received_at = time.time() if batch.received_at is None else batch.received_at
        rows = [
            record_row(device.id, record, batch.lane, batch_id, received_at) for record in records
        ]
        rejected_rows = [
            (device.id, item.seq, item.reason, item.body, batch_id, received_at)
            for item in batch.invalid
            if item.seq is not None
        ]
        stored = self._stored_hashes(device, records)
        before = self._db.total_changes
        self._db.executemany(
            "INSERT OR IGNORE INTO records (device, seq, kind, recorded_at, age_s, station, "
            "verdict, reasons, health_subject, community_subject, latency_ms, clock_trusted, "
            "prev_hash, hash, lane, batch_id, received_at, method, verdict_seq, guard_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        new = self._db.total_changes - before
        self._db.executemany(
            "INSERT OR IGNORE INTO rejected_records (device, seq, reason, body, batch_id, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?)",
            rejected_rows,
        )
        return batch_result(records, stored, new, len(rejected_rows))

    def _stored_hashes(
        self, device: Device, records: Sequence[WireRecord]
    ) -> dict[int, tuple[str, str]]:
        """Return seq -> (prev_hash, hash) of the stored records from just before the batch's
        first seq to just after its last."""
        if not records:
            return {}
        seqs = sorted({record.seq for record in records})
        rows = self._db.execute(
            "SELECT seq, prev_hash, hash FROM records WHERE device = ? AND seq BETWEEN ? AND ?",
            (device.id, seqs[0] - 1, seqs[-1] + 1),
        ).fetchall()
        return {int(seq): (str(prev), str(hash_)) for seq, prev, hash_ in rows}

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
        if self.get_device(site, device_id) is not None:
            raise HubStoreError(f"device {device_id} at site {site} is already registered")
        self._db.execute(
            "INSERT INTO enrollment_tokens (token_hash, site, device_id, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (token_hash, site, device_id, time.time() if now is None else now, expires_at),
        )

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

        Raises TokenRejected with reason unknown_token, token_mismatch (a token of another
        gate), token_used, token_expired or device_registered. A token that this same key
        already redeemed for this gate returns the gate again.
        """
        now = time.time() if now is None else now
        self._db.execute("BEGIN IMMEDIATE")
        try:
            device = self._redeem(token_hash, site, device_id, public_key, now)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return device

    def _redeem(
        self, token_hash: bytes, site: str, device_id: str, public_key: bytes, now: float
    ) -> Device:
        row = self._db.execute(
            "SELECT site, device_id, expires_at, used_at, public_key FROM enrollment_tokens "
            "WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            raise TokenRejected("unknown_token", "no enrollment token has this hash")
        if (row[0], row[1]) != (site, device_id):
            raise TokenRejected("token_mismatch", f"the token is not for {device_id} at {site}")
        existing = self.get_device(site, device_id)
        if row[3] is not None:
            if existing is not None and bytes(row[4]) == public_key == existing.public_key:
                return existing
            raise TokenRejected("token_used", "the token was used at " + str(row[3]))
        if now > float(row[2]):
            raise TokenRejected("token_expired", f"the token expired at {row[2]}")
        if existing is not None:
            raise TokenRejected("device_registered", f"{device_id} at {site} is registered")
        self._db.execute(
            "UPDATE enrollment_tokens SET used_at = ?, public_key = ? WHERE token_hash = ?",
            (now, public_key, token_hash),
        )
        self._db.execute(
            "INSERT INTO devices (site, device_id, public_key, enabled, registered_at) "
            "VALUES (?, ?, ?, 1, ?)",
            (site, device_id, public_key, now),
        )
        device = self.get_device(site, device_id)
        assert device is not None
        return device


def _chain_breaks(
    fresh: Sequence[WireRecord], batch: Sequence[WireRecord], stored: dict[int, tuple[str, str]]
) -> tuple[int, ...]:
    """Return the seqs of new records that do not link to their known neighbours.

    ``stored`` maps seq to (prev_hash, hash) for the stored records around the batch. A break
    between two records is reported at the later one. Only known neighbours are checked: a
    gap is not a break, because the missing records may be on their way in another batch.
    """
    known_hash = {seq: hashes[1] for seq, hashes in stored.items()}
    known_hash.update((record.seq, record.hash) for record in batch)
    breaks = set()
    for record in fresh:
        expected_prev = GENESIS_HASH_HEX if record.seq == 1 else known_hash.get(record.seq - 1)
        if expected_prev is not None and record.prev_hash != expected_prev:
            breaks.add(record.seq)
        # A successor stored earlier, from another batch, must point back at this record.
        successor = stored.get(record.seq + 1)
        if successor is not None and successor[0] != record.hash:
            breaks.add(record.seq + 1)
    return tuple(sorted(breaks))


def device_from_row(row: tuple[Any, ...]) -> Device:
    """Build a Device from the columns ``id, site, device_id, public_key, enabled,
    registered_at``, as both store backends select them."""
    return Device(
        id=int(row[0]),
        site=str(row[1]),
        device_id=str(row[2]),
        public_key=bytes(row[3]),
        enabled=bool(row[4]),
        registered_at=float(row[5]),
    )


def record_row(
    device_pk: int, record: WireRecord, lane: str, batch_id: str, received_at: float
) -> tuple[Any, ...]:
    """Return the values of one ``records`` row, in the column order of both backends."""
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
        record.clock_trusted,
        record.prev_hash,
        record.hash,
        lane,
        batch_id,
        received_at,
        record.method,
        record.verdict_seq,
        record.guard_id,
    )
