"""The signed record file that snapshots and deltas share.

Layout: a magic line naming the kind of file, one line of header JSON, then a gzip-compressed
JSON Lines body with one record per line. The header carries the SHA-256 of the compressed
body and an Ed25519 signature by the district key over the canonical header (sorted keys, no
spaces, without the ``signature`` field), so the body is authenticated through its hash.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.codes import key_id_for

MAX_HEADER_LEN = 64 * 1024


class SignedFileError(Exception):
    """A signed file that cannot be used. ``reason`` is a stable snake_case code."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class FileKind:
    """One kind of signed file: its magic line, format name and error type."""

    magic: bytes
    format: str
    # Word for messages, e.g. "snapshot".
    label: str
    error: type[SignedFileError]

    def fail(self, path: Path, reason: str, message: str) -> SignedFileError:
        return self.error(path, reason, message)


# Records joined into one write to the compressed body.
WRITE_GROUP_RECORDS = 1024


def canonical_header(header: Mapping[str, Any]) -> bytes:
    unsigned = {key: value for key, value in header.items() if key != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_signed_file(
    path: Path,
    kind: FileKind,
    records: Iterable[Mapping[str, Any]],
    header_fields: Mapping[str, Any],
    signing_key: SigningKey,
    check_record: Callable[[Mapping[str, Any]], None],
) -> dict[str, Any]:
    """Write a signed file and return its header. ``check_record`` raises ValueError."""
    buffer = io.BytesIO()
    count = 0
    # Lines are handed to gzip in groups, because one write per record costs more than the
    # compression itself for small records.
    lines: list[str] = []
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as body:
        for record in records:
            check_record(record)
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            count += 1
            if len(lines) == WRITE_GROUP_RECORDS:
                body.write(("\n".join(lines) + "\n").encode())
                lines.clear()
        if lines:
            body.write(("\n".join(lines) + "\n").encode())
    compressed = buffer.getvalue()
    header: dict[str, Any] = {
        "format": kind.format,
        **header_fields,
        "key_id": key_id_for(bytes(signing_key.verify_key)).hex(),
        "body_sha256": hashlib.sha256(compressed).hexdigest(),
        "record_count": count,
    }
    signature = signing_key.sign(canonical_header(header)).signature
    header["signature"] = base64.b64encode(signature).decode("ascii")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(kind.magic)
        out.write(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")
        out.write(compressed)
    os.replace(tmp, path)
    return header


class SignedFileReader:
    """Verify a file's header signature and body hash, then stream its records.

    Both checks run when the reader is created, so every record it yields is authenticated.
    ``raw_header`` is the verified header as a dict; subclasses turn it into a typed header.
    """

    kind: FileKind

    def __init__(self, path: Path, trusted_keys: Sequence[bytes]) -> None:
        self.path = path
        try:
            self._file: IO[bytes] = path.open("rb")
        except FileNotFoundError as exc:
            raise self._fail("file_not_found", f"{self.kind.label} file not found") from exc
        except OSError as exc:
            raise self._fail("unreadable", f"cannot read {self.kind.label}: {exc}") from exc
        try:
            self.raw_header = self._read_header(trusted_keys)
            self._body_offset = self._file.tell()
            self._check_body_hash()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, reason: str, message: str) -> SignedFileError:
        return self.kind.fail(self.path, reason, message)

    def _read_header(self, trusted_keys: Sequence[bytes]) -> dict[str, Any]:
        label = self.kind.label
        if self._file.read(len(self.kind.magic)) != self.kind.magic:
            raise self._fail(f"not_a_{label}", f"not an edgenode {label} (bad magic line)")
        line = self._file.readline(MAX_HEADER_LEN)
        try:
            raw = json.loads(line)
            signature = base64.b64decode(raw["signature"], validate=True)
            key_id = str(raw["key_id"])
            self.check_header(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise self._fail("bad_header", f"{label} header is invalid: {exc}") from exc
        if raw.get("format") != self.kind.format:
            raise self._fail("bad_header", f"{label} header has the wrong format name")
        keys = {key_id_for(key).hex(): key for key in trusted_keys}
        key = keys.get(key_id)
        if key is None:
            raise self._fail(
                "unknown_signer", f"signed by key {key_id}, which is not a trusted district key"
            )
        try:
            VerifyKey(key).verify(canonical_header(raw), signature)
        except (BadSignatureError, ValueError) as exc:
            raise self._fail("bad_signature", f"{label} signature does not verify") from exc
        return dict(raw)

    def check_header(self, raw: Mapping[str, Any]) -> None:
        """Check the kind's own header fields. Raises ValueError, KeyError or TypeError."""

    def _check_body_hash(self) -> None:
        digest = hashlib.sha256()
        while chunk := self._file.read(1 << 16):
            digest.update(chunk)
        if digest.hexdigest() != self.raw_header["body_sha256"]:
            message = f"{self.kind.label} body does not match its signed hash"
            raise self._fail("body_hash_mismatch", message)

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield body records. Raises the kind's error for a corrupt body or a bad record."""
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
            raise self._fail("bad_body", f"{self.kind.label} body is corrupt: {exc}") from exc
        expected = int(self.raw_header["record_count"])
        if count != expected:
            raise self._fail("bad_body", f"{count} records, header says {expected}")

    def close(self) -> None:
        self._file.close()
