"""The verdict journal: durable settings, sequence numbers and tamper detection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgenode.cli import main
from edgenode.journal import Journal
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason

VERDICT = Verdict(
    outcome=Outcome.DENY,
    reasons=(Reason.HEALTH_RED,),
    health_subject=bytes(range(16)),
    community_subject=bytes(range(16, 32)),
)


def fill(path: Path, count: int) -> None:
    with Journal(path, "gate-01") as journal:
        for n in range(count):
            journal.append_verdict(
                VERDICT, station="north", recorded_at=1_800_000_000 + n, latency_ms=1.5
            )


def raw(path: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def problems(path: Path) -> list[str]:
    with Journal(path, "gate-01") as journal:
        return [problem.problem for problem in journal.verify()]


def test_journal_uses_wal_and_full_sync(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        conn = journal._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_sequence_numbers_start_at_one_and_increase(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 3)
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        assert [record.seq for record, _, _ in journal.records()] == [1, 2, 3]


def test_sequence_never_repeats_after_last_record_deleted(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    fill(path, 3)
    raw(path, "DELETE FROM records WHERE seq = 3")
    with Journal(path, "gate-01") as journal:
        record = journal.append_verdict(VERDICT, station="north", recorded_at=1.0, latency_ms=None)
    assert record.seq == 4


def test_intact_chain_verifies(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 5)
    assert problems(tmp_path / "j.db") == []


def test_edited_record_is_detected(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 5)
    raw(tmp_path / "j.db", "UPDATE records SET verdict = 'admit' WHERE seq = 3")
    assert problems(tmp_path / "j.db") == ["record content altered"]


def test_deleted_middle_record_is_detected(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 5)
    raw(tmp_path / "j.db", "DELETE FROM records WHERE seq = 3")
    found = problems(tmp_path / "j.db")
    assert "records 3..3 missing" in found
    assert "link to the previous record broken" in found


def test_deleted_last_record_is_detected(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 5)
    raw(tmp_path / "j.db", "DELETE FROM records WHERE seq = 5")
    assert problems(tmp_path / "j.db") == ["records 5..5 missing at the end"]


def test_recomputed_hash_after_edit_breaks_next_link(tmp_path: Path) -> None:
    from edgenode.journal import chain_hash

    path = tmp_path / "j.db"
    fill(path, 4)
    raw(path, "UPDATE records SET verdict = 'admit' WHERE seq = 2")
    with Journal(path, "gate-01") as journal:
        record, prev_hash, _ = next(r for r in journal.records() if r[0].seq == 2)
    raw(path, "UPDATE records SET hash = ? WHERE seq = 2", chain_hash(prev_hash, record))
    assert problems(path) == ["link to the previous record broken"]


def test_migration_is_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    fill(path, 1)
    fill(path, 1)
    conn = sqlite3.connect(path)
    versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, len(versions) + 1))
    conn.close()


def test_journal_holds_pseudonymous_subjects_only(tmp_path: Path) -> None:
    fill(tmp_path / "j.db", 1)
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        record = next(journal.records())[0]
    assert record.health_subject == bytes(range(16)).hex()
    assert record.reasons == ("health_red",)


@pytest.mark.parametrize(("tamper", "exit_code"), [(False, 0), (True, 1)], ids=["intact", "edited"])
def test_journal_verify_command_exit_code(tmp_path: Path, tamper: bool, exit_code: int) -> None:
    state = tmp_path / "state"
    fill(state / "journal.db", 3)
    if tamper:
        raw(state / "journal.db", "UPDATE records SET reasons = '[]' WHERE seq = 1")
    config = tmp_path / "edgenode.toml"
    config.write_text(
        '[device]\nid = "gate-01"\nsite = "X"\nstate_dir = "state"\n', encoding="utf-8"
    )
    assert main(["journal", "verify", "--config", str(config)]) == exit_code
