"""Pairing a health code with a community code at one station.

Both codes may arrive in one frame, or in two scans within ``pair_window_s``. A lone code waits
for its partner; once the window has passed it yields an incomplete result. The same code seen
again within ``debounce_s`` of its last sighting counts once, so a phone held in front of the
camera for many frames gives one verdict.

Times are monotonic seconds supplied by the caller (a video's own timestamps when scanning a
file), so the pairer never reads a clock itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from edgenode.codes import CommunityCode, HealthCode, ParseResult, PlatformToken, Rejection
from edgenode.reasons import Reason

HealthLike = HealthCode | PlatformToken


@dataclass(frozen=True, slots=True)
class Pair:
    health: HealthLike
    community: CommunityCode
    # Monotonic time of the scan that completed the pair.
    completed_at: float


@dataclass(frozen=True, slots=True)
class Lone:
    """A code that cannot be paired: its partner is missing or ambiguous."""

    code: HealthLike | CommunityCode
    reason: Reason
    # Monotonic time the code arrived.
    seen_at: float


@dataclass(frozen=True, slots=True)
class Unreadable:
    rejection: Rejection


PairingResult = Pair | Lone | Unreadable


def _key(result: ParseResult) -> bytes:
    return result.payload_hash if isinstance(result, Rejection) else result.code_id


@dataclass(slots=True)
class _Station:
    # A waiting code and the monotonic time it arrived.
    health: tuple[HealthLike, float] | None = None
    community: tuple[CommunityCode, float] | None = None
    last_seen: dict[bytes, float] = field(default_factory=dict)


class Pairer:
    def __init__(self, pair_window_s: float, debounce_s: float) -> None:
        self.pair_window_s = pair_window_s
        self.debounce_s = debounce_s
        self._stations: dict[str, _Station] = {}

    def add(self, station: str, at: float, results: Iterable[ParseResult]) -> list[PairingResult]:
        """Feed the codes read in one scan (one frame, or one scanner read)."""
        state = self._stations.setdefault(station, _Station())
        output = self._expire_station(state, at)
        fresh = [result for result in results if self._is_new(state, _key(result), at)]

        health = [r for r in fresh if isinstance(r, HealthCode | PlatformToken)]
        community = [r for r in fresh if isinstance(r, CommunityCode)]
        output.extend(Unreadable(r) for r in fresh if isinstance(r, Rejection))
        if len(health) > 1 or len(community) > 1:
            # Two people's phones in view: guessing which codes belong together is unsafe.
            output.extend(Lone(code, Reason.DUPLICATE_CODE_TYPE, at) for code in health + community)
            return output
        # A different code already waiting in the same slot is given up as incomplete.
        if health:
            if state.health is not None:
                output.append(Lone(state.health[0], Reason.MISSING_COMMUNITY_CODE, state.health[1]))
            state.health = (health[0], at)
        if community:
            if state.community is not None:
                output.append(
                    Lone(state.community[0], Reason.MISSING_HEALTH_CODE, state.community[1])
                )
            state.community = (community[0], at)
        if state.health is not None and state.community is not None:
            output.append(Pair(state.health[0], state.community[0], at))
            state.health = state.community = None
        return output

    def _is_new(self, state: _Station, key: bytes, at: float) -> bool:
        last = state.last_seen.get(key)
        state.last_seen[key] = at
        return last is None or at - last > self.debounce_s

    def expire(self, at: float) -> list[PairingResult]:
        """Give up on lone codes whose window has passed. Call this regularly."""
        output: list[PairingResult] = []
        for state in self._stations.values():
            output.extend(self._expire_station(state, at))
        return output

    def _expire_station(self, state: _Station, at: float) -> list[PairingResult]:
        output: list[PairingResult] = []
        if state.health is not None and at - state.health[1] > self.pair_window_s:
            output.append(Lone(state.health[0], Reason.MISSING_COMMUNITY_CODE, state.health[1]))
            state.health = None
        if state.community is not None and at - state.community[1] > self.pair_window_s:
            output.append(Lone(state.community[0], Reason.MISSING_HEALTH_CODE, state.community[1]))
            state.community = None
        horizon = at - max(self.debounce_s, self.pair_window_s)
        stale = [key for key, seen in state.last_seen.items() if seen < horizon]
        for key in stale:
            del state.last_seen[key]
        return output

    def flush(self) -> list[PairingResult]:
        """Resolve every waiting code as incomplete, e.g. at the end of a file or at shutdown."""
        output: list[PairingResult] = []
        for state in self._stations.values():
            if state.health is not None:
                output.append(Lone(state.health[0], Reason.MISSING_COMMUNITY_CODE, state.health[1]))
            if state.community is not None:
                output.append(
                    Lone(state.community[0], Reason.MISSING_HEALTH_CODE, state.community[1])
                )
            state.health = state.community = None
        return output

    def reset_debounce(self) -> None:
        for state in self._stations.values():
            state.last_seen.clear()
