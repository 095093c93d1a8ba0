"""Resident rosters and health-status feeds, imported into the district hub's store.

A community office or a city platform exports a feed as CSV (UTF-8 with or without a BOM,
or GB18030) or as JSON (an array of objects). ``import_roster`` and ``import_health`` check
every row, keep the good ones in the feed store's tables beside the hub's own, and return a
``RowError`` with the line number for each bad row. ``FeedStore`` keeps them in the hub's
SQLite file (sync/hub_store.py), ``PostgresFeedStore`` (sync/feeds_pg.py) in its PostgreSQL
database; sync/feed_backend.py chooses.

A roster file is the full roster of every site it names: after the import, a resident of such
a site whose subject appears in no row of the file is removed. A health feed only adds or
updates statuses, and an older ``as_of`` never replaces a newer one.

Privacy: a full name is masked with ``edgenode.district.mask_name`` before it is stored. An
ID number column is checked and replaced by its keyed hash under the district's ID lookup key
(edgenode/id_numbers.py) when the import has the key, and dropped unread when it has not. The
number itself is never stored.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TextIO, TypeVar

from edgenode.codes import Role
from edgenode.district import mask_name
from edgenode.id_numbers import IdNumberError, id_number_hash
from edgenode.sqlite_db import apply_migrations, open_durable, schema_version
from sync.feed_backend import TRANSFER_COLUMNS, PublishedState, Transfer, transfer_from_row

if TYPE_CHECKING:
    from sync.feed_backend import FeedBackend

T = TypeVar("T")

# Dates without a time or an offset are China Standard Time, the time of the feeds' offices.
CHINA_TZ = timezone(timedelta(hours=8))
COLOURS = {
    "green": "green",
    "yellow": "yellow",
    "red": "red",
    "绿": "green",
    "绿色": "green",
    "黄": "yellow",
    "黄色": "yellow",
    "红": "red",
    "红色": "red",
}
# Column names as exported by offices, mapped to the names used here. The ID number column is
# only ever hashed (see parse_roster_row), never stored.
ROSTER_COLUMNS = {
    "site": "site",
    "compound": "site",
    "小区": "site",
    "subject": "subject",
    "health_subject": "health_subject",
    "display_name": "display_name",
    "name": "name",
    "full_name": "name",
    "姓名": "name",
    "building": "building",
    "楼栋": "building",
    "unit": "unit",
    "单元": "unit",
    "role": "role",
    "valid_from": "valid_from",
    "valid_until": "valid_until",
    "id_number": "id_number",
    "身份证号": "id_number",
    "身份证号码": "id_number",
    "公民身份号码": "id_number",
}
HEALTH_COLUMNS = {
    "health_subject": "health_subject",
    "subject": "health_subject",
    "colour": "colour",
    "color": "colour",
    "健康码": "colour",
    "as_of": "as_of",
}
_HEX_SUBJECT = re.compile(r"^[0-9a-fA-F]{32}$")
_SITE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

FeedFormat = Literal["csv", "json"]

# Numbered migrations of the feed tables. Each runs in a transaction that also records its
# number in feeds_migrations, so a crash leaves either the old schema or the new one.
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
        valid_from INTEGER NOT NULL,
        valid_until INTEGER NOT NULL,
        imported_at REAL NOT NULL,
        PRIMARY KEY (site, subject)
    ) WITHOUT ROWID;
    CREATE TABLE feed_health (
        health_subject TEXT PRIMARY KEY,
        colour TEXT NOT NULL,
        as_of INTEGER NOT NULL,
        imported_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE published_sites (
        site TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        issued_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE published_records (
        site TEXT NOT NULL,
        record_key TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (site, record_key)
    ) WITHOUT ROWID;
    CREATE TABLE published_transfers (
        transfer_id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        kind TEXT NOT NULL,
        version INTEGER NOT NULL,
        base_version INTEGER,
        chunk_size INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX published_transfers_site ON published_transfers (site, created_at);
    """,
    # 2: the keyed hash of the resident's ID number (hex), published for checks by ID number.
    """
    ALTER TABLE feed_residents ADD COLUMN id_hash TEXT;
    """,
)


@dataclass(frozen=True, slots=True)
class RowError:
    """A rejected feed row: its line in the file, a stable reason code and a message.

    ``row`` is the row's number among the data rows, from 1. It distinguishes the rows of a
    JSON array written on one line, where every row has line 1.
    """

    line: int
    reason: str
    message: str
    row: int = 0


@dataclass(frozen=True, slots=True)
class RosterRow:
    site: str
    subject: str
    health_subject: str
    display_name: str
    building: str
    unit: str
    role: str
    valid_from: int
    valid_until: int
    # HMAC-SHA256 of the ID number under the district's ID lookup key, in hex, or None.
    id_hash: str | None = None


@dataclass(frozen=True, slots=True)
class HealthRow:
    health_subject: str
    colour: str
    as_of: int


@dataclass(slots=True)
class ImportResult:
    """The outcome of one feed import. ``removed`` counts residents missing from a roster."""

    rows: int = 0
    stored: int = 0
    removed: int = 0
    errors: list[RowError] = field(default_factory=list)


class FeedError(Exception):
    """A feed file that cannot be read at all, with a message for the operator."""


class _BadRow(Exception):
    """A rejected row. ``row`` contains the cells of a CSV row with the wrong cell count."""

    def __init__(self, reason: str, message: str, row: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.row = row
        super().__init__(message)


# --- the store ---


class FeedStore:
    """The feed and publishing tables in the hub's SQLite file. Use from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_durable(path)
        apply_migrations(self.db, "feeds_migrations", MIGRATIONS)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FeedStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        return schema_version(self.db, "feeds_migrations")

    def store_roster(
        self, rows: Sequence[RosterRow], seen: Mapping[str, set[str]], *, now: float
    ) -> int:
        """Upsert roster rows, then remove residents of each site in ``seen`` not seen in it.

        ``seen`` maps each site named in the file to every subject its rows name, good or
        bad, so a resident whose row was rejected is kept as stored before. Returns the
        number of residents removed. One transaction.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT OR REPLACE INTO feed_residents (site, subject, health_subject, "
                "display_name, building, unit, role, valid_from, valid_until, imported_at, "
                "id_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row.site,
                        row.subject,
                        row.health_subject,
                        row.display_name,
                        row.building,
                        row.unit,
                        row.role,
                        row.valid_from,
                        row.valid_until,
                        now,
                        row.id_hash,
                    )
                    for row in rows
                ],
            )
            removed = 0
            for site, subjects in seen.items():
                stored = self.db.execute(
                    "SELECT subject FROM feed_residents WHERE site = ?", (site,)
                ).fetchall()
                missing = [(site, row[0]) for row in stored if row[0] not in subjects]
                self.db.executemany(
                    "DELETE FROM feed_residents WHERE site = ? AND subject = ?", missing
                )
                removed += len(missing)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return removed

    def store_health(self, rows: Sequence[HealthRow], *, now: float) -> int:
        """Upsert health statuses in one transaction, except over a newer stored ``as_of``.

        Returns the number of rows stored.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany(
                "INSERT INTO feed_health (health_subject, colour, as_of, imported_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (health_subject) DO UPDATE SET "
                "colour = excluded.colour, as_of = excluded.as_of, "
                "imported_at = excluded.imported_at WHERE excluded.as_of >= feed_health.as_of",
                [(row.health_subject, row.colour, row.as_of, now) for row in rows],
            )
            stored = self.db.total_changes - before
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return stored

    def residents(self, site: str) -> list[RosterRow]:
        rows = self.db.execute(
            "SELECT site, subject, health_subject, display_name, building, unit, role, "
            "valid_from, valid_until, id_hash FROM feed_residents WHERE site = ? "
            "ORDER BY subject",
            (site,),
        ).fetchall()
        return [RosterRow(*row) for row in rows]

    def health(self, health_subjects: Sequence[str]) -> dict[str, HealthRow]:
        """Return the stored status of each of these health subjects that has one."""
        result: dict[str, HealthRow] = {}
        keys = sorted(set(health_subjects))
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(
                "SELECT health_subject, colour, as_of FROM feed_health "
                f"WHERE health_subject IN ({marks})",
                part,
            ).fetchall()
            for row in rows:
                result[row[0]] = HealthRow(*row)
        return result

    # --- published datasets (sync/publisher.py) ---

    def publish_transaction(self, site: str, work: Callable[[], T]) -> T:
        """Call ``work`` in one write transaction (BEGIN IMMEDIATE), rolled back if it raises.

        SQLite has one write lock per file, so this waits for every other writer, not only
        for the publishers of ``site``.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def published_state(self, site: str) -> PublishedState | None:
        row = self.db.execute(
            "SELECT version, kind, issued_at FROM published_sites WHERE site = ?", (site,)
        ).fetchone()
        return None if row is None else PublishedState(int(row[0]), str(row[1]), int(row[2]))

    def published_digests(self, site: str) -> dict[str, str]:
        rows = self.db.execute(
            "SELECT record_key, digest FROM published_records WHERE site = ?", (site,)
        ).fetchall()
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
        db = self.db
        site = transfer.site
        if digests is not None:
            db.execute(
                "INSERT OR REPLACE INTO published_sites (site, version, kind, issued_at) "
                "VALUES (?, ?, ?, ?)",
                (site, transfer.version, transfer.kind, int(transfer.created_at)),
            )
            if changed is None:
                db.execute("DELETE FROM published_records WHERE site = ?", (site,))
                rows = [(site, key, digest) for key, digest in digests.items()]
            else:
                db.executemany(
                    "DELETE FROM published_records WHERE site = ? AND record_key = ?",
                    [(site, key) for key in removed],
                )
                rows = [(site, key, digests[key]) for key in changed]
            db.executemany(
                "INSERT OR REPLACE INTO published_records (site, record_key, digest) "
                "VALUES (?, ?, ?)",
                rows,
            )
        db.execute(
            f"INSERT INTO published_transfers ({TRANSFER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
            "DELETE FROM published_transfers WHERE site = ? AND transfer_id NOT IN ("
            "SELECT transfer_id FROM published_transfers WHERE site = ? "
            "ORDER BY created_at DESC, version DESC LIMIT ?)",
            (site, site, keep_transfers),
        )

    def transfer(self, transfer_id: str) -> Transfer | None:
        row = self.db.execute(
            f"SELECT {TRANSFER_COLUMNS} FROM published_transfers WHERE transfer_id = ?",
            (transfer_id,),
        ).fetchone()
        return None if row is None else transfer_from_row(row)

    def stored_snapshot(self, site: str, version: int) -> Transfer | None:
        row = self.db.execute(
            f"SELECT {TRANSFER_COLUMNS} FROM published_transfers WHERE site = ? "
            "AND kind = 'snapshot' AND version = ? ORDER BY created_at DESC LIMIT 1",
            (site, version),
        ).fetchone()
        return None if row is None else transfer_from_row(row)


# --- reading files ---


def decode_feed(data: bytes) -> str:
    """Decode a feed's bytes: UTF-8 with or without a BOM, else GB18030.

    Raises FeedError when neither fits. GB18030 accepts most byte strings, so a file in
    another encoding (Big5, say) may decode to the wrong characters instead of failing.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError as exc:
        raise FeedError(f"the file is neither UTF-8 nor GB18030: {exc}") from exc


def guess_format(path: Path) -> FeedFormat:
    return "json" if path.suffix.lower() == ".json" else "csv"


def read_rows(text: str, feed_format: FeedFormat) -> Iterator[tuple[int, object]]:
    """Yield (line number, row) for each row. A CSV row is a dict of header to cell.

    Line numbers count from 1 and the CSV header is line 1. A CSV row that spans several
    lines (a quoted line break) has the number of its first line. Raises FeedError for a file
    that is not CSV with a header, or not a JSON array.
    """
    if feed_format == "csv":
        yield from _csv_rows(text)
    else:
        yield from _json_rows(text)


def _csv_rows(text: str) -> Iterator[tuple[int, object]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise FeedError("the CSV file is empty, a header line is expected") from None
    header = [name.strip() for name in header]
    line = reader.line_num + 1
    try:
        for cells in reader:
            first_line = line
            line = reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                yield (
                    first_line,
                    _BadRow(
                        "wrong_column_count",
                        f"{len(cells)} cells where the header has {len(header)} columns",
                        dict(zip(header, cells, strict=False)),
                    ),
                )
                continue
            yield first_line, dict(zip(header, cells, strict=True))
    except csv.Error as exc:
        raise FeedError(f"invalid CSV near line {reader.line_num}: {exc}") from exc


def _json_rows(text: str) -> Iterator[tuple[int, object]]:
    """Walk the array with raw_decode, so each element's first line is known."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")

    def skip(position: int) -> int:
        match = whitespace.match(text, position)
        return position if match is None else match.end()

    position = skip(0)
    if not text.startswith("[", position):
        raise FeedError("a JSON feed must be an array of objects")
    position = skip(position + 1)
    if text.startswith("]", position):
        return
    while True:  # Bounded: every pass consumes at least one element of the text.
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise FeedError(f"invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        yield line, value
        position = skip(position)
        if text.startswith("]", position):
            return
        if not text.startswith(",", position):
            line = text.count("\n", 0, position) + 1
            raise FeedError(f"invalid JSON at line {line}: ',' or ']' expected")
        position = skip(position + 1)


# --- checking rows ---


def _columns(raw: object, names: Mapping[str, str]) -> dict[str, str]:
    """Map a row's known columns to their names here and drop the rest, ID numbers included."""
    if isinstance(raw, _BadRow):
        raise raw
    if not isinstance(raw, dict):
        raise _BadRow("not_an_object", f"expected an object, found {type(raw).__name__}")
    result: dict[str, str] = {}
    for key, value in raw.items():
        name = names.get(str(key).strip().lower()) or names.get(str(key).strip())
        if name is None or value is None:
            continue
        text = str(value).strip()
        if text:
            result[name] = text
    return result


def _required(row: Mapping[str, str], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise _BadRow("missing_field", f"{name} is missing or empty")
    return value


def _subject(row: Mapping[str, str], name: str) -> str:
    value = _required(row, name)
    if not _HEX_SUBJECT.match(value):
        raise _BadRow("invalid_subject", f"{name} must be 32 hex digits, not {value!r}")
    return value.lower()


def parse_time(value: str, *, end_of_day: bool = False) -> int:
    """Parse Unix seconds, an ISO date or an ISO date and time into Unix seconds.

    A date or time without an offset is China Standard Time. A bare date means its start,
    or with ``end_of_day`` the start of the next day, so a ``valid_until`` date includes that
    whole day. Raises ValueError.
    """
    if re.fullmatch(r"\d{1,12}", value):
        return int(value)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        day = date.fromisoformat(value)
        if end_of_day:
            day += timedelta(days=1)
        return int(datetime(day.year, day.month, day.day, tzinfo=CHINA_TZ).timestamp())
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=CHINA_TZ)
    return int(moment.astimezone(UTC).timestamp())


def _time(row: Mapping[str, str], name: str, *, end_of_day: bool = False) -> int:
    value = _required(row, name)
    try:
        return parse_time(value, end_of_day=end_of_day)
    except ValueError:
        raise _BadRow(
            "invalid_time", f"{name} must be an ISO date or Unix seconds, not {value!r}"
        ) from None


def parse_roster_row(raw: object, id_lookup_key: bytes | None = None) -> RosterRow:
    """Check one roster row. Without ``id_lookup_key`` an ID number column is ignored."""
    row = _columns(raw, ROSTER_COLUMNS)
    site = _required(row, "site")
    if not _SITE.match(site):
        raise _BadRow("invalid_site", f"site must be 1 to 64 of A-Z a-z 0-9 - _, not {site!r}")
    subject = _subject(row, "subject")
    health_subject = _subject(row, "health_subject")
    name = row.get("display_name") or row.get("name")
    if name is None:
        raise _BadRow("missing_field", "display_name or name is missing or empty")
    role = _required(row, "role").lower()
    if role not in {member.value for member in Role}:
        raise _BadRow(
            "invalid_role", f"role must be resident, visitor, staff or delivery, not {role!r}"
        )
    valid_from = _time(row, "valid_from")
    valid_until = _time(row, "valid_until", end_of_day=True)
    if valid_until <= valid_from:
        raise _BadRow("invalid_validity", "valid_until must be later than valid_from")
    id_hash = None
    id_number = row.get("id_number")
    if id_lookup_key is not None and id_number is not None:
        try:
            id_hash = id_number_hash(id_lookup_key, id_number).hex()
        except IdNumberError as exc:
            # The message names the problem, never the number.
            raise _BadRow(exc.reason, str(exc)) from None
    return RosterRow(
        site=site,
        subject=subject,
        health_subject=health_subject,
        # mask_name leaves a masked name (张*丰) as it is and masks a full one (张三丰), so
        # whatever column the name came from, only the masked form is stored.
        display_name=mask_name(name),
        building=_required(row, "building"),
        unit=_required(row, "unit"),
        role=role,
        valid_from=valid_from,
        valid_until=valid_until,
        id_hash=id_hash,
    )


def parse_health_row(raw: object) -> HealthRow:
    row = _columns(raw, HEALTH_COLUMNS)
    health_subject = _subject(row, "health_subject")
    colour_text = _required(row, "colour")
    colour = COLOURS.get(colour_text.lower())
    if colour is None:
        raise _BadRow(
            "invalid_colour",
            f"colour must be green, yellow or red (绿, 黄, 红), not {colour_text!r}",
        )
    return HealthRow(health_subject=health_subject, colour=colour, as_of=_time(row, "as_of"))


# --- imports ---


class ProgressBar:
    """A one-line progress bar on a terminal, and nothing when ``stream`` is not a terminal."""

    WIDTH = 30

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self._shown_percent = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        percent = min(100, done * 100 // self.total)
        if percent == self._shown_percent:
            return
        self._shown_percent = percent
        filled = self.WIDTH * percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}%")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._shown_percent >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _load(path: Path, feed_format: FeedFormat | None) -> list[tuple[int, object]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeedError(f"cannot read {path}: {exc.strerror}") from exc
    return list(read_rows(decode_feed(data), feed_format or guess_format(path)))


def import_roster(
    store: FeedBackend,
    path: Path,
    feed_format: FeedFormat | None = None,
    *,
    progress: TextIO | None = None,
    now: float | None = None,
    id_lookup_key: bytes | None = None,
) -> ImportResult:
    """Check a roster file's rows and store the good ones. Raises FeedError for an unreadable
    file, and then nothing is stored.

    The file is the full roster of each site it names, so residents of those sites that no
    row names are removed. A subject given twice at one site keeps its first row. With
    ``id_lookup_key``, an ID number column is stored as its keyed hash, and a row whose
    number is malformed is rejected.
    """
    raw_rows = _load(path, feed_format)
    result = ImportResult(rows=len(raw_rows))
    good: list[RosterRow] = []
    seen: dict[str, set[str]] = {}
    bar = ProgressBar(len(raw_rows), path.name, progress)
    for done, (line, raw) in enumerate(raw_rows, start=1):
        bar.update(done)
        try:
            row = parse_roster_row(raw, id_lookup_key)
        except _BadRow as exc:
            result.errors.append(RowError(line, exc.reason, str(exc), done))
            _note_subject(raw, seen)
            continue
        subjects = seen.setdefault(row.site, set())
        if row.subject in subjects:
            message = f"subject {row.subject} is already in the file"
            result.errors.append(RowError(line, "duplicate_subject", message, done))
            continue
        subjects.add(row.subject)
        good.append(row)
    bar.finish()
    result.removed = store.store_roster(good, seen, now=time.time() if now is None else now)
    result.stored = len(good)
    return result


def _note_subject(raw: object, seen: dict[str, set[str]]) -> None:
    """Record the site and subject of a rejected row, when both are readable."""
    if isinstance(raw, _BadRow):
        raw = raw.row
    try:
        row = _columns(raw, ROSTER_COLUMNS)
        site, subject = _required(row, "site"), _subject(row, "subject")
    except _BadRow:
        return
    seen.setdefault(site, set()).add(subject)


def import_health(
    store: FeedBackend,
    path: Path,
    feed_format: FeedFormat | None = None,
    *,
    progress: TextIO | None = None,
    now: float | None = None,
) -> ImportResult:
    """Check a health feed's rows and store the good ones. Raises FeedError for an unreadable
    file, and then nothing is stored.

    ``stored`` counts the statuses written, so a row older than the stored status is not in it.
    """
    raw_rows = _load(path, feed_format)
    result = ImportResult(rows=len(raw_rows))
    good: list[HealthRow] = []
    bar = ProgressBar(len(raw_rows), path.name, progress)
    for done, (line, raw) in enumerate(raw_rows, start=1):
        bar.update(done)
        try:
            good.append(parse_health_row(raw))
        except _BadRow as exc:
            result.errors.append(RowError(line, exc.reason, str(exc), done))
    bar.finish()
    result.stored = store.store_health(good, now=time.time() if now is None else now)
    return result
