"""The decision: a pure function of the two codes, a cache view, the clock and the site policy.

``decide`` does no I/O of its own. Everything it needs arrives as arguments, so the same inputs
always give the same verdict and every row of docs/policy.md can be tested directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Literal, Protocol

from edgenode.cache import DatasetInfo, HealthStatus, IssuerKey, Resident, TokenRecord
from edgenode.codes import (
    Colour,
    CommunityCode,
    HealthCode,
    PlatformToken,
    Rejection,
    Role,
    SignedCode,
    verify_signature,
)
from edgenode.config import Action, PolicyConfig
from edgenode.reasons import Reason

# Codes and clocks before this time cannot be right: the software did not exist yet.
BUILD_TIMESTAMP = 1_793_491_200  # 2026-11-01T00:00:00Z


class Outcome(StrEnum):
    ADMIT = "admit"
    REVIEW = "review"
    DENY = "deny"
    INCOMPLETE = "incomplete"
    UNRECOGNISED = "unrecognised"


# Identification method of a verdict: a pair of scanned codes, or an ID number that the guard
# typed for a resident without a phone. Reports tell the two apart by this marker.
VerdictMethod = Literal["codes", "id_number"]


class _Severity(IntEnum):
    INFO = 0
    REVIEW = 1
    DENY = 2


_ACTION_SEVERITY: dict[Action, _Severity] = {
    "admit": _Severity.INFO,
    "review": _Severity.REVIEW,
    "deny": _Severity.DENY,
}


class CacheView(Protocol):
    """Cache lookups that the policy needs. ``edgenode.cache.Cache`` implements them."""

    def is_empty(self) -> bool: ...
    def issuer(self, key_id: bytes) -> IssuerKey | None: ...
    def health_status(self, subject: bytes) -> HealthStatus | None: ...
    def resident(self, subject: bytes) -> Resident | None: ...
    def bound_resident(self, health_subject: bytes) -> bytes | None: ...
    def is_revoked(self, code_id: bytes) -> bool: ...
    def platform_token(self, token_hash: bytes) -> TokenRecord | None: ...
    def oldest_issued_at(self) -> int | None: ...
    def earliest_valid_until(self) -> int | None: ...
    def latest_synced_at(self) -> int | None: ...
    def datasets(self) -> tuple[DatasetInfo, ...]: ...


class IdCacheView(CacheView, Protocol):
    """The lookup that a check by ID number adds to ``CacheView``."""

    def latest_health_status_of(self, resident_subject: bytes) -> HealthStatus | None: ...


@dataclass(frozen=True, slots=True)
class ClockReading:
    """Wall-clock time in seconds and whether an outside source vouches for it."""

    now: float
    synchronised: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    # Most severe first. The guard screen shows the first reason in large type.
    reasons: tuple[Reason, ...]
    health_subject: bytes | None = None
    community_subject: bytes | None = None
    resident: Resident | None = None
    code_ids: tuple[bytes, ...] = ()
    # Colour of the health status that was applied, if one was known.
    health_colour: Colour | None = None
    clock_trusted: bool = True
    # Detail for the log, e.g. why a payload was rejected. Never a payload or an ID number.
    detail: str = ""
    method: VerdictMethod = "codes"


@dataclass(slots=True)
class _Findings:
    items: list[tuple[_Severity, Reason]] = field(default_factory=list)

    def add(self, severity: _Severity, reason: Reason) -> None:
        if all(existing != reason for _, existing in self.items):
            self.items.append((severity, reason))

    def worst(self) -> _Severity:
        return max((severity for severity, _ in self.items), default=_Severity.INFO)

    def reasons(self) -> tuple[Reason, ...]:
        ordered = sorted(enumerate(self.items), key=lambda item: (-item[1][0], item[0]))
        return tuple(reason for _, (_, reason) in ordered)


# Wall-clock time at which a code id was last admitted at this gate, or None.
LastUse = Callable[[bytes], float | None]


def _no_last_use(_code_id: bytes) -> float | None:
    return None


def decide(
    health: HealthCode | PlatformToken,
    community: CommunityCode,
    cache: CacheView,
    clock: ClockReading,
    policy: PolicyConfig,
    *,
    site: str,
    last_use: LastUse = _no_last_use,
) -> Verdict:
    """Decide on a pair of codes. Never admits on an empty cache or an untrusted clock."""
    findings = _Findings()
    now = clock.now
    clock_trusted = _check_clock(clock, cache, findings)

    if cache.is_empty():
        findings.add(_Severity.REVIEW, Reason.CACHE_EMPTY)
        return _verdict(findings, health, community, None, None, clock_trusted)
    _check_cache_age(cache, now, policy, findings)

    for code in (health, community):
        if isinstance(code, SignedCode):
            _check_signed(code, cache, now, policy, findings, last_use)
        else:
            _check_replay(code.code_id, False, now, policy, findings, last_use)

    health_subject, colour, from_cache = _health_status(health, cache, findings)
    _apply_colour(colour, policy, findings)
    if from_cache:
        findings.add(_Severity.INFO, Reason.HEALTH_STATUS_FROM_CACHE)
    resident = _check_community(community, cache, now, site, policy, findings)
    _check_same_person(health_subject, community, cache, findings)
    return _verdict(findings, health, community, resident, colour, clock_trusted, health_subject)


def _check_clock(clock: ClockReading, cache: CacheView, findings: _Findings) -> bool:
    last_sync = cache.latest_synced_at()
    trusted = (
        clock.synchronised
        and clock.now >= BUILD_TIMESTAMP
        and (last_sync is None or clock.now >= last_sync)
    )
    if not trusted:
        findings.add(_Severity.REVIEW, Reason.CLOCK_UNTRUSTED)
    return trusted


def _check_cache_age(
    cache: CacheView, now: float, policy: PolicyConfig, findings: _Findings
) -> None:
    oldest = cache.oldest_issued_at()
    valid_until = cache.earliest_valid_until()
    too_old = oldest is not None and now - oldest > policy.stale_after_s
    expired = valid_until is not None and now > valid_until
    if too_old or expired:
        findings.add(_Severity.REVIEW, Reason.CACHE_STALE)


def _check_signed(
    code: SignedCode,
    cache: CacheView,
    now: float,
    policy: PolicyConfig,
    findings: _Findings,
    last_use: LastUse,
) -> None:
    issuer = cache.issuer(code.key_id)
    code_type = "health" if isinstance(code, HealthCode) else "community"
    if issuer is None:
        findings.add(_Severity.DENY, Reason.UNKNOWN_ISSUER)
        return
    if not verify_signature(code, issuer.public_key):
        findings.add(_Severity.DENY, Reason.BAD_SIGNATURE)
        return
    # A key past its valid_until is retired, for example at the end of a rotation's overlap:
    # its codes are denied from then on, even those it signed while it was valid.
    if code_type not in issuer.code_types or not (
        issuer.valid_from <= code.issued_at <= issuer.valid_until and now <= issuer.valid_until
    ):
        findings.add(_Severity.DENY, Reason.ISSUER_KEY_NOT_VALID)
    if code.expires_at <= now:
        findings.add(_Severity.DENY, Reason.CODE_EXPIRED)
    if code.issued_at > now + policy.future_tolerance_s:
        findings.add(_Severity.DENY, Reason.CODE_NOT_YET_VALID)
    if cache.is_revoked(code.code_id):
        findings.add(_Severity.DENY, Reason.CODE_REVOKED)
    if code.dynamic and now - code.issued_at > policy.dynamic_max_age_s:
        findings.add(_Severity.DENY, Reason.DYNAMIC_CODE_STALE)
    _check_replay(code.code_id, code.dynamic, now, policy, findings, last_use)


def _check_replay(
    code_id: bytes,
    dynamic: bool,
    now: float,
    policy: PolicyConfig,
    findings: _Findings,
    last_use: LastUse,
) -> None:
    used_at = last_use(code_id)
    if used_at is not None and 0 <= now - used_at <= policy.replay_window_s:
        # A dynamic code shown twice is a shared screenshot. A printed card may simply be
        # scanned again by the guard, so it goes to review instead.
        findings.add(_Severity.DENY if dynamic else _Severity.REVIEW, Reason.CODE_REPLAYED)


def _health_status(
    health: HealthCode | PlatformToken, cache: CacheView, findings: _Findings
) -> tuple[bytes | None, Colour | None, bool]:
    """Return the health subject, the colour that applies, and whether it came from the cache.

    A cached status newer than the code (or the platform record) wins over it.
    """
    if isinstance(health, PlatformToken):
        record = cache.platform_token(health.token_hash)
        if record is None:
            findings.add(_Severity.INFO, Reason.PLATFORM_TOKEN_UNKNOWN)
            return None, None, False
        subject, colour, as_of = record.subject, record.colour, record.as_of
    else:
        subject, colour, as_of = health.subject, health.colour, health.issued_at
    cached = cache.health_status(subject)
    if cached is not None and cached.as_of > as_of and cached.colour != colour:
        return subject, cached.colour, True
    return subject, colour, False


def _apply_colour(colour: Colour | None, policy: PolicyConfig, findings: _Findings) -> None:
    if colour is None:
        findings.add(_ACTION_SEVERITY[policy.health_unknown], Reason.HEALTH_STATUS_UNKNOWN)
    elif colour == Colour.RED:
        findings.add(_Severity.DENY, Reason.HEALTH_RED)
    elif colour == Colour.YELLOW:
        findings.add(_ACTION_SEVERITY[policy.yellow], Reason.HEALTH_YELLOW)
    else:
        findings.add(_Severity.INFO, Reason.HEALTH_GREEN)


_ROLE_REASONS = {
    Role.VISITOR: Reason.ROLE_VISITOR,
    Role.STAFF: Reason.ROLE_STAFF,
    Role.DELIVERY: Reason.ROLE_DELIVERY,
}


def _check_community(
    community: CommunityCode,
    cache: CacheView,
    now: float,
    site: str,
    policy: PolicyConfig,
    findings: _Findings,
) -> Resident | None:
    if community.compound != site:
        findings.add(_Severity.DENY, Reason.WRONG_COMPOUND)
        return None
    resident = cache.resident(community.subject)
    if resident is None:
        findings.add(_Severity.DENY, Reason.NOT_RESIDENT)
        return None
    _check_resident(resident, now, site, policy, findings)
    return resident


def _check_resident(
    resident: Resident, now: float, site: str, policy: PolicyConfig, findings: _Findings
) -> None:
    """Check a roster entry's compound, validity and role."""
    if resident.compound != site:
        findings.add(_Severity.DENY, Reason.WRONG_COMPOUND)
    if not resident.valid_from <= now <= resident.valid_until:
        findings.add(_Severity.DENY, Reason.RESIDENCY_NOT_VALID)
    # The roster is authoritative for the role; the code's copy may predate a change.
    role_reason = _ROLE_REASONS.get(resident.role)
    if role_reason is not None:
        action: Action = getattr(policy, resident.role.value)
        findings.add(_ACTION_SEVERITY[action], role_reason)


def decide_by_id_number(
    resident: Resident | None,
    cache: IdCacheView,
    clock: ClockReading,
    policy: PolicyConfig,
    *,
    site: str,
) -> Verdict:
    """Decide on a resident that the guard looked up by ID number, with no code scanned.

    ``resident`` is the roster entry whose ID-number hash matched, or None. The colour is the
    newest cached status of the resident's health subjects. The clock, cache and residency
    rules are those of ``decide``; there is no signature, expiry or replay to check.
    """
    findings = _Findings()
    clock_trusted = _check_clock(clock, cache, findings)
    if cache.is_empty():
        findings.add(_Severity.REVIEW, Reason.CACHE_EMPTY)
        return _id_verdict(findings, None, None, clock_trusted)
    _check_cache_age(cache, clock.now, policy, findings)
    if resident is None:
        findings.add(_Severity.DENY, Reason.NOT_RESIDENT)
        return _id_verdict(findings, None, None, clock_trusted)
    status = cache.latest_health_status_of(resident.subject)
    colour = None if status is None else status.colour
    _apply_colour(colour, policy, findings)
    _check_resident(resident, clock.now, site, policy, findings)
    return _id_verdict(findings, resident, colour, clock_trusted)


def _id_verdict(
    findings: _Findings, resident: Resident | None, colour: Colour | None, clock_trusted: bool
) -> Verdict:
    return Verdict(
        outcome=_outcome(findings),
        reasons=findings.reasons(),
        community_subject=None if resident is None else resident.subject,
        resident=resident,
        health_colour=colour,
        clock_trusted=clock_trusted,
        method="id_number",
    )


def _check_same_person(
    health_subject: bytes | None,
    community: CommunityCode,
    cache: CacheView,
    findings: _Findings,
) -> None:
    if health_subject is None or health_subject == community.subject:
        return
    if cache.bound_resident(health_subject) != community.subject:
        findings.add(_Severity.DENY, Reason.SUBJECT_MISMATCH)


def _verdict(
    findings: _Findings,
    health: HealthCode | PlatformToken,
    community: CommunityCode,
    resident: Resident | None,
    colour: Colour | None,
    clock_trusted: bool,
    health_subject: bytes | None = None,
) -> Verdict:
    outcome = _outcome(findings)
    if health_subject is None and isinstance(health, HealthCode):
        health_subject = health.subject
    return Verdict(
        outcome=outcome,
        reasons=findings.reasons(),
        health_subject=health_subject,
        community_subject=community.subject,
        resident=resident,
        code_ids=(health.code_id, community.code_id),
        health_colour=colour,
        clock_trusted=clock_trusted,
    )


def _outcome(findings: _Findings) -> Outcome:
    worst = findings.worst()
    if worst == _Severity.DENY:
        return Outcome.DENY
    if worst == _Severity.REVIEW:
        return Outcome.REVIEW
    return Outcome.ADMIT


def incomplete(
    code: HealthCode | PlatformToken | CommunityCode, reason: Reason, clock_trusted: bool = True
) -> Verdict:
    """Verdict for a code whose partner never arrived within the pairing window."""
    subject = code.subject if isinstance(code, SignedCode) else None
    is_community = isinstance(code, CommunityCode)
    return Verdict(
        outcome=Outcome.INCOMPLETE,
        reasons=(reason,),
        health_subject=None if is_community else subject,
        community_subject=subject if is_community else None,
        code_ids=(code.code_id,),
        clock_trusted=clock_trusted,
    )


def unrecognised(rejection: Rejection, clock_trusted: bool = True) -> Verdict:
    """Verdict for a payload that is not a usable code."""
    return Verdict(
        outcome=Outcome.UNRECOGNISED,
        reasons=(rejection.reason,),
        code_ids=(rejection.payload_hash[:16],),
        clock_trusted=clock_trusted,
        detail=rejection.detail,
    )
