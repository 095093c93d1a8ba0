"""The district key's keyring: rotation with an overlap, announcement and the current signer.

Until the first rotation the hub signs with the config's ``district_key_file`` and announces
nothing. ``rotate_district_key`` starts ``district-keys.json`` next to that file, listing each
district key with three times in Unix seconds:

- ``valid_from``: the key is announced to the gates in the ``district_keys`` dataset from then.
- ``signs_from``: the hub signs with the key from then. A new key starts signing half-way
  through the overlap, with no operator step. Every gate that synced in the first half then
  has the key before the first message it signs. The old key is still announced, and so
  still trusted through the gates' caches, for the second half.
- ``valid_until``: the key is announced until then. The old key's is the end of the overlap.

``DistrictSigner`` returns the key to sign with at each call, so a running hub switches keys
at ``signs_from`` without a restart.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.codes import key_id_for
from edgenode.district import read_key, write_key
from edgenode.district_keys import NO_END, KeyringError, fingerprint, owner_only

DISTRICT_KEYRING_FILE = "district-keys.json"
# The key that signs messages: a fixed key, or a callable returning the current one.
DistrictKeySource = SigningKey | Callable[[], SigningKey]


@dataclass(frozen=True, slots=True)
class DistrictKeyEntry:
    """One district key of the keyring. ``file`` is relative to the key folder."""

    file: str
    key_id: str
    public_key: str
    valid_from: int
    signs_from: int
    valid_until: int

    def record(self) -> dict[str, Any]:
        """Return the key's record of the ``district_keys`` dataset."""
        return {
            "dataset": "district_keys",
            "key_id": self.key_id,
            "public_key": self.public_key,
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
        }


@dataclass(frozen=True, slots=True)
class DistrictRotation:
    """The outcome of a district-key rotation: the old entry, now with its end, and the new one."""

    old: DistrictKeyEntry
    new: DistrictKeyEntry


def current_key(source: DistrictKeySource) -> SigningKey:
    """Return the signing key of ``source`` at this moment."""
    return source if isinstance(source, SigningKey) else source()


def keyring_path(key_file: Path) -> Path:
    """Return the district keyring's path for the config's ``district_key_file``."""
    return key_file.parent / DISTRICT_KEYRING_FILE


def load_district_keyring(key_file: Path) -> list[DistrictKeyEntry]:
    """Read the district keyring, or describe ``key_file`` alone when there is none yet.

    Raises KeyringError for an invalid keyring and KeyFileError for a missing key file.
    """
    path = keyring_path(key_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        public = bytes(read_key(key_file).verify_key)
        return [_entry(key_file.name, public, valid_from=0, signs_from=0, valid_until=NO_END)]
    except (OSError, ValueError) as exc:
        raise KeyringError(f"{path}: cannot read the keyring: {exc}") from exc
    try:
        return [DistrictKeyEntry(**entry) for entry in data["keys"]]
    except (KeyError, TypeError) as exc:
        raise KeyringError(f"{path}: invalid keyring: {exc}") from exc


def _entry(
    file: str, public: bytes, *, valid_from: int, signs_from: int, valid_until: int
) -> DistrictKeyEntry:
    return DistrictKeyEntry(
        file=file,
        key_id=key_id_for(public).hex(),
        public_key=public.hex(),
        valid_from=valid_from,
        signs_from=signs_from,
        valid_until=valid_until,
    )


def _save(key_file: Path, entries: list[DistrictKeyEntry]) -> None:
    """Replace the keyring atomically, so a crash leaves the old or the new file."""
    folder = key_file.parent
    data = {"version": 1, "keys": [asdict(entry) for entry in entries]}
    handle, tmp = tempfile.mkstemp(prefix=".district-keys-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, keyring_path(key_file))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rotate_district_key(key_file: Path, *, overlap_s: int, now: int) -> DistrictRotation:
    """Create the next district key and end the current one ``overlap_s`` after ``now``.

    The new key is announced from ``now`` and signs from half-way through the overlap.
    Raises KeyringError for an overlap shorter than 2 s, and while the previous rotation's
    overlap has not ended, because gates would then have to follow two switches at once.
    """
    if overlap_s < 2:
        raise KeyringError(
            f"the overlap must be longer than the longest time a gate is offline, got {overlap_s} s"
        )
    entries = load_district_keyring(key_file)
    current = [entry for entry in entries if entry.valid_until >= now]
    if len(current) != 1:
        ends = ", ".join(
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.valid_until))
            for entry in current
            if entry.valid_until < NO_END
        )
        raise KeyringError(
            f"the district has {len(current)} keys in use (overlap ends at {ends or '-'}): "
            "rotate again after the overlap ends"
        )
    key = SigningKey.generate()
    public = bytes(key.verify_key)
    file = f"district-{key_id_for(public).hex()}.key"
    try:
        write_key(key_file.parent / file, key)
    except FileExistsError as exc:
        raise KeyringError(
            f"{key_file.parent / file} already exists; keys are never overwritten"
        ) from exc
    old = replace(current[0], valid_until=now + overlap_s)
    new = _entry(file, public, valid_from=now, signs_from=now + overlap_s // 2, valid_until=NO_END)
    # The key file is written first: a crash before the keyring write leaves an unused file
    # and the old keyring, and the next rotation starts again.
    _save(key_file, [old if entry == current[0] else entry for entry in entries] + [new])
    return DistrictRotation(old, new)


def announced_district_keys(key_file: Path, now: int) -> list[DistrictKeyEntry]:
    """Return the district keys to announce at ``now``: none before the first rotation.

    Raises KeyringError for an invalid keyring.
    """
    if not keyring_path(key_file).exists():
        return []
    return [entry for entry in load_district_keyring(key_file) if now <= entry.valid_until]


def signing_entry(entries: list[DistrictKeyEntry], now: int) -> DistrictKeyEntry:
    """Return the entry that signs at ``now``: the latest whose ``signs_from`` has come."""
    started = [entry for entry in entries if entry.signs_from <= now]
    if not started:
        raise KeyringError("no district key signs yet: every keyring entry starts in the future")
    return max(started, key=lambda entry: entry.signs_from)


class DistrictSigner:
    """The district key that signs at each call, following the keyring's switch.

    The keyring is read again when its file changes, and each key file is read once.
    """

    def __init__(self, key_file: Path, clock: Callable[[], float] = time.time) -> None:
        self.key_file = key_file
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._entries: list[DistrictKeyEntry] = []
        self._keys: dict[str, SigningKey] = {}
        # Read now, so a missing or invalid key stops the hub at start.
        self()

    def _keyring(self) -> list[DistrictKeyEntry]:
        try:
            stat = os.stat(keyring_path(self.key_file))
            stamp = (stat.st_ino, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp or not self._entries:
            self._entries = load_district_keyring(self.key_file)
            self._stamp = stamp
        return self._entries

    def __call__(self) -> SigningKey:
        """Return the key to sign with now. Raises KeyringError or KeyFileError."""
        entry = signing_entry(self._keyring(), int(self.clock()))
        key = self._keys.get(entry.file)
        if key is None:
            path = self.key_file.parent / entry.file
            key = read_key(path)
            if bytes(key.verify_key).hex() != entry.public_key:
                raise KeyringError(
                    f"{path} does not hold the key {entry.key_id} that "
                    f"{keyring_path(self.key_file)} lists for it: restore the file from the backup"
                )
            self._keys[entry.file] = key
        return key


def describe_district_keys(key_file: Path, now: int) -> list[dict[str, Any]]:
    """List the district keys with fingerprints, states and file modes, as ``describe_keys``.

    The state is "announced" before a new key signs, "in use" while it signs, "retiring"
    while a replaced key is still announced, and "retired" after that.
    Raises KeyFileError for a missing key file and KeyringError for the keyring.
    """
    entries = load_district_keyring(key_file)
    signing = signing_entry(entries, now)
    rows: list[dict[str, Any]] = []
    for entry in entries:
        path = key_file.parent / entry.file
        public = bytes.fromhex(entry.public_key)
        if now > entry.valid_until:
            state = "retired"
        elif entry == signing:
            state = "in use"
        elif now < entry.signs_from:
            state = "announced"
        else:
            state = "retiring"
        try:
            mode_ok: bool | None = owner_only(path)
        except FileNotFoundError:
            mode_ok = None
        rows.append(
            {
                "role": "district",
                "file": str(path),
                "key_id": entry.key_id,
                # Base64, as a gate's trust.district_keys lists it.
                "public_key": base64.b64encode(public).decode("ascii"),
                "fingerprint": fingerprint(public),
                "valid_from": entry.valid_from or None,
                "valid_until": entry.valid_until,
                "signs_from": entry.signs_from or None,
                "state": state,
                "owner_only": mode_ok,
            }
        )
    return rows
