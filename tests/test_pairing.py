"""Pairing codes at a station: one frame, two scans within the window, lone codes, debounce."""

from __future__ import annotations

import time

import pytest
from nacl.signing import SigningKey

from edgenode.codes import (
    Colour,
    CommunityCode,
    HealthCode,
    Role,
    encode_community,
    encode_health,
    parse_payload,
)
from edgenode.pairing import Lone, Pair, Pairer, Unreadable
from edgenode.reasons import Reason

KEY = SigningKey.generate()
NOW = int(time.time())


def health(n: int = 0) -> HealthCode:
    text = encode_health(
        KEY, subject=bytes([n]) * 16, colour=Colour.GREEN, issued_at=NOW, expires_at=NOW + 60
    )
    code = parse_payload(text.encode())
    assert isinstance(code, HealthCode)
    return code


def community(n: int = 0) -> CommunityCode:
    text = encode_community(
        KEY, subject=bytes([n]) * 16, role=Role.RESIDENT, compound="X", building="1", unit="1",
        issued_at=NOW, expires_at=NOW + 60,
    )  # fmt: skip
    code = parse_payload(text.encode())
    assert isinstance(code, CommunityCode)
    return code


@pytest.fixture
def pairer() -> Pairer:
    return Pairer(pair_window_s=8.0, debounce_s=2.0)


def test_both_codes_in_one_frame_pair(pairer: Pairer) -> None:
    results = pairer.add("gate", 0.0, [health(), community()])
    assert results == [Pair(health(), community(), 0.0)]


def test_two_scans_within_window_pair(pairer: Pairer) -> None:
    assert pairer.add("gate", 0.0, [community()]) == []
    assert pairer.add("gate", 5.0, [health()]) == [Pair(health(), community(), 5.0)]


def test_lone_code_expires_after_window(pairer: Pairer) -> None:
    pairer.add("gate", 0.0, [health()])
    assert pairer.expire(7.9) == []
    assert pairer.expire(8.1) == [Lone(health(), Reason.MISSING_COMMUNITY_CODE, 0.0)]


def test_scan_after_window_does_not_pair(pairer: Pairer) -> None:
    pairer.add("gate", 0.0, [health()])
    results = pairer.add("gate", 9.0, [community()])
    assert results == [Lone(health(), Reason.MISSING_COMMUNITY_CODE, 0.0)]


def test_stations_pair_separately(pairer: Pairer) -> None:
    pairer.add("north", 0.0, [health()])
    assert pairer.add("south", 1.0, [community()]) == []


def test_new_code_of_same_type_replaces_waiting_one(pairer: Pairer) -> None:
    pairer.add("gate", 0.0, [health(1)])
    results = pairer.add("gate", 1.0, [health(2)])
    assert results == [Lone(health(1), Reason.MISSING_COMMUNITY_CODE, 0.0)]


def test_repeated_frames_count_once(pairer: Pairer) -> None:
    first = pairer.add("gate", 0.0, [health(), community()])
    repeats = [pairer.add("gate", 0.1 * n, [health(), community()]) for n in range(1, 40)]
    assert len(first) == 1
    assert all(result == [] for result in repeats)


def test_code_shown_again_after_debounce_counts_again(pairer: Pairer) -> None:
    pairer.add("gate", 0.0, [health(), community()])
    again = pairer.add("gate", 2.5, [health(), community()])
    assert len(again) == 1


def test_two_phones_in_view_are_not_guessed(pairer: Pairer) -> None:
    results = pairer.add("gate", 0.0, [health(1), health(2), community(1)])
    assert {r.reason for r in results if isinstance(r, Lone)} == {Reason.DUPLICATE_CODE_TYPE}
    assert len(results) == 3


def test_unreadable_payload_is_reported_at_once(pairer: Pairer) -> None:
    rejection = parse_payload(b"hello")
    assert pairer.add("gate", 0.0, [rejection]) == [Unreadable(rejection)]  # type: ignore[list-item]


def test_flush_resolves_waiting_codes(pairer: Pairer) -> None:
    pairer.add("gate", 0.0, [community()])
    assert pairer.flush() == [Lone(community(), Reason.MISSING_HEALTH_CODE, 0.0)]
    assert pairer.flush() == []
