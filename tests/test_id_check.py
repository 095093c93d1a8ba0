"""Checks by ID number: number checks, keyed hashes in the cache, and the rows of docs/policy.md."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from stdnum.cn import ric

from edgenode.cache import SCHEMA_VERSION, Cache, DeltaTarget, apply_changes, import_snapshot
from edgenode.config import Config
from edgenode.decoders import create_decoder
from edgenode.district import read_key
from edgenode.guard_desk import GuardDesk, IdCheckError
from edgenode.guards import GuardStore
from edgenode.id_numbers import (
    IdLookupKeyError,
    IdNumberError,
    id_number_hash,
    normalise_id_number,
    read_id_lookup_key,
    write_id_lookup_key,
)
from edgenode.journal import Journal
from edgenode.pipeline import Gate, VerdictEvent
from edgenode.policy import ClockReading
from edgenode.snapshot import write_snapshot
from tests.scenarios import (
    DAY,
    PEOPLE,
    POLICY_DOC,
    SITE,
    DirectMinter,
    Site,
    site_config,
    status_record,
)

ID_LOOKUP_KEY = bytes(range(32))


def valid_id_number(first_17: str) -> str:
    """Complete 17 digits with their check digit (ISO 7064 MOD 11-2)."""
    return first_17 + ric.calc_check_digit(first_17 + "0")


# Made-up numbers with valid check digits: region 110105 (Beijing, Chaoyang) and 440305.
ID_NUMBERS = {
    "alice": valid_id_number("11010519800101001"),
    "bob": valid_id_number("11010519851231002"),
    "visitor": valid_id_number("44030519900615003"),
    "staff": valid_id_number("44030519750305004"),
    "delivery": valid_id_number("44030520000229005"),
    "moved_out": valid_id_number("11010519600707006"),
    "stranger": valid_id_number("11010519700808007"),
}


# --- the number itself ---


def test_valid_number_is_kept() -> None:
    assert normalise_id_number(ID_NUMBERS["alice"]) == ID_NUMBERS["alice"]


def test_trailing_lowercase_x_is_normalised() -> None:
    number = valid_id_number("11010519491231002")

    assert number.endswith("X")
    assert normalise_id_number(number.lower()) == number
    assert id_number_hash(ID_LOOKUP_KEY, number.lower()) == id_number_hash(ID_LOOKUP_KEY, number)


def test_spaces_and_hyphens_are_ignored() -> None:
    number = ID_NUMBERS["bob"]
    typed = f"{number[:6]} {number[6:14]}-{number[14:]}"

    assert normalise_id_number(typed) == number


def wrong_check_digit(number: str) -> str:
    return number[:-1] + ("0" if number[-1] != "0" else "1")


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        (ID_NUMBERS["alice"][:-1], "id_number_malformed"),
        (ID_NUMBERS["alice"] + "1", "id_number_malformed"),
        ("1101051980O101001" + ID_NUMBERS["alice"][-1], "id_number_malformed"),
        ("11010519800101001Y", "id_number_malformed"),
        (valid_id_number("11010519801301001"), "id_number_malformed"),
        (wrong_check_digit(ID_NUMBERS["alice"]), "id_number_bad_check_digit"),
        ("", "id_number_malformed"),
    ],
    ids=["17_chars", "19_chars", "letter_o", "last_y", "month_13", "check_digit", "empty"],
)
def test_malformed_number_is_rejected(typed: str, reason: str) -> None:
    with pytest.raises(IdNumberError) as caught:
        normalise_id_number(typed)

    assert caught.value.reason == reason
    if typed:
        assert typed not in str(caught.value)


def test_hash_depends_on_the_key() -> None:
    number = ID_NUMBERS["alice"]

    assert id_number_hash(ID_LOOKUP_KEY, number) != id_number_hash(bytes(32), number)


def test_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "id-lookup.key"
    write_id_lookup_key(path, ID_LOOKUP_KEY)

    assert path.stat().st_mode & 0o777 == 0o600
    assert read_id_lookup_key(path) == ID_LOOKUP_KEY


def test_short_key_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "id-lookup.key"
    path.write_text("AAAA\n", encoding="ascii")

    with pytest.raises(IdLookupKeyError, match="32 bytes"):
        read_id_lookup_key(path)


# --- the cache ---


def id_hash_hex(who: str) -> str:
    return id_number_hash(ID_LOOKUP_KEY, ID_NUMBERS[who]).hex()


def roster_with_id_hashes(site: Site) -> list[dict[str, Any]]:
    """The site's base records, each roster entry with its ID-number hash (no stranger)."""
    by_subject = {person.subject.hex(): name for name, person in PEOPLE.items()}
    records = []
    for record in site.base_records():
        if record["dataset"] == "residents":
            record = {**record, "id_hash": id_hash_hex(by_subject[record["subject"]])}
        records.append(record)
    return records


def write_site_snapshot(
    site: Site, records: list[dict[str, Any]], *, age_s: int = 600, version: int = 1
) -> Path:
    path = site.folder / f"snapshot-{version}.ensnap"
    issued_at = site.now - age_s
    write_snapshot(
        path,
        records,
        site=SITE,
        version=version,
        issued_at=issued_at,
        valid_until=issued_at + 7 * DAY,
        signing_key=read_key(site.keys["district"]),
    )
    return path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site.create(tmp_path, int(time.time()), DirectMinter())


def import_records(site: Site, config: Config, records: list[dict[str, Any]]) -> None:
    snapshot = write_site_snapshot(site, records)
    import_snapshot(
        config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
    )


def test_cache_finds_resident_by_id_hash(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, roster_with_id_hashes(site))

    with Cache(config.cache_path) as cache:
        resident = cache.resident_by_id_hash(bytes.fromhex(id_hash_hex("bob")))
        missing = cache.resident_by_id_hash(bytes.fromhex(id_hash_hex("stranger")))

    assert resident is not None
    assert resident.subject == PEOPLE["bob"].subject
    assert missing is None


def test_cache_id_hash_lookup_uses_the_index(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, roster_with_id_hashes(site))

    with closing(sqlite3.connect(config.cache_path)) as db:
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT subject FROM residents WHERE id_hash = ?", (b"x",)
        ).fetchall()

    assert "residents_id_hash" in str(plan)


def downgrade_to_version_1(cache_path: Path) -> None:
    """Turn a cache into one written before ID-number hashes existed."""
    with closing(sqlite3.connect(cache_path)) as db:
        db.execute("DROP INDEX residents_id_hash")
        db.execute("DROP INDEX bindings_resident")
        db.execute("ALTER TABLE residents DROP COLUMN id_hash")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.commit()


def test_snapshot_after_upgrade_enables_checks(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, site.base_records())
    downgrade_to_version_1(config.cache_path)
    target = DeltaTarget(SITE, 1, 2, site.now, site.now + 7 * DAY, ("revocations",))
    apply_changes(config.cache_path, target, [], now=site.now)
    snapshot = write_site_snapshot(site, roster_with_id_hashes(site), version=3)

    import_snapshot(
        config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
    )

    with Cache(config.cache_path) as cache:
        assert cache.has_id_hashes() is True


def test_version_1_cache_has_no_id_hashes(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, site.base_records())
    downgrade_to_version_1(config.cache_path)

    with Cache(config.cache_path) as cache:
        has_hashes = cache.has_id_hashes()
        found = cache.resident_by_id_hash(bytes.fromhex(id_hash_hex("alice")))

    assert has_hashes is False
    assert found is None


def test_delta_upgrades_version_1_cache(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, site.base_records())
    downgrade_to_version_1(config.cache_path)
    alice = next(
        record
        for record in roster_with_id_hashes(site)
        if record["dataset"] == "residents" and record["subject"] == PEOPLE["alice"].subject.hex()
    )
    target = DeltaTarget(SITE, 1, 2, site.now, site.now + 7 * DAY, ("residents",))

    apply_changes(config.cache_path, target, [{"op": "upsert", **alice}], now=site.now)

    with Cache(config.cache_path) as cache:
        resident = cache.resident_by_id_hash(bytes.fromhex(id_hash_hex("alice")))
        complete = cache.has_id_hashes()
    with closing(sqlite3.connect(config.cache_path)) as db:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert resident is not None
    assert resident.subject == PEOPLE["alice"].subject
    assert version == (str(SCHEMA_VERSION),)
    # Residents outside the delta have no hash yet, so checks wait for a full snapshot.
    assert complete is False


# --- the rows of docs/policy.md ---


@dataclass(frozen=True)
class IdRow:
    row: str
    verdict: str
    reasons: tuple[str, ...]


def read_id_table(path: Path = POLICY_DOC) -> list[IdRow]:
    """Parse the five-column table of checks by ID number in docs/policy.md."""
    pattern = re.compile(
        r"^\| `(?P<row>id_\w+)` \|[^|]+\|[^|]+\| (?P<verdict>\w+) \| (?P<reasons>[^|]+) \|$"
    )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match is not None:
            reasons = tuple(re.findall(r"`(\w+)`", match["reasons"]))
            rows.append(IdRow(match["row"], match["verdict"], reasons))
    return rows


@dataclass
class IdScenario:
    """One row's situation: who is looked up, and how the cache differs from the base."""

    who: str
    extra_records: list[dict[str, Any]] = field(default_factory=list)
    drop_status_of: str | None = None
    snapshot_age_s: int = 600
    import_cache: bool = True


def _status(who: str, colour: str) -> Callable[[Site], IdScenario]:
    def build(site: Site) -> IdScenario:
        record = status_record(PEOPLE[who].health_subject, colour, site.now - 60)
        return IdScenario(who, [record])

    return build


ID_ROWS: dict[str, Callable[[Site], IdScenario]] = {
    "id_found_green": lambda s: IdScenario("alice"),
    "id_found_red": _status("alice", "red"),
    "id_found_yellow": _status("alice", "yellow"),
    "id_found_unknown": lambda s: IdScenario("alice", drop_status_of="alice"),
    "id_not_found": lambda s: IdScenario("stranger"),
    "id_moved_out": lambda s: IdScenario("moved_out"),
    "id_visitor": lambda s: IdScenario("visitor"),
    "id_cache_stale": lambda s: IdScenario("alice", snapshot_age_s=2 * DAY),
    "id_cache_empty": lambda s: IdScenario("alice", import_cache=False),
}
ID_TABLE = read_id_table()


def scenario_records(site: Site, scenario: IdScenario) -> list[dict[str, Any]]:
    records = roster_with_id_hashes(site)
    if scenario.drop_status_of is not None:
        subject = PEOPLE[scenario.drop_status_of].health_subject.hex()
        records = [
            record
            for record in records
            if not (record["dataset"] == "health_status" and record["subject"] == subject)
        ]
    replaced = {(r["dataset"], r["subject"]) for r in scenario.extra_records}
    kept = [r for r in records if (r["dataset"], r.get("subject")) not in replaced]
    return kept + scenario.extra_records


def open_desk(site: Site, config: Config, journal: Journal) -> GuardDesk:
    return GuardDesk(
        config.guard,
        GuardStore(config.guards_path),
        journal,
        station="north",
        clock=lambda: ClockReading(now=float(site.now)),
        id_lookup_key=ID_LOOKUP_KEY,
    )


def check_by_id(site: Site, scenario: IdScenario) -> VerdictEvent:
    config = site_config(site)
    if scenario.import_cache:
        snapshot = write_site_snapshot(
            site, scenario_records(site, scenario), age_s=scenario.snapshot_age_s
        )
        import_snapshot(
            config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
        )
    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(
            config,
            cache,
            journal,
            create_decoder("zxing"),
            clock=lambda: ClockReading(now=float(site.now)),
        )
        desk = open_desk(site, config, journal)
        return desk.check_id_number(gate, ID_NUMBERS[scenario.who], received=time.perf_counter())


def test_id_table_and_scenarios_list_the_same_rows() -> None:
    assert [row.row for row in ID_TABLE] == list(ID_ROWS)


@pytest.mark.parametrize("row", ID_TABLE, ids=[row.row for row in ID_TABLE])
def test_id_row_reaches_its_verdict(row: IdRow, site: Site) -> None:
    event = check_by_id(site, ID_ROWS[row.row](site))
    reasons = [str(reason) for reason in event.verdict.reasons]

    assert event.verdict.outcome.value == row.verdict, reasons
    assert reasons[0] == row.reasons[0]
    assert set(row.reasons) <= set(reasons)
    assert event.verdict.method == "id_number"
    assert event.record.method == "id_number"


def test_found_resident_shows_masked_name_and_building(site: Site) -> None:
    event = check_by_id(site, IdScenario("alice"))
    resident = event.verdict.resident

    assert resident is not None
    assert resident.display_name == PEOPLE["alice"].display_name
    assert resident.building == PEOPLE["alice"].building


def test_malformed_number_records_nothing(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, roster_with_id_hashes(site))
    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(config, cache, journal, create_decoder("zxing"))
        desk = open_desk(site, config, journal)
        with pytest.raises(IdCheckError) as caught:
            desk.check_id_number(
                gate, wrong_check_digit(ID_NUMBERS["alice"]), received=time.perf_counter()
            )
        count = journal.count()

    assert caught.value.reason == "id_number_bad_check_digit"
    assert count == 0


def test_cache_without_id_hashes_rejects_check(site: Site) -> None:
    config = site_config(site)
    import_records(site, config, site.base_records())
    downgrade_to_version_1(config.cache_path)
    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(config, cache, journal, create_decoder("zxing"))
        desk = open_desk(site, config, journal)
        with pytest.raises(IdCheckError) as caught:
            desk.check_id_number(gate, ID_NUMBERS["alice"], received=time.perf_counter())

    assert caught.value.reason == "id_lookup_unavailable"


def test_check_without_key_is_unavailable(site: Site) -> None:
    config = site_config(site)
    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(config, cache, journal, create_decoder("zxing"))
        desk = GuardDesk(
            config.guard,
            GuardStore(config.guards_path),
            journal,
            station="north",
            clock=lambda: ClockReading(now=float(site.now)),
            id_lookup_key=None,
        )
        with pytest.raises(IdCheckError) as caught:
            desk.check_id_number(gate, ID_NUMBERS["alice"], received=time.perf_counter())

    assert caught.value.reason == "id_lookup_unavailable"
