"""The district hub's ingest: gate batches from MQTT into the hub store, then acks.

Every hub process joins the shared subscription ``$share/edgenode-hub/edgenode/v1/+/+/up/#``,
so the broker gives each uplink message to one of them. For each batch the hub

1. looks up the gate by the topic's site and device in the registry,
2. checks the batch signature against that gate's public key,
3. queues the batch for the committer, which stores every batch waiting in one transaction,
   dropping records already stored, and
4. only after the commit publishes a signed ``ack`` for every seq of the batch, since each one
   is then stored, either now or earlier.

Committing the waiting batches together shares one fsync between them: with one commit per
batch, the fsync limited a hub to about 2,000 verdicts per second in batches of 100
(benchmarks/hub_ingest.py).

A batch from an unknown or disabled gate, or one that fails the signature check, is rejected
and never stored. The connection sends the PUBACK when the handler has queued the batch, so
before its commit, and a hub that dies before its commit does not get the message back from
the broker either: Mosquitto keeps it in the dead client's session. The gate sends the batch
again after its ack timeout, and another hub stores it then.

Hubs connect with a session expiry of 0: Mosquitto 2.0.11 keeps giving a stopped member's
session its share of a shared subscription until the session expires (a probe with one live
and one disconnected member: the live one got 5 of 10 messages), and each such batch would
wait one more ack timeout at its gate.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import structlog

from edgenode.config import SyncConfig
from edgenode.district_keyring import DistrictKeySource, current_key
from sync.alarms import Alarm, AlarmChecker, AlarmKind
from sync.connection import Connection, NotConnected
from sync.enrollment import ENROLL_KIND, EnrollmentService
from sync.hub_store import (
    BatchInsert,
    BatchResult,
    Device,
    InvalidRecord,
    WireRecord,
    parse_records,
)
from sync.protocol import (
    TOPIC_ROOT,
    MessageError,
    Topics,
    decode_message,
    encode_message,
    hub_uplink_subscription,
    trusted,
)
from sync.publisher import Publisher
from sync.store_backend import HubStoreBackend, StoreLocation, StoreUnavailable, open_store
from sync.uplink import seq_ranges

log = structlog.get_logger("sync.hub")

T = TypeVar("T")

# The hub's own status topic is edgenode/v1/{HUB_SITE}/hub-{hub_id}/status.
HUB_SITE = "district"
LANES = frozenset({"normal", "priority"})
# Alarms counted for rejected batches. A disabled gate counts as unknown_device, because it
# is not an enabled member of the registry.
ALARM_UNKNOWN_DEVICE = str(AlarmKind.UNKNOWN_DEVICE)
ALARM_FORGED_BATCH = str(AlarmKind.FORGED_BATCH)
# Counted and raised for every rejected enroll request (sync/enrollment.py), whatever the reason.
ALARM_ENROLL_REJECTED = str(AlarmKind.ENROLL_REJECTED)
_SIGNATURE_REASONS = frozenset({"unknown_signer", "bad_signature"})
# Stored batches waiting for their alarm checks. When the checks fall this far behind, a
# batch's checks are skipped and logged, and the periodic sweep still covers silent gates.
MAX_PENDING_CHECKS = 1024
# Batches queued for the committer. When it is full, the MQTT dispatch waits, and the broker
# keeps the messages that follow.
MAX_PENDING_COMMITS = 256
# Batches stored in one transaction at most, which bounds a transaction to 64 x 10,000
# records at the largest batch size that gates may send (``batch_max_records``).
MAX_COMMIT_BATCHES = 64
# Gates' requests (chunks, snapshots) served at the same time by one hub process.
MAX_PENDING_REQUESTS = 64
SILENT_CHECK_INTERVAL_S = 60.0
# Characters kept of each string field of a gate's alarm.
MAX_DETAIL_CHARS = 300


class _Rejected(Exception):
    def __init__(self, reason: str, alarm: str | None = None) -> None:
        self.reason = reason
        self.alarm = alarm
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class _Uplink:
    """The site, device and topic kind (batch, priority, request) of an uplink topic."""

    site: str
    device: str
    kind: str


def default_hub_id() -> str:
    """Return the host name as a hub id, with characters outside A-Z a-z 0-9 _ - made '-'.

    A host name such as ``hub1.district.example`` would otherwise break the hub config's
    ``hub_id`` pattern and the MQTT client id built from it.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return name or "hub"


class Hub:
    """One hub process's ingest. Run ``run()`` until cancelled.

    ``alarms`` counts rejections by alarm name and ``rejected`` by reason, for this process.
    """

    def __init__(
        self,
        sync: SyncConfig,
        *,
        store_path: StoreLocation,
        district_key: DistrictKeySource,
        hub_id: str | None = None,
        clock: Callable[[], float] = time.time,
        alarm_checker: AlarmChecker | None = None,
        publisher: Publisher | None = None,
        silent_check_interval_s: float = SILENT_CHECK_INTERVAL_S,
    ) -> None:
        """Set up the hub. With an ``alarm_checker``, stored batches and rejections raise
        alarms; with a ``publisher``, gates' requests for chunks and snapshots are served.

        Both send over ``self.connection``, so a caller that builds them after the hub sets
        them as attributes before ``run()``, as ``edgenode district serve`` does.
        """
        self.hub_id = hub_id or default_hub_id()
        self.store_path = store_path
        self.clock = clock
        self._district_key = district_key
        # Unique per process and per Hub object, because the broker disconnects an older
        # client when a new one connects with the same id.
        client_id = f"edgenode-hub-{self.hub_id}-{os.getpid()}-{secrets.token_hex(4)}"
        self.connection = Connection(
            sync,
            site=HUB_SITE,
            device=f"hub-{self.hub_id}",
            client_id=client_id,
            session_expiry_s=0,
        )
        self.connection.subscribe(hub_uplink_subscription(), self._on_message)
        self._enrollment = EnrollmentService(
            self.connection,
            district_key=district_key,
            in_store=self._in_store,
            store=self._require_store,
            on_rejected=self._enroll_rejected,
            clock=clock,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-store")
        self._store: HubStoreBackend | None = None
        # Registry lookups use a second connection on their own thread, so the next message's
        # lookup does not wait behind a commit and its fsync.
        self._registry_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hub-registry"
        )
        self._registry: HubStoreBackend | None = None
        self.alarm_checker = alarm_checker
        self.publisher = publisher
        self.silent_check_interval_s = silent_check_interval_s
        # The checker reads the store through its own connection, on its own thread, so the
        # checks never delay the next batch's commit and ack.
        self._alarm_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-alarms")
        self._checks: asyncio.Queue[_Check] = asyncio.Queue(maxsize=MAX_PENDING_CHECKS)
        self._commits: asyncio.Queue[_PendingBatch] = asyncio.Queue(maxsize=MAX_PENDING_COMMITS)
        self._requests: set[asyncio.Task[None]] = set()
        self.alarms: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.stored_records = 0
        self.duplicate_records = 0
        self.acks_sent = 0
        self.store_failures = 0
        self.checks_skipped = 0
        self.requests_skipped = 0

    async def run(self) -> None:
        """Open the store and ingest until cancelled."""
        self._store = await self._in_store(open_store, self.store_path)
        loop = asyncio.get_running_loop()
        self._registry = await loop.run_in_executor(
            self._registry_executor, open_store, self.store_path
        )
        log.info("hub_started", hub_id=self.hub_id, store=str(self.store_path))
        workers = [asyncio.create_task(self._run_commits(), name="hub-commits")]
        if self.alarm_checker is not None:
            workers += [
                asyncio.create_task(self._run_checks(), name="hub-alarm-checks"),
                asyncio.create_task(self._check_silent_gates(), name="hub-silent-check"),
            ]
        try:
            await self.connection.run()
        finally:
            for task in [*workers, *self._requests]:
                task.cancel()
            await asyncio.gather(*workers, *self._requests, return_exceptions=True)
            store = self._store
            self._store = None
            await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
            self._executor.shutdown(wait=False)
            registry, self._registry = self._registry, None
            if registry is not None:
                await loop.run_in_executor(self._registry_executor, registry.close)
            self._registry_executor.shutdown(wait=False)
            self._alarm_executor.shutdown(wait=False)
            log.info("hub_stopped", hub_id=self.hub_id)

    # --- messages ---

    async def _on_message(self, message: aiomqtt.Message) -> None:
        uplink = _parse_topic(str(message.topic))
        if uplink is None:
            log.warning("message_ignored", reason="unexpected_topic", topic=str(message.topic))
            return
        if uplink.kind == ENROLL_KIND:
            # A gate that enrolls is not in the registry yet: its message carries its own key.
            await self._enrollment.handle(uplink.site, uplink.device, message.payload)
            return
        payload = message.payload
        try:
            if not isinstance(payload, bytes):
                raise _Rejected("bad_body")
            device = await self._lookup_device(uplink.site, uplink.device)
            if device is None:
                raise _Rejected("unknown_device", ALARM_UNKNOWN_DEVICE)
            if not device.enabled:
                raise _Rejected("device_disabled", ALARM_UNKNOWN_DEVICE)
            body = _decode(payload, device)
        except _Rejected as exc:
            self._reject(exc, uplink, batch_id=None)
            return
        except StoreUnavailable as exc:
            self._store_failed(exc, uplink, batch_id=None)
            return

        kind = body["type"]
        if kind == "batch":
            await self._on_batch(device, uplink, body)
        elif kind == "alarm":
            detail = _gate_alarm_detail(body)
            log.error("gate_alarm", **_ids(uplink), **detail)
            alarm = Alarm(
                AlarmKind.GATE_ALARM, uplink.site, (uplink.device,), None, (), detail, self.clock()
            )
            self._queue_check(_Check(None, "", [], [], None, (alarm,)))
        elif kind == "decommission":
            await self._on_decommission(uplink)
        elif kind == "request" and self.publisher is not None:
            self._serve_request(self.publisher, uplink, body)
        else:
            log.info("message_ignored", reason="unexpected_type", type=kind, **_ids(uplink))

    def _serve_request(self, publisher: Publisher, uplink: _Uplink, body: dict[str, Any]) -> None:
        """Serve a gate's request in its own task, so a long snapshot send does not hold up
        the batches behind it. The gate requests again if no chunk arrives."""
        if len(self._requests) >= MAX_PENDING_REQUESTS:
            self.requests_skipped += 1
            log.warning(
                "request_skipped",
                reason="too_many_pending",
                pending=len(self._requests),
                skipped_total=self.requests_skipped,
                **_ids(uplink),
            )
            return
        task = asyncio.create_task(
            publisher.handle_request(uplink.site, uplink.device, body),
            name=f"hub-request-{uplink.site}-{uplink.device}",
        )
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _on_batch(self, device: Device, uplink: _Uplink, body: dict[str, Any]) -> None:
        batch_id = body.get("batch_id")
        try:
            if not isinstance(batch_id, str) or not batch_id:
                raise _Rejected("bad_body")
            lane = body.get("lane")
            if lane not in LANES:
                raise _Rejected("bad_body")
            try:
                parsed = parse_records(body.get("records"))
            except ValueError as exc:
                raise _Rejected("bad_record") from exc
        except _Rejected as exc:
            self._reject(exc, uplink, batch_id=batch_id if isinstance(batch_id, str) else None)
            return

        batch = BatchInsert(device, tuple(parsed.valid), str(lane), batch_id, tuple(parsed.invalid))
        await self._commits.put(_PendingBatch(uplink, batch))

    async def _run_commits(self) -> None:
        """Store the queued batches, all those waiting in one transaction, then ack each one."""
        while True:
            group = [await self._commits.get()]
            while len(group) < MAX_COMMIT_BATCHES and not self._commits.empty():
                group.append(self._commits.get_nowait())
            await self._commit_group(group)

    async def _commit_group(self, group: list[_PendingBatch]) -> None:
        """Store a group of batches in one transaction and ack each. A batch that is not
        stored gets no ack, so its gate sends it again."""
        try:
            results = await self._commit([pending.batch for pending in group])
        except StoreUnavailable as exc:
            for pending in group:
                self._store_failed(exc, pending.uplink, batch_id=pending.batch.batch_id)
            return
        except Exception as exc:  # sqlite3.Error, psycopg.Error
            if len(group) > 1:
                # One batch that fails must not fail the others: store each one alone.
                for pending in group:
                    await self._commit_group([pending])
                return
            log.error(
                "batch_not_stored",
                reason="store_error",
                error=repr(exc),
                batch_id=group[0].batch.batch_id,
                **_ids(group[0].uplink),
            )
            return
        await asyncio.gather(
            *(
                self._finish_batch(pending, result)
                for pending, result in zip(group, results, strict=True)
            )
        )

    async def _finish_batch(self, pending: _PendingBatch, result: BatchResult) -> None:
        """Count, log and ack a committed batch, then queue its alarm checks."""
        uplink, batch = pending.uplink, pending.batch
        device, batch_id, lane, records = batch.device, batch.batch_id, batch.lane, batch.records
        self.stored_records += result.new
        self.duplicate_records += result.duplicates
        log.debug(
            "batch_stored",
            batch_id=batch_id,
            lane=lane,
            records=len(records),
            new=result.new,
            duplicates=result.duplicates,
            rejected=result.rejected,
            **_ids(uplink),
        )
        # Invalid records with a seq are kept in rejected_records and acked with the rest,
        # so the gate stops sending them. The bad_record alarm informs district staff.
        acked = [record.seq for record in records]
        acked += [item.seq for item in batch.invalid if item.seq is not None]
        if acked:
            await self._send_ack(uplink, batch_id, acked)
        self._queue_check(_Check(device, batch_id, list(records), list(batch.invalid), result))

    async def _commit(self, batches: list[BatchInsert]) -> list[BatchResult]:
        """Store batches in one transaction. Raises StoreUnavailable or sqlite3.Error, and then
        no ack is sent."""
        store = self._require_store()
        return await self._in_store(store.insert_batches, batches)

    async def _send_ack(self, uplink: _Uplink, batch_id: str, seqs: list[int]) -> None:
        ack = {
            "type": "ack",
            "site": uplink.site,
            "device": uplink.device,
            "batch_id": batch_id,
            "seqs": seq_ranges(seqs),
            "district_time": self.clock(),
        }
        payload = encode_message(ack, current_key(self._district_key))
        try:
            await self.connection.publish(Topics(uplink.site, uplink.device).acks, payload)
        except NotConnected as exc:
            # The records are stored. The gate sends the batch again after its ack timeout,
            # and the next ack names the same seqs.
            log.warning("ack_not_sent", batch_id=batch_id, error=str(exc), **_ids(uplink))
            return
        self.acks_sent += 1

    def _enroll_rejected(self, site: str, device: str, reason: str) -> None:
        self.rejected[reason] += 1
        self.alarms[ALARM_ENROLL_REJECTED] += 1
        alarm = Alarm(
            AlarmKind.ENROLL_REJECTED,
            site,
            (device,),
            None,
            (),
            {"reason": reason},
            self.clock(),
        )
        self._queue_check(_Check(None, "", [], [], None, (alarm,)))

    async def _on_decommission(self, uplink: _Uplink) -> None:
        """Disable a retiring gate in the registry, then send it a signed confirmation.

        The request passed the signature check with the gate's own key, so only the gate can
        retire itself. Its stored records stay. A later request from it is rejected as
        device_disabled, so a gate that missed the confirmation is wiped with --force.
        """
        try:
            await self._in_store(self._require_store().disable_device, uplink.site, uplink.device)
        except Exception as exc:  # sqlite3.Error, psycopg.Error: the gate retries.
            log.error("decommission_failed", error=repr(exc), **_ids(uplink))
            return
        log.warning("device_decommissioned", **_ids(uplink))
        body = {
            "type": "decommissioned",
            "site": uplink.site,
            "device": uplink.device,
            "district_time": self.clock(),
        }
        payload = encode_message(body, current_key(self._district_key))
        try:
            await self.connection.publish(Topics(uplink.site, uplink.device).acks, payload)
        except NotConnected as exc:
            log.warning("decommission_confirmation_not_sent", error=str(exc), **_ids(uplink))

    def _reject(self, exc: _Rejected, uplink: _Uplink, *, batch_id: str | None) -> None:
        self.rejected[exc.reason] += 1
        if exc.alarm is not None:
            self.alarms[exc.alarm] += 1
            alarm = Alarm(
                AlarmKind(exc.alarm),
                uplink.site,
                (uplink.device,),
                None,
                (),
                {"reason": exc.reason, "batch_id": batch_id or "", "topic_kind": uplink.kind},
                self.clock(),
            )
            self._queue_check(_Check(None, batch_id or "", [], [], None, (alarm,)))
        log.warning(
            "batch_rejected",
            reason=exc.reason,
            alarm=exc.alarm,
            batch_id=batch_id,
            topic_kind=uplink.kind,
            rejected_total=self.rejected[exc.reason],
            **_ids(uplink),
        )

    # --- alarms ---

    def _queue_check(self, check: _Check) -> None:
        if self.alarm_checker is None:
            return
        try:
            self._checks.put_nowait(check)
        except asyncio.QueueFull:
            self.checks_skipped += 1
            log.warning(
                "alarm_check_skipped",
                reason="checks_behind",
                batch_id=check.batch_id,
                pending=self._checks.qsize(),
                skipped_total=self.checks_skipped,
            )

    async def _run_checks(self) -> None:
        """Run the alarm checks of stored batches in order, then publish what they raise."""
        checker = self.alarm_checker
        assert checker is not None
        loop = asyncio.get_running_loop()
        while True:
            check = await self._checks.get()
            try:
                alarms = await loop.run_in_executor(self._alarm_executor, check.run, checker)
                await checker.publish(alarms)
            except Exception as exc:  # sqlite3.Error and the like: logged, the next one runs.
                log.error("alarm_check_failed", batch_id=check.batch_id, error=repr(exc))

    async def _check_silent_gates(self) -> None:
        checker = self.alarm_checker
        assert checker is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.silent_check_interval_s)
            try:
                alarms = await loop.run_in_executor(self._alarm_executor, checker.check_silent)
                await checker.publish(alarms)
            except Exception as exc:  # sqlite3.Error and the like: logged, tried again later.
                log.error("alarm_check_failed", check="device_silent", error=repr(exc))

    def _store_failed(
        self, exc: StoreUnavailable, uplink: _Uplink, *, batch_id: str | None
    ) -> None:
        """Log a message not stored for want of the store. No ack goes out, so the gate sends
        the batch again after its ack timeout."""
        self.store_failures += 1
        log.warning(
            "batch_not_stored",
            reason="store_unavailable",
            error=str(exc),
            batch_id=batch_id,
            topic_kind=uplink.kind,
            failures_total=self.store_failures,
            **_ids(uplink),
        )

    # --- helpers ---

    def _require_store(self) -> HubStoreBackend:
        if self._store is None:
            raise RuntimeError("Hub.run() is not running")
        return self._store

    async def _lookup_device(self, site: str, device_id: str) -> Device | None:
        """Read a gate from the registry. Raises StoreUnavailable if the store is gone."""
        registry = self._registry
        if registry is None:
            raise RuntimeError("Hub.run() is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._registry_executor, registry.get_device, site, device_id
        )

    async def _in_store(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))


@dataclass(frozen=True, slots=True)
class _PendingBatch:
    """A checked batch waiting for the committer, with the topic it came on."""

    uplink: _Uplink
    batch: BatchInsert


@dataclass(frozen=True, slots=True)
class _Check:
    """The alarm work for one stored batch, or for a rejection (``device`` None)."""

    device: Device | None
    batch_id: str
    records: list[WireRecord]
    invalid: list[InvalidRecord]
    result: BatchResult | None
    raised: tuple[Alarm, ...] = ()

    def run(self, checker: AlarmChecker) -> list[Alarm]:
        """Run on the alarm thread: the checks over the batch and the ingest's own alarms."""
        alarms = list(self.raised)
        if self.device is not None and self.result is not None:
            alarms += _ingest_alarms(self.device, self.batch_id, self.invalid, self.result, checker)
        admitted = checker.raise_alarms(alarms)
        if self.device is not None:
            admitted += checker.check_batch(self.device, self.records)
        return admitted


def _ingest_alarms(
    device: Device,
    batch_id: str,
    invalid: list[InvalidRecord],
    result: BatchResult,
    checker: AlarmChecker,
) -> list[Alarm]:
    """Alarms for a stored batch's invalid records, conflicting resends and chain breaks."""
    now = checker.clock()
    found: list[tuple[AlarmKind, tuple[int, ...], dict[str, float | int | str]]] = []
    if invalid:
        seqs = tuple(item.seq for item in invalid if item.seq is not None)
        without_seq = sum(1 for item in invalid if item.seq is None)
        found.append(
            (AlarmKind.BAD_RECORD, seqs, {"invalid": len(invalid), "without_seq": without_seq})
        )
    if result.conflicts:
        found.append((AlarmKind.RECORD_CONFLICT, result.conflicts, {}))
    if result.chain_breaks:
        found.append((AlarmKind.CHAIN_BREAK, result.chain_breaks, {}))
    return [
        Alarm(
            kind,
            device.site,
            (device.device_id,),
            None,
            seqs,
            {"batch_id": batch_id, **detail},
            now,
        )
        for kind, seqs, detail in found
    ]


def _parse_topic(topic: str) -> _Uplink | None:
    """Split ``edgenode/v1/{site}/{device}/up/{kind}``, or return None for any other topic."""
    root = TOPIC_ROOT.split("/")
    parts = topic.split("/")
    if len(parts) != len(root) + 4 or parts[: len(root)] != root:
        return None
    site, device, direction, kind = parts[len(root) :]
    if direction != "up" or not site or not device:
        return None
    return _Uplink(site, device, kind)


def _decode(payload: bytes, device: Device) -> dict[str, Any]:
    """Check the signature against the gate's key and that the body names the same gate."""
    try:
        body = decode_message(payload, trusted(device.public_key))
    except MessageError as exc:
        alarm = ALARM_FORGED_BATCH if exc.reason in _SIGNATURE_REASONS else None
        raise _Rejected(exc.reason, alarm) from exc
    if body.get("site") != device.site or body.get("device") != device.device_id:
        # Signed by this gate's key but naming another gate: never stored under either.
        raise _Rejected("device_mismatch", ALARM_FORGED_BATCH)
    return body


def _gate_alarm_detail(body: dict[str, Any]) -> dict[str, float | int | str]:
    """Return a gate alarm's own fields: numbers, and strings cut to a few hundred characters.

    Gates put only counts, times and file paths in their alarms, never personal data.
    """
    detail: dict[str, float | int | str] = {"alarm": str(body.get("alarm"))[:MAX_DETAIL_CHARS]}
    for key, value in body.items():
        if key in {"type", "site", "device", "alarm"} or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            detail[key] = value
        elif isinstance(value, str):
            detail[key] = value[:MAX_DETAIL_CHARS]
    return detail


def _ids(uplink: _Uplink) -> dict[str, str]:
    return {"site": uplink.site, "device": uplink.device}
