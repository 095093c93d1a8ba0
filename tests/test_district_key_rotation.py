"""District-key rotation: the keyring, the announcement and the gates that follow the switch.

The end-to-end tests run a real hub and real gate parts (downlink, uplink, SQLite cache) over a
real Mosquitto broker (tests/broker.py). Every part shares one clock that the test moves, so
the switch half-way through the overlap happens without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sqlite3
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from edgenode.cache import SCHEMA_VERSION, import_snapshot
from edgenode.codes import key_id_for
from edgenode.config import SyncConfig
from edgenode.district import KEY_FILES, read_key, write_key
from edgenode.district_keyring import (
    DISTRICT_KEYRING_FILE,
    DistrictSigner,
    announced_district_keys,
    load_district_keyring,
    rotate_district_key,
)
from edgenode.district_keys import NO_END, KeyringError
from edgenode.district_trust import DistrictTrust
from edgenode.i18n import translator
from edgenode.journal import Journal
from sync.connection import Connection
from sync.delta import apply_delta, read_delta_header
from sync.downlink import Downlink
from sync.feed_backend import open_feed_store
from sync.feeds import import_roster
from sync.hub import Hub
from sync.hub_store import HubStore
from sync.identity import ensure_device_key
from sync.publisher import Publisher, read_issuer_keys
from sync.uplink import STATE_FILE_NAME, Uplink
from tests import test_decommission as decommission_test
from tests.broker import ADMIT, Broker, broker

__all__ = ["broker"]

DAY_S = 86_400
OVERLAP_S = 2 * DAY_S
WAIT_S = 20.0
ROSTER_HEADER = (
    "site,subject,health_subject,name,id_number,building,unit,role,valid_from,valid_until\n"
)


class NoBroker:
    """The publisher's connection, never used: these tests build files and apply them."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        raise AssertionError("this test does not send")


class Clock:
    """A clock the test moves forward, shared by the hub and the gates."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def make_key_folder(folder: Path) -> Path:
    folder.mkdir()
    for name in KEY_FILES.values():
        write_key(folder / name, SigningKey.generate())
    return folder


def public(key_file: Path) -> bytes:
    return bytes(read_key(key_file).verify_key)


def cached_district_keys(cache_path: Path) -> set[str]:
    conn = sqlite3.connect(cache_path)
    try:
        return {bytes(row[0]).hex() for row in conn.execute("SELECT key_id FROM district_keys")}
    finally:
        conn.close()


class District:
    """One site's feed store, key folder and publisher, signing with the keyring's current key."""

    def __init__(self, folder: Path, clock: Clock, site: str | None = None) -> None:
        self.folder = folder
        self.clock = clock
        self.site = site or f"XH-{secrets.token_hex(3)}"
        self.keys = make_key_folder(folder / "keys")
        self.key_file = self.keys / KEY_FILES["district"]
        self.store_path = folder / "hub.db"
        self.store = open_feed_store(self.store_path)
        roster = folder / "roster.csv"
        roster.write_text(
            ROSTER_HEADER + f"{self.site},{'0a' * 16},{'0b' * 16},张三丰,110101199003071234,3,"
            "1-502,resident,2026-01-01,2036-01-01\n",
            encoding="utf-8",
        )
        assert import_roster(self.store, roster).errors == []
        self.signer = DistrictSigner(self.key_file, clock)

    def publisher(self, connection: Any) -> Publisher:
        return Publisher(
            self.store,
            connection,
            district_key=self.signer,
            issuers=lambda now: read_issuer_keys(self.keys, now),
            district_keys=lambda now: announced_district_keys(self.key_file, now),
            clock=self.clock,
            chunk_size=512,
        )

    def add_resident(self) -> None:
        """Change the roster, so the next delta has a record besides the key announcement."""
        subject = secrets.token_hex(16)
        roster = self.folder / f"roster-{subject[:6]}.csv"
        roster.write_text(
            ROSTER_HEADER + f"{self.site},{'0a' * 16},{'0b' * 16},张三丰,110101199003071234,3,"
            f"1-502,resident,2026-01-01,2036-01-01\n{self.site},{subject},{subject[::-1]},李四,"
            ",3,1-503,resident,2026-01-01,2036-01-01\n",
            encoding="utf-8",
        )
        assert import_roster(self.store, roster).errors == []


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {description}")
        await asyncio.sleep(0.05)


class RunningGate:
    """A gate's downlink and uplink on their own connection, sharing one DistrictTrust."""

    def __init__(self, target: Broker, district: District, name: str) -> None:
        self.device = name
        self.state_dir = district.folder / name
        self.state_dir.mkdir()
        self.cache_path = self.state_dir / "cache.db"
        self.journal_path = self.state_dir / "journal.db"
        self.device_key = ensure_device_key(self.state_dir / "device.key")

        self.sync = SyncConfig(
            enabled=True,
            broker_host=target.host,
            broker_port=target.port,
            keepalive_s=5,
            reconnect_max_s=1.0,
            ack_timeout_s=2.0,
            drain_records_per_s=1_000_000,
        )
        with HubStore(district.store_path) as store:
            store.register_device(district.site, name, bytes(self.device_key.verify_key))

        # The gate's config lists only the district key it was provisioned with.
        self.trust = DistrictTrust([public(district.key_file)], self.cache_path, district.clock)
        self.connection = Connection(self.sync, site=district.site, device=name, backoff_base_s=0.1)
        self.downlink = Downlink(
            self.connection,
            site=district.site,
            device=name,
            cache_path=self.cache_path,
            state_dir=self.state_dir,
            district_keys=self.trust,
            signing_key=self.device_key,
            clock=district.clock,
        )
        self.uplink = Uplink(
            self.connection,
            self.journal_path,
            device_key=self.device_key,
            district_keys=self.trust,
            sync=self.sync,
            state_path=self.state_dir / STATE_FILE_NAME,
            clock=district.clock,
        )

    def coroutines(self) -> list[Awaitable[None]]:
        return [self.connection.run(), self.downlink.run(), self.uplink.run()]

    def record_verdict(self) -> None:
        with Journal(self.journal_path, self.device) as journal:
            journal.append_verdict(
                ADMIT,
                station="north",
                recorded_at=time.time(),
                latency_ms=2.0,
            )

    def backlog(self) -> int:
        with Journal(self.journal_path, self.device) as journal:
            return journal.backlog_count()


def run_with(district: District, target: Broker, gates: list[RunningGate], scenario: Any) -> None:
    """Run a real hub with a publisher and the gates, then ``scenario(hub)``, within 60 s."""

    async def main() -> None:
        hub = Hub(
            SyncConfig(
                enabled=True, broker_host=target.host, broker_port=target.port, keepalive_s=5
            ),
            store_path=district.store_path,
            district_key=district.signer,
            hub_id=f"test-{secrets.token_hex(3)}",
            clock=district.clock,
        )
        hub.publisher = district.publisher(hub.connection)
        coroutines = [hub.run()] + [c for gate in gates for c in gate.coroutines()]
        tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
        try:
            await wait_until(
                lambda: hub.connection.connected and all(g.connection.connected for g in gates),
                "hub and gates connected",
            )
            await scenario(hub)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_gate_follows_switch_to_new_key(broker: Broker, tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock)
    gate = RunningGate(broker, district, "gate-01")
    new_key_id: list[str] = []

    async def scenario(hub: Hub) -> None:
        assert hub.publisher is not None
        await hub.publisher.publish(district.site)
        await wait_until(lambda: gate.downlink.status()["version"] == 1, "snapshot 1 applied")

        rotation = rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()))
        new_key_id.append(rotation.new.key_id)
        await hub.publisher.publish(district.site)
        await wait_until(lambda: gate.downlink.status()["version"] == 2, "delta 2 applied")
        assert rotation.new.key_id in cached_district_keys(gate.cache_path)

        clock.now += OVERLAP_S // 2 + 60
        district.add_resident()
        transfer = await hub.publisher.publish(district.site)
        delta = district.folder / "delta-3"
        delta.write_bytes(transfer.data)
        new_public = bytes.fromhex(rotation.new.public_key)
        assert read_delta_header(delta, [new_public]).key_id == rotation.new.key_id
        await wait_until(lambda: gate.downlink.status()["version"] == 3, "delta 3 applied")

        gate.record_verdict()
        await wait_until(lambda: gate.backlog() == 0, "batch signed-off by the new key")

    run_with(district, broker, [gate], scenario)
    new_public = bytes.fromhex(load_district_keyring(district.key_file)[-1].public_key)
    assert bytes(district.signer().verify_key) == new_public
    assert gate.downlink.rejections == {}
    assert gate.uplink.rejected_acks == {}
    assert new_public in gate.trust.public_keys()
    assert key_id_for(new_public).hex() == new_key_id[0]


def test_gate_without_announcement_rejects_new_key(broker: Broker, tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock)
    gate = RunningGate(broker, district, "gate-02")
    # The gate took version 1 before the rotation, then was offline past the switch.
    publisher = district.publisher(NoBroker())
    first = publisher.build(district.site)
    first_file = tmp_path / "snapshot-1"
    first_file.write_bytes(first.data)
    import_snapshot(gate.cache_path, first_file, gate.trust.public_keys(), site=district.site)
    rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()))
    publisher.build(district.site)
    clock.now += OVERLAP_S // 2 + 60
    district.add_resident()

    async def scenario(hub: Hub) -> None:
        assert hub.publisher is not None
        await hub.publisher.publish(district.site)
        await wait_until(lambda: gate.downlink.rejections["unknown_signer"] > 0, "dataset rejected")
        gate.record_verdict()
        await wait_until(
            lambda: gate.uplink.rejected_acks.get("unknown_signer", 0) > 0, "ack rejected"
        )

    with capture_logs() as logs:
        run_with(district, broker, [gate], scenario)
    rejected = next(
        entry
        for entry in logs
        if entry["event"] == "dataset_rejected" and entry["reason"] == "unknown_signer"
    )
    assert "trust.district_keys" in rejected["advice"]
    assert rejected["trusted_keys"] == key_id_for(gate.trust.anchors[0]).hex()
    assert gate.downlink.status()["version"] == 1
    assert gate.backlog() == 1


def test_decommission_confirmed_by_new_key(broker: Broker, tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock, site=decommission_test.SITE)
    config = decommission_test.write_gate(tmp_path, read_key(district.key_file), broker)
    device_key = ensure_device_key(tmp_path / "state" / "device.key")
    with HubStore(district.store_path) as store:
        store.register_device(
            district.site, decommission_test.DEVICE, device_key.verify_key.encode()
        )
    rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()))
    snapshot = tmp_path / "snapshot"
    snapshot.write_bytes(district.publisher(NoBroker()).build(district.site).data)
    anchors = [public(district.key_file)]
    import_snapshot(tmp_path / "state" / "cache.db", snapshot, anchors, site=district.site)
    # Only the hub's clock passes the switch. The gate's cached key is valid from the rotation.
    clock.now += OVERLAP_S // 2 + 60

    async def main() -> subprocess.CompletedProcess[str]:
        hub = Hub(
            SyncConfig(enabled=True, broker_host=broker.host, broker_port=broker.port),
            store_path=district.store_path,
            district_key=district.signer,
            hub_id=f"test-{secrets.token_hex(3)}",
        )
        hub_task = asyncio.create_task(hub.run())
        try:
            await wait_until(lambda: hub.connection.connected, "hub connected")
            return await asyncio.to_thread(
                decommission_test.decommission, config, "--yes", timeout_s=WAIT_S
            )
        finally:
            hub_task.cancel()
            await asyncio.gather(hub_task, return_exceptions=True)

    result = asyncio.run(asyncio.wait_for(main(), 90))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The district disabled gate" in result.stdout
    assert bytes(district.signer().verify_key) not in anchors


# --- keyring ---


def test_rotation_records_times_in_keyring(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    key_file = keys / KEY_FILES["district"]
    rotation = rotate_district_key(key_file, overlap_s=OVERLAP_S, now=1_800_000_000)

    assert rotation.old.file == KEY_FILES["district"]
    assert rotation.old.valid_until == 1_800_000_000 + OVERLAP_S
    assert rotation.new.valid_from == 1_800_000_000
    assert rotation.new.signs_from == 1_800_000_000 + OVERLAP_S // 2
    assert rotation.new.valid_until == NO_END
    saved = json.loads((keys / DISTRICT_KEYRING_FILE).read_text(encoding="utf-8"))
    assert [entry["file"] for entry in saved["keys"]] == ["district.key", rotation.new.file]


def test_rotation_file_modes(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    rotation = rotate_district_key(keys / "district.key", overlap_s=OVERLAP_S, now=1_800_000_000)

    assert stat.S_IMODE(os.stat(keys / rotation.new.file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys / DISTRICT_KEYRING_FILE).st_mode) == 0o644


def test_second_district_rotation_during_overlap_rejected(tmp_path: Path) -> None:
    key_file = make_key_folder(tmp_path / "keys") / "district.key"
    rotate_district_key(key_file, overlap_s=OVERLAP_S, now=1_800_000_000)

    with pytest.raises(KeyringError, match="after the overlap ends"):
        rotate_district_key(key_file, overlap_s=OVERLAP_S, now=1_800_000_000 + OVERLAP_S)
    later = rotate_district_key(key_file, overlap_s=OVERLAP_S, now=1_800_000_001 + OVERLAP_S)
    assert later.new.valid_from == 1_800_000_001 + OVERLAP_S
    assert len(load_district_keyring(key_file)) == 3


def test_zero_overlap_rejected(tmp_path: Path) -> None:
    key_file = make_key_folder(tmp_path / "keys") / "district.key"

    with pytest.raises(KeyringError, match="overlap"):
        rotate_district_key(key_file, overlap_s=0, now=1_800_000_000)
    assert not (key_file.parent / DISTRICT_KEYRING_FILE).exists()


def test_signer_switches_half_way(tmp_path: Path) -> None:
    key_file = make_key_folder(tmp_path / "keys") / "district.key"
    clock = Clock()
    signer = DistrictSigner(key_file, clock)
    old_public = public(key_file)
    assert bytes(signer().verify_key) == old_public

    rotation = rotate_district_key(key_file, overlap_s=OVERLAP_S, now=int(clock()))
    assert bytes(signer().verify_key) == old_public
    clock.now = rotation.new.signs_from
    assert bytes(signer().verify_key).hex() == rotation.new.public_key


def test_announced_keys_before_and_after_overlap(tmp_path: Path) -> None:
    key_file = make_key_folder(tmp_path / "keys") / "district.key"
    assert announced_district_keys(key_file, 1_800_000_000) == []

    rotation = rotate_district_key(key_file, overlap_s=OVERLAP_S, now=1_800_000_000)
    during = {entry.key_id for entry in announced_district_keys(key_file, 1_800_000_001)}
    after = {entry.key_id for entry in announced_district_keys(key_file, 1_800_000_001 + OVERLAP_S)}
    assert during == {rotation.old.key_id, rotation.new.key_id}
    assert after == {rotation.new.key_id}


# --- publishing and the gate's cache ---


def test_header_lists_district_keys_only_after_rotation(tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock)
    publisher = district.publisher(NoBroker())

    before = publisher.build(district.site)
    rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()))
    after = publisher.build(district.site)
    assert b"district_keys" not in before.data
    assert b"district_keys" in after.data


def test_delta_adds_keys_to_older_cache(tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock)
    publisher = district.publisher(NoBroker())
    anchors = [public(district.key_file)]
    cache_path = tmp_path / "cache.db"
    snapshot = tmp_path / "snapshot"
    snapshot.write_bytes(publisher.build(district.site).data)
    import_snapshot(cache_path, snapshot, anchors, site=district.site, now=clock())
    # Make the cache a schema-2 cache, as a gate running the previous release has.
    conn = sqlite3.connect(cache_path)
    conn.execute("DROP TABLE district_keys")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    trust = DistrictTrust(anchors, cache_path, clock)
    assert trust.public_keys() == anchors

    rotation = rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()))
    delta = tmp_path / "delta"
    delta.write_bytes(publisher.build(district.site).data)
    apply_delta(cache_path, delta, anchors, site=district.site, now=clock())
    assert cached_district_keys(cache_path) == {rotation.old.key_id, rotation.new.key_id}
    assert trust.public_keys() == [*anchors, bytes.fromhex(rotation.new.public_key)]
    conn = sqlite3.connect(cache_path)
    (schema,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert int(schema) == SCHEMA_VERSION


def test_cached_key_trusted_only_in_validity(tmp_path: Path) -> None:
    clock = Clock()
    district = District(tmp_path, clock)
    publisher = district.publisher(NoBroker())
    anchors = [public(district.key_file)]
    rotate_district_key(district.key_file, overlap_s=OVERLAP_S, now=int(clock()) + 600)
    snapshot = tmp_path / "snapshot"
    snapshot.write_bytes(publisher.build(district.site).data)
    cache_path = tmp_path / "cache.db"
    import_snapshot(cache_path, snapshot, anchors, site=district.site, now=clock())
    trust = DistrictTrust(anchors, cache_path, clock)

    # The announcement was written with a valid_from 600 s ahead of the clock.
    assert trust.public_keys() == anchors
    clock.now += 600
    assert len(trust.public_keys()) == 2


# --- command line ---


def hub_config(tmp_path: Path, keys: Path) -> Path:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{tmp_path / "hub.db"}"\ndistrict_key_file = "{keys / "district.key"}"\n',
        encoding="utf-8",
    )
    return config


def run_keys_command(argv: list[str], language: str) -> int:
    from edgenode.enroll_cli import add_district_commands

    parser = argparse.ArgumentParser()
    add_district_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator(language)
    result: int = args.handler(args)
    return result


@pytest.mark.parametrize(
    ("language", "created", "state"),
    [("zh_CN", "新的街道密钥", "已公布"), ("en", "New district key", "announced")],
)
def test_keys_rotate_district_command(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    language: str,
    created: str,
    state: str,
) -> None:
    keys = make_key_folder(tmp_path / "keys")
    config = hub_config(tmp_path, keys)
    rotate = ["keys", "rotate", "--config", str(config), "--role", "district"]

    assert run_keys_command([*rotate, "--overlap-days", "4"], language) == 0
    assert run_keys_command(["keys", "show", "--config", str(config)], language) == 0
    output = capsys.readouterr().out
    assert created in output
    assert state in output


def test_keys_rotate_district_twice_rejected(tmp_path: Path) -> None:
    from edgenode.district_cli import DistrictError

    keys = make_key_folder(tmp_path / "keys")
    config = hub_config(tmp_path, keys)
    rotate = ["keys", "rotate", "--config", str(config), "--role", "district"]
    assert run_keys_command(rotate, "en") == 0

    with pytest.raises(DistrictError, match="rotate again after the overlap ends"):
        run_keys_command(rotate, "en")


def test_keys_show_json_lists_district_public_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = make_key_folder(tmp_path / "keys")
    config = hub_config(tmp_path, keys)
    rotate = ["keys", "rotate", "--config", str(config), "--role", "district"]
    assert run_keys_command(rotate, "en") == 0
    capsys.readouterr()

    assert run_keys_command(["keys", "show", "--config", str(config), "--json"], "en") == 0
    rows = json.loads(capsys.readouterr().out)["keys"]
    district = [row for row in rows if row["role"] == "district"]
    new_entry = load_district_keyring(keys / "district.key")[-1]
    assert [row["state"] for row in district] == ["in use", "announced"]
    assert district[1]["public_key"] == base64.b64encode(
        bytes.fromhex(new_entry.public_key)
    ).decode("ascii")
