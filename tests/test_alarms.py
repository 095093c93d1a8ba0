"""District alarms over a hub store: when each kind fires, and how repeats are limited."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from edgenode.config import SyncConfig
from edgenode.i18n import translator
from edgenode.report_cli import add_commands
from sync.alarms import (
    REPEAT_INTERVAL_S,
    SHARING_WINDOW_S,
    Alarm,
    AlarmChecker,
    AlarmKind,
    alarm_topic,
    code_sharing_alarms,
    silent_device_alarms,
)
from sync.connection import Connection
from sync.hub_store import Device, HubStore, WireRecord
from sync.protocol import decode_message, trusted
from sync.report import StoredRecord
from tests.broker import Broker, broker

__all__ = ["broker"]

PUBLIC_KEY = bytes(32)
T0 = 1_796_400_000.0
SUBJECT = "cc" * 16


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    seq: int,
    verdict: str,
    recorded_at: float,
    *reasons: str,
    community_subject: str | None = SUBJECT,
    health_subject: str | None = "dd" * 16,
) -> WireRecord:
    return WireRecord(
        seq=seq,
        kind="verdict",
        recorded_at=recorded_at,
        age_s=1.0,
        station="north",
        verdict=verdict,
        reasons=list(reasons),
        health_subject=health_subject,
        community_subject=community_subject,
        latency_ms=2.0,
        clock_trusted=True,
        prev_hash="00" * 32,
        hash="11" * 32,
    )


class Site:
    """A hub store with gates, and a checker over it whose clock the test sets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = HubStore(path)
        self.clock = Clock(T0)
        self.gates: dict[str, Device] = {}
        self.batches = 0

    def gate(self, device_id: str, site: str = "S1") -> Device:
        device = self.store.register_device(site, device_id, PUBLIC_KEY, now=T0)
        self.gates[device_id] = device
        return device

    def store_batch(
        self, device_id: str, records: list[WireRecord], received_at: float
    ) -> list[WireRecord]:
        self.batches += 1
        self.store.insert_batch(
            self.gates[device_id],
            records,
            lane="normal",
            batch_id=f"b{self.batches}",
            received_at=received_at,
        )
        return records

    def checker(
        self,
        *,
        sharing_window_s: float = SHARING_WINDOW_S,
        repeat_interval_s: float = REPEAT_INTERVAL_S,
    ) -> AlarmChecker:
        return AlarmChecker(
            self.path,
            clock=self.clock,
            sharing_window_s=sharing_window_s,
            repeat_interval_s=repeat_interval_s,
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    value = Site(tmp_path / "hub.db")
    value.gate("gate-a")
    value.gate("gate-b")
    yield value
    value.store.close()


def kinds(alarms: list[Alarm]) -> list[str]:
    return [str(alarm.kind) for alarm in alarms]


# --- red code ---


def test_red_code_fires_on_health_red_deny(site: Site) -> None:
    checker = site.checker()
    records = site.store_batch(
        "gate-a",
        [record(1, "deny", T0, "health_red", "not_resident"), record(2, "admit", T0 + 1)],
        T0 + 2,
    )

    alarms = checker.check_batch(site.gates["gate-a"], records)

    assert kinds(alarms) == ["red_code"]
    assert alarms[0].site == "S1"
    assert alarms[0].device == "gate-a"
    assert alarms[0].seqs == (1,)
    assert alarms[0].subject == "dd" * 16


def test_red_code_ignores_other_denies(site: Site) -> None:
    checker = site.checker()
    records = site.store_batch(
        "gate-a",
        [
            record(1, "deny", T0, "code_replayed"),
            record(2, "review", T0, "health_red"),
            record(3, "deny", T0, "health_yellow"),
        ],
        T0,
    )

    assert checker.check_batch(site.gates["gate-a"], records) == []


@pytest.mark.parametrize("unverified", ["unknown_issuer", "issuer_key_not_valid", "bad_signature"])
def test_red_code_ignores_unverified_code(site: Site, unverified: str) -> None:
    checker = site.checker()
    records = site.store_batch("gate-a", [record(1, "deny", T0, unverified, "health_red")], T0)

    assert checker.check_batch(site.gates["gate-a"], records) == []


# --- code sharing ---


def test_code_sharing_within_window(site: Site) -> None:
    checker = site.checker()
    first = site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    assert checker.check_batch(site.gates["gate-a"], first) == []
    second = site.store_batch("gate-b", [record(1, "admit", T0 + 540)], T0 + 541)

    alarms = checker.check_batch(site.gates["gate-b"], second)

    assert kinds(alarms) == ["code_sharing"]
    assert alarms[0].devices == ("gate-b", "gate-a")
    assert alarms[0].subject == SUBJECT
    assert alarms[0].detail["gap_s"] == 540


def test_code_sharing_outside_window(site: Site) -> None:
    checker = site.checker()
    site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    later = site.store_batch("gate-b", [record(1, "admit", T0 + 601)], T0 + 601)

    assert checker.check_batch(site.gates["gate-b"], later) == []


def test_code_sharing_window_is_configurable(site: Site) -> None:
    checker = site.checker(sharing_window_s=60)
    site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    later = site.store_batch("gate-b", [record(1, "admit", T0 + 120)], T0 + 120)

    assert checker.check_batch(site.gates["gate-b"], later) == []


def test_code_sharing_needs_two_gates_and_admits(site: Site) -> None:
    checker = site.checker()
    site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    same_gate = site.store_batch("gate-a", [record(2, "admit", T0 + 30)], T0 + 30)
    denied = site.store_batch("gate-b", [record(1, "deny", T0 + 60, "not_resident")], T0 + 60)

    assert checker.check_batch(site.gates["gate-a"], same_gate) == []
    assert checker.check_batch(site.gates["gate-b"], denied) == []


def test_code_sharing_needs_the_same_site(site: Site) -> None:
    site.gate("gate-x", site="S2")
    checker = site.checker()
    site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    other_site = site.store_batch("gate-x", [record(1, "admit", T0 + 10)], T0 + 10)

    assert checker.check_batch(site.gates["gate-x"], other_site) == []


def test_code_sharing_pure_function_pairs_closest() -> None:
    def admit(device: str, seq: int, at: float) -> StoredRecord:
        return StoredRecord("S1", device, seq, "admit", (), None, SUBJECT, at, at, "north")

    admits = [admit("a", 1, T0), admit("b", 1, T0 + 500), admit("a", 2, T0 + 450)]

    alarms = code_sharing_alarms(admits, T0 + 600)

    assert len(alarms) == 1
    assert alarms[0].seqs == (1, 2)
    assert alarms[0].detail["gap_s"] == 50


# --- silent devices ---


def test_silent_device_vs_active_one(site: Site) -> None:
    site.store_batch("gate-a", [record(1, "admit", T0)], T0)
    site.store_batch("gate-b", [record(1, "admit", T0)], T0 + 3000)
    site.clock.now = T0 + 3700
    checker = site.checker()

    alarms = checker.check_silent()

    assert kinds(alarms) == ["device_silent"]
    assert alarms[0].device == "gate-a"
    assert alarms[0].detail["last_received_at"] == T0


def test_silent_device_never_sent_judged_from_registration(site: Site) -> None:
    site.clock.now = T0 + 3599
    assert site.checker().check_silent() == []

    site.clock.now = T0 + 3601
    alarms = site.checker().check_silent()

    assert sorted(alarm.device for alarm in alarms) == ["gate-a", "gate-b"]


def test_disabled_device_never_silent(site: Site) -> None:
    site.store.disable_device("S1", "gate-a")
    site.store_batch("gate-b", [record(1, "admit", T0)], T0 + 10_000)
    site.clock.now = T0 + 10_000

    assert site.checker().check_silent() == []
    assert silent_device_alarms([("S1", "g", False, 0.0, None)], T0) == []


# --- stale cache ---


def test_stale_cache_once_per_gate(site: Site) -> None:
    checker = site.checker()
    records = site.store_batch(
        "gate-a",
        [
            record(1, "admit", T0, "cache_stale"),
            record(2, "review", T0 + 5, "cache_stale"),
            record(3, "admit", T0 + 6),
        ],
        T0 + 10,
    )

    alarms = checker.check_batch(site.gates["gate-a"], records)

    assert kinds(alarms) == ["stale_cache"]
    assert alarms[0].seqs == (2,)


def test_stale_cache_not_without_reason(site: Site) -> None:
    checker = site.checker()
    records = site.store_batch("gate-a", [record(1, "admit", T0, "health_green")], T0)

    assert checker.check_batch(site.gates["gate-a"], records) == []


# --- repeats, logs, the store-wide check ---


def test_repeats_are_rate_limited(site: Site) -> None:
    checker = site.checker(repeat_interval_s=600)
    gate = site.gates["gate-a"]
    first = site.store_batch("gate-a", [record(1, "deny", T0, "health_red")], T0)
    second = site.store_batch("gate-a", [record(2, "deny", T0 + 60, "health_red")], T0 + 60)
    other = site.store_batch(
        "gate-a", [record(3, "deny", T0 + 70, "health_red", health_subject="ee" * 16)], T0 + 70
    )
    third = site.store_batch("gate-a", [record(4, "deny", T0 + 700, "health_red")], T0 + 700)

    assert len(checker.check_batch(gate, first)) == 1
    site.clock.now = T0 + 60
    assert checker.check_batch(gate, second) == []
    assert checker.suppressed["red_code"] == 1
    site.clock.now = T0 + 70
    assert len(checker.check_batch(gate, other)) == 1
    site.clock.now = T0 + 700
    assert len(checker.check_batch(gate, third)) == 1


def test_alarm_raised_logged_without_payload(site: Site) -> None:
    checker = site.checker()
    records = site.store_batch("gate-a", [record(1, "deny", T0, "health_red")], T0)

    with capture_logs() as logs:
        checker.check_batch(site.gates["gate-a"], records)

    raised = [entry for entry in logs if entry["event"] == "alarm_raised"]
    assert len(raised) == 1
    assert raised[0]["kind"] == "red_code"
    assert raised[0]["site"] == "S1"
    assert raised[0]["device"] == "gate-a"
    assert raised[0]["seqs"] == [1]
    assert "payload" not in raised[0]


def test_check_since_runs_every_check(site: Site) -> None:
    site.gate("gate-quiet")
    site.store_batch(
        "gate-a",
        [record(1, "deny", T0, "health_red"), record(2, "admit", T0 + 10, "cache_stale")],
        T0 + 3000,
    )
    site.store_batch("gate-b", [record(1, "admit", T0 + 100)], T0 + 3000)
    site.clock.now = T0 + 3700

    alarms = site.checker().check_since(T0)

    assert sorted(kinds(alarms)) == ["code_sharing", "device_silent", "red_code", "stale_cache"]
    silent = [alarm for alarm in alarms if alarm.kind is AlarmKind.DEVICE_SILENT]
    assert silent[0].device == "gate-quiet"


def test_alarm_topic_and_message() -> None:
    alarm = silent_device_alarms([("S1", "g", True, T0, None)], T0 + 7200)[0]

    message = alarm.message()

    assert alarm_topic("S1") == "edgenode/v1/S1/district/alarms"
    assert message["type"] == "alarm"
    assert message["alarm"] == "device_silent"
    assert message["raised_at"] == T0 + 7200
    json.dumps(message)


def test_alarms_command_prints_json(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    now = time.time()
    site.store_batch("gate-a", [record(1, "deny", now, "health_red")], now)
    site.store_batch("gate-b", [record(1, "admit", now)], now)
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{site.path}"\ndistrict_key_file = "district.key"\n', encoding="utf-8"
    )
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["alarms", "--config", str(config), "--json"])
    args.tr = translator("en")

    with capture_logs():
        code = args.handler(args)

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [line["alarm"] for line in lines] == ["red_code"]


def test_alarm_published_signed(site: Site, broker: Broker) -> None:
    district_key = SigningKey.generate()
    sync = SyncConfig.model_validate(
        {
            "enabled": True,
            "broker_host": broker.host,
            "broker_port": broker.port,
            "keepalive_s": 5,
            "reconnect_max_s": 1.0,
        }
    )
    received: list[aiomqtt.Message] = []
    publisher = Connection(sync, site="district", device="hub-alarm-test", backoff_base_s=0.1)
    listener = Connection(sync, site="district", device="alarm-listener", backoff_base_s=0.1)

    async def on_alarm(message: aiomqtt.Message) -> None:
        received.append(message)

    listener.subscribe(alarm_topic("S1"), on_alarm)
    checker = AlarmChecker(site.path, connection=publisher, district_key=district_key)
    records = site.store_batch("gate-a", [record(1, "deny", T0, "health_red")], T0)

    async def scenario() -> int:
        tasks = [asyncio.ensure_future(publisher.run()), asyncio.ensure_future(listener.run())]
        try:
            async with asyncio.timeout(10):
                await publisher.wait_connected()
                await listener.wait_connected()
                # The listener subscribes right after its CONNACK. A short wait lets the
                # SUBACK arrive before the publish.
                await asyncio.sleep(0.3)
                sent = await checker.publish(checker.check_batch(site.gates["gate-a"], records))
                while not received:
                    await asyncio.sleep(0.05)
            return sent
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with capture_logs():
        sent = asyncio.run(scenario())

    assert sent == 1
    assert str(received[0].topic) == "edgenode/v1/S1/district/alarms"
    assert isinstance(received[0].payload, bytes)
    body = decode_message(received[0].payload, trusted(bytes(district_key.verify_key)))
    assert body["alarm"] == "red_code"
    assert body["device"] == "gate-a"
    assert body["seqs"] == [1]
