"""The gate's device key: an Ed25519 key pair that signs everything the gate sends.

The seed is stored as one base64 line (the format of ``edgenode.district.write_key``) in a
file that only its owner may read, because anyone holding it can send verdicts as this gate.
"""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

from nacl.signing import SigningKey

from edgenode.district import KeyFileError, read_key, write_key


class DeviceKeyError(Exception):
    """The device key file is unsafe or unreadable. The message names the fix."""


def ensure_device_key(path: Path) -> SigningKey:
    """Load the device key, creating it with mode 0600 if the file does not exist.

    Raises DeviceKeyError if the existing file can be read by its group or by others.
    """
    if not path.exists():
        # Another process may create the file between the check and the write.
        with contextlib.suppress(FileExistsError):
            write_key(path, SigningKey.generate())
    return load_device_key(path)


def load_device_key(path: Path) -> SigningKey:
    """Load an existing device key, rejecting a file that others may read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise DeviceKeyError(
            f"device key {path} not found: create it with 'edgenode init --config FILE'"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DeviceKeyError(
            f"device key {path} has mode {stat.S_IMODE(mode):04o}, readable by others: "
            f"run 'chmod 600 {path}', and replace the key if others may have copied it"
        )
    try:
        return read_key(path)
    except KeyFileError as exc:
        raise DeviceKeyError(str(exc)) from exc
