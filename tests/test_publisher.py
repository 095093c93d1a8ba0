"""Publishing per-site datasets from the feed store to a gate, through a real Mosquitto broker.

Each scenario runs a gate (its Connection and a Downlink over its own cache) and the
district's side: a Publisher on its own Connection. The hub routes gates' requests to the
publisher, and here a stand-in does the same: it subscribes to the site's request topic,
checks the gate's signature and calls ``Publisher.handle_request``.

The scenarios run on both store backends: a SQLite file and a PostgreSQL database on the
server that tests/postgres.py starts (skipped without one, except under ``CI=true``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psycopg
import pytest
from nacl.signing import SigningKey

from edgenode.cache import Cache
from edgenode.codes import Colour, key_id_for
from edgenode.config import SyncConfig
from edgenode.district import KEY_FILES, write_key
from edgenode.feeds_cli import add_commands
from edgenode.i18n import translator
from sync.connection import Connection
from sync.delta import DeltaReader
from sync.downlink import Downlink
from sync.feed_backend import Transfer, open_feed_store
from sync.feeds import import_health, import_roster
from sync.feeds_pg import PostgresFeedStore
from sync.hub import HUB_SITE
from sync.protocol import Topics, decode_message, trusted
from sync.publisher import IssuerKey, Publisher, Publishing
from sync.store_backend import PostgresUrl, StoreLocation, StoreUnavailable
from tests.broker import Broker, broker
from tests.postgres import postgres_server, postgres_url

__all__ = ["broker", "location", "postgres_server", "postgres_url"]

DEVICE = "gate-01"
WAIT_S = 15.0
HEADER = "site,subject,health_subject,name,id_number,building,unit,role,valid_from,valid_until\n"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreLocation]:
    """The district's store: ``hub.db`` in the test's folder, or a PostgreSQL database."""
    if request.param == "sqlite":
        yield tmp_path / "hub.db"
    else:
        yield PostgresUrl(request.getfixturevalue("postgres_url"))


@dataclass
class District:
    """The feed store, keys and publisher of one test's district, for one site.

    The store is ``store_location``, by default ``hub.db`` in ``folder``.
    """

    folder: Path
    store_location: StoreLocation | None = None
    site: str = field(default_factory=lambda: f"XH-{uuid.uuid4().hex[:6]}")
    district_key: SigningKey = field(default_factory=SigningKey.generate)
    health_key: SigningKey = field(default_factory=SigningKey.generate)
    gate_key: SigningKey = field(default_factory=SigningKey.generate)

    def __post_init__(self) -> None:
        if self.store_location is None:
            self.store_location = self.folder / "hub.db"
        self.store = open_feed_store(self.store_location)

    def roster(self, subjects: list[str], name: str = "roster.csv") -> None:
        lines = [
            f"{self.site},{subject},{subject[::-1]},张三丰,110101199003071234,1,{subject[:3]},"
            "resident,2026-01-01,2036-01-01\n"
            for subject in subjects
        ]
        path = self.folder / name
        path.write_text(HEADER + "".join(lines), encoding="utf-8")
        result = import_roster(self.store, path)
        assert result.errors == []

    def health(self, health_subject: str, colour: str) -> None:
        path = self.folder / "health.csv"
        path.write_text(
            f"health_subject,colour,as_of\n{health_subject},{colour},{int(time.time())}\n",
            encoding="utf-8",
        )
        result = import_health(self.store, path)
        assert result.errors == []

    def publisher(self, connection: Publishing) -> Publisher:
        issuer = IssuerKey(self.health_key, ("health",), 0, 2**32 - 1)
        return Publisher(
            self.store,
            connection,
            district_key=self.district_key,
            issuers=[issuer],
            chunk_size=512,
        )


@dataclass
class Running:
    publisher: Publisher
    downlink: Downlink
    requests: list[dict[str, Any]]


def sync_config(target: Broker) -> SyncConfig:
    return SyncConfig(enabled=True, broker_host=target.host, broker_port=target.port, keepalive_s=5)


async def route_requests(
    client: aiomqtt.Client, district: District, publisher: Publisher, seen: list[dict[str, Any]]
) -> None:
    """Do what the hub does with a gate's request: check the signature, call the publisher."""
    keys = trusted(bytes(district.gate_key.verify_key))
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        body = decode_message(message.payload, keys)
        seen.append(body)
        await publisher.handle_request(district.site, str(body["device"]), body)


@asynccontextmanager
async def running(
    district: District, target: Broker, *, stall_s: float = 10.0
) -> AsyncIterator[Running]:
    sync = sync_config(target)
    gate_connection = Connection(sync, site=district.site, device=DEVICE, backoff_base_s=0.1)
    downlink = Downlink(
        gate_connection,
        site=district.site,
        device=DEVICE,
        cache_path=district.folder / "gate" / "cache.db",
        state_dir=district.folder / "gate",
        district_keys=[bytes(district.district_key.verify_key)],
        signing_key=district.gate_key,
        stall_s=stall_s,
    )
    hub_connection = Connection(
        sync,
        site=HUB_SITE,
        device="publisher-test",
        client_id=f"publisher-test-{secrets.token_hex(4)}",
        session_expiry_s=0,
    )
    publisher = district.publisher(hub_connection)
    requests: list[dict[str, Any]] = []
    tasks = [
        asyncio.create_task(gate_connection.run()),
        asyncio.create_task(downlink.run()),
        asyncio.create_task(hub_connection.run()),
    ]
    identifier = f"request-router-{secrets.token_hex(4)}"
    try:
        async with aiomqtt.Client(target.host, target.port, identifier=identifier) as client:
            await client.subscribe(Topics(district.site, DEVICE).requests, qos=1)
            tasks.append(asyncio.create_task(route_requests(client, district, publisher, requests)))
            await asyncio.wait_for(gate_connection.wait_connected(), WAIT_S)
            await asyncio.wait_for(hub_connection.wait_connected(), WAIT_S)
            yield Running(publisher, downlink, requests)
    finally:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending, f"{len(pending)} tasks did not stop within 10 s"


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.05)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 40))


def hex_subjects(count: int) -> list[str]:
    return [secrets.token_hex(16) for _ in range(count)]


def test_snapshot_then_delta_reach_gate(
    broker: Broker, location: StoreLocation, tmp_path: Path
) -> None:
    district = District(tmp_path, location)
    staying, leaving, joining = hex_subjects(3), hex_subjects(1)[0], hex_subjects(1)[0]
    district.roster([*staying, leaving])
    district.health(staying[0][::-1], "绿")
    cache_path = tmp_path / "gate" / "cache.db"

    async def scenario() -> None:
        async with running(district, broker) as state:
            first = await state.publisher.publish(district.site)
            assert (first.kind, first.version) == ("snapshot", 1)
            assert first.chunk_count > 1
            await wait_until(lambda: state.downlink.status()["version"] == 1, "snapshot 1")

            with Cache(cache_path) as cache:
                assert cache.resident(bytes.fromhex(leaving)) is not None
                resident = cache.resident(bytes.fromhex(staying[0]))
                assert resident is not None
                assert resident.display_name == "张*丰"
                status = cache.health_status(bytes.fromhex(staying[0][::-1]))
                assert status is not None and status.colour is Colour.GREEN
                key_id = key_id_for(bytes(district.health_key.verify_key))
                assert cache.issuer(key_id) is not None

            district.roster([*staying, joining], name="roster-2.csv")
            district.health(staying[0][::-1], "红")
            second = await state.publisher.publish(district.site)
            assert (second.kind, second.version, second.base_version) == ("delta", 2, 1)
            await wait_until(lambda: state.downlink.status()["version"] == 2, "delta 2")

        assert state.downlink.rejections == {}
        with Cache(cache_path) as cache:
            assert cache.resident(bytes.fromhex(leaving)) is None
            assert cache.bound_resident(bytes.fromhex(leaving[::-1])) is None
            assert cache.resident(bytes.fromhex(joining)) is not None
            assert cache.bound_resident(bytes.fromhex(joining[::-1])) == bytes.fromhex(joining)
            status = cache.health_status(bytes.fromhex(staying[0][::-1]))
            assert status is not None and status.colour is Colour.RED

    run(scenario)


def test_delta_contains_only_changes(location: StoreLocation, tmp_path: Path) -> None:
    district = District(tmp_path, location)
    subjects = hex_subjects(5)
    district.roster(subjects)

    publisher = district.publisher(Offline())
    publisher.build(district.site)
    district.roster(subjects[1:])
    delta = publisher.build(district.site)
    empty = publisher.build(district.site)

    # Removing one resident deletes its residents and bindings records, nothing else.
    for transfer, expected in ((delta, 2), (empty, 0)):
        path = tmp_path / f"delta-{transfer.version}"
        path.write_bytes(transfer.data)
        with DeltaReader(path, [bytes(district.district_key.verify_key)]) as reader:
            records = list(reader.records())
        assert len(records) == expected, records
        if expected:
            changes = sorted((record["op"], record["dataset"]) for record in records)
            assert changes == [("delete", "bindings"), ("delete", "residents")]
    assert publisher.published_version(district.site) == 3


def test_missing_chunks_request_answered(
    broker: Broker, location: StoreLocation, tmp_path: Path
) -> None:
    district = District(tmp_path, location)
    district.roster(hex_subjects(40))

    async def scenario() -> None:
        async with running(district, broker, stall_s=0.5) as state:
            transfer = await asyncio.to_thread(state.publisher.build, district.site)
            assert transfer.chunk_count >= 4
            held_back = [1, transfer.chunk_count - 1]
            sent = [i for i in range(transfer.chunk_count) if i not in held_back]
            await state.publisher.send(transfer, sent)

            await wait_until(lambda: state.downlink.status()["version"] == 1, "snapshot 1")

        chunk_requests = [body for body in state.requests if body["what"] == "chunks"]
        assert chunk_requests
        assert chunk_requests[0]["transfer_id"] == transfer.transfer_id
        assert chunk_requests[0]["missing"] == held_back

    run(scenario)


def test_snapshot_request_answered(broker: Broker, location: StoreLocation, tmp_path: Path) -> None:
    district = District(tmp_path, location)
    district.roster(hex_subjects(3))

    async def scenario() -> None:
        async with running(district, broker) as state:
            # Version 1 is published without the gate, so the delta to 2 does not fit its cache.
            await asyncio.to_thread(state.publisher.build, district.site)
            district.roster(hex_subjects(2), name="roster-2.csv")
            await state.publisher.publish(district.site)

            await wait_until(lambda: state.downlink.status()["version"] == 2, "snapshot 2")

        snapshot_requests = [body for body in state.requests if body["what"] == "snapshot"]
        assert [body["have_version"] for body in snapshot_requests] == [0]
        assert state.publisher.published_version(district.site) == 2

    run(scenario)


def run_cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator("en")
    output = io.StringIO()
    with redirect_stdout(output):
        result: int = args.handler(args)
    return result, output.getvalue()


def test_cli_publish_snapshot_then_delta(
    broker: Broker, location: StoreLocation, tmp_path: Path
) -> None:
    for name in KEY_FILES.values():
        write_key(tmp_path / name, SigningKey.generate())
    store_value = location.url if isinstance(location, PostgresUrl) else location.name
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{store_value}"\ndistrict_key_file = "district.key"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nkeepalive_s = 5\n',
        encoding="utf-8",
    )
    district = District(tmp_path, location)
    district.roster(hex_subjects(2))
    publish = ["publish", "--config", str(config), "--site", district.site]

    # Without configured logging, structlog also writes its events to stdout.
    code, output = run_cli(publish)
    assert code == 0
    assert output.splitlines()[-1] == (
        f"Published snapshot version 1 for site {district.site} in 1 chunks"
    )
    code, output = run_cli(publish)
    assert code == 0
    assert output.splitlines()[-1] == (
        f"Published delta from version 1 to 2 for site {district.site} in 1 chunks"
    )
    code, output = run_cli([*publish, "--snapshot"])
    assert code == 0
    assert output.splitlines()[-1].startswith("Published snapshot version 3 ")


class Offline:
    """A connection for builds that send nothing."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        raise AssertionError("nothing is sent in this test")


def test_concurrent_builds_make_consecutive_versions(
    location: StoreLocation, tmp_path: Path
) -> None:
    district = District(tmp_path, location)
    district.roster(hex_subjects(20))
    builds_per_thread = 5
    # Two publishers, each over its own store connection, as two hub processes have.
    publishers = [district.publisher(Offline())]
    second = District(tmp_path, location, site=district.site, district_key=district.district_key)
    publishers.append(second.publisher(Offline()))
    start = threading.Barrier(len(publishers), timeout=WAIT_S)
    built: list[list[Transfer]] = [[] for _ in publishers]
    failures: list[BaseException] = []

    def build_all(index: int) -> None:
        try:
            start.wait()
            for _ in range(builds_per_thread):
                built[index].append(publishers[index].build(district.site))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=build_all, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a build did not finish in 60 s"

    assert failures == []
    versions = sorted(transfer.version for transfers in built for transfer in transfers)
    assert versions == list(range(1, 2 * builds_per_thread + 1))
    for transfers in built:
        own = [transfer.version for transfer in transfers]
        assert own == sorted(own)
    for transfer in [transfer for transfers in built for transfer in transfers]:
        if transfer.kind == "delta":
            assert transfer.base_version == transfer.version - 1
    assert publishers[0].published_version(district.site) == 2 * builds_per_thread


def test_postgres_build_waits_for_site_lock(postgres_url: str, tmp_path: Path) -> None:
    district = District(tmp_path, PostgresUrl(postgres_url))
    district.roster(hex_subjects(3))
    publisher = district.publisher(Offline())
    holder = PostgresFeedStore(postgres_url)
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        locked.set()
        release.wait(WAIT_S)

    holding = threading.Thread(target=holder.publish_transaction, args=(district.site, hold_lock))
    holding.start()
    assert locked.wait(WAIT_S)
    built: list[Transfer] = []
    building = threading.Thread(target=lambda: built.append(publisher.build(district.site)))
    building.start()
    try:
        # The build's connection shows up in pg_locks as waiting for the site's advisory lock.
        deadline = time.monotonic() + WAIT_S
        with psycopg.connect(postgres_url, autocommit=True) as observer:
            while True:
                row = observer.execute(
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()
                if row is not None and row[0] == 1:
                    break
                assert time.monotonic() < deadline, "the build never waited for the site lock"
                time.sleep(0.05)
        assert built == []
    finally:
        release.set()
        holding.join(timeout=WAIT_S)
        building.join(timeout=WAIT_S)
        holder.close()

    assert [(transfer.kind, transfer.version) for transfer in built] == [("snapshot", 1)]


def test_postgres_build_after_connection_loss(postgres_url: str, tmp_path: Path) -> None:
    district = District(tmp_path, PostgresUrl(postgres_url))
    district.roster(hex_subjects(3))
    publisher = district.publisher(Offline())
    assert isinstance(district.store, PostgresFeedStore)
    backend_pid = district.store._session.connect().info.backend_pid
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))

    with pytest.raises(StoreUnavailable, match="lost the connection"):
        publisher.build(district.site)

    # Nothing of the failed build was committed, and the next build connects again.
    assert publisher.published_version(district.site) is None
    assert publisher.build(district.site).version == 1
