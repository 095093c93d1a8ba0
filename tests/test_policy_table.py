"""Every row of docs/policy.md, run through the main job with real codes and a real cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgenode.cache import Cache
from edgenode.decoders import create_decoder
from edgenode.journal import Journal
from edgenode.pipeline import Gate, VerdictEvent
from edgenode.policy import ClockReading
from tests.scenarios import (
    ROWS,
    DirectMinter,
    Scenario,
    Site,
    TableRow,
    build_cache,
    read_policy_table,
    site_config,
)

TABLE = read_policy_table()


def run_scenario(site: Site, scenario: Scenario) -> list[VerdictEvent]:
    """Feed the scenario's scans into a Gate and return every verdict it recorded."""
    config = site_config(site)
    build_cache(site, scenario, config)
    clock_now = [float(site.now + scenario.clock_offset_s)]

    def clock() -> ClockReading:
        return ClockReading(now=clock_now[0], synchronised=scenario.clock_synchronised)

    events: list[VerdictEvent] = []
    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(config, cache, journal, create_decoder("zxing"), clock=clock)
        at = 0.0
        for scan in scenario.scans:
            events += gate.tick(at)
            payloads = [text.encode("ascii") for text in scan]
            events += gate.process_payloads(
                payloads, station="north", at=at, received=time.perf_counter()
            )
            at += scenario.scan_gap_s
            clock_now[0] += scenario.scan_gap_s
        events += gate.tick(at + 3600)
        events += gate.flush(at + 3600)
    return events


def test_table_and_scenarios_list_the_same_rows() -> None:
    assert [row.row for row in TABLE] == list(ROWS)


@pytest.mark.parametrize("row", TABLE, ids=[row.row for row in TABLE])
def test_policy_row_reaches_its_verdict(row: TableRow, tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    events = run_scenario(site, ROWS[row.row](site))
    verdict = events[-1].verdict
    reasons = [str(reason) for reason in verdict.reasons]

    assert verdict.outcome.value == row.verdict, reasons
    assert reasons[0] == row.reasons[0]
    assert set(row.reasons) <= set(reasons)
