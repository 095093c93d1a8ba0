"""District-side tools: keys, minted codes, rosters and signed snapshots.

District staff use these through ``edgenode district issue``; the demo and the tests use them
to build complete sites. Keys are Ed25519 seeds stored as one base64 line in files readable by
the owner only.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.codes import Colour, Role, key_id_for
from edgenode.snapshot import DATASETS, SnapshotHeader, write_snapshot

KEY_FILES = {
    "district": "district.key",
    "health": "issuer-health.key",
    "community": "issuer-community.key",
}


class KeyFileError(Exception):
    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def write_key(path: Path, key: SigningKey) -> None:
    """Write a signing key with owner-only permissions, refusing to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(bytes(key)).decode("ascii") + "\n")


def read_key(path: Path) -> SigningKey:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise KeyFileError(path, "key file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(path, f"cannot read key file: {exc}") from exc
    try:
        seed = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise KeyFileError(path, "key file is not base64") from exc
    if len(seed) != 32:
        raise KeyFileError(path, f"an Ed25519 seed has 32 bytes, this one has {len(seed)}")
    return SigningKey(seed)


def public_key_b64(key: SigningKey) -> str:
    return base64.b64encode(bytes(key.verify_key)).decode("ascii")


def issuer_record(
    key: SigningKey, code_types: list[str], valid_from: int, valid_until: int
) -> dict[str, Any]:
    public = bytes(key.verify_key)
    return {
        "dataset": "issuers",
        "key_id": key_id_for(public).hex(),
        "public_key": public.hex(),
        "code_types": code_types,
        "valid_from": valid_from,
        "valid_until": valid_until,
    }


_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建国红梅兰"


def mask_name(name: str) -> str:
    """Mask a Chinese name for display: 张三丰 becomes 张*丰, 李四 becomes 李*."""
    if len(name) <= 1:
        return "*"
    if len(name) == 2:
        return name[0] + "*"
    return name[0] + "*" * (len(name) - 2) + name[-1]


@dataclass(frozen=True, slots=True)
class DemoResident:
    subject: bytes
    health_subject: bytes
    display_name: str
    building: str
    unit: str
    role: Role


def generate_roster(count: int, seed: int = 0) -> list[DemoResident]:
    """Make a roster of pseudonymous residents with masked names. Deterministic per seed."""
    rng = random.Random(seed)
    roles = [Role.RESIDENT] * 90 + [Role.VISITOR] * 4 + [Role.STAFF] * 3 + [Role.DELIVERY] * 3
    roster = []
    for _ in range(count):
        name = rng.choice(_SURNAMES) + "".join(rng.choices(_GIVEN, k=rng.choice((1, 2))))
        building = str(rng.randint(1, 30))
        unit = f"{rng.randint(1, 33)}{rng.randint(1, 4):02d}"
        roster.append(
            DemoResident(
                subject=rng.randbytes(16),
                health_subject=rng.randbytes(16),
                display_name=mask_name(name),
                building=building,
                unit=unit,
                role=rng.choice(roles),
            )
        )
    return roster


def roster_records(
    roster: list[DemoResident], compound: str, valid_from: int, valid_until: int, as_of: int
) -> Iterator[dict[str, Any]]:
    """Snapshot records for a roster: residents, their bindings and green statuses."""
    for person in roster:
        yield {
            "dataset": "residents",
            "subject": person.subject.hex(),
            "compound": compound,
            "building": person.building,
            "unit": person.unit,
            "role": person.role.value,
            "valid_from": valid_from,
            "valid_until": valid_until,
            "display_name": person.display_name,
        }
        yield {
            "dataset": "bindings",
            "health_subject": person.health_subject.hex(),
            "resident_subject": person.subject.hex(),
        }
        yield {
            "dataset": "health_status",
            "subject": person.health_subject.hex(),
            "colour": Colour.GREEN.name.lower(),
            "as_of": as_of,
        }


def load_records(path: Path) -> Iterator[dict[str, Any]]:
    """Read snapshot records from a JSON object of dataset name to a list of records."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read records: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected an object mapping dataset names to lists")
    for dataset, rows in data.items():
        if dataset not in DATASETS:
            raise ValueError(f"{path}: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        if not isinstance(rows, list):
            raise ValueError(f"{path}: {dataset} must be a list")
        for row in rows:
            yield {"dataset": dataset, **row}


def build_snapshot(
    path: Path,
    records: list[dict[str, Any]] | Iterator[dict[str, Any]],
    *,
    district_key: SigningKey,
    site: str,
    version: int,
    issued_at: int,
    valid_for_s: int,
) -> SnapshotHeader:
    return write_snapshot(
        path,
        records,
        site=site,
        version=version,
        issued_at=issued_at,
        valid_until=issued_at + valid_for_s,
        signing_key=district_key,
    )
