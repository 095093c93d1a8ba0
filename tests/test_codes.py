"""Signed code format: the published test vectors, round trips and parser robustness."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import base45
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from edgenode.codes import (
    BUILDING_MAX_LEN,
    CODE_ID_LEN,
    COMPOUND_MAX_LEN,
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    MAX_PAYLOAD_LEN,
    SUBJECT_LEN,
    UNIT_MAX_LEN,
    Colour,
    CommunityCode,
    HealthCode,
    PlatformToken,
    Rejection,
    Role,
    SignedCode,
    TokenPattern,
    encode_community,
    encode_health,
    key_id_for,
    parse_payload,
    verify_signature,
)
from edgenode.config import PolicyConfig
from edgenode.reasons import Reason

ROOT = Path(__file__).resolve().parent.parent
VECTORS_PATH = ROOT / "docs" / "test-vectors.json"
GENERATOR_PATH = ROOT / "scripts" / "make_test_vectors.py"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

QR_ALPHANUMERIC = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")
PRINTABLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))
RESULT_TYPES = (HealthCode, CommunityCode, PlatformToken, Rejection)

HEALTH_KEY = SigningKey(bytes.fromhex(VECTORS["keys"]["health_issuer"]["seed"]))
COMMUNITY_KEY = SigningKey(bytes.fromhex(VECTORS["keys"]["community_issuer"]["seed"]))
ISSUED_AT = 1_800_000_000
SUBJECT = bytes(range(SUBJECT_LEN))

TOKEN_PATTERNS = tuple(
    TokenPattern(entry["name"], re.compile(entry["regex"]))
    for entry in VECTORS["platform_token_patterns"]
)


def by_name(vectors: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(vector, id=vector["name"]) for vector in vectors]


def public_key(issuer: str) -> bytes:
    return bytes.fromhex(VECTORS["keys"][issuer]["public_key"])


def seed(issuer: str) -> bytes:
    return bytes.fromhex(VECTORS["keys"][issuer]["seed"])


def decoded_fields(code: SignedCode) -> dict[str, Any]:
    """Return a code's fields in the form docs/test-vectors.json uses."""
    fields: dict[str, Any] = {
        "version": code.version,
        "printed": code.printed,
        "dynamic": code.dynamic,
        "key_id": code.key_id.hex(),
        "issued_at": code.issued_at,
        "expires_at": code.expires_at,
        "subject": code.subject.hex(),
    }
    if isinstance(code, HealthCode):
        fields["colour"] = code.colour.name.lower()
    if isinstance(code, CommunityCode):
        fields["role"] = code.role.value
        fields["compound"] = code.compound
        fields["building"] = code.building
        fields["unit"] = code.unit
    return fields


def parse_text(text: str) -> Any:
    return parse_payload(text.encode("ascii"), TOKEN_PATTERNS)


def mint_health(**overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "subject": SUBJECT,
        "colour": Colour.GREEN,
        "issued_at": ISSUED_AT,
        "expires_at": ISSUED_AT + 300,
        "printed": False,
    }
    arguments.update(overrides)
    return encode_health(HEALTH_KEY, **arguments)


def mint_community(**overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "subject": SUBJECT,
        "role": Role.RESIDENT,
        "compound": "XINGFU-GARDEN",
        "building": "12",
        "unit": "1-502",
        "issued_at": ISSUED_AT,
        "expires_at": ISSUED_AT + 300,
        "printed": False,
    }
    arguments.update(overrides)
    return encode_community(COMMUNITY_KEY, **arguments)


def body_of(text: str) -> bytes:
    return bytes(base45.b45decode(text.removeprefix("EN:")))


def text_of(body: bytes) -> str:
    return "EN:" + str(base45.b45encode(body).decode("ascii"))


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_test_vectors", GENERATOR_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- The published test vectors ---


def test_vectors_file_matches_generator() -> None:
    generator = load_generator()

    assert generator.render(generator.build_vectors()) == VECTORS_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize("issuer", sorted(VECTORS["keys"]))
def test_vector_public_key_derives_from_seed(issuer: str) -> None:
    derived = bytes(SigningKey(seed(issuer)).verify_key)

    assert derived == public_key(issuer)


@pytest.mark.parametrize("issuer", sorted(VECTORS["keys"]))
def test_vector_key_id_matches_public_key(issuer: str) -> None:
    expected = hashlib.sha256(public_key(issuer)).digest()[:4]

    assert bytes.fromhex(VECTORS["keys"][issuer]["key_id"]) == expected
    assert key_id_for(public_key(issuer)) == expected


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_parses_to_expected_fields(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])
    expected_type = HealthCode if vector["code_type"] == "health" else CommunityCode

    assert isinstance(result, expected_type)
    assert decoded_fields(result) == vector["fields"]


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_text_is_base45_of_body(vector: dict[str, Any]) -> None:
    assert vector["text"] == text_of(bytes.fromhex(vector["body_hex"]))


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_splits_into_signed_part_and_signature(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])
    body = bytes.fromhex(vector["body_hex"])

    assert isinstance(result, SignedCode)
    assert result.signed_part == body[: vector["signed_length"]]
    assert result.signature == body[vector["signed_length"] :]
    assert len(result.signature) == 64


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_verifies_against_its_key(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])

    assert isinstance(result, SignedCode)
    assert verify_signature(result, public_key(vector["issuer"]))


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_fails_against_other_key(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])

    assert isinstance(result, SignedCode)
    assert not verify_signature(result, public_key("other"))


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_valid_vector_code_id_matches(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])
    body = bytes.fromhex(vector["body_hex"])

    assert isinstance(result, SignedCode)
    assert result.code_id.hex() == vector["code_id"]
    assert result.code_id == hashlib.sha256(body).digest()[:CODE_ID_LEN]


@pytest.mark.parametrize("vector", by_name(VECTORS["valid"]))
def test_reencoding_valid_vector_gives_same_text(vector: dict[str, Any]) -> None:
    fields = vector["fields"]
    key = SigningKey(seed(vector["issuer"]))
    common: dict[str, Any] = {
        "subject": bytes.fromhex(fields["subject"]),
        "issued_at": fields["issued_at"],
        "expires_at": fields["expires_at"],
        "printed": fields["printed"],
    }
    if vector["code_type"] == "health":
        text = encode_health(key, colour=Colour[fields["colour"].upper()], **common)
    else:
        text = encode_community(
            key,
            role=Role(fields["role"]),
            compound=fields["compound"],
            building=fields["building"],
            unit=fields["unit"],
            **common,
        )

    assert text == vector["text"]


@pytest.mark.parametrize("vector", by_name(VECTORS["invalid"]))
def test_invalid_vector_is_rejected_with_expected_reason(vector: dict[str, Any]) -> None:
    result = parse_payload(bytes.fromhex(vector["payload_hex"]), TOKEN_PATTERNS)

    assert isinstance(result, Rejection)
    assert result.reason == Reason(vector["expected"]["reason"])


@pytest.mark.parametrize("vector", by_name(VECTORS["invalid"]))
def test_invalid_vector_text_matches_payload(vector: dict[str, Any]) -> None:
    payload = bytes.fromhex(vector["payload_hex"])
    if not payload.isascii():
        assert "text" not in vector
        return

    assert vector["text"].encode("ascii") == payload


def test_invalid_vectors_cover_every_parse_reason() -> None:
    parse_reasons = {
        Reason.UNRECOGNISED_PAYLOAD,
        Reason.BAD_BASE45,
        Reason.TRUNCATED,
        Reason.TRAILING_DATA,
        Reason.UNSUPPORTED_VERSION,
        Reason.UNKNOWN_CODE_TYPE,
        Reason.MALFORMED_FIELD,
        Reason.TIMESTAMP_IMPLAUSIBLE,
    }
    covered = {Reason(vector["expected"]["reason"]) for vector in VECTORS["invalid"]}

    assert covered == parse_reasons


@pytest.mark.parametrize("vector", by_name(VECTORS["bad_signature"]))
def test_bad_signature_vector_parses(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])

    assert isinstance(result, HealthCode)


@pytest.mark.parametrize("vector", by_name(VECTORS["bad_signature"]))
def test_bad_signature_vector_does_not_verify(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])

    assert isinstance(result, SignedCode)
    assert not verify_signature(result, public_key(vector["issuer"]))


@pytest.mark.parametrize("vector", by_name(VECTORS["bad_signature"]))
def test_bad_signature_vector_carries_issuer_key_id(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])

    assert isinstance(result, SignedCode)
    assert result.key_id.hex() == VECTORS["keys"][vector["issuer"]]["key_id"]


@pytest.mark.parametrize("vector", by_name(VECTORS["platform_tokens"]))
def test_platform_token_vector_resolves_to_token_hash(vector: dict[str, Any]) -> None:
    result = parse_text(vector["text"])
    expected = vector["expected"]

    assert isinstance(result, PlatformToken)
    assert result.pattern == expected["pattern"]
    assert result.token_hash.hex() == expected["token_hash"]
    assert result.token_hash == hashlib.sha256(expected["token"].encode("ascii")).digest()


# --- Round trips and encoding ---


@pytest.mark.parametrize("printed", [False, True], ids=["dynamic", "printed"])
@pytest.mark.parametrize("colour", list(Colour), ids=lambda colour: colour.name.lower())
def test_health_code_round_trips(colour: Colour, printed: bool) -> None:
    result = parse_text(mint_health(colour=colour, printed=printed))

    assert isinstance(result, HealthCode)
    assert result.colour == colour
    assert result.printed == printed
    assert result.dynamic != printed
    assert result.subject == SUBJECT
    assert result.issued_at == ISSUED_AT
    assert result.expires_at == ISSUED_AT + 300
    assert result.key_id == key_id_for(bytes(HEALTH_KEY.verify_key))
    assert verify_signature(result, bytes(HEALTH_KEY.verify_key))


@pytest.mark.parametrize("printed", [False, True], ids=["dynamic", "printed"])
@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_community_code_round_trips(role: Role, printed: bool) -> None:
    result = parse_text(mint_community(role=role, printed=printed))

    assert isinstance(result, CommunityCode)
    assert result.role == role
    assert result.printed == printed
    assert result.compound == "XINGFU-GARDEN"
    assert result.building == "12"
    assert result.unit == "1-502"
    assert result.subject == SUBJECT
    assert verify_signature(result, bytes(COMMUNITY_KEY.verify_key))


def test_community_text_fields_at_maximum_length_round_trip() -> None:
    compound = PRINTABLE_ASCII[:COMPOUND_MAX_LEN]
    building = PRINTABLE_ASCII[-BUILDING_MAX_LEN:]
    unit = "~" * UNIT_MAX_LEN

    result = parse_text(mint_community(compound=compound, building=building, unit=unit))

    assert isinstance(result, CommunityCode)
    assert result.compound == compound
    assert result.building == building
    assert result.unit == unit


def test_community_empty_building_and_unit_round_trip() -> None:
    result = parse_text(mint_community(building="", unit=""))

    assert isinstance(result, CommunityCode)
    assert result.building == ""
    assert result.unit == ""


@pytest.mark.parametrize(
    "issued_at",
    [EARLIEST_TIMESTAMP, LATEST_TIMESTAMP - 2],
    ids=["start-of-2020", "end-of-2099"],
)
def test_timestamps_at_range_bounds_round_trip(issued_at: int) -> None:
    result = parse_text(mint_health(issued_at=issued_at, expires_at=issued_at + 1))

    assert isinstance(result, HealthCode)
    assert result.issued_at == issued_at


def test_timestamp_in_milliseconds_is_rejected() -> None:
    body = bytearray(body_of(mint_health()))
    body[7:15] = (ISSUED_AT * 1_000).to_bytes(8, "big")

    result = parse_text(text_of(bytes(body)))

    assert isinstance(result, Rejection)
    assert result.reason == Reason.TIMESTAMP_IMPLAUSIBLE


@pytest.mark.parametrize(
    "field, value",
    [
        ("compound", "C" * (COMPOUND_MAX_LEN + 1)),
        ("building", "B" * (BUILDING_MAX_LEN + 1)),
        ("unit", "U" * (UNIT_MAX_LEN + 1)),
        ("compound", "XINGFU GARDEN"),
        ("building", "12\t"),
        ("unit", "1-502\n"),
        ("compound", "幸福花园"),
        ("unit", "单元"),
    ],
    ids=[
        "compound-too-long",
        "building-too-long",
        "unit-too-long",
        "compound-with-space",
        "building-with-tab",
        "unit-with-newline",
        "compound-not-ascii",
        "unit-not-ascii",
    ],
)
def test_encoding_invalid_text_field_raises_value_error(field: str, value: str) -> None:
    with pytest.raises(ValueError):
        mint_community(**{field: value})


@pytest.mark.parametrize("length", [0, SUBJECT_LEN - 1, SUBJECT_LEN + 1])
def test_encoding_subject_of_wrong_length_raises_value_error(length: int) -> None:
    with pytest.raises(ValueError):
        mint_health(subject=bytes(length))
    with pytest.raises(ValueError):
        mint_community(subject=bytes(length))


def test_encoding_empty_compound_raises_value_error() -> None:
    with pytest.raises(ValueError):
        mint_community(compound="")


@pytest.mark.parametrize(
    "issued_at",
    [ISSUED_AT * 1_000, EARLIEST_TIMESTAMP - 1, LATEST_TIMESTAMP, -1],
    ids=["milliseconds", "before-2020", "year-2100", "negative"],
)
def test_encoding_implausible_timestamp_raises_value_error(issued_at: int) -> None:
    with pytest.raises(ValueError):
        mint_health(issued_at=issued_at, expires_at=issued_at + 300)


@pytest.mark.parametrize("lifetime", [0, -1], ids=["equal", "before"])
def test_encoding_expiry_not_after_issue_raises_value_error(lifetime: int) -> None:
    with pytest.raises(ValueError):
        mint_health(expires_at=ISSUED_AT + lifetime)


def test_community_body_cut_inside_compound_is_truncated() -> None:
    body = body_of(mint_community(compound="XINGFU-GARDEN"))
    # 39 header bytes, the role byte, the length byte, then 3 of the 13 compound bytes.
    cut = body[: 39 + 1 + 1 + 3]

    result = parse_text(text_of(cut))

    assert isinstance(result, Rejection)
    assert result.reason == Reason.TRUNCATED


def test_signature_with_unreduced_scalar_does_not_verify() -> None:
    # Adding the group order to the signature's scalar S gives an equivalent signature that
    # lax Ed25519 verifiers accept. It would give the same code a second code id.
    group_order = 2**252 + 27742317777372353535851937790883648493
    body = body_of(mint_health())
    signed_part, signature = body[:-64], body[-64:]
    scalar = int.from_bytes(signature[32:], "little") + group_order
    malleated = signed_part + signature[:32] + scalar.to_bytes(32, "little")

    result = parse_text(text_of(malleated))

    assert isinstance(result, HealthCode)
    assert not verify_signature(result, bytes(HEALTH_KEY.verify_key))


def test_minted_code_uses_qr_alphanumeric_alphabet() -> None:
    texts = [vector["text"] for vector in VECTORS["valid"]]
    texts.append(mint_community(compound=PRINTABLE_ASCII[:COMPOUND_MAX_LEN]))

    for text in texts:
        assert set(text) <= QR_ALPHANUMERIC, text


# --- Properties ---

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)
BASE45_ALPHABET = "".join(sorted(QR_ALPHANUMERIC))


@st.composite
def minted_codes(draw: st.DrawFn) -> tuple[str, bytes]:
    """Draw a valid health or community code and return its text and its issuer's public key."""
    subject = draw(st.binary(min_size=SUBJECT_LEN, max_size=SUBJECT_LEN))
    issued_at = draw(st.integers(EARLIEST_TIMESTAMP, LATEST_TIMESTAMP - 2))
    expires_at = draw(st.integers(issued_at + 1, LATEST_TIMESTAMP - 1))
    printed = draw(st.booleans())
    if draw(st.booleans()):
        text = encode_health(
            HEALTH_KEY,
            subject=subject,
            colour=draw(st.sampled_from(Colour)),
            issued_at=issued_at,
            expires_at=expires_at,
            printed=printed,
        )
        return text, bytes(HEALTH_KEY.verify_key)
    text = encode_community(
        COMMUNITY_KEY,
        subject=subject,
        role=draw(st.sampled_from(Role)),
        compound=draw(st.text(PRINTABLE_ASCII, min_size=1, max_size=COMPOUND_MAX_LEN)),
        building=draw(st.text(PRINTABLE_ASCII, max_size=BUILDING_MAX_LEN)),
        unit=draw(st.text(PRINTABLE_ASCII, max_size=UNIT_MAX_LEN)),
        issued_at=issued_at,
        expires_at=expires_at,
        printed=printed,
    )
    return text, bytes(COMMUNITY_KEY.verify_key)


@st.composite
def mutated_bodies(draw: st.DrawFn, body: bytes) -> bytes:
    """Apply one to four byte changes, removals, insertions or appends to a body."""
    mutated = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["change", "remove", "append", "insert"]))
        if operation == "change" and mutated:
            index = draw(st.integers(0, len(mutated) - 1))
            mutated[index] = draw(st.integers(0, 255))
        elif operation == "remove" and mutated:
            start = draw(st.integers(0, len(mutated) - 1))
            del mutated[start : start + draw(st.integers(1, 70))]
        elif operation == "insert":
            index = draw(st.integers(0, len(mutated)))
            mutated[index:index] = draw(st.binary(min_size=1, max_size=8))
        else:
            mutated.extend(draw(st.binary(min_size=1, max_size=70)))
    return bytes(mutated)


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=MAX_PAYLOAD_LEN + 16))
def test_parse_arbitrary_bytes_returns_result(payload: bytes) -> None:
    assert isinstance(parse_payload(payload, TOKEN_PATTERNS), RESULT_TYPES)


@PROPERTY_SETTINGS
@given(text=st.text(st.characters(codec="ascii"), max_size=300))
def test_parse_arbitrary_ascii_returns_result(text: str) -> None:
    assert isinstance(parse_text(text), RESULT_TYPES)


@PROPERTY_SETTINGS
@given(
    text=st.one_of(
        st.text(BASE45_ALPHABET, max_size=300),
        st.text(st.characters(codec="ascii"), max_size=300),
    )
)
def test_parse_prefixed_text_returns_result(text: str) -> None:
    assert isinstance(parse_text("EN:" + text), RESULT_TYPES)


@PROPERTY_SETTINGS
@given(minted=minted_codes())
def test_minted_code_round_trips_in_qr_alphabet(minted: tuple[str, bytes]) -> None:
    text, key = minted
    result = parse_text(text)

    assert set(text) <= QR_ALPHANUMERIC
    assert isinstance(result, SignedCode)
    assert verify_signature(result, key)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), minted=minted_codes())
def test_mutated_code_never_verifies_unless_identical(
    data: st.DataObject, minted: tuple[str, bytes]
) -> None:
    text, key = minted
    body = body_of(text)
    mutated = data.draw(mutated_bodies(body))

    result = parse_text(text_of(mutated))

    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, SignedCode) and mutated != body:
        assert not verify_signature(result, key)


# --- Platform tokens ---

CITY_PATTERN = TokenPattern(
    "example-city",
    re.compile(r"https://jkm\.example\.gov\.cn/c\?t=(?P<token>[0-9A-Za-z]{16,64})"),
)
CITY_TOKEN = "Q7nR2vXk9LmP4sTw8YzA"
CITY_URL = f"https://jkm.example.gov.cn/c?t={CITY_TOKEN}"


def test_token_pattern_recognises_url() -> None:
    result = parse_payload(CITY_URL.encode("ascii"), [CITY_PATTERN])

    assert isinstance(result, PlatformToken)
    assert result.pattern == "example-city"


def test_token_hash_covers_token_not_url() -> None:
    result = parse_payload(CITY_URL.encode("ascii"), [CITY_PATTERN])

    assert isinstance(result, PlatformToken)
    assert result.token_hash == hashlib.sha256(CITY_TOKEN.encode("ascii")).digest()
    assert result.token_hash != hashlib.sha256(CITY_URL.encode("ascii")).digest()
    assert result.code_id == result.token_hash[:CODE_ID_LEN]


@pytest.mark.parametrize(
    "text",
    [
        "https://jkm.example.gov.cn/c?t=SHORT",
        CITY_URL + "&x=1",
        "see " + CITY_URL,
        "http://jkm.example.gov.cn/c?t=" + CITY_TOKEN,
        "",
    ],
    ids=["token-too-short", "trailing-text", "leading-text", "other-scheme", "empty"],
)
def test_text_matching_no_pattern_is_unrecognised(text: str) -> None:
    result = parse_payload(text.encode("ascii"), [CITY_PATTERN])

    assert isinstance(result, Rejection)
    assert result.reason == Reason.UNRECOGNISED_PAYLOAD


def test_url_without_patterns_is_unrecognised() -> None:
    result = parse_payload(CITY_URL.encode("ascii"))

    assert isinstance(result, Rejection)
    assert result.reason == Reason.UNRECOGNISED_PAYLOAD


def test_prefix_takes_precedence_over_patterns() -> None:
    catch_all = TokenPattern("catch-all", re.compile(r"(?P<token>.+)"))

    result = parse_payload(b"EN:0", [catch_all])

    assert isinstance(result, Rejection)
    assert result.reason == Reason.BAD_BASE45


def test_first_matching_pattern_wins() -> None:
    catch_all = TokenPattern("catch-all", re.compile(r"(?P<token>.+)"))

    result = parse_payload(CITY_URL.encode("ascii"), [CITY_PATTERN, catch_all])

    assert isinstance(result, PlatformToken)
    assert result.pattern == "example-city"


def test_pattern_with_unmatched_token_group_does_not_raise() -> None:
    policy = PolicyConfig.model_validate(
        {"token_patterns": [{"name": "optional", "regex": r"HC:(?:NONE|(?P<token>\w+))"}]}
    )

    result = parse_payload(b"HC:NONE", policy.compiled_token_patterns())

    assert isinstance(result, RESULT_TYPES)
