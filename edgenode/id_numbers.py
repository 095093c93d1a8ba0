"""PRC resident ID numbers (居民身份证号码) as keyed hashes, for guards checking residents by ID.

The district and the gates share a secret "ID lookup key" (32 random bytes, one base64 line in
a file readable by its owner only). The district hashes each roster row's ID number with it,
and only the hash travels in snapshots and deltas. A gate hashes the number that the guard
types with the same key and looks the hash up in its cache. Without the key, a copied cache or
snapshot does not reveal ID numbers, because a plain hash of the small set of valid numbers
could be reversed by trying them all.

The number itself is never stored or logged: functions here raise errors whose messages name
the problem, never the digits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from stdnum.cn import ric
from stdnum.exceptions import InvalidComponent

ID_LOOKUP_KEY_BYTES = 32
ID_HASH_BYTES = 32
ID_NUMBER_LENGTH = 18


class IdNumberError(ValueError):
    """A malformed ID number. ``reason`` is ``id_number_malformed`` or
    ``id_number_bad_check_digit``. The message never contains the number."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class IdLookupKeyError(ValueError):
    """An ID lookup key file that is missing, unreadable or not 32 base64-encoded bytes.

    A ValueError, so that ``edgenode run`` reports it as a start-up failure.
    """

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def normalise_id_number(text: str) -> str:
    """Return the 18-character form of an ID number, with a trailing x as X.

    Spaces and hyphens are removed. Raises IdNumberError for a wrong length, a non-digit among
    the first 17 characters, an impossible birth date, or a wrong check digit (ISO 7064
    MOD 11-2, computed by python-stdnum's ``stdnum.cn.ric``). The region code is not checked
    against a list, because such lists change and a valid resident must not be turned away.
    """
    number = re.sub(r"[\s-]", "", text).upper()
    if len(number) != ID_NUMBER_LENGTH:
        raise IdNumberError(
            "id_number_malformed",
            f"an ID number has {ID_NUMBER_LENGTH} characters, this one has {len(number)}",
        )
    if not number[:-1].isascii() or not number[:-1].isdigit():
        raise IdNumberError(
            "id_number_malformed", "the first 17 characters of an ID number must be digits"
        )
    if not (number[-1].isascii() and number[-1].isdigit()) and number[-1] != "X":
        raise IdNumberError(
            "id_number_malformed", "the last character of an ID number must be a digit or X"
        )
    try:
        ric.get_birth_date(number)
    except InvalidComponent:
        raise IdNumberError(
            "id_number_malformed", "the birth date in the ID number is not a valid date"
        ) from None
    if number[-1] != ric.calc_check_digit(number):
        raise IdNumberError(
            "id_number_bad_check_digit",
            "the ID number's check digit does not match: check the number for a typing error",
        )
    return number


def id_number_hash(key: bytes, id_number: str) -> bytes:
    """Return the HMAC-SHA256 of a normalised ID number under the district's ID lookup key."""
    if len(key) != ID_LOOKUP_KEY_BYTES:
        raise ValueError(f"an ID lookup key has {ID_LOOKUP_KEY_BYTES} bytes, not {len(key)}")
    return hmac.new(key, normalise_id_number(id_number).encode("ascii"), hashlib.sha256).digest()


def new_id_lookup_key() -> bytes:
    return secrets.token_bytes(ID_LOOKUP_KEY_BYTES)


def write_id_lookup_key(path: Path, key: bytes) -> None:
    """Write a key file with owner-only permissions. Raises FileExistsError over an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(key).decode("ascii") + "\n")


def read_id_lookup_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise IdLookupKeyError(path, "ID lookup key file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IdLookupKeyError(path, f"cannot read the ID lookup key file: {exc}") from exc
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise IdLookupKeyError(path, "the ID lookup key file is not base64") from exc
    if len(key) != ID_LOOKUP_KEY_BYTES:
        raise IdLookupKeyError(
            path, f"an ID lookup key has {ID_LOOKUP_KEY_BYTES} bytes, this one has {len(key)}"
        )
    return key
