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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from nacl.signing import SigningKey

from edgenode.config import SyncConfig
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from sync.connection import Connection, NotConnected
from sync.protocol import MessageError, Topics, decode_message, encode_message, trusted
from sync.uplink import seq_ranges

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


# Verdicts that the sync tests record in gates' journals.
ADMIT = Verdict(
    outcome=Outcome.ADMIT,
    reasons=(),
    health_subject=bytes(range(16)),
    community_subject=bytes(range(16, 32)),
)
DENY = Verdict(
    outcome=Outcome.DENY,
    reasons=(Reason.HEALTH_RED,),
    health_subject=bytes(range(16)),
    community_subject=bytes(range(16, 32)),
)


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """TLS settings for the broker's listener, written as mosquitto config options."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    # Take the client certificate's CN as the MQTT username (needs require_certificate).
    use_identity_as_username: bool = False


class Broker:
    """One mosquitto process with a generated config. ``port`` stays the same across restarts.

    With ``tls`` set, the only listener speaks TLS.
    """

    def __init__(
        self,
        folder: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: BrokerTls | None = None,
    ):
        self.folder = folder
        self.port = free_port()
        self.host = HOST
        self.username = username
        self.password = password
        self.tls = tls
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
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {str(self.tls.require_certificate).lower()}",
                f"use_identity_as_username {str(self.tls.use_identity_as_username).lower()}",
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
        elif self.tls is not None and self.tls.use_identity_as_username:
            # A client without a certificate then has no username, so it is rejected as anonymous.
            lines.append("allow_anonymous false")
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


class IngestPeer:
    """A stand-in for the district hub's ingest, until the hub exists.

    It subscribes to one gate's uplink, checks the device signature, stores records by seq
    (dropping duplicates) and, after storing, publishes a signed ack. ``acking = False`` stores
    without acking, for the tests that send acks of their own.
    """

    def __init__(
        self,
        target: Broker,
        *,
        site: str,
        device: str,
        device_public_key: bytes,
        district_key: SigningKey,
    ) -> None:
        self.topics = Topics(site, device)
        self.district_key = district_key
        self.trusted_keys = trusted(device_public_key)
        self.acking = True
        self.stored: dict[int, dict[str, Any]] = {}
        self.received: Counter[int] = Counter()
        self.batch_ids: list[str] = []
        self.acks_sent: list[bytes] = []
        self.alarms: list[dict[str, Any]] = []
        self.lanes: list[tuple[str, int]] = []
        self.batch_bytes = 0
        self.batch_records = 0
        self.rejected = 0
        config = SyncConfig(
            enabled=True, broker_host=target.host, broker_port=target.port, keepalive_s=5
        )
        self.connection = Connection(
            config, site=site, device=f"ingest-{device}", backoff_base_s=0.1
        )
        self.connection.subscribe(self.topics.batches, self._on_message)
        self.connection.subscribe(self.topics.priority, self._on_message)

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.received.values())

    async def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        assert isinstance(payload, bytes)
        try:
            body = decode_message(payload, self.trusted_keys)
        except MessageError:
            self.rejected += 1
            return
        if body["type"] == "alarm":
            self.alarms.append(body)
            return
        if body["type"] != "batch" or body["device"] != self.topics.device:
            self.rejected += 1
            return
        records = body["records"]
        self.batch_ids.append(body["batch_id"])
        self.batch_bytes += len(payload)
        self.batch_records += len(records)
        if records:
            self.lanes.append((body["lane"], records[0]["seq"]))
        for record in records:
            self.received[record["seq"]] += 1
            self.stored.setdefault(record["seq"], record)
        if not self.acking:
            return
        ack = {
            "type": "ack",
            "site": body["site"],
            "device": body["device"],
            "batch_id": body["batch_id"],
            "seqs": seq_ranges(record["seq"] for record in records),
            "district_time": time.time(),
        }
        encoded = encode_message(ack, self.district_key)
        try:
            await self.connection.publish(self.topics.acks, encoded)
        except NotConnected:
            return  # The gate sends the batch again after its ack timeout.
        self.acks_sent.append(encoded)

    def chain_problems(self) -> list[str]:
        """Check that the stored records link into one chain from seq 1, without gaps."""
        problems = []
        previous_hash = "00" * 32
        for expected, seq in enumerate(sorted(self.stored), start=1):
            if seq != expected:
                problems.append(f"seq {expected} missing")
                break
            record = self.stored[seq]
            if record["prev_hash"] != previous_hash:
                problems.append(f"seq {seq} does not link to seq {seq - 1}")
            previous_hash = record["hash"]
        return problems
