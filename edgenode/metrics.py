"""Prometheus metrics of one gate daemon, served over HTTP when ``[metrics]`` is enabled.

Every ``GateMetrics`` has a ``CollectorRegistry`` of its own, never prometheus-client's global
one, so two daemons in one process (tests) never share series. Counters and histograms are
updated as scans and verdicts pass. Values that live elsewhere (the journal's backlog, the
cache's dataset ages, dropped frames, the broker's state) are read when Prometheus scrapes.

Series names:

- ``edgenode_scans_total{source}``: scans received from each source.
- ``edgenode_verdicts_total{verdict}`` and ``edgenode_verdict_reasons_total{verdict,reason}``.
- ``edgenode_decision_seconds``: from taking a scan off the queue to its recorded verdicts.
- ``edgenode_frame_to_verdict_seconds``: from a frame's capture (or a scanner's read) to the
  recorded verdict, as stored in the journal's ``latency_ms``.
- ``edgenode_scans_dropped_total``: scans dropped because the pipeline queue was full.
- ``edgenode_frames_dropped_total{source}``: camera frames replaced before they were decoded.
- ``edgenode_queued_scans``: scans waiting in the pipeline queue.
- ``edgenode_backlog_records`` and ``edgenode_oldest_unacked_age_seconds``: journal records
  the district has not acknowledged yet, and the age of the oldest (0 when there is none).
- ``edgenode_dataset_age_seconds{dataset}``: time since each cached dataset was issued.
- ``edgenode_broker_state{state}``: 1 for the MQTT connection's current state, only with sync.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgenode.cache import Cache
from edgenode.config import Config
from edgenode.pipeline import VerdictEvent
from edgenode.sources import ScanEvent, Source

log = structlog.get_logger("edgenode.metrics")

# Decoding is not part of a decision (cameras decode in their own threads), so decisions take
# milliseconds; frame-to-verdict adds the decode and the queue wait.
DECISION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FRAME_TO_VERDICT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BROKER_STATES = ("connected", "connecting", "disconnected")


class GateStateCollector(Collector):
    """Read the daemon's queue, sources, journal backlog, cache and broker state on scrape."""

    def __init__(
        self,
        config: Config,
        sources: Sequence[Source],
        queued_scans: Callable[[], int],
        scans_dropped: Callable[[], int],
        broker_state: Callable[[], str] | None,
    ) -> None:
        self.config = config
        self.sources = sources
        self.queued_scans = queued_scans
        self.scans_dropped = scans_dropped
        self.broker_state = broker_state

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        dropped = CounterMetricFamily(
            "edgenode_scans_dropped", "Scans dropped because the pipeline queue was full."
        )
        dropped.add_metric([], self.scans_dropped())
        yield dropped

        frames = CounterMetricFamily(
            "edgenode_frames_dropped",
            "Camera frames replaced by a newer one before the decoder took them.",
            labels=["source"],
        )
        for source in self.sources:
            frames.add_metric([source.name], source.status.frames_dropped)
        yield frames

        queued = GaugeMetricFamily("edgenode_queued_scans", "Scans waiting in the pipeline queue.")
        queued.add_metric([], self.queued_scans())
        yield queued

        yield from self._journal_metrics(now)
        yield self._dataset_ages(now)
        if self.broker_state is not None:
            yield self._broker_state(self.broker_state())

    def _journal_metrics(self, now: float) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "edgenode_backlog_records", "Journal records not yet acknowledged by the district."
        )
        oldest = GaugeMetricFamily(
            "edgenode_oldest_unacked_age_seconds",
            "Age of the oldest record not yet acknowledged by the district, 0 when none.",
        )
        count, oldest_at = read_backlog(self.config)
        backlog.add_metric([], count)
        oldest.add_metric([], 0.0 if oldest_at is None else max(now - oldest_at, 0.0))
        yield backlog
        yield oldest

    def _dataset_ages(self, now: float) -> Metric:
        ages = GaugeMetricFamily(
            "edgenode_dataset_age_seconds",
            "Time since each cached dataset was issued by the district.",
            labels=["dataset"],
        )
        with Cache(self.config.cache_path) as cache:
            for info in cache.datasets():
                ages.add_metric([info.name], max(now - info.issued_at, 0.0))
        return ages

    def _broker_state(self, current: str) -> Metric:
        states = GaugeMetricFamily(
            "edgenode_broker_state",
            "1 for the MQTT connection's current state, 0 for the others.",
            labels=["state"],
        )
        for state in BROKER_STATES:
            states.add_metric([state], 1.0 if state == current else 0.0)
        return states


def read_backlog(config: Config) -> tuple[int, float | None]:
    """Return the unacknowledged records' count and the oldest one's time, read-only.

    A connection of its own, because the daemon's journal connection belongs to the pipeline
    thread. A journal that does not exist yet has no backlog.
    """
    path = config.journal_path
    if not path.exists():
        return 0, None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT COUNT(*), MIN(recorded_at) FROM records WHERE acked_at IS NULL"
        ).fetchone()
    except sqlite3.OperationalError:
        return 0, None  # The schema is created by the daemon's first open.
    finally:
        conn.close()
    return int(row[0]), None if row[1] is None else float(row[1])


class GateMetrics:
    """The metrics of one daemon, in a registry of its own."""

    def __init__(
        self,
        config: Config,
        sources: Sequence[Source],
        *,
        queued_scans: Callable[[], int],
        scans_dropped: Callable[[], int],
        broker_state: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.scans = Counter(
            "edgenode_scans", "Scans received from each source.", ["source"], registry=self.registry
        )
        self.verdicts = Counter(
            "edgenode_verdicts",
            "Verdicts recorded, by verdict.",
            ["verdict"],
            registry=self.registry,
        )
        self.verdict_reasons = Counter(
            "edgenode_verdict_reasons",
            "Reasons given with recorded verdicts; a verdict with two reasons counts twice.",
            ["verdict", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "edgenode_decision_seconds",
            "Time from taking a scan off the queue to its recorded verdicts.",
            buckets=DECISION_BUCKETS_S,
            registry=self.registry,
        )
        self.frame_to_verdict_seconds = Histogram(
            "edgenode_frame_to_verdict_seconds",
            "Time from a frame's capture or a scanner's read to the recorded verdict.",
            buckets=FRAME_TO_VERDICT_BUCKETS_S,
            registry=self.registry,
        )
        self.state = GateStateCollector(config, sources, queued_scans, scans_dropped, broker_state)
        self.registry.register(self.state)
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def on_scan(self, event: ScanEvent) -> None:
        self.scans.labels(source=event.source).inc()

    def on_verdict(self, event: VerdictEvent) -> None:
        record = event.record
        self.verdicts.labels(verdict=record.verdict).inc()
        for reason in record.reasons:
            self.verdict_reasons.labels(verdict=record.verdict, reason=reason).inc()
        if record.latency_ms is not None:
            self.frame_to_verdict_seconds.observe(record.latency_ms / 1000)

    def observe_decision(self, seconds: float) -> None:
        self.decision_seconds.observe(seconds)

    def set_broker_state(self, broker_state: Callable[[], str]) -> None:
        self.state.broker_state = broker_state

    # --- the HTTP endpoint ---

    def start_server(self) -> tuple[str, int]:
        """Serve /metrics on the configured host and port. Raises OSError if binding fails."""
        host, port = self.config.metrics.host, self.config.metrics.port
        self._server, self._server_thread = start_http_server(
            port, addr=host, registry=self.registry
        )
        bound_port = int(self._server.server_address[1])
        log.info("metrics_started", host=host, port=bound_port)
        return host, bound_port

    def stop_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
        self._server = None
        log.info("metrics_stopped")
