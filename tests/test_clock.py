"""Clock trust: NTP state, the district's time, backward jumps and the saved last good time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgenode.cache import Cache
from edgenode.clock import (
    BACKWARD_TOLERANCE_S,
    NTP_CHECK_INTERVAL_S,
    ClockGuard,
    first_known,
    kernel_ntp_synchronised,
)
from edgenode.decoders import create_decoder
from edgenode.journal import Journal
from edgenode.pipeline import Gate
from edgenode.reasons import Reason
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config

T0 = 1_800_000_000.0


class FakeClocks:
    """A wall clock and a monotonic clock that tests move by hand."""

    def __init__(self, wall: float = T0) -> None:
        self.wall_s = wall
        self.monotonic_s = 1_000.0

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.monotonic_s += seconds

    def wall(self) -> float:
        return self.wall_s

    def monotonic(self) -> float:
        return self.monotonic_s


class FakeNtp:
    def __init__(self, synchronised: bool | None) -> None:
        self.synchronised = synchronised
        self.calls = 0

    def __call__(self) -> bool | None:
        self.calls += 1
        return self.synchronised


def make_guard(
    tmp_path: Path,
    ntp: FakeNtp,
    clocks: FakeClocks,
    skews: tuple[float | None, ...] = (),
) -> ClockGuard:
    return ClockGuard(
        tmp_path / "clock.json",
        ntp,
        district_skews=lambda: skews,
        district_skew_limit_s=120.0,
        wall=clocks.wall,
        monotonic=clocks.monotonic,
    )


def test_clock_untrusted_until_ntp_synchronised(tmp_path: Path) -> None:
    ntp = FakeNtp(False)
    clocks = FakeClocks()
    guard = make_guard(tmp_path, ntp, clocks)
    before = guard.read()
    ntp.synchronised = True
    clocks.advance(NTP_CHECK_INTERVAL_S)
    after = guard.read()
    assert before.synchronised is False
    assert after.synchronised is True


def test_unreadable_ntp_status_is_untrusted(tmp_path: Path) -> None:
    guard = make_guard(tmp_path, FakeNtp(None), FakeClocks())
    assert guard.read().synchronised is False


def test_ntp_status_is_read_once_per_interval(tmp_path: Path) -> None:
    ntp = FakeNtp(True)
    clocks = FakeClocks()
    guard = make_guard(tmp_path, ntp, clocks)
    for _ in range(5):
        guard.read()
        clocks.advance(1.0)
    assert ntp.calls == 1


def test_district_time_vouches_without_ntp(tmp_path: Path) -> None:
    guard = make_guard(tmp_path, FakeNtp(False), FakeClocks(), skews=(3.0, None))
    assert guard.read().synchronised is True


def test_district_time_disagreeing_distrusts_ntp(tmp_path: Path) -> None:
    guard = make_guard(tmp_path, FakeNtp(True), FakeClocks(), skews=(None, -600.0))
    assert guard.read().synchronised is False


def test_backward_jump_is_caught_at_once(tmp_path: Path) -> None:
    clocks = FakeClocks()
    guard = make_guard(tmp_path, FakeNtp(True), clocks)
    trusted = guard.read()
    # The wall clock steps back a minute while the monotonic clock runs on.
    clocks.monotonic_s += 10
    clocks.wall_s -= 60
    jumped = guard.read()
    assert trusted.synchronised is True
    assert jumped.synchronised is False


def test_small_backward_step_is_tolerated(tmp_path: Path) -> None:
    clocks = FakeClocks()
    guard = make_guard(tmp_path, FakeNtp(True), clocks)
    guard.read()
    clocks.wall_s -= BACKWARD_TOLERANCE_S / 2
    assert guard.read().synchronised is True


def test_last_good_time_is_saved(tmp_path: Path) -> None:
    clocks = FakeClocks()
    guard = make_guard(tmp_path, FakeNtp(True), clocks)
    guard.read()
    clocks.advance(30)
    guard.read()
    guard.save()
    saved = json.loads((tmp_path / "clock.json").read_text())
    assert saved == {"last_good_time": T0 + 30}


def test_clock_behind_saved_time_untrusted_after_reboot(tmp_path: Path) -> None:
    first = make_guard(tmp_path, FakeNtp(True), FakeClocks())
    first.read()
    first.save()
    # The board restarts with a clock a day old; the NTP state is wrongly reported as good.
    rebooted = make_guard(tmp_path, FakeNtp(True), FakeClocks(wall=T0 - 86_400))
    assert rebooted.read().synchronised is False


def test_clock_past_saved_time_trusted_after_reboot(tmp_path: Path) -> None:
    first = make_guard(tmp_path, FakeNtp(True), FakeClocks())
    first.read()
    first.save()
    rebooted = make_guard(tmp_path, FakeNtp(True), FakeClocks(wall=T0 + 3_600))
    assert rebooted.read().synchronised is True


def test_damaged_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "clock.json").write_text("{not json")
    guard = make_guard(tmp_path, FakeNtp(True), FakeClocks())
    assert guard.read().synchronised is True


def test_kernel_ntp_state_is_readable() -> None:
    # adjtimex(2) works without privileges, so on Linux the state is known either way.
    assert kernel_ntp_synchronised() in (True, False)


@pytest.mark.parametrize(
    ("ntp_synchronised", "expected_reasons"),
    [(True, []), (False, [Reason.CLOCK_UNTRUSTED])],
    ids=["ntp-synchronised", "ntp-unsynchronised"],
)
def test_gate_reviews_pair_while_clock_untrusted(
    tmp_path: Path, ntp_synchronised: bool, expected_reasons: list[Reason]
) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    guard = ClockGuard(tmp_path / "clock.json", FakeNtp(ntp_synchronised))
    with (
        Cache(config.cache_path) as cache,
        Journal(config.journal_path, config.device.id) as journal,
    ):
        gate = Gate(config, cache, journal, create_decoder("zxing"), clock=guard.read)
        payloads = [code.encode() for code in site.pair()]
        events = gate.process_payloads(payloads, station="north", at=0.0, received=0.0)
    clock_reasons = [r for r in events[0].verdict.reasons if r == Reason.CLOCK_UNTRUSTED]
    assert clock_reasons == expected_reasons
    assert events[0].record.clock_trusted is ntp_synchronised


def test_auto_source_falls_back_when_kernel_unreadable() -> None:
    status = first_known(FakeNtp(None), FakeNtp(True))
    assert status() is True


def test_auto_source_prefers_first_known_answer() -> None:
    later = FakeNtp(True)
    status = first_known(FakeNtp(False), later)
    assert status() is False
    assert later.calls == 0
