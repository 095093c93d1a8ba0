"""District alarms over the hub's store: red codes, shared codes, silent gates, stale caches.

The checks are pure functions over stored records. ``AlarmChecker`` runs them over the store,
after each stored batch (``check_batch``) or on a timer (``check_silent``, ``check_since``),
then drops repeats, logs each alarm as ``alarm_raised`` and publishes it, signed with the
district key, on ``edgenode/v1/{site}/district/alarms`` when it has a connection.

Alarm kinds:

- ``red_code``: a deny whose reasons include ``health_red``, unless the code's signature was
  not verified (``UNVERIFIED_REASONS``).
- ``code_sharing``: one community subject admitted at two different gates of a site within
  ``sharing_window_s`` of each other, by the gates' ``recorded_at``.
- ``device_silent``: a registered, enabled gate whose last record arrived (``received_at``)
  more than ``silent_after_s`` ago, or that has sent no record since it was registered.
- ``stale_cache``: a gate whose records carry the reason ``cache_stale``.

The hub's ingest raises five more through ``AlarmChecker.raise_alarms``: ``unknown_device``
(a batch from a gate not in the registry, or disabled), ``forged_batch`` (a bad signature, or
a gate's key signing for another gate), ``bad_record`` (records that failed validation),
``record_conflict`` (a seq sent again with another hash) and ``chain_break`` (a record whose
hash chain does not link to its stored neighbours). Its enrollment raises ``enroll_rejected``
for an enroll request with an unknown, used or expired token, or with a bad signature.

Logs and messages name subjects only by the pseudonymous hex that gates send, and never
carry a payload.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from edgenode.district_keyring import DistrictKeySource, current_key
from sync.connection import Connection, NotConnected
from sync.hub_store import Device, WireRecord
from sync.protocol import TOPIC_ROOT, encode_message
from sync.report import StoredRecord, open_store_reader
from sync.store_backend import StoreLocation

log = structlog.get_logger("sync.alarms")

SHARING_WINDOW_S = 600.0
SILENT_AFTER_S = 3600.0
REPEAT_INTERVAL_S = 600.0
REASON_HEALTH_RED = "health_red"
REASON_CACHE_STALE = "cache_stale"
# A red colour read from a code whose signature was not verified is only a claim: it raises
# no red_code alarm, because anyone can print a red code naming someone else's subject.
UNVERIFIED_REASONS = frozenset({"unknown_issuer", "issuer_key_not_valid", "bad_signature"})


class AlarmKind(StrEnum):
    RED_CODE = "red_code"
    CODE_SHARING = "code_sharing"
    DEVICE_SILENT = "device_silent"
    STALE_CACHE = "stale_cache"
    # Raised by the hub's ingest (sync/hub.py) rather than by the checks over stored records.
    UNKNOWN_DEVICE = "unknown_device"
    FORGED_BATCH = "forged_batch"
    BAD_RECORD = "bad_record"
    RECORD_CONFLICT = "record_conflict"
    CHAIN_BREAK = "chain_break"
    # Raised by the hub's enrollment (sync/enrollment.py): a rejected enroll request.
    ENROLL_REJECTED = "enroll_rejected"
    # An alarm a gate raised itself (outbox_full, file_corrupt), passed on with its fields.
    GATE_ALARM = "gate_alarm"


def alarm_topic(site: str) -> str:
    """Return the topic of the district's alarms about one site."""
    return f"{TOPIC_ROOT}/{site}/district/alarms"


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm. ``devices`` names the gates involved, two of them for code sharing.

    ``subject`` is the pseudonymous hex of the health subject (red code) or the community
    subject (code sharing), as the gate sent it. ``seqs`` are the records' seqs, in the order
    of ``devices``. ``detail`` contains numbers that explain the alarm, such as the seconds
    between two admits.
    """

    kind: AlarmKind
    site: str
    devices: tuple[str, ...]
    subject: str | None
    seqs: tuple[int, ...]
    detail: dict[str, float | int | str] = field(hash=False, compare=False)
    raised_at: float = field(compare=False)

    @property
    def device(self) -> str:
        return self.devices[0]

    @property
    def key(self) -> tuple[str, ...]:
        """What makes two alarms the same, for the repeat limit.

        A red code repeats per gate and subject, a shared code per subject and pair of gates,
        and a silent gate or a stale cache per gate.
        """
        if self.kind is AlarmKind.RED_CODE:
            subject = self.subject if self.subject is not None else f"seq:{self.seqs[0]}"
            return (self.kind, self.site, self.device, subject)
        if self.kind is AlarmKind.CODE_SHARING:
            return (self.kind, self.site, *sorted(self.devices), self.subject or "")
        if self.kind is AlarmKind.GATE_ALARM:
            return (self.kind, self.site, self.device, str(self.detail.get("alarm", "")))
        return (self.kind, self.site, self.device)

    def log_fields(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "site": self.site,
            "device": self.device,
            "devices": list(self.devices),
            "subject": self.subject,
            "seqs": list(self.seqs),
            **self.detail,
        }

    def message(self) -> dict[str, Any]:
        """Return the body of the signed ``alarm`` message."""
        return {
            "type": "alarm",
            "alarm": str(self.kind),
            "site": self.site,
            "device": self.device,
            "devices": list(self.devices),
            "subject": self.subject,
            "seqs": list(self.seqs),
            "detail": dict(self.detail),
            "raised_at": self.raised_at,
        }


# --- pure checks ---


def red_code_alarms(records: Iterable[StoredRecord], now: float) -> list[Alarm]:
    """Raise one ``red_code`` alarm per deny that carries the reason ``health_red``."""
    return [
        Alarm(
            AlarmKind.RED_CODE,
            record.site,
            (record.device,),
            record.health_subject,
            (record.seq,),
            {"recorded_at": record.recorded_at, "station": record.station},
            now,
        )
        for record in records
        if record.verdict == "deny"
        and REASON_HEALTH_RED in record.reasons
        and not UNVERIFIED_REASONS.intersection(record.reasons)
    ]


def stale_cache_alarms(records: Iterable[StoredRecord], now: float) -> list[Alarm]:
    """Raise one ``stale_cache`` alarm per gate, for its latest record with ``cache_stale``."""
    latest: dict[tuple[str, str], StoredRecord] = {}
    for record in records:
        if REASON_CACHE_STALE not in record.reasons:
            continue
        gate = (record.site, record.device)
        if gate not in latest or record.recorded_at >= latest[gate].recorded_at:
            latest[gate] = record
    return [
        Alarm(
            AlarmKind.STALE_CACHE,
            site,
            (device,),
            None,
            (record.seq,),
            {"recorded_at": record.recorded_at},
            now,
        )
        for (site, device), record in sorted(latest.items())
    ]


def code_sharing_alarms(
    admits: Iterable[StoredRecord], now: float, window_s: float = SHARING_WINDOW_S
) -> list[Alarm]:
    """Raise ``code_sharing`` for admits of one community subject at two gates of a site.

    Two admits count when they are at most ``window_s`` apart. Each pair of gates is reported
    once per subject, for the closest two admits. Records that are not admits, or that
    carry no community subject, are ignored.
    """
    by_subject: dict[tuple[str, str], list[StoredRecord]] = {}
    for record in admits:
        if record.verdict == "admit" and record.community_subject:
            by_subject.setdefault((record.site, record.community_subject), []).append(record)

    closest: dict[tuple[str, str, str, str], tuple[float, StoredRecord, StoredRecord]] = {}
    for (site, subject), records in by_subject.items():
        records.sort(key=lambda record: record.recorded_at)
        for index, earlier in enumerate(records):
            for later in records[index + 1 :]:
                gap = later.recorded_at - earlier.recorded_at
                if gap > window_s:
                    break
                if later.device == earlier.device:
                    continue
                first_gate, second_gate = sorted((earlier.device, later.device))
                pair = (site, subject, first_gate, second_gate)
                best = closest.get(pair)
                if best is None or gap < best[0]:
                    closest[pair] = (gap, earlier, later)

    return [
        Alarm(
            AlarmKind.CODE_SHARING,
            earlier.site,
            (later.device, earlier.device),
            earlier.community_subject,
            (later.seq, earlier.seq),
            {"gap_s": round(gap, 3), "window_s": window_s},
            now,
        )
        for gap, earlier, later in (closest[pair] for pair in sorted(closest))
    ]


def silent_device_alarms(
    gates: Iterable[tuple[str, str, bool, float, float | None]],
    now: float,
    silent_after_s: float = SILENT_AFTER_S,
) -> list[Alarm]:
    """Raise ``device_silent`` for enabled gates with no record for more than ``silent_after_s``.

    ``gates`` contains (site, device, enabled, registered_at, last received_at or None). A gate
    that never sent a record is judged from the time it was registered. Disabled gates are
    never silent.
    """
    alarms = []
    for site, device, enabled, registered_at, last_received in gates:
        if not enabled:
            continue
        since = registered_at if last_received is None else last_received
        silent_s = now - since
        if silent_s > silent_after_s:
            detail: dict[str, float | int | str] = {
                "silent_s": round(silent_s, 1),
                "limit_s": silent_after_s,
            }
            if last_received is not None:
                detail["last_received_at"] = last_received
            alarms.append(Alarm(AlarmKind.DEVICE_SILENT, site, (device,), None, (), detail, now))
    return alarms


# --- the checker over the store ---


class AlarmChecker:
    """Run the alarm checks over a hub store, drop repeats, log and publish what is left.

    The same alarm (``Alarm.key``) is raised at most once per ``repeat_interval_s``.
    Repeats dropped are counted in ``suppressed`` by kind. The check methods read the store
    and block, so an asyncio caller runs them in an executor. Use one thread at a time.
    """

    def __init__(
        self,
        store_path: StoreLocation,
        *,
        sharing_window_s: float = SHARING_WINDOW_S,
        silent_after_s: float = SILENT_AFTER_S,
        repeat_interval_s: float = REPEAT_INTERVAL_S,
        connection: Connection | None = None,
        district_key: DistrictKeySource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if connection is not None and district_key is None:
            raise ValueError("publishing alarms needs the district key to sign them")
        self.sharing_window_s = sharing_window_s
        self.silent_after_s = silent_after_s
        self.repeat_interval_s = repeat_interval_s
        self.connection = connection
        self.clock = clock
        self._district_key = district_key
        self._reader = open_store_reader(store_path)
        self._last_raised: dict[tuple[str, ...], float] = {}
        self.suppressed: Counter[str] = Counter()
        self.published = 0

    def close(self) -> None:
        self._reader.close()

    def check_batch(self, device: Device, records: Sequence[WireRecord]) -> list[Alarm]:
        """Check the records of a batch that the hub has just stored for ``device``."""
        now = self.clock()
        stored = [_from_wire(device, record, now) for record in records if record.kind == "verdict"]
        alarms = red_code_alarms(stored, now) + stale_cache_alarms(stored, now)
        alarms += self._sharing_alarms(stored, now)
        return self._admit(alarms)

    def check_silent(self) -> list[Alarm]:
        """Check every registered gate for silence. Run on a timer."""
        now = self.clock()
        alarms = silent_device_alarms(self._reader.last_received(), now, self.silent_after_s)
        return self._admit(alarms)

    def check_since(self, since: float, *, site: str | None = None) -> list[Alarm]:
        """Run every check over the records received since ``since``, and for silent gates."""
        now = self.clock()
        records = self._reader.records(time_column="received_at", start=since, site=site)
        alarms = red_code_alarms(records, now) + stale_cache_alarms(records, now)
        alarms += code_sharing_alarms(records, now, self.sharing_window_s)
        gates = [gate for gate in self._reader.last_received() if site is None or gate[0] == site]
        alarms += silent_device_alarms(gates, now, self.silent_after_s)
        return self._admit(alarms)

    def raise_alarms(self, alarms: Iterable[Alarm]) -> list[Alarm]:
        """Apply the repeat limit to alarms raised elsewhere, log them and return the rest."""
        return self._admit(alarms)

    async def publish(self, alarms: Iterable[Alarm]) -> int:
        """Publish alarms, signed, on their site's alarm topic. Return how many were sent.

        Without a connection nothing is sent. An alarm that cannot be sent is logged as
        ``alarm_not_sent`` and not retried: it stays in the log.
        """
        if self.connection is None or self._district_key is None:
            return 0
        sent = 0
        for alarm in alarms:
            payload = encode_message(alarm.message(), current_key(self._district_key))
            try:
                await self.connection.publish(alarm_topic(alarm.site), payload)
            except NotConnected as exc:
                log.warning(
                    "alarm_not_sent",
                    kind=str(alarm.kind),
                    site=alarm.site,
                    device=alarm.device,
                    error=str(exc),
                )
                continue
            sent += 1
        self.published += sent
        return sent

    def _sharing_alarms(self, stored: Sequence[StoredRecord], now: float) -> list[Alarm]:
        """Look up the other admits of each new admit's community subject in the store.

        Each subject's window is centred on its first admit in the batch. The store is read
        once per site for all the batch's subjects, because a query per subject cost more
        than storing the batch.
        """
        window = self.sharing_window_s
        firsts: dict[tuple[str, str], StoredRecord] = {}
        in_batch: dict[str, list[StoredRecord]] = {}
        for record in stored:
            subject = record.community_subject
            if not subject:
                continue
            in_batch.setdefault(subject, []).append(record)
            if record.verdict == "admit":
                firsts.setdefault((record.site, subject), record)

        fetched: dict[tuple[str, str], list[StoredRecord]] = {}
        for site in sorted({site for site, _ in firsts}):
            subjects = [subject for key_site, subject in firsts if key_site == site]
            times = [firsts[(site, subject)].recorded_at for subject in subjects]
            found = self._reader.admits_of_subjects(
                site, subjects, min(times) - window, max(times) + window
            )
            for admit in found:
                fetched.setdefault((site, str(admit.community_subject)), []).append(admit)

        alarms: list[Alarm] = []
        for (site, subject), record in firsts.items():
            nearby = [
                admit
                for admit in fetched.get((site, subject), [])
                if abs(admit.recorded_at - record.recorded_at) <= window
            ]
            # The store has the batch already, but the new records are added in case it
            # was checked before its commit. Duplicates by (site, device, seq) are dropped.
            same_subject = in_batch[subject]
            unique = {(r.site, r.device, r.seq): r for r in [*nearby, *same_subject]}
            involved = [
                alarm
                for alarm in code_sharing_alarms(unique.values(), now, window)
                if record.device in alarm.devices
            ]
            alarms += involved
        return alarms

    def _admit(self, alarms: Iterable[Alarm]) -> list[Alarm]:
        """Drop repeats within the repeat interval, log the rest, and return them."""
        raised = []
        for alarm in alarms:
            key = alarm.key
            last = self._last_raised.get(key)
            if last is not None and alarm.raised_at - last < self.repeat_interval_s:
                self.suppressed[str(alarm.kind)] += 1
                continue
            self._last_raised[key] = alarm.raised_at
            raised.append(alarm)
            log.warning("alarm_raised", **alarm.log_fields())
        self._forget_before(self.clock() - self.repeat_interval_s)
        return raised

    def _forget_before(self, cutoff: float) -> None:
        """Drop repeat-limit entries older than the interval, so the table stays small."""
        stale = [key for key, raised_at in self._last_raised.items() if raised_at < cutoff]
        for key in stale:
            del self._last_raised[key]


def _from_wire(device: Device, record: WireRecord, received_at: float) -> StoredRecord:
    return StoredRecord(
        site=device.site,
        device=device.device_id,
        seq=record.seq,
        verdict=record.verdict,
        reasons=tuple(record.reasons),
        health_subject=record.health_subject,
        community_subject=record.community_subject,
        recorded_at=record.recorded_at,
        received_at=received_at,
        station=record.station,
    )
