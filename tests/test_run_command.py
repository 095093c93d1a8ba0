"""`edgenode run` as a real process: a serial scanner on a pseudo-terminal, signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgenode.daemon import EXIT_FORCED, Daemon
from tests.scenarios import SITE, DirectMinter, Scenario, Site, build_cache, site_config

DEADLINE_S = 20


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def journal_verdicts(path: Path) -> list[str]:
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT verdict FROM records ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def write_config(site: Site, serial_path: str) -> Path:
    import base64

    key = base64.b64encode(site.district_public_key()).decode()
    path = site.folder / "edgenode.toml"
    path.write_text(
        f"""
[device]
id = "gate-run"
site = "{SITE}"
station = "north"
state_dir = "state"

[trust]
district_keys = ["{key}"]

# The test machine's NTP state varies, so these gates declare a battery-backed clock.
[clock]
ntp_source = "rtc"

[[sources]]
type = "serial"
name = "scanner"
device = "{serial_path}"
suffix = "cr"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Site, int, subprocess.Popen[bytes], Path]]:
    """A site with an imported cache and `edgenode run` reading a scanner on a pty."""
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    build_cache(site, Scenario([]), site_config(site))
    master, slave = os.openpty()
    config = write_config(site, os.ttyname(slave))
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgenode.cli",
                "--log-level",
                "debug",
                "run",
                "--config",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: b"source_connected" in log_path.read_bytes(), "the scanner to open")
        yield site, master, process, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=DEADLINE_S)
        os.close(master)
        os.close(slave)


def test_run_records_verdicts_and_stops_cleanly(
    gate: tuple[Site, int, subprocess.Popen[bytes], Path],
) -> None:
    site, master, process, log_path = gate
    journal = site.folder / "state" / "journal.db"
    health, community = site.pair()
    os.write(master, health.encode() + b"\r")
    os.write(master, community.encode() + b"\r")
    wait_for(lambda: journal_verdicts(journal) == ["admit"], "the admit verdict")

    # A lone code is waiting for its partner when the stop arrives.
    os.write(master, site.health("bob").encode() + b"\r")
    wait_for(lambda: log_path.read_bytes().count(b"scan_received") == 3, "the lone code")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=DEADLINE_S) == 0
    assert journal_verdicts(journal) == ["admit", "incomplete"]
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert "daemon_stopped" in events


def test_garbled_scan_still_gives_a_verdict(
    gate: tuple[Site, int, subprocess.Popen[bytes], Path],
) -> None:
    site, master, process, _ = gate
    os.write(master, b"\xff\xfe\xfd garbage\r")
    journal = site.folder / "state" / "journal.db"
    wait_for(lambda: journal_verdicts(journal) == ["unrecognised"], "the unrecognised verdict")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=DEADLINE_S) == 0


def test_unwritable_state_folder_is_a_startup_failure(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = write_config(site, "/dev/null")
    text = config.read_text().replace('state_dir = "state"', 'state_dir = "blocked/state"')
    config.write_text(text)
    (tmp_path / "blocked").write_text("a file where a folder should be")
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.cli", "--lang", "en", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 3
    assert "Start-up failed" in result.stderr


def test_config_without_sources_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "edgenode.toml"
    config.write_text('[device]\nid = "g"\nsite = "X"\nstate_dir = "state"\n')
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config)],
        capture_output=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 2


def test_second_signal_forces_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    daemon = Daemon(site_config(site), [])
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    clock = iter([100.0, 100.1, 101.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    daemon._on_signal(signal.SIGTERM)
    # The same signal delivered again to the process group a moment later is ignored.
    daemon._on_signal(signal.SIGTERM)
    assert exits == []
    daemon._on_signal(signal.SIGTERM)
    assert exits == [EXIT_FORCED]


def test_decode_live_prints_what_the_scanner_reads(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    master, slave = os.openpty()
    config = write_config(site, os.ttyname(slave))
    command = [sys.executable, "-m", "edgenode.cli", "--log-level", "debug", "decode", "--json"]
    command += ["--live", "scanner", "--config", str(config), "--count", "2", "--seconds", "20"]
    log_path = tmp_path / "decode.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
    try:
        wait_for(lambda: b"source_connected" in log_path.read_bytes(), "the scanner to open")
        code = site.health()
        os.write(master, code.encode() + b"\r" + b"ABC\xff\xfe\r")
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
        os.close(slave)
    rows = [json.loads(line) for line in output.decode().splitlines()]
    assert rows[0] == {"source": "scanner", "text": code}
    assert rows[1] == {"source": "scanner", "error": "charset_unsupported"}
