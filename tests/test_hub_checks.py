"""What the hub does beyond storing batches: chain and resend checks, invalid records, alarms
published on the alarm topic, and gates' requests served by the hub process.

The store tests use a real SQLite file. The hub tests run a Hub against a real Mosquitto, with
records signed by a real gate key.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from nacl.signing import SigningKey

from edgenode.config import SyncConfig
from sync.alarms import AlarmChecker, alarm_topic
from sync.connection import Connection
from sync.downlink import Downlink
from sync.hub import Hub
from sync.hub_store import GENESIS_HASH_HEX, BatchResult, HubStore, WireRecord, parse_records
from sync.protocol import Topics, decode_message, encode_message, trusted
from sync.store_backend import StoreLocation, open_store
from tests.broker import Broker, broker
from tests.postgres import postgres_server, postgres_url
from tests.test_hub import wire_record
from tests.test_publisher import District, hex_subjects, location

__all__ = ["broker", "location", "postgres_server", "postgres_url"]

WAIT_S = 15.0


def wire_dict(seq: int, **fields: Any) -> dict[str, Any]:
    return wire_record(seq, **fields).model_dump()


def insert(store: HubStore, device: Any, records: list[WireRecord], batch_id: str) -> BatchResult:
    return store.insert_batch(device, records, lane="normal", batch_id=batch_id)


@pytest.fixture
def store(tmp_path: Path) -> HubStore:
    return HubStore(tmp_path / "hub.db")


def gate_device(store: HubStore) -> Any:
    return store.register_device("S1", "gate-01", bytes(SigningKey.generate().verify_key))


# --- the chain across batches ---


def test_chain_linking_batches_has_no_breaks(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(seq) for seq in (1, 2, 3)], "a")
    result = insert(store, device, [wire_record(seq) for seq in (4, 5)], "b")
    assert result.chain_breaks == ()
    assert result.new == 2


def test_chain_break_against_stored_predecessor(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(seq) for seq in (1, 2, 3)], "a")
    result = insert(store, device, [wire_record(4, prev_hash="ab" * 32)], "b")
    assert result.chain_breaks == (4,)
    assert result.new == 1


def test_chain_break_against_stored_successor(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(5)], "a")
    result = insert(store, device, [wire_record(4, hash="cd" * 32)], "b")
    assert result.chain_breaks == (5,)


def test_chain_gap_is_not_a_break(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(seq) for seq in (1, 2)], "a")
    result = insert(store, device, [wire_record(7)], "b")
    assert result.chain_breaks == ()


def test_first_record_must_follow_genesis(store: HubStore) -> None:
    device = gate_device(store)
    result = insert(store, device, [wire_record(1, prev_hash="ef" * 32)], "a")
    assert result.chain_breaks == (1,)
    assert wire_record(1).prev_hash == GENESIS_HASH_HEX


def test_chain_break_inside_batch_reported_at_later_record(store: HubStore) -> None:
    device = gate_device(store)
    records = [wire_record(1), wire_record(2, prev_hash="12" * 32), wire_record(3)]
    result = insert(store, device, records, "a")
    assert result.chain_breaks == (2,)


# --- resends ---


def test_resend_with_other_hash_is_a_conflict(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(seq) for seq in (1, 2, 3)], "a")
    result = insert(store, device, [wire_record(2, hash="99" * 32)], "b")
    assert result.conflicts == (2,)
    assert result.duplicates == 1
    assert store.records(device)[1]["hash"] == wire_record(2).hash


def test_identical_resend_is_no_conflict(store: HubStore) -> None:
    device = gate_device(store)
    insert(store, device, [wire_record(seq) for seq in (1, 2)], "a")
    result = insert(store, device, [wire_record(seq) for seq in (1, 2)], "b")
    assert result.conflicts == ()
    assert result.duplicates == 2


# --- invalid records ---


def test_parse_keeps_valid_records_beside_invalid_one() -> None:
    broken = wire_dict(2)
    del broken["verdict"]
    parsed = parse_records([wire_dict(1), broken, wire_dict(3)])
    assert [record.seq for record in parsed.valid] == [1, 3]
    assert [item.seq for item in parsed.invalid] == [2]
    assert "verdict" in parsed.invalid[0].reason


def test_parse_invalid_record_without_seq() -> None:
    parsed = parse_records([wire_dict(1), {"kind": "verdict"}, "not a record"])
    assert [item.seq for item in parsed.invalid] == [None, None]


def test_parse_rejects_duplicate_seqs() -> None:
    with pytest.raises(ValueError, match="same seq"):
        parse_records([wire_dict(1), wire_dict(1)])


def test_invalid_records_stored_apart(store: HubStore, tmp_path: Path) -> None:
    device = gate_device(store)
    broken = wire_dict(2, station="north")
    broken["recorded_at"] = "yesterday"
    parsed = parse_records([wire_dict(1), broken])
    result = store.insert_batch(
        device, parsed.valid, lane="normal", batch_id="a", invalid=parsed.invalid
    )
    assert result.rejected == 1
    rows = store._db.execute("SELECT seq, reason, body FROM rejected_records").fetchall()
    assert [row[0] for row in rows] == [2]
    assert "recorded_at" in rows[0][1]
    assert "yesterday" in rows[0][2]


# --- the hub over a real broker ---


def hub_sync(target: Broker) -> SyncConfig:
    return SyncConfig(enabled=True, broker_host=target.host, broker_port=target.port, keepalive_s=5)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.05)


class AlarmHub:
    """A hub with an alarm checker, a registered gate, and a listener on the alarm topic."""

    def __init__(self, target: Broker, folder: Path) -> None:
        self.site = f"S-{uuid.uuid4().hex[:6]}"
        self.device = "gate-01"
        self.gate_key = SigningKey.generate()
        self.district_key = SigningKey.generate()
        self.store_path = folder / "hub.db"
        with HubStore(self.store_path) as store:
            store.register_device(self.site, self.device, bytes(self.gate_key.verify_key))
        self.target = target
        self.hub = Hub(
            hub_sync(target),
            store_path=self.store_path,
            district_key=self.district_key,
            hub_id=f"test-{secrets.token_hex(3)}",
        )
        self.hub.alarm_checker = AlarmChecker(
            self.store_path, connection=self.hub.connection, district_key=self.district_key
        )
        self.alarms: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []

    async def listen(self, client: aiomqtt.Client) -> None:
        keys = trusted(bytes(self.district_key.verify_key))
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            body = decode_message(message.payload, keys)
            (self.alarms if body["type"] == "alarm" else self.acks).append(body)

    def batch(self, records: list[Any], key: SigningKey | None = None) -> bytes:
        body = {
            "type": "batch",
            "site": self.site,
            "device": self.device,
            "batch_id": secrets.token_hex(8),
            "lane": "normal",
            "records": records,
        }
        return encode_message(body, key or self.gate_key)

    async def run(self, scenario: Callable[[aiomqtt.Client], Any]) -> None:
        hub_task = asyncio.create_task(self.hub.run())
        try:
            identifier = f"alarm-listener-{secrets.token_hex(4)}"
            async with aiomqtt.Client(
                self.target.host, self.target.port, identifier=identifier
            ) as client:
                await client.subscribe(alarm_topic(self.site), qos=1)
                await client.subscribe(Topics(self.site, self.device).acks, qos=1)
                listener = asyncio.create_task(self.listen(client))
                await wait_until(lambda: self.hub.connection.connected, "hub connected")
                try:
                    await scenario(client)
                finally:
                    listener.cancel()
        finally:
            hub_task.cancel()
            await asyncio.gather(hub_task, return_exceptions=True)
            assert self.hub.alarm_checker is not None
            self.hub.alarm_checker.close()


def run(coroutine: Any) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 60))


def test_red_code_alarm_published(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    red = wire_dict(1, verdict="deny", reasons=["health_red"], health_subject="ab" * 16)
    topics = Topics(hub.site, hub.device)

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(topics.batches, hub.batch([red]), qos=1)
        await wait_until(lambda: any(a["alarm"] == "red_code" for a in hub.alarms), "red alarm")

    run(hub.run(scenario))
    alarm = next(a for a in hub.alarms if a["alarm"] == "red_code")
    assert alarm["device"] == hub.device
    assert alarm["seqs"] == [1]
    assert alarm["subject"] == "ab" * 16


def test_forged_batch_alarm_published(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    topics = Topics(hub.site, hub.device)

    async def scenario(client: aiomqtt.Client) -> None:
        forged = hub.batch([wire_dict(1)], key=SigningKey.generate())
        await client.publish(topics.batches, forged, qos=1)
        await wait_until(lambda: bool(hub.alarms), "forged-batch alarm")

    run(hub.run(scenario))
    assert [a["alarm"] for a in hub.alarms] == ["forged_batch"]
    assert hub.alarms[0]["device"] == hub.device
    assert hub.alarms[0]["detail"]["reason"] == "unknown_signer"
    assert hub.acks == []


def test_unknown_device_alarm_published(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    stranger = Topics(hub.site, "gate-99")

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(stranger.batches, hub.batch([wire_dict(1)]), qos=1)
        await wait_until(lambda: bool(hub.alarms), "unknown-device alarm")

    run(hub.run(scenario))
    assert [a["alarm"] for a in hub.alarms] == ["unknown_device"]
    assert hub.alarms[0]["device"] == "gate-99"


def test_batch_with_invalid_record_acked_whole(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    broken = wire_dict(2)
    del broken["hash"]
    topics = Topics(hub.site, hub.device)

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(topics.batches, hub.batch([wire_dict(1), broken]), qos=1)
        await wait_until(lambda: bool(hub.acks), "ack")
        await wait_until(lambda: any(a["alarm"] == "bad_record" for a in hub.alarms), "alarm")

    run(hub.run(scenario))
    assert hub.acks[0]["seqs"] == [[1, 2]]
    alarm = next(a for a in hub.alarms if a["alarm"] == "bad_record")
    assert alarm["seqs"] == [2]
    with HubStore(hub.store_path) as store:
        device = store.get_device(hub.site, hub.device)
        assert device is not None
        assert store.stored_seqs(device) == [1]


def test_conflicting_resend_raises_alarm(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    topics = Topics(hub.site, hub.device)

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(topics.batches, hub.batch([wire_dict(1), wire_dict(2)]), qos=1)
        await wait_until(lambda: len(hub.acks) == 1, "first ack")
        altered = hub.batch([wire_dict(2, hash="77" * 32)])
        await client.publish(topics.batches, altered, qos=1)
        await wait_until(lambda: bool(hub.alarms), "conflict alarm")

    run(hub.run(scenario))
    assert [a["alarm"] for a in hub.alarms] == ["record_conflict"]
    assert hub.alarms[0]["seqs"] == [2]


def test_chain_break_raises_alarm(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    topics = Topics(hub.site, hub.device)

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(topics.batches, hub.batch([wire_dict(1)]), qos=1)
        await wait_until(lambda: len(hub.acks) == 1, "first ack")
        broken = hub.batch([wire_dict(2, prev_hash="34" * 32)])
        await client.publish(topics.batches, broken, qos=1)
        await wait_until(lambda: bool(hub.alarms), "chain alarm")

    run(hub.run(scenario))
    assert [a["alarm"] for a in hub.alarms] == ["chain_break"]
    assert hub.alarms[0]["seqs"] == [2]


def test_hub_serves_gate_snapshot_request(
    broker: Broker, location: StoreLocation, tmp_path: Path
) -> None:
    district = District(tmp_path, location)
    district.roster(hex_subjects(3))
    with open_store(location) as store:
        store.register_device(district.site, "gate-01", bytes(district.gate_key.verify_key))
    sync = hub_sync(broker)
    hub = Hub(
        sync,
        store_path=location,
        district_key=district.district_key,
        hub_id=f"test-{secrets.token_hex(3)}",
    )
    hub.publisher = district.publisher(hub.connection)
    gate = Connection(sync, site=district.site, device="gate-01", backoff_base_s=0.1)
    downlink = Downlink(
        gate,
        site=district.site,
        device="gate-01",
        cache_path=district.folder / "gate" / "cache.db",
        state_dir=district.folder / "gate",
        district_keys=[bytes(district.district_key.verify_key)],
        signing_key=district.gate_key,
        stall_s=10.0,
    )

    async def scenario() -> None:
        tasks = [asyncio.create_task(c) for c in (hub.run(), gate.run(), downlink.run())]
        try:
            await wait_until(lambda: hub.connection.connected and gate.connected, "connected")
            # Version 1 is built without being sent, so the delta to version 2 does not fit
            # the gate's empty cache, and the gate requests a snapshot that the hub serves.
            assert hub.publisher is not None
            await asyncio.to_thread(hub.publisher.build, district.site)
            district.roster(hex_subjects(2), name="roster-2.csv")
            await hub.publisher.publish(district.site)
            await wait_until(lambda: downlink.status()["version"] == 2, "snapshot 2 applied")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    run(scenario())
    assert hub.rejected == {}


def test_gate_alarm_passed_on_to_alarm_topic(broker: Broker, tmp_path: Path) -> None:
    hub = AlarmHub(broker, tmp_path)
    topics = Topics(hub.site, hub.device)
    gate_alarm = {
        "type": "alarm",
        "alarm": "file_corrupt",
        "site": hub.site,
        "device": hub.device,
        "raised_at": time.time(),
        "file": "journal.db",
        "moved_to": "journal.db.corrupt-20261204T220000Z",
    }

    async def scenario(client: aiomqtt.Client) -> None:
        await client.publish(topics.priority, encode_message(gate_alarm, hub.gate_key), qos=1)
        await wait_until(lambda: bool(hub.alarms), "gate alarm passed on")

    run(hub.run(scenario))
    assert [a["alarm"] for a in hub.alarms] == ["gate_alarm"]
    detail = hub.alarms[0]["detail"]
    assert detail["alarm"] == "file_corrupt"
    assert detail["moved_to"] == "journal.db.corrupt-20261204T220000Z"
    assert hub.alarms[0]["device"] == hub.device
