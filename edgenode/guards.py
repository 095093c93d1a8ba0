"""The gate's guards and their PIN hashes, in one JSON file under the state directory.

PINs are stored as argon2id hashes (libsodium through PyNaCl's ``nacl.pwhash.argon2id``,
with its interactive limits: 2 passes over 64 MiB). One check took 0.09 s on the x86-64
development machine, and an ARM gate board is estimated to take several times that.

The file is written to a temporary file with owner-only permissions and renamed over the old
one, so a crash leaves the old list or the new one.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import InvalidkeyError
from nacl.pwhash import argon2id

GUARD_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
PIN_MIN_DIGITS = 6
PIN_MAX_DIGITS = 12
_FILE_VERSION = 1


class GuardStoreError(Exception):
    """A guard list change that cannot be made. ``reason`` is a stable snake_case code:
    ``invalid_guard_id``, ``pin_invalid``, ``pin_mismatch``, ``guard_exists``,
    ``unknown_guard`` or ``guards_file_invalid``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Guard:
    guard_id: str
    # Wall-clock time of ``edgenode guard add``, in seconds since the epoch.
    added_at: float


def check_guard_id(guard_id: str) -> str:
    if not GUARD_ID_PATTERN.match(guard_id):
        raise GuardStoreError(
            "invalid_guard_id",
            f"guard id {guard_id!r} is invalid: use 1 to 32 of A-Z a-z 0-9 _ -",
        )
    return guard_id


def check_pin(pin: str) -> str:
    """Return the PIN if it has 6 to 12 ASCII digits. The message never repeats the PIN."""
    if not (pin.isascii() and pin.isdigit() and PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS):
        raise GuardStoreError(
            "pin_invalid", f"a PIN has {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits and nothing else"
        )
    return pin


class GuardStore:
    """The guards file. Reads it on each call, so ``edgenode guard add`` takes effect at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def guards(self) -> list[Guard]:
        return [
            Guard(guard_id, float(entry["added_at"]))
            for guard_id, entry in sorted(self._read().items())
        ]

    def add(self, guard_id: str, pin: str, *, now: float | None = None) -> Guard:
        check_guard_id(guard_id)
        check_pin(pin)
        entries = self._read()
        if guard_id in entries:
            raise GuardStoreError(
                "guard_exists", f"guard {guard_id} exists: remove it first to set a new PIN"
            )
        added_at = time.time() if now is None else now
        pin_hash = argon2id.str(pin.encode("ascii")).decode("ascii")
        entries[guard_id] = {"pin_hash": pin_hash, "added_at": added_at}
        self._write(entries)
        return Guard(guard_id, added_at)

    def remove(self, guard_id: str) -> None:
        entries = self._read()
        if guard_id not in entries:
            raise GuardStoreError("unknown_guard", f"guard {guard_id!r} not found")
        del entries[guard_id]
        self._write(entries)

    def exists(self, guard_id: str) -> bool:
        return guard_id in self._read()

    def verify_pin(self, guard_id: str, pin: str) -> bool:
        """Return whether the PIN matches the guard's stored hash, with one argon2id check.

        Raises GuardStoreError with reason ``unknown_guard`` for a guard id not in the file.
        """
        entry = self._read().get(guard_id)
        if entry is None:
            raise GuardStoreError("unknown_guard", f"guard {guard_id!r} not found")
        try:
            return bool(argon2id.verify(str(entry["pin_hash"]).encode("ascii"), pin.encode()))
        except InvalidkeyError:
            return False

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GuardStoreError(
                "guards_file_invalid", f"cannot read the guards file {self.path}: {exc}"
            ) from exc
        guards = data.get("guards") if isinstance(data, dict) else None
        if not isinstance(guards, dict):
            raise GuardStoreError(
                "guards_file_invalid", f"the guards file {self.path} has no 'guards' object"
            )
        return guards

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = self.path.with_name(self.path.name + ".writing")
        tmp_path.unlink(missing_ok=True)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _give_to_folder_owner(fd, self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"version": _FILE_VERSION, "guards": entries}, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_path, self.path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


def _give_to_folder_owner(fd: int, folder: Path) -> None:
    """Make root's new file belong to the state folder's owner, so the daemon can read it.

    An installer runs ``edgenode guard add`` as root, while the daemon runs as the ``edgenode``
    user that owns the state folder (systemd's StateDirectory=).
    """
    if os.geteuid() != 0:
        return
    owner = os.stat(folder)
    if owner.st_uid != 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)
