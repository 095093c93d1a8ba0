"""Stable reason codes shared by the parser, the policy, the journal and the sync protocol.

The string values are part of the product's contract: they appear in the journal, in
JSON output and upstream, so a value is never renamed or reused for another meaning.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Parsing: the payload is not a well-formed edgenode code.
    UNRECOGNISED_PAYLOAD = "unrecognised_payload"
    BAD_BASE45 = "bad_base45"
    TRUNCATED = "truncated"
    TRAILING_DATA = "trailing_data"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_CODE_TYPE = "unknown_code_type"
    MALFORMED_FIELD = "malformed_field"
    TIMESTAMP_IMPLAUSIBLE = "timestamp_implausible"

    # Signature and validity.
    UNKNOWN_ISSUER = "unknown_issuer"
    ISSUER_KEY_NOT_VALID = "issuer_key_not_valid"
    BAD_SIGNATURE = "bad_signature"
    CODE_EXPIRED = "code_expired"
    CODE_NOT_YET_VALID = "code_not_yet_valid"
    CODE_REVOKED = "code_revoked"
    DYNAMIC_CODE_STALE = "dynamic_code_stale"
    CODE_REPLAYED = "code_replayed"

    # Platform tokens (opaque health codes from a city platform).
    PLATFORM_TOKEN_UNKNOWN = "platform_token_unknown"

    # Health status.
    HEALTH_GREEN = "health_green"
    HEALTH_YELLOW = "health_yellow"
    HEALTH_RED = "health_red"
    HEALTH_STATUS_UNKNOWN = "health_status_unknown"
    HEALTH_STATUS_FROM_CACHE = "health_status_from_cache"

    # Residency and roles.
    SUBJECT_MISMATCH = "subject_mismatch"
    NOT_RESIDENT = "not_resident"
    WRONG_COMPOUND = "wrong_compound"
    RESIDENCY_NOT_VALID = "residency_not_valid"
    ROLE_VISITOR = "role_visitor"
    ROLE_STAFF = "role_staff"
    ROLE_DELIVERY = "role_delivery"

    # Cache and clock.
    CACHE_EMPTY = "cache_empty"
    CACHE_STALE = "cache_stale"
    CLOCK_UNTRUSTED = "clock_untrusted"

    # Reads from a scanner or camera that yielded no usable payload.
    SCANNER_LAYOUT_ERROR = "scanner_layout_error"
    SCAN_CUT_OFF = "scan_cut_off"
    CHARSET_UNSUPPORTED = "charset_unsupported"

    # Pairing.
    MISSING_HEALTH_CODE = "missing_health_code"
    MISSING_COMMUNITY_CODE = "missing_community_code"
    DUPLICATE_CODE_TYPE = "duplicate_code_type"
