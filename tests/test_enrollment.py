"""Enrollment from ``district enroll`` to a gate's first acked batch, with real parts.

The district side is the real CLI over a real hub store and key folder, and ``district
serve`` as a separate process on a real Mosquitto broker. The gate side is ``edgenode
provision`` from the CLI, then the gate's own Connection and Uplink over the journal that the
provisioned config names.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from edgenode import cli
from edgenode.cache import Cache, cache_version
from edgenode.codes import (
    Colour,
    CommunityCode,
    HealthCode,
    Role,
    encode_community,
    encode_health,
    parse_payload,
)
from edgenode.config import PolicyConfig, load_config
from edgenode.district import KEY_FILES, read_key
from edgenode.district_keys import fingerprint
from edgenode.enrollment import BrokerSettings, Bundle, read_bundle, write_bundle
from edgenode.journal import Journal
from edgenode.policy import ClockReading, Outcome, decide
from sync.connection import Connection
from sync.enrollment import hash_token, new_token
from sync.hub import default_hub_id
from sync.hub_store import HubStore, TokenRejected
from sync.identity import load_device_key
from sync.uplink import Uplink
from tests.broker import ADMIT, Broker, broker, free_port
from tests.test_sync_tls import PASSWORD, USERNAME, Pki, password_tls_broker, pki

__all__ = ["broker", "password_tls_broker", "pki"]

ROOT = Path(__file__).resolve().parent.parent
SITE = "XH-ENR1"
GATE = "gate-01"
SUBJECT = "0c" * 16
HEALTH_SUBJECT = "0d" * 16
WAIT_S = 30.0


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


@dataclass
class District:
    """A district's key folder, hub config and store, with one site's data imported."""

    folder: Path
    broker: Broker

    @property
    def config(self) -> Path:
        return self.folder / "hub.toml"

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    @property
    def store(self) -> Path:
        return self.folder / "hub.db"

    @property
    def fingerprint(self) -> str:
        return fingerprint(bytes(read_key(self.keys / KEY_FILES["district"]).verify_key))

    @property
    def log_path(self) -> Path:
        return self.folder / "serve.log"

    def serve_log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def bundle(self, token: str, *, expires_at: int, port: int | None = None) -> Bundle:
        """Build a bundle as ``district enroll`` does, for tests that store their own token."""
        district_key = read_key(self.keys / KEY_FILES["district"])
        return Bundle(
            site=SITE,
            device=GATE,
            station="north",
            broker=BrokerSettings(host=self.broker.host, port=port or self.broker.port, tls=False),
            district_keys=(base64.b64encode(bytes(district_key.verify_key)).decode("ascii"),),
            issuers=(),
            token=token,
            issued_at=int(time.time()),
            expires_at=expires_at,
        )


def make_district(
    folder: Path,
    target: Broker,
    capsys: pytest.CaptureFixture[str],
    broker_extra: str = "",
    *,
    publish: bool = True,
) -> District:
    """Create the district's keys, hub config and store. ``broker_extra`` ends ``[broker]``."""
    folder.mkdir(parents=True, exist_ok=True)
    district = District(folder, target)
    assert run_cli(capsys, "district", "issue", "keys", "--out", str(district.keys)).code == 0
    district.config.write_text(
        f"""hub_id = "enroll"
store = "hub.db"
district_key_file = "keys/district.key"

[broker]
host = "{target.host}"
port = {target.port}
keepalive_s = 5
{broker_extra}
""",
        encoding="utf-8",
    )
    roster = folder / "roster.csv"
    roster.write_text(
        "site,subject,health_subject,name,id_number,building,unit,role,valid_from,valid_until\n"
        f"{SITE},{SUBJECT},{HEALTH_SUBJECT},张三丰,110101199003071234,3,1-502,resident,"
        "2026-01-01,2036-01-01\n",
        encoding="utf-8",
    )
    health = folder / "health.csv"
    health.write_text(
        f"health_subject,colour,as_of\n{HEALTH_SUBJECT},green,{int(time.time())}\n",
        encoding="utf-8",
    )
    config = str(district.config)
    assert (
        run_cli(capsys, "district", "import", "roster", "--config", config, str(roster)).code == 0
    )
    assert (
        run_cli(capsys, "district", "import", "health", "--config", config, str(health)).code == 0
    )
    if publish:
        published = run_cli(capsys, "district", "publish", "--config", config, "--site", SITE)
        assert published.code == 0, published.err
    return district


@asynccontextmanager
async def serving(district: District) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Run ``district serve`` until the block ends, with its log in ``serve.log``."""
    with district.log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgenode.cli",
                "district",
                "serve",
                "--config",
                str(district.config),
            ],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        await wait_until(lambda: "broker_connected" in district.serve_log(), "the hub connected")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def provision(
    capsys: pytest.CaptureFixture[str], bundle: Path, gate: Path, *extra: str
) -> Run:
    """Run ``edgenode provision`` in a worker thread, since it runs its own event loop."""
    argv = [
        "provision",
        str(bundle),
        "--config-dir",
        str(gate / "etc"),
        "--state-dir",
        str(gate / "state"),
        "--timeout",
        "20",
        *extra,
    ]
    return await asyncio.to_thread(run_cli, capsys, *argv)


@dataclass
class ProvisionedGate:
    folder: Path

    @property
    def config_path(self) -> Path:
        return self.folder / "etc" / "edgenode.toml"

    def append_admit(self) -> None:
        config = load_config(self.config_path)
        with Journal(config.journal_path, config.device.id) as journal:
            journal.append_verdict(ADMIT, station="north", recorded_at=time.time(), latency_ms=2.0)

    def backlog(self) -> int:
        config = load_config(self.config_path)
        with Journal(config.journal_path, config.device.id) as journal:
            return journal.backlog_count()

    def tasks(self) -> list[asyncio.Task[None]]:
        config = load_config(self.config_path)
        sync = config.sync.model_copy(update={"ack_timeout_s": 2.0, "reconnect_max_s": 1.0})
        connection = Connection(sync, site=config.device.site, device=config.device.id)
        uplink = Uplink(
            connection,
            config.journal_path,
            device_key=load_device_key(config.device_key_path),
            district_keys=config.trust.district_key_bytes(),
            sync=sync,
        )
        return [asyncio.create_task(connection.run()), asyncio.create_task(uplink.run())]

    def decide_pair(self, district: District) -> Outcome:
        """Decide a green health code and a resident's community code on the gate's cache."""
        now = int(time.time())
        health = parse_payload(
            encode_health(
                read_key(district.keys / KEY_FILES["health"]),
                subject=bytes.fromhex(HEALTH_SUBJECT),
                colour=Colour.GREEN,
                issued_at=now - 5,
                expires_at=now + 3600,
            ).encode("ascii")
        )
        community = parse_payload(
            encode_community(
                read_key(district.keys / KEY_FILES["community"]),
                subject=bytes.fromhex(SUBJECT),
                role=Role.RESIDENT,
                compound=SITE,
                building="3",
                unit="1-502",
                issued_at=now - 5,
                expires_at=now + 3600,
            ).encode("ascii")
        )
        assert isinstance(health, HealthCode)
        assert isinstance(community, CommunityCode)
        config = load_config(self.config_path)
        with Cache(config.cache_path) as cache:
            verdict = decide(health, community, cache, ClockReading(now), PolicyConfig(), site=SITE)
        return verdict.outcome


@asynccontextmanager
async def uplink_running(gate: ProvisionedGate) -> AsyncIterator[None]:
    tasks = gate.tasks()
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def listed_devices(
    capsys: pytest.CaptureFixture[str], district: District
) -> list[dict[str, object]]:
    result = run_cli(
        capsys, "district", "devices", "list", "--config", str(district.config), "--json"
    )
    assert result.code == 0, result.err
    devices: list[dict[str, object]] = json.loads(result.out)["devices"]
    return devices


def alarm_lines(district: District) -> list[str]:
    return [
        line
        for line in district.serve_log().splitlines()
        if "alarm_raised" in line and "enroll_rejected" in line
    ]


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*")) if folder.exists() else []


# --- end to end ---


def test_enroll_provision_then_batches_follow_registry(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    district = make_district(tmp_path / "district", broker, capsys)
    bundle = tmp_path / "bundle.json"
    enrolled = run_cli(
        capsys,
        "district",
        "enroll",
        "--config",
        str(district.config),
        "--site",
        SITE,
        "--gate",
        GATE,
        "--station",
        "north",
        "--broker",
        f"mqtt://{broker.host}:{broker.port}",
        "--out",
        str(bundle),
    )
    assert enrolled.code == 0, enrolled.err
    assert "已为小区" in enrolled.out
    assert district.fingerprint in enrolled.out
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    gate = ProvisionedGate(tmp_path / "gate")
    common = ["--config", str(district.config), "--site", SITE, "--device", GATE]

    async def scenario() -> None:
        async with serving(district):
            result = await provision(
                capsys, bundle, gate.folder, "--district-key", district.fingerprint
            )
            assert result.code == 0, result.err
            assert "已完成配置" in result.out

            again = await provision(capsys, bundle, tmp_path / "second-gate")
            assert again.code == 1
            assert "token_used" in again.err
            assert "已被另一台设备使用" in again.err
            assert files_under(tmp_path / "second-gate") == []
            assert "enroll_rejected" in district.serve_log()

            gate.append_admit()
            async with uplink_running(gate):
                await wait_until(lambda: gate.backlog() == 0, "the first batch acked")

                assert run_cli(capsys, "district", "devices", "disable", *common).code == 0
                gate.append_admit()
                await wait_until(
                    lambda: "device_disabled" in district.serve_log(), "the batch rejected"
                )
                assert gate.backlog() == 1

                assert run_cli(capsys, "district", "devices", "enable", *common).code == 0
                await wait_until(lambda: gate.backlog() == 0, "the batch accepted again")

    asyncio.run(scenario())

    config = load_config(gate.config_path)
    assert run_cli(capsys, "config", "check", str(gate.config_path)).code == 0
    assert stat.S_IMODE(config.device_key_path.stat().st_mode) == 0o600
    assert cache_version(config.cache_path) is not None
    assert gate.decide_pair(district) is Outcome.ADMIT
    devices = listed_devices(capsys, district)
    assert [(device["site"], device["device"]) for device in devices] == [(SITE, GATE)]
    assert devices[0]["enabled"] is True
    public = base64.b64encode(bytes(load_device_key(config.device_key_path).verify_key))
    assert devices[0]["public_key"] == public.decode("ascii")


def test_provision_over_tls_with_password(
    password_tls_broker: Broker, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password_file = tmp_path / "gate.password"
    password_file.write_text(PASSWORD + "\n", encoding="utf-8")
    password_file.chmod(0o600)
    district = make_district(
        tmp_path / "district",
        password_tls_broker,
        capsys,
        f'username = "{USERNAME}"\npassword_file = "{password_file}"\n'
        f'[broker.tls]\nca_file = "{pki.ca_cert}"',
    )
    bundle = tmp_path / "bundle.json"
    enrolled = run_cli(
        capsys,
        "district",
        "enroll",
        "--config",
        str(district.config),
        "--site",
        SITE,
        "--gate",
        GATE,
        "--broker",
        f"mqtts://{password_tls_broker.host}:{password_tls_broker.port}",
        "--ca-file",
        str(pki.ca_cert),
        "--username",
        USERNAME,
        "--password-file",
        str(password_file),
        "--out",
        str(bundle),
    )
    assert enrolled.code == 0, enrolled.err
    gate = ProvisionedGate(tmp_path / "gate")

    async def scenario() -> Run:
        async with serving(district):
            return await provision(capsys, bundle, gate.folder)

    result = asyncio.run(scenario())
    assert result.code == 0, result.err
    config = load_config(gate.config_path)
    assert config.sync.tls is not None
    assert config.sync.tls.ca_file is not None
    assert config.sync.tls.ca_file.read_text(encoding="utf-8") == pki.ca_cert.read_text(
        encoding="utf-8"
    ).strip("\n")
    assert config.sync.username == USERNAME
    assert config.sync.password_file is not None
    assert config.sync.password_file.read_text(encoding="utf-8") == PASSWORD
    assert stat.S_IMODE(config.sync.password_file.stat().st_mode) == 0o600
    assert cache_version(config.cache_path) is not None


def test_provision_finishes_on_second_run(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    district = make_district(tmp_path / "district", broker, capsys, publish=False)
    bundle = tmp_path / "bundle.json"
    config = str(district.config)
    enroll = ["district", "enroll", "--config", config, "--site", SITE, "--gate", GATE]
    broker_url = f"mqtt://{broker.host}:{broker.port}"
    assert run_cli(capsys, *enroll, "--broker", broker_url, "--out", str(bundle)).code == 0
    gate = ProvisionedGate(tmp_path / "gate")
    staged = gate.folder / "etc" / "edgenode.toml.provisioning"

    async def scenario() -> tuple[Run, Run]:
        async with serving(district):
            first = await provision(capsys, bundle, gate.folder, "--timeout", "3")
            staged_after_first = staged.exists()
            published = await asyncio.to_thread(
                run_cli, capsys, "district", "publish", "--config", config, "--site", SITE
            )
            assert published.code == 0, published.err
            second = await provision(capsys, bundle, gate.folder)
            assert staged_after_first
            return first, second

    first, second = asyncio.run(scenario())
    assert first.code == 1
    assert "设备已注册" in first.err
    assert second.code == 0, second.err
    assert gate.config_path.exists()
    assert not staged.exists()
    assert cache_version(load_config(gate.config_path).cache_path) is not None


def test_hub_rejects_unknown_and_expired_tokens(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    district = make_district(tmp_path / "district", broker, capsys)
    district_key = read_key(district.keys / KEY_FILES["district"])
    unknown = tmp_path / "unknown.json"
    write_bundle(
        unknown, district.bundle(new_token(), expires_at=int(time.time()) + 600), district_key
    )
    expired_token = new_token()
    with HubStore(district.store) as store:
        store.add_enrollment_token(
            hash_token(expired_token), SITE, GATE, expires_at=time.time() - 60
        )
    expired = tmp_path / "expired.json"
    # The bundle claims a later expiry than the hub's record, so the hub's check decides.
    write_bundle(
        expired, district.bundle(expired_token, expires_at=int(time.time()) + 600), district_key
    )

    async def scenario() -> tuple[Run, Run]:
        async with serving(district):
            first = await provision(capsys, unknown, tmp_path / "gate-a")
            second = await provision(capsys, expired, tmp_path / "gate-b")
            # Both are logged. The alarm for the same gate is raised once per repeat interval.
            await wait_until(
                lambda: district.serve_log().count('"event": "enroll_rejected"') == 2,
                "both rejections logged",
            )
            await wait_until(lambda: len(alarm_lines(district)) == 1, "the alarm raised")
            return first, second

    unknown_run, expired_run = asyncio.run(scenario())
    assert unknown_run.code == 1
    assert "unknown_token" in unknown_run.err
    assert expired_run.code == 1
    assert "token_expired" in expired_run.err
    assert files_under(tmp_path / "gate-a") == []
    assert files_under(tmp_path / "gate-b") == []
    assert listed_devices(capsys, district) == []


def test_provision_times_out_without_hub(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    district = District(tmp_path / "district", broker)
    assert run_cli(capsys, "district", "issue", "keys", "--out", str(district.keys)).code == 0
    bundle = tmp_path / "bundle.json"
    district_key = read_key(district.keys / KEY_FILES["district"])
    write_bundle(
        bundle, district.bundle(new_token(), expires_at=int(time.time()) + 600), district_key
    )

    result = run_cli(
        capsys,
        "provision",
        str(bundle),
        "--config-dir",
        str(tmp_path / "gate" / "etc"),
        "--state-dir",
        str(tmp_path / "gate" / "state"),
        "--timeout",
        "2",
    )
    assert result.code == 1
    assert "街道端服务是否在运行" in result.err
    assert files_under(tmp_path / "gate") == []


# --- failures before the hub answers ---


@pytest.fixture
def offline_district(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[District]:
    """A district whose key folder and store exist, with a broker that is never started."""
    folder = tmp_path / "district"
    district = District(folder, Broker(tmp_path))
    assert run_cli(capsys, "district", "issue", "keys", "--out", str(district.keys)).code == 0
    district.config.write_text(
        'store = "hub.db"\ndistrict_key_file = "keys/district.key"\n', encoding="utf-8"
    )
    yield district


def test_provision_fails_cleanly_without_broker(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.json"
    enrolled = run_cli(
        capsys,
        "district",
        "enroll",
        "--config",
        str(offline_district.config),
        "--site",
        SITE,
        "--gate",
        GATE,
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        "--out",
        str(bundle),
    )
    assert enrolled.code == 0, enrolled.err
    result = run_cli(
        capsys,
        "provision",
        str(bundle),
        "--config-dir",
        str(tmp_path / "gate" / "etc"),
        "--state-dir",
        str(tmp_path / "gate" / "state"),
        "--timeout",
        "2",
    )

    assert result.code == 1
    assert "无法连接代理服务器" in result.err
    assert files_under(tmp_path / "gate") == []


def test_provision_rejects_tampered_bundle(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.json"
    district_key = read_key(offline_district.keys / KEY_FILES["district"])
    write_bundle(
        bundle,
        offline_district.bundle(new_token(), expires_at=int(time.time()) + 600),
        district_key,
    )
    document = json.loads(bundle.read_text(encoding="utf-8"))
    document["body"]["device"] = "gate-99"
    bundle.write_text(json.dumps(document), encoding="utf-8")

    result = run_cli(capsys, "provision", str(bundle), "--config-dir", str(tmp_path / "etc"))
    assert result.code == 1
    assert "bad_signature" in result.err
    assert "签名校验失败" in result.err
    assert not (tmp_path / "etc").exists()


def test_provision_rejects_other_district_fingerprint(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.json"
    district_key = read_key(offline_district.keys / KEY_FILES["district"])
    write_bundle(
        bundle,
        offline_district.bundle(new_token(), expires_at=int(time.time()) + 600),
        district_key,
    )
    other = fingerprint(bytes(SigningKey.generate().verify_key))

    result = run_cli(
        capsys,
        "provision",
        str(bundle),
        "--config-dir",
        str(tmp_path / "etc"),
        "--district-key",
        other,
    )
    assert result.code == 1
    assert "请勿使用" in result.err
    assert not (tmp_path / "etc").exists()


def test_provision_rejects_expired_bundle(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.json"
    district_key = read_key(offline_district.keys / KEY_FILES["district"])
    write_bundle(
        bundle, offline_district.bundle(new_token(), expires_at=int(time.time()) - 60), district_key
    )

    result = run_cli(capsys, "provision", str(bundle), "--config-dir", str(tmp_path / "etc"))
    assert result.code == 1
    assert "已于" in result.err
    assert not (tmp_path / "etc").exists()


def test_enroll_stores_only_token_hash(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.json"
    result = run_cli(
        capsys,
        "--lang",
        "en",
        "district",
        "enroll",
        "--config",
        str(offline_district.config),
        "--site",
        SITE,
        "--gate",
        GATE,
        "--broker",
        "mqtts://mqtt.district.example:8883",
        "--out",
        str(bundle),
    )
    assert result.code == 0, result.err
    assert "Wrote the enrollment bundle" in result.out
    loaded, _ = read_bundle(bundle)
    assert loaded.broker.tls is True
    with closing(sqlite3.connect(offline_district.store)) as db:
        rows = db.execute("SELECT token_hash FROM enrollment_tokens").fetchall()
    assert rows == [(hash_token(loaded.token),)]
    assert loaded.token.encode("ascii") not in offline_district.store.read_bytes()


def test_enroll_rejects_invalid_gate_id(
    offline_district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(
        capsys,
        "district",
        "enroll",
        "--config",
        str(offline_district.config),
        "--site",
        SITE,
        "--gate",
        "gate 01",
        "--broker",
        "mqtts://mqtt.district.example",
        "--out",
        str(tmp_path / "bundle.json"),
    )

    assert result.code == 1
    assert "id" in result.err
    assert not (tmp_path / "bundle.json").exists()
    assert not offline_district.store.exists()


@pytest.mark.parametrize(
    ("broker", "warned"), [("mqtt://127.0.0.1:1883", True), ("mqtts://h", False)]
)
def test_enroll_warns_about_broker_without_tls(
    offline_district: District,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    broker: str,
    warned: bool,
) -> None:
    out = tmp_path / "bundle.json"
    result = run_cli(
        capsys,
        "--lang",
        "en",
        "district",
        "enroll",
        "--config",
        str(offline_district.config),
        "--site",
        SITE,
        "--gate",
        "gate-01",
        "--broker",
        broker,
        "--out",
        str(out),
    )

    assert result.code == 0
    assert ("has no TLS" in result.err) is warned
    assert out.exists()


def test_default_hub_id_fits_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "hub1.district.example")
    assert default_hub_id() == "hub1-district-example"


# --- the store's token checks ---


def test_store_redeems_token_once(tmp_path: Path) -> None:
    key = bytes(SigningKey.generate().verify_key)
    other_key = bytes(SigningKey.generate().verify_key)
    with HubStore(tmp_path / "hub.db") as store:
        store.add_enrollment_token(b"t" * 32, SITE, GATE, expires_at=2_000.0, now=1_000.0)
        device = store.redeem_enrollment_token(b"t" * 32, SITE, GATE, key, now=1_500.0)
        again = store.redeem_enrollment_token(b"t" * 32, SITE, GATE, key, now=2_500.0)
        with pytest.raises(TokenRejected) as used:
            store.redeem_enrollment_token(b"t" * 32, SITE, GATE, other_key, now=1_600.0)

    assert device.public_key == key
    assert device.enabled is True
    assert again == device
    assert used.value.reason == "token_used"


@pytest.mark.parametrize(
    ("token_hash", "device", "now", "reason"),
    [
        pytest.param(b"x" * 32, GATE, 1_500.0, "unknown_token", id="unknown"),
        pytest.param(b"t" * 32, "gate-02", 1_500.0, "token_mismatch", id="other-gate"),
        pytest.param(b"t" * 32, GATE, 2_001.0, "token_expired", id="expired"),
    ],
)
def test_store_rejects_token(
    tmp_path: Path, token_hash: bytes, device: str, now: float, reason: str
) -> None:
    key = bytes(SigningKey.generate().verify_key)
    with HubStore(tmp_path / "hub.db") as store:
        store.add_enrollment_token(b"t" * 32, SITE, GATE, expires_at=2_000.0, now=1_000.0)
        with pytest.raises(TokenRejected) as rejected:
            store.redeem_enrollment_token(token_hash, SITE, device, key, now=now)
        registered = store.list_devices()

    assert rejected.value.reason == reason
    assert registered == []


def test_store_rejects_token_for_registered_gate(tmp_path: Path) -> None:
    key = bytes(SigningKey.generate().verify_key)
    with HubStore(tmp_path / "hub.db") as store:
        store.add_enrollment_token(b"t" * 32, SITE, GATE, expires_at=2_000.0, now=1_000.0)
        store.register_device(SITE, GATE, bytes(SigningKey.generate().verify_key))
        with pytest.raises(TokenRejected) as rejected:
            store.redeem_enrollment_token(b"t" * 32, SITE, GATE, key, now=1_500.0)

    assert rejected.value.reason == "device_registered"
