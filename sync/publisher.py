"""Per-site datasets from the feed store, signed and published to the site's gates.

``Publisher.publish`` builds the site's records from the feed tables (sync/feeds.py) and the
district's issuer keys, then writes either a snapshot of them all or a delta from the last
published version, signed with the district key. The delta is computed from the SHA-256 of
each record as last published (``published_records``): a new or changed record becomes an
upsert, a record no longer there a delete. The file is stored in ``published_transfers`` and
sent in ``dataset_chunk`` messages (sync/downlink.py) on the site's dataset topic.

``handle_request`` serves a gate's ``request`` message (docs/mqtt.md, "request"): it sends
again the missing chunks of a stored transfer, or a full snapshot. The hub calls it for the
requests that its shared subscription brings, after it has checked the gate's signature, so
each request is served by exactly one hub process. A plain subscription to the request
topics in every hub would make every hub send the same chunks again.

The version and record digests are committed before the chunks are sent. A send that fails
part-way leaves gates without the new version: a gate that got some chunks requests the rest,
and one that got none meets a ``version_gap`` at the next delta and requests a snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from nacl.signing import SigningKey

from edgenode.cache import KEY_COLUMNS
from edgenode.district import issuer_record
from edgenode.district_keyring import DistrictKeyEntry, DistrictKeySource, current_key
from edgenode.district_keys import active_issuer_keys
from edgenode.snapshot import DATASETS, KNOWN_DATASETS, write_snapshot
from sync.delta import write_delta
from sync.downlink import MAX_CHUNK_BYTES, MAX_CHUNKS, Kind, chunk_messages
from sync.feed_backend import FeedBackend, PublishedState
from sync.feed_backend import Transfer as Transfer  # Re-exported for the publisher's callers.
from sync.protocol import Topics

log = structlog.get_logger("sync.publisher")

DAY_S = 86_400
DEFAULT_VALID_FOR_S = 7 * DAY_S
# Transfers kept per site for chunk requests. Older ones are deleted at each publish.
KEEP_TRANSFERS = 8
# A snapshot request within this many seconds of the site's last snapshot send is ignored,
# because that send is still reaching the gates.
SNAPSHOT_REQUEST_INTERVAL_S = 30.0


class Publishing(Protocol):
    """The part of ``sync.connection.Connection`` that the publisher uses."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """An issuer key of the district, published in the ``issuers`` dataset."""

    key: SigningKey
    code_types: tuple[str, ...]
    valid_from: int
    valid_until: int


def record_key(record: Mapping[str, Any]) -> str:
    """Return ``dataset:key`` for a record, the key being its dataset's KEY_COLUMNS value."""
    dataset = str(record["dataset"])
    return f"{dataset}:{record[KEY_COLUMNS[dataset]]}"


def record_digest(record: Mapping[str, Any]) -> str:
    """Return the SHA-256 of a record's canonical JSON."""
    canonical = json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def site_records(
    store: FeedBackend,
    site: str,
    issuers: Sequence[IssuerKey],
    district_keys: Sequence[DistrictKeyEntry] = (),
) -> dict[str, dict[str, Any]]:
    """Build every record of a site's datasets, by ``record_key``.

    ``district_keys`` are the district keys to announce (edgenode/district_keyring.py), none
    before the district's first key rotation.

    Residents come from the site's roster, each with a binding of its health subject and the
    stored status of that subject, if any. Two residents with one health subject get one
    binding, to the first subject in hex order, because the binding's key is the health subject.
    """
    records: dict[str, dict[str, Any]] = {}

    def add(record: dict[str, Any]) -> None:
        records.setdefault(record_key(record), record)

    for issuer in issuers:
        add(
            issuer_record(
                issuer.key, list(issuer.code_types), issuer.valid_from, issuer.valid_until
            )
        )
    for district_key in district_keys:
        add(district_key.record())
    residents = store.residents(site)
    statuses = store.health([row.health_subject for row in residents])
    for row in residents:
        resident: dict[str, Any] = {
            "dataset": "residents",
            "subject": row.subject,
            "compound": row.site,
            "building": row.building,
            "unit": row.unit,
            "role": row.role,
            "valid_from": row.valid_from,
            "valid_until": row.valid_until,
            "display_name": row.display_name,
        }
        # Only set when the roster had an ID number, so the digests of older rows stay the
        # same and publishing after this change sends no needless delta.
        if row.id_hash is not None:
            resident["id_hash"] = row.id_hash
        add(resident)
        add(
            {
                "dataset": "bindings",
                "health_subject": row.health_subject,
                "resident_subject": row.subject,
            }
        )
        status = statuses.get(row.health_subject)
        if status is not None:
            add(
                {
                    "dataset": "health_status",
                    "subject": status.health_subject,
                    "colour": status.colour,
                    "as_of": status.as_of,
                }
            )
    return records


class Publisher:
    """Build, store and send a site's dataset versions. Use from one event loop.

    The store's calls run in a worker thread, one at a time.
    """

    def __init__(
        self,
        store: FeedBackend,
        connection: Publishing,
        *,
        district_key: DistrictKeySource,
        issuers: Sequence[IssuerKey] | Callable[[int], Sequence[IssuerKey]],
        district_keys: Callable[[int], Sequence[DistrictKeyEntry]] | None = None,
        valid_for_s: int = DEFAULT_VALID_FOR_S,
        chunk_size: int = MAX_CHUNK_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be 1 to {MAX_CHUNK_BYTES} bytes")
        self.store = store
        self.connection = connection
        # A DistrictSigner returns, at each call, the key that the keyring selects for then.
        self.district_key = district_key
        # Called with the build time, like a callable ``issuers``: the district keys to announce.
        self._district_keys = district_keys
        # A callable is called with the build time at each build, so a long-running hub
        # publishes the keys of a rotation (read_issuer_keys) without a restart.
        self._issuers = issuers if callable(issuers) else list(issuers)
        self.valid_for_s = valid_for_s
        self.chunk_size = chunk_size
        self.clock = clock
        self.chunks_sent = 0
        self._lock = asyncio.Lock()
        # Monotonic time of the last snapshot send per site, for SNAPSHOT_REQUEST_INTERVAL_S.
        self._snapshot_sent_at: dict[str, float] = {}

    # --- publishing ---

    async def publish(self, site: str, *, snapshot: bool = False) -> Transfer:
        """Build the site's next version, commit it and send it. Raises NotConnected.

        The next version is a snapshot when ``snapshot`` is set or nothing was published for
        the site before, and otherwise a delta, which may be empty.
        """
        async with self._lock:
            transfer = await asyncio.to_thread(self.build, site, snapshot=snapshot)
        await self.send(transfer)
        return transfer

    def build(self, site: str, *, snapshot: bool = False) -> Transfer:
        """Write the site's next version and commit it with its record digests. Blocking.

        The whole build runs in the store's ``publish_transaction``, so two processes
        publishing at once make two consecutive versions, never the same one twice.
        """
        transfer, records = self.store.publish_transaction(
            site, functools.partial(self._build_in_transaction, site, snapshot)
        )
        log.info(
            "dataset_built",
            site=site,
            kind=transfer.kind,
            version=transfer.version,
            base_version=transfer.base_version,
            records=records,
            bytes=len(transfer.data),
            transfer_id=transfer.transfer_id,
        )
        return transfer

    def _build_in_transaction(self, site: str, snapshot: bool) -> tuple[Transfer, int]:
        """Return the new version's transfer and its record count."""
        published = self.store.published_state(site)
        records = self._site_records(site)
        digests = {key: record_digest(record) for key, record in records.items()}
        if snapshot or published is None:
            version = 1 if published is None else published.version + 1
            transfer = self._write(site, "snapshot", version, None, list(records.values()))
            self._commit_state(transfer, digests)
        else:
            changed, removed = self._changed_keys(site, digests)
            changes = [{"op": "upsert", **records[key]} for key in changed]
            changes += [_delete_change(key) for key in removed]
            version = published.version + 1
            transfer = self._write(site, "delta", version, published.version, changes)
            self._commit_state(transfer, digests, changed=changed, removed=removed)
        return transfer, len(records)

    def _site_records(self, site: str) -> dict[str, dict[str, Any]]:
        now = int(self.clock())
        announced = [] if self._district_keys is None else self._district_keys(now)
        return site_records(self.store, site, self.issuers_at(now), announced)

    def issuers_at(self, now: int) -> list[IssuerKey]:
        """Return the issuer keys to publish at ``now``, leaving out keys whose validity ended."""
        source = self._issuers
        issuers = source(now) if callable(source) else source
        return [issuer for issuer in issuers if now <= issuer.valid_until]

    def _published(self, site: str) -> PublishedState | None:
        return self.store.published_state(site)

    def published_version(self, site: str) -> int | None:
        state = self._published(site)
        return None if state is None else state.version

    def _changed_keys(self, site: str, digests: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Return the record keys new or changed since the published version, and those
        removed, each sorted."""
        published = self.store.published_digests(site)
        changed = sorted(key for key, digest in digests.items() if published.get(key) != digest)
        removed = sorted(set(published) - set(digests))
        return changed, removed

    def _write(
        self,
        site: str,
        kind: Kind,
        version: int,
        base_version: int | None,
        records: list[dict[str, Any]],
    ) -> Transfer:
        issued_at = int(self.clock())
        signing_key = current_key(self.district_key)
        # Gates that predate the district_keys dataset reject a header listing it, so it is
        # listed only in files that carry its records, which start with the first rotation.
        datasets = (
            KNOWN_DATASETS
            if any(record["dataset"] == "district_keys" for record in records)
            else DATASETS
        )
        with tempfile.TemporaryDirectory(prefix="edgenode-publish-") as folder:
            path = Path(folder) / kind
            if kind == "snapshot":
                write_snapshot(
                    path,
                    records,
                    site=site,
                    version=version,
                    issued_at=issued_at,
                    valid_until=issued_at + self.valid_for_s,
                    signing_key=signing_key,
                    datasets=datasets,
                )
            else:
                assert base_version is not None
                write_delta(
                    path,
                    records,
                    site=site,
                    base_version=base_version,
                    version=version,
                    issued_at=issued_at,
                    valid_until=issued_at + self.valid_for_s,
                    signing_key=signing_key,
                    datasets=datasets,
                )
            data = path.read_bytes()
        if -(-len(data) // self.chunk_size) > MAX_CHUNKS:
            raise ValueError(f"{kind} of {len(data)} bytes needs more than {MAX_CHUNKS} chunks")
        return Transfer(
            transfer_id=uuid.uuid4().hex,
            site=site,
            kind=kind,
            version=version,
            base_version=base_version,
            chunk_size=self.chunk_size,
            data=data,
            created_at=self.clock(),
        )

    def _commit_state(
        self,
        transfer: Transfer,
        digests: Mapping[str, str] | None,
        *,
        changed: Sequence[str] | None = None,
        removed: Sequence[str] = (),
    ) -> None:
        """Store the transfer and, unless ``digests`` is None, the site's published state.

        See ``FeedBackend.store_transfer``. Runs inside the caller's transaction.
        """
        self.store.store_transfer(
            transfer, digests, changed=changed, removed=removed, keep_transfers=KEEP_TRANSFERS
        )

    def transfer(self, transfer_id: str) -> Transfer | None:
        """Return a stored transfer, or None when it is unknown or was deleted."""
        return self.store.transfer(transfer_id)

    async def send(self, transfer: Transfer, indexes: Sequence[int] | None = None) -> int:
        """Publish a transfer's chunks, all or only ``indexes``. Return how many were sent.

        Raises NotConnected (from the connection) when the broker is unreachable.
        """
        messages = chunk_messages(
            transfer.data,
            site=transfer.site,
            kind=transfer.kind,
            version=transfer.version,
            base_version=transfer.base_version,
            transfer_id=transfer.transfer_id,
            signing_key=current_key(self.district_key),
            chunk_size=transfer.chunk_size,
            district_time=self.clock,
        )
        selected = range(len(messages)) if indexes is None else sorted(set(indexes))
        topic = Topics(transfer.site, "district").datasets
        sent = 0
        for index in selected:
            await self.connection.publish(topic, messages[index], qos=1)
            sent += 1
        self.chunks_sent += sent
        if transfer.kind == "snapshot" and indexes is None:
            self._snapshot_sent_at[transfer.site] = time.monotonic()
        log.info(
            "dataset_sent",
            site=transfer.site,
            kind=transfer.kind,
            version=transfer.version,
            transfer_id=transfer.transfer_id,
            chunks=sent,
            of=len(messages),
        )
        return sent

    # --- gates' requests ---

    async def handle_request(self, site: str, device: str, body: Mapping[str, Any]) -> None:
        """Serve one ``request`` whose signature and sender the hub has checked.

        Errors are logged with the site and device and not raised, because the hub's message
        handler must go on.
        """
        what = body.get("what")
        try:
            if what == "chunks":
                await self._resend_chunks(site, device, body)
            elif what == "snapshot":
                await self._send_snapshot(site, device, body)
            else:
                log.warning(
                    "request_rejected",
                    reason="unknown_what",
                    what=str(what),
                    site=site,
                    device=device,
                )
        except Exception as exc:  # NotConnected, StoreUnavailable, SQL errors: logged, not raised.
            log.error("request_failed", what=str(what), site=site, device=device, error=repr(exc))

    async def _resend_chunks(self, site: str, device: str, body: Mapping[str, Any]) -> None:
        transfer_id = body.get("transfer_id")
        missing = body.get("missing")
        if not isinstance(transfer_id, str) or not _is_index_list(missing):
            log.warning("request_rejected", reason="bad_request", site=site, device=device)
            return
        async with self._lock:
            transfer = await asyncio.to_thread(self.transfer, transfer_id)
        if transfer is None or transfer.site != site:
            # Deleted after KEEP_TRANSFERS newer ones, or never sent here. A snapshot lets the
            # gate catch up, and drops the old transfer from its spool once applied.
            log.info("transfer_not_found", transfer_id=transfer_id, site=site, device=device)
            await self._send_snapshot(site, device, {})
            return
        assert isinstance(missing, list)
        indexes = [index for index in missing if 0 <= index < transfer.chunk_count]
        sent = await self.send(transfer, indexes)
        log.info("chunks_resent", transfer_id=transfer_id, site=site, device=device, chunks=sent)

    async def _send_snapshot(self, site: str, device: str, body: Mapping[str, Any]) -> None:
        """Send the site's current data as a snapshot, at most once per interval per site.

        The snapshot has the published version when the data has not changed since, so gates
        already at that version ignore it, and the next version otherwise.
        """
        last = self._snapshot_sent_at.get(site)
        if last is not None and time.monotonic() - last < SNAPSHOT_REQUEST_INTERVAL_S:
            log.info("snapshot_request_skipped", site=site, device=device)
            return
        async with self._lock:
            transfer = await asyncio.to_thread(self._snapshot_transfer, site)
        if transfer is None:
            log.info("snapshot_request_skipped", site=site, device=device, reason="no_data")
            return
        log.info(
            "snapshot_requested",
            site=site,
            device=device,
            have_version=body.get("have_version"),
            version=transfer.version,
        )
        await self.send(transfer)

    def _snapshot_transfer(self, site: str) -> Transfer | None:
        """Return a snapshot of the published version, or build one of a new version.

        Returns None when nothing was published for the site yet.
        """
        return self.store.publish_transaction(
            site, functools.partial(self._snapshot_in_transaction, site)
        )

    def _snapshot_in_transaction(self, site: str) -> Transfer | None:
        published = self._published(site)
        if published is None:
            return None
        stored = self.store.stored_snapshot(site, published.version)
        if stored is not None:
            return stored
        records = self._site_records(site)
        digests = {key: record_digest(record) for key, record in records.items()}
        changed, removed = self._changed_keys(site, digests)
        if changed or removed:
            version, state = published.version + 1, digests
        else:
            # Unchanged since the published version, so a snapshot of that version is true.
            version, state = published.version, None
        transfer = self._write(site, "snapshot", version, None, list(records.values()))
        self._commit_state(transfer, state)
        return transfer


def _delete_change(key: str) -> dict[str, Any]:
    dataset, value = key.split(":", 1)
    return {"op": "delete", "dataset": dataset, KEY_COLUMNS[dataset]: value}


def _is_index_list(value: object) -> bool:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHUNKS:
        return False
    return all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def read_issuer_keys(folder: Path, now: int | None = None) -> list[IssuerKey]:
    """Read the district's issuer keys to publish at ``now`` (default: the current time).

    Before the first rotation these are ``issuer-health.key`` and ``issuer-community.key``,
    valid without a time limit. After it, the keyring ``issuers.json`` lists each key with its
    validity, and keys whose validity ended are left out (edgenode/district_keys.py).
    Raises KeyFileError for a missing or invalid key file and KeyringError for the keyring.
    """
    at = int(time.time()) if now is None else now
    return [
        IssuerKey(active.key, (active.role,), active.valid_from, active.valid_until)
        for active in active_issuer_keys(folder, at)
    ]
