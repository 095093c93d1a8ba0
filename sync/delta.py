"""Signed cache deltas: the changes that take a gate's cache from one version to the next.

A delta file has the layout of a snapshot (edgenode/snapshot.py): a magic line, one line of
header JSON signed by the district key, then a gzip-compressed JSON Lines body whose SHA-256
is in the header. The header names ``base_version``, the cache version the delta fits, and
``version``, the version it makes. Each record has ``op`` ("upsert" or "delete") and
``dataset``. An upsert carries the whole record as a snapshot does. A delete carries only the
dataset's key column (``KEY_COLUMNS`` in edgenode/cache.py), for example
``{"op": "delete", "dataset": "residents", "subject": "…32 hex…"}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.cache import KEY_COLUMNS, CacheImportError, DeltaTarget, apply_changes
from edgenode.signed_file import FileKind, SignedFileError, SignedFileReader, write_signed_file
from edgenode.snapshot import DATASETS, KNOWN_DATASETS

MAGIC = b"EDGENODE-DELTA 1\n"
OPS = ("upsert", "delete")


class DeltaError(SignedFileError):
    """A delta file that cannot be applied. ``reason`` is a stable snake_case code."""


DELTA = FileKind(magic=MAGIC, format="edgenode-delta", label="delta", error=DeltaError)


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    site: str
    base_version: int
    version: int
    issued_at: int
    valid_until: int
    key_id: str
    body_sha256: str
    record_count: int
    datasets: tuple[str, ...]

    def target(self) -> DeltaTarget:
        return DeltaTarget(
            site=self.site,
            base_version=self.base_version,
            version=self.version,
            issued_at=self.issued_at,
            valid_until=self.valid_until,
            datasets=self.datasets,
        )


def _header_from(header: Mapping[str, Any]) -> DeltaHeader:
    return DeltaHeader(
        site=str(header["site"]),
        base_version=int(header["base_version"]),
        version=int(header["version"]),
        issued_at=int(header["issued_at"]),
        valid_until=int(header["valid_until"]),
        key_id=str(header["key_id"]),
        body_sha256=str(header["body_sha256"]),
        record_count=int(header["record_count"]),
        datasets=tuple(str(name) for name in header["datasets"]),
    )


def write_delta(
    path: Path,
    records: Iterable[Mapping[str, Any]],
    *,
    site: str,
    base_version: int,
    version: int,
    issued_at: int,
    valid_until: int,
    signing_key: SigningKey,
    datasets: Sequence[str] = DATASETS,
) -> DeltaHeader:
    """Write a signed delta from ``base_version`` to ``version``.

    Raises ValueError for a record with an unknown op or dataset, a delete without its key
    column, or a version that does not follow the base.
    """
    if not 0 < base_version < version:
        raise ValueError(f"version {version} must follow base_version {base_version}")
    fields = {
        "site": site,
        "base_version": base_version,
        "version": version,
        "issued_at": issued_at,
        "valid_until": valid_until,
        "datasets": list(datasets),
    }

    def check_record(record: Mapping[str, Any]) -> None:
        _check_record_shape(record, datasets)

    header = write_signed_file(path, DELTA, records, fields, signing_key, check_record)
    return _header_from(header)


def _check_record_shape(record: Mapping[str, Any], datasets: Sequence[str]) -> None:
    dataset = record.get("dataset")
    if dataset not in datasets:
        raise ValueError(f"record for unknown dataset: {dataset!r}")
    op = record.get("op")
    if op not in OPS:
        raise ValueError(f"record op must be one of {OPS}, not {op!r}")
    if op == "delete" and KEY_COLUMNS[str(dataset)] not in record:
        raise ValueError(f"delete in {dataset} lacks its key {KEY_COLUMNS[str(dataset)]!r}")


class DeltaReader(SignedFileReader):
    """Verify a delta's signature and body hash, then stream its records."""

    kind = DELTA

    def __init__(self, path: Path, trusted_keys: Sequence[bytes]) -> None:
        super().__init__(path, trusted_keys)
        self.header = _header_from(self.raw_header)

    def check_header(self, raw: Mapping[str, Any]) -> None:
        header = _header_from(raw)
        unknown = set(header.datasets) - set(KNOWN_DATASETS)
        if unknown:
            raise ValueError(f"unknown datasets: {sorted(unknown)}")
        if not 0 < header.base_version < header.version:
            raise ValueError(
                f"version {header.version} does not follow base_version {header.base_version}"
            )

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_delta_header(path: Path, trusted_keys: Sequence[bytes]) -> DeltaHeader:
    """Verify a delta file and return its header. Raises DeltaError."""
    with DeltaReader(path, trusted_keys) as reader:
        return reader.header


def apply_delta(
    cache_path: Path,
    delta_path: Path,
    trusted_keys: Sequence[bytes],
    *,
    site: str | None = None,
    now: float | None = None,
) -> DeltaHeader:
    """Verify a signed delta and apply it to the cache atomically.

    Raises CacheImportError for a bad or unknown signature, a body that does not match its
    hash, a delta for another site or a bad record. A delta whose base_version is not the
    cache's version is rejected with reason ``version_gap``. The old cache stays in use.
    """
    try:
        with DeltaReader(delta_path, trusted_keys) as reader:
            header = reader.header
            if site is not None and header.site != site:
                raise CacheImportError(
                    "wrong_site", f"delta is for site {header.site!r}, this device serves {site!r}"
                )
            apply_changes(cache_path, header.target(), reader.records(), now=now)
    except DeltaError as exc:
        raise CacheImportError(exc.reason, str(exc)) from exc
    return header
