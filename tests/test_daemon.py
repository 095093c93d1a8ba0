"""The daemon: sources feed one pipeline; a clean stop resolves lone codes and keeps records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edgenode.daemon import Daemon
from edgenode.journal import Journal
from edgenode.pipeline import VerdictEvent
from edgenode.reasons import Reason
from edgenode.sources import Emit, ReadError, ScanEvent, SourceState, SourceStatus
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config

TIMEOUT_S = 10


class ScriptedSource:
    """A source that emits scripted scans, then waits to be cancelled."""

    def __init__(self, name: str, scans: Sequence[ScanEvent], fail_first: bool = False) -> None:
        self.name = name
        self.status = SourceStatus()
        self.scans = list(scans)
        self.fail_first = fail_first
        self.runs = 0
        self.cancelled = False

    async def run(self, emit: Emit) -> None:
        self.runs += 1
        if self.fail_first and self.runs == 1:
            raise OSError("device vanished")
        for scan in self.scans:
            emit(scan)
        self.status.state = SourceState.CONNECTED
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def scan(source: str, *payloads: str) -> ScanEvent:
    return ScanEvent(source=source, payloads=tuple(p.encode("ascii") for p in payloads))


async def run_until(daemon: Daemon, done: Callable[[], bool]) -> None:
    """Run the daemon until ``done()`` returns true (or a timeout passes), then stop it."""
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + TIMEOUT_S
    while not done() and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.02)
    daemon.stop()
    await asyncio.wait_for(task, TIMEOUT_S)


def emitted(*sources: ScriptedSource) -> Callable[[], bool]:
    return lambda: all(source.status.state == SourceState.CONNECTED for source in sources)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site.create(tmp_path, int(time.time()), DirectMinter())


def make_daemon(site: Site, sources: Sequence[ScriptedSource]) -> tuple[Daemon, list[VerdictEvent]]:
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    verdicts: list[VerdictEvent] = []
    daemon = Daemon(config, sources, listeners=[verdicts.append])
    return daemon, verdicts


def journal_verdicts(site: Site) -> list[str]:
    with Journal(site.folder / "state" / "journal.db", "gate-test") as journal:
        return [record.verdict for record, _, _ in journal.records()]


def test_codes_from_two_sources_pair(site: Site) -> None:
    health, community = site.pair()
    camera = ScriptedSource("camera", [scan("camera", health)])
    scanner = ScriptedSource("scanner", [scan("scanner", community)])
    daemon, verdicts = make_daemon(site, [camera, scanner])
    asyncio.run(run_until(daemon, lambda: len(verdicts) >= 1))
    assert [v.verdict.outcome.value for v in verdicts] == ["admit"]
    assert journal_verdicts(site) == ["admit"]


def test_read_error_gives_unrecognised_verdict(site: Site) -> None:
    error = ReadError(Reason.SCANNER_LAYOUT_ERROR, "scanner appears set to the German layout")
    source = ScriptedSource("wedge", [ScanEvent(source="wedge", read_error=error)])
    daemon, verdicts = make_daemon(site, [source])
    asyncio.run(run_until(daemon, lambda: len(verdicts) >= 1))
    assert verdicts[0].verdict.outcome.value == "unrecognised"
    assert verdicts[0].verdict.reasons == (Reason.SCANNER_LAYOUT_ERROR,)


def test_stop_resolves_lone_code_as_incomplete(site: Site) -> None:
    source = ScriptedSource("scanner", [scan("scanner", site.health())])
    daemon, _ = make_daemon(site, [source])
    asyncio.run(run_until(daemon, emitted(source)))
    assert journal_verdicts(site) == ["incomplete"]
    assert source.cancelled


def test_failed_source_is_restarted(site: Site) -> None:
    health, community = site.pair()
    source = ScriptedSource("scanner", [scan("scanner", health, community)], fail_first=True)
    daemon, verdicts = make_daemon(site, [source])
    asyncio.run(run_until(daemon, lambda: len(verdicts) >= 1))
    assert source.runs == 2
    assert [v.verdict.outcome.value for v in verdicts] == ["admit"]


def test_same_payload_repeated_quickly_counts_once(site: Site) -> None:
    health, community = site.pair()
    repeats = [scan("scanner", health, community) for _ in range(5)]
    source = ScriptedSource("scanner", repeats)
    daemon, _ = make_daemon(site, [source])
    asyncio.run(run_until(daemon, emitted(source)))
    assert journal_verdicts(site) == ["admit"]


def test_full_queue_counts_dropped_scans(site: Site) -> None:
    daemon, _ = make_daemon(site, [])
    for _ in range(1100):
        daemon.emit(scan("camera", "EN:X"))
    assert daemon.scans_dropped == 1100 - 1024
