"""Today's verdict counts for the guard's screen: seeded from the journal, reset at midnight."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from edgenode.gate_status import TodayCounts, local_midnight
from edgenode.journal import Journal
from edgenode.pipeline import VerdictEvent
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason

NOON = datetime(2026, 12, 4, 12, 0).timestamp()


def record(journal: Journal, outcome: Outcome, at: float) -> VerdictEvent:
    verdict = Verdict(outcome=outcome, reasons=(Reason.HEALTH_GREEN,))
    entry = journal.append_verdict(verdict, station="north", recorded_at=at, latency_ms=1.0)
    return VerdictEvent(entry, verdict, "north", 0.0)


def test_local_midnight_starts_the_day() -> None:
    assert datetime.fromtimestamp(local_midnight(NOON)) == datetime(2026, 12, 4)


def test_seed_counts_only_today(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db", "gate-test") as journal:
        record(journal, Outcome.ADMIT, NOON - 86_400)
        record(journal, Outcome.ADMIT, NOON - 60)
        record(journal, Outcome.DENY, NOON - 30)
        counts = TodayCounts()
        counts.seed(journal, NOON)
    assert counts.snapshot(NOON) == {"admit": 1, "deny": 1}


def test_counts_reset_after_midnight(tmp_path: Path) -> None:
    tomorrow = (datetime.fromtimestamp(NOON) + timedelta(days=1)).timestamp()
    with Journal(tmp_path / "journal.db", "gate-test") as journal:
        counts = TodayCounts()
        counts.seed(journal, NOON)
        counts.add(record(journal, Outcome.REVIEW, NOON + 60))
        assert counts.snapshot(NOON + 120) == {"review": 1}
        counts.add(record(journal, Outcome.ADMIT, tomorrow))
    assert counts.snapshot(tomorrow) == {"admit": 1}
