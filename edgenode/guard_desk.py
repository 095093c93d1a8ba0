"""The guard's desk: PIN sign-in, ID-number checks and overrides of review or deny verdicts.

The daemon (edgenode/daemon.py) owns one ``GuardDesk`` and calls it on its pipeline thread,
the single owner of the cache and journal connections. The screen calls the daemon's async
methods (``sign_in``, ``sign_out``, ``check_id_number``, ``override``), never this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgenode.i18n import N_
from edgenode.journal import JournalRecord

OverrideDecision = Literal["admit", "refuse"]
OVERRIDE_DECISIONS: tuple[OverrideDecision, ...] = ("admit", "refuse")

# The reason codes a guard can pick for an override, with the English label that the screen
# translates through the gettext catalog. The codes go upstream, so a code is never renamed.
OVERRIDE_REASON_LABELS: dict[str, str] = {
    "resident_known_to_guard": N_("Resident known to the guard"),
    "paper_certificate_checked": N_("Paper health certificate checked"),
    "id_document_checked": N_("ID document checked"),
    "emergency_services": N_("Emergency services"),
    "property_staff_confirmed": N_("Confirmed by property staff"),
    "visitor_confirmed_by_host": N_("Visitor confirmed by the host resident"),
    "health_risk_suspected": N_("Health risk suspected"),
    "identity_doubtful": N_("Identity in doubt"),
    "refused_other": N_("Other reason for refusal"),
}
OVERRIDE_REASONS: tuple[str, ...] = tuple(OVERRIDE_REASON_LABELS)


class GuardDeskError(Exception):
    """A rejected guard action. ``reason`` is a stable snake_case code for the screen."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class SignInError(GuardDeskError):
    """A rejected sign-in: ``unknown_guard``, ``wrong_pin``, ``locked_out`` or ``pin_invalid``."""


class OverrideError(GuardDeskError):
    """A rejected override: ``not_signed_in``, ``verdict_not_found``, ``not_overridable``,
    ``already_overridden``, ``unknown_reason`` or ``unknown_decision``."""


class IdCheckError(GuardDeskError):
    """A rejected ID-number check: ``id_number_malformed``, ``id_number_bad_check_digit`` or
    ``id_lookup_unavailable``. No lookup and no journal record happen."""


@dataclass(frozen=True, slots=True)
class GuardSession:
    """A guard's shift at this gate, from a PIN sign-in to sign-out or ``ends_at``."""

    guard_id: str
    # Wall-clock times in seconds since the epoch.
    started_at: float
    ends_at: float


@dataclass(frozen=True, slots=True)
class OverrideEvent:
    """An override as recorded in the journal, linked to the verdict record it overrides."""

    record: JournalRecord
    verdict_seq: int
    decision: OverrideDecision
    reason: str
    guard_id: str
