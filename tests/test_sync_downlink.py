"""The downlink against a real mosquitto broker: chunks in, cache versions out.

Each test starts the gate's side (the gate's Connection and a Downlink) and a district client
that publishes signed chunks and collects the gate's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from nacl.signing import SigningKey

from edgenode.cache import cache_version
from edgenode.config import SyncConfig
from edgenode.snapshot import write_snapshot
from sync.connection import Connection
from sync.delta import write_delta
from sync.downlink import Downlink, chunk_messages
from sync.protocol import Topics, decode_message, encode_message, trusted

MOSQUITTO = Path("/usr/sbin/mosquitto")
NOW = int(time.time())
DEVICE = "gate-01"
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(
    not MOSQUITTO.exists(), reason=f"mosquitto is not installed at {MOSQUITTO}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def broker_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Start mosquitto on a free 127.0.0.1 port and stop it after the module's tests."""
    folder = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8"
    )
    log_path = folder / "mosquitto.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")
                pytest.fail(f"mosquitto did not listen on port {port}: {output}")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class District:
    """The district's side: publishes dataset messages and collects the gate's requests."""

    client: aiomqtt.Client
    key: SigningKey
    topics: Topics
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def publish(self, messages: list[bytes]) -> None:
        for message in messages:
            await self.client.publish(self.topics.datasets, message, qos=1)

    async def collect(self, gate_key: SigningKey) -> None:
        keys = trusted(bytes(gate_key.verify_key))
        async for message in self.client.messages:
            self.requests.append(decode_message(bytes(message.payload), keys))


@dataclass
class Site:
    """One gate's state folder, keys and files, with a unique site id per test."""

    folder: Path
    district_key: SigningKey = field(default_factory=SigningKey.generate)
    gate_key: SigningKey = field(default_factory=SigningKey.generate)
    name: str = field(default_factory=lambda: f"XH-{uuid.uuid4().hex[:6]}")

    @property
    def cache_path(self) -> Path:
        return self.folder / "cache.db"

    @property
    def topics(self) -> Topics:
        return Topics(self.name, DEVICE)

    def snapshot(self, version: int, residents: int = 400) -> bytes:
        path = self.folder / f"snapshot-{version}"
        records = (resident(n, self.name) for n in range(residents))
        write_snapshot(
            path,
            records,
            site=self.name,
            version=version,
            issued_at=NOW - 60,
            valid_until=NOW + 3600,
            signing_key=self.district_key,
        )
        return path.read_bytes()

    def delta(self, base: int, version: int, site: str | None = None) -> bytes:
        path = self.folder / f"delta-{base}-{version}"
        records = [{"op": "upsert"} | resident(10_000 + version, self.name), delete(version)]
        write_delta(
            path,
            records,
            site=site or self.name,
            base_version=base,
            version=version,
            issued_at=NOW - 30,
            valid_until=NOW + 3600,
            signing_key=self.district_key,
        )
        return path.read_bytes()

    def chunks(
        self,
        data: bytes,
        kind: str,
        version: int,
        base: int | None = None,
        *,
        key: SigningKey | None = None,
        site: str | None = None,
        district_time: Callable[[], float] = time.time,
    ) -> list[bytes]:
        return chunk_messages(
            data,
            site=site or self.name,
            kind="snapshot" if kind == "snapshot" else "delta",
            version=version,
            base_version=base,
            transfer_id=uuid.uuid4().hex,
            signing_key=key or self.district_key,
            chunk_size=512,
            district_time=district_time,
        )


def resident(n: int, site: str) -> dict[str, Any]:
    return {
        "dataset": "residents",
        "subject": f"{n:032x}",
        "compound": site,
        "building": "1",
        "unit": "101",
        "role": "resident",
        "valid_from": NOW - 1000,
        "valid_until": NOW + 1000,
        "display_name": "张*",
    }


def delete(n: int) -> dict[str, Any]:
    return {"op": "delete", "dataset": "residents", "subject": f"{n:032x}"}


async def wait_until(
    condition: Callable[[], bool], description: str, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        await asyncio.sleep(0.02)


@dataclass
class Gate:
    downlink: Downlink
    tasks: list[asyncio.Task[None]]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def start_gate(site: Site, port: int, **options: Any) -> Gate:
    sync = SyncConfig(enabled=True, broker_host="127.0.0.1", broker_port=port, keepalive_s=5)
    connection = Connection(sync, site=site.name, device=DEVICE, backoff_base_s=0.1)
    downlink = Downlink(
        connection,
        site=site.name,
        device=DEVICE,
        cache_path=site.cache_path,
        state_dir=site.folder,
        district_keys=[bytes(site.district_key.verify_key)],
        signing_key=site.gate_key,
        **options,
    )
    tasks = [asyncio.create_task(connection.run()), asyncio.create_task(downlink.run())]
    await asyncio.wait_for(connection.wait_connected(), WAIT_S)
    return Gate(downlink, tasks)


@contextlib.asynccontextmanager
async def district(site: Site, port: int) -> AsyncIterator[District]:
    identifier = f"district-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client("127.0.0.1", port, identifier=identifier) as client:
        await client.subscribe(site.topics.requests, qos=1)
        hub = District(client, site.district_key, site.topics)
        collector = asyncio.create_task(hub.collect(site.gate_key))
        try:
            yield hub
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 40))


def version_of(site: Site) -> int | None:
    return cache_version(site.cache_path)


def applied(gate: Gate, version: int) -> Callable[[], bool]:
    """Tell when the downlink has committed ``version`` and removed its spool entry."""
    return lambda: gate.downlink.status()["version"] == version


def rejected(gate: Gate, reason: str) -> int:
    return gate.downlink.rejections[reason]


def rejection_seen(gate: Gate, reason: str) -> Callable[[], bool]:
    return lambda: rejected(gate, reason) >= 1


def test_snapshot_then_delta_reach_cache(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            snapshot = site.chunks(site.snapshot(1), "snapshot", 1)
            assert len(snapshot) > 1
            await hub.publish(snapshot)
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")

            await hub.publish(site.chunks(site.delta(1, 2), "delta", 2, 1))
            await wait_until(applied(gate, 2), "delta 2 in the cache")
        status = gate.downlink.status()
        await gate.stop()

        assert status["version"] == 2
        assert {info["version"] for info in status["datasets"]} == {2}
        assert status["transfers"] == []
        assert status["rejections"] == {}
        assert list((site.folder / "spool").iterdir()) == []

    run(scenario)


def test_chunks_out_of_order_assemble(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            messages = site.chunks(site.snapshot(3), "snapshot", 3)
            random.Random(5).shuffle(messages)
            await hub.publish(list(reversed(messages)))
            await wait_until(applied(gate, 3), "shuffled snapshot in the cache")
        await gate.stop()

    run(scenario)


def test_interrupted_transfer_resumes_after_restart(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        messages = site.chunks(site.snapshot(1, residents=600), "snapshot", 1)
        half = len(messages) // 2
        gate = await start_gate(site, broker_port, stall_s=60.0)
        async with district(site, broker_port) as hub:
            await hub.publish(messages[:half])
            await wait_until(
                lambda: sum(t["received"] for t in gate.downlink.status()["transfers"]) == half,
                "the first half in the spool",
            )
            await gate.stop()
            assert version_of(site) is None

            restarted = await start_gate(site, broker_port, stall_s=0.5)
            await wait_until(lambda: bool(hub.requests), "a request for the missing chunks")
            request = hub.requests[0]
            assert request["what"] == "chunks"
            assert request["device"] == DEVICE
            assert request["missing"] == list(range(half, len(messages)))

            missing = request["missing"]
            await hub.publish([messages[index] for index in missing])
            await wait_until(applied(restarted, 1), "the resumed snapshot in the cache")
            assert version_of(site) == 1
        await restarted.stop()

    run(scenario)


def forged_signature(message: bytes) -> bytes:
    """Flip one bit of the signature, keeping the trusted key id."""
    data = bytearray(message)
    data[10] ^= 0x01
    return bytes(data)


def test_bad_messages_are_rejected(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            await hub.publish(site.chunks(site.snapshot(1), "snapshot", 1))
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")
            delta = site.delta(1, 2)

            cases = [
                ("bad_signature", [forged_signature(site.chunks(delta, "delta", 2, 1)[0])]),
                ("unknown_signer", site.chunks(delta, "delta", 2, 1, key=SigningKey.generate())),
                ("truncated", [site.chunks(delta, "delta", 2, 1)[0][:40]]),
                ("wrong_site", site.chunks(delta, "delta", 2, 1, site="XH-OTHER")),
            ]
            for reason, messages in cases:
                await hub.publish(messages)
                await wait_until(rejection_seen(gate, reason), f"a {reason} rejection")
                assert version_of(site) == 1, reason

            await hub.publish(site.chunks(delta, "delta", 2, 1))
            await wait_until(applied(gate, 2), "delta 2 in the cache")
            await hub.publish(site.chunks(site.snapshot(1), "snapshot", 1))
            await wait_until(rejection_seen(gate, "stale_version"), "a stale_version rejection")
            assert version_of(site) == 2
        await gate.stop()

    run(scenario)


def test_corrupt_file_is_rejected(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            await hub.publish(site.chunks(site.snapshot(1), "snapshot", 1))
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")

            # Signed correctly by the district, but the file's own signature is broken.
            data = site.delta(1, 2).replace(b'"version": 2', b'"version": 7', 1)
            await hub.publish(site.chunks(data, "delta", 2, 1))
            await wait_until(lambda: rejected(gate, "bad_signature") >= 1, "the rejection")
            assert version_of(site) == 1
            assert gate.downlink.status()["transfers"] == []
        await gate.stop()

    run(scenario)


def test_snapshot_supersedes_older_transfers(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            await hub.publish(site.chunks(site.snapshot(2), "snapshot", 2)[:1])
            await wait_until(lambda: bool(gate.downlink.status()["transfers"]), "a transfer")

            await hub.publish(site.chunks(site.snapshot(3), "snapshot", 3))
            await wait_until(applied(gate, 3), "snapshot 3 in the cache")
            assert gate.downlink.status()["transfers"] == []
            assert list((site.folder / "spool").iterdir()) == []
        await gate.stop()

    run(scenario)


def test_version_gap_requests_snapshot(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            await hub.publish(site.chunks(site.snapshot(1), "snapshot", 1))
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")

            await hub.publish(site.chunks(site.delta(4, 5), "delta", 5, 4))
            await wait_until(lambda: rejected(gate, "version_gap") >= 1, "a version_gap")
            await wait_until(lambda: bool(hub.requests), "a snapshot request")
            assert version_of(site) == 1
            assert hub.requests[0]["what"] == "snapshot"
            assert hub.requests[0]["have_version"] == 1

            await hub.publish(site.chunks(site.snapshot(5), "snapshot", 5))
            await wait_until(applied(gate, 5), "snapshot 5 in the cache")
        await gate.stop()

    run(scenario)


def test_clock_skew_is_reported(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port, clock_skew_alarm_s=120.0)
        async with district(site, broker_port) as hub:
            ahead = site.chunks(
                site.snapshot(1), "snapshot", 1, district_time=lambda: time.time() + 1_000
            )
            await hub.publish(ahead)
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")
        skew = gate.downlink.clock_skew_s
        status = gate.downlink.status()
        await gate.stop()

        assert skew is not None
        assert 990 < skew < 1_010
        assert status["clock_skew_alarms"] == len(ahead)

    run(scenario)


def test_request_messages_are_signed_by_gate(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            # With no cache a delta cannot apply, so the gate requests a snapshot.
            await hub.publish(site.chunks(site.delta(1, 2), "delta", 2, 1))
            await wait_until(lambda: bool(hub.requests), "a snapshot request")
        await gate.stop()

        request = hub.requests[0]
        assert request["type"] == "request"
        assert request["site"] == site.name
        assert request["have_version"] == 0
        forged = encode_message(request, SigningKey.generate())
        with pytest.raises(Exception, match="unknown key"):
            decode_message(forged, trusted(bytes(site.gate_key.verify_key)))

    run(scenario)


def test_spool_is_kept_until_commit(tmp_path: Path, broker_port: int) -> None:
    site = Site(tmp_path)

    async def scenario() -> None:
        gate = await start_gate(site, broker_port)
        async with district(site, broker_port) as hub:
            messages = site.chunks(site.snapshot(1), "snapshot", 1)
            await hub.publish(messages[:-1])
            await wait_until(
                lambda: (
                    sum(t["received"] for t in gate.downlink.status()["transfers"])
                    == len(messages) - 1
                ),
                "all but the last chunk in the spool",
            )
            spooled = list((site.folder / "spool").iterdir())
            assert len(spooled) == 1
            assert len(list((spooled[0] / "chunks").iterdir())) == len(messages) - 1
            assert version_of(site) is None

            await hub.publish(messages[-1:])
            await wait_until(applied(gate, 1), "snapshot 1 in the cache")
            assert list((site.folder / "spool").iterdir()) == []

            # Chunks sent again for the version the cache has are ignored, not rejected.
            await hub.publish(messages)
            await hub.publish(site.chunks(site.snapshot(2), "snapshot", 2))
            await wait_until(applied(gate, 2), "snapshot 2 in the cache")
            assert gate.downlink.rejections == {}
        await gate.stop()

    run(scenario)
