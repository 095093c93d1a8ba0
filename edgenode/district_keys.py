"""The district's key folder: fingerprints, permission checks and the issuer keyring.

The folder contains ``district.key`` and the issuer keys (edgenode/district.py). Until the first
rotation each role has one key file, ``issuer-health.key`` or ``issuer-community.key``, valid
without a time limit. ``rotate_issuer_key`` starts ``issuers.json``, the keyring, which lists
every issuer key of the folder with its role, file and validity window in Unix seconds.
Publishing reads the keyring (``active_issuer_keys``) and leaves out keys whose
``valid_until`` has passed, so a retired key drops out of the gates' trust list at the first
publish after its overlap ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.codes import key_id_for
from edgenode.district import KEY_FILES, read_key, write_key

KEYRING_FILE = "issuers.json"
ISSUER_ROLES = ("health", "community")
# The valid_until of a key that has no end yet: the largest value of the cache's column.
NO_END = 2**32 - 1
# Fingerprints are the first 16 bytes of the SHA-256 of the public key, as 32 hex digits.
FINGERPRINT_BYTES = 16


class KeyringError(Exception):
    """The keyring cannot be read or changed. The message names the file and the fix."""


def fingerprint(public_key: bytes) -> str:
    """Return a public key's fingerprint in groups of four hex digits, for people to compare."""
    digits = hashlib.sha256(public_key).digest()[:FINGERPRINT_BYTES].hex()
    return "-".join(digits[index : index + 4] for index in range(0, len(digits), 4))


def normalise_fingerprint(text: str) -> str:
    """Strip separators and case from a typed fingerprint, so ``3F2A 91bc`` equals ``3f2a-91bc``."""
    return "".join(char for char in text.lower() if char in "0123456789abcdef")


def owner_only(path: Path) -> bool:
    """Return whether only the file's owner may read or write it (no group or other bits)."""
    return not stat.S_IMODE(path.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO)


@dataclass(frozen=True, slots=True)
class KeyringEntry:
    """One issuer key of the keyring. ``file`` is relative to the key folder."""

    role: str
    file: str
    key_id: str
    public_key: str
    valid_from: int
    valid_until: int

    def active_at(self, now: int) -> bool:
        """Return whether the key is still published at ``now``: its validity has not ended."""
        return now <= self.valid_until


@dataclass(frozen=True, slots=True)
class ActiveIssuerKey:
    """An issuer key to publish, read from its file and checked against the keyring."""

    key: SigningKey
    role: str
    valid_from: int
    valid_until: int


def _entry_for(
    folder: Path, file: str, role: str, valid_from: int, valid_until: int
) -> KeyringEntry:
    public = bytes(read_key(folder / file).verify_key)
    return KeyringEntry(
        role=role,
        file=file,
        key_id=key_id_for(public).hex(),
        public_key=public.hex(),
        valid_from=valid_from,
        valid_until=valid_until,
    )


def load_keyring(folder: Path) -> list[KeyringEntry]:
    """Read the keyring, or build one from the unrotated key files if it does not exist yet.

    Raises KeyringError for an invalid keyring and KeyFileError for a missing key file.
    """
    path = folder / KEYRING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [_entry_for(folder, KEY_FILES[role], role, 0, NO_END) for role in ISSUER_ROLES]
    except (OSError, ValueError) as exc:
        raise KeyringError(f"{path}: cannot read the keyring: {exc}") from exc
    try:
        return [KeyringEntry(**entry) for entry in data["keys"]]
    except (KeyError, TypeError) as exc:
        raise KeyringError(f"{path}: invalid keyring: {exc}") from exc


def save_keyring(folder: Path, entries: list[KeyringEntry]) -> None:
    """Replace the keyring atomically, so a crash leaves the old or the new file."""
    data = {"version": 1, "keys": [asdict(entry) for entry in entries]}
    handle, tmp = tempfile.mkstemp(prefix=".issuers-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / KEYRING_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def active_issuer_keys(folder: Path, now: int) -> list[ActiveIssuerKey]:
    """Read the issuer keys to publish at ``now``: every key whose validity has not ended.

    Raises KeyringError when a key file no longer matches its keyring entry.
    """
    active = []
    for entry in load_keyring(folder):
        if not entry.active_at(now):
            continue
        key = read_key(folder / entry.file)
        if bytes(key.verify_key).hex() != entry.public_key:
            raise KeyringError(
                f"{folder / entry.file} does not hold the key {entry.key_id} that "
                f"{folder / KEYRING_FILE} lists for it: restore the file from the backup"
            )
        active.append(ActiveIssuerKey(key, entry.role, entry.valid_from, entry.valid_until))
    return active


@dataclass(frozen=True, slots=True)
class Rotation:
    """The outcome of a rotation: the retired entry, now with its end, and the new one."""

    old: KeyringEntry
    new: KeyringEntry


def rotate_issuer_key(folder: Path, role: str, *, overlap_s: int, now: int) -> Rotation:
    """Create the role's next issuer key and end the current one ``overlap_s`` after ``now``.

    The new key is valid from ``now``, so both keys are published and trusted during the
    overlap. Raises KeyringError when the role's previous rotation is still in its overlap,
    because a third key would leave codes of two retiring keys in circulation.
    """
    if role not in ISSUER_ROLES:
        raise KeyringError(f"unknown issuer role {role!r}; known: {', '.join(ISSUER_ROLES)}")
    if overlap_s < 0:
        raise KeyringError(f"the overlap must not be negative, got {overlap_s} s")
    entries = load_keyring(folder)
    current = [entry for entry in entries if entry.role == role and entry.valid_until >= now]
    if len(current) != 1:
        ends = ", ".join(
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.valid_until))
            for entry in current
            if entry.valid_until < NO_END
        )
        raise KeyringError(
            f"the {role} issuer has {len(current)} keys in use (overlap ends at {ends or '-'}): "
            "rotate again after the overlap ends"
        )
    key = SigningKey.generate()
    public = bytes(key.verify_key)
    file = f"issuer-{role}-{key_id_for(public).hex()}.key"
    try:
        write_key(folder / file, key)
    except FileExistsError as exc:
        raise KeyringError(f"{folder / file} already exists; keys are never overwritten") from exc
    old = replace(current[0], valid_until=now + overlap_s)
    new = KeyringEntry(
        role=role,
        file=file,
        key_id=key_id_for(public).hex(),
        public_key=public.hex(),
        valid_from=now,
        valid_until=NO_END,
    )
    # The key file is written first: a crash before the keyring write leaves an unused file
    # and the old keyring, and the next rotation starts again.
    save_keyring(folder, [old if entry == current[0] else entry for entry in entries] + [new])
    return Rotation(old, new)


def describe_keys(folder: Path, now: int) -> list[dict[str, Any]]:
    """List the folder's district key and issuer keys with fingerprints, states and modes.

    Raises KeyFileError for a missing or invalid key file and KeyringError for the keyring.
    """
    rows: list[dict[str, Any]] = []
    district_path = folder / KEY_FILES["district"]
    district = bytes(read_key(district_path).verify_key)
    rows.append(_row("district", district_path, district, None, None, "in use"))
    for entry in load_keyring(folder):
        path = folder / entry.file
        public = bytes.fromhex(entry.public_key)
        if now > entry.valid_until:
            state = "retired"
        elif entry.valid_until < NO_END:
            state = "retiring"
        else:
            state = "in use"
        rows.append(_row(entry.role, path, public, entry.valid_from, entry.valid_until, state))
    return rows


def _row(
    role: str,
    path: Path,
    public: bytes,
    valid_from: int | None,
    valid_until: int | None,
    state: str,
) -> dict[str, Any]:
    try:
        mode_ok: bool | None = owner_only(path)
    except FileNotFoundError:
        mode_ok = None
    return {
        "role": role,
        "file": str(path),
        "key_id": key_id_for(public).hex(),
        "fingerprint": fingerprint(public),
        "valid_from": valid_from,
        "valid_until": valid_until,
        "state": state,
        "owner_only": mode_ok,
    }
