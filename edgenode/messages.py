"""Guard messages for each verdict and reason, as gettext msgids."""

from __future__ import annotations

from edgenode.i18n import N_, Translator
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason

OUTCOME_WORDS: dict[Outcome, str] = {
    Outcome.ADMIT: N_("Admit"),
    Outcome.REVIEW: N_("Check manually"),
    Outcome.DENY: N_("Do not admit"),
    Outcome.INCOMPLETE: N_("Show both codes"),
    Outcome.UNRECOGNISED: N_("Not recognised"),
}

REASON_TEXTS: dict[Reason, str] = {
    Reason.UNRECOGNISED_PAYLOAD: N_("This is not a health code or a community code"),
    Reason.BAD_BASE45: N_("The code is damaged or not a valid code"),
    Reason.TRUNCATED: N_("The code is incomplete"),
    Reason.TRAILING_DATA: N_("The code contains extra data"),
    Reason.UNSUPPORTED_VERSION: N_("The code's format version is not supported"),
    Reason.UNKNOWN_CODE_TYPE: N_("Unknown type of code"),
    Reason.MALFORMED_FIELD: N_("The code contains an invalid field"),
    Reason.TIMESTAMP_IMPLAUSIBLE: N_("The code's time is invalid"),
    Reason.UNKNOWN_ISSUER: N_("The code was issued by an unknown authority"),
    Reason.ISSUER_KEY_NOT_VALID: N_("The issuer's key is not valid for this code"),
    Reason.BAD_SIGNATURE: N_("The code's signature is invalid: possibly forged"),
    Reason.CODE_EXPIRED: N_("The code has expired"),
    Reason.CODE_NOT_YET_VALID: N_("The code is not valid yet"),
    Reason.CODE_REVOKED: N_("The code has been revoked"),
    Reason.DYNAMIC_CODE_STALE: N_("The code is out of date: possibly a screenshot"),
    Reason.CODE_REPLAYED: N_("This code was already used at this gate a moment ago"),
    Reason.PLATFORM_TOKEN_UNKNOWN: N_("The platform health code is not in the local data"),
    Reason.HEALTH_GREEN: N_("Health status green"),
    Reason.HEALTH_YELLOW: N_("Health status yellow"),
    Reason.HEALTH_RED: N_("Health status red"),
    Reason.HEALTH_STATUS_UNKNOWN: N_("Health status unknown"),
    Reason.HEALTH_STATUS_FROM_CACHE: N_("The health status was updated after the code was issued"),
    Reason.SUBJECT_MISMATCH: N_("The two codes belong to different people"),
    Reason.NOT_RESIDENT: N_("Not registered in this compound"),
    Reason.WRONG_COMPOUND: N_("The community code is for another compound"),
    Reason.RESIDENCY_NOT_VALID: N_("The registration is not valid at this time"),
    Reason.ROLE_VISITOR: N_("Visitor"),
    Reason.ROLE_STAFF: N_("Staff"),
    Reason.ROLE_DELIVERY: N_("Delivery"),
    Reason.CACHE_EMPTY: N_("No local data yet: the device has not been synced"),
    Reason.CACHE_STALE: N_("The local data is out of date"),
    Reason.CLOCK_UNTRUSTED: N_("The device clock cannot be trusted"),
    Reason.SCANNER_LAYOUT_ERROR: N_(
        "The scanner is set to the wrong keyboard layout: ask the installer to set it to US"
    ),
    Reason.SCAN_CUT_OFF: N_("The scan was cut off: scan the code again"),
    Reason.CHARSET_UNSUPPORTED: N_("The scanner sent text in an unsupported character set"),
    Reason.MISSING_HEALTH_CODE: N_("The health code is missing"),
    Reason.MISSING_COMMUNITY_CODE: N_("The community code is missing"),
    Reason.DUPLICATE_CODE_TYPE: N_(
        "Several codes of the same type: show one person's codes at a time"
    ),
}


def outcome_word(outcome: Outcome, translator: Translator) -> str:
    return translator.gettext(OUTCOME_WORDS[outcome])


def reason_text(reason: Reason, translator: Translator) -> str:
    return translator.gettext(REASON_TEXTS[reason])


def describe(verdict: Verdict, translator: Translator) -> str:
    """Build one line for the guard: the verdict word, then the reasons that matter."""
    shown: list[Reason] = [r for r in verdict.reasons if r != Reason.HEALTH_GREEN]
    if not shown:
        shown = list(verdict.reasons)
    texts = [reason_text(reason, translator) for reason in shown]
    separator = "；" if translator.language == "zh_CN" else "; "
    word = outcome_word(verdict.outcome, translator)
    return f"{word}: {separator.join(texts)}" if texts else word
