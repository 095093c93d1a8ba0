"""The uplink: journal records to the district, with the journal itself as the outbox.

A record leaves the outbox only when the district's signed ``ack`` for a batch that carried it
arrives. A PUBACK from the broker does not count. Until then it is sent again after
``ack_timeout_s``, in a batch with a new ``batch_id``, so the district may receive a record
more than once and drops duplicates by (device, seq). Deny verdicts go first, on the priority
topic. Draining a backlog is rate-limited by a token bucket, and at most ``WINDOW_BATCHES``
batches wait for their ack at once, so an unreachable district costs one window per
``ack_timeout_s`` and not the whole backlog.

The uplink opens its own SQLite connection to the journal file (WAL lets the daemon's pipeline
thread append meanwhile) and uses it from one worker thread only.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import structlog
from nacl.signing import SigningKey

from edgenode.config import Config, SyncConfig
from edgenode.district_trust import DistrictTrust, unknown_signer_fields
from edgenode.journal import Journal, JournalError, OutboxRecord
from sync.connection import Connection, ConnectionState, NotConnected
from sync.protocol import MessageError, decode_message, encode_message

log = structlog.get_logger("sync.uplink")

T = TypeVar("T")

STATE_FILE_NAME = "sync-state.json"
LANE_NORMAL = "normal"
LANE_PRIORITY = "priority"
# Batches that may wait for their ack at the same time.
WINDOW_BATCHES = 8
# How often the uplink looks for new records when notify() is not called.
POLL_INTERVAL_S = 0.5
# How often the backlog is counted, the outbox bound checked and the state file written.
STATUS_INTERVAL_S = 2.0
# Acked batch ids remembered to tell a replayed ack from an unknown one.
ACKED_IDS_KEPT = 4096
# The outbox_full alarm clears when the backlog falls below this share of the bound.
ALARM_CLEAR_RATIO = 0.9
# Repeated clock_skew alarms are logged once per this interval.
SKEW_LOG_INTERVAL_S = 300.0
TEST_KILL_ENV = "EDGENODE_TEST_KILL_AT"
# Pause after a journal error before the next try.
ERROR_RETRY_S = 1.0

_kill_counts: dict[str, int] = {}


def _test_hook(phase: str) -> None:
    """Kill this process with SIGKILL at a publish phase, for the crash tests only.

    ``EDGENODE_TEST_KILL_AT=phase:n`` kills at the n-th time the uplink reaches ``phase``
    (before_publish, after_publish or after_ack). Unset in production, where this does nothing.
    """
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec:
        return
    wanted, _, count = spec.partition(":")
    if wanted != phase:
        return
    _kill_counts[phase] = _kill_counts.get(phase, 0) + 1
    if _kill_counts[phase] >= int(count or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


def seq_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Compress sequence numbers into inclusive ranges: 1, 2, 3, 7 becomes [[1, 3], [7, 7]]."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def expand_ranges(ranges: object, limit: int) -> set[int]:
    """Expand inclusive [first, last] ranges into seqs. Raises ValueError on a malformed list."""
    if not isinstance(ranges, list):
        raise ValueError("seqs is not a list")
    seqs: set[int] = set()
    for item in ranges:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in item)
            or item[0] > item[1]
        ):
            raise ValueError("a seqs range is not [first, last]")
        if item[1] - item[0] + 1 + len(seqs) > limit:
            raise ValueError(f"seqs name more than {limit} records")
        seqs.update(range(item[0], item[1] + 1))
    return seqs


def record_body(item: OutboxRecord, sent_at: float) -> dict[str, Any]:
    """Build the JSON form of one record in a batch (docs/mqtt.md, "batch")."""
    record = item.record
    body: dict[str, Any] = {
        "seq": record.seq,
        "kind": record.kind,
        "recorded_at": record.recorded_at,
        "age_s": round(sent_at - record.recorded_at, 3),
        "station": record.station,
        "verdict": record.verdict,
        "reasons": list(record.reasons),
        "health_subject": record.health_subject,
        "community_subject": record.community_subject,
        "latency_ms": record.latency_ms,
        "clock_trusted": record.clock_trusted,
        "prev_hash": item.prev_hash.hex(),
        "hash": item.hash.hex(),
    }
    # Sent only when set, like in the hash chain: "method" on a check by ID number, and
    # "verdict_seq" and "guard_id" on an override.
    for name in ("method", "verdict_seq", "guard_id"):
        value = getattr(record, name)
        if value is not None:
            body[name] = value
    return body


class TokenBucket:
    """Allow ``rate`` tokens per second on average, in bursts of at most ``capacity``."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._updated = time.monotonic()

    async def take(self, count: int) -> None:
        """Wait until ``count`` tokens are available, then spend them."""
        count = min(count, int(self.capacity))
        while True:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= count:
                self._tokens -= count
                return
            await asyncio.sleep((count - self._tokens) / self.rate)


@dataclass(slots=True)
class _Batch:
    batch_id: str
    lane: str
    seqs: frozenset[int]
    sent_monotonic: float


@dataclass(slots=True)
class UplinkStatus:
    """The uplink's status, as ``status()`` returns it and ``edgenode sync status`` prints it."""

    connection_state: str
    last_error: str | None
    state_changed_at: float
    backlog: int
    oldest_unacked_seq: int | None
    oldest_unacked_age_s: float | None
    last_ack_at: float | None
    clock_skew_s: float | None
    outbox_alarm: bool
    in_flight_batches: int
    updated_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "connection_state": self.connection_state,
            "last_error": self.last_error,
            "state_changed_at": self.state_changed_at,
            "backlog": self.backlog,
            "oldest_unacked_seq": self.oldest_unacked_seq,
            "oldest_unacked_age_s": self.oldest_unacked_age_s,
            "last_ack_at": self.last_ack_at,
            "clock_skew_s": self.clock_skew_s,
            "outbox_alarm": self.outbox_alarm,
            "in_flight_batches": self.in_flight_batches,
            "updated_at": self.updated_at,
        }


class Uplink:
    """Send the journal's unacked records to the district and mark them on its signed acks.

    Construct it before ``connection.run()`` starts, so the ack topic is subscribed on the
    first connect, then run ``run()`` next to ``connection.run()``.
    """

    def __init__(
        self,
        connection: Connection,
        journal_path: Path,
        *,
        device_key: SigningKey,
        district_keys: Sequence[bytes] | DistrictTrust,
        sync: SyncConfig,
        state_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.topics = connection.topics
        self.journal_path = journal_path
        self.sync = sync
        self.state_path = state_path
        self.clock = clock
        self._device_key = device_key
        self.trust = (
            district_keys
            if isinstance(district_keys, DistrictTrust)
            else DistrictTrust(district_keys)
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink-journal")
        self._journal: Journal | None = None
        self._outstanding: dict[str, _Batch] = {}
        self._in_flight: set[int] = set()
        self._acked_ids: OrderedDict[str, None] = OrderedDict()
        self._resend: list[tuple[str, frozenset[int]]] = []
        self._normal_cursor = 0
        self._priority_cursor = 0
        self._bucket = TokenBucket(sync.drain_records_per_s, float(sync.batch_max_records))
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alarm_raised = False
        self._alarm_pending = False
        self._clock_skew_s: float | None = None
        self._skew_logged_at = 0.0
        # Alarm bodies waiting for a connection, oldest first.
        self._pending_alarms: list[dict[str, Any]] = []
        self._status = UplinkStatus(
            connection_state=connection.state.value,
            last_error=None,
            state_changed_at=connection.state_changed_at,
            backlog=0,
            oldest_unacked_seq=None,
            oldest_unacked_age_s=None,
            last_ack_at=None,
            clock_skew_s=None,
            outbox_alarm=False,
            in_flight_batches=0,
        )
        self.rejected_acks: dict[str, int] = {}
        connection.subscribe(self.topics.acks, self._on_ack)
        connection.add_state_listener(self._on_connection_state)

    @classmethod
    def from_config(
        cls,
        config: Config,
        connection: Connection,
        device_key: SigningKey,
        trust: DistrictTrust | None = None,
    ) -> Uplink:
        """Build the uplink. Without ``trust``, acks are verified with the config's keys and
        the district keys announced in the config's cache."""
        return cls(
            connection,
            config.journal_path,
            device_key=device_key,
            district_keys=trust
            or DistrictTrust(config.trust.district_key_bytes(), config.cache_path),
            sync=config.sync,
            state_path=config.device.state_dir / STATE_FILE_NAME,
        )

    # --- public interface ---

    def notify(self) -> None:
        """Wake the sender because a record was appended. Safe to call from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def on_verdict(self, event: object) -> None:
        """Wake the sender for a new verdict; pass it to ``Daemon(listeners=[...])``."""
        self.notify()

    def status(self) -> UplinkStatus:
        """Return the latest status: the live connection state, the journal figures as of the
        last refresh (at most STATUS_INTERVAL_S old while ``run()`` runs)."""
        status = self._status
        status.connection_state = self.connection.state.value
        status.last_error = self.connection.last_error
        status.state_changed_at = self.connection.state_changed_at
        status.clock_skew_s = self._clock_skew_s
        status.outbox_alarm = self._alarm_raised
        status.in_flight_batches = len(self._outstanding)
        return status

    async def run(self) -> None:
        """Send until cancelled. Run it next to ``connection.run()``."""
        self._loop = asyncio.get_running_loop()
        self._journal = await self._in_journal(Journal, self.journal_path, self.topics.device)
        try:
            await self.refresh_status()
            sender = asyncio.create_task(self._send_loop(), name="uplink-sender")
            monitor = asyncio.create_task(self._monitor_loop(), name="uplink-monitor")
            try:
                await asyncio.gather(sender, monitor)
            finally:
                sender.cancel()
                monitor.cancel()
                await asyncio.gather(sender, monitor, return_exceptions=True)
        finally:
            journal = self._journal
            self._journal = None
            await asyncio.get_running_loop().run_in_executor(self._executor, journal.close)
            self._executor.shutdown(wait=False)

    async def refresh_status(self) -> UplinkStatus:
        """Read the backlog figures from the journal, then return ``status()``."""
        journal = self._require_journal()

        def read() -> tuple[int, int | None, float | None, float | None]:
            oldest = journal.oldest_unacked()
            return (
                journal.backlog_count(),
                None if oldest is None else oldest.seq,
                None if oldest is None else oldest.recorded_at,
                journal.last_ack_at(),
            )

        backlog, oldest_seq, oldest_at, last_ack_at = await self._in_journal(read)
        status = self._status
        status.backlog = backlog
        status.oldest_unacked_seq = oldest_seq
        status.oldest_unacked_age_s = (
            None if oldest_at is None else round(self.clock() - oldest_at, 3)
        )
        status.last_ack_at = last_ack_at
        status.updated_at = self.clock()
        return self.status()

    # --- sending ---

    async def _send_loop(self) -> None:
        while True:
            await self.connection.wait_connected()
            # Cleared before the journal is read, so a wake-up during the send is kept.
            self._wake.clear()
            try:
                sent = await self._send_some()
            except NotConnected as exc:
                log.info("uplink_paused", reason=str(exc))
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            except (sqlite3.Error, JournalError) as exc:
                # Unacked records stay in the journal, so the next round sends them.
                log.error("uplink_journal_read_failed", error=repr(exc))
                await asyncio.sleep(ERROR_RETRY_S)
                continue
            if sent:
                continue
            # asyncio.wait, unlike wait_for in Python 3.11, never swallows a cancellation.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((waiter,), timeout=self._idle_wait_s())
            finally:
                waiter.cancel()

    def _idle_wait_s(self) -> float:
        if not self._outstanding:
            return POLL_INTERVAL_S
        oldest = min(batch.sent_monotonic for batch in self._outstanding.values())
        due_in = oldest + self.sync.ack_timeout_s - time.monotonic()
        return max(0.01, min(POLL_INTERVAL_S, due_in))

    async def _send_some(self) -> bool:
        """Send one batch if any is due; return whether one was sent."""
        journal = self._require_journal()
        batch_max = self.sync.batch_max_records
        self._expire_batches()

        # Resends of batches whose ack timed out, in the lane they were first sent in.
        while self._resend:
            lane, seqs = self._resend.pop(0)
            items = await self._in_journal(journal.records_by_seq, seqs)
            items = [item for item in items if item.record.seq not in self._in_flight]
            if items:
                if lane == LANE_NORMAL:
                    await self._bucket.take(len(items))
                await self._publish_batch(lane, items)
                return True

        # Deny verdicts overtake the normal lane's backlog.
        denies = await self._in_journal(
            journal.unacked_records,
            batch_max + len(self._in_flight),
            after_seq=self._priority_cursor,
            deny_only=True,
        )
        fresh_denies = [item for item in denies if item.record.seq not in self._in_flight]
        if fresh_denies:
            fresh_denies = fresh_denies[:batch_max]
            self._priority_cursor = fresh_denies[-1].record.seq
            await self._publish_batch(LANE_PRIORITY, fresh_denies)
            return True

        if len(self._outstanding) >= WINDOW_BATCHES:
            return False
        page = await self._in_journal(
            journal.unacked_records, batch_max, after_seq=self._normal_cursor
        )
        if not page:
            return False
        self._normal_cursor = page[-1].record.seq
        items = [item for item in page if item.record.seq not in self._in_flight]
        if not items:
            return True
        await self._bucket.take(len(items))
        await self._publish_batch(LANE_NORMAL, items)
        return True

    def _expire_batches(self) -> None:
        now = time.monotonic()
        for batch_id, batch in list(self._outstanding.items()):
            if now - batch.sent_monotonic < self.sync.ack_timeout_s:
                continue
            self._forget_batch(batch_id)
            self._resend.append((batch.lane, batch.seqs))
            log.info(
                "batch_ack_timeout",
                batch_id=batch_id,
                lane=batch.lane,
                records=len(batch.seqs),
                first_seq=min(batch.seqs),
            )

    def _forget_batch(self, batch_id: str) -> _Batch | None:
        batch = self._outstanding.pop(batch_id, None)
        if batch is not None:
            self._in_flight.difference_update(batch.seqs)
        return batch

    async def _publish_batch(self, lane: str, items: list[OutboxRecord]) -> None:
        batch_id = secrets.token_hex(16)
        sent_at = self.clock()
        body = {
            "type": "batch",
            "site": self.topics.site,
            "device": self.topics.device,
            "batch_id": batch_id,
            "sent_at": sent_at,
            "lane": lane,
            "records": [record_body(item, sent_at) for item in items],
        }
        payload = encode_message(body, self._device_key)
        seqs = frozenset(item.record.seq for item in items)
        # Registered before the publish, because the ack may arrive before publish() returns.
        self._outstanding[batch_id] = _Batch(batch_id, lane, seqs, time.monotonic())
        self._in_flight.update(seqs)
        topic = self.topics.priority if lane == LANE_PRIORITY else self.topics.batches
        _test_hook("before_publish")
        try:
            await self.connection.publish(topic, payload, qos=1)
        except NotConnected:
            if self._forget_batch(batch_id) is not None:
                self._resend.append((lane, seqs))
            raise
        _test_hook("after_publish")
        log.debug(
            "batch_sent", batch_id=batch_id, lane=lane, records=len(items), bytes=len(payload)
        )

    # --- acks ---

    async def _on_ack(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes):
            self._reject_ack("bad_body", None)
            return
        try:
            body = decode_message(payload, self.trust.key_ids())
        except MessageError as exc:
            self._reject_ack(exc.reason, None)
            return
        batch_id = body.get("batch_id")
        if body.get("type") != "ack" or not isinstance(batch_id, str):
            self._reject_ack("bad_body", None)
            return
        if body.get("site") != self.topics.site or body.get("device") != self.topics.device:
            self._reject_ack("other_device", batch_id)
            return
        if batch_id in self._acked_ids:
            self._reject_ack("replayed", batch_id)
            return
        batch = self._outstanding.get(batch_id)
        if batch is None:
            self._reject_ack("unknown_batch", batch_id)
            return
        try:
            span = max(batch.seqs) - min(batch.seqs) + 1
            acked = expand_ranges(body.get("seqs"), span) & batch.seqs
        except ValueError:
            self._reject_ack("bad_body", batch_id)
            return
        district_time = body.get("district_time")
        _test_hook("after_ack")
        journal = self._require_journal()
        try:
            await self._in_journal(journal.mark_acked, acked, self.clock())
        except (sqlite3.Error, JournalError) as exc:
            # The batch stays outstanding: it times out and is sent again, and the next ack
            # is committed then. The district drops the duplicate records.
            log.error("ack_commit_failed", batch_id=batch_id, error=repr(exc))
            return
        self._forget_batch(batch_id)
        missing = batch.seqs - acked
        if missing:
            # The district stored only part of the batch: send the rest again at once.
            self._resend.append((batch.lane, frozenset(missing)))
        self._acked_ids[batch_id] = None
        while len(self._acked_ids) > ACKED_IDS_KEPT:
            self._acked_ids.popitem(last=False)
        if isinstance(district_time, int | float) and not isinstance(district_time, bool):
            self._check_clock(float(district_time))
        self._wake.set()

    def _reject_ack(self, reason: str, batch_id: str | None) -> None:
        self.rejected_acks[reason] = self.rejected_acks.get(reason, 0) + 1
        explanation = unknown_signer_fields(self.trust) if reason == "unknown_signer" else {}
        log.warning(
            "ack_rejected",
            reason=reason,
            batch_id=batch_id,
            rejected_total=self.rejected_acks[reason],
            **explanation,
        )

    def _check_clock(self, district_time: float) -> None:
        skew = round(self.clock() - district_time, 3)
        self._clock_skew_s = skew
        if abs(skew) <= self.sync.clock_skew_alarm_s:
            return
        now = time.monotonic()
        if now - self._skew_logged_at >= SKEW_LOG_INTERVAL_S or self._skew_logged_at == 0:
            self._skew_logged_at = now
            log.error("clock_skew", skew_s=skew, limit_s=self.sync.clock_skew_alarm_s)

    # --- the outbox bound and the state file ---

    async def _monitor_loop(self) -> None:
        while True:
            try:
                status = await self.refresh_status()
            except (sqlite3.Error, JournalError) as exc:
                log.error("uplink_journal_read_failed", error=repr(exc))
            else:
                await self._check_outbox_bound(status.backlog)
            await self._send_pending_alarms()
            self._write_state_file()
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _check_outbox_bound(self, backlog: int) -> None:
        bound = self.sync.outbox_alarm_records
        if not self._alarm_raised and backlog >= bound:
            self._alarm_raised = True
            self._alarm_pending = True
            log.error("outbox_full", backlog=backlog, bound=bound)
        elif self._alarm_raised and backlog < bound * ALARM_CLEAR_RATIO:
            self._alarm_raised = False
            self._alarm_pending = False
            log.info("outbox_recovered", backlog=backlog, bound=bound)
        if self._alarm_pending and self.connection.connected:
            body = {
                "type": "alarm",
                "alarm": "outbox_full",
                "site": self.topics.site,
                "device": self.topics.device,
                "raised_at": self.clock(),
                "backlog": backlog,
                "bound": bound,
            }
            try:
                await self.connection.publish(
                    self.topics.priority, encode_message(body, self._device_key), qos=1
                )
            except NotConnected:
                return  # Sent at the next check while the alarm is still raised.
            self._alarm_pending = False

    def raise_alarm(self, fields: dict[str, str]) -> None:
        """Queue a gate alarm such as {"alarm": "file_corrupt", ...} for the priority topic.

        It is sent at the next status check while connected. Queued alarms live in memory
        only, so one raised just before a crash is lost upstream but stays in the log.
        """
        body: dict[str, Any] = {
            "type": "alarm",
            "site": self.topics.site,
            "device": self.topics.device,
            "raised_at": self.clock(),
            **fields,
        }
        self._pending_alarms.append(body)
        log.error("gate_alarm_raised", **fields)

    async def _send_pending_alarms(self) -> None:
        while self._pending_alarms and self.connection.connected:
            body = self._pending_alarms[0]
            try:
                await self.connection.publish(
                    self.topics.priority, encode_message(body, self._device_key), qos=1
                )
            except NotConnected:
                return  # Sent at the next check.
            self._pending_alarms.pop(0)
            log.info("gate_alarm_sent", alarm=body.get("alarm"))

    def _on_connection_state(self, state: ConnectionState) -> None:
        self._write_state_file()
        if state is ConnectionState.CONNECTED:
            self._wake.set()

    def _write_state_file(self) -> None:
        if self.state_path is None:
            return
        state = self.status().as_dict()
        state["pid"] = os.getpid()
        state["written_at"] = time.time()
        temporary = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
            temporary.replace(self.state_path)
        except OSError as exc:
            log.warning("sync_state_write_failed", path=str(self.state_path), error=str(exc))

    # --- helpers ---

    def _require_journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("Uplink.run() is not running")
        return self._journal

    async def _in_journal(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))
