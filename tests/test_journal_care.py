"""Journal upkeep on an SD card: retention with an anchor, migrations, grouped commits and
corrupt files, all on real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edgenode.cache import Cache
from edgenode.cli import main
from edgenode.decoders import create_decoder
from edgenode.journal import (
    _MIGRATIONS,
    GENESIS_HASH,
    WAL_SIZE_LIMIT_BYTES,
    Journal,
    JournalError,
    VerdictEntry,
)
from edgenode.pipeline import Gate, system_clock
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config

VERDICT = Verdict(
    outcome=Outcome.DENY,
    reasons=(Reason.HEALTH_RED,),
    health_subject=bytes(range(16)),
    community_subject=bytes(range(16, 32)),
)
DAY = 86_400.0
NOW = 1_800_000_000.0


def fill(journal: Journal, recorded_at: list[float]) -> list[int]:
    entries = [VerdictEntry(VERDICT, "north", at, 1.0) for at in recorded_at]
    return [record.seq for record in journal.append_verdicts(entries)]


def raw(path: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def corrupt_header(path: Path) -> None:
    """Overwrite the 16-byte magic string at the start of an SQLite file."""
    with path.open("r+b") as handle:
        handle.write(b"this is no db!!\x00")


# --- retention ---


def test_purge_removes_old_acked_records(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY, NOW - 35 * DAY, NOW - 1 * DAY])
        journal.mark_acked(seqs, NOW)
        deleted = journal.purge(NOW - 30 * DAY)
        remaining = [record.seq for record, _, _ in journal.records()]
    assert deleted == 2
    assert remaining == [3]


def test_purge_keeps_unacked_records(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY, NOW - 39 * DAY])
        journal.mark_acked(seqs[1:], NOW)
        deleted = journal.purge(NOW - 30 * DAY)
        remaining = journal.count()
    assert deleted == 0
    assert remaining == 2


def test_purge_stops_at_first_unacked_record(tmp_path: Path) -> None:
    # Deleting record 3 while record 2 stays would leave a hole in the chain.
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY] * 3)
        journal.mark_acked([seqs[0], seqs[2]], NOW)
        journal.purge(NOW - 30 * DAY)
        remaining = [record.seq for record, _, _ in journal.records()]
    assert remaining == [2, 3]


def test_chain_verifies_across_purge(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY] * 7 + [NOW])
        journal.mark_acked(seqs, NOW)
        journal.purge(NOW - 30 * DAY, chunk=3)
        anchor = journal.anchor()
        problems = journal.verify()
    assert anchor.seq == 7
    assert anchor.purged_records == 7
    assert anchor.hash != GENESIS_HASH
    assert problems == []


def test_tampered_record_after_purge_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY, NOW, NOW])
        journal.mark_acked(seqs, NOW)
        journal.purge(NOW - 30 * DAY)
    raw(path, "UPDATE records SET verdict = 'admit' WHERE seq = 3")
    with Journal(path, "gate-01") as journal:
        problems = [problem.problem for problem in journal.verify()]
    assert problems == ["record content altered"]


def test_deleted_first_record_after_purge_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY, NOW, NOW])
        journal.mark_acked(seqs, NOW)
        journal.purge(NOW - 30 * DAY)
    raw(path, "DELETE FROM records WHERE seq = 2")
    with Journal(path, "gate-01") as journal:
        problems = [problem.problem for problem in journal.verify()]
    assert "records 2..2 missing" in problems


def test_seq_is_not_reused_after_purging_everything(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY] * 3)
        journal.mark_acked(seqs, NOW)
        journal.purge(NOW - 30 * DAY)
    with Journal(path, "gate-01") as journal:
        next_seqs = fill(journal, [NOW])
        problems = journal.verify()
    assert next_seqs == [4]
    assert problems == []


def test_verify_command_passes_after_purge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    with Journal(state / "journal.db", "gate-01") as journal:
        seqs = fill(journal, [NOW - 40 * DAY, NOW])
        journal.mark_acked(seqs, NOW)
        journal.purge(NOW - 30 * DAY)
    config = tmp_path / "edgenode.toml"
    config.write_text(f'[device]\nid = "gate-01"\nsite = "S"\nstate_dir = "{state}"\n')
    exit_code = main(["--lang", "en", "journal", "verify", "--config", str(config)])
    output = capsys.readouterr().out
    assert exit_code == 0
    assert "intact: 1 records" in output
    assert "1 older records, up to seq 1, were purged" in output


# --- the write-ahead log and grouped commits ---


def test_wal_size_is_limited(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        limit = journal._conn.execute("PRAGMA journal_size_limit").fetchone()[0]
    assert limit == WAL_SIZE_LIMIT_BYTES


def test_verdicts_decided_together_share_one_commit(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        statements: list[str] = []
        journal._conn.set_trace_callback(statements.append)
        fill(journal, [NOW, NOW, NOW])
        journal._conn.set_trace_callback(None)
        chain = journal.verify()
    assert statements.count("COMMIT") == 1
    assert chain == []


def test_frame_without_code_never_writes(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    blank = np.full((480, 640), 255, dtype=np.uint8)
    with (
        Cache(config.cache_path) as cache,
        Journal(config.journal_path, config.device.id) as journal,
    ):
        gate = Gate(config, cache, journal, create_decoder("zxing"), clock=system_clock)
        statements: list[str] = []
        journal._conn.set_trace_callback(statements.append)
        events = gate.process_frame(blank, station="north", at=0.0)
        events += gate.tick(1.0)
        journal._conn.set_trace_callback(None)
    assert events == []
    assert [s for s in statements if s.startswith(("BEGIN", "INSERT", "COMMIT"))] == []


# --- migrations ---


def create_v2_journal(path: Path, records: int) -> None:
    """Write a journal at schema version 2, as an older release left it."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for version, script in enumerate(_MIGRATIONS[:2], start=1):
        conn.executescript(script)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    for n in range(1, records + 1):
        conn.execute(
            "INSERT INTO records (kind, device_id, station, recorded_at, clock_trusted, verdict, "
            "reasons, prev_hash, hash) VALUES ('verdict', 'gate-01', 'north', ?, 1, 'deny', "
            "'[]', zeroblob(32), zeroblob(32))",
            (NOW + n,),
        )
    conn.commit()
    conn.close()


def test_migration_backs_up_the_journal_first(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    create_v2_journal(path, records=2)
    Journal(path, "gate-01").close()
    backup = tmp_path / "j.db.v2.bak"
    conn = sqlite3.connect(backup)
    try:
        backed_up = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        version = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
    finally:
        conn.close()
    assert backed_up == 2
    assert version == 2


def test_successful_migration_removes_older_backup(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    create_v2_journal(path, records=1)
    older = tmp_path / "j.db.v1.bak"
    older.write_bytes(b"an older backup")
    Journal(path, "gate-01").close()
    assert not older.exists()
    assert (tmp_path / "j.db.v2.bak").exists()


def test_new_journal_makes_no_backup(tmp_path: Path) -> None:
    Journal(tmp_path / "j.db", "gate-01").close()
    assert list(tmp_path.glob("*.bak")) == []


def test_seq_continues_after_migration(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    create_v2_journal(path, records=2)
    raw(path, "DELETE FROM records WHERE seq = 2")
    with Journal(path, "gate-01") as journal:
        next_seqs = fill(journal, [NOW])
    assert next_seqs == [3]


# --- corrupt files ---


def test_corrupt_journal_is_an_error_without_recovery(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        fill(journal, [NOW])
    corrupt_header(path)
    with pytest.raises(JournalError):
        Journal(path, "gate-01")


def test_corrupt_journal_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        fill(journal, [NOW])
    corrupt_header(path)
    damaged = path.read_bytes()
    with Journal(path, "gate-01", recover_corrupt=True) as journal:
        moved = journal.moved_aside
        fresh_count = journal.count()
    assert moved is not None
    assert moved.name.startswith("j.db.corrupt-")
    assert moved.read_bytes() == damaged
    assert fresh_count == 0


def test_fresh_journal_after_corruption_never_reuses_seqs(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path, "gate-01") as journal:
        fill(journal, [NOW] * 5)
    corrupt_header(path)
    with Journal(path, "gate-01", recover_corrupt=True) as journal:
        seqs = fill(journal, [NOW, NOW])
        problems = journal.verify()
    assert seqs[0] > 5
    assert seqs[1] == seqs[0] + 1
    assert problems == []


def test_intact_journal_is_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path, "gate-01").close()
    with Journal(path, "gate-01", recover_corrupt=True) as journal:
        moved = journal.moved_aside
    assert moved is None
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []
