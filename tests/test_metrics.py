"""Prometheus metrics: scraped over HTTP from a running `edgenode run` after real scans.

The daemon reads a serial scanner on a pseudo-terminal and syncs to a real Mosquitto broker
that no district acknowledges, so the backlog grows with each verdict.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgenode.config import Config
from edgenode.metrics import GateMetrics
from edgenode.pipeline import VerdictEvent
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from edgenode.sources import ScanEvent
from tests.broker import MOSQUITTO, Broker, broker, free_port  # noqa: F401 - the fixture
from tests.scenarios import SITE, DirectMinter, Scenario, Site, build_cache, site_config

pytestmark = pytest.mark.slow
DEADLINE_S = 30
# Series name and sorted label pairs, to the sample's value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_config(site: Site, serial_path: str, target: Broker, metrics_port: int) -> Path:
    key = base64.b64encode(site.district_public_key()).decode()
    path = site.folder / "edgenode.toml"
    path.write_text(
        f"""
[device]
id = "gate-metrics"
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

[metrics]
enabled = true
port = {metrics_port}

[[sources]]
type = "serial"
name = "scanner"
device = "{serial_path}"
""",
        encoding="utf-8",
    )
    return path


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def try_scrape(port: int) -> Samples:
    try:
        return scrape(port)
    except OSError:
        return {}


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def dataset_names(cache_path: Path) -> list[str]:
    conn = sqlite3.connect(cache_path)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM datasets ORDER BY name")]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the module's gate, which every scrape test reads."""
    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is missing: install Debian's mosquitto to run the sync tests")
    instance = Broker(tmp_path_factory.mktemp("broker"))
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, module_broker: Broker
) -> Iterator[tuple[Samples, Site]]:
    """Run a gate, scan two pairs and one garbled code, and scrape its metrics."""
    tmp_path = tmp_path_factory.mktemp("gate")
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    master, slave = os.openpty()
    port = free_port()
    config_path = write_config(site, os.ttyname(slave), module_broker, port)
    build_cache(site, Scenario([]), site_config(site))
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_for(lambda: bool(try_scrape(port)), "the metrics endpoint")
        wait_for(
            lambda: try_scrape(port).get(("edgenode_broker_state", (("state", "connected"),))) == 1,
            "the broker connection",
        )
        for who in ("alice", "bob"):
            for code in site.pair(who):
                os.write(master, code.encode() + b"\r")
        os.write(master, b"\xff\xfe\xfd garbage\r")
        wait_for(
            lambda: try_scrape(port).get(("edgenode_backlog_records", ())) == 3,
            "three verdicts in the backlog",
        )
        yield scrape(port), site
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=DEADLINE_S)
        log.close()
        os.close(master)
        os.close(slave)


def test_scans_are_counted_per_source(scraped: tuple[Samples, Site]) -> None:
    samples, _ = scraped
    assert samples[("edgenode_scans_total", (("source", "scanner"),))] == 5


def journal_counts(site: Site) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Count the journal's verdicts by class, and by class and reason."""
    conn = sqlite3.connect(site.folder / "state" / "journal.db")
    try:
        rows = conn.execute("SELECT verdict, reasons FROM records").fetchall()
    finally:
        conn.close()
    verdicts = Counter(verdict for verdict, _ in rows)
    reasons = Counter((verdict, reason) for verdict, text in rows for reason in json.loads(text))
    return verdicts, reasons


def test_verdicts_are_counted_by_class(scraped: tuple[Samples, Site]) -> None:
    samples, site = scraped
    verdicts, _ = journal_counts(site)
    reported = {
        dict(labels)["verdict"]: value
        for (name, labels), value in samples.items()
        if name == "edgenode_verdicts_total"
    }
    assert sum(verdicts.values()) == 3
    assert reported == verdicts


def test_verdict_reasons_are_counted(scraped: tuple[Samples, Site]) -> None:
    samples, site = scraped
    _, reasons = journal_counts(site)
    reported = {
        (dict(labels)["verdict"], dict(labels)["reason"]): value
        for (name, labels), value in samples.items()
        if name == "edgenode_verdict_reasons_total"
    }
    assert reported == reasons
    assert ("unrecognised", "charset_unsupported") in reported


def test_latency_histograms_count_each_decision(scraped: tuple[Samples, Site]) -> None:
    samples, _ = scraped
    assert samples[("edgenode_decision_seconds_count", ())] == 5
    assert samples[("edgenode_frame_to_verdict_seconds_count", ())] == 3
    assert samples[("edgenode_decision_seconds_bucket", (("le", "+Inf"),))] == 5


def test_dropped_and_queued_scans_are_zero(scraped: tuple[Samples, Site]) -> None:
    samples, _ = scraped
    assert samples[("edgenode_scans_dropped_total", ())] == 0
    assert samples[("edgenode_frames_dropped_total", (("source", "scanner"),))] == 0
    assert samples[("edgenode_queued_scans", ())] == 0


def test_unacked_backlog_is_reported(scraped: tuple[Samples, Site]) -> None:
    samples, _ = scraped
    assert samples[("edgenode_backlog_records", ())] == 3
    assert samples[("edgenode_oldest_unacked_age_seconds", ())] >= 0


def test_dataset_ages_are_reported(scraped: tuple[Samples, Site]) -> None:
    samples, site = scraped
    names = dataset_names(site.folder / "state" / "cache.db")
    reported = sorted(
        dict(labels)["dataset"]
        for (name, labels) in samples
        if name == "edgenode_dataset_age_seconds"
    )
    assert reported == names
    assert all(
        value > 0 for (name, _), value in samples.items() if name == "edgenode_dataset_age_seconds"
    )


def test_broker_state_is_one_hot(scraped: tuple[Samples, Site]) -> None:
    samples, _ = scraped
    states = {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "edgenode_broker_state"
    }
    assert states == {"connected": 1, "connecting": 0, "disconnected": 0}


def test_busy_metrics_port_is_a_startup_failure(tmp_path: Path, broker: Broker) -> None:  # noqa: F811
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config_path = write_config(site, "/dev/null", broker, taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config_path)],
            capture_output=True,
            timeout=DEADLINE_S,
        )
    assert result.returncode == 3
    assert b"Address already in use" in result.stderr or "地址".encode() in result.stderr


# --- registries ---


def gate_metrics(config: Config) -> GateMetrics:
    return GateMetrics(config, [], queued_scans=lambda: 0, scans_dropped=lambda: 0)


def test_daemons_do_not_share_series(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    first, second = gate_metrics(site_config(site)), gate_metrics(site_config(site))
    first.on_scan(ScanEvent(source="scanner", payloads=(b"x",)))
    assert first.registry.get_sample_value("edgenode_scans_total", {"source": "scanner"}) == 1
    assert second.registry.get_sample_value("edgenode_scans_total", {"source": "scanner"}) is None


def test_verdict_with_two_reasons_counts_each(tmp_path: Path) -> None:
    from edgenode.journal import Journal

    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    metrics = gate_metrics(config)
    verdict = Verdict(outcome=Outcome.DENY, reasons=(Reason.HEALTH_RED, Reason.CODE_REVOKED))
    with Journal(config.journal_path, config.device.id) as journal:
        record = journal.append_verdict(
            verdict, station="north", recorded_at=time.time(), latency_ms=12.0
        )
    metrics.on_verdict(VerdictEvent(record, verdict, "north", 0.0))
    registry = metrics.registry
    assert registry.get_sample_value("edgenode_verdicts_total", {"verdict": "deny"}) == 1
    for reason in ("health_red", "code_revoked"):
        labels = {"verdict": "deny", "reason": reason}
        assert registry.get_sample_value("edgenode_verdict_reasons_total", labels) == 1
    assert registry.get_sample_value("edgenode_frame_to_verdict_seconds_sum") == 0.012
