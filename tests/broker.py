"""A real Mosquitto broker for the sync tests, on a free loopback port.

Import the fixtures into a test module (``from tests.broker import broker, password_broker``).
Each test gets its own broker process, which is killed at teardown whatever the test did.
Tests still use their own site and device names, so a stray retained message never matches.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class Broker:
    """One mosquitto process with a generated config. ``port`` stays the same across restarts."""

    def __init__(self, folder: Path, *, username: str | None = None, password: str | None = None):
        self.folder = folder
        self.port = free_port()
        self.host = HOST
        self.username = username
        self.password = password
        self.config_path = folder / "mosquitto.conf"
        self.log_path = folder / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            "persistence false",
            # Mosquitto started as root drops to the 'mosquitto' user unless the config sets 'user'.
            f"user {_current_user()}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if self.username is not None and self.password is not None:
            password_path = self.folder / "passwords"
            subprocess.run(
                [
                    str(MOSQUITTO_PASSWD),
                    "-b",
                    "-c",
                    str(password_path),
                    self.username,
                    self.password,
                ],
                check=True,
                capture_output=True,
                timeout=10,
            )
            password_path.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {password_path}"]
        else:
            lines.append("allow_anonymous true")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until its port accepts connections."""
        if self.running:
            return
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}: {self.read_log()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port}")

    def stop(self) -> None:
        """Stop mosquitto with SIGTERM (SIGKILL after a bounded wait)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # A paused process cannot handle SIGTERM.
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)

    def pause(self) -> None:
        """Freeze mosquitto with SIGSTOP: its sockets stay open but it sends nothing."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError:
            return ""


def _current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _require_mosquitto() -> None:
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is missing: install Debian's mosquitto to run the sync tests")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous broker, started."""
    _require_mosquitto()
    folder = tmp_path / "broker"
    folder.mkdir()
    instance = Broker(folder)
    instance.start()
    try:
        yield instance
    finally:
        instance.resume()
        instance.kill()


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that accepts only the user 'gate' with the password 'right-password'."""
    _require_mosquitto()
    if not MOSQUITTO_PASSWD.exists():
        pytest.skip(f"{MOSQUITTO_PASSWD} is missing: it ships with Debian's mosquitto")
    folder = tmp_path / "password-broker"
    folder.mkdir()
    instance = Broker(folder, username="gate", password="right-password")
    instance.start()
    try:
        yield instance
    finally:
        instance.resume()
        instance.kill()
