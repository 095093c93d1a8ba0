"""Field upkeep of a running gate: SIGHUP reloads, corrupt state files, retention.

The reload and corrupt-file tests run `edgenode run` as a real process with a scanner on a
pseudo-terminal; the alarm test adds a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edgenode.config import load_config
from edgenode.daemon import Daemon
from edgenode.district import read_key
from edgenode.journal import Journal
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from sync.identity import ensure_device_key
from sync.protocol import Topics, decode_message, trusted
from tests.broker import Broker, IngestPeer, broker  # noqa: F401
from tests.scenarios import SITE, DirectMinter, Scenario, Site, build_cache, site_config
from tests.test_run_command import DEADLINE_S, journal_verdicts, wait_for, write_config

DAY = 86_400


@dataclass
class RunningGate:
    site: Site
    config: Path
    master: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def scan(self, codes: list[str]) -> None:
        for code in codes:
            os.write(self.master, code.encode() + b"\r")

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def event_names(self) -> list[str]:
        return [event["event"] for event in self.events()]


def corrupt_header(path: Path) -> None:
    """Overwrite the 16-byte magic string at the start of an SQLite file."""
    with path.open("r+b") as handle:
        handle.write(b"this is no db!!\x00")


def start_gate(site: Site, config: Path, master: int, log_path: Path) -> RunningGate:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gate = RunningGate(site, config, master, process, log_path)
    wait_for(lambda: b"source_connected" in log_path.read_bytes(), "the scanner to open")
    return gate


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    build_cache(site, Scenario([]), site_config(site))
    return site


def stop(gate: RunningGate) -> int:
    if gate.process.poll() is None:
        gate.process.send_signal(signal.SIGTERM)
    try:
        return gate.process.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        gate.process.kill()
        gate.process.wait(timeout=DEADLINE_S)
        raise


# --- SIGHUP ---


def set_yellow(config: Path, action: str) -> None:
    text = config.read_text(encoding="utf-8")
    if "[policy]" not in text:
        text = text.replace("[clock]", '[policy]\nyellow = "review"\n\n[clock]')
    lines = [
        f'yellow = "{action}"' if line.startswith("yellow = ") else line
        for line in text.splitlines()
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_sighup_applies_new_policy_and_rejects_invalid(
    site: Site, pty_pair: tuple[int, str], tmp_path: Path
) -> None:
    master, serial_path = pty_pair
    config = write_config(site, serial_path)
    set_yellow(config, "review")
    journal = site.folder / "state" / "journal.db"
    gate = start_gate(site, config, master, tmp_path / "daemon.log")
    try:
        gate.scan(site.pair("alice", colour="yellow"))
        wait_for(lambda: journal_verdicts(journal) == ["review"], "the first verdict")

        set_yellow(config, "deny")
        gate.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in gate.event_names(), "the reload")
        gate.scan(site.pair("bob", colour="yellow"))
        wait_for(lambda: len(journal_verdicts(journal)) == 2, "the second verdict")

        # Admitting a yellow status is invalid: the file is rejected and "deny" stays.
        set_yellow(config, "admit")
        gate.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reload_rejected" in gate.event_names(), "the rejection")
        gate.scan(site.pair("visitor", colour="yellow"))
        wait_for(lambda: len(journal_verdicts(journal)) == 3, "the third verdict")
    finally:
        exit_code = stop(gate)

    rejected = [event for event in gate.events() if event["event"] == "config_reload_rejected"]
    assert exit_code == 0
    assert journal_verdicts(journal) == ["review", "deny", "deny"]
    assert any(issue.startswith("policy.yellow:") for issue in rejected[0]["issues"])
    assert "scan_dropped" not in gate.event_names()


def test_reload_ignores_sections_needing_restart(
    site: Site, pty_pair: tuple[int, str], tmp_path: Path
) -> None:
    master, serial_path = pty_pair
    config = write_config(site, serial_path)
    gate = start_gate(site, config, master, tmp_path / "daemon.log")
    try:
        text = config.read_text(encoding="utf-8").replace('station = "north"', 'station = "south"')
        config.write_text(text, encoding="utf-8")
        gate.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in gate.event_names(), "the reload")
        gate.scan(site.pair())
        journal = site.folder / "state" / "journal.db"
        wait_for(lambda: journal_verdicts(journal) == ["admit"], "the verdict")
    finally:
        exit_code = stop(gate)

    restart = [e for e in gate.events() if e["event"] == "config_reload_needs_restart"]
    stations = [e["station"] for e in gate.events() if e["event"] == "verdict_recorded"]
    assert exit_code == 0
    assert restart[0]["sections"] == ["device"]
    assert stations == ["north"]


# --- corrupt files at start ---


def test_corrupt_journal_is_moved_aside_and_gate_runs(
    site: Site, pty_pair: tuple[int, str], tmp_path: Path
) -> None:
    master, serial_path = pty_pair
    config = write_config(site, serial_path)
    journal = site.folder / "state" / "journal.db"
    with Journal(journal, "gate-run") as old:
        old.append_verdict(
            Verdict(Outcome.DENY, (Reason.HEALTH_RED,)),
            station="north",
            recorded_at=time.time(),
            latency_ms=1.0,
        )
    corrupt_header(journal)
    damaged = journal.read_bytes()

    gate = start_gate(site, config, master, tmp_path / "daemon.log")
    try:
        gate.scan(site.pair())
        wait_for(lambda: journal_verdicts(journal) == ["admit"], "a verdict in the fresh journal")
    finally:
        exit_code = stop(gate)

    moved = [
        path
        for path in (site.folder / "state").glob("journal.db.corrupt-*")
        if not path.name.endswith(("-wal", "-shm", "-journal"))
    ]
    assert exit_code == 0
    assert [path.read_bytes() for path in moved] == [damaged]
    assert "journal_corrupt" in gate.event_names()


def test_corrupt_cache_is_moved_aside_and_gate_runs(
    site: Site, pty_pair: tuple[int, str], tmp_path: Path
) -> None:
    master, serial_path = pty_pair
    config = write_config(site, serial_path)
    cache = site.folder / "state" / "cache.db"
    corrupt_header(cache)

    gate = start_gate(site, config, master, tmp_path / "daemon.log")
    try:
        gate.scan(site.pair())
        journal = site.folder / "state" / "journal.db"
        # With no cache the gate cannot admit, but it still decides and records.
        wait_for(lambda: len(journal_verdicts(journal)) == 1, "a verdict on an empty cache")
        verdicts = journal_verdicts(journal)
    finally:
        exit_code = stop(gate)

    assert exit_code == 0
    assert verdicts != ["admit"]
    assert len(list((site.folder / "state").glob("cache.db.corrupt-*"))) == 1
    assert "cache_corrupt" in gate.event_names()


def write_sync_config(site: Site, serial_path: str, target: Broker) -> Path:
    config = write_config(site, serial_path)
    text = config.read_text(encoding="utf-8")
    sync = (
        f'[sync]\nenabled = true\nbroker_host = "{target.host}"\n'
        f"broker_port = {target.port}\nkeepalive_s = 5\nack_timeout_s = 3\n\n[clock]"
    )
    config.write_text(text.replace("[clock]", sync), encoding="utf-8")
    return config


@pytest.mark.parametrize("damaged", ["journal", "cache"])
def test_corrupt_file_alarm_reaches_district(
    site: Site,
    pty_pair: tuple[int, str],
    tmp_path: Path,
    broker: Broker,  # noqa: F811
    damaged: str,
) -> None:
    master, serial_path = pty_pair
    config_path = write_sync_config(site, serial_path, broker)
    config = load_config(config_path)
    device_key = ensure_device_key(config.device_key_path)
    Journal(config.journal_path, config.device.id).close()
    corrupt_header(config.device.state_dir / f"{damaged}.db")
    requests: list[dict[str, Any]] = []

    async def on_request(message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        requests.append(decode_message(message.payload, trusted(bytes(device_key.verify_key))))

    async def scenario() -> IngestPeer:
        peer = IngestPeer(
            broker,
            site=SITE,
            device=config.device.id,
            device_public_key=bytes(device_key.verify_key),
            district_key=read_key(site.keys["district"]),
        )
        peer.connection.subscribe(Topics(SITE, config.device.id).requests, on_request)
        peer_task = asyncio.create_task(peer.connection.run())
        gate = await asyncio.to_thread(
            start_gate, site, config_path, master, tmp_path / "daemon.log"
        )
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not peer.alarms and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while damaged == "cache" and not requests and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(stop, gate)
            peer_task.cancel()
            await asyncio.gather(peer_task, return_exceptions=True)
        return peer

    peer = asyncio.run(scenario())
    alarm = peer.alarms[0] if peer.alarms else {}
    assert alarm.get("alarm") == "file_corrupt"
    assert alarm.get("file") == damaged
    assert str(alarm.get("moved_to", "")).startswith(f"{damaged}.db.corrupt-")
    if damaged == "cache":
        # With no data left, the gate requests a full snapshot from the district.
        assert [request.get("what") for request in requests] == ["snapshot"]


# --- retention ---


def test_daemon_purges_expired_acked_records(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    now = time.time()
    with Journal(config.journal_path, config.device.id) as journal:
        old = [
            journal.append_verdict(
                Verdict(Outcome.DENY, (Reason.HEALTH_RED,)),
                station="north",
                recorded_at=now - (40 - n) * DAY,
                latency_ms=1.0,
            ).seq
            for n in range(3)
        ]
        journal.mark_acked(old, now)
        journal.append_verdict(
            Verdict(Outcome.DENY, (Reason.HEALTH_RED,)),
            station="north",
            recorded_at=now,
            latency_ms=1.0,
        )

    def remaining() -> int:
        conn = sqlite3.connect(config.journal_path)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        finally:
            conn.close()

    async def run() -> None:
        daemon = Daemon(config, [])
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + DEADLINE_S
        while remaining() != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        daemon.stop()
        await asyncio.wait_for(task, DEADLINE_S)

    asyncio.run(run())
    with Journal(config.journal_path, config.device.id) as journal:
        anchor = journal.anchor()
        problems = journal.verify()
    assert remaining() == 1
    assert anchor.seq == 3
    assert problems == []
