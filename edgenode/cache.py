"""The local SQLite cache that the policy checks codes against.

A snapshot import builds a complete new database file beside the live one and renames it over
the live one only after the snapshot's signature, body hash and every record have checked out.
A delta (``apply_changes``) copies the live file, applies every change to the copy in one
transaction and renames the copy over the live file in the same way. The rename is atomic, so
a scan sees either the old cache or the new one, never half of each, and a rejected snapshot
or delta leaves the old cache in use. Readers notice the rename by the file's inode and reopen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from edgenode.codes import Colour, Role, key_id_for
from edgenode.snapshot import KNOWN_DATASETS, SnapshotError, SnapshotHeader, SnapshotReader
from edgenode.sqlite_db import split_statements

SCHEMA_VERSION = 3
# Numbered schema changes, applied to an older cache before a delta changes it. A snapshot
# import builds the current schema from scratch. Version 2 adds the keyed hash of the
# resident's ID number (edgenode/id_numbers.py) and the reverse index of the bindings.
# Version 3 adds the district keys that the district announces (edgenode/district_trust.py).
_SCHEMA_MIGRATIONS: dict[int, str] = {
    2: """
    ALTER TABLE residents ADD COLUMN id_hash BLOB;
    CREATE INDEX residents_id_hash ON residents (id_hash) WHERE id_hash IS NOT NULL;
    CREATE INDEX bindings_resident ON bindings (resident_subject);
    """,
    3: """
    CREATE TABLE IF NOT EXISTS district_keys (
        key_id BLOB PRIMARY KEY, public_key BLOB NOT NULL, valid_from INTEGER NOT NULL,
        valid_until INTEGER NOT NULL) WITHOUT ROWID;
    """,
}
_BATCH = 5_000
_COLOURS = {colour.name.lower(): colour for colour in Colour}
# The primary-key column of each dataset's table, which a delta's delete record names.
KEY_COLUMNS = {
    "issuers": "key_id",
    "health_status": "subject",
    "residents": "subject",
    "bindings": "health_subject",
    "revocations": "code_id",
    "platform_tokens": "token_hash",
    "district_keys": "key_id",
}
_KEY_LENGTHS = {"key_id": 4, "subject": 16, "health_subject": 16, "code_id": 16, "token_hash": 32}


@dataclass(frozen=True, slots=True)
class IssuerKey:
    key_id: bytes
    public_key: bytes
    code_types: frozenset[str]
    valid_from: int
    valid_until: int


@dataclass(frozen=True, slots=True)
class HealthStatus:
    colour: Colour
    as_of: int


@dataclass(frozen=True, slots=True)
class Resident:
    subject: bytes
    compound: str
    building: str
    unit: str
    role: Role
    valid_from: int
    valid_until: int
    display_name: str


@dataclass(frozen=True, slots=True)
class TokenRecord:
    subject: bytes
    colour: Colour
    as_of: int


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    name: str
    version: int
    issued_at: int
    synced_at: int
    valid_until: int
    rows: int


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE datasets (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, issued_at INTEGER NOT NULL,
    synced_at INTEGER NOT NULL, valid_until INTEGER NOT NULL, rows INTEGER NOT NULL);
CREATE TABLE issuers (
    key_id BLOB PRIMARY KEY, public_key BLOB NOT NULL, code_types TEXT NOT NULL,
    valid_from INTEGER NOT NULL, valid_until INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE health_status (
    subject BLOB PRIMARY KEY, colour INTEGER NOT NULL, as_of INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE residents (
    subject BLOB PRIMARY KEY, compound TEXT NOT NULL, building TEXT NOT NULL,
    unit TEXT NOT NULL, role TEXT NOT NULL, valid_from INTEGER NOT NULL,
    valid_until INTEGER NOT NULL, display_name TEXT NOT NULL, id_hash BLOB) WITHOUT ROWID;
CREATE INDEX residents_id_hash ON residents (id_hash) WHERE id_hash IS NOT NULL;
CREATE TABLE bindings (
    health_subject BLOB PRIMARY KEY, resident_subject BLOB NOT NULL) WITHOUT ROWID;
CREATE INDEX bindings_resident ON bindings (resident_subject);
CREATE TABLE revocations (
    code_id BLOB PRIMARY KEY, revoked_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE platform_tokens (
    token_hash BLOB PRIMARY KEY, subject BLOB NOT NULL, colour INTEGER NOT NULL,
    as_of INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE district_keys (
    key_id BLOB PRIMARY KEY, public_key BLOB NOT NULL, valid_from INTEGER NOT NULL,
    valid_until INTEGER NOT NULL) WITHOUT ROWID;
"""


class CacheImportError(Exception):
    """A rejected snapshot or delta. The cache in use is unchanged. ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _hex(record: dict[str, Any], key: str, length: int) -> bytes:
    value = bytes.fromhex(str(record[key]))
    if len(value) != length:
        raise ValueError(f"{key} must be {length} bytes")
    return value


def _optional_hex(record: dict[str, Any], key: str, length: int) -> bytes | None:
    return None if record.get(key) is None else _hex(record, key, length)


def _colour(record: dict[str, Any]) -> int:
    return int(_COLOURS[str(record["colour"])])


def _row(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Convert one snapshot record into (table, row). Raises KeyError or ValueError."""
    dataset = str(record["dataset"])
    if dataset == "issuers":
        types = sorted(set(record["code_types"]))
        if not set(types) <= {"health", "community"} or not types:
            raise ValueError(f"code_types {types}")
        return dataset, {
            "key_id": _hex(record, "key_id", 4),
            "public_key": _hex(record, "public_key", 32),
            "code_types": ",".join(types),
            "valid_from": int(record["valid_from"]),
            "valid_until": int(record["valid_until"]),
        }
    if dataset == "health_status":
        return dataset, {
            "subject": _hex(record, "subject", 16),
            "colour": _colour(record),
            "as_of": int(record["as_of"]),
        }
    if dataset == "residents":
        return dataset, {
            "subject": _hex(record, "subject", 16),
            "compound": str(record["compound"]),
            "building": str(record["building"]),
            "unit": str(record["unit"]),
            "role": Role(record["role"]).value,
            "valid_from": int(record["valid_from"]),
            "valid_until": int(record["valid_until"]),
            "display_name": str(record["display_name"]),
            "id_hash": _optional_hex(record, "id_hash", 32),
        }
    if dataset == "bindings":
        return dataset, {
            "health_subject": _hex(record, "health_subject", 16),
            "resident_subject": _hex(record, "resident_subject", 16),
        }
    if dataset == "revocations":
        return dataset, {
            "code_id": _hex(record, "code_id", 16),
            "revoked_at": int(record["revoked_at"]),
        }
    if dataset == "platform_tokens":
        return dataset, {
            "token_hash": _hex(record, "token_hash", 32),
            "subject": _hex(record, "subject", 16),
            "colour": _colour(record),
            "as_of": int(record["as_of"]),
        }
    if dataset == "district_keys":
        public = _hex(record, "public_key", 32)
        key_id = _hex(record, "key_id", 4)
        if key_id != key_id_for(public):
            raise ValueError("key_id does not match public_key")
        return dataset, {
            "key_id": key_id,
            "public_key": public,
            "valid_from": int(record["valid_from"]),
            "valid_until": int(record["valid_until"]),
        }
    raise ValueError(f"unknown dataset {dataset!r}")


def import_snapshot(
    cache_path: Path,
    snapshot_path: Path,
    trusted_keys: Sequence[bytes],
    *,
    site: str | None = None,
    now: float | None = None,
) -> SnapshotHeader:
    """Verify a signed snapshot and atomically replace the cache with it.

    Raises CacheImportError (the old cache stays in use) for a bad or unknown signature, a
    snapshot for another site, an older version than the cache holds, or a bad record.
    """
    synced_at = int(time.time() if now is None else now)
    tmp_path = cache_path.with_name(cache_path.name + ".importing")
    tmp_path.unlink(missing_ok=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with SnapshotReader(snapshot_path, trusted_keys) as reader:
            header = reader.header
            _check_header(cache_path, header, site)
            _build(tmp_path, reader, header, synced_at)
    except SnapshotError as exc:
        tmp_path.unlink(missing_ok=True)
        raise CacheImportError(exc.reason, str(exc)) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync(tmp_path)
    os.replace(tmp_path, cache_path)
    _fsync_dir(cache_path.parent)
    return header


def cache_version(cache_path: Path) -> int | None:
    """Return the version of the data in the cache file, or None when there is no data.

    After a snapshot or a delta every dataset has the same version, so this is the highest one.
    """
    if not cache_path.exists():
        return None
    with Cache(cache_path) as current:
        versions = [info.version for info in current.datasets()]
    return max(versions, default=None)


@dataclass(frozen=True, slots=True)
class DeltaTarget:
    """The fields of a delta's signed header that its application needs."""

    site: str
    base_version: int
    version: int
    issued_at: int
    valid_until: int
    datasets: tuple[str, ...]


def apply_changes(
    cache_path: Path,
    target: DeltaTarget,
    changes: Iterable[Mapping[str, Any]],
    *,
    now: float | None = None,
) -> None:
    """Apply a delta's authenticated records to a copy of the cache, then swap the copy in.

    Each change has ``op`` "upsert" (a full record, as in a snapshot) or "delete" (the
    dataset and its key column). Raises CacheImportError, and the old cache stays in use,
    with reason ``version_gap`` when the cache's version is not ``target.base_version``,
    ``wrong_site`` for another site, or ``bad_record``. Errors raised while ``changes`` is
    read propagate unchanged, also with the old cache in use.
    """
    synced_at = int(time.time() if now is None else now)
    tmp_path = cache_path.with_name(cache_path.name + ".applying")
    tmp_path.unlink(missing_ok=True)
    current = cache_version(cache_path)
    if current != target.base_version:
        raise CacheImportError(
            "version_gap",
            f"delta {target.base_version} to {target.version} does not fit "
            f"the cache's version {current}",
        )
    try:
        shutil.copyfile(cache_path, tmp_path)
        _apply_to_copy(tmp_path, target, changes, synced_at)
        _fsync(tmp_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, cache_path)
    _fsync_dir(cache_path.parent)


def _apply_to_copy(
    path: Path, target: DeltaTarget, changes: Iterable[Mapping[str, Any]], synced_at: int
) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # The copy is thrown away on any error, so it needs no journal on disk.
        conn.execute("PRAGMA journal_mode=MEMORY")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN IMMEDIATE")
        _check_copy(conn, target)
        _upgrade_schema(conn)
        touched: set[str] = set()
        for number, change in enumerate(changes, start=1):
            touched.add(_apply_change(conn, number, change, target))
        _record_versions(conn, target, touched, synced_at)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _check_copy(conn: sqlite3.Connection, target: DeltaTarget) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'site'").fetchone()
    site = None if row is None else row[0]
    if site != target.site:
        raise CacheImportError(
            "wrong_site", f"delta is for site {target.site!r}, the cache holds {site!r}"
        )
    (current,) = conn.execute("SELECT MAX(version) FROM datasets").fetchone()
    if current != target.base_version:
        raise CacheImportError(
            "version_gap",
            f"delta {target.base_version} to {target.version} does not fit "
            f"the cache's version {current}",
        )


def _upgrade_schema(conn: sqlite3.Connection) -> None:
    """Bring a cache written by an older version up to SCHEMA_VERSION, inside the caller's
    transaction, so a delta's records always find the current columns."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = 1 if row is None else int(row[0])
    for number in range(version + 1, SCHEMA_VERSION + 1):
        for statement in split_statements(_SCHEMA_MIGRATIONS[number]):
            conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
    if version < 2:
        # Residents that the delta does not touch keep a NULL hash, and a check by ID number
        # would wrongly find them missing, so such checks wait for the next full snapshot.
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('id_hashes', 'partial')")


def _apply_change(
    conn: sqlite3.Connection, number: int, change: Mapping[str, Any], target: DeltaTarget
) -> str:
    """Apply one change and return its dataset's name."""
    dataset = change.get("dataset")
    if dataset not in target.datasets:
        raise CacheImportError(
            "bad_record", f"delta record {number} is for {dataset!r}, not listed in the header"
        )
    op = change.get("op")
    try:
        if op == "upsert":
            table, row = _row(dict(change))
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            conn.execute(
                f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
            )
            return table
        if op == "delete":
            table = str(dataset)
            column = KEY_COLUMNS[table]
            key = _hex(dict(change), column, _KEY_LENGTHS[column])
            # NOTE: deleting a key that the cache lacks is a no-op, not an error: the end
            # state is the same, and the version check has already matched the base.
            conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
            return table
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheImportError("bad_record", f"delta record {number} is invalid: {exc!r}") from exc
    raise CacheImportError("bad_record", f"delta record {number} has unknown op {op!r}")


def _record_versions(
    conn: sqlite3.Connection, target: DeltaTarget, touched: set[str], synced_at: int
) -> None:
    """Move every dataset of the cache and of the delta to the delta's version."""
    names = {row[0] for row in conn.execute("SELECT name FROM datasets")} | set(target.datasets)
    for name in sorted(names):
        previous = conn.execute("SELECT rows FROM datasets WHERE name = ?", (name,)).fetchone()
        if previous is None or name in touched:
            (rows,) = conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
        else:
            rows = previous[0]
        conn.execute(
            "INSERT OR REPLACE INTO datasets "
            "(name, version, issued_at, synced_at, valid_until, rows) VALUES (?, ?, ?, ?, ?, ?)",
            (name, target.version, target.issued_at, synced_at, target.valid_until, rows),
        )


def _check_header(cache_path: Path, header: SnapshotHeader, site: str | None) -> None:
    if site is not None and header.site != site:
        raise CacheImportError(
            "wrong_site", f"snapshot is for site {header.site!r}, this device serves {site!r}"
        )
    if cache_path.exists():
        with Cache(cache_path) as current:
            versions = [info.version for info in current.datasets()]
        if versions and header.version < max(versions):
            raise CacheImportError(
                "older_version",
                f"snapshot version {header.version} is older than the cache's {max(versions)}",
            )


def _build(path: Path, reader: SnapshotReader, header: SnapshotHeader, synced_at: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        db = sqlite_utils.Database(conn)
        counts = dict.fromkeys(header.datasets, 0)
        pending: dict[str, list[dict[str, Any]]] = {name: [] for name in KNOWN_DATASETS}
        for number, record in enumerate(reader.records(), start=1):
            try:
                table, row = _row(record)
            except (KeyError, ValueError, TypeError) as exc:
                raise CacheImportError(
                    "bad_record", f"snapshot record {number} is invalid: {exc!r}"
                ) from exc
            if table not in counts:
                raise CacheImportError(
                    "bad_record", f"record {number} is for {table}, not listed in the header"
                )
            counts[table] += 1
            pending[table].append(row)
            if len(pending[table]) >= _BATCH:
                _flush(db, table, pending[table], number)
        for table, rows in pending.items():
            _flush(db, table, rows, -1)
        for name in header.datasets:
            db.table("datasets").insert(
                {
                    "name": name,
                    "version": header.version,
                    "issued_at": header.issued_at,
                    "synced_at": synced_at,
                    "valid_until": header.valid_until,
                    "rows": counts[name],
                }
            )
        db.table("meta").insert_all(
            [
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "site", "value": header.site},
            ]
        )
        conn.execute("ANALYZE")
    finally:
        conn.close()


def _flush(db: sqlite_utils.Database, table: str, rows: list[dict[str, Any]], number: int) -> None:
    if not rows:
        return
    try:
        db.table(table).insert_all(rows, batch_size=_BATCH)
    except sqlite3.IntegrityError as exc:
        where = f"near record {number}" if number > 0 else "at the end"
        raise CacheImportError("bad_record", f"duplicate key in {table} {where}: {exc}") from exc
    rows.clear()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Some file systems do not support fsync on a folder; the rename has happened anyway.
    with contextlib.suppress(OSError):
        _fsync(path)


class Cache:
    """Read-only view of the cache file, reopened when an import replaces the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._datasets: tuple[DatasetInfo, ...] = ()
        self._schema_version = 0
        self._id_hashes_partial = False

    def _connection(self) -> sqlite3.Connection | None:
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            self.close()
            return None
        if self._conn is None or inode != self._inode:
            self.close()
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._conn = conn
            self._inode = inode
            self._datasets = tuple(
                DatasetInfo(*row)
                for row in conn.execute(
                    "SELECT name, version, issued_at, synced_at, valid_until, rows FROM datasets"
                )
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            self._schema_version = 1 if row is None else int(row[0])
            partial = conn.execute("SELECT 1 FROM meta WHERE key = 'id_hashes'").fetchone()
            self._id_hashes_partial = partial is not None
        return self._conn

    def refresh(self) -> None:
        """Reopen the file if an import replaced it. Call once per scan, not per lookup."""
        self._connection()

    def _one(self, sql: str, key: bytes) -> Any:
        conn = self._conn
        if conn is None:
            return None
        return conn.execute(sql, (key,)).fetchone()

    def datasets(self) -> tuple[DatasetInfo, ...]:
        self._connection()
        return self._datasets

    def is_empty(self) -> bool:
        return not self._datasets

    def issuer(self, key_id: bytes) -> IssuerKey | None:
        row = self._one(
            "SELECT public_key, code_types, valid_from, valid_until FROM issuers WHERE key_id = ?",
            key_id,
        )
        if row is None:
            return None
        return IssuerKey(key_id, row[0], frozenset(row[1].split(",")), row[2], row[3])

    def health_status(self, subject: bytes) -> HealthStatus | None:
        row = self._one("SELECT colour, as_of FROM health_status WHERE subject = ?", subject)
        return None if row is None else HealthStatus(Colour(row[0]), row[1])

    def resident(self, subject: bytes) -> Resident | None:
        row = self._one(
            "SELECT compound, building, unit, role, valid_from, valid_until, display_name "
            "FROM residents WHERE subject = ?",
            subject,
        )
        if row is None:
            return None
        return Resident(subject, row[0], row[1], row[2], Role(row[3]), row[4], row[5], row[6])

    def bound_resident(self, health_subject: bytes) -> bytes | None:
        row = self._one(
            "SELECT resident_subject FROM bindings WHERE health_subject = ?", health_subject
        )
        return None if row is None else bytes(row[0])

    def has_id_hashes(self) -> bool:
        """Return whether every roster entry carries its ID-number hash, if it has one.

        False for a version-1 cache, and for one that a delta upgraded to version 2, until
        a full snapshot replaces it.
        """
        return self._conn is not None and self._schema_version >= 2 and not self._id_hashes_partial

    def resident_by_id_hash(self, id_hash: bytes) -> Resident | None:
        """Return the roster entry with this ID-number hash, the longest valid if several."""
        if self._conn is None or self._schema_version < 2:
            return None
        row = self._one(
            "SELECT subject, compound, building, unit, role, valid_from, valid_until, "
            "display_name FROM residents WHERE id_hash = ? ORDER BY valid_until DESC LIMIT 1",
            id_hash,
        )
        if row is None:
            return None
        return Resident(bytes(row[0]), row[1], row[2], row[3], Role(row[4]), *row[5:8])

    def latest_health_status_of(self, resident_subject: bytes) -> HealthStatus | None:
        """Return the newest cached status among the resident's bound health subjects.

        A resident's own subject counts as bound, as it does for the same-person check.
        """
        conn = self._conn
        if conn is None:
            return None
        row = conn.execute(
            # An IN over a UNION keeps both lookups on their keys. "subject = ? OR subject IN
            # (...)" made SQLite scan the whole health_status table.
            "SELECT colour, as_of FROM health_status WHERE subject IN "
            "(SELECT ?1 UNION ALL SELECT health_subject FROM bindings WHERE resident_subject = ?1) "
            "ORDER BY as_of DESC LIMIT 1",
            (resident_subject,),
        ).fetchone()
        return None if row is None else HealthStatus(Colour(row[0]), row[1])

    def is_revoked(self, code_id: bytes) -> bool:
        return self._one("SELECT 1 FROM revocations WHERE code_id = ?", code_id) is not None

    def platform_token(self, token_hash: bytes) -> TokenRecord | None:
        row = self._one(
            "SELECT subject, colour, as_of FROM platform_tokens WHERE token_hash = ?", token_hash
        )
        return None if row is None else TokenRecord(bytes(row[0]), Colour(row[1]), row[2])

    def oldest_issued_at(self) -> int | None:
        """District issue time of the oldest dataset: how old the data is."""
        return min((info.issued_at for info in self._datasets), default=None)

    def earliest_valid_until(self) -> int | None:
        return min((info.valid_until for info in self._datasets), default=None)

    def latest_synced_at(self) -> int | None:
        return max((info.synced_at for info in self._datasets), default=None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._inode = None
        self._datasets = ()
        self._schema_version = 0

    def __enter__(self) -> Cache:
        self._connection()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
