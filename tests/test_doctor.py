"""`edgenode doctor`: every check passes on a healthy part and fails, with a fix, on a broken one.

Real files, a real journal and cache, real Mosquitto brokers (with TLS), a recorded video for
the cameras and pseudo-terminals for serial scanners. timedatectl needs systemd as PID 1, which
a test machine may lack, so the clock tests run small stand-in scripts in its place.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgenode.cli import main
from edgenode.clock import kernel_ntp_synchronised
from edgenode.config import (
    CameraSourceConfig,
    Config,
    HidSourceConfig,
    SerialSourceConfig,
    VideoSourceConfig,
    load_config,
)
from edgenode.doctor import (
    EXIT_FAILED,
    EXIT_USAGE,
    DoctorOptions,
    Status,
    check_broker,
    check_cache,
    check_camera,
    check_clock,
    check_config,
    check_disk,
    check_journal,
    check_keys,
    check_scanner,
    exit_code,
    run_checks,
)
from edgenode.journal import Journal
from sync.identity import ensure_device_key
from tests.broker import ADMIT, DENY, Broker, broker  # noqa: F401 - the fixture
from tests.scenarios import SITE, DirectMinter, Scenario, Site, build_cache, site_config
from tests.test_sync_tls import Pki, anonymous_tls_broker, pki  # noqa: F401 - the fixtures

DAY = 86_400


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site.create(tmp_path, int(time.time()), DirectMinter())


@pytest.fixture
def config(site: Site) -> Config:
    return site_config(site)


def write_video(path: Path, frames: int = 5) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (320, 240))
    for n in range(frames):
        writer.write(np.full((240, 320, 3), 40 * n, dtype=np.uint8))
    writer.release()
    return path


def write_config(folder: Path, body: str) -> Path:
    path = folder / "edgenode.toml"
    path.write_text(
        f'[device]\nid = "gate-doctor"\nsite = "{SITE}"\nstate_dir = "state"\n{body}',
        encoding="utf-8",
    )
    return path


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--lang", "en", *args])
    return code, out.getvalue()


# --- config ---


def test_valid_config_passes(tmp_path: Path) -> None:
    finding, config = check_config(write_config(tmp_path, ""))
    assert finding.status is Status.PASSED
    assert config is not None


def test_invalid_config_fails_with_key_path(tmp_path: Path) -> None:
    finding, config = check_config(write_config(tmp_path, "[policy]\nstale_after_s = 1\n"))
    assert finding.status is Status.FAILED
    assert "policy.stale_after_s" in finding.values["issues"]
    assert config is None


def test_invalid_config_stops_the_checklist(tmp_path: Path) -> None:
    results = run_checks(write_config(tmp_path, "[unknown]\n"))
    assert [result.check for result in results] == ["config"]
    assert exit_code(results) == EXIT_USAGE


def test_config_without_sources_fails(tmp_path: Path) -> None:
    results = {result.check: result for result in run_checks(write_config(tmp_path, ""))}
    assert results["sources"].finding.status is Status.FAILED
    assert "[[sources]]" in results["sources"].finding.fix


# --- keys ---


def test_owner_only_device_key_passes(config: Config) -> None:
    config.device.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_device_key(config.device_key_path)
    assert check_keys(config).status is Status.PASSED


def test_missing_device_key_fails(config: Config) -> None:
    finding = check_keys(config)
    assert finding.status is Status.FAILED
    assert str(config.device_key_path) in finding.values["paths"]
    assert "edgenode init" in finding.fix


def test_group_readable_device_key_fails(config: Config) -> None:
    config.device.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_device_key(config.device_key_path)
    config.device_key_path.chmod(0o640)
    finding = check_keys(config)
    assert finding.status is Status.FAILED
    assert "0640" in finding.values["paths"]


def test_world_readable_password_file_fails(site: Site, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("secret\n", encoding="utf-8")
    password.chmod(0o644)
    config = site_config(site, sync={"password_file": str(password)})
    config.device.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_device_key(config.device_key_path)
    finding = check_keys(config)
    assert finding.status is Status.FAILED
    assert str(password) in finding.values["paths"]


def test_missing_id_lookup_key_fails(site: Site, tmp_path: Path) -> None:
    lookup_key = tmp_path / "id-lookup.key"
    config = site_config(site, guard={"id_lookup_key_file": str(lookup_key)})
    config.device.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_device_key(config.device_key_path)
    finding = check_keys(config)
    assert finding.status is Status.FAILED
    assert finding.values["paths"] == str(lookup_key)


# --- cameras ---


def test_video_source_delivers_frames(tmp_path: Path) -> None:
    video = write_video(tmp_path / "gate.avi")
    finding = check_camera(VideoSourceConfig(type="video", name="trial", path=video))
    assert finding.status is Status.PASSED
    assert (finding.values["width"], finding.values["height"]) == (320, 240)


def test_camera_with_recorded_stream_passes(tmp_path: Path) -> None:
    video = write_video(tmp_path / "recorded.avi")
    camera = CameraSourceConfig(type="camera", name="front", device="/dev/video-front")
    finding = check_camera(camera, lambda _config: cv2.VideoCapture(str(video)))
    assert finding.status is Status.PASSED


def test_missing_camera_fails() -> None:
    camera = CameraSourceConfig(type="camera", name="front", device="/dev/video-missing-99")
    finding = check_camera(camera)
    assert finding.status is Status.FAILED
    assert "/dev/video-missing-99" in finding.values["error"]


def test_camera_without_frames_fails(tmp_path: Path) -> None:
    empty = write_video(tmp_path / "empty.avi", frames=0)
    camera = CameraSourceConfig(type="camera", name="front", device="/dev/video-front")
    finding = check_camera(camera, lambda _config: cv2.VideoCapture(str(empty)))
    assert finding.status is Status.FAILED


class HangingCapture:
    """A camera that opens and then never returns from read, until released by the test."""

    def __init__(self) -> None:
        self.unblock = threading.Event()

    def read(self) -> tuple[bool, Any]:
        self.unblock.wait(30)
        return False, None

    def release(self) -> None:
        self.unblock.set()


def test_hanging_camera_fails_after_timeout(tmp_path: Path) -> None:
    capture = HangingCapture()
    path = write_config(tmp_path, '[[sources]]\ntype = "camera"\nname = "front"\n')
    options = DoctorOptions(camera_timeout_s=0.5, open_capture=lambda _config: capture)
    try:
        results = {result.check: result for result in run_checks(path, options)}
    finally:
        capture.unblock.set()
    finding = results["camera:front"].finding
    assert finding.status is Status.FAILED
    assert finding.values["seconds"] == 0.5


# --- scanners ---


@pytest.fixture
def pty_path() -> Iterator[str]:
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_serial_scanner_on_pty_passes(pty_path: str) -> None:
    scanner = SerialSourceConfig(type="serial", name="scanner", device=pty_path)
    assert check_scanner(scanner).status is Status.PASSED


def test_missing_serial_scanner_fails(tmp_path: Path) -> None:
    device = str(tmp_path / "ttyUSB-missing")
    finding = check_scanner(SerialSourceConfig(type="serial", name="scanner", device=device))
    assert finding.status is Status.FAILED
    assert finding.values["device"] == device


def test_regular_file_is_not_a_serial_scanner(tmp_path: Path) -> None:
    path = tmp_path / "not-a-port"
    path.write_bytes(b"")
    finding = check_scanner(SerialSourceConfig(type="serial", name="scanner", device=str(path)))
    assert finding.status is Status.FAILED
    assert finding.message == "{device} is not a serial port."


def test_absent_keyboard_scanner_fails() -> None:
    scanner = HidSourceConfig(type="hid", name="wedge", vid_pid="ffff:fffe")
    finding = check_scanner(scanner)
    assert finding.status is Status.FAILED
    assert "ffff:fffe" in finding.values["error"]


# --- broker ---


def tls_config(site: Site, target: Broker, pki: Pki) -> Config:  # noqa: F811
    return site_config(
        site,
        sync={
            "enabled": True,
            "broker_host": target.host,
            "broker_port": target.port,
            "tls": {"ca_file": str(pki.ca_cert)},
        },
    )


def test_tls_broker_passes(site: Site, anonymous_tls_broker: Broker, pki: Pki) -> None:  # noqa: F811
    finding = check_broker(tls_config(site, anonymous_tls_broker, pki), timeout_s=10)
    assert finding.status is Status.PASSED


def test_broker_with_unknown_ca_fails(
    site: Site,
    anonymous_tls_broker: Broker,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    config = site_config(
        site,
        sync={
            "enabled": True,
            "broker_host": anonymous_tls_broker.host,
            "broker_port": anonymous_tls_broker.port,
            "tls": {"ca_file": str(pki.other_ca_cert)},
        },
    )
    finding = check_broker(config, timeout_s=10)
    assert finding.status is Status.FAILED
    assert "error" in finding.values


def test_plain_broker_fails_for_missing_tls(site: Site, broker: Broker) -> None:  # noqa: F811
    config = site_config(
        site, sync={"enabled": True, "broker_host": broker.host, "broker_port": broker.port}
    )
    finding = check_broker(config)
    assert finding.status is Status.FAILED
    assert "[sync.tls]" in finding.fix


def test_hanging_broker_fails_after_timeout(
    site: Site,
    anonymous_tls_broker: Broker,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    anonymous_tls_broker.pause()
    try:
        finding = check_broker(tls_config(site, anonymous_tls_broker, pki), timeout_s=1)
    finally:
        anonymous_tls_broker.resume()
    assert finding.status is Status.FAILED
    assert finding.values.get("seconds") == 1


def test_broker_check_skipped_without_sync(config: Config) -> None:
    assert check_broker(config).status is Status.SKIPPED


# --- cache ---


def test_fresh_cache_passes(site: Site, config: Config) -> None:
    build_cache(site, Scenario([]), config)
    assert check_cache(config, now=site.now).status is Status.PASSED


def test_empty_cache_fails(config: Config) -> None:
    finding = check_cache(config)
    assert finding.status is Status.FAILED
    assert "edgenode cache import" in finding.fix


def test_stale_cache_fails(site: Site, config: Config) -> None:
    build_cache(site, Scenario([], snapshot_age_s=3 * DAY), config)
    finding = check_cache(config, now=site.now)
    assert finding.status is Status.FAILED
    assert "72 h" in finding.values["datasets"]


# --- clock ---


@pytest.fixture
def timedatectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], None]:
    """Put a stand-in timedatectl first on PATH that prints a value and exits with a status."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    def install(output: str, exit_status: int = 0) -> None:
        script = folder / "timedatectl"
        script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_status}\n", encoding="utf-8")
        script.chmod(0o755)

    return install


def clock_config(site: Site, source: str) -> Config:
    return site_config(site, clock={"ntp_source": source})


def test_synchronised_clock_passes(site: Site, timedatectl: Callable[[str, int], None]) -> None:
    timedatectl("yes", 0)
    finding = check_clock(clock_config(site, "timedatectl"))
    assert finding.status is Status.PASSED
    assert finding.values["source"] == "timedatectl"


def test_unsynchronised_clock_fails(site: Site, timedatectl: Callable[[str, int], None]) -> None:
    timedatectl("no", 0)
    finding = check_clock(clock_config(site, "timedatectl"))
    assert finding.status is Status.FAILED
    assert "NTP client" in finding.fix


def test_unreadable_clock_source_fails(site: Site, timedatectl: Callable[[str, int], None]) -> None:
    timedatectl("Failed to connect to bus: Host is down", 1)
    finding = check_clock(clock_config(site, "timedatectl"))
    assert finding.status is Status.FAILED
    assert "clock.ntp_source" in finding.fix


def test_kernel_clock_source_matches_adjtimex(site: Site) -> None:
    finding = check_clock(clock_config(site, "kernel"))
    expected = Status.PASSED if kernel_ntp_synchronised() else Status.FAILED
    assert finding.status is expected
    assert finding.values["source"] == "kernel"


def test_battery_clock_passes(site: Site) -> None:
    assert check_clock(clock_config(site, "rtc")).status is Status.PASSED


# --- disk ---


def test_enough_disk_space_passes(config: Config) -> None:
    assert check_disk(config, min_free_bytes=1).status is Status.PASSED


def test_low_disk_space_fails(config: Config) -> None:
    finding = check_disk(config, min_free_bytes=2**62)
    assert finding.status is Status.FAILED
    assert finding.values["needed"] == 2**42


# --- journal ---


def record_verdicts(config: Config) -> None:
    with Journal(config.journal_path, config.device.id) as journal:
        for verdict in (ADMIT, DENY, ADMIT):
            journal.append_verdict(verdict, station="north", recorded_at=time.time(), latency_ms=1)


def test_intact_journal_passes(config: Config) -> None:
    record_verdicts(config)
    finding = check_journal(config)
    assert finding.status is Status.PASSED
    assert finding.values["n"] == 3


def test_edited_journal_fails(config: Config) -> None:
    record_verdicts(config)
    conn = sqlite3.connect(config.journal_path)
    with conn:
        conn.execute("UPDATE records SET verdict = 'admit' WHERE seq = 2")
    conn.close()
    finding = check_journal(config)
    assert finding.status is Status.FAILED
    assert finding.values["seq"] == 2


def test_missing_journal_is_skipped(config: Config) -> None:
    assert check_journal(config).status is Status.SKIPPED


# --- the command ---


def healthy_gate(site: Site, pty: str) -> Path:
    key = base64.b64encode(site.district_public_key()).decode()
    config_path = write_config(
        site.folder,
        f'[trust]\ndistrict_keys = ["{key}"]\n\n[clock]\nntp_source = "rtc"\n\n'
        f'[[sources]]\ntype = "serial"\nname = "scanner"\ndevice = "{pty}"\n',
    )
    config = load_config(config_path)
    build_cache(site, Scenario([]), config)
    ensure_device_key(config.device_key_path)
    record_verdicts(config)
    return config_path


def test_healthy_gate_passes_every_check(site: Site, pty_path: str) -> None:
    config_path = healthy_gate(site, pty_path)
    results = run_checks(config_path)
    statuses = {result.check: result.finding.status for result in results}
    assert statuses == {
        "config": Status.PASSED,
        "keys": Status.PASSED,
        "scanner:scanner": Status.PASSED,
        "broker": Status.SKIPPED,
        "cache": Status.PASSED,
        "clock": Status.PASSED,
        "disk": Status.PASSED,
        "journal": Status.PASSED,
    }
    assert exit_code(results) == 0


def test_command_prints_json_checklist(site: Site, pty_path: str) -> None:
    config_path = healthy_gate(site, pty_path)
    config_path.with_name("state").joinpath("device.key").chmod(0o644)
    code, output = run_cli("doctor", "--json", "--config", str(config_path))
    document = json.loads(output)
    checks = {check["check"]: check for check in document["checks"]}
    assert code == EXIT_FAILED
    assert document["passed"] is False
    assert checks["keys"]["status"] == "fail"
    assert "chmod 600" in checks["keys"]["fix"]
    assert checks["journal"]["message"] == "The chain is intact: 3 records."


def test_command_prints_chinese_by_default(site: Site, pty_path: str) -> None:
    config_path = healthy_gate(site, pty_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["doctor", "--config", str(config_path)])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[通过] 配置文件有效")


def test_command_exit_code_for_invalid_config(tmp_path: Path) -> None:
    code, output = run_cli("doctor", "--config", str(write_config(tmp_path, "[unknown]\n")))
    assert code == EXIT_USAGE
    assert output.startswith("[FAIL] Config file is valid")
