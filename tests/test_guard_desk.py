"""The guard's desk: guards and PINs, sign-in with lockout, shifts, and overrides of verdicts."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from edgenode.cli import main
from edgenode.config import GuardConfig
from edgenode.daemon import Daemon
from edgenode.guard_desk import (
    OVERRIDE_REASON_LABELS,
    OVERRIDE_REASONS,
    OVERRIDE_REASONS_FOR,
    GuardDesk,
    OverrideError,
    OverrideEvent,
    SignInError,
)
from edgenode.guards import GuardStore, GuardStoreError
from edgenode.i18n import translator
from edgenode.journal import Journal, JournalError
from edgenode.pipeline import VerdictEvent
from edgenode.policy import ClockReading, Outcome, Verdict
from edgenode.reasons import Reason
from sync.hub_store import parse_records
from sync.uplink import record_body
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config
from tests.test_daemon import ScriptedSource, scan

PIN = "482913"
OTHER_PIN = "771203"
NOW = 1_800_000_000.0
TIMEOUT_S = 10


class FakeMonotonic:
    """A monotonic clock that the test moves forward by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class WallClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> ClockReading:
        return ClockReading(now=self.now)


def verdict(outcome: Outcome, reason: Reason) -> Verdict:
    return Verdict(outcome=outcome, reasons=(reason,), community_subject=bytes(range(16)))


@pytest.fixture
def guards(tmp_path: Path) -> GuardStore:
    store = GuardStore(tmp_path / "state" / "guards.json")
    store.add("G01", PIN)
    store.add("G02", OTHER_PIN)
    return store


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "state" / "journal.db", "gate-test") as opened:
        yield opened


class Desk:
    """A guard desk over a real guards file and journal, with clocks the test controls."""

    def __init__(self, guards: GuardStore, journal: Journal) -> None:
        self.wall = WallClock()
        self.monotonic = FakeMonotonic()
        self.config = GuardConfig(shift_max_s=3_600, pin_attempts_max=3, lockout_s=60)
        self.desk = GuardDesk(
            self.config,
            guards,
            journal,
            station="north",
            clock=self.wall,
            id_lookup_key=None,
            monotonic=self.monotonic,
        )
        self.journal = journal

    def record(self, outcome: Outcome, reason: Reason = Reason.HEALTH_RED) -> int:
        stored = self.journal.append_verdict(
            verdict(outcome, reason), station="north", recorded_at=self.wall.now, latency_ms=1.0
        )
        return stored.seq


@pytest.fixture
def desk(guards: GuardStore, journal: Journal) -> Desk:
    return Desk(guards, journal)


# --- the guards file ---


def test_guards_file_is_owner_only(guards: GuardStore) -> None:
    assert guards.path.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_guards_file_written_by_root_belongs_to_state_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4321, 4321)

    GuardStore(state / "guards.json").add("G01", PIN)

    assert (state / "guards.json").stat().st_uid == 4321


def test_guards_file_holds_no_plain_pin(guards: GuardStore) -> None:
    content = guards.path.read_text(encoding="utf-8")

    assert PIN not in content
    assert "$argon2id$" in content


@pytest.mark.parametrize("pin", ["12345", "12345a", "１２３４５６", "1234567890123"])
def test_short_or_non_digit_pin_is_rejected(guards: GuardStore, pin: str) -> None:
    with pytest.raises(GuardStoreError) as caught:
        guards.add("G03", pin)

    assert caught.value.reason == "pin_invalid"


def test_existing_guard_is_not_overwritten(guards: GuardStore) -> None:
    with pytest.raises(GuardStoreError) as caught:
        guards.add("G01", "000000")

    assert caught.value.reason == "guard_exists"


def test_removed_guard_cannot_sign_in(desk: Desk, guards: GuardStore) -> None:
    guards.remove("G02")

    with pytest.raises(SignInError) as caught:
        desk.desk.sign_in("G02", OTHER_PIN)

    assert caught.value.reason == "unknown_guard"


def run_cli(*args: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out):
            code = main(["--lang", "en", *args])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue()


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "edgenode.toml"
    path.write_text(
        '[device]\nid = "gate-01"\nsite = "XH-0012"\nstate_dir = "state"\n', encoding="utf-8"
    )
    return path


def test_guard_cli_adds_lists_and_removes(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))

    added, _ = run_cli("guard", "add", "--config", config, "G07", stdin=PIN + "\n")
    listed, listing = run_cli("guard", "list", "--config", config, "--json")
    removed, _ = run_cli("guard", "remove", "--config", config, "G07")
    _, after = run_cli("guard", "list", "--config", config, "--json")

    assert added == 0
    assert listed == 0
    assert [json.loads(line)["guard_id"] for line in listing.splitlines()] == ["G07"]
    assert removed == 0
    assert after == ""
    assert GuardStore(tmp_path / "state" / "guards.json").guards() == []


def test_run_fails_to_start_without_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    with config.open("a", encoding="utf-8") as out:
        out.write('\n[guard]\nid_lookup_key_file = "missing.key"\n')
        # A source, so the run gets as far as opening the daemon; the device is never read.
        out.write('\n[[sources]]\ntype = "serial"\nname = "scanner"\ndevice = "/dev/null"\n')

    code = main(["--lang", "en", "run", "--config", str(config)])

    assert code == 3
    assert "ID lookup key file not found" in capsys.readouterr().err


def test_guard_cli_rejects_short_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path))

    code, _ = run_cli("guard", "add", "--config", config, "G07", stdin="1234\n")

    assert code == 1
    assert "6 to 12 digits" in capsys.readouterr().err
    assert not (tmp_path / "state" / "guards.json").exists()


# --- sign-in and shifts ---


def test_sign_in_starts_a_shift(desk: Desk) -> None:
    session = desk.desk.sign_in("G01", PIN)

    assert session.guard_id == "G01"
    assert session.started_at == NOW
    assert session.ends_at == NOW + 3_600
    assert desk.desk.session == session


def test_wrong_pin_is_rejected(desk: Desk) -> None:
    with pytest.raises(SignInError) as caught:
        desk.desk.sign_in("G01", "000000")

    assert caught.value.reason == "wrong_pin"
    assert desk.desk.session is None


def test_repeated_wrong_pins_lock_the_guard(desk: Desk) -> None:
    reasons = []
    for _ in range(3):
        with pytest.raises(SignInError) as caught:
            desk.desk.sign_in("G01", "000000")
        reasons.append(caught.value.reason)

    with pytest.raises(SignInError) as locked:
        desk.desk.sign_in("G01", PIN)

    assert reasons == ["wrong_pin", "wrong_pin", "locked_out"]
    assert locked.value.reason == "locked_out"
    assert desk.desk.session is None


def test_lockout_ends_after_lockout_s(desk: Desk) -> None:
    for _ in range(3):
        with pytest.raises(SignInError):
            desk.desk.sign_in("G01", "000000")
    desk.monotonic.now += 61

    session = desk.desk.sign_in("G01", PIN)

    assert session.guard_id == "G01"


def test_lockout_is_per_guard(desk: Desk) -> None:
    for _ in range(3):
        with pytest.raises(SignInError):
            desk.desk.sign_in("G01", "000000")

    session = desk.desk.sign_in("G02", OTHER_PIN)

    assert session.guard_id == "G02"


def test_right_pin_resets_the_failure_count(desk: Desk) -> None:
    for _ in range(2):
        with pytest.raises(SignInError):
            desk.desk.sign_in("G01", "000000")
    desk.desk.sign_in("G01", PIN)

    with pytest.raises(SignInError) as caught:
        desk.desk.sign_in("G01", "000000")

    assert caught.value.reason == "wrong_pin"


def test_shift_ends_after_shift_max_s(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    desk.wall.now += 3_600

    assert desk.desk.session is None


def test_sign_out_ends_the_shift(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    desk.desk.sign_out()

    assert desk.desk.session is None


def test_next_guard_takes_over_the_shift(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    session = desk.desk.sign_in("G02", OTHER_PIN)

    assert desk.desk.session == session


# --- overrides ---


def test_override_of_deny_is_journalled(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(Outcome.DENY)

    event = desk.desk.override(seq, "admit", "paper_certificate_checked")

    assert event.verdict_seq == seq
    assert event.decision == "admit"
    assert event.reason == "paper_certificate_checked"
    assert event.guard_id == "G01"
    assert event.record.kind == "override"
    assert event.record.verdict == "admit"
    assert event.record.reasons == ("paper_certificate_checked",)
    assert event.record.verdict_seq == seq
    assert event.record.guard_id == "G01"
    assert desk.journal.record(event.record.seq) == event.record


def test_override_of_review_can_refuse(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(Outcome.REVIEW, Reason.HEALTH_YELLOW)

    event = desk.desk.override(seq, "refuse", "health_risk_suspected")

    assert event.record.verdict == "refuse"


@pytest.mark.parametrize("outcome", [Outcome.ADMIT, Outcome.INCOMPLETE, Outcome.UNRECOGNISED])
def test_override_of_other_verdicts_is_rejected(desk: Desk, outcome: Outcome) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(outcome, Reason.HEALTH_GREEN)

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(seq, "refuse", "identity_doubtful")

    assert caught.value.reason == "not_overridable"


def test_override_needs_a_signed_in_guard(desk: Desk) -> None:
    seq = desk.record(Outcome.DENY)

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(seq, "admit", "resident_known_to_guard")

    assert caught.value.reason == "not_signed_in"
    assert desk.journal.count() == 1


def test_override_after_shift_end_is_rejected(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(Outcome.DENY)
    desk.wall.now += 3_600

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(seq, "admit", "resident_known_to_guard")

    assert caught.value.reason == "not_signed_in"


def test_override_happens_once_per_verdict(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(Outcome.DENY)
    desk.desk.override(seq, "admit", "resident_known_to_guard")

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(seq, "refuse", "identity_doubtful")

    assert caught.value.reason == "already_overridden"
    assert desk.journal.count() == 2


def test_journal_allows_one_override_per_verdict(desk: Desk) -> None:
    seq = desk.record(Outcome.DENY)

    def append() -> None:
        desk.journal.append_override(
            seq,
            decision="admit",
            reason="resident_known_to_guard",
            guard_id="G01",
            station="north",
            recorded_at=NOW,
            clock_trusted=True,
        )

    append()
    with pytest.raises(JournalError) as caught:
        append()

    assert caught.value.reason == "already_overridden"


@pytest.mark.parametrize(
    ("seq_offset", "decision", "reason", "expected"),
    [
        (5, "admit", "resident_known_to_guard", "verdict_not_found"),
        (0, "wave_through", "resident_known_to_guard", "unknown_decision"),
        (0, "admit", "looked_fine", "unknown_reason"),
        (0, "admit", "health_risk_suspected", "reason_not_for_decision"),
        (0, "refuse", "paper_certificate_checked", "reason_not_for_decision"),
    ],
    ids=["missing_verdict", "bad_decision", "bad_reason", "refusal_reason", "admit_reason"],
)
def test_invalid_override_is_rejected(
    desk: Desk, seq_offset: int, decision: str, reason: str, expected: str
) -> None:
    desk.desk.sign_in("G01", PIN)
    seq = desk.record(Outcome.DENY)

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(seq + seq_offset, decision, reason)

    assert caught.value.reason == expected
    assert desk.journal.count() == 1


def test_override_of_an_override_is_rejected(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    event = desk.desk.override(desk.record(Outcome.DENY), "admit", "emergency_services")

    with pytest.raises(OverrideError) as caught:
        desk.desk.override(event.record.seq, "refuse", "identity_doubtful")

    assert caught.value.reason == "verdict_not_found"


def test_journal_verify_covers_overrides(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    event = desk.desk.override(desk.record(Outcome.DENY), "admit", "emergency_services")
    desk.record(Outcome.ADMIT, Reason.HEALTH_GREEN)

    intact = desk.journal.verify()
    with Journal(desk.journal.path, "gate-test") as other:
        other._conn.execute(
            "UPDATE records SET guard_id = 'G99' WHERE seq = ?", (event.record.seq,)
        )
    tampered = desk.journal.verify()

    assert intact == []
    assert [problem.seq for problem in tampered] == [event.record.seq]


def test_override_record_passes_the_hub_checks(desk: Desk) -> None:
    desk.desk.sign_in("G01", PIN)
    event = desk.desk.override(desk.record(Outcome.DENY), "admit", "emergency_services")
    outbox = desk.journal.unacked_records(10)
    bodies = [record_body(item, NOW + 5) for item in outbox]

    parsed = parse_records(bodies)

    assert [record.kind for record in parsed.valid] == ["verdict", "override"]
    assert parsed.invalid == []
    assert bodies[1]["verdict_seq"] == event.verdict_seq
    assert bodies[1]["guard_id"] == "G01"
    assert bodies[1]["reasons"] == ["emergency_services"]
    assert "verdict_seq" not in bodies[0]


def test_every_override_reason_fits_a_decision() -> None:
    fitting = {reason for reasons in OVERRIDE_REASONS_FOR.values() for reason in reasons}

    assert fitting == set(OVERRIDE_REASONS)


def test_every_override_reason_has_chinese_label() -> None:
    chinese = translator("zh_CN")

    for label in OVERRIDE_REASON_LABELS.values():
        assert chinese.gettext(label) != label, label


# --- through the daemon ---


def test_daemon_runs_sign_in_and_override(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    GuardStore(config.guards_path).add("G01", PIN)
    source = ScriptedSource("scanner", [scan("scanner", *site.pair(colour="red"))])
    verdicts: list[VerdictEvent] = []
    overrides: list[OverrideEvent] = []
    results: dict[str, object] = {}
    daemon = Daemon(
        config, [source], listeners=[verdicts.append], override_listeners=[overrides.append]
    )

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not verdicts and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        try:
            await daemon.sign_in("G01", "000000")
        except SignInError as exc:
            results["wrong_pin"] = exc.reason
        results["session"] = await daemon.sign_in("G01", PIN)
        results["override"] = await daemon.override(
            verdicts[0].record.seq, "admit", "paper_certificate_checked"
        )
        daemon.sign_out()
        results["after_sign_out"] = daemon.guard_session
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())

    assert verdicts[0].verdict.outcome == Outcome.DENY
    assert results["wrong_pin"] == "wrong_pin"
    assert overrides == [results["override"]]
    assert overrides[0].verdict_seq == verdicts[0].record.seq
    assert results["after_sign_out"] is None
    with Journal(config.journal_path, "gate-test") as journal:
        assert journal.verify() == []
        assert journal.override_of(verdicts[0].record.seq) == overrides[0].record


def test_daemon_keeps_running_when_override_listener_fails(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    GuardStore(config.guards_path).add("G01", PIN)
    source = ScriptedSource("scanner", [scan("scanner", *site.pair(colour="red"))])
    verdicts: list[VerdictEvent] = []

    def broken(_event: OverrideEvent) -> None:
        raise RuntimeError("relay unplugged")

    daemon = Daemon(config, [source], listeners=[verdicts.append], override_listeners=[broken])
    overrides: list[OverrideEvent] = []

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not verdicts and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await daemon.sign_in("G01", PIN)
        overrides.append(
            await daemon.override(verdicts[0].record.seq, "admit", "emergency_services")
        )
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())

    assert overrides[0].record.kind == "override"
