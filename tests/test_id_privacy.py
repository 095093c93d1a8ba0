"""An ID number travels from a roster file to a gate check without being stored or logged.

One flow seeds a number. The district imports it through `edgenode district import roster` and
publishes the site's records in a signed snapshot. The gate imports that snapshot, and the
daemon checks the number and a mistyped copy of it. The hub stores the journal records that the
uplink would send. Then every file the flow wrote and everything it logged or printed is
searched for the number's first 17 digits, which the mistyped copy shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from pathlib import Path

import pytest
import structlog

from edgenode.cache import import_snapshot
from edgenode.cli import main
from edgenode.daemon import Daemon
from edgenode.district import read_key
from edgenode.guard_desk import IdCheckError
from edgenode.id_numbers import id_number_hash, write_id_lookup_key
from edgenode.journal import Journal
from edgenode.logs import configure_logging
from edgenode.pipeline import VerdictEvent
from edgenode.policy import Outcome
from edgenode.snapshot import write_snapshot
from sync.feeds import FeedStore
from sync.hub_store import HubStore, parse_records
from sync.publisher import site_records
from sync.uplink import record_body
from tests.scenarios import DAY, PEOPLE, SITE, DirectMinter, Site, site_config
from tests.test_id_check import ID_LOOKUP_KEY, ID_NUMBERS, wrong_check_digit

NUMBER = ID_NUMBERS["alice"]
MISTYPED = wrong_check_digit(NUMBER)
# The second roster row's number has a wrong check digit, so the import rejects that row.
BAD_ROW_NUMBER = wrong_check_digit(ID_NUMBERS["bob"])
TIMEOUT_S = 10


def write_roster(path: Path, now: int) -> None:
    alice, bob = PEOPLE["alice"], PEOPLE["bob"]
    rows = [
        "site,subject,health_subject,姓名,身份证号,building,unit,role,valid_from,valid_until",
        f"{SITE},{alice.subject.hex()},{alice.health_subject.hex()},张三丰,{NUMBER.lower()},"
        f"3,1201,resident,{now - DAY},{now + 365 * DAY}",
        f"{SITE},{bob.subject.hex()},{bob.health_subject.hex()},李四,{BAD_ROW_NUMBER},"
        f"3,1202,resident,{now - DAY},{now + 365 * DAY}",
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def import_roster(district: Path, site: Site) -> tuple[int, str]:
    """Import the roster with the CLI at debug level. Return the exit code and all text."""
    write_id_lookup_key(district / "id-lookup.key", ID_LOOKUP_KEY)
    hub_config = district / "hub.toml"
    hub_config.write_text(
        f'store = "hub.db"\ndistrict_key_file = "{site.keys["district"]}"\n'
        'id_lookup_key_file = "id-lookup.key"\n',
        encoding="utf-8",
    )
    roster = district / "roster.csv"
    write_roster(roster, site.now)
    logs, output = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(logs), contextlib.redirect_stdout(output):
        code = main(
            [
                *("--lang", "en", "--log-level", "debug", "district", "import", "roster"),
                *("--config", str(hub_config), str(roster)),
            ]
        )
    structlog.reset_defaults()
    return code, logs.getvalue() + output.getvalue()


def publish_snapshot(district: Path, site: Site) -> Path:
    """Write the site's published records, with the test site's issuers and statuses."""
    with FeedStore(district / "hub.db") as store:
        records = list(site_records(store, SITE, []).values())
    records += [
        record
        for record in site.base_records()
        if record["dataset"] in ("issuers", "health_status")
    ]
    snapshot = district / "site.ensnap"
    write_snapshot(
        snapshot,
        records,
        site=SITE,
        version=1,
        issued_at=site.now - 600,
        valid_until=site.now + 7 * DAY,
        signing_key=read_key(site.keys["district"]),
    )
    return snapshot


def check_at_gate(site: Site, key_file: Path, snapshot: Path) -> tuple[list[object], str]:
    """Run the daemon, check the number and its mistyped copy, and return results and logs."""
    config = site_config(site, guard={"id_lookup_key_file": str(key_file)})
    import_snapshot(
        config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
    )
    daemon = Daemon(config, [])
    results: list[object] = []

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        results.append(await daemon.check_id_number(NUMBER))
        try:
            await daemon.check_id_number(MISTYPED)
        except IdCheckError as exc:
            results.append(exc)
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    logs = io.StringIO()
    with contextlib.redirect_stderr(logs):
        configure_logging("debug", json_output=True)
        # Opened before the run, as `edgenode run` does, so the checks cannot race the start.
        daemon.open()
        asyncio.run(scenario())
    structlog.reset_defaults()
    return results, logs.getvalue()


def store_at_hub(site: Site, district: Path) -> int:
    """Store the gate's journal records in the hub's store as an uplink batch would."""
    config = site_config(site)
    with Journal(config.journal_path, config.device.id) as journal:
        bodies = [record_body(item, time.time()) for item in journal.unacked_records(100)]
    parsed = parse_records(bodies)
    with HubStore(district / "hub.db") as hub:
        device = hub.register_device(SITE, config.device.id, bytes(32))
        hub.insert_batch(device, parsed.valid, lane="normal", batch_id="batch-1")
    return len(parsed.valid)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[object], int]:
    folder = tmp_path_factory.mktemp("id-privacy")
    site = Site.create(folder, int(time.time()), DirectMinter())
    district = folder / "district"
    district.mkdir()
    code, district_text = import_roster(district, site)
    snapshot = publish_snapshot(district, site)
    results, gate_logs = check_at_gate(site, district / "id-lookup.key", snapshot)
    stored = store_at_hub(site, district)
    return folder, district_text + gate_logs + f"\nimport exit code {code}", results, stored


def test_flow_checks_the_number(flow: tuple[Path, str, list[object], int]) -> None:
    _, _, results, stored = flow
    event = results[0]
    mistyped = results[1]

    assert isinstance(event, VerdictEvent)
    assert event.verdict.outcome == Outcome.ADMIT
    assert event.record.method == "id_number"
    assert isinstance(mistyped, IdCheckError)
    assert mistyped.reason == "id_number_bad_check_digit"
    assert stored == 1


def test_district_stores_the_keyed_hash(flow: tuple[Path, str, list[object], int]) -> None:
    folder, _, _, _ = flow

    with FeedStore(folder / "district" / "hub.db") as store:
        residents = {row.subject: row for row in store.residents(SITE)}

    assert (
        residents[PEOPLE["alice"].subject.hex()].id_hash
        == id_number_hash(ID_LOOKUP_KEY, NUMBER).hex()
    )
    assert PEOPLE["bob"].subject.hex() not in residents


def test_roster_row_with_bad_number_is_rejected(flow: tuple[Path, str, list[object], int]) -> None:
    _, text, _, _ = flow

    assert "import exit code 1" in text
    assert "id_number_bad_check_digit" in text


def test_number_is_in_no_file(flow: tuple[Path, str, list[object], int]) -> None:
    folder, _, _, _ = flow
    searched = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == "roster.csv":
            continue
        content = path.read_bytes()
        searched.append(path.name)
        for number in (NUMBER, BAD_ROW_NUMBER):
            assert number[:17].encode("ascii") not in content, (path, number)

    assert {"hub.db", "cache.db", "journal.db", "site.ensnap"} <= set(searched)


def test_number_is_in_no_log_or_output(flow: tuple[Path, str, list[object], int]) -> None:
    _, text, _, _ = flow

    assert "verdict_recorded" in text
    assert "id_check_rejected" in text
    for number in (NUMBER, BAD_ROW_NUMBER):
        assert number[:17] not in text, number
