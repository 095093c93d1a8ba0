"""The situations of docs/policy.md, built from real signed codes and real snapshot records.

Both the policy table test (codes fed straight into the main job) and the end-to-end test
(codes minted by the CLI, rendered into phone photos and scanned by ``edgenode scan``) build
their rows from ``ROWS`` here, so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import base45
from nacl.signing import SigningKey

from edgenode.cache import import_snapshot
from edgenode.codes import PREFIX, Rejection, Role, key_id_for, parse_payload, sign_body
from edgenode.config import Config, parse_config
from edgenode.district import issuer_record, read_key, write_key
from edgenode.policy import BUILD_TIMESTAMP
from edgenode.snapshot import write_snapshot

DAY = 86_400
SITE = "XH-0012"
OTHER_SITE = "XH-0099"
POLICY_DOC = Path(__file__).resolve().parent.parent / "docs" / "policy.md"
TOKEN_PATTERN = r"https://hc\.example\.gov\.cn/q\?t=(?P<token>[A-Za-z0-9]{16,64})"
TOKEN_URL = "https://hc.example.gov.cn/q?t={token}"


@dataclass(frozen=True)
class Person:
    subject: bytes
    health_subject: bytes
    role: Role
    display_name: str
    building: str = "3"
    unit: str = "1201"


def _person(n: int, role: Role, name: str) -> Person:
    subject = hashlib.sha256(f"subject-{n}".encode()).digest()[:16]
    health_subject = hashlib.sha256(f"health-{n}".encode()).digest()[:16]
    return Person(subject, health_subject, role, name)


PEOPLE: dict[str, Person] = {
    "alice": _person(1, Role.RESIDENT, "张*丰"),
    "bob": _person(2, Role.RESIDENT, "李*"),
    "visitor": _person(3, Role.VISITOR, "王*明"),
    "staff": _person(4, Role.STAFF, "赵*"),
    "delivery": _person(5, Role.DELIVERY, "孙*华"),
    "moved_out": _person(6, Role.RESIDENT, "周*"),
    # Not on the roster at all.
    "stranger": _person(7, Role.RESIDENT, "吴*"),
}


class Minter(Protocol):
    """Mints code texts from key files: directly, or through the CLI in the end-to-end test."""

    def health(
        self, key: Path, subject: bytes, colour: str, issued_at: int, valid_for: int, printed: bool
    ) -> str: ...

    def community(
        self,
        key: Path,
        subject: bytes,
        role: str,
        compound: str,
        building: str,
        unit: str,
        issued_at: int,
        valid_for: int,
        printed: bool,
    ) -> str: ...


class DirectMinter:
    def health(
        self, key: Path, subject: bytes, colour: str, issued_at: int, valid_for: int, printed: bool
    ) -> str:
        from edgenode.codes import Colour, encode_health

        return encode_health(
            read_key(key),
            subject=subject,
            colour=Colour[colour.upper()],
            issued_at=issued_at,
            expires_at=issued_at + valid_for,
            printed=printed,
        )

    def community(
        self,
        key: Path,
        subject: bytes,
        role: str,
        compound: str,
        building: str,
        unit: str,
        issued_at: int,
        valid_for: int,
        printed: bool,
    ) -> str:
        from edgenode.codes import encode_community

        return encode_community(
            read_key(key),
            subject=subject,
            role=Role(role),
            compound=compound,
            building=building,
            unit=unit,
            issued_at=issued_at,
            expires_at=issued_at + valid_for,
            printed=printed,
        )


@dataclass
class Site:
    """Keys in files, a fixed roster and a minter, all relative to one reference time."""

    folder: Path
    now: int
    minter: Minter
    keys: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, now: int, minter: Minter) -> Site:
        site = cls(folder, now, minter)
        for name in ("district", "health", "community", "rogue"):
            path = folder / f"{name}.key"
            write_key(path, SigningKey.generate())
            site.keys[name] = path
        return site

    def district_public_key(self) -> bytes:
        return bytes(read_key(self.keys["district"]).verify_key)

    def health(
        self,
        who: str = "alice",
        colour: str = "green",
        *,
        age_s: int = 30,
        valid_for: int = DAY,
        printed: bool = False,
        key: str = "health",
    ) -> str:
        return self.minter.health(
            self.keys[key], PEOPLE[who].health_subject, colour, self.now - age_s, valid_for, printed
        )

    def community(
        self,
        who: str = "alice",
        *,
        age_s: int = 30,
        valid_for: int = DAY,
        printed: bool = False,
        key: str = "community",
        compound: str = SITE,
    ) -> str:
        person = PEOPLE[who]
        return self.minter.community(
            self.keys[key],
            person.subject,
            person.role.value,
            compound,
            person.building,
            person.unit,
            self.now - age_s,
            valid_for,
            printed,
        )

    def printed(
        self, who: str = "alice", *, age_s: int = 30 * DAY, valid_for: int = 180 * DAY
    ) -> list[str]:
        return [
            self.health(who, age_s=age_s, valid_for=valid_for, printed=True),
            self.community(who, age_s=age_s, valid_for=valid_for, printed=True),
        ]

    def pair(self, who: str = "alice", colour: str = "green") -> list[str]:
        return [self.health(who, colour), self.community(who)]

    def base_records(self) -> list[dict[str, Any]]:
        """Issuers, the roster with bindings, and green statuses as of an hour ago."""
        health_key = read_key(self.keys["health"])
        community_key = read_key(self.keys["community"])
        year = 365 * DAY
        records = [
            issuer_record(health_key, ["health"], self.now - year, self.now + year),
            issuer_record(community_key, ["community"], self.now - year, self.now + year),
        ]
        for name, person in PEOPLE.items():
            if name == "stranger":
                continue
            valid_until = self.now - DAY if name == "moved_out" else self.now + year
            records.append(
                {
                    "dataset": "residents",
                    "subject": person.subject.hex(),
                    "compound": SITE,
                    "building": person.building,
                    "unit": person.unit,
                    "role": person.role.value,
                    "valid_from": self.now - year,
                    "valid_until": valid_until,
                    "display_name": person.display_name,
                }
            )
            records.append(
                {
                    "dataset": "bindings",
                    "health_subject": person.health_subject.hex(),
                    "resident_subject": person.subject.hex(),
                }
            )
        for person in PEOPLE.values():
            records.append(status_record(person.health_subject, "green", self.now - 3600))
        return records


def status_record(health_subject: bytes, colour: str, as_of: int) -> dict[str, Any]:
    return {
        "dataset": "health_status",
        "subject": health_subject.hex(),
        "colour": colour,
        "as_of": as_of,
    }


def token_record(token: str, who: str, colour: str, as_of: int) -> dict[str, Any]:
    return {
        "dataset": "platform_tokens",
        "token_hash": hashlib.sha256(token.encode("ascii")).hexdigest(),
        "subject": PEOPLE[who].health_subject.hex(),
        "colour": colour,
        "as_of": as_of,
    }


def code_id_hex(text: str) -> str:
    parsed = parse_payload(text.encode("ascii"))
    if isinstance(parsed, Rejection):
        raise ValueError(f"not a valid code: {parsed.reason}")
    return parsed.code_id.hex()


def revocation(text: str, revoked_at: int) -> dict[str, Any]:
    return {"dataset": "revocations", "code_id": code_id_hex(text), "revoked_at": revoked_at}


def _patch_body(text: str, offset: int, value: bytes) -> str:
    """Overwrite bytes of a code's body without re-signing it."""
    body = bytearray(base45.b45decode(text[len(PREFIX) :]))
    body[offset : offset + len(value)] = value
    return PREFIX + base45.b45encode(bytes(body)).decode("ascii")


HEALTH_COLOUR_OFFSET = 39
KEY_ID_OFFSET = 3


@dataclass
class Scenario:
    """One row's situation: the scans, the cache contents and the clock reading."""

    # Each scan is the list of payloads read together (one frame, one photo).
    scans: list[list[str]]
    extra_records: list[dict[str, Any]] = field(default_factory=list)
    snapshot_age_s: int = 600
    snapshot_valid_for: int = 7 * DAY
    import_cache: bool = True
    # Decision clock relative to the site's reference time, and whether it is synchronised.
    clock_offset_s: int = 0
    clock_synchronised: bool = True
    # Seconds between scans, longer than the debounce window so a repeat counts again.
    scan_gap_s: int = 60


_PRIMARY_KEYS = {
    "issuers": "key_id",
    "health_status": "subject",
    "residents": "subject",
    "bindings": "health_subject",
    "revocations": "code_id",
    "platform_tokens": "token_hash",
}


def merge_records(base: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of ``extra`` replace base records with the same dataset and key."""
    merged = {(r["dataset"], r[_PRIMARY_KEYS[r["dataset"]]]): r for r in base}
    for record in extra:
        merged[(record["dataset"], record[_PRIMARY_KEYS[record["dataset"]]])] = record
    return list(merged.values())


def _token(site: Site, colour: str | None) -> Scenario:
    token = hashlib.sha256(f"token-{colour}-{site.now}".encode()).hexdigest()[:32]
    extra = [] if colour is None else [token_record(token, "alice", colour, site.now - 60)]
    return Scenario([[TOKEN_URL.format(token=token), site.community()]], extra)


def _revoked_community(site: Site) -> Scenario:
    codes = site.printed()
    return Scenario([codes], [revocation(codes[1], site.now - 60)])


def _revoked_health(site: Site) -> Scenario:
    codes = site.pair()
    return Scenario([codes], [revocation(codes[0], site.now - 60)])


def _bad_signature_community(site: Site) -> Scenario:
    real_key_id = key_id_for(bytes(read_key(site.keys["community"]).verify_key))
    forged = _patch_body(site.community(key="rogue"), KEY_ID_OFFSET, real_key_id)
    return Scenario([[site.health(), forged]])


def _bad_signature_health(site: Site) -> Scenario:
    forged = _patch_body(site.health(colour="red"), HEALTH_COLOUR_OFFSET, bytes([1]))
    return Scenario([[forged, site.community()]])


def _milliseconds(site: Site) -> Scenario:
    # The encoders reject such times, so this code is built by hand, as a faulty issuer would.
    header = struct.pack(
        ">BBB4sQQ16s",
        1,
        1,
        0,
        key_id_for(bytes(read_key(site.keys["health"]).verify_key)),
        site.now * 1000,
        (site.now + DAY) * 1000,
        PEOPLE["alice"].health_subject,
    )
    return Scenario([[sign_body(header + bytes([1]), read_key(site.keys["health"]))]])


def _clock_before_build(site: Site) -> Scenario:
    # Printed codes issued well before the build date, so only the clock is wrong.
    age_s = site.now - (BUILD_TIMESTAMP - 10 * DAY)
    codes = site.printed(age_s=age_s, valid_for=3 * 365 * DAY)
    return Scenario([codes], clock_offset_s=BUILD_TIMESTAMP - DAY - site.now)


def _replay(site: Site, codes: list[str]) -> Scenario:
    return Scenario([codes, codes])


ROWS: dict[str, Callable[[Site], Scenario]] = {
    "green_resident": lambda s: Scenario([s.pair()]),
    "printed_codes": lambda s: Scenario([s.printed()]),
    "staff": lambda s: Scenario([s.pair("staff")]),
    "platform_token_green": lambda s: _token(s, "green"),
    "bad_signature_health": _bad_signature_health,
    "bad_signature_community": _bad_signature_community,
    "unknown_issuer": lambda s: Scenario([[s.health(key="rogue"), s.community()]]),
    "issuer_wrong_type": lambda s: Scenario([[s.health(), s.community(key="health")]]),
    "health_expired": lambda s: Scenario(
        [[s.health(age_s=2 * 3600, valid_for=3600), s.community()]]
    ),
    "community_expired": lambda s: Scenario(
        [[s.health(), s.community(age_s=30 * DAY, valid_for=29 * DAY, printed=True)]]
    ),
    "not_yet_valid": lambda s: Scenario([[s.health(age_s=-3600), s.community()]]),
    "revoked_community": _revoked_community,
    "revoked_health": _revoked_health,
    "yellow": lambda s: Scenario([s.pair(colour="yellow")]),
    "red": lambda s: Scenario([s.pair(colour="red")]),
    "cache_newer_red": lambda s: Scenario(
        [s.pair()], [status_record(PEOPLE["alice"].health_subject, "red", s.now - 10)]
    ),
    "cache_newer_green": lambda s: Scenario(
        [s.pair(colour="yellow")],
        [status_record(PEOPLE["alice"].health_subject, "green", s.now - 10)],
    ),
    "cache_older_status": lambda s: Scenario([s.pair(colour="red")]),
    "platform_token_unknown": lambda s: _token(s, None),
    "platform_token_red": lambda s: _token(s, "red"),
    "subject_mismatch": lambda s: Scenario([[s.health("alice"), s.community("bob")]]),
    "not_resident": lambda s: Scenario([s.pair("stranger")]),
    "wrong_compound": lambda s: Scenario([[s.health(), s.community(compound=OTHER_SITE)]]),
    "residency_not_valid": lambda s: Scenario([s.pair("moved_out")]),
    "visitor": lambda s: Scenario([s.pair("visitor")]),
    "delivery": lambda s: Scenario([s.pair("delivery")]),
    "cache_stale": lambda s: Scenario([s.pair()], snapshot_age_s=2 * DAY),
    "cache_expired": lambda s: Scenario([s.pair()], snapshot_age_s=3600, snapshot_valid_for=1800),
    "cache_stale_red": lambda s: Scenario([s.pair(colour="red")], snapshot_age_s=2 * DAY),
    "cache_empty": lambda s: Scenario([s.pair()], import_cache=False),
    "screenshot": lambda s: Scenario([[s.health(age_s=900), s.community()]]),
    "replay_dynamic": lambda s: _replay(s, s.pair()),
    "replay_printed": lambda s: _replay(s, s.printed()),
    "clock_before_build": _clock_before_build,
    "clock_before_sync": lambda s: Scenario([s.printed()], clock_offset_s=-3600),
    "clock_unsynchronised": lambda s: Scenario([s.pair()], clock_synchronised=False),
    "lone_health": lambda s: Scenario([[s.health()]]),
    "lone_community": lambda s: Scenario([[s.community()]]),
    "two_health_codes": lambda s: Scenario([[s.health("alice"), s.health("bob"), s.community()]]),
    "not_a_gate_code": lambda s: Scenario([["https://example.com/menu?table=12"]]),
    "truncated": lambda s: Scenario([[s.health()[:-6]]]),
    "milliseconds": _milliseconds,
}


def site_config(site: Site, **sections: Any) -> Config:
    """A device config for the site, with state in its folder and the city token pattern."""
    key_b64 = base64.b64encode(site.district_public_key()).decode()
    return parse_config(
        {
            "device": {
                "id": "gate-test",
                "site": SITE,
                "station": "north",
                "state_dir": str(site.folder / "state"),
            },
            "trust": {"district_keys": [key_b64]},
            "policy": {"token_patterns": [{"name": "city", "regex": TOKEN_PATTERN}]},
            **sections,
        }
    )


def build_cache(site: Site, scenario: Scenario, config: Config) -> None:
    """Write the scenario's signed snapshot and import it, unless the cache stays empty."""
    snapshot = site.folder / "snapshot.ensnap"
    issued_at = site.now - scenario.snapshot_age_s
    write_snapshot(
        snapshot,
        merge_records(site.base_records(), scenario.extra_records),
        site=SITE,
        version=1,
        issued_at=issued_at,
        valid_until=issued_at + scenario.snapshot_valid_for,
        signing_key=read_key(site.keys["district"]),
    )
    if scenario.import_cache:
        import_snapshot(
            config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE, now=site.now
        )


@dataclass(frozen=True)
class TableRow:
    row: str
    verdict: str
    reasons: tuple[str, ...]


def read_policy_table(path: Path = POLICY_DOC) -> list[TableRow]:
    """Parse the table of situations in docs/policy.md."""
    rows = []
    pattern = re.compile(r"^\| `(?P<row>\w+)` \|[^|]+\| (?P<verdict>\w+) \| (?P<reasons>[^|]+) \|$")
    for line in path.read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        reasons = tuple(re.findall(r"`(\w+)`", match["reasons"]))
        rows.append(TableRow(match["row"], match["verdict"], reasons))
    return rows
