"""`edgenode demo` from start to end, and what it leaves on disk."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]], str]:
    """Run the demo once with JSON output and debug logs; return its folder, verdicts and logs."""
    folder = tmp_path_factory.mktemp("demo") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.cli", "--log-level", "debug", "demo", "--json",
         "--dir", str(folder)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    return folder, verdicts, result.stderr


def test_demo_verdicts_match_expectations(demo: tuple[Path, list[dict[str, object]], str]) -> None:
    _, verdicts, _ = demo
    assert [v["verdict"] for v in verdicts] == [v["expected"] for v in verdicts]


def test_demo_gives_one_verdict_per_person(demo: tuple[Path, list[dict[str, object]], str]) -> None:
    _, verdicts, _ = demo
    assert sorted(v["person"] for v in verdicts) == list(range(16))  # type: ignore[type-var]


def test_demo_covers_every_verdict_class(demo: tuple[Path, list[dict[str, object]], str]) -> None:
    _, verdicts, _ = demo
    assert {v["verdict"] for v in verdicts} == {
        "admit",
        "review",
        "deny",
        "incomplete",
        "unrecognised",
    }


def test_demo_rerun_replaces_its_own_folder(tmp_path: Path) -> None:
    from edgenode.demo.run import MARKER, _prepare_folder

    folder = tmp_path / "site"
    _prepare_folder(folder)
    (folder / "old-file").write_text("x")
    _prepare_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]


def test_demo_never_deletes_a_foreign_folder(tmp_path: Path) -> None:
    from edgenode.demo.run import _prepare_folder

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        _prepare_folder(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def payload_texts(folder: Path) -> list[str]:
    """Every code shown in the demo footage, decoded back from the video."""
    from drivers.files import iter_file_frames
    from edgenode.decoders import create_decoder

    decoder = create_decoder("zxing")
    found = set()
    for frame in iter_file_frames(folder / "gate-footage.avi"):
        if frame.index % 5 == 0:
            found.update(symbol.data.decode("ascii") for symbol in decoder.decode(frame.frame))
    return sorted(found)


def test_no_payload_is_stored_or_logged(demo: tuple[Path, list[dict[str, object]], str]) -> None:
    folder, verdicts, logs = demo
    payloads = payload_texts(folder)
    stored = b"".join(path.read_bytes() for path in (folder / "state").iterdir())
    printed = logs + json.dumps(verdicts)

    assert len(payloads) >= 20
    for payload in payloads:
        # A distinctive slice is enough: the whole text, or any 24 characters of it.
        probe = payload[len(payload) // 2 : len(payload) // 2 + 24]
        assert probe.encode("ascii") not in stored
        assert probe not in printed


def test_journal_records_every_verdict(demo: tuple[Path, list[dict[str, object]], str]) -> None:
    folder, verdicts, _ = demo
    conn = sqlite3.connect(folder / "state" / "journal.db")
    count = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    conn.close()
    assert count == len(verdicts)


def test_verdict_logs_carry_event_name_and_ids(
    demo: tuple[Path, list[dict[str, object]], str],
) -> None:
    _, verdicts, logs = demo
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    recorded = [e for e in events if e.get("event") == "verdict_recorded"]
    assert len(recorded) == len(verdicts)
    assert all({"seq", "device", "station", "verdict", "reasons"} <= set(e) for e in recorded)
