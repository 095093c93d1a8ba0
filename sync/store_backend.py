"""The interface that both hub store backends implement, and the choice between them.

``HubStore`` (sync/hub_store.py) keeps the registry and the records in a SQLite file, the
default for a single machine. ``PostgresHubStore`` (sync/hub_store_pg.py) keeps them in a
PostgreSQL database, for hubs on several machines. The hub config's ``store`` names one: a
file path, or a ``postgresql://`` URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

from sync.hub_store import (
    BatchInsert,
    BatchResult,
    Device,
    HubStore,
    InvalidRecord,
    WireRecord,
)

POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreUnavailable(Exception):
    """The store cannot be reached now (a lost connection, a server that is down).

    Nothing of the failed call was committed. The hub sends no ack for the batch, so the gate
    sends it again after its ack timeout.
    """


class HubStoreBackend(Protocol):
    """The registry and records of the district hub. Use one instance from one thread at a time.

    Both backends raise ``HubStoreError`` for a registry change that cannot be made, and
    ``PostgresHubStore`` raises ``StoreUnavailable`` when its server cannot be reached.
    """

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def schema_version(self) -> int: ...

    def register_device(
        self, site: str, device_id: str, public_key: bytes, *, now: float | None = None
    ) -> Device: ...

    def get_device(self, site: str, device_id: str) -> Device | None: ...

    def list_devices(self) -> list[Device]: ...

    def set_enabled(self, site: str, device_id: str, enabled: bool) -> None: ...

    def disable_device(self, site: str, device_id: str) -> None: ...

    def enable_device(self, site: str, device_id: str) -> None: ...

    def insert_batch(
        self,
        device: Device,
        records: Sequence[WireRecord],
        *,
        lane: str,
        batch_id: str,
        received_at: float | None = None,
        invalid: Sequence[InvalidRecord] = (),
    ) -> BatchResult: ...

    def insert_batches(self, batches: Sequence[BatchInsert]) -> list[BatchResult]: ...

    def stored_seqs(self, device: Device) -> list[int]: ...

    def record_count(self) -> int: ...

    def records(self, device: Device) -> list[dict[str, Any]]: ...

    def add_enrollment_token(
        self,
        token_hash: bytes,
        site: str,
        device_id: str,
        *,
        expires_at: float,
        now: float | None = None,
    ) -> None: ...

    def redeem_enrollment_token(
        self,
        token_hash: bytes,
        site: str,
        device_id: str,
        public_key: bytes,
        *,
        now: float | None = None,
    ) -> Device: ...


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    """A libpq connection URL. ``str()`` gives it without the password, for logs and messages."""

    url: str

    def __str__(self) -> str:
        return redact_url(self.url)


StoreLocation = Path | PostgresUrl


def parse_store_location(value: str) -> StoreLocation:
    """Return a PostgresUrl for a ``postgresql://`` or ``postgres://`` URL, else a Path."""
    if value.split("://", 1)[0].lower() in POSTGRES_SCHEMES and "://" in value:
        return PostgresUrl(value)
    return Path(value)


def redact_url(url: str) -> str:
    """Return the URL with any password in it replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        "password=***" if item.split("=", 1)[0].lower() == "password" else item
        for item in parts.query.split("&")
        if item
    )
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{redacted}?{query}" if query else redacted


def open_store(location: StoreLocation) -> HubStoreBackend:
    """Open (and migrate) the store at a SQLite path or a PostgreSQL URL.

    Raises StoreUnavailable when the PostgreSQL server cannot be reached, and sqlite3.Error
    when the SQLite file cannot be opened.
    """
    if isinstance(location, PostgresUrl):
        # Imported here, so a hub on SQLite does not need psycopg's libpq.
        from sync.hub_store_pg import PostgresHubStore

        return PostgresHubStore(location.url)
    return HubStore(location)
