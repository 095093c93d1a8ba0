"""The interface that both feed store backends implement, and the choice between them.

``FeedStore`` (sync/feeds.py) keeps the imported feeds and the published datasets in the hub's
SQLite file. ``PostgresFeedStore`` (sync/feeds_pg.py) keeps them in the hub's PostgreSQL
database, so that hubs on several machines import, publish and serve gates' requests from one
store. The hub config's ``store`` names one, as for the hub store (sync/store_backend.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from sync.downlink import Kind
from sync.store_backend import PostgresUrl, StoreLocation

if TYPE_CHECKING:
    from sync.feeds import HealthRow, RosterRow

T = TypeVar("T")

# The columns of published_transfers in the order that ``transfer_from_row`` reads them.
TRANSFER_COLUMNS = "transfer_id, site, kind, version, base_version, chunk_size, data, created_at"


@dataclass(frozen=True, slots=True)
class Transfer:
    """One stored dataset file and the fields its chunks carry."""

    transfer_id: str
    site: str
    kind: Kind
    version: int
    base_version: int | None
    chunk_size: int
    data: bytes
    created_at: float

    @property
    def chunk_count(self) -> int:
        return max(1, -(-len(self.data) // self.chunk_size))


@dataclass(frozen=True, slots=True)
class PublishedState:
    version: int
    kind: str
    issued_at: int


class FeedBackend(Protocol):
    """The feed and publishing tables of the district hub. Use from one thread at a time.

    ``PostgresFeedStore`` raises ``StoreUnavailable`` (sync/store_backend.py) from every
    method when its server cannot be reached.
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

    # --- feeds ---

    def store_roster(
        self, rows: Sequence[RosterRow], seen: Mapping[str, set[str]], *, now: float
    ) -> int: ...

    def store_health(self, rows: Sequence[HealthRow], *, now: float) -> int: ...

    def residents(self, site: str) -> list[RosterRow]: ...

    def health(self, health_subjects: Sequence[str]) -> dict[str, HealthRow]: ...

    # --- published datasets ---

    def publish_transaction(self, site: str, work: Callable[[], T]) -> T:
        """Call ``work`` in one write transaction that holds the site's publish lock.

        The store's other methods called by ``work`` run inside that transaction. A second
        caller for the same site, in this process or another, waits until the first commits,
        so two builds never make the same version. The transaction is rolled back when
        ``work`` raises.
        """
        ...

    def published_state(self, site: str) -> PublishedState | None: ...

    def published_digests(self, site: str) -> dict[str, str]:
        """Return the digest of each record key of the site's published version."""
        ...

    def store_transfer(
        self,
        transfer: Transfer,
        digests: Mapping[str, str] | None,
        *,
        changed: Sequence[str] | None,
        removed: Sequence[str],
        keep_transfers: int,
    ) -> None:
        """Store the transfer and, unless ``digests`` is None, the site's published state.

        ``digests`` maps every record key of the version to its digest. When ``changed`` is
        given, only the digests of those keys and of ``removed`` are written, which keeps a
        small delta's cost independent of the site's size. Only the site's newest
        ``keep_transfers`` transfers are kept. Call inside ``publish_transaction``.
        """
        ...

    def transfer(self, transfer_id: str) -> Transfer | None:
        """Return a stored transfer, or None when it is unknown or was deleted."""
        ...

    def stored_snapshot(self, site: str, version: int) -> Transfer | None:
        """Return the newest stored snapshot transfer of this version of the site, or None."""
        ...


def transfer_from_row(row: Sequence[Any]) -> Transfer:
    """Build a Transfer from a published_transfers row selected as ``TRANSFER_COLUMNS``."""
    return Transfer(
        transfer_id=str(row[0]),
        site=str(row[1]),
        kind="snapshot" if row[2] == "snapshot" else "delta",
        version=int(row[3]),
        base_version=None if row[4] is None else int(row[4]),
        chunk_size=int(row[5]),
        data=bytes(row[6]),
        created_at=float(row[7]),
    )


def open_feed_store(location: StoreLocation) -> FeedBackend:
    """Open (and migrate) the feed store at a SQLite path or a PostgreSQL URL.

    Raises StoreUnavailable when the PostgreSQL server cannot be reached, and sqlite3.Error
    when the SQLite file cannot be opened.
    """
    if isinstance(location, PostgresUrl):
        # Imported here, so a hub on SQLite does not need psycopg's libpq.
        from sync.feeds_pg import PostgresFeedStore

        return PostgresFeedStore(location.url)
    # Imported here because sync.feeds imports this module.
    from sync.feeds import FeedStore

    return FeedStore(location)
