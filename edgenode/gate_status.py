"""A read-only snapshot of the gate's health, for the guard's screen.

``Daemon.status()`` builds it on the pipeline thread, the owner of the cache and journal
connections. Nothing here changes what the policy decides; it only reports the same facts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime

from edgenode.cache import Cache
from edgenode.journal import Journal
from edgenode.pipeline import VerdictEvent
from edgenode.policy import BUILD_TIMESTAMP, ClockReading
from edgenode.sources import Source, SourceState


@dataclass(frozen=True, slots=True)
class GateStatus:
    """The facts the guard's screen shows at all times."""

    # Wall-clock time of the reading, in seconds since the epoch.
    now: float
    # District issue time of the oldest dataset in the cache (the policy's data age); None
    # when the cache is empty.
    data_issued_at: int | None
    # The policy gives review instead of admit while this is true (cache_stale).
    data_stale: bool
    data_empty: bool
    # The same rule as the policy's clock_untrusted reason.
    clock_trusted: bool
    # Source name to its state value, in config order.
    sources: tuple[tuple[str, str], ...]
    # Verdicts recorded since local midnight, by outcome value ("admit", "review", ...).
    counts_today: dict[str, int]

    @property
    def disconnected_sources(self) -> tuple[str, ...]:
        return tuple(
            name for name, state in self.sources if state == SourceState.DISCONNECTED.value
        )


def local_midnight(now: float) -> float:
    """Return the epoch time of the start of the local day that contains ``now``."""
    day = datetime.fromtimestamp(now).date()
    return datetime(day.year, day.month, day.day).timestamp()


class TodayCounts:
    """Verdicts per outcome since local midnight, seeded from the journal at start-up."""

    def __init__(self) -> None:
        self._day: date | None = None
        self._counts: Counter[str] = Counter()

    def seed(self, journal: Journal, now: float) -> None:
        self._day = datetime.fromtimestamp(now).date()
        self._counts = Counter(journal.verdict_counts_since(local_midnight(now)))

    def add(self, event: VerdictEvent) -> None:
        self._roll_over(event.record.recorded_at)
        self._counts[event.record.verdict] += 1

    def snapshot(self, now: float) -> dict[str, int]:
        self._roll_over(now)
        return dict(self._counts)

    def _roll_over(self, now: float) -> None:
        day = datetime.fromtimestamp(now).date()
        if self._day is None or day > self._day:
            self._day = day
            self._counts = Counter()


def read_status(
    *,
    cache: Cache,
    clock: ClockReading,
    stale_after_s: int,
    sources: list[Source],
    counts: TodayCounts,
) -> GateStatus:
    """Build a snapshot. Call it on the thread that owns ``cache``: it may reopen the file."""
    cache.refresh()
    oldest = cache.oldest_issued_at()
    valid_until = cache.earliest_valid_until()
    last_sync = cache.latest_synced_at()
    stale = (oldest is not None and clock.now - oldest > stale_after_s) or (
        valid_until is not None and clock.now > valid_until
    )
    # NOTE: this repeats the policy's clock and cache-age rules (edgenode/policy.py,
    # _check_clock and _check_cache_age), so a change there must be made here too.
    clock_trusted = (
        clock.synchronised
        and clock.now >= BUILD_TIMESTAMP
        and (last_sync is None or clock.now >= last_sync)
    )
    return GateStatus(
        now=clock.now,
        data_issued_at=oldest,
        data_stale=stale,
        data_empty=cache.is_empty(),
        clock_trusted=clock_trusted,
        sources=tuple((source.name, source.status.state.value) for source in sources),
        counts_today=counts.snapshot(clock.now),
    )
