"""No raw code payload, ID number, subject id or full name reaches the logs (PIPL).

One module fixture runs a real flow with every log at debug level. A district hub imports a
roster with names and ID numbers, and `edgenode scan` decodes photos of real codes. Then
`edgenode run` reads codes, a typed ID number and garbage from a serial scanner on a
pseudo-terminal, and syncs its verdicts to a `district serve` hub over a real Mosquitto broker.
The tests search everything the processes logged for the values the flow seeded.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from edgenode.cli import main
from edgenode.district import read_key
from edgenode.logs import configure_logging, redact_sensitive
from sync.identity import ensure_device_key
from tests.broker import MOSQUITTO, Broker
from tests.scenarios import PEOPLE, SITE, DirectMinter, Scenario, Site, build_cache, site_config
from tests.test_e2e import EFFECTS, write_photo
from tests.test_hub import write_hub_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ROSTER = ROOT / "tests" / "data" / "feeds" / "roster.csv"
DEVICE = "gate-privacy"
DEADLINE_S = 30
# An ID number typed into the scanner instead of a code: a payload that must not be logged.
TYPED_ID_NUMBER = "11010519491231002X"


@dataclass(frozen=True)
class Flow:
    logs: str
    # What the commands printed for people. It may name a subject id (the feed import names
    # the row to fix), but never a payload, an ID number or a full name.
    output: str
    payloads: list[str]
    id_numbers: list[str]
    full_names: list[str]
    subject_ids: list[str]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_cli_logged(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process at debug level. Return its exit code, logs and output."""
    logs, output = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(logs), contextlib.redirect_stdout(output):
        code = main(["--lang", "en", "--log-level", "debug", *args])
    structlog.reset_defaults()
    return code, logs.getvalue(), output.getvalue()


def unacked(journal_path: Path) -> int:
    if not journal_path.exists():
        return -1
    conn = sqlite3.connect(journal_path)
    try:
        row = conn.execute("SELECT COUNT(*) FROM records WHERE acked_at IS NULL").fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return -1
    finally:
        conn.close()


def write_gate_config(site: Site, serial_path: str, target: Broker) -> Path:
    key = base64.b64encode(site.district_public_key()).decode()
    path = site.folder / "edgenode.toml"
    path.write_text(
        f"""
[device]
id = "{DEVICE}"
site = "{SITE}"
station = "north"
state_dir = "state"

[trust]
district_keys = ["{key}"]

[sync]
enabled = true
broker_host = "{target.host}"
broker_port = {target.port}
keepalive_s = 5

[[sources]]
type = "serial"
name = "scanner"
device = "{serial_path}"
""",
        encoding="utf-8",
    )
    return path


def start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "edgenode.cli", "--log-level", "debug", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is missing: install Debian's mosquitto to run this test")
    folder = tmp_path_factory.mktemp("privacy")
    (folder / "broker").mkdir()
    broker = Broker(folder / "broker")
    broker.start()
    site = Site.create(folder, int(time.time()), DirectMinter())
    district_key = read_key(site.keys["district"])
    hub_config = write_hub_config(folder, broker, district_key)
    logs: list[str] = []
    outputs: list[str] = []

    # The hub imports a roster with full names and ID numbers.
    code, log, output = run_cli_logged("district", "import", "roster", "--config",
                                       str(hub_config), str(ROSTER))  # fmt: skip
    logs.append(log)
    outputs.append(output)
    assert code in (0, 1), output  # 1: the roster's deliberately bad rows are listed.

    # `edgenode scan` decodes photos of alice's and bob's codes.
    master, slave = os.openpty()
    gate_config = write_gate_config(site, os.ttyname(slave), broker)
    build_cache(site, Scenario([]), site_config(site))
    scanned = [site.pair("alice"), site.pair("bob")]
    photos = []
    for n, codes in enumerate(scanned):
        photo = folder / f"scan-{n}.png"
        write_photo(codes, photo, EFFECTS[n], seed=n)
        photos.append(str(photo))
    code, log, output = run_cli_logged("scan", "--config", str(gate_config), *photos)
    logs.append(log)
    outputs.append(output)
    assert code == 0, output

    # `edgenode run` reads codes, a typed ID number and garbage, and syncs to the hub.
    device_key = ensure_device_key(folder / "state" / "device.key")
    public_key = base64.b64encode(bytes(device_key.verify_key)).decode("ascii")
    code, log, output = run_cli_logged(
        "district", "devices", "add", "--config", str(hub_config),
        "--site", SITE, "--device", DEVICE, "--public-key", public_key,
    )  # fmt: skip
    logs.append(log)
    outputs.append(output)
    assert code == 0, output
    hub = start(["district", "serve", "--config", str(hub_config)], folder / "hub.log")
    gate = start(["run", "--config", str(gate_config)], folder / "gate.log")
    read = [site.pair("alice"), site.pair("bob")]
    try:
        wait_for(lambda: b"broker_connected" in (folder / "gate.log").read_bytes(), "the gate")
        for codes in read:
            for text in codes:
                os.write(master, text.encode() + b"\r")
        os.write(master, TYPED_ID_NUMBER.encode() + b"\r")
        os.write(master, b"\xff\xfe\xfd garbage\r")
        journal = folder / "state" / "journal.db"
        # The scan above recorded two verdicts, the run adds four: two pairs, two unreadable.
        wait_for(lambda: unacked(journal) == 0 and count_records(journal) >= 6, "hub acks")
    finally:
        stop(gate)
        stop(hub)
        os.close(master)
        os.close(slave)
        broker.kill()
    logs.append((folder / "gate.log").read_text(encoding="utf-8", errors="replace"))
    logs.append((folder / "hub.log").read_text(encoding="utf-8", errors="replace"))

    with ROSTER.open(encoding="utf-8") as roster:
        rows = list(csv.DictReader(roster))
    people = [PEOPLE["alice"], PEOPLE["bob"]]
    yield Flow(
        logs="\n".join(logs),
        output="\n".join(outputs),
        payloads=[text for codes in scanned + read for text in codes] + [TYPED_ID_NUMBER],
        id_numbers=[row["id_number"] for row in rows] + [TYPED_ID_NUMBER],
        full_names=[row["name"] for row in rows],
        subject_ids=[row["subject"] for row in rows]
        + [row["health_subject"] for row in rows]
        + [person.subject.hex() for person in people]
        + [person.health_subject.hex() for person in people],
    )


def count_records(journal: Path) -> int:
    conn = sqlite3.connect(journal)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    finally:
        conn.close()


def test_flow_logged_at_debug_level(flow: Flow) -> None:
    # Guards the tests below: they prove nothing if the flow logged nothing.
    for event in ("scan_received", "scan_read_failed", "verdict_recorded", "batch_stored"):
        assert event in flow.logs, event


def test_no_raw_payload_in_logs(flow: Flow) -> None:
    for payload in flow.payloads:
        assert payload not in flow.logs
        # The signed body without its header, in case a log cut the prefix off.
        assert payload[4:40] not in flow.logs


def test_no_raw_payload_in_output(flow: Flow) -> None:
    for payload in flow.payloads:
        assert payload[4:40] not in flow.output


def test_no_id_number_in_logs(flow: Flow) -> None:
    for id_number in flow.id_numbers:
        assert id_number not in flow.logs


def test_no_id_number_in_output(flow: Flow) -> None:
    for id_number in flow.id_numbers:
        assert id_number not in flow.output


def test_no_full_name_in_logs(flow: Flow) -> None:
    for name in flow.full_names:
        assert name not in flow.logs


def test_no_full_name_in_output(flow: Flow) -> None:
    for name in flow.full_names:
        assert name not in flow.output


def test_no_subject_id_in_logs(flow: Flow) -> None:
    for subject in flow.subject_ids:
        assert subject not in flow.logs.lower()


# --- the redaction processor and the renderer choice ---


def test_bytes_values_are_redacted() -> None:
    event = redact_sensitive(None, "info", {"event": "x", "data": b"EN1:secret"})
    assert event["data"] == "[redacted] 10 bytes"


def test_sensitive_text_fields_are_redacted() -> None:
    event = redact_sensitive(None, "info", {"event": "x", "id_number": TYPED_ID_NUMBER})
    assert event["id_number"] == "[redacted] 18 characters"


def test_other_fields_are_kept() -> None:
    event = redact_sensitive(None, "info", {"event": "x", "seq": 3, "source": "scanner"})
    assert event == {"event": "x", "seq": 3, "source": "scanner"}


def render_one(monkeypatch: pytest.MonkeyPatch, **environment: str) -> str:
    for name in ("JOURNAL_STREAM", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    with contextlib.redirect_stderr(out):
        configure_logging("info")
        structlog.get_logger("test").info("verdict_recorded", seq=7)
    return out.getvalue()


def test_terminal_gets_console_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    line = render_one(monkeypatch)
    assert not line.startswith("{")
    assert "verdict_recorded" in line


def test_journald_gets_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    line = render_one(monkeypatch, JOURNAL_STREAM="8:12345")
    assert line.startswith('{"seq": 7')


def test_systemd_unit_gets_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    line = render_one(monkeypatch, INVOCATION_ID="0123456789abcdef")
    assert line.startswith("{")
