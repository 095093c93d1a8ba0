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

import base64
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.cache import KEY_COLUMNS, CacheImportError, DeltaTarget, apply_changes
from edgenode.codes import key_id_for
from edgenode.snapshot import DATASETS

MAGIC = b"EDGENODE-DELTA 1\n"
FORMAT = "edgenode-delta"
MAX_HEADER_LEN = 64 * 1024
OPS = ("upsert", "delete")


class DeltaError(Exception):
    """A delta file that cannot be applied. ``reason`` is a stable snake_case code."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {message}")


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


def _canonical(header: Mapping[str, Any]) -> bytes:
    unsigned = {key: value for key, value in header.items() if key != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("utf-8")


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
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as body:
        for record in records:
            _check_record_shape(record, datasets)
            body.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
            body.write(b"\n")
            count += 1
    compressed = buffer.getvalue()
    header: dict[str, Any] = {
        "format": FORMAT,
        "site": site,
        "base_version": base_version,
        "version": version,
        "issued_at": issued_at,
        "valid_until": valid_until,
        "key_id": key_id_for(bytes(signing_key.verify_key)).hex(),
        "body_sha256": hashlib.sha256(compressed).hexdigest(),
        "record_count": count,
        "datasets": list(datasets),
    }
    signature = signing_key.sign(_canonical(header)).signature
    header["signature"] = base64.b64encode(signature).decode("ascii")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(MAGIC)
        out.write(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")
        out.write(compressed)
    os.replace(tmp, path)
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


class DeltaReader:
    """Verify a delta's header signature and body hash, then stream its records.

    Both checks run when the reader is created, so every record it yields is authenticated.
    """

    def __init__(self, path: Path, trusted_keys: Sequence[bytes]) -> None:
        self.path = path
        try:
            self._file: IO[bytes] = path.open("rb")
        except FileNotFoundError as exc:
            raise DeltaError(path, "file_not_found", "delta file not found") from exc
        except OSError as exc:
            raise DeltaError(path, "unreadable", f"cannot read delta: {exc}") from exc
        try:
            self.header = self._read_header(trusted_keys)
            self._body_offset = self._file.tell()
            self._check_body_hash()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, reason: str, message: str) -> DeltaError:
        return DeltaError(self.path, reason, message)

    def _read_header(self, trusted_keys: Sequence[bytes]) -> DeltaHeader:
        if self._file.read(len(MAGIC)) != MAGIC:
            raise self._fail("not_a_delta", "not an edgenode delta (bad magic line)")

        line = self._file.readline(MAX_HEADER_LEN)
        try:
            raw = json.loads(line)
            signature = base64.b64decode(raw["signature"], validate=True)
            header = _header_from(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise self._fail("bad_header", f"delta header is invalid: {exc}") from exc
        if raw.get("format") != FORMAT:
            raise self._fail("bad_header", "delta header has the wrong format name")
        unknown = set(header.datasets) - set(DATASETS)
        if unknown:
            raise self._fail("bad_header", f"unknown datasets: {sorted(unknown)}")

        if not 0 < header.base_version < header.version:
            raise self._fail(
                "bad_header",
                f"version {header.version} does not follow base_version {header.base_version}",
            )
        keys = {key_id_for(key).hex(): key for key in trusted_keys}
        key = keys.get(header.key_id)
        if key is None:
            raise self._fail(
                "unknown_signer",
                f"signed by key {header.key_id}, which is not a trusted district key",
            )
        try:
            VerifyKey(key).verify(_canonical(raw), signature)
        except (BadSignatureError, ValueError) as exc:
            raise self._fail("bad_signature", "delta signature does not verify") from exc
        return header

    def _check_body_hash(self) -> None:
        digest = hashlib.sha256()
        while chunk := self._file.read(1 << 16):
            digest.update(chunk)
        if digest.hexdigest() != self.header.body_sha256:
            raise self._fail("body_hash_mismatch", "delta body does not match its signed hash")

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield body records. Raises DeltaError for a corrupt body or a non-object record."""
        count = 0
        self._file.seek(self._body_offset)
        try:
            with gzip.GzipFile(fileobj=self._file, mode="rb") as body:
                for line in body:
                    try:
                        record = json.loads(line)
                    except ValueError as exc:
                        raise self._fail("bad_record", f"record {count + 1}: {exc}") from exc
                    if not isinstance(record, dict):
                        raise self._fail("bad_record", f"record {count + 1} is not an object")
                    count += 1
                    yield record
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise self._fail("bad_body", f"delta body is corrupt: {exc}") from exc
        if count != self.header.record_count:
            raise self._fail("bad_body", f"{count} records, header says {self.header.record_count}")

    def close(self) -> None:
        self._file.close()

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
