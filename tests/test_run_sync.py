"""`edgenode run` with sync enabled: verdicts reach the district, datasets reach the gate."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgenode.config import load_config
from edgenode.district import read_key
from edgenode.snapshot import write_snapshot
from sync.downlink import chunk_messages
from sync.identity import ensure_device_key
from sync.protocol import Topics
from tests.broker import Broker, IngestPeer, broker  # noqa: F401 - the fixture
from tests.scenarios import SITE, DirectMinter, Scenario, Site, build_cache, merge_records

pytestmark = pytest.mark.slow
DEADLINE_S = 30


def cache_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT MAX(version) FROM datasets").fetchone()[0] or 0)
    finally:
        conn.close()


def write_config(site: Site, serial_path: str, target: Broker) -> Path:
    key = base64.b64encode(site.district_public_key()).decode()
    path = site.folder / "edgenode.toml"
    path.write_text(
        f"""
[device]
id = "gate-sync"
site = "{SITE}"
station = "north"
state_dir = "state"

[trust]
district_keys = ["{key}"]

# The test machine's NTP state varies, so these gates declare a battery-backed clock.
[clock]
ntp_source = "rtc"

[sync]
enabled = true
broker_host = "{target.host}"
broker_port = {target.port}
keepalive_s = 5
ack_timeout_s = 3

[[sources]]
type = "serial"
name = "scanner"
device = "{serial_path}"
""",
        encoding="utf-8",
    )
    return path


def test_run_syncs_both_ways(tmp_path: Path, broker: Broker) -> None:  # noqa: F811
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    master, slave = os.openpty()
    config_path = write_config(site, os.ttyname(slave), broker)
    config = load_config(config_path)
    build_cache(site, Scenario([]), config)
    device_key = ensure_device_key(config.device_key_path)
    district_key = read_key(site.keys["district"])

    async def scenario() -> tuple[IngestPeer, int]:
        peer = IngestPeer(
            broker,
            site=SITE,
            device="gate-sync",
            device_public_key=bytes(device_key.verify_key),
            district_key=district_key,
        )
        peer_task = asyncio.create_task(peer.connection.run())
        process = subprocess.Popen(
            [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "daemon.log").open("wb"),
        )
        try:
            await wait_until(lambda: b"broker_connected" in (tmp_path / "daemon.log").read_bytes())
            for who in ("alice", "bob"):
                for code in site.pair(who):
                    os.write(master, code.encode() + b"\r")
            await wait_until(lambda: len(peer.stored) >= 2)

            # The district publishes version 2 of the site's data.
            snapshot = tmp_path / "v2.ensnap"
            write_snapshot(
                snapshot,
                merge_records(site.base_records(), []),
                site=SITE, version=2, issued_at=site.now, valid_until=site.now + 86_400,
                signing_key=district_key,
            )  # fmt: skip
            messages = chunk_messages(
                snapshot.read_bytes(), site=SITE, kind="snapshot", version=2, base_version=None,
                transfer_id="t-2", signing_key=district_key,
            )  # fmt: skip
            await peer.connection.wait_connected()
            for message in messages:
                await peer.connection.publish(Topics(SITE, "gate-sync").datasets, message)
            await wait_until(lambda: cache_version(config.cache_path) == 2)
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, DEADLINE_S)
        finally:
            if process.poll() is None:
                process.kill()
            peer_task.cancel()
            await asyncio.gather(peer_task, return_exceptions=True)
        return peer, code

    try:
        peer, exit_code = asyncio.run(scenario())
    finally:
        os.close(master)
        os.close(slave)
    assert exit_code == 0
    assert sorted(peer.stored) == [1, 2]
    assert [peer.stored[seq]["verdict"] for seq in (1, 2)] == ["admit", "admit"]
    assert peer.chain_problems() == []
    assert peer.duplicates == 0


async def wait_until(condition: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)
