"""Signed cache snapshots: the file a district publishes and a gate imports.

Layout: a magic line, one line of header JSON, then a gzip-compressed JSON Lines body with one
record per line. The header carries the SHA-256 of the compressed body and an Ed25519
signature by the district key over the canonical header, so the body is authenticated through
its hash. docs/code-format.md describes every field.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.codes import key_id_for

MAGIC = b"EDGENODE-SNAPSHOT 1\n"
MAX_HEADER_LEN = 64 * 1024
DATASETS = ("issuers", "health_status", "residents", "bindings", "revocations", "platform_tokens")


class SnapshotError(Exception):
    """A snapshot that cannot be imported. ``reason`` is a stable snake_case code."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {message}")


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


def _canonical(header: Mapping[str, Any]) -> bytes:
    unsigned = {key: value for key, value in header.items() if key != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("utf-8")


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
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as body:
        for record in records:
            if record.get("dataset") not in datasets:
                raise ValueError(f"record for unknown dataset: {record.get('dataset')!r}")
            body.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
            body.write(b"\n")
            count += 1
    compressed = buffer.getvalue()
    header: dict[str, Any] = {
        "format": "edgenode-snapshot",
        "site": site,
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
    tmp.replace(path)
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


class SnapshotReader:
    """Verify a snapshot's header signature and body hash, then stream its records.

    Both checks run when the reader is created, so every record it yields is authenticated.
    """

    def __init__(self, path: Path, trusted_keys: Sequence[bytes]) -> None:
        self.path = path
        self._file: IO[bytes] = self._open(path)
        try:
            self.header = self._read_header(trusted_keys)
            self._body_offset = self._file.tell()
            self._check_body_hash()
        except BaseException:
            self._file.close()
            raise

    @staticmethod
    def _open(path: Path) -> IO[bytes]:
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise SnapshotError(path, "file_not_found", "snapshot file not found") from exc
        except OSError as exc:
            raise SnapshotError(path, "unreadable", f"cannot read snapshot: {exc}") from exc

    def _fail(self, reason: str, message: str) -> SnapshotError:
        return SnapshotError(self.path, reason, message)

    def _read_header(self, trusted_keys: Sequence[bytes]) -> SnapshotHeader:
        if self._file.read(len(MAGIC)) != MAGIC:
            raise self._fail("not_a_snapshot", "not an edgenode snapshot (bad magic line)")
        line = self._file.readline(MAX_HEADER_LEN)
        try:
            raw = json.loads(line)
            signature = base64.b64decode(raw["signature"], validate=True)
            header = _header_from(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise self._fail("bad_header", f"snapshot header is invalid: {exc}") from exc
        if raw.get("format") != "edgenode-snapshot":
            raise self._fail("bad_header", "snapshot header has the wrong format name")
        unknown = set(header.datasets) - set(DATASETS)
        if unknown:
            raise self._fail("bad_header", f"unknown datasets: {sorted(unknown)}")
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
            raise self._fail("bad_signature", "snapshot signature does not verify") from exc
        return header

    def _check_body_hash(self) -> None:
        digest = hashlib.sha256()
        while chunk := self._file.read(1 << 16):
            digest.update(chunk)
        if digest.hexdigest() != self.header.body_sha256:
            raise self._fail("body_hash_mismatch", "snapshot body does not match its signed hash")

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield body records. Raises SnapshotError for a record that is not a JSON object."""
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
            raise self._fail("bad_body", f"snapshot body is corrupt: {exc}") from exc
        if count != self.header.record_count:
            raise self._fail("bad_body", f"{count} records, header says {self.header.record_count}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
