"""The verdict journal: a hash-chained, durable SQLite log that is also the sync outbox.

Each record carries a per-device sequence number that never repeats (AUTOINCREMENT keeps the
high-water mark even after rows are deleted) and the SHA-256 of the record before it, so a
deleted or edited record is detected by ``verify``. Records hold pseudonymous subjects and
reason codes, never a raw payload or an ID number.

Retention: ``purge`` deletes the oldest records once the district has acked them and they are
older than the retention period. It deletes only a prefix of the chain and stores the last
deleted record's seq and hash as the anchor, so ``verify`` checks the rest from there.

SD-card wear: every commit is synchronous=FULL (one fsync of the write-ahead log), because a
verdict that the guard has seen must survive a power cut. ``append_verdicts`` commits all the
verdicts resolved together in one transaction, frames without a code never write, and
journal_size_limit truncates the write-ahead log after each checkpoint, so it stays small.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edgenode.policy import Verdict
from edgenode.sqlite_db import (
    BUSY_TIMEOUT_MS,
    backup_before_migration,
    is_corruption,
    move_aside,
    remove_old_backups,
)

log = structlog.get_logger("edgenode.journal")

GENESIS_HASH = bytes(32)
# Host parameters per statement, well below SQLite's default limit of 32,766.
_SQL_CHUNK = 500

# Numbered schema migrations. Each runs in the same transaction that records it.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        device_id TEXT NOT NULL,
        station TEXT NOT NULL,
        recorded_at REAL NOT NULL,
        clock_trusted INTEGER NOT NULL,
        verdict TEXT NOT NULL,
        reasons TEXT NOT NULL,
        health_subject TEXT,
        community_subject TEXT,
        latency_ms REAL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE INDEX records_recorded_at ON records (recorded_at);
    """,
    # 2: the outbox. acked_at is set when the district's signed ack for the record arrives.
    # It is not covered by the hash chain, so marking a record acked never changes its hash.
    # The partial indexes keep the unacked records (the backlog) quick to page through even
    # when millions of acked records precede them.
    """
    ALTER TABLE records ADD COLUMN acked_at REAL;
    CREATE INDEX records_unacked ON records (seq) WHERE acked_at IS NULL;
    CREATE INDEX records_unacked_deny ON records (seq) WHERE acked_at IS NULL AND verdict = 'deny';
    CREATE TABLE outbox_state (name TEXT PRIMARY KEY, value REAL NOT NULL);
    """,
    # 3: the retention anchor, the seq and hash of the last purged record. verify starts the
    # chain from it instead of from the genesis hash.
    """
    CREATE TABLE chain_anchor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        purged_records INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    # 4: the guard's desk. ``method`` is "id_number" for a verdict on a resident checked by ID
    # number and NULL for scanned codes. An "override" record links to its verdict by
    # ``verdict_seq`` and names the signed-in guard. The unique index allows one per verdict.
    """
    ALTER TABLE records ADD COLUMN method TEXT;
    ALTER TABLE records ADD COLUMN verdict_seq INTEGER;
    ALTER TABLE records ADD COLUMN guard_id TEXT;
    CREATE UNIQUE INDEX records_override_once ON records (verdict_seq) WHERE kind = 'override';
    """,
)

# The write-ahead log is truncated to this size after a checkpoint (SQLite's
# journal_size_limit). Checkpoints run every 1,000 pages, SQLite's default.
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
# Records deleted per purge transaction, so one purge never grows the write-ahead log much.
PURGE_CHUNK_RECORDS = 5_000

# Upper bound on one page of unacked_records, so a caller never loads the whole backlog.
MAX_PAGE_RECORDS = 10_000

_COLUMNS = (
    "seq",
    "kind",
    "device_id",
    "station",
    "recorded_at",
    "clock_trusted",
    "verdict",
    "reasons",
    "health_subject",
    "community_subject",
    "latency_ms",
    "method",
    "verdict_seq",
    "guard_id",
)
# Fields that the hash chain covers only when set, so records written before they existed
# keep their hashes.
_OPTIONAL_FIELDS = ("method", "verdict_seq", "guard_id")


class JournalError(Exception):
    """The journal file cannot be opened or written. ``reason`` is a stable snake_case code."""

    def __init__(self, message: str, reason: str = "journal_error") -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ChainAnchor:
    """The start of the stored chain: the seq and hash of the last purged record."""

    seq: int
    hash: bytes
    purged_records: int


@dataclass(frozen=True, slots=True)
class VerdictEntry:
    """One verdict to record, for ``append_verdicts``."""

    verdict: Verdict
    station: str
    recorded_at: float
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class JournalRecord:
    seq: int
    kind: str
    device_id: str
    station: str
    recorded_at: float
    clock_trusted: bool
    verdict: str
    reasons: tuple[str, ...]
    health_subject: str | None
    community_subject: str | None
    latency_ms: float | None
    # "id_number" for a check by ID number, None for scanned codes.
    method: str | None = None
    # For an "override" record: the seq of the verdict it overrides, and the guard's id.
    verdict_seq: int | None = None
    guard_id: str | None = None

    def canonical(self) -> bytes:
        """The bytes that the hash chain covers."""
        body: dict[str, Any] = {
            "seq": self.seq,
            "kind": self.kind,
            "device_id": self.device_id,
            "station": self.station,
            "recorded_at": round(float(self.recorded_at), 6),
            "clock_trusted": self.clock_trusted,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "health_subject": self.health_subject,
            "community_subject": self.community_subject,
            "latency_ms": None if self.latency_ms is None else round(float(self.latency_ms), 3),
        }
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An unacked record with its chain hashes, as the uplink sends it."""

    record: JournalRecord
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """One way in which the stored chain differs from an intact one."""

    seq: int
    problem: str


def chain_hash(prev_hash: bytes, record: JournalRecord) -> bytes:
    return hashlib.sha256(prev_hash + record.canonical()).digest()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one write transaction: commit on success, roll back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply pending migrations, after backing up a journal that already has records."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    pending = [v for v in range(1, len(_MIGRATIONS) + 1) if v not in applied]
    if not pending:
        return
    backup = backup_before_migration(conn, path, max(applied, default=0)) if applied else None
    for version, script in enumerate(_MIGRATIONS, start=1):
        if version in applied:
            continue
        with transaction(conn):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
    if backup is not None:
        remove_old_backups(path, keep=backup)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        _migrate(conn, path)
        # Reads a page of each table, so a damaged header or schema shows up here.
        conn.execute("SELECT COUNT(*) FROM (SELECT seq FROM records ORDER BY seq DESC LIMIT 1)")
    except BaseException:
        conn.close()
        raise
    return conn


class Journal:
    """The journal file. ``moved_aside`` names the corrupt file replaced at open, if any.

    With ``recover_corrupt`` set, a file that SQLite reports as corrupt is renamed with a
    timestamp (never deleted) and a fresh journal takes its place. Its sequence starts above
    any seq the old file can have used, so the district never takes a new record for a
    duplicate. Without it, a corrupt file raises JournalError.
    """

    def __init__(self, path: Path, device_id: str, *, recover_corrupt: bool = False) -> None:
        self.path = path
        self.device_id = device_id
        self.moved_aside: Path | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = _connect(path)
        except sqlite3.Error as exc:
            if not (recover_corrupt and is_corruption(exc)):
                raise JournalError(f"cannot open journal {path}: {exc}") from exc
            self._conn = self._replace_corrupt(exc)

    def _replace_corrupt(self, error: sqlite3.Error) -> sqlite3.Connection:
        floor = _salvage_high_water(self.path)
        self.moved_aside = move_aside(self.path)
        log.error(
            "journal_corrupt",
            path=str(self.path),
            moved_to=str(self.moved_aside),
            error=str(error),
            device=self.device_id,
        )
        # NOTE: when nothing can be read from the old file, the new sequence starts at the
        # current Unix time in milliseconds. That is above any count of records a gate can
        # have written, unless a clock far behind repeats an earlier replacement.
        start = max(floor, int(time.time() * 1000))
        try:
            conn = _connect(self.path)
            with transaction(conn):
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (start,)
                )
                conn.execute(
                    "INSERT INTO chain_anchor (id, seq, hash, purged_records, updated_at) "
                    "VALUES (1, ?, ?, 0, ?)",
                    (start, GENESIS_HASH, time.time()),
                )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot create a fresh journal {self.path}: {exc}") from exc
        return conn

    def append_verdict(
        self,
        verdict: Verdict,
        *,
        station: str,
        recorded_at: float,
        latency_ms: float | None,
    ) -> JournalRecord:
        """Durably record a verdict and return the stored record with its sequence number."""
        entry = VerdictEntry(verdict, station, recorded_at, latency_ms)
        return self.append_verdicts([entry])[0]

    def append_verdicts(self, entries: Sequence[VerdictEntry]) -> list[JournalRecord]:
        """Durably record verdicts in one commit; return the stored records in order."""
        if not entries:
            return []
        with transaction(self._conn) as conn:
            prev_hash = self._last_hash(conn)
            records = []
            for entry in entries:
                record = self._insert(conn, entry, prev_hash)
                prev_hash = chain_hash(prev_hash, record)
                conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev_hash, record.seq))
                records.append(record)
        return records

    def _last_hash(self, conn: sqlite3.Connection) -> bytes:
        row = conn.execute("SELECT hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return bytes(row[0])
        return self.anchor().hash

    def _insert(
        self, conn: sqlite3.Connection, entry: VerdictEntry, prev_hash: bytes
    ) -> JournalRecord:
        verdict = entry.verdict
        draft = JournalRecord(
            seq=0,
            kind="verdict",
            device_id=self.device_id,
            station=entry.station,
            recorded_at=entry.recorded_at,
            clock_trusted=verdict.clock_trusted,
            verdict=verdict.outcome.value,
            reasons=tuple(str(reason) for reason in verdict.reasons),
            health_subject=_hex(verdict.health_subject),
            community_subject=_hex(verdict.community_subject),
            latency_ms=entry.latency_ms,
            method=None if verdict.method == "codes" else verdict.method,
        )
        return self._insert_record(conn, draft, prev_hash)

    def _insert_record(
        self, conn: sqlite3.Connection, draft: JournalRecord, prev_hash: bytes
    ) -> JournalRecord:
        """Insert a record with a placeholder hash and return it with its new seq."""
        cursor = conn.execute(
            f"INSERT INTO records ({', '.join(_COLUMNS[1:])}, prev_hash, hash) "
            f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))}, ?, zeroblob(32))",
            (
                draft.kind,
                draft.device_id,
                draft.station,
                draft.recorded_at,
                int(draft.clock_trusted),
                draft.verdict,
                json.dumps(list(draft.reasons)),
                draft.health_subject,
                draft.community_subject,
                draft.latency_ms,
                draft.method,
                draft.verdict_seq,
                draft.guard_id,
                prev_hash,
            ),
        )
        return dataclasses.replace(draft, seq=int(cursor.lastrowid or 0))

    def append_override(
        self,
        verdict_seq: int,
        *,
        decision: str,
        reason: str,
        guard_id: str,
        station: str,
        recorded_at: float,
        clock_trusted: bool,
    ) -> JournalRecord:
        """Durably record a guard's override of verdict ``verdict_seq``, chained like a verdict.

        The record copies the verdict's subjects, so the district can relate the two without
        a lookup. The caller checks that the verdict may be overridden. A second override of
        the same verdict raises JournalError with reason ``already_overridden``.
        """
        verdict = self.record(verdict_seq)
        draft = JournalRecord(
            seq=0,
            kind="override",
            device_id=self.device_id,
            station=station,
            recorded_at=recorded_at,
            clock_trusted=clock_trusted,
            verdict=decision,
            reasons=(reason,),
            health_subject=None if verdict is None else verdict.health_subject,
            community_subject=None if verdict is None else verdict.community_subject,
            latency_ms=None,
            verdict_seq=verdict_seq,
            guard_id=guard_id,
        )
        try:
            with transaction(self._conn) as conn:
                prev_hash = self._last_hash(conn)
                record = self._insert_record(conn, draft, prev_hash)
                conn.execute(
                    "UPDATE records SET hash = ? WHERE seq = ?",
                    (chain_hash(prev_hash, record), record.seq),
                )
        except sqlite3.IntegrityError as exc:
            raise JournalError(
                f"verdict {verdict_seq} already has an override", reason="already_overridden"
            ) from exc
        return record

    def record(self, seq: int) -> JournalRecord | None:
        """Return the record with this sequence number, or None."""
        row = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM records WHERE seq = ?", (seq,)
        ).fetchone()
        return None if row is None else _record(row)

    def override_of(self, verdict_seq: int) -> JournalRecord | None:
        """Return the override record linked to verdict ``verdict_seq``, or None."""
        row = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM records "
            "WHERE kind = 'override' AND verdict_seq = ?",
            (verdict_seq,),
        ).fetchone()
        return None if row is None else _record(row)

    def records(self, after_seq: int = 0) -> Iterator[tuple[JournalRecord, bytes, bytes]]:
        """Yield (record, prev_hash, hash) in sequence order."""
        cursor = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)}, prev_hash, hash FROM records "
            "WHERE seq > ? ORDER BY seq",
            (after_seq,),
        )
        for row in cursor:
            yield _record(row[: len(_COLUMNS)]), bytes(row[-2]), bytes(row[-1])

    def last_recorded_at(self) -> float | None:
        row = self._conn.execute("SELECT MAX(recorded_at) FROM records").fetchone()
        return None if row[0] is None else float(row[0])

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def verdict_counts_since(self, since: float) -> dict[str, int]:
        """Count verdict records per verdict value recorded at or after ``since`` (epoch s)."""
        rows = self._conn.execute(
            "SELECT verdict, COUNT(*) FROM records WHERE kind = 'verdict' AND recorded_at >= ? "
            "GROUP BY verdict",
            (since,),
        )
        return {str(verdict): int(count) for verdict, count in rows}

    def high_water_mark(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'")
        found = row.fetchone()
        return 0 if found is None else int(found[0])

    def anchor(self) -> ChainAnchor:
        """Return where the stored chain starts: the genesis hash until the first purge."""
        row = self._conn.execute(
            "SELECT seq, hash, purged_records FROM chain_anchor WHERE id = 1"
        ).fetchone()
        if row is None:
            return ChainAnchor(0, GENESIS_HASH, 0)
        return ChainAnchor(int(row[0]), bytes(row[1]), int(row[2]))

    def verify(self) -> list[ChainProblem]:
        """Check the chain from the anchor on. An empty list means it is intact."""
        problems: list[ChainProblem] = []
        anchor = self.anchor()
        expected_prev = anchor.hash
        expected_seq = anchor.seq + 1
        for record, prev_hash, stored_hash in self.records():
            if record.seq != expected_seq:
                problems.append(
                    ChainProblem(record.seq, f"records {expected_seq}..{record.seq - 1} missing")
                )
            if prev_hash != expected_prev:
                problems.append(ChainProblem(record.seq, "link to the previous record broken"))
            if chain_hash(prev_hash, record) != stored_hash:
                problems.append(ChainProblem(record.seq, "record content altered"))
            expected_prev = stored_hash
            expected_seq = record.seq + 1
        high_water = self.high_water_mark()
        if high_water >= expected_seq:
            problems.append(
                ChainProblem(high_water, f"records {expected_seq}..{high_water} missing at the end")
            )
        return problems

    # --- retention ---

    def purge(
        self, older_than: float, *, chunk: int = PURGE_CHUNK_RECORDS, max_chunks: int | None = None
    ) -> int:
        """Delete acked records recorded before ``older_than``; return how many were deleted.

        Only the oldest run of such records goes, up to the first record that is unacked or
        newer, so the rest of the chain stays whole. Each chunk commits together with the new
        anchor. The sequence's high-water mark stays in sqlite_sequence, so no seq repeats.
        ``max_chunks`` bounds the work of one call, so a caller can let scans in between.
        """
        deleted = 0
        chunks = 0
        while max_chunks is None or chunks < max_chunks:
            chunks += 1
            with transaction(self._conn) as conn:
                rows = conn.execute(
                    "SELECT seq, hash, acked_at IS NOT NULL AND recorded_at < ? FROM records "
                    "ORDER BY seq LIMIT ?",
                    (older_than, chunk),
                ).fetchall()
                expired = list(itertools.takewhile(lambda row: bool(row[2]), rows))
                if not expired:
                    break
                last_seq, last_hash = int(expired[-1][0]), bytes(expired[-1][1])
                cursor = conn.execute("DELETE FROM records WHERE seq <= ?", (last_seq,))
                deleted += cursor.rowcount
                conn.execute(
                    "INSERT INTO chain_anchor (id, seq, hash, purged_records, updated_at) "
                    "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, "
                    "hash = excluded.hash, "
                    "purged_records = chain_anchor.purged_records + excluded.purged_records, "
                    "updated_at = excluded.updated_at",
                    (last_seq, last_hash, cursor.rowcount, time.time()),
                )
            if len(expired) < chunk:
                break
        if deleted:
            # Copies the purge into the database file and truncates the write-ahead log.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("journal_purged", records=deleted, anchor_seq=self.anchor().seq)
        return deleted

    # --- the outbox ---

    def unacked_records(
        self, limit: int, *, after_seq: int = 0, deny_only: bool = False
    ) -> list[OutboxRecord]:
        """Return up to ``limit`` records without a district ack, in sequence order.

        ``limit`` is capped at MAX_PAGE_RECORDS. ``deny_only`` selects the deny verdicts for
        the priority lane.
        """
        limit = max(0, min(limit, MAX_PAGE_RECORDS))
        deny_filter = " AND verdict = 'deny'" if deny_only else ""
        rows = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)}, prev_hash, hash FROM records "
            f"WHERE acked_at IS NULL{deny_filter} AND seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [
            OutboxRecord(_record(row[: len(_COLUMNS)]), bytes(row[-2]), bytes(row[-1]))
            for row in rows
        ]

    def records_by_seq(self, seqs: Iterable[int]) -> list[OutboxRecord]:
        """Return the unacked records among ``seqs``, in sequence order."""
        wanted = sorted(set(seqs))
        found: list[OutboxRecord] = []
        for start in range(0, len(wanted), _SQL_CHUNK):
            chunk = wanted[start : start + _SQL_CHUNK]
            placeholders = ", ".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT {', '.join(_COLUMNS)}, prev_hash, hash FROM records "
                f"WHERE acked_at IS NULL AND seq IN ({placeholders}) ORDER BY seq",
                chunk,
            ).fetchall()
            found.extend(
                OutboxRecord(_record(row[: len(_COLUMNS)]), bytes(row[-2]), bytes(row[-1]))
                for row in rows
            )
        return found

    def mark_acked(self, seqs: Iterable[int], acked_at: float) -> int:
        """Mark records acked by the district, in one transaction. Return how many changed.

        Seqs of records that do not exist, or that were acked before, change nothing.
        """
        wanted = sorted(set(seqs))
        changed = 0
        with transaction(self._conn) as conn:
            for start in range(0, len(wanted), _SQL_CHUNK):
                chunk = wanted[start : start + _SQL_CHUNK]
                placeholders = ", ".join("?" * len(chunk))
                cursor = conn.execute(
                    f"UPDATE records SET acked_at = ? "
                    f"WHERE acked_at IS NULL AND seq IN ({placeholders})",
                    (acked_at, *chunk),
                )
                changed += cursor.rowcount
            if changed:
                conn.execute(
                    "INSERT INTO outbox_state (name, value) VALUES ('last_ack_at', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (acked_at,),
                )
        return changed

    def backlog_count(self) -> int:
        """Count the records without a district ack."""
        row = self._conn.execute("SELECT COUNT(*) FROM records WHERE acked_at IS NULL")
        return int(row.fetchone()[0])

    def oldest_unacked(self) -> JournalRecord | None:
        found = self.unacked_records(1)
        return found[0].record if found else None

    def last_ack_at(self) -> float | None:
        """Return when records were last marked acked (local clock), or None if never."""
        row = self._conn.execute(
            "SELECT value FROM outbox_state WHERE name = 'last_ack_at'"
        ).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _salvage_high_water(path: Path) -> int:
    """Read the highest seq a damaged journal used, or 0 if nothing can be read."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    found = 0
    for sql in (
        "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
        "SELECT MAX(seq) FROM records",
    ):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.Error:
            continue
        if row is not None and row[0] is not None:
            found = max(found, int(row[0]))
    conn.close()
    return found


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _record(row: tuple[Any, ...]) -> JournalRecord:
    return JournalRecord(
        seq=int(row[0]),
        kind=str(row[1]),
        device_id=str(row[2]),
        station=str(row[3]),
        recorded_at=float(row[4]),
        clock_trusted=bool(row[5]),
        verdict=str(row[6]),
        reasons=tuple(json.loads(row[7])),
        health_subject=row[8],
        community_subject=row[9],
        latency_ms=None if row[10] is None else float(row[10]),
        method=row[11],
        verdict_seq=None if row[12] is None else int(row[12]),
        guard_id=row[13],
    )
