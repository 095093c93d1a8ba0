"""Every row of docs/policy.md, run through the main job with real codes and a real cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgenode.cache import Cache, import_snapshot
from edgenode.config import Config, parse_config
from edgenode.decoders import create_decoder
from edgenode.journal import Journal
from edgenode.pipeline import Gate, VerdictEvent
from edgenode.policy import ClockReading
from edgenode.snapshot import write_snapshot
from tests.scenarios import (
    ROWS,
    SITE,
    TOKEN_PATTERN,
    DirectMinter,
    Scenario,
    Site,
    TableRow,
    merge_records,
    read_policy_table,
)

TABLE = read_policy_table()


def site_config(state_dir: Path, district_key_b64: str) -> Config:
    return parse_config(
        {
            "device": {
                "id": "gate-test",
                "site": SITE,
                "station": "north",
                "state_dir": str(state_dir),
            },
            "trust": {"district_keys": [district_key_b64]},
            "policy": {"token_patterns": [{"name": "city", "regex": TOKEN_PATTERN}]},
        }
    )


def build_cache(site: Site, scenario: Scenario, config: Config) -> None:
    snapshot = site.folder / "snapshot.ensnap"
    issued_at = site.now - scenario.snapshot_age_s
    from edgenode.district import read_key

    write_snapshot(
        snapshot,
        merge_records(site.base_records(), scenario.extra_records),
        site=SITE,
        version=1,
        issued_at=issued_at,
        valid_until=issued_at + scenario.snapshot_valid_for,
        signing_key=read_key(site.keys["district"]),
    )
    if scenario.import_cache:
        import_snapshot(
            config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
        )


def run_scenario(site: Site, scenario: Scenario) -> list[VerdictEvent]:
    """Feed the scenario's scans into a Gate and return every verdict it recorded."""
    import base64

    key_b64 = base64.b64encode(site.district_public_key()).decode()
    config = site_config(site.folder / "state", key_b64)
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
