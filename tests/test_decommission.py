"""`edgenode decommission`: deliver the backlog, have the hub disable the gate, wipe its files.

The district side is a real Hub on a real Mosquitto; the command runs as a real process.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path

from nacl.signing import SigningKey

from edgenode.config import SyncConfig
from edgenode.decommission import wipe
from edgenode.journal import Journal
from sync.hub import Hub
from sync.hub_store import HubStore
from sync.identity import ensure_device_key
from tests.broker import DENY, Broker, broker  # noqa: F401

SITE = "S1"
DEVICE = "gate-retire"
TIMEOUT_S = 30


def write_gate(folder: Path, district_key: SigningKey, target: Broker | None) -> Path:
    """Write a gate's config with its state folder beside it, and return the config path."""
    key = base64.b64encode(bytes(district_key.verify_key)).decode()
    sync = ""
    if target is not None:
        sync = (
            f'[sync]\nenabled = true\nbroker_host = "{target.host}"\n'
            f"broker_port = {target.port}\nkeepalive_s = 5\nack_timeout_s = 2\n"
        )
    config = folder / "edgenode.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\nsite = "{SITE}"\nstate_dir = "state"\n\n'
        f'[trust]\ndistrict_keys = ["{key}"]\n\n{sync}',
        encoding="utf-8",
    )
    return config


def add_records(folder: Path, count: int) -> None:
    with Journal(folder / "state" / "journal.db", DEVICE) as journal:
        for _ in range(count):
            journal.append_verdict(DENY, station="north", recorded_at=time.time(), latency_ms=1.0)


def decommission(
    config: Path, *extra: str, timeout_s: float = 5
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgenode.cli",
            "--lang",
            "en",
            "decommission",
            "--config",
            str(config),
            "--timeout-s",
            str(timeout_s),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S + 30,
        check=False,
    )


def remaining_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# --- without a district ---


def test_decommission_asks_for_confirmation(tmp_path: Path) -> None:
    config = write_gate(tmp_path, SigningKey.generate(), None)
    add_records(tmp_path, 1)
    result = decommission(config)
    assert result.returncode == 2
    assert "--yes" in result.stdout
    assert (tmp_path / "state" / "journal.db").exists()


def test_undelivered_records_block_decommission(tmp_path: Path) -> None:
    config = write_gate(tmp_path, SigningKey.generate(), None)
    add_records(tmp_path, 2)
    result = decommission(config, "--yes")
    assert result.returncode == 1
    assert "2 records were never sent" in result.stdout
    assert (tmp_path / "state" / "journal.db").exists()
    assert config.exists()


def test_forced_decommission_wipes_everything(tmp_path: Path) -> None:
    config = write_gate(tmp_path, SigningKey.generate(), None)
    add_records(tmp_path, 2)
    state = tmp_path / "state"
    ensure_device_key(state / "device.key")
    (state / "cache.db").write_bytes(b"cache")
    (state / "journal.db.corrupt-20261204T000000Z").write_bytes(b"moved aside")
    (state / "spool").mkdir()
    (state / "spool" / "chunk-0").write_bytes(b"chunk")
    result = decommission(config, "--yes", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No data of gate" in result.stdout
    assert not state.exists()
    assert not config.exists()
    assert remaining_files(tmp_path) == []


def test_running_daemon_blocks_decommission(tmp_path: Path) -> None:
    config = write_gate(tmp_path, SigningKey.generate(), None)
    state = tmp_path / "state"
    state.mkdir()
    # A process whose command line names edgenode plays the part of `edgenode run`.
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "edgenode"])
    try:
        (state / "sync-state.json").write_text(f'{{"pid": {daemon.pid}}}', encoding="utf-8")
        result = decommission(config, "--yes", "--force")
    finally:
        daemon.kill()
        daemon.wait(timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert f"pid {daemon.pid}" in result.stdout
    assert config.exists()


def test_wipe_removes_symlink_not_its_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not the gate's")
    state = tmp_path / "state"
    state.mkdir()
    (state / "link").symlink_to(outside)
    (state / "folder-link").symlink_to(tmp_path, target_is_directory=True)
    removed, remaining = wipe([state])
    assert removed == 2
    assert remaining == []
    assert outside.read_text() == "not the gate's"


# --- with the district hub ---


async def run_with_hub(
    tmp_path: Path, target: Broker, *, hub_running: bool, extra: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], HubStore]:
    district_key = SigningKey.generate()
    config = write_gate(tmp_path, district_key, target)
    device_key = ensure_device_key(tmp_path / "state" / "device.key")
    add_records(tmp_path, 3)
    store_path = tmp_path / "hub.db"
    with HubStore(store_path) as store:
        store.register_device(SITE, DEVICE, bytes(device_key.verify_key))
    sync = SyncConfig(enabled=True, broker_host=target.host, broker_port=target.port)
    hub = Hub(sync, store_path=store_path, district_key=district_key, hub_id="h1")
    hub_task = asyncio.create_task(hub.run()) if hub_running else None
    try:
        if hub_running:
            deadline = time.monotonic() + TIMEOUT_S
            while not hub.connection.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        timeout_s = TIMEOUT_S if hub_running else 3
        result = await asyncio.to_thread(decommission, config, "--yes", *extra, timeout_s=timeout_s)
    finally:
        if hub_task is not None:
            hub_task.cancel()
            await asyncio.gather(hub_task, return_exceptions=True)
    return result, HubStore(store_path)


def test_hub_disables_gate_and_gate_is_wiped(tmp_path: Path, broker: Broker) -> None:  # noqa: F811
    result, store = asyncio.run(run_with_hub(tmp_path, broker, hub_running=True))
    with store:
        device = store.get_device(SITE, DEVICE)
        stored = [] if device is None else [record["seq"] for record in store.records(device)]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The district disabled gate" in result.stdout
    assert device is not None
    assert device.enabled is False
    assert stored == [1, 2, 3]
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "edgenode.toml").exists()


def test_unconfirmed_decommission_keeps_files(tmp_path: Path, broker: Broker) -> None:  # noqa: F811
    result, store = asyncio.run(run_with_hub(tmp_path, broker, hub_running=False))
    with store:
        device = store.get_device(SITE, DEVICE)
    assert result.returncode == 1
    assert "still have no ack" in result.stdout
    assert device is not None
    assert device.enabled is True
    assert (tmp_path / "state" / "journal.db").exists()


def test_forced_decommission_without_hub_wipes(tmp_path: Path, broker: Broker) -> None:  # noqa: F811
    result, store = asyncio.run(
        run_with_hub(tmp_path, broker, hub_running=False, extra=("--force",))
    )
    store.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "disable gate" in result.stdout
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "edgenode.toml").exists()
