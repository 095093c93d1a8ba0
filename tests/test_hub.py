"""The district hub's ingest against a real Mosquitto broker, with real gate uplinks.

Each scenario runs gates (a Connection and an Uplink over their own journal) and one or more
hubs, as Hub objects in the test's event loop or as ``serve`` processes. It then checks the
hub's SQLite store. Every recorded verdict is stored exactly once, in one hash chain from
seq 1, and each gate's backlog is empty because the hub acked it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from edgenode.config import SyncConfig
from edgenode.hub_cli import add_commands, load_hub_config
from edgenode.i18n import translator
from edgenode.journal import Journal
from sync.connection import Connection
from sync.hub import Hub
from sync.hub_store import MIGRATIONS, BatchResult, HubStore, HubStoreError, WireRecord
from sync.identity import ensure_device_key
from sync.protocol import Topics, encode_message
from sync.uplink import Uplink
from tests.broker import ADMIT, DENY, Broker, broker

__all__ = ["broker"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TestGate:
    """One gate's journal and key, with an uplink to the broker under test."""

    __test__ = False

    site: str
    device: str
    journal_path: Path
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

    @property
    def public_key(self) -> bytes:
        return bytes(self.device_key.verify_key)

    def connection(self) -> Connection:
        return Connection(self.sync, site=self.site, device=self.device, backoff_base_s=0.1)

    def uplink(self, connection: Connection) -> Uplink:
        return Uplink(
            connection,
            self.journal_path,
            device_key=self.device_key,
            district_keys=[bytes(self.district_key.verify_key)],
            sync=self.sync,
        )


def gate_sync(target: Broker, **overrides: Any) -> SyncConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "broker_host": target.host,
        "broker_port": target.port,
        "keepalive_s": 5,
        "reconnect_max_s": 1.0,
        "batch_max_records": 100,
        "drain_records_per_s": 1_000_000,
        "ack_timeout_s": 2.0,
    }
    values.update(overrides)
    return SyncConfig.model_validate(values)


def make_gate(
    folder: Path,
    target: Broker,
    district_key: SigningKey,
    site: str,
    device: str,
    **overrides: Any,
) -> TestGate:
    state_dir = folder / f"{site}-{device}"
    state_dir.mkdir(parents=True)
    return TestGate(
        site=site,
        device=device,
        journal_path=state_dir / "journal.db",
        device_key=ensure_device_key(state_dir / "device.key"),
        district_key=district_key,
        sync=gate_sync(target, **overrides),
    )


def make_hub(target: Broker, store_path: Path, district_key: SigningKey, name: str) -> Hub:
    sync = SyncConfig(enabled=True, broker_host=target.host, broker_port=target.port, keepalive_s=5)
    return Hub(sync, store_path=store_path, district_key=district_key, hub_id=name)


def register(store_path: Path, *gates: TestGate) -> None:
    with HubStore(store_path) as store:
        for gate in gates:
            store.register_device(gate.site, gate.device, gate.public_key)


async def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    state: Callable[[], object] | None = None,
) -> None:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            seen = "" if state is None else f"; state: {state()}"
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{seen}")
        await asyncio.sleep(0.05)


async def wait_connected(*hubs: Hub) -> None:
    await wait_until(lambda: all(hub.connection.connected for hub in hubs), 10, "hubs connected")


@asynccontextmanager
async def running(*coroutines: Awaitable[None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=15)
        assert not pending, f"{len(pending)} tasks did not stop within 15 s"
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def gate_tasks(*gates: TestGate) -> list[Awaitable[None]]:
    coroutines: list[Awaitable[None]] = []
    for gate in gates:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        coroutines += [connection.run(), uplink.run()]
    return coroutines


def stored(store_path: Path, gate: TestGate) -> list[dict[str, Any]]:
    with HubStore(store_path) as store:
        device = store.get_device(gate.site, gate.device)
        assert device is not None
        return store.records(device)


def assert_stored_once(store_path: Path, gate: TestGate, total: int) -> None:
    records = stored(store_path, gate)
    assert [record["seq"] for record in records] == list(range(1, total + 1))
    previous_hash = "00" * 32
    for record in records:
        assert record["prev_hash"] == previous_hash, f"seq {record['seq']} breaks the chain"
        previous_hash = record["hash"]
    assert gate.backlog() == 0


def wire_record(seq: int, **fields: Any) -> WireRecord:
    """A verdict record in a well-formed chain: record n has hash n and prev_hash n - 1."""
    values: dict[str, Any] = dict(
        seq=seq,
        kind="verdict",
        recorded_at=100.0,
        age_s=1.5,
        station="north",
        verdict="admit",
        reasons=[],
        health_subject=None,
        community_subject=None,
        latency_ms=2.0,
        clock_trusted=True,
        prev_hash=f"{seq - 1:064x}",
        hash=f"{seq:064x}",
    )
    values.update(fields)
    return WireRecord(**values)


# --- the store ---


def test_store_migrates_once(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with HubStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
    with HubStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        journal_mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert journal_mode == "wal"


def test_store_registry_changes(tmp_path: Path) -> None:
    key = bytes(SigningKey.generate().verify_key)
    with HubStore(tmp_path / "hub.db") as store:
        device = store.register_device("S1", "gate-01", key, now=1000.0)
        assert device.enabled
        assert device.registered_at == 1000.0
        with pytest.raises(HubStoreError, match="already registered"):
            store.register_device("S1", "gate-01", key)
        # The same device id at another site is another gate.
        store.register_device("S2", "gate-01", key)
        with pytest.raises(HubStoreError, match="32 bytes"):
            store.register_device("S1", "gate-02", b"short")

        store.disable_device("S1", "gate-01")
        disabled = store.get_device("S1", "gate-01")
        assert disabled is not None
        assert not disabled.enabled
        store.enable_device("S1", "gate-01")
        enabled = store.get_device("S1", "gate-01")
        assert enabled is not None
        assert enabled.enabled
        with pytest.raises(HubStoreError, match="not registered"):
            store.disable_device("S1", "gate-99")

        listed = [(d.site, d.device_id) for d in store.list_devices()]
        assert listed == [("S1", "gate-01"), ("S2", "gate-01")]


def test_store_insert_batch_idempotent(tmp_path: Path) -> None:
    key = bytes(SigningKey.generate().verify_key)
    with HubStore(tmp_path / "hub.db") as store:
        first = store.register_device("S1", "gate-01", key)
        second = store.register_device("S2", "gate-01", key)
        records = [wire_record(seq) for seq in (1, 2, 3)]
        assert store.insert_batch(first, records, lane="normal", batch_id="a") == BatchResult(3, 0)
        overlapping = [wire_record(seq) for seq in (2, 3, 4)]
        result = store.insert_batch(first, overlapping, lane="normal", batch_id="b")
        assert result == BatchResult(1, 2)
        result = store.insert_batch(second, records, lane="normal", batch_id="c")
        assert result == BatchResult(3, 0)
        assert store.stored_seqs(first) == [1, 2, 3, 4]
        assert store.record_count() == 7
        row = store.records(first)[0]
        assert row["batch_id"] == "a"
        assert row["age_s"] == 1.5
        assert row["received_at"] > 0


# --- ingest through the broker ---


def test_hub_stores_and_acks_once(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    gate = make_gate(tmp_path, broker, district_key, "hub-once", "gate-01")
    gate.append(500, deny_at={10, 250})
    register(store_path, gate)
    hub = make_hub(broker, store_path, district_key, "a")

    async def scenario() -> None:
        async with running(hub.run()):
            await wait_connected(hub)
            async with running(*gate_tasks(gate)):
                await wait_until(lambda: gate.backlog() == 0, 30, "every record acked")

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert_stored_once(store_path, gate, 500)
    assert hub.stored_records == 500
    assert hub.acks_sent >= 5
    assert sum(hub.rejected.values()) == 0
    lanes = {record["seq"]: record["lane"] for record in stored(store_path, gate)}
    assert lanes[11] == "priority"
    assert lanes[1] == "normal"
    # Logs name batches and gates, never a record's subjects.
    for entry in logs:
        text = json.dumps(entry, default=str)
        assert "health_subject" not in text
        assert ADMIT.health_subject.hex() not in text


def test_hub_rejects_unknown_forged_disabled(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    known = make_gate(tmp_path, broker, district_key, "hub-reject", "gate-known")
    unknown = make_gate(tmp_path, broker, district_key, "hub-reject", "gate-unknown")
    disabled = make_gate(tmp_path, broker, district_key, "hub-reject", "gate-disabled")
    for gate in (unknown, disabled):
        gate.append(20)
    register(store_path, known, disabled)
    with HubStore(store_path) as store:
        store.disable_device(disabled.site, disabled.device)
    hub = make_hub(broker, store_path, district_key, "a")
    forger = Connection(gate_sync(broker), site="hub-reject", device="forger")
    topics = Topics(known.site, known.device)
    forged = {
        "type": "batch",
        "site": known.site,
        "device": known.device,
        "batch_id": "f" * 32,
        "sent_at": time.time(),
        "lane": "normal",
        "records": [wire_record(1).model_dump()],
    }
    alarm = {
        "type": "alarm",
        "alarm": "outbox_full",
        "site": known.site,
        "device": known.device,
        "raised_at": time.time(),
        "backlog": 1000,
        "bound": 1000,
    }

    async def scenario() -> None:
        async with running(hub.run(), forger.run(), *gate_tasks(unknown, disabled)):
            await wait_connected(hub)
            await wait_until(lambda: forger.connected, 10, "forger connected")
            # Sent first: one client's messages arrive in order, so once the last rejection
            # below is counted, the gate's alarm has been handled too.
            await forger.publish(topics.priority, encode_message(alarm, known.device_key))
            # Signed by a key that is not the known gate's.
            await forger.publish(topics.batches, encode_message(forged, SigningKey.generate()))
            # Signed by the known gate, then altered.
            genuine = encode_message(forged, known.device_key)
            altered = genuine[:-1] + bytes([genuine[-1] ^ 0xFF])
            await forger.publish(topics.batches, altered)
            # Signed by the known gate, but naming another gate in the body.
            other = dict(forged, device="gate-unknown")
            await forger.publish(topics.batches, encode_message(other, known.device_key))
            await wait_until(
                lambda: (
                    hub.rejected["unknown_device"] >= 1
                    and hub.rejected["device_disabled"] >= 1
                    and hub.rejected["unknown_signer"] == 1
                    and hub.rejected["bad_signature"] == 1
                    and hub.rejected["device_mismatch"] == 1
                ),
                15,
                "every rejection",
                lambda: dict(hub.rejected),
            )

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert hub.alarms["forged_batch"] == 3
    assert hub.alarms["unknown_device"] >= 2
    assert hub.stored_records == 0
    assert hub.acks_sent == 0
    with HubStore(store_path) as store:
        assert store.record_count() == 0
    assert unknown.backlog() == 20
    assert disabled.backlog() == 20
    rejected = [entry for entry in logs if entry["event"] == "batch_rejected"]
    assert {entry["reason"] for entry in rejected} == {
        "unknown_device",
        "device_disabled",
        "unknown_signer",
        "bad_signature",
        "device_mismatch",
    }
    assert all(entry["site"] == "hub-reject" for entry in rejected)
    gate_alarms = [entry for entry in logs if entry["event"] == "gate_alarm"]
    assert len(gate_alarms) == 1
    assert gate_alarms[0]["alarm"] == "outbox_full"
    assert gate_alarms[0]["device"] == "gate-known"


def test_hub_accepts_device_enabled_again(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    gate = make_gate(tmp_path, broker, district_key, "hub-enable", "gate-01")
    gate.append(50)
    register(store_path, gate)
    with HubStore(store_path) as store:
        store.disable_device(gate.site, gate.device)
    hub = make_hub(broker, store_path, district_key, "a")

    async def scenario() -> None:
        async with running(hub.run(), *gate_tasks(gate)):
            await wait_connected(hub)
            await wait_until(lambda: hub.rejected["device_disabled"] >= 1, 15, "a rejection")
            with HubStore(store_path) as store:
                store.enable_device(gate.site, gate.device)
            # The gate sends the batch again after its ack timeout.
            await wait_until(lambda: gate.backlog() == 0, 20, "every record acked")

    asyncio.run(scenario())
    assert_stored_once(store_path, gate, 50)


def test_three_hubs_share_load(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    counts = {"gate-01": 667, "gate-02": 667, "gate-03": 666}
    gates = [make_gate(tmp_path, broker, district_key, "hub-share", device) for device in counts]
    for gate in gates:
        gate.append(counts[gate.device])
    register(store_path, *gates)
    hubs = [make_hub(broker, store_path, district_key, name) for name in ("a", "b", "c")]

    async def scenario() -> None:
        async with running(*(hub.run() for hub in hubs)):
            await wait_connected(*hubs)
            async with running(*gate_tasks(*gates)):
                await wait_until(
                    lambda: all(gate.backlog() == 0 for gate in gates), 45, "every record acked"
                )

    asyncio.run(scenario())
    for gate in gates:
        assert_stored_once(store_path, gate, counts[gate.device])
    with HubStore(store_path) as store:
        assert store.record_count() == 2_000
    assert sum(hub.stored_records for hub in hubs) == 2_000
    # The broker splits the uplink between the hubs of the shared subscription.
    assert sum(1 for hub in hubs if hub.stored_records > 0) >= 2


def test_hub_killed_before_commit_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    gate = make_gate(tmp_path, broker, district_key, "hub-kill", "gate-01")
    gate.append(300)
    register(store_path, gate)
    doomed = make_hub(broker, store_path, district_key, "doomed")
    survivor = make_hub(broker, store_path, district_key, "survivor")
    blocked = asyncio.Event()

    async def block_forever(*args: Any, **kwargs: Any) -> tuple[int, int]:
        blocked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    doomed._commit = block_forever  # type: ignore[method-assign]

    async def scenario() -> None:
        async with running(doomed.run()) as (doomed_task,):
            await wait_connected(doomed)
            async with running(*gate_tasks(gate)):
                await asyncio.wait_for(blocked.wait(), 15)
                async with running(survivor.run()):
                    await wait_connected(survivor)
                    doomed_task.cancel()
                    await asyncio.wait((doomed_task,), timeout=15)
                    assert doomed_task.done()
                    await wait_until(lambda: gate.backlog() == 0, 30, "every record acked")

    asyncio.run(scenario())
    assert_stored_once(store_path, gate, 300)
    assert doomed.stored_records == 0
    assert survivor.stored_records == 300


# --- the command line ---


def write_hub_config(
    folder: Path, target: Broker, district_key: SigningKey, hub_id: str = "cli"
) -> Path:
    key_path = folder / "district.key"
    if not key_path.exists():
        key_path.write_text(base64.b64encode(bytes(district_key)).decode("ascii") + "\n")
        key_path.chmod(0o600)
    config_path = folder / f"hub-{hub_id}.toml"
    config_path.write_text(
        f"""hub_id = "{hub_id}"
store = "hub.db"
district_key_file = "district.key"

[broker]
host = "{target.host}"
port = {target.port}
keepalive_s = 5
""",
        encoding="utf-8",
    )
    return config_path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator("en")
    result: int = args.handler(args)
    return result


def test_hub_config_rejects_unknown_keys(tmp_path: Path) -> None:
    from edgenode.district_cli import DistrictError

    path = tmp_path / "hub.toml"
    path.write_text('store = "hub.db"\ndistrict_key_file = "k"\nstores = 1\n', encoding="utf-8")
    with pytest.raises(DistrictError, match="stores"):
        load_hub_config(path)
    path.write_text('store = "hub.db"\ndistrict_key_file = "/k"\n', encoding="utf-8")
    config = load_hub_config(path)
    assert config.store == tmp_path / "hub.db"
    assert config.district_key_file == Path("/k")


def test_devices_commands(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_hub_config(tmp_path, broker, SigningKey.generate())
    public_key = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode("ascii")
    common = ["--config", str(config), "--site", "S1", "--device", "gate-01"]
    assert run_cli(["devices", "add", *common, "--public-key", public_key]) == 0
    assert run_cli(["devices", "disable", *common]) == 0
    assert run_cli(["devices", "list", "--config", str(config), "--json"]) == 0
    output = capsys.readouterr().out
    listed = json.loads(output[output.index("{") :])["devices"]
    assert listed[0]["device"] == "gate-01"
    assert listed[0]["public_key"] == public_key
    assert listed[0]["enabled"] is False
    assert run_cli(["devices", "enable", *common]) == 0
    assert run_cli(["devices", "list", "--config", str(config)]) == 0
    assert "S1\tgate-01\tenabled" in capsys.readouterr().out


def start_serve(config: Path) -> subprocess.Popen[bytes]:
    """Start ``serve`` with its output in ``{config}.log``, a file so that it never blocks."""
    with config.with_suffix(".log").open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "edgenode.hub_cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_serve_ingests_and_stops_on_sigterm(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    config = write_hub_config(tmp_path, broker, district_key)
    gate = make_gate(tmp_path, broker, district_key, "hub-serve", "gate-01")
    gate.append(100)
    register(tmp_path / "hub.db", gate)
    process = start_serve(config)
    try:

        async def scenario() -> None:
            async with running(*gate_tasks(gate)):
                await wait_until(lambda: gate.backlog() == 0, 30, "every record acked")

        asyncio.run(scenario())
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    finally:
        stop_all([process])
    output = config.with_suffix(".log").read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 0, output
    assert "hub_stopped" in output
    assert_stored_once(tmp_path / "hub.db", gate, 100)


def test_hub_processes_survive_one_killed(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    counts = {"gate-01": 667, "gate-02": 667, "gate-03": 666}
    gates = [
        make_gate(tmp_path, broker, district_key, "hub-procs", device, drain_records_per_s=300)
        for device in counts
    ]
    for gate in gates:
        gate.append(counts[gate.device])
    register(store_path, *gates)
    configs = [write_hub_config(tmp_path, broker, district_key, name) for name in "abc"]
    processes = [start_serve(config) for config in configs]

    def stored_count() -> int:
        with closing(sqlite3.connect(store_path, timeout=10)) as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    try:

        async def scenario() -> None:
            async with running(*gate_tasks(*gates)):
                await wait_until(lambda: stored_count() >= 500, 30, "500 records stored")
                # SIGKILL, so the hub neither finishes its batch nor disconnects cleanly.
                processes[0].kill()
                await wait_until(
                    lambda: all(gate.backlog() == 0 for gate in gates),
                    45,
                    "every record acked",
                    lambda: [gate.backlog() for gate in gates],
                )

        asyncio.run(scenario())
        for process in processes[1:]:
            process.send_signal(signal.SIGTERM)
        for process in processes[1:]:
            process.wait(timeout=15)
    finally:
        stop_all(processes)
    assert [process.returncode for process in processes[1:]] == [0, 0]
    for gate in gates:
        assert_stored_once(store_path, gate, counts[gate.device])
    assert stored_count() == 2_000
