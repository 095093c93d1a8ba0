"""The main job: frames or payloads in, recorded verdicts out.

``Gate`` wires the steps together in order: decode, parse, pair, decide, record. Input sources
call it with the time a frame or a scan arrived; it never sleeps or reads a device itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from drivers.files import iter_file_frames
from edgenode.cache import Cache
from edgenode.codes import ParseResult, parse_payload
from edgenode.config import Config
from edgenode.decoders import Decoder, Frame
from edgenode.journal import Journal, JournalRecord, VerdictEntry
from edgenode.pairing import Lone, Pair, Pairer, PairingResult, Unreadable
from edgenode.policy import (
    ClockReading,
    Outcome,
    Verdict,
    decide,
    decide_by_id_number,
    incomplete,
    unrecognised,
)
from edgenode.sources import ReadError

log = structlog.get_logger("edgenode.pipeline")

WallClock = Callable[[], ClockReading]


def system_clock() -> ClockReading:
    """Read the wall clock and trust it, for replays and tests.

    ``edgenode run`` uses edgenode.clock.ClockGuard instead, which trusts the clock only once
    NTP or the district vouches for it.
    """
    return ClockReading(now=time.time(), synchronised=True)


@dataclass(frozen=True, slots=True)
class VerdictEvent:
    """A verdict as recorded, with where and when it came from."""

    record: JournalRecord
    verdict: Verdict
    station: str
    # Seconds since the start of the source (the video position for a file).
    source_time_s: float


class Gate:
    def __init__(
        self,
        config: Config,
        cache: Cache,
        journal: Journal,
        decoder: Decoder,
        clock: WallClock = system_clock,
    ) -> None:
        self.config = config
        self.cache = cache
        self.journal = journal
        self.decoder = decoder
        self.clock = clock
        self.pairer = Pairer(
            pair_window_s=config.pairing.pair_window_ms / 1000,
            debounce_s=config.pairing.debounce_ms / 1000,
        )
        self._token_patterns = config.policy.compiled_token_patterns()
        # Wall-clock time of each code's last admit at this gate, for replay detection.
        self._last_admit: dict[bytes, float] = {}

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config's policy. The pairing windows keep their start-up values."""
        self.config = config
        self._token_patterns = config.policy.compiled_token_patterns()

    def process_frame(
        self, frame: Frame, *, station: str, at: float, received: float | None = None
    ) -> list[VerdictEvent]:
        """Decode one frame and feed its codes in. ``at`` is the frame's monotonic time."""
        received = time.perf_counter() if received is None else received
        symbols = self.decoder.decode(frame)
        return self.process_payloads(
            (symbol.data for symbol in symbols), station=station, at=at, received=received
        )

    def process_payloads(
        self, payloads: Iterable[bytes], *, station: str, at: float, received: float
    ) -> list[VerdictEvent]:
        """Feed the payloads of one scan. ``received`` is its time.perf_counter() on arrival."""
        parsed: list[ParseResult] = [parse_payload(p, self._token_patterns) for p in payloads]
        self.cache.refresh()
        results = self.pairer.add(station, at, parsed)
        return self._resolve(results, station, at, received)

    def tick(self, at: float) -> list[VerdictEvent]:
        """Resolve lone codes whose pairing window has passed."""
        return self._resolve(self.pairer.expire(at), None, at, time.perf_counter())

    def flush(self, at: float) -> list[VerdictEvent]:
        """Resolve every waiting code, at the end of a file or at shutdown."""
        return self._resolve(self.pairer.flush(), None, at, time.perf_counter())

    def _resolve(
        self, results: list[PairingResult], station: str | None, at: float, received: float
    ) -> list[VerdictEvent]:
        decided = []
        for result in results:
            clock = self.clock()
            source_time = result.seen_at if isinstance(result, Lone) else at
            decided.append((self._verdict(result, clock), clock, source_time))
        events = self._record_all(decided, station, received)
        self._forget_old_admits()
        return events

    def process_read_error(
        self, error: ReadError, *, station: str, at: float, received: float
    ) -> list[VerdictEvent]:
        """Record a scanner read that gave no usable payload, so the guard still gets feedback."""
        verdict = Verdict(
            outcome=Outcome.UNRECOGNISED, reasons=(error.reason,), detail=error.detail
        )
        return [self._record(verdict, self.clock(), station, at, received)]

    def check_id_number(self, id_hash: bytes, *, station: str, received: float) -> VerdictEvent:
        """Decide on the resident whose ID-number hash this is, and record the verdict.

        The caller hashes and checks the typed number (edgenode/id_numbers.py) and checks
        that the cache has ID-number hashes at all (``Cache.has_id_hashes``).
        """
        self.cache.refresh()
        resident = self.cache.resident_by_id_hash(id_hash)
        clock = self.clock()
        verdict = decide_by_id_number(
            resident, self.cache, clock, self.config.policy, site=self.config.device.site
        )
        return self._record(verdict, clock, station, 0.0, received)

    def _record(
        self,
        verdict: Verdict,
        clock: ClockReading,
        station: str | None,
        source_time: float,
        received: float,
    ) -> VerdictEvent:
        return self._record_all([(verdict, clock, source_time)], station, received)[0]

    def _record_all(
        self,
        decided: list[tuple[Verdict, ClockReading, float]],
        station: str | None,
        received: float,
    ) -> list[VerdictEvent]:
        """Commit verdicts decided together in one transaction, so they cost one fsync.

        The commit returns before any caller can show a verdict, so a verdict on screen is
        always on disk. Each item is (verdict, clock reading, source time).
        """
        if not decided:
            return []
        latency_ms = (time.perf_counter() - received) * 1000
        entries = [
            VerdictEntry(
                verdict,
                station=station or self.config.device.station,
                recorded_at=clock.now,
                latency_ms=latency_ms,
            )
            for verdict, clock, _ in decided
        ]
        records = self.journal.append_verdicts(entries)
        events = []
        for record, (verdict, clock, source_time) in zip(records, decided, strict=True):
            if verdict.outcome == Outcome.ADMIT:
                for code_id in verdict.code_ids:
                    self._last_admit[code_id] = clock.now
            log.info(
                "verdict_recorded",
                seq=record.seq,
                verdict=record.verdict,
                reasons=list(record.reasons),
                station=record.station,
                device=record.device_id,
                latency_ms=round(latency_ms, 3),
                detail=verdict.detail or None,
            )
            events.append(VerdictEvent(record, verdict, record.station, source_time))
        return events

    def _verdict(self, result: PairingResult, clock: ClockReading) -> Verdict:
        if isinstance(result, Pair):
            return decide(
                result.health,
                result.community,
                self.cache,
                clock,
                self.config.policy,
                site=self.config.device.site,
                last_use=self._last_admit.get,
            )
        if isinstance(result, Lone):
            return incomplete(result.code, result.reason)
        if isinstance(result, Unreadable):
            return unrecognised(result.rejection)
        raise TypeError(f"unexpected pairing result {result!r}")

    def _forget_old_admits(self) -> None:
        if len(self._last_admit) < 4096:
            return
        horizon = self.clock().now - self.config.policy.replay_window_s
        self._last_admit = {k: v for k, v in self._last_admit.items() if v >= horizon}


def scan_files(
    gate: Gate,
    paths: Sequence[Path],
    on_verdict: Callable[[VerdictEvent, Path], None],
) -> None:
    """Run the main job over image and video files, calling on_verdict(event, path) each time.

    Each file starts a fresh pairing state: codes in different files never pair.
    """
    station = gate.config.device.station
    for path in paths:
        last_time = 0.0
        for frame in iter_file_frames(path):
            last_time = frame.timestamp_s
            for event in gate.tick(frame.timestamp_s):
                on_verdict(event, path)
            for event in gate.process_frame(frame.frame, station=station, at=frame.timestamp_s):
                on_verdict(event, path)
        for event in gate.flush(last_time):
            on_verdict(event, path)
        gate.pairer.reset_debounce()
