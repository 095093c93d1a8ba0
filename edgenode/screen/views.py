"""The JSON messages the guard's page shows, with every text already translated.

The page itself contains no text: the server sends the labels once per connection and each
verdict, status and error with its text, so the gettext catalog is the only place to translate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from edgenode.codes import Role
from edgenode.gate_status import GateStatus
from edgenode.guard_desk import OVERRIDE_REASON_LABELS, GuardSession, OverrideEvent
from edgenode.i18n import N_, Translator
from edgenode.messages import outcome_word, reason_text
from edgenode.pipeline import VerdictEvent
from edgenode.policy import Outcome
from edgenode.reasons import Reason

# The page's colour class per outcome. A lone code (incomplete) needs the guard to act, so it
# shares the amber of a review.
OUTCOME_CLASSES: dict[Outcome, str] = {
    Outcome.ADMIT: "admit",
    Outcome.REVIEW: "review",
    Outcome.DENY: "deny",
    Outcome.INCOMPLETE: "review",
    Outcome.UNRECOGNISED: "unrecognised",
}
OVERRIDABLE = frozenset({Outcome.REVIEW, Outcome.DENY})

ROLE_WORDS: dict[Role, str] = {
    Role.RESIDENT: N_("Resident"),
    Role.VISITOR: N_("Visitor"),
    Role.STAFF: N_("Staff"),
    Role.DELIVERY: N_("Delivery"),
}

# Fixed texts of the page, by the key the page's script looks up.
LABELS: dict[str, str] = {
    "title": N_("Gate check"),
    "idle": N_("Please show your health code and community code"),
    "counts_admit": N_("Admitted today"),
    "counts_review": N_("Checked manually today"),
    "counts_deny": N_("Denied today"),
    "sign_in": N_("Sign in"),
    "sign_out": N_("Sign out"),
    "not_signed_in": N_("No guard signed in"),
    "id_check": N_("Check an ID number"),
    "guard_id": N_("Guard ID"),
    "pin": N_("PIN"),
    "id_number": N_("ID number"),
    "reason": N_("Reason"),
    "confirm": N_("Confirm"),
    "cancel": N_("Cancel"),
    "override_admit": N_("Admit anyway"),
    "override_refuse": N_("Refuse"),
    "screen_offline": N_("No connection to the gate device: reconnecting"),
    "request_failed": N_("The request failed: check the connection and try again"),
}

BANNERS: dict[str, str] = {
    "data_empty": N_("No local data yet: the device has not been synced"),
    "data_stale": N_("The local data is out of date: check every person manually"),
    "network_down": N_("No connection to the district server: records are sent later"),
    "clock_untrusted": N_("The device clock cannot be trusted"),
    "source_disconnected": N_("Scanner or camera disconnected: {names}"),
}

# Messages for the error codes of the page's requests, including the guard desk's codes.
ERRORS: dict[str, str] = {
    "invalid_json": N_("The request is not a JSON object"),
    "guard_id_invalid": N_("Enter the guard ID: 1 to 32 letters, digits, '-' or '_'"),
    "pin_invalid": N_("Enter the PIN: 6 to 12 digits"),
    "unknown_guard": N_("Unknown guard ID"),
    "wrong_pin": N_("Wrong PIN"),
    "locked_out": N_("Too many wrong PINs: wait a few minutes, then try again"),
    "id_number_malformed": N_("Enter the 18-character ID number: 17 digits, then a digit or X"),
    "id_number_bad_check_digit": N_(
        "The ID number's check digit is wrong: look for a typing mistake"
    ),
    "id_lookup_unavailable": N_("The local data holds no ID numbers: check the person manually"),
    "verdict_seq_invalid": N_("The verdict to override is missing: scan again"),
    "not_signed_in": N_("Sign in first"),
    "verdict_not_found": N_("That verdict was not found"),
    "not_overridable": N_("Only a manual-check or deny verdict can be overridden"),
    "already_overridden": N_("This verdict has already been overridden"),
    "unknown_reason": N_("Pick a reason from the list"),
    "unknown_decision": N_("Pick admit or refuse"),
    "unauthorised": N_("Open this page with the screen's token"),
    "origin_mismatch": N_("A request from another web page was rejected"),
    "not_found": N_("No such page"),
    "method_not_allowed": N_("This request method is not allowed here"),
    "too_large": N_("The request is too large"),
    "not_available": N_("This action is not available on this device yet"),
    "internal_error": N_("Internal error: the request was not completed, see the device log"),
}


def hello_message(tr: Translator, *, clear_after_s: float) -> dict[str, Any]:
    """Build the first message of a connection: labels, override reasons and timings."""
    return {
        "type": "hello",
        "language": tr.language,
        "clear_after_s": clear_after_s,
        "labels": {key: tr.gettext(text) for key, text in LABELS.items()},
        "override_reasons": [
            {"code": code, "label": tr.gettext(label)}
            for code, label in OVERRIDE_REASON_LABELS.items()
        ],
    }


def verdict_message(event: VerdictEvent, tr: Translator) -> dict[str, Any]:
    verdict = event.verdict
    # "Health status green" adds nothing to a verdict's colour, as in messages.describe.
    reasons_shown = [reason for reason in verdict.reasons if reason != Reason.HEALTH_GREEN]
    resident = verdict.resident
    return {
        "type": "verdict",
        "seq": event.record.seq,
        "outcome": verdict.outcome.value,
        "class": OUTCOME_CLASSES[verdict.outcome],
        "word": outcome_word(verdict.outcome, tr),
        "reasons": [reason_text(reason, tr) for reason in reasons_shown or verdict.reasons],
        # display_name is masked by the district before it reaches the cache (张*三).
        "name": resident.display_name if resident else "",
        "place": _place(resident.building, resident.unit, tr) if resident else "",
        "role": tr.gettext(ROLE_WORDS[resident.role]) if resident else "",
        "overridable": verdict.outcome in OVERRIDABLE,
    }


def _place(building: str, unit: str, tr: Translator) -> str:
    return tr.gettext("Building {building}, unit {unit}").format(building=building, unit=unit)


def override_message(event: OverrideEvent, tr: Translator) -> dict[str, Any]:
    label = OVERRIDE_REASON_LABELS.get(event.reason, event.reason)
    text = (
        tr.gettext("Admitted by guard {guard}: {reason}")
        if event.decision == "admit"
        else tr.gettext("Refused by guard {guard}: {reason}")
    )
    return {
        "type": "override",
        "verdict_seq": event.verdict_seq,
        "decision": event.decision,
        "text": text.format(guard=event.guard_id, reason=tr.gettext(label)),
    }


def status_message(
    status: GateStatus,
    tr: Translator,
    *,
    network_up: bool | None,
    session: GuardSession | None,
) -> dict[str, Any]:
    """Build the always-visible part: data age, banners, today's counts and the guard.

    ``network_up`` is None where sync is off, so no network banner is shown.
    """
    banners = []
    if status.data_empty:
        banners.append(_banner("data_empty", tr))
    elif status.data_stale:
        banners.append(_banner("data_stale", tr))
    if network_up is False:
        banners.append(_banner("network_down", tr))
    if not status.clock_trusted:
        banners.append(_banner("clock_untrusted", tr))
    if status.disconnected_sources:
        names = ", ".join(status.disconnected_sources)
        banners.append(_banner("source_disconnected", tr, names=names))
    return {
        "type": "status",
        "data_age": _data_age(status, tr),
        "banners": banners,
        "counts": {
            outcome: status.counts_today.get(outcome, 0) for outcome in ("admit", "review", "deny")
        },
        "guard": None if session is None else {"guard_id": session.guard_id},
        "guard_text": (
            tr.gettext(LABELS["not_signed_in"])
            if session is None
            else tr.gettext("Guard on duty: {guard}").format(guard=session.guard_id)
        ),
    }


def _banner(code: str, tr: Translator, **fields: str) -> dict[str, str]:
    return {"code": code, "text": tr.gettext(BANNERS[code]).format(**fields)}


def _data_age(status: GateStatus, tr: Translator) -> str:
    if status.data_issued_at is None:
        return tr.gettext("No data")
    issued = datetime.fromtimestamp(status.data_issued_at)
    same_day = issued.date() == datetime.fromtimestamp(status.now).date()
    shown = issued.strftime("%H:%M" if same_day else "%m-%d %H:%M")
    return tr.gettext("Data updated {time}").format(time=shown)


def error_body(code: str, tr: Translator) -> dict[str, str]:
    return {"error": code, "message": tr.gettext(ERRORS.get(code, ERRORS["internal_error"]))}
