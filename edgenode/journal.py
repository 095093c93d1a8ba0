"""The verdict journal: a hash-chained, durable SQLite log that is also the sync outbox.

Each record carries a per-device sequence number that never repeats (AUTOINCREMENT keeps the
high-water mark even after rows are deleted) and the SHA-256 of the record before it, so a
deleted or edited record is detected by ``verify``. Records hold pseudonymous subjects and
reason codes, never a raw payload or an ID number.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgenode.policy import Verdict

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
)

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
)


class JournalError(Exception):
    """The journal file cannot be opened or written."""


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


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
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


class Journal:
    def __init__(self, path: Path, device_id: str) -> None:
        self.path = path
        self.device_id = device_id
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            _migrate(self._conn)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc

    def append_verdict(
        self,
        verdict: Verdict,
        *,
        station: str,
        recorded_at: float,
        latency_ms: float | None,
    ) -> JournalRecord:
        """Durably record a verdict and return the stored record with its sequence number."""
        with transaction(self._conn) as conn:
            row = conn.execute("SELECT hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            prev_hash = GENESIS_HASH if row is None else bytes(row[0])
            cursor = conn.execute(
                "INSERT INTO records (kind, device_id, station, recorded_at, clock_trusted, "
                "verdict, reasons, health_subject, community_subject, latency_ms, prev_hash, "
                "hash) VALUES ('verdict', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, zeroblob(32))",
                (
                    self.device_id,
                    station,
                    recorded_at,
                    int(verdict.clock_trusted),
                    verdict.outcome.value,
                    json.dumps([str(reason) for reason in verdict.reasons]),
                    _hex(verdict.health_subject),
                    _hex(verdict.community_subject),
                    latency_ms,
                    prev_hash,
                ),
            )
            seq = int(cursor.lastrowid or 0)
            record = JournalRecord(
                seq=seq,
                kind="verdict",
                device_id=self.device_id,
                station=station,
                recorded_at=recorded_at,
                clock_trusted=verdict.clock_trusted,
                verdict=verdict.outcome.value,
                reasons=tuple(str(reason) for reason in verdict.reasons),
                health_subject=_hex(verdict.health_subject),
                community_subject=_hex(verdict.community_subject),
                latency_ms=latency_ms,
            )
            conn.execute(
                "UPDATE records SET hash = ? WHERE seq = ?", (chain_hash(prev_hash, record), seq)
            )
        return record

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

    def high_water_mark(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'")
        found = row.fetchone()
        return 0 if found is None else int(found[0])

    def verify(self) -> list[ChainProblem]:
        """Check the whole chain. An empty list means it is intact."""
        problems: list[ChainProblem] = []
        expected_prev = GENESIS_HASH
        expected_seq = 1
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
    )
