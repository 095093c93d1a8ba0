"""Every key lookup that ``Cache`` runs searches by primary key or index, never by a scan.

The test captures the SQL that each lookup method really executes (with the sqlite3 trace
callback) and checks SQLite's ``EXPLAIN QUERY PLAN`` for it. A gate's cache can hold millions
of rows, and a scan reads every one of them on each lookup. This test fails when an index or
a primary key is dropped, or when a query stops using it.
"""

from __future__ import annotations

import hashlib
import inspect
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from edgenode.cache import Cache, import_snapshot
from edgenode.codes import key_id_for
from edgenode.district import generate_roster, issuer_record, roster_records
from edgenode.snapshot import write_snapshot

SITE = "XH-0012"
NOW = int(time.time())
HEALTH_KEY = SigningKey(bytes(range(32)))
TOKEN = hashlib.sha256(b"platform token 0").digest()
REVOKED_CODE_ID = bytes.fromhex("0123456789abcdef0123456789abcdef")
ROSTER = generate_roster(40, seed=7)
# The keyed hash of one resident's ID number, as the district's roster import stores it.
ID_HASH = hashlib.sha256(b"id number of resident 3").digest()


def records() -> Iterator[dict[str, Any]]:
    yield issuer_record(HEALTH_KEY, ["health"], NOW - 3600, NOW + 3600)
    for record in roster_records(ROSTER, SITE, NOW - 3600, NOW + 3600, NOW - 60):
        if record["dataset"] == "residents" and record["subject"] == ROSTER[3].subject.hex():
            record = {**record, "id_hash": ID_HASH.hex()}
        yield record
    for number in range(20):
        code_id = REVOKED_CODE_ID if number == 0 else number.to_bytes(16, "big")
        yield {"dataset": "revocations", "code_id": code_id.hex(), "revoked_at": NOW - 60}
    for number in range(20):
        token_hash = hashlib.sha256(f"platform token {number}".encode()).digest()
        yield {
            "dataset": "platform_tokens",
            "token_hash": token_hash.hex(),
            "subject": ROSTER[number].health_subject.hex(),
            "colour": "green",
            "as_of": NOW - 60,
        }


# Each key lookup of Cache, with a key that the cache above contains.
LOOKUPS: dict[str, Callable[[], bytes]] = {
    "issuer": lambda: key_id_for(bytes(HEALTH_KEY.verify_key)),
    "health_status": lambda: ROSTER[3].health_subject,
    "resident": lambda: ROSTER[3].subject,
    "bound_resident": lambda: ROSTER[3].health_subject,
    "is_revoked": lambda: REVOKED_CODE_ID,
    "platform_token": lambda: TOKEN,
    "resident_by_id_hash": lambda: ID_HASH,
    "latest_health_status_of": lambda: ROSTER[3].subject,
}


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cache-indexes")
    district_key = SigningKey.generate()
    snapshot_path = folder / "snapshot.ensnap"
    write_snapshot(
        snapshot_path,
        records(),
        site=SITE,
        version=1,
        issued_at=NOW - 60,
        valid_until=NOW + 3600,
        signing_key=district_key,
    )
    path = folder / "cache.db"
    import_snapshot(path, snapshot_path, [bytes(district_key.verify_key)], site=SITE, now=NOW)
    return path


def query_plan(path: Path, sql: str) -> list[str]:
    """Return the detail column of ``EXPLAIN QUERY PLAN`` for one statement."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
    finally:
        conn.close()


def executed_sql(cache: Cache, method: str, key: bytes) -> tuple[Any, list[str]]:
    """Call a lookup method and return its result and the SQL it executed, values expanded."""
    statements: list[str] = []
    conn = cache._conn  # The trace callback needs the connection that Cache itself uses.
    assert conn is not None, "the cache did not open its file"
    conn.set_trace_callback(statements.append)
    try:
        result = getattr(cache, method)(key)
    finally:
        conn.set_trace_callback(None)
    return result, statements


def is_key_search(detail: str) -> bool:
    return detail.startswith("SEARCH ") and (
        "USING PRIMARY KEY" in detail or "USING INDEX" in detail or "USING COVERING INDEX" in detail
    )


def reads_table(detail: str) -> bool:
    """Whether a plan line reads a table. Sorting the few rows found (USE TEMP B-TREE) and the
    structure of a subquery (LIST SUBQUERY, COMPOUND QUERY, UNION ALL) read none."""
    return detail.startswith(("SEARCH ", "SCAN ")) and detail != "SCAN CONSTANT ROW"


@pytest.mark.parametrize("method", sorted(LOOKUPS))
def test_lookup_searches_by_key(cache_path: Path, method: str) -> None:
    with Cache(cache_path) as cache:
        result, statements = executed_sql(cache, method, LOOKUPS[method]())

    assert result not in (None, False), f"Cache.{method} found nothing; the fixture is wrong"
    assert len(statements) == 1, f"Cache.{method} ran {statements}, expected one query"
    plan = query_plan(cache_path, statements[0])
    accesses = [detail for detail in plan if reads_table(detail)]
    assert accesses, f"no table access in the plan of {statements[0]}: {plan}"
    for detail in accesses:
        assert not detail.startswith("SCAN"), f"Cache.{method} scans: {detail}"
        assert is_key_search(detail), f"Cache.{method} is not a key search: {detail}"


def test_every_key_lookup_is_checked() -> None:
    """A new lookup method on Cache, taking one key in bytes, must be added to LOOKUPS."""
    lookups = set()
    for name, member in inspect.getmembers(Cache, inspect.isfunction):
        parameters = list(inspect.signature(member).parameters.values())
        if name.startswith("_") or len(parameters) != 2:
            continue
        if parameters[1].annotation in ("bytes", bytes):
            lookups.add(name)

    assert lookups == set(LOOKUPS)


def test_plan_check_flags_unindexed_table(tmp_path: Path) -> None:
    path = tmp_path / "unindexed.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE revocations (code_id BLOB, revoked_at INTEGER)")
    conn.close()

    plan = query_plan(path, "SELECT 1 FROM revocations WHERE code_id = x'00'")

    assert plan == ["SCAN revocations"]
    assert not is_key_search(plan[0])
