"""Signed cache snapshots: the file a district publishes and a gate imports.

A snapshot is a signed record file (edgenode/signed_file.py) holding every record of the
datasets it lists. docs/code-format.md describes every field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.signed_file import FileKind, SignedFileError, SignedFileReader, write_signed_file

MAGIC = b"EDGENODE-SNAPSHOT 1\n"
DATASETS = ("issuers", "health_status", "residents", "bindings", "revocations", "platform_tokens")
# Datasets a reader accepts. ``district_keys`` is listed in a file's header only after the
# district's first key rotation, so files from a district that never rotated stay readable by
# gates that predate it.
KNOWN_DATASETS = (*DATASETS, "district_keys")


class SnapshotError(SignedFileError):
    """A snapshot that cannot be imported. ``reason`` is a stable snake_case code."""


SNAPSHOT = FileKind(magic=MAGIC, format="edgenode-snapshot", label="snapshot", error=SnapshotError)


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    site: str
    version: int
    issued_at: int
    valid_until: int
    key_id: str
    body_sha256: str
    record_count: int
    datasets: tuple[str, ...]


def write_snapshot(
    path: Path,
    records: Iterable[Mapping[str, Any]],
    *,
    site: str,
    version: int,
    issued_at: int,
    valid_until: int,
    signing_key: SigningKey,
    datasets: Sequence[str] = DATASETS,
) -> SnapshotHeader:
    """Write a signed snapshot. Each record has a ``dataset`` key naming its table."""

    def check_record(record: Mapping[str, Any]) -> None:
        if record.get("dataset") not in datasets:
            raise ValueError(f"record for unknown dataset: {record.get('dataset')!r}")

    fields = {
        "site": site,
        "version": version,
        "issued_at": issued_at,
        "valid_until": valid_until,
        "datasets": list(datasets),
    }
    header = write_signed_file(path, SNAPSHOT, records, fields, signing_key, check_record)
    return _header_from(header)


def _header_from(header: Mapping[str, Any]) -> SnapshotHeader:
    return SnapshotHeader(
        site=str(header["site"]),
        version=int(header["version"]),
        issued_at=int(header["issued_at"]),
        valid_until=int(header["valid_until"]),
        key_id=str(header["key_id"]),
        body_sha256=str(header["body_sha256"]),
        record_count=int(header["record_count"]),
        datasets=tuple(str(name) for name in header["datasets"]),
    )


class SnapshotReader(SignedFileReader):
    """Verify a snapshot's signature and body hash, then stream its records."""

    kind = SNAPSHOT

    def __init__(self, path: Path, trusted_keys: Sequence[bytes]) -> None:
        super().__init__(path, trusted_keys)
        self.header = _header_from(self.raw_header)

    def check_header(self, raw: Mapping[str, Any]) -> None:
        header = _header_from(raw)
        unknown = set(header.datasets) - set(KNOWN_DATASETS)
        if unknown:
            raise ValueError(f"unknown datasets: {sorted(unknown)}")

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
