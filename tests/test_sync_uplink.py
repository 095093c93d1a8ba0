"""The uplink against a real Mosquitto broker and an ingest peer in place of the district hub.

Every scenario ends by checking that each recorded verdict is at the ingest exactly once and
that the stored records form one hash chain from seq 1 without gaps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from nacl.signing import SigningKey

from edgenode.config import SyncConfig, load_config
from edgenode.i18n import translator
from edgenode.journal import Journal
from edgenode.sync_cli import collect_status, format_status
from sync.connection import Connection
from sync.identity import DeviceKeyError, ensure_device_key
from sync.protocol import encode_message
from sync.uplink import STATE_FILE_NAME, TEST_KILL_ENV, Uplink, expand_ranges, seq_ranges
from tests.broker import ADMIT, DENY, Broker, IngestPeer, broker

__all__ = ["broker"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Gate:
    """One gate's files and keys, and the sync settings its tests use."""

    site: str
    device: str
    journal_path: Path
    state_dir: Path
    device_key: SigningKey
    district_key: SigningKey
    sync: SyncConfig

    def append(self, count: int, *, deny_at: set[int] | None = None) -> None:
        with Journal(self.journal_path, self.device) as journal:
            for n in range(count):
                verdict = DENY if deny_at and n in deny_at else ADMIT
                journal.append_verdict(
                    verdict, station="north", recorded_at=time.time(), latency_ms=2.0
                )

    def backlog(self) -> int:
        with Journal(self.journal_path, self.device) as journal:
            return journal.backlog_count()

    def ingest(self, target: Broker) -> IngestPeer:
        return IngestPeer(
            target,
            site=self.site,
            device=self.device,
            device_public_key=bytes(self.device_key.verify_key),
            district_key=self.district_key,
        )

    def uplink(self, connection: Connection, **kwargs: Any) -> Uplink:
        return Uplink(
            connection,
            self.journal_path,
            device_key=self.device_key,
            district_keys=[bytes(self.district_key.verify_key)],
            sync=self.sync,
            state_path=self.state_dir / STATE_FILE_NAME,
            **kwargs,
        )

    def connection(self) -> Connection:
        return Connection(self.sync, site=self.site, device=self.device, backoff_base_s=0.1)


def make_gate(tmp_path: Path, target: Broker, site: str, **overrides: Any) -> Gate:
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "enabled": True,
        "broker_host": target.host,
        "broker_port": target.port,
        "keepalive_s": 5,
        "reconnect_max_s": 1.0,
        "batch_max_records": 200,
        "drain_records_per_s": 1_000_000,
        "ack_timeout_s": 2.0,
    }
    values.update(overrides)
    return Gate(
        site=site,
        device="gate-01",
        journal_path=state_dir / "journal.db",
        state_dir=state_dir,
        device_key=ensure_device_key(state_dir / "device.key"),
        district_key=SigningKey.generate(),
        sync=SyncConfig.model_validate(values),
    )


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@asynccontextmanager
async def running(*coroutines: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result


def assert_delivered_once(gate: Gate, ingest: IngestPeer, total: int) -> None:
    assert sorted(ingest.stored) == list(range(1, total + 1))
    assert ingest.chain_problems() == []
    assert gate.backlog() == 0


# --- the journal outbox ---


def test_outbox_pages_unacked_in_order(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        for _ in range(5):
            journal.append_verdict(ADMIT, station="n", recorded_at=100.0, latency_ms=1.0)
        assert journal.mark_acked([2, 4], acked_at=200.0) == 2
        page = journal.unacked_records(10)
        assert [item.record.seq for item in page] == [1, 3, 5]
        assert [item.record.seq for item in journal.unacked_records(1, after_seq=1)] == [3]
        assert journal.backlog_count() == 3
        oldest = journal.oldest_unacked()
        assert oldest is not None
        assert oldest.seq == 1
        assert journal.last_ack_at() == 200.0


def test_outbox_acks_only_existing_records(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        journal.append_verdict(ADMIT, station="n", recorded_at=100.0, latency_ms=1.0)
        assert journal.mark_acked([1, 2, 99], acked_at=200.0) == 1
        assert journal.mark_acked([1], acked_at=300.0) == 0
        assert journal.last_ack_at() == 200.0
        assert journal.backlog_count() == 0


def test_outbox_acks_keep_chain_intact(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        for _ in range(3):
            journal.append_verdict(DENY, station="n", recorded_at=100.0, latency_ms=1.0)
        journal.mark_acked([1, 2, 3], acked_at=200.0)
        assert journal.verify() == []
        assert journal.oldest_unacked() is None


def test_outbox_deny_lane_filter(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", "gate-01") as journal:
        for verdict in (ADMIT, DENY, ADMIT, DENY):
            journal.append_verdict(verdict, station="n", recorded_at=100.0, latency_ms=1.0)
        denies = journal.unacked_records(10, deny_only=True)
        assert [item.record.seq for item in denies] == [2, 4]


def test_seq_ranges_round_trip() -> None:
    seqs = {1, 2, 3, 7, 9, 10}
    assert seq_ranges(seqs) == [[1, 3], [7, 7], [9, 10]]
    assert expand_ranges(seq_ranges(seqs), limit=100) == seqs
    with pytest.raises(ValueError):
        expand_ranges([[5, 1]], limit=100)
    with pytest.raises(ValueError):
        expand_ranges([[1, 1_000_000]], limit=100)


# --- the device key ---


def test_device_key_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "device.key"
    key = ensure_device_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes(ensure_device_key(path)) == bytes(key)


def test_device_key_world_readable_rejected(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    ensure_device_key(path)
    path.chmod(0o644)
    with pytest.raises(DeviceKeyError, match="chmod 600"):
        ensure_device_key(path)


# --- delivery ---


def test_uplink_delivers_each_record_once(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-once")
    gate.append(1_000)
    ingest = gate.ingest(broker)

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: len(ingest.stored) == 1_000, 30, "all records")
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")
            status = await uplink.refresh_status()
            assert status.connection_state == "connected"
            assert status.backlog == 0
            assert status.last_ack_at is not None

    asyncio.run(scenario())
    assert_delivered_once(gate, ingest, 1_000)
    assert ingest.duplicates == 0
    assert ingest.batch_records / len(ingest.batch_ids) <= 200


def test_deny_overtakes_backlog(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-deny", drain_records_per_s=1_000)
    gate.append(3_000, deny_at={2_999})
    ingest = gate.ingest(broker)

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: 3_000 in ingest.stored, 10, "the deny verdict")
            normal_received = sum(1 for lane, _ in ingest.lanes if lane == "normal")
            assert normal_received <= 3, "the deny waited behind the backlog"
            await wait_until(lambda: len(ingest.stored) == 3_000, 30, "the backlog")
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")

    asyncio.run(scenario())
    assert ("priority", 3_000) in ingest.lanes
    assert_delivered_once(gate, ingest, 3_000)


def test_drain_is_rate_limited(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-rate", batch_max_records=100, drain_records_per_s=1_000)
    gate.append(1_500)
    ingest = gate.ingest(broker)
    timing: dict[str, float] = {}

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run()):
            await wait_until(lambda: connection.connected, 10, "the connection")
            async with running(uplink.run()):
                timing["drain"] = await wait_until(
                    lambda: len(ingest.stored) == 1_500, 30, "all records"
                )
                await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")

    asyncio.run(scenario())
    # The bucket starts with one batch of tokens: 1,400 more records at 1,000 per second.
    assert timing["drain"] >= 1.3
    assert_delivered_once(gate, ingest, 1_500)


def test_unacked_batch_sent_again_with_new_id(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-resend", ack_timeout_s=1.0)
    gate.append(50)
    ingest = gate.ingest(broker)
    ingest.acking = False

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: ingest.received[1] >= 2, 10, "a resend")
            ingest.acking = True
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")

    asyncio.run(scenario())
    assert len(set(ingest.batch_ids)) == len(ingest.batch_ids)
    assert ingest.duplicates >= 50
    assert_delivered_once(gate, ingest, 50)


def test_bad_acks_ignored_and_logged(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-badack", ack_timeout_s=60.0)
    gate.append(10)
    ingest = gate.ingest(broker)
    ingest.acking = False
    forger = SigningKey.generate()
    results: dict[str, Any] = {}

    def ack(batch_id: str, key: SigningKey, device: str = "gate-01") -> bytes:
        body = {
            "type": "ack",
            "site": gate.site,
            "device": device,
            "batch_id": batch_id,
            "seqs": [[1, 10]],
            "district_time": time.time(),
        }
        return encode_message(body, key)

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        topic = uplink.topics.acks
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: len(ingest.batch_ids) == 1, 10, "the batch")
            batch_id = ingest.batch_ids[0]
            bad_signature = bytearray(ack(batch_id, gate.district_key))
            bad_signature[10] ^= 0xFF
            for payload in (
                ack(batch_id, forger),
                bytes(bad_signature),
                ack(batch_id, gate.district_key, device="gate-99"),
                ack("00" * 16, gate.district_key),
            ):
                await ingest.connection.publish(topic, payload)
            await wait_until(lambda: sum(uplink.rejected_acks.values()) == 4, 10, "4 rejections")
            results["backlog_after_bad"] = gate.backlog()

            valid = ack(batch_id, gate.district_key)
            await ingest.connection.publish(topic, valid)
            await wait_until(lambda: gate.backlog() == 0, 10, "the valid ack")
            await ingest.connection.publish(topic, valid)
            await wait_until(lambda: "replayed" in uplink.rejected_acks, 10, "the replay")
            results["rejected"] = dict(uplink.rejected_acks)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert results["backlog_after_bad"] == 10
    assert results["rejected"] == {
        "unknown_signer": 1,
        "bad_signature": 1,
        "other_device": 1,
        "unknown_batch": 1,
        "replayed": 1,
    }
    logged = sorted(entry["reason"] for entry in logs if entry["event"] == "ack_rejected")
    assert logged == sorted(results["rejected"])
    assert_delivered_once(gate, ingest, 10)


def test_clock_skew_reported(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-skew", clock_skew_alarm_s=60)
    gate.append(5)
    ingest = gate.ingest(broker)
    skews: list[float | None] = []

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection, clock=lambda: time.time() + 500)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")
            skews.append(uplink.status().clock_skew_s)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert skews[0] is not None
    assert 495 <= skews[0] <= 505
    assert any(entry["event"] == "clock_skew" for entry in logs)


def test_outbox_bound_raises_alarm(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-bound", outbox_alarm_records=100, ack_timeout_s=60.0)
    gate.append(150)
    ingest = gate.ingest(broker)
    ingest.acking = False

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: bool(ingest.alarms), 10, "the outbox_full alarm")
            assert uplink.status().outbox_alarm
            gate.append(10)  # Recording goes on while the alarm is raised.
            ingest.acking = True
            await wait_until(lambda: len(ingest.stored) == 160, 10, "the new records")

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert ingest.alarms[0]["alarm"] == "outbox_full"
    assert ingest.alarms[0]["backlog"] >= 100
    assert any(entry["event"] == "outbox_full" for entry in logs)
    assert sorted(ingest.stored) == list(range(1, 161))


def test_sync_status_reads_state_file(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-status", ack_timeout_s=60.0)
    gate.append(20)
    ingest = gate.ingest(broker)
    ingest.acking = False
    config_path = tmp_path / "edgenode.toml"
    config_path.write_text(
        f'[device]\nid = "gate-01"\nsite = "up-status"\nstate_dir = "{gate.state_dir}"\n'
        f'[sync]\nenabled = true\nbroker_host = "{broker.host}"\nbroker_port = {broker.port}\n',
        encoding="utf-8",
    )

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: len(ingest.stored) == 20, 10, "the records")
            await wait_until(
                lambda: (gate.state_dir / STATE_FILE_NAME).exists(), 10, "the state file"
            )

    asyncio.run(scenario())

    status = collect_status(load_config(config_path))
    assert status["backlog"] == 20
    assert status["oldest_unacked_seq"] == 1
    assert status["last_ack_at"] is None
    assert status["connection_state"] in {"connected", "disconnected"}
    lines = format_status(status, translator("en"))
    assert "Records not yet acked: 20" in lines
    stale = collect_status(load_config(config_path), now=time.time() + 3_600)
    assert stale["connection_state"] == "unknown"


def test_sync_status_says_sync_is_disabled(tmp_path: Path) -> None:
    config_path = tmp_path / "edgenode.toml"
    config_path.write_text(
        f'[device]\nid = "gate-01"\nsite = "S1"\nstate_dir = "{tmp_path / "state"}"\n',
        encoding="utf-8",
    )
    Journal(tmp_path / "state" / "journal.db", "gate-01").close()

    status = collect_status(load_config(config_path))

    assert status["connection_state"] == "disabled"
    lines = format_status(status, translator("en"))
    assert "Connection: sync is disabled in the config ([sync] enabled)" in lines


# --- outages and crashes (slow) ---


@pytest.mark.slow
def test_broker_outage_during_10000_verdicts(broker: Broker, tmp_path: Path) -> None:
    total = 10_000
    gate = make_gate(tmp_path, broker, "up-outage", batch_max_records=500)
    ingest = gate.ingest(broker)
    appended = threading.Event()

    def record() -> None:
        gate.append(total, deny_at={n for n in range(total) if n % 97 == 0})
        appended.set()

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: connection.connected, 10, "the connection")
            writer = threading.Thread(target=record)
            writer.start()
            await wait_until(lambda: len(ingest.stored) >= 1_000, 30, "the first records")
            broker.stop()
            await wait_until(lambda: not connection.connected, 10, "the outage")
            await asyncio.sleep(3)
            broker.start()
            await wait_until(appended.is_set, 60, "all verdicts recorded")
            writer.join(timeout=10)
            uplink.notify()
            await wait_until(lambda: len(ingest.stored) == total, 90, "every record")
            await wait_until(lambda: gate.backlog() == 0, 30, "all acks committed")

    asyncio.run(scenario())
    assert_delivered_once(gate, ingest, total)


CHILD = """
import asyncio, base64, sys
from pathlib import Path
from nacl.signing import SigningKey
from edgenode.config import SyncConfig, load_config
from edgenode.district import read_key
from sync.connection import Connection
from sync.uplink import Uplink

sync_json, journal_path, key_path, site, district_public = sys.argv[1:6]

async def main() -> None:
    sync = SyncConfig.model_validate_json(sync_json)
    connection = Connection(sync, site=site, device="gate-01", backoff_base_s=0.1)
    uplink = Uplink(
        connection, Path(journal_path), device_key=read_key(Path(key_path)),
        district_keys=[base64.b64decode(district_public)], sync=sync,
    )
    tasks = [asyncio.create_task(connection.run()), asyncio.create_task(uplink.run())]
    while True:
        await asyncio.sleep(0.2)
        if uplink._journal is not None and (await uplink.refresh_status()).backlog == 0:
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

asyncio.run(main())
"""


def start_child(gate: Gate, kill_at: str | None) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if key != TEST_KILL_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if kill_at is not None:
        env[TEST_KILL_ENV] = kill_at
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            gate.sync.model_dump_json(),
            str(gate.journal_path),
            str(gate.state_dir / "device.key"),
            gate.site,
            base64.b64encode(bytes(gate.district_key.verify_key)).decode("ascii"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            raise AssertionError(f"the uplink process did not exit within {timeout_s} s")
        await asyncio.sleep(0.05)
    return process.returncode


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before_publish", "after_publish", "after_ack"])
def test_sigkill_during_publish(broker: Broker, tmp_path: Path, phase: str) -> None:
    total = 2_000
    gate = make_gate(tmp_path, broker, f"up-kill-{phase.replace('_', '-')}")
    gate.append(total)
    ingest = gate.ingest(broker)
    codes: list[int] = []
    errors: list[bytes] = []

    async def scenario() -> None:
        async with running(ingest.connection.run()):
            await wait_until(lambda: ingest.connection.connected, 10, "the ingest")
            first = start_child(gate, f"{phase}:3")
            try:
                codes.append(await wait_exit(first, 60))
            finally:
                if first.poll() is None:
                    first.kill()
            second = start_child(gate, None)
            try:
                codes.append(await wait_exit(second, 60))
            finally:
                if second.poll() is None:
                    second.kill()
                assert second.stderr is not None
                errors.append(second.stderr.read())
            await wait_until(lambda: len(ingest.stored) == total, 10, "every record")

    asyncio.run(scenario())
    assert codes[0] == -signal.SIGKILL
    assert codes[1] == 0, errors[0].decode(errors="replace")[-2000:]
    if phase != "before_publish":
        # The batch whose ack the killed process never committed was sent again.
        assert ingest.duplicates > 0
    assert_delivered_once(gate, ingest, total)


@pytest.mark.slow
def test_paused_broker_uplink_recovers(broker: Broker, tmp_path: Path) -> None:
    keepalive_s = 5
    gate = make_gate(tmp_path, broker, "up-paused", keepalive_s=keepalive_s)
    gate.append(500)
    ingest = gate.ingest(broker)
    timing: dict[str, float] = {}

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: gate.backlog() == 0, 20, "the first records")
            broker.pause()
            gate.append(500)
            uplink.notify()
            timing["detect"] = await wait_until(
                lambda: not connection.connected, 3 * keepalive_s, "the watchdog"
            )
            broker.resume()
            await wait_until(lambda: len(ingest.stored) == 1_000, 60, "records after resume")
            await wait_until(lambda: gate.backlog() == 0, 30, "all acks committed")

    asyncio.run(scenario())
    assert timing["detect"] <= 1.5 * keepalive_s
    assert_delivered_once(gate, ingest, 1_000)


def test_state_file_follows_connection(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-statefile")
    gate.append(3)
    ingest = gate.ingest(broker)
    path = gate.state_dir / STATE_FILE_NAME
    states: list[dict[str, Any]] = []

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")
            await wait_until(path.exists, 10, "the state file")
            states.append(json.loads(path.read_text(encoding="utf-8")))
        states.append(json.loads(path.read_text(encoding="utf-8")))

    asyncio.run(scenario())
    assert states[0]["connection_state"] == "connected"
    assert states[0]["pid"] == os.getpid()
    assert states[1]["connection_state"] == "disconnected"
