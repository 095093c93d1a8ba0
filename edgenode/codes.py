"""The signed offline code format: encoding, parsing and signature checks.

A code's text is ``EN:`` followed by the base45 encoding (RFC 9285) of a binary body, so the
whole payload fits QR alphanumeric mode and a keyboard-wedge scanner can type it. The body
layout is documented byte by byte in docs/code-format.md, whose test vectors the tests read.

Parsing never raises: any input becomes a ``HealthCode``, ``CommunityCode``, ``PlatformToken``
or a ``Rejection`` carrying a reason code.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import base45
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.reasons import Reason

PREFIX = "EN:"
FORMAT_VERSION = 1
SIGNATURE_LEN = 64
KEY_ID_LEN = 4
SUBJECT_LEN = 16
CODE_ID_LEN = 16
MAX_PAYLOAD_LEN = 2048

# Timestamps outside these bounds are rejected as implausible. The upper bound catches
# milliseconds written where seconds belong: 2100-01-01 is 4.1e9 s, while now in ms is 1.7e12.
EARLIEST_TIMESTAMP = 1_577_836_800  # 2020-01-01T00:00:00Z
LATEST_TIMESTAMP = 4_102_444_800  # 2100-01-01T00:00:00Z

# version, code type, flags, key id, issued at, expires at, subject
_HEADER = struct.Struct(">BBB4sQQ16s")
_FLAG_PRINTED = 0x01
_TEXT_FIELD = re.compile(rb"[\x21-\x7e]*")


class CodeType(IntEnum):
    HEALTH = 1
    COMMUNITY = 2


class Colour(IntEnum):
    GREEN = 1
    YELLOW = 2
    RED = 3


class Role(StrEnum):
    RESIDENT = "resident"
    VISITOR = "visitor"
    STAFF = "staff"
    DELIVERY = "delivery"


_ROLE_CODES: dict[Role, int] = {Role.RESIDENT: 1, Role.VISITOR: 2, Role.STAFF: 3, Role.DELIVERY: 4}
_ROLES_BY_CODE = {value: role for role, value in _ROLE_CODES.items()}

# Maximum lengths of the community code's text fields, in bytes.
COMPOUND_MAX_LEN = 32
BUILDING_MAX_LEN = 16
UNIT_MAX_LEN = 16


@dataclass(frozen=True, slots=True)
class SignedCode:
    """Fields common to health and community codes."""

    version: int
    printed: bool
    key_id: bytes
    issued_at: int
    expires_at: int
    subject: bytes
    signed_part: bytes
    signature: bytes
    # Identifier for revocation and replay checks: a hash, never the payload itself. It is
    # computed once at parse time because the policy reads it several times per decision.
    code_id: bytes

    @property
    def dynamic(self) -> bool:
        return not self.printed


@dataclass(frozen=True, slots=True)
class HealthCode(SignedCode):
    colour: Colour


@dataclass(frozen=True, slots=True)
class CommunityCode(SignedCode):
    role: Role
    compound: str
    building: str
    unit: str


@dataclass(frozen=True, slots=True)
class PlatformToken:
    """An opaque health-code token from a city platform, resolved only through the cache."""

    pattern: str
    token_hash: bytes

    @property
    def code_id(self) -> bytes:
        return self.token_hash[:CODE_ID_LEN]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A payload that is not a usable code, with the reason and a detail for the log."""

    reason: Reason
    detail: str
    # Hash of the payload, so repeats can be recognised without keeping the payload.
    payload_hash: bytes


ParsedCode = HealthCode | CommunityCode | PlatformToken
ParseResult = ParsedCode | Rejection


@dataclass(frozen=True, slots=True)
class TokenPattern:
    """A platform token pattern: a regular expression with a group named ``token``."""

    name: str
    regex: re.Pattern[str]


def code_id_of(signed_part: bytes, signature: bytes) -> bytes:
    return hashlib.sha256(signed_part + signature).digest()[:CODE_ID_LEN]


def key_id_for(public_key: bytes) -> bytes:
    """Derive the 4-byte key id that codes carry from an issuer's public key."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_LEN]


def hash_payload(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def parse_payload(payload: bytes, token_patterns: Sequence[TokenPattern] = ()) -> ParseResult:
    """Parse the exact bytes of one scanned code. Never raises."""
    payload_hash = hash_payload(payload)
    if len(payload) > MAX_PAYLOAD_LEN:
        return Rejection(Reason.UNRECOGNISED_PAYLOAD, "payload too long", payload_hash)
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return Rejection(Reason.UNRECOGNISED_PAYLOAD, "payload is not ASCII", payload_hash)
    if text.startswith(PREFIX):
        return _parse_signed(text[len(PREFIX) :], payload_hash)
    for pattern in token_patterns:
        match = pattern.regex.fullmatch(text)
        if match is not None:
            token = match.group("token")
            if not token:
                # The pattern matched without its token group taking part: not a token.
                continue
            token_hash = hashlib.sha256(token.encode("ascii")).digest()
            return PlatformToken(pattern=pattern.name, token_hash=token_hash)
    return Rejection(Reason.UNRECOGNISED_PAYLOAD, "no known prefix or token pattern", payload_hash)


def _parse_signed(encoded: str, payload_hash: bytes) -> ParseResult:
    try:
        body: bytes = base45.b45decode(encoded)
    except (ValueError, IndexError, TypeError) as exc:
        return Rejection(Reason.BAD_BASE45, f"invalid base45: {exc}", payload_hash)
    if len(body) < 1:
        return Rejection(Reason.TRUNCATED, "empty body", payload_hash)
    if body[0] != FORMAT_VERSION:
        return Rejection(Reason.UNSUPPORTED_VERSION, f"format version {body[0]}", payload_hash)
    if len(body) < _HEADER.size:
        return Rejection(Reason.TRUNCATED, f"body has {len(body)} bytes", payload_hash)
    version, code_type, flags, key_id, issued_at, expires_at, subject = _HEADER.unpack_from(body)
    if code_type not in (CodeType.HEALTH, CodeType.COMMUNITY):
        return Rejection(Reason.UNKNOWN_CODE_TYPE, f"code type {code_type}", payload_hash)
    if flags & ~_FLAG_PRINTED:
        return Rejection(Reason.MALFORMED_FIELD, f"unknown flags {flags:#04x}", payload_hash)
    for name, value in (("issued_at", issued_at), ("expires_at", expires_at)):
        if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
            detail = f"{name}={value} is not in seconds between 2020 and 2100"
            return Rejection(Reason.TIMESTAMP_IMPLAUSIBLE, detail, payload_hash)
    if expires_at <= issued_at:
        return Rejection(Reason.MALFORMED_FIELD, "expires_at is not after issued_at", payload_hash)

    reader = _Reader(body, _HEADER.size)
    common = {
        "version": version,
        "printed": bool(flags & _FLAG_PRINTED),
        "key_id": key_id,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "subject": subject,
    }
    code: HealthCode | CommunityCode | Rejection
    if code_type == CodeType.HEALTH:
        code = _parse_health(reader, common, payload_hash)
    else:
        code = _parse_community(reader, common, payload_hash)
    if isinstance(code, Rejection):
        return code
    remaining = len(body) - reader.offset
    if remaining < SIGNATURE_LEN:
        return Rejection(Reason.TRUNCATED, "signature missing or cut short", payload_hash)
    if remaining > SIGNATURE_LEN:
        extra = remaining - SIGNATURE_LEN
        return Rejection(Reason.TRAILING_DATA, f"{extra} bytes after the signature", payload_hash)
    return code


class _Reader:
    """Sequential reader over the type-specific part of a body."""

    def __init__(self, body: bytes, offset: int) -> None:
        self.body = body
        self.offset = offset

    def byte(self) -> int | None:
        if self.offset >= len(self.body):
            return None
        value = self.body[self.offset]
        self.offset += 1
        return value

    def text(self, max_len: int) -> str | Reason:
        """Read a length-prefixed printable ASCII field, or return why it cannot be read."""
        length = self.byte()
        if length is None:
            return Reason.TRUNCATED
        if length > max_len:
            return Reason.MALFORMED_FIELD
        if self.offset + length > len(self.body):
            return Reason.TRUNCATED
        raw = self.body[self.offset : self.offset + length]
        if _TEXT_FIELD.fullmatch(raw) is None:
            return Reason.MALFORMED_FIELD
        self.offset += length
        return raw.decode("ascii")

    def finish(self) -> tuple[bytes, bytes]:
        """Return the signed part and the signature that follows it."""
        signed = self.body[: self.offset]
        return signed, self.body[self.offset : self.offset + SIGNATURE_LEN]


def _parse_health(
    reader: _Reader, common: dict[str, object], payload_hash: bytes
) -> HealthCode | Rejection:
    colour = reader.byte()
    if colour is None:
        return Rejection(Reason.TRUNCATED, "health status missing", payload_hash)
    if colour not in tuple(Colour):
        return Rejection(Reason.MALFORMED_FIELD, f"health colour {colour}", payload_hash)
    signed, signature = reader.finish()
    return HealthCode(
        colour=Colour(colour),
        signed_part=signed,
        signature=signature,
        code_id=code_id_of(signed, signature),
        **common,  # type: ignore[arg-type]
    )


def _parse_community(
    reader: _Reader, common: dict[str, object], payload_hash: bytes
) -> CommunityCode | Rejection:
    role_code = reader.byte()
    if role_code is None:
        return Rejection(Reason.TRUNCATED, "role missing", payload_hash)
    role = _ROLES_BY_CODE.get(role_code)
    if role is None:
        return Rejection(Reason.MALFORMED_FIELD, f"role {role_code}", payload_hash)
    fields: list[str] = []
    for name, max_len in (
        ("compound", COMPOUND_MAX_LEN),
        ("building", BUILDING_MAX_LEN),
        ("unit", UNIT_MAX_LEN),
    ):
        value = reader.text(max_len)
        if isinstance(value, Reason):
            return Rejection(value, f"{name} field invalid or cut short", payload_hash)
        fields.append(value)
    if not fields[0]:
        return Rejection(Reason.MALFORMED_FIELD, "compound is empty", payload_hash)
    signed, signature = reader.finish()
    return CommunityCode(
        role=role,
        compound=fields[0],
        building=fields[1],
        unit=fields[2],
        signed_part=signed,
        signature=signature,
        code_id=code_id_of(signed, signature),
        **common,  # type: ignore[arg-type]
    )


def verify_signature(code: SignedCode, public_key: bytes) -> bool:
    """Check the code's Ed25519 signature against an issuer's public key."""
    try:
        VerifyKey(public_key).verify(code.signed_part, code.signature)
    except (BadSignatureError, ValueError):
        return False
    return True


# --- Encoding (district side, demos and tests) ---


def _encode_header(
    code_type: CodeType,
    *,
    printed: bool,
    key_id: bytes,
    issued_at: int,
    expires_at: int,
    subject: bytes,
) -> bytes:
    if len(key_id) != KEY_ID_LEN:
        raise ValueError(f"key id must be {KEY_ID_LEN} bytes, got {len(key_id)}")
    if len(subject) != SUBJECT_LEN:
        raise ValueError(f"subject must be {SUBJECT_LEN} bytes, got {len(subject)}")
    for name, value in (("issued_at", issued_at), ("expires_at", expires_at)):
        if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
            raise ValueError(f"{name}={value} must be Unix seconds between 2020 and 2100")
    if expires_at <= issued_at:
        raise ValueError(f"expires_at={expires_at} must be after issued_at={issued_at}")
    flags = _FLAG_PRINTED if printed else 0
    return _HEADER.pack(FORMAT_VERSION, code_type, flags, key_id, issued_at, expires_at, subject)


def _encode_text(value: str, max_len: int, name: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) > max_len or _TEXT_FIELD.fullmatch(raw) is None:
        raise ValueError(f"{name} must be at most {max_len} printable ASCII characters: {value!r}")
    return bytes([len(raw)]) + raw


def sign_body(signed_part: bytes, signing_key: SigningKey) -> str:
    """Sign a body and return the code's text."""
    signature = signing_key.sign(signed_part).signature
    return PREFIX + str(base45.b45encode(signed_part + signature).decode("ascii"))


def _mint(
    signing_key: SigningKey,
    code_type: CodeType,
    type_fields: bytes,
    *,
    subject: bytes,
    issued_at: int,
    expires_at: int,
    printed: bool,
) -> str:
    header = _encode_header(
        code_type,
        printed=printed,
        key_id=key_id_for(bytes(signing_key.verify_key)),
        issued_at=issued_at,
        expires_at=expires_at,
        subject=subject,
    )
    return sign_body(header + type_fields, signing_key)


def encode_health(
    signing_key: SigningKey,
    *,
    subject: bytes,
    colour: Colour,
    issued_at: int,
    expires_at: int,
    printed: bool = False,
) -> str:
    """Mint a signed health code and return its text."""
    return _mint(
        signing_key,
        CodeType.HEALTH,
        bytes([colour]),
        subject=subject,
        issued_at=issued_at,
        expires_at=expires_at,
        printed=printed,
    )


def encode_community(
    signing_key: SigningKey,
    *,
    subject: bytes,
    role: Role,
    compound: str,
    building: str,
    unit: str,
    issued_at: int,
    expires_at: int,
    printed: bool = False,
) -> str:
    """Mint a signed community code and return its text."""
    if not compound:
        raise ValueError("compound must not be empty")
    fields = (
        bytes([_ROLE_CODES[role]])
        + _encode_text(compound, COMPOUND_MAX_LEN, "compound")
        + _encode_text(building, BUILDING_MAX_LEN, "building")
        + _encode_text(unit, UNIT_MAX_LEN, "unit")
    )
    return _mint(
        signing_key,
        CodeType.COMMUNITY,
        fields,
        subject=subject,
        issued_at=issued_at,
        expires_at=expires_at,
        printed=printed,
    )
