"""The district hub's ingest into PostgreSQL, through a real Mosquitto broker.

The gates, hubs and ``serve`` processes are those of tests/test_hub.py. Only the store differs:
a PostgreSQL database on the server that tests/postgres.py starts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import signal
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from edgenode.cache import Cache
from edgenode.config import SyncConfig
from edgenode.district import KEY_FILES, write_key
from edgenode.district_cli import DistrictError
from edgenode.feeds_cli import add_commands as add_feeds_commands
from edgenode.i18n import translator
from sync.alarms import AlarmChecker
from sync.connection import Connection
from sync.downlink import Downlink
from sync.feeds_pg import PostgresFeedStore
from sync.hub import Hub
from sync.hub_store_pg import PostgresHubStore
from sync.report import REPORT_TIMEZONE, hourly_report
from sync.store_backend import PostgresUrl
from tests.broker import Broker, broker, free_port
from tests.postgres import postgres_server, postgres_url
from tests.test_hub import (
    TestGate,
    gate_tasks,
    make_gate,
    running,
    start_serve,
    stop_all,
    wait_connected,
    wait_until,
)
from tests.test_hub import run_cli as run_hub_cli
from tests.test_publisher import HEADER
from tests.test_report import run_cli as run_report_cli

__all__ = ["broker", "postgres_server", "postgres_url"]


def register(url: str, *gates: TestGate) -> None:
    with PostgresHubStore(url) as store:
        for gate in gates:
            store.register_device(gate.site, gate.device, gate.public_key)


def assert_stored_once(url: str, gate: TestGate, total: int) -> None:
    with PostgresHubStore(url) as store:
        device = store.get_device(gate.site, gate.device)
        assert device is not None
        records = store.records(device)
    assert [record["seq"] for record in records] == list(range(1, total + 1))
    previous_hash = "00" * 32
    for record in records:
        assert record["prev_hash"] == previous_hash, f"seq {record['seq']} breaks the chain"
        previous_hash = record["hash"]
    assert gate.backlog() == 0


def write_hub_config(
    folder: Path, target: Broker, district_key: SigningKey, hub_id: str, url: str
) -> Path:
    key_path = folder / "district.key"
    if not key_path.exists():
        key_path.write_text(base64.b64encode(bytes(district_key)).decode("ascii") + "\n")
        key_path.chmod(0o600)
    config_path = folder / f"hub-{hub_id}.toml"
    config_path.write_text(
        f"""hub_id = "{hub_id}"
store = "{url}"
district_key_file = "district.key"

[broker]
host = "{target.host}"
port = {target.port}
keepalive_s = 5
""",
        encoding="utf-8",
    )
    return config_path


def test_three_hub_processes_store_once_in_postgres(
    broker: Broker, postgres_url: str, tmp_path: Path
) -> None:
    district_key = SigningKey.generate()
    counts = {"gate-01": 667, "gate-02": 667, "gate-03": 666}
    gates = [
        make_gate(tmp_path, broker, district_key, "hub-pg", device, drain_records_per_s=300)
        for device in counts
    ]
    for gate in gates:
        gate.append(counts[gate.device])
    register(postgres_url, *gates)
    configs = [
        write_hub_config(tmp_path, broker, district_key, name, postgres_url) for name in "abc"
    ]
    processes = [start_serve(config) for config in configs]

    def stored_count() -> int:
        with psycopg.connect(postgres_url) as db:
            row = db.execute("SELECT COUNT(*) FROM records").fetchone()
        return 0 if row is None else int(row[0])

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
    outputs = [config.with_suffix(".log").read_text(errors="replace") for config in configs]
    assert [process.returncode for process in processes[1:]] == [0, 0], outputs[1:]
    for gate in gates:
        assert_stored_once(postgres_url, gate, counts[gate.device])
    assert stored_count() == 2_000
    # Every hub opened the PostgreSQL store, and none wrote its password to the log.
    assert all("hub_started" in output for output in outputs)
    password = postgres_url.split(":")[2].split("@")[0]
    for output in outputs:
        assert password not in output


def test_hub_acks_after_store_connection_lost(
    broker: Broker, postgres_url: str, tmp_path: Path
) -> None:
    district_key = SigningKey.generate()
    gate = make_gate(tmp_path, broker, district_key, "hub-pg-loss", "gate-01")
    gate.append(50)
    register(postgres_url, gate)
    sync = SyncConfig(enabled=True, broker_host=broker.host, broker_port=broker.port, keepalive_s=5)
    hub = Hub(sync, store_path=PostgresUrl(postgres_url), district_key=district_key, hub_id="a")

    def terminate_hub_connections() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )

    async def scenario() -> None:
        async with running(hub.run()):
            await wait_connected(hub)
            await wait_until(lambda: hub._store is not None, 10, "the hub's store open")
            terminate_hub_connections()
            async with running(*gate_tasks(gate)):
                # The first batch finds the connection gone, so it is not acked. The gate sends
                # it again after its ack timeout, and the hub connects again for it.
                await wait_until(lambda: gate.backlog() == 0, 30, "every record acked")

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert hub.store_failures >= 1
    not_stored = [entry for entry in logs if entry["event"] == "batch_not_stored"]
    assert not_stored
    assert not_stored[0]["reason"] == "store_unavailable"
    assert_stored_once(postgres_url, gate, 50)


def test_report_and_alarms_read_postgres(broker: Broker, postgres_url: str, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    gate = make_gate(tmp_path, broker, district_key, "hub-pg-report", "gate-01")
    gate.append(30, deny_at={3})
    register(postgres_url, gate)
    sync = SyncConfig(enabled=True, broker_host=broker.host, broker_port=broker.port, keepalive_s=5)
    hub = Hub(sync, store_path=PostgresUrl(postgres_url), district_key=district_key, hub_id="a")

    async def scenario() -> None:
        async with running(hub.run()):
            await wait_connected(hub)
            async with running(*gate_tasks(gate)):
                await wait_until(lambda: gate.backlog() == 0, 30, "every record acked")

    asyncio.run(scenario())
    today = datetime.now(REPORT_TIMEZONE).date()
    rows = hourly_report(
        PostgresUrl(postgres_url), today - timedelta(days=1), today, site="hub-pg-report"
    )
    assert sum(row.admit for row in rows) == 29
    assert sum(row.deny for row in rows) == 1
    checker = AlarmChecker(PostgresUrl(postgres_url))
    try:
        alarms = checker.check_since(0.0, site="hub-pg-report")
    finally:
        checker.close()
    assert "red_code" in {str(alarm.kind) for alarm in alarms}


# --- the command line ---


def test_cli_commands_on_postgres(
    broker: Broker, postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_hub_config(tmp_path, broker, SigningKey.generate(), "cli", postgres_url)
    public_key = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode("ascii")
    common = ["--config", str(config), "--site", "S1", "--device", "gate-01"]
    assert run_hub_cli(["devices", "add", *common, "--public-key", public_key]) == 0
    assert run_hub_cli(["devices", "disable", *common]) == 0
    capsys.readouterr()
    assert run_hub_cli(["devices", "list", "--config", str(config), "--json"]) == 0
    output = capsys.readouterr().out  # Logs go to stdout too, as logging is not configured.
    listed = json.loads(output[output.index("{") :])["devices"]
    assert [(row["device"], row["enabled"]) for row in listed] == [("gate-01", False)]

    assert run_report_cli(["report", "--config", str(config), "--json"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("{")] == []  # No verdicts stored yet.
    assert run_report_cli(["alarms", "--config", str(config), "--json"]) == 0

    feed = tmp_path / "roster.csv"
    subject = secrets.token_hex(16)
    feed.write_text(HEADER + roster_line("S1", subject), encoding="utf-8")
    assert run_feeds_cli(["import", "roster", "--config", str(config), str(feed)]) == 0
    with PostgresFeedStore(postgres_url) as store:
        assert [row.subject for row in store.residents("S1")] == [subject]


def test_serve_reports_unreachable_postgres(broker: Broker, tmp_path: Path) -> None:
    url = f"postgresql://hub:secret-password@127.0.0.1:{free_port()}/edgenode"
    config = write_hub_config(tmp_path, broker, SigningKey.generate(), "down", url)
    process = start_serve(config)
    try:
        process.wait(timeout=60)
    finally:
        stop_all([process])
    output = config.with_suffix(".log").read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 1, output
    assert "cannot connect to the PostgreSQL store" in output
    assert "secret-password" not in output


def test_feed_cli_reports_unreachable_postgres(broker: Broker, tmp_path: Path) -> None:
    url = f"postgresql://hub:secret-password@127.0.0.1:{free_port()}/edgenode"
    config = write_hub_config(tmp_path, broker, SigningKey.generate(), "down", url)
    feed = tmp_path / "roster.csv"
    feed.write_text(HEADER, encoding="utf-8")

    with pytest.raises(DistrictError, match="cannot connect to the PostgreSQL store") as raised:
        run_feeds_cli(["import", "roster", "--config", str(config), str(feed)])
    assert "secret-password" not in str(raised.value)


def roster_line(site: str, subject: str) -> str:
    return f"{site},{subject},{subject[::-1]},张三丰,,1,101,resident,2026-01-01,2036-01-01\n"


def test_serve_answers_snapshot_request_from_postgres(
    broker: Broker, postgres_url: str, tmp_path: Path
) -> None:
    """Import and publish with the CLI into PostgreSQL, then a ``serve`` process sends a gate
    the snapshot it requests, and the next delta reaches the gate too."""
    district_key, gate_key = SigningKey.generate(), SigningKey.generate()
    config = write_hub_config(tmp_path, broker, district_key, "feeds", postgres_url)
    for role in ("health", "community"):
        write_key(tmp_path / KEY_FILES[role], SigningKey.generate())
    site = "XH-pg-serve"
    public_key = base64.b64encode(bytes(gate_key.verify_key)).decode("ascii")
    device = ["--site", site, "--device", "gate-01"]
    add = ["devices", "add", "--config", str(config), *device, "--public-key", public_key]
    assert run_hub_cli(add) == 0
    roster = tmp_path / "roster.csv"
    first, joining = secrets.token_hex(16), secrets.token_hex(16)
    roster.write_text(HEADER + roster_line(site, first), encoding="utf-8")
    assert run_feeds_cli(["import", "roster", "--config", str(config), str(roster)]) == 0
    publish = ["publish", "--config", str(config), "--site", site]
    # Version 1 is published before the gate connects, so only a request brings it.
    assert run_feeds_cli(publish) == 0

    process = start_serve(config)
    log_path = config.with_suffix(".log")
    sync = SyncConfig(enabled=True, broker_host=broker.host, broker_port=broker.port, keepalive_s=5)
    gate = Connection(sync, site=site, device="gate-01", backoff_base_s=0.1)
    downlink = Downlink(
        gate,
        site=site,
        device="gate-01",
        cache_path=tmp_path / "gate" / "cache.db",
        state_dir=tmp_path / "gate",
        district_keys=[bytes(district_key.verify_key)],
        signing_key=gate_key,
        stall_s=10.0,
    )

    def serve_connected() -> bool:
        return "broker_connected" in log_path.read_text(encoding="utf-8", errors="replace")

    try:

        async def scenario() -> None:
            await wait_until(serve_connected, 30, "serve connected to the broker")
            async with running(gate.run(), downlink.run()):
                await wait_until(lambda: gate.connected, 15, "the gate connected")
                await downlink.request_snapshot()
                await wait_until(lambda: downlink.status()["version"] == 1, 30, "snapshot 1")

                roster.write_text(
                    HEADER + roster_line(site, first) + roster_line(site, joining),
                    encoding="utf-8",
                )
                imported = await asyncio.to_thread(
                    run_feeds_cli, ["import", "roster", "--config", str(config), str(roster)]
                )
                assert imported == 0
                assert await asyncio.to_thread(run_feeds_cli, publish) == 0
                await wait_until(lambda: downlink.status()["version"] == 2, 30, "delta 2")

        asyncio.run(scenario())
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    finally:
        stop_all([process])
    output = log_path.read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 0, output
    assert "snapshot_requested" in output
    assert "requests_not_served" not in output
    assert downlink.rejections == {}
    with Cache(tmp_path / "gate" / "cache.db") as cache:
        assert cache.resident(bytes.fromhex(joining)) is not None


def run_feeds_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_feeds_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator("en")
    result: int = args.handler(args)
    return result
