"""The district keys a gate trusts: its config's anchors plus the keys its cache announces.

The district announces its keys in the ``district_keys`` dataset, signed by a key the gate
already trusts (edgenode/district_keyring.py). A cached key is trusted only between its
``valid_from`` and ``valid_until``. Cached keys are added to the config's keys and never
replace them, so a gate whose cache is lost or replaced still trusts its anchors.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from edgenode.codes import key_id_for

log = structlog.get_logger("edgenode.district_trust")

# (public key, valid_from, valid_until) of one cached district key.
_CachedKey = tuple[bytes, int, int]


class DistrictTrust:
    """The district public keys to verify with at this moment.

    Reads the cache's ``district_keys`` table again whenever an import replaced the cache
    file, which edgenode/cache.py always does by a rename, so the inode changes.
    """

    def __init__(
        self,
        anchors: Sequence[bytes],
        cache_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.anchors = list(anchors)
        self.cache_path = cache_path
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._cached: list[_CachedKey] = []

    def _cached_keys(self) -> list[_CachedKey]:
        if self.cache_path is None:
            return []
        try:
            stat = os.stat(self.cache_path)
        except FileNotFoundError:
            self._stamp, self._cached = None, []
            return []
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if stamp != self._stamp:
            self._cached = _read_cached_keys(self.cache_path)
            self._stamp = stamp
        return self._cached

    def public_keys(self) -> list[bytes]:
        """Return the anchors, then the cached keys valid now that are not anchors."""
        now = int(self.clock())
        keys = list(self.anchors)
        for public, valid_from, valid_until in self._cached_keys():
            if valid_from <= now <= valid_until and public not in keys:
                keys.append(public)
        return keys

    def key_ids(self) -> dict[bytes, bytes]:
        """Return the key-id map that sync.protocol.decode_message takes."""
        return {key_id_for(key): key for key in self.public_keys()}

    def describe(self) -> str:
        """Return the trusted key ids, hex and comma-separated, for log lines."""
        return ",".join(key_id_for(key).hex() for key in self.public_keys())


def _read_cached_keys(cache_path: Path) -> list[_CachedKey]:
    """Read the cache's district keys. A cache without the table (schema before 3) has none."""
    try:
        conn = sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True)
        try:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'district_keys'"
            ).fetchone()
            rows = []
            if has_table is not None:
                rows = conn.execute(
                    "SELECT public_key, valid_from, valid_until FROM district_keys"
                ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        # The config's anchors still apply. The cache's own checks report a damaged file.
        log.warning("cached_district_keys_unreadable", cache=str(cache_path), error=str(exc))
        return []
    return [(bytes(row[0]), int(row[1]), int(row[2])) for row in rows]


UNKNOWN_SIGNER_ADVICE = (
    "the message or file is signed by a district key this gate does not trust; if the district "
    "rotated its key while this gate was offline for longer than the overlap, add the new "
    "public key (edgenode district keys show) to trust.district_keys and restart"
)


def unknown_signer_fields(trust: DistrictTrust) -> dict[str, str]:
    """Return the log fields that explain an ``unknown_signer`` rejection."""
    return {"trusted_keys": trust.describe(), "advice": UNKNOWN_SIGNER_ADVICE}
