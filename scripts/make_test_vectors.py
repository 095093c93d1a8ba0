"""Generate docs/test-vectors.json, the signed code test vectors for scanner vendors.

The bodies are built here from the byte layout in docs/code-format.md, not with the encoders
in edgenode.codes, so the tests that re-encode the vectors with edgenode.codes check that the
document and the code agree. Ed25519 signatures are deterministic and the keys come from fixed
seeds, so every run writes the same file.

Usage: .venv/bin/python scripts/make_test_vectors.py [OUTPUT]
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import base45
from nacl.signing import SigningKey

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "test-vectors.json"

HEALTH_SEED = bytes(range(32))
COMMUNITY_SEED = bytes(range(32, 64))
# A key that no cache lists, used to sign the bad-signature vector.
OTHER_SEED = bytes(range(64, 96))

PREFIX = "EN:"
# version, code type, flags, key id, issued at, expires at, subject: 39 bytes, big-endian.
HEADER = struct.Struct(">BBB4sQQ16s")
HEALTH, COMMUNITY = 1, 2
FLAG_PRINTED = 0x01
COLOURS = {"green": 1, "yellow": 2, "red": 3}
ROLES = {"resident": 1, "visitor": 2, "staff": 3, "delivery": 4}

ISSUED_AT = 1_800_000_000  # 2027-01-15T08:00:00Z
DYNAMIC_LIFETIME_S = 300
PRINTED_LIFETIME_S = 180 * 86_400


def subject_for(label: str) -> bytes:
    """Derive a fixed 16-byte subject from a label, so each vector has its own subject."""
    return hashlib.sha256(b"edgenode test subject " + label.encode("ascii")).digest()[:16]


def key_id_for(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:4]


def header(
    code_type: int,
    key: SigningKey,
    *,
    printed: bool = False,
    issued_at: int = ISSUED_AT,
    expires_at: int | None = None,
    subject: bytes,
    version: int = 1,
    flags: int | None = None,
) -> bytes:
    if expires_at is None:
        expires_at = issued_at + (PRINTED_LIFETIME_S if printed else DYNAMIC_LIFETIME_S)
    if flags is None:
        flags = FLAG_PRINTED if printed else 0
    key_id = key_id_for(bytes(key.verify_key))
    return HEADER.pack(version, code_type, flags, key_id, issued_at, expires_at, subject)


def text_field(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def community_part(role: int, compound: bytes, building: bytes, unit: bytes) -> bytes:
    return bytes([role]) + text_field(compound) + text_field(building) + text_field(unit)


def signed_body(signed_part: bytes, key: SigningKey) -> bytes:
    return signed_part + key.sign(signed_part).signature


def code_text(body: bytes) -> str:
    return PREFIX + str(base45.b45encode(body).decode("ascii"))


def key_entry(seed: bytes) -> dict[str, str]:
    public_key = bytes(SigningKey(seed).verify_key)
    return {
        "seed": seed.hex(),
        "public_key": public_key.hex(),
        "key_id": key_id_for(public_key).hex(),
    }


def valid_health(name: str, colour: str, *, printed: bool, key: SigningKey) -> dict[str, Any]:
    subject = subject_for(name)
    signed_part = header(HEALTH, key, printed=printed, subject=subject) + bytes([COLOURS[colour]])
    fields: dict[str, Any] = {"colour": colour}
    return valid_vector(name, "health_issuer", "health", signed_part, key, fields)


def valid_community(
    name: str,
    role: str,
    compound: str,
    building: str,
    unit: str,
    *,
    printed: bool,
    key: SigningKey,
) -> dict[str, Any]:
    subject = subject_for(name)
    part = community_part(
        ROLES[role], compound.encode("ascii"), building.encode("ascii"), unit.encode("ascii")
    )
    signed_part = header(COMMUNITY, key, printed=printed, subject=subject) + part
    fields: dict[str, Any] = {
        "role": role,
        "compound": compound,
        "building": building,
        "unit": unit,
    }
    return valid_vector(name, "community_issuer", "community", signed_part, key, fields)


def valid_vector(
    name: str,
    issuer: str,
    code_type: str,
    signed_part: bytes,
    key: SigningKey,
    type_fields: dict[str, Any],
) -> dict[str, Any]:
    body = signed_body(signed_part, key)
    _, _, flags, key_id, issued_at, expires_at, subject = HEADER.unpack_from(body)
    printed = bool(flags & FLAG_PRINTED)
    fields: dict[str, Any] = {
        "version": body[0],
        "printed": printed,
        "dynamic": not printed,
        "key_id": key_id.hex(),
        "issued_at": issued_at,
        "expires_at": expires_at,
        "subject": subject.hex(),
        **type_fields,
    }
    return {
        "name": name,
        "issuer": issuer,
        "code_type": code_type,
        "text": code_text(body),
        "body_hex": body.hex(),
        "signed_length": len(signed_part),
        "fields": fields,
        "code_id": hashlib.sha256(body).digest()[:16].hex(),
    }


def valid_vectors(health_key: SigningKey, community_key: SigningKey) -> list[dict[str, Any]]:
    vectors = [
        valid_health("health-green-dynamic", "green", printed=False, key=health_key),
        valid_health("health-yellow-dynamic", "yellow", printed=False, key=health_key),
        valid_health("health-red-dynamic", "red", printed=False, key=health_key),
        valid_health("health-green-printed", "green", printed=True, key=health_key),
        valid_health("health-yellow-printed", "yellow", printed=True, key=health_key),
        valid_health("health-red-printed", "red", printed=True, key=health_key),
    ]
    community = [
        ("community-resident-dynamic", "resident", "XINGFU-GARDEN", "12", "1-502", False),
        ("community-resident-printed", "resident", "XINGFU-GARDEN", "12", "1-502", True),
        ("community-visitor-dynamic", "visitor", "XINGFU-GARDEN", "", "", False),
        ("community-staff-printed", "staff", "XINGFU-GARDEN", "PROPERTY-OFFICE", "", True),
        ("community-delivery-dynamic", "delivery", "XINGFU-GARDEN", "", "", False),
        (
            "community-resident-maximum-lengths",
            "resident",
            "C" * 32,
            "B" * 16,
            "U" * 16,
            False,
        ),
    ]
    for name, role, compound, building, unit, printed in community:
        vectors.append(
            valid_community(
                name, role, compound, building, unit, printed=printed, key=community_key
            )
        )
    return vectors


def rejected(name: str, description: str, payload: bytes, reason: str) -> dict[str, Any]:
    vector: dict[str, Any] = {
        "name": name,
        "description": description,
        "payload_hex": payload.hex(),
        "expected": {"result": "rejection", "reason": reason},
    }
    if payload.isascii():
        vector["text"] = payload.decode("ascii")
    return vector


def rejected_body(name: str, description: str, body: bytes, reason: str) -> dict[str, Any]:
    return rejected(name, description, code_text(body).encode("ascii"), reason)


def invalid_vectors(health_key: SigningKey, community_key: SigningKey) -> list[dict[str, Any]]:
    def health_signed(**header_args: Any) -> bytes:
        """Sign a health body with the given header fields and a green colour byte."""
        subject = header_args.pop("subject", subject_for("health-invalid"))
        part = header(HEALTH, health_key, subject=subject, **header_args) + bytes([1])
        return signed_body(part, health_key)

    def community_signed(part: bytes) -> bytes:
        head = header(COMMUNITY, community_key, subject=subject_for("community-invalid"))
        return signed_body(head + part, community_key)

    good_health = health_signed()
    good_community_header = header(
        COMMUNITY, community_key, subject=subject_for("community-invalid")
    )
    ms_issued_at = ISSUED_AT * 1_000

    cases: list[Callable[[], dict[str, Any]]] = [
        lambda: rejected(
            "no-prefix",
            "Text without the EN: prefix that matches no platform token pattern.",
            b"HELLO WORLD",
            "unrecognised_payload",
        ),
        lambda: rejected(
            "not-ascii",
            "A byte-mode QR payload in UTF-8 (the words 健康码).",
            "健康码".encode(),
            "unrecognised_payload",
        ),
        lambda: rejected(
            "payload-too-long",
            "2049 bytes: the EN: prefix and 2046 base45 characters, one byte over the limit.",
            b"EN:" + b"0" * 2046,
            "unrecognised_payload",
        ),
        lambda: rejected(
            "base45-lowercase",
            "Lowercase letters are not in the base45 alphabet.",
            b"EN:" + code_text(good_health)[3:].lower().encode("ascii"),
            "bad_base45",
        ),
        lambda: rejected(
            "base45-bad-length",
            "A base45 text whose length leaves a remainder of 1 when divided by 3.",
            code_text(good_health).encode("ascii") + b"0",
            "bad_base45",
        ),
        lambda: rejected(
            "base45-group-over-65535",
            "The group ':::' decodes to 91124, more than two bytes can hold.",
            b"EN::::",
            "bad_base45",
        ),
        lambda: rejected(
            "empty-body",
            "The prefix alone: a body of zero bytes.",
            b"EN:",
            "truncated",
        ),
        lambda: rejected_body(
            "version-byte-only",
            "A body of one byte, the format version, with no header after it.",
            bytes([1]),
            "truncated",
        ),
        lambda: rejected_body(
            "header-cut-short",
            "The first 38 of the 39 header bytes of a health code.",
            good_health[:38],
            "truncated",
        ),
        lambda: rejected_body(
            "health-colour-missing",
            "A complete 39-byte health header and nothing after it.",
            good_health[:39],
            "truncated",
        ),
        lambda: rejected_body(
            "signature-cut-short",
            "A health code with the last byte of its signature removed.",
            good_health[:-1],
            "truncated",
        ),
        lambda: rejected_body(
            "community-role-missing",
            "A complete 39-byte community header and nothing after it.",
            good_community_header,
            "truncated",
        ),
        lambda: rejected_body(
            "trailing-byte",
            "A valid health code with one byte (0x00) appended after the signature.",
            good_health + b"\x00",
            "trailing_data",
        ),
        lambda: rejected_body(
            "version-2",
            "A health body whose first byte, the format version, is 2.",
            health_signed(version=2),
            "unsupported_version",
        ),
        lambda: rejected_body(
            "version-0",
            "A health body whose first byte, the format version, is 0.",
            health_signed(version=0),
            "unsupported_version",
        ),
        lambda: rejected_body(
            "code-type-3",
            "A body whose code type byte is 3, which is neither health nor community.",
            signed_body(
                header(3, health_key, subject=subject_for("health-invalid")) + bytes([1]),
                health_key,
            ),
            "unknown_code_type",
        ),
        lambda: rejected_body(
            "unknown-flag",
            "A health code with flag bit 0x02 set. Only bit 0x01 (printed) is defined.",
            health_signed(flags=0x02),
            "malformed_field",
        ),
        lambda: rejected_body(
            "expires-before-issued",
            "A health code whose expires_at is one second before its issued_at.",
            health_signed(expires_at=ISSUED_AT - 1),
            "malformed_field",
        ),
        lambda: rejected_body(
            "expires-equals-issued",
            "A health code whose expires_at equals its issued_at.",
            health_signed(expires_at=ISSUED_AT),
            "malformed_field",
        ),
        lambda: rejected_body(
            "health-colour-4",
            "A health code whose colour byte is 4. Only 1, 2 and 3 are defined.",
            signed_body(
                header(HEALTH, health_key, subject=subject_for("health-invalid")) + bytes([4]),
                health_key,
            ),
            "malformed_field",
        ),
        lambda: rejected_body(
            "health-colour-0",
            "A health code whose colour byte is 0.",
            signed_body(
                header(HEALTH, health_key, subject=subject_for("health-invalid")) + bytes([0]),
                health_key,
            ),
            "malformed_field",
        ),
        lambda: rejected_body(
            "community-role-5",
            "A community code whose role byte is 5. Only 1 to 4 are defined.",
            community_signed(community_part(5, b"XINGFU-GARDEN", b"12", b"1-502")),
            "malformed_field",
        ),
        lambda: rejected_body(
            "community-compound-empty",
            "A community code whose compound field has length 0.",
            community_signed(community_part(1, b"", b"12", b"1-502")),
            "malformed_field",
        ),
        lambda: rejected_body(
            "community-compound-33-bytes",
            "A community code whose compound field is 33 bytes, one over the maximum of 32.",
            community_signed(community_part(1, b"C" * 33, b"12", b"1-502")),
            "malformed_field",
        ),
        lambda: rejected_body(
            "community-building-with-space",
            "A community code whose building field contains a space (0x20).",
            community_signed(community_part(1, b"XINGFU-GARDEN", b"BLOCK 12", b"1-502")),
            "malformed_field",
        ),
        lambda: rejected_body(
            "community-unit-utf8",
            "A community code whose unit field contains UTF-8 bytes (the word 单元).",
            community_signed(community_part(1, b"XINGFU-GARDEN", b"12", "单元".encode())),
            "malformed_field",
        ),
        lambda: rejected_body(
            "issued-at-in-milliseconds",
            f"A health code whose issued_at is {ms_issued_at}, a time in milliseconds.",
            health_signed(issued_at=ms_issued_at, expires_at=ms_issued_at + 300_000),
            "timestamp_implausible",
        ),
        lambda: rejected_body(
            "expires-at-in-milliseconds",
            "A health code whose issued_at is in seconds and expires_at in milliseconds.",
            health_signed(expires_at=(ISSUED_AT + 300) * 1_000),
            "timestamp_implausible",
        ),
        lambda: rejected_body(
            "issued-before-2020",
            "A health code issued at 1577836799, one second before 2020-01-01T00:00:00Z.",
            health_signed(issued_at=1_577_836_799, expires_at=1_577_837_099),
            "timestamp_implausible",
        ),
        lambda: rejected_body(
            "expires-in-2100",
            "A health code that expires at 4102444800, 2100-01-01T00:00:00Z.",
            health_signed(expires_at=4_102_444_800),
            "timestamp_implausible",
        ),
    ]
    return [case() for case in cases]


def bad_signature_vectors(health_key: SigningKey, other_key: SigningKey) -> list[dict[str, Any]]:
    subject = subject_for("health-bad-signature")
    signed_part = header(HEALTH, health_key, subject=subject) + bytes([1])
    body = bytearray(signed_body(signed_part, health_key))
    body[-1] ^= 0x01
    flipped = bytes(body)
    # Carries the health issuer's key id but is signed by a key no cache lists.
    forged = signed_part + other_key.sign(signed_part).signature
    expected = {"result": "parses", "code_type": "health", "signature_valid": False}
    return [
        {
            "name": "signature-bit-flipped",
            "description": "A green health code with the lowest bit of its last byte flipped.",
            "issuer": "health_issuer",
            "text": code_text(flipped),
            "expected": expected,
        },
        {
            "name": "signed-by-other-key",
            "description": (
                "A green health code that carries the health issuer's key id "
                "but is signed by another key."
            ),
            "issuer": "health_issuer",
            "text": code_text(forged),
            "expected": expected,
        },
    ]


def build_vectors() -> dict[str, Any]:
    """Build the whole test-vector document as a JSON-ready dict."""
    health_key = SigningKey(HEALTH_SEED)
    community_key = SigningKey(COMMUNITY_SEED)
    other_key = SigningKey(OTHER_SEED)
    return {
        "description": (
            "Test vectors for the edgenode signed code format described in docs/code-format.md. "
            "Generated by scripts/make_test_vectors.py."
        ),
        "format_version": 1,
        "keys": {
            "health_issuer": key_entry(HEALTH_SEED),
            "community_issuer": key_entry(COMMUNITY_SEED),
            "other": key_entry(OTHER_SEED),
        },
        "platform_token_patterns": [
            {
                "name": "example-city",
                "regex": r"https://jkm\.example\.gov\.cn/c\?t=(?P<token>[0-9A-Za-z]{16,64})",
            }
        ],
        "platform_tokens": [
            {
                "name": "example-city-url",
                "text": "https://jkm.example.gov.cn/c?t=Q7nR2vXk9LmP4sTw8YzA",
                "expected": {
                    "result": "platform_token",
                    "pattern": "example-city",
                    "token": "Q7nR2vXk9LmP4sTw8YzA",
                    "token_hash": hashlib.sha256(b"Q7nR2vXk9LmP4sTw8YzA").hexdigest(),
                },
            }
        ],
        "valid": valid_vectors(health_key, community_key),
        "bad_signature": bad_signature_vectors(health_key, other_key),
        "invalid": invalid_vectors(health_key, community_key),
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    output = Path(argv[1]) if len(argv) > 1 else OUTPUT
    output.write_text(render(build_vectors()), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
