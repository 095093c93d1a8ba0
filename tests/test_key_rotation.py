"""Issuer-key rotation: the keyring, the published trust list and the gate's decisions.

The district's datasets are built by the real Publisher from a real feed store, and applied to
a real gate cache as the downlink applies them (``import_snapshot``, ``apply_delta``). Codes are
decided by the real policy against that cache.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from edgenode.cache import Cache, import_snapshot
from edgenode.codes import (
    Colour,
    CommunityCode,
    HealthCode,
    Role,
    encode_community,
    encode_health,
    key_id_for,
    parse_payload,
)
from edgenode.config import PolicyConfig
from edgenode.district import KEY_FILES, read_key, write_key
from edgenode.district_keys import (
    KEYRING_FILE,
    NO_END,
    KeyringError,
    describe_keys,
    fingerprint,
    load_keyring,
    normalise_fingerprint,
    rotate_issuer_key,
)
from edgenode.i18n import translator
from edgenode.policy import ClockReading, Outcome, Verdict, decide
from edgenode.reasons import Reason
from sync.delta import apply_delta
from sync.feeds import FeedStore, import_health, import_roster
from sync.publisher import Publisher, Transfer, read_issuer_keys

DAY_S = 86_400
OVERLAP_S = 7 * DAY_S
SITE = "XH-ROT1"
SUBJECT = "0a" * 16
HEALTH_SUBJECT = "0b" * 16


class NoBroker:
    """The publisher's connection, never used: these tests build files and apply them."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        raise AssertionError("the rotation tests do not send")


def make_key_folder(folder: Path) -> Path:
    folder.mkdir()
    for name in KEY_FILES.values():
        write_key(folder / name, SigningKey.generate())
    return folder


@dataclass
class Gate:
    """A gate's cache and the district's publisher for one site, at a clock the test moves."""

    folder: Path
    keys: Path
    now: int

    def __post_init__(self) -> None:
        self.store = FeedStore(self.folder / "hub.db")
        roster = self.folder / "roster.csv"
        roster.write_text(
            "site,subject,health_subject,name,id_number,building,unit,role,valid_from,"
            f"valid_until\n{SITE},{SUBJECT},{HEALTH_SUBJECT},张三丰,110101199003071234,3,1-502,"
            "resident,2026-01-01,2036-01-01\n",
            encoding="utf-8",
        )
        assert import_roster(self.store, roster).errors == []
        self.district_key = read_key(self.keys / KEY_FILES["district"])
        self.publisher = Publisher(
            self.store,
            NoBroker(),
            district_key=self.district_key,
            issuers=lambda now: read_issuer_keys(self.keys, now),
            clock=lambda: self.now,
        )
        self.cache_path = self.folder / "cache.db"

    def green_status(self) -> None:
        health = self.folder / "health.csv"
        health.write_text(
            f"health_subject,colour,as_of\n{HEALTH_SUBJECT},green,{self.now}\n", encoding="utf-8"
        )
        assert import_health(self.store, health).errors == []

    def sync(self) -> Transfer:
        """Publish the site's next version and apply it to the cache."""
        self.green_status()
        transfer = self.publisher.build(SITE)
        path = self.folder / f"{transfer.kind}-{transfer.version}"
        path.write_bytes(transfer.data)
        trusted = [bytes(self.district_key.verify_key)]
        if transfer.kind == "snapshot":
            import_snapshot(self.cache_path, path, trusted, site=SITE, now=self.now)
        else:
            apply_delta(self.cache_path, path, trusted, site=SITE, now=self.now)
        return transfer

    def decide(self, health_key: SigningKey, issued_at: int) -> Verdict:
        """Decide a printed health code signed by ``health_key`` with a valid community code."""
        health = parse_payload(
            encode_health(
                health_key,
                subject=bytes.fromhex(HEALTH_SUBJECT),
                colour=Colour.GREEN,
                issued_at=issued_at,
                expires_at=issued_at + 60 * DAY_S,
                printed=True,
            ).encode("ascii")
        )
        community = parse_payload(
            encode_community(
                read_key(self.keys / KEY_FILES["community"]),
                subject=bytes.fromhex(SUBJECT),
                role=Role.RESIDENT,
                compound=SITE,
                building="3",
                unit="1-502",
                issued_at=issued_at,
                expires_at=issued_at + 60 * DAY_S,
                printed=True,
            ).encode("ascii")
        )
        assert isinstance(health, HealthCode)
        assert isinstance(community, CommunityCode)
        with Cache(self.cache_path) as cache:
            return decide(
                health, community, cache, ClockReading(self.now), PolicyConfig(), site=SITE
            )

    def has_issuer(self, key_id: str) -> bool:
        with Cache(self.cache_path) as cache:
            return cache.issuer(bytes.fromhex(key_id)) is not None


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    keys = make_key_folder(tmp_path / "keys")
    return Gate(tmp_path, keys, int(time.time()))


def test_codes_of_both_keys_admitted_during_overlap(gate: Gate) -> None:
    old_key = read_key(gate.keys / KEY_FILES["health"])
    old_code_time = gate.now - 3600
    gate.sync()
    rotation = rotate_issuer_key(gate.keys, "health", overlap_s=OVERLAP_S, now=gate.now)
    new_key = read_key(gate.keys / rotation.new.file)
    gate.now += 60
    transfer = gate.sync()

    assert transfer.kind == "delta"
    assert gate.has_issuer(rotation.old.key_id)
    assert gate.has_issuer(rotation.new.key_id)
    old_verdict = gate.decide(old_key, old_code_time)
    assert old_verdict.outcome is Outcome.ADMIT, old_verdict.reasons
    new_verdict = gate.decide(new_key, gate.now - 10)
    assert new_verdict.outcome is Outcome.ADMIT, new_verdict.reasons


def test_old_key_denied_after_overlap(gate: Gate) -> None:
    old_key = read_key(gate.keys / KEY_FILES["health"])
    code_time = gate.now - 3600
    gate.sync()
    rotation = rotate_issuer_key(gate.keys, "health", overlap_s=OVERLAP_S, now=gate.now)
    new_key = read_key(gate.keys / rotation.new.file)
    gate.sync()
    gate.now += OVERLAP_S + 60

    # The gate has not yet received the next version: the key's own end retires it.
    before_drop = gate.decide(old_key, code_time)
    assert before_drop.outcome is Outcome.DENY
    assert Reason.ISSUER_KEY_NOT_VALID in before_drop.reasons

    gate.sync()
    assert not gate.has_issuer(rotation.old.key_id)
    after_drop = gate.decide(old_key, code_time)
    assert after_drop.outcome is Outcome.DENY
    assert Reason.UNKNOWN_ISSUER in after_drop.reasons
    new_verdict = gate.decide(new_key, gate.now - 10)
    assert new_verdict.outcome is Outcome.ADMIT, new_verdict.reasons


def test_rotation_records_validity_in_keyring(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    old_public = bytes(read_key(keys / KEY_FILES["health"]).verify_key)
    rotation = rotate_issuer_key(keys, "health", overlap_s=OVERLAP_S, now=1_800_000_000)

    assert rotation.old.key_id == key_id_for(old_public).hex()
    assert rotation.old.valid_until == 1_800_000_000 + OVERLAP_S
    assert rotation.new.valid_from == 1_800_000_000
    assert rotation.new.valid_until == NO_END
    saved = json.loads((keys / KEYRING_FILE).read_text(encoding="utf-8"))
    assert [entry["role"] for entry in saved["keys"]] == ["health", "community", "health"]
    new_mode = stat.S_IMODE(os.stat(keys / rotation.new.file).st_mode)
    assert new_mode == 0o600


def test_second_rotation_during_overlap_rejected(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    rotate_issuer_key(keys, "health", overlap_s=OVERLAP_S, now=1_800_000_000)

    with pytest.raises(KeyringError, match="after the overlap ends"):
        rotate_issuer_key(keys, "health", overlap_s=OVERLAP_S, now=1_800_000_100)
    after = rotate_issuer_key(keys, "health", overlap_s=0, now=1_800_000_000 + OVERLAP_S + 1)
    assert len([entry for entry in load_keyring(keys) if entry.role == "health"]) == 3
    assert after.new.valid_from == 1_800_000_000 + OVERLAP_S + 1


def test_read_issuer_keys_drops_retired_key(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    rotation = rotate_issuer_key(keys, "health", overlap_s=OVERLAP_S, now=1_800_000_000)

    during = {
        key_id_for(bytes(k.key.verify_key)).hex() for k in read_issuer_keys(keys, 1_800_000_001)
    }
    after = {
        key_id_for(bytes(k.key.verify_key)).hex()
        for k in read_issuer_keys(keys, 1_800_000_000 + OVERLAP_S + 1)
    }
    assert rotation.old.key_id in during
    assert rotation.new.key_id in during
    assert rotation.old.key_id not in after
    assert rotation.new.key_id in after


def test_keyring_mismatch_with_key_file_rejected(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    rotation = rotate_issuer_key(keys, "health", overlap_s=OVERLAP_S, now=1_800_000_000)
    (keys / rotation.new.file).unlink()
    write_key(keys / rotation.new.file, SigningKey.generate())

    with pytest.raises(KeyringError, match="does not hold the key"):
        read_issuer_keys(keys, 1_800_000_001)


def test_fingerprint_ignores_separators_and_case() -> None:
    public = bytes(SigningKey.generate().verify_key)
    shown = fingerprint(public)

    assert len(normalise_fingerprint(shown)) == 32
    assert normalise_fingerprint(shown.upper().replace("-", " ")) == normalise_fingerprint(shown)


def test_keys_show_flags_readable_key(tmp_path: Path) -> None:
    keys = make_key_folder(tmp_path / "keys")
    (keys / KEY_FILES["district"]).chmod(0o644)

    rows = describe_keys(keys, int(time.time()))
    district = next(row for row in rows if row["role"] == "district")
    assert district["owner_only"] is False
    assert district["fingerprint"] == fingerprint(
        bytes(read_key(keys / KEY_FILES["district"]).verify_key)
    )


def test_keys_rotate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgenode.enroll_cli import add_district_commands

    keys = make_key_folder(tmp_path / "keys")
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{tmp_path / "hub.db"}"\ndistrict_key_file = "{keys / "district.key"}"\n',
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser()
    add_district_commands(parser.add_subparsers(dest="command", required=True))
    for argv in (
        ["keys", "rotate", "--config", str(config), "--role", "community", "--overlap-days", "2"],
        ["keys", "show", "--config", str(config)],
    ):
        args = parser.parse_args(argv)
        args.tr = translator("zh_CN")
        assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "请用它签发新码" in output
    assert "正在退役" in output
