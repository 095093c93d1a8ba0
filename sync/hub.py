"""The district hub's ingest: gate batches from MQTT into the hub's SQLite store, then acks.

Every hub process joins the shared subscription ``$share/edgenode-hub/edgenode/v1/+/+/up/#``,
so the broker gives each uplink message to one of them. For each batch the hub

1. looks up the gate by the topic's site and device in the registry,
2. checks the batch signature against that gate's public key,
3. stores the records in one transaction, dropping those already stored, and
4. only after the commit publishes a signed ``ack`` for every seq of the batch, since each one
   is then stored, either now or earlier.

A batch from an unknown or disabled gate, or one that fails the signature check, is rejected
and never stored. The connection sends the PUBACK only after the handler returns, but a hub
that dies before its commit does not get the message back from the broker: Mosquitto keeps
it in the dead client's session. The gate sends the batch again after its ack timeout, and
another hub stores it then.

Hubs connect with a session expiry of 0: Mosquitto 2.0.11 keeps giving a stopped member's
session its share of a shared subscription until the session expires (a probe with one live
and one disconnected member: the live one got 5 of 10 messages), and each such batch would
wait one more ack timeout at its gate.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import structlog
from nacl.signing import SigningKey

from edgenode.config import SyncConfig
from sync.connection import Connection, NotConnected
from sync.hub_store import Device, HubStore, WireRecord, parse_records
from sync.protocol import (
    TOPIC_ROOT,
    MessageError,
    Topics,
    decode_message,
    encode_message,
    hub_uplink_subscription,
    trusted,
)
from sync.uplink import seq_ranges

log = structlog.get_logger("sync.hub")

T = TypeVar("T")

# The hub's own status topic is edgenode/v1/{HUB_SITE}/hub-{hub_id}/status.
HUB_SITE = "district"
LANES = frozenset({"normal", "priority"})
# Alarms counted for rejected batches. A disabled gate counts as unknown_device, because it
# is not an enabled member of the registry.
ALARM_UNKNOWN_DEVICE = "unknown_device"
ALARM_FORGED_BATCH = "forged_batch"
_SIGNATURE_REASONS = frozenset({"unknown_signer", "bad_signature"})


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
    return socket.gethostname() or "hub"


class Hub:
    """One hub process's ingest. Run ``run()`` until cancelled.

    ``alarms`` counts rejections by alarm name and ``rejected`` by reason, for this process.
    """

    def __init__(
        self,
        sync: SyncConfig,
        *,
        store_path: Path,
        district_key: SigningKey,
        hub_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-store")
        self._store: HubStore | None = None
        self.alarms: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.stored_records = 0
        self.duplicate_records = 0
        self.acks_sent = 0

    async def run(self) -> None:
        """Open the store and ingest until cancelled."""
        self._store = await self._in_store(HubStore, self.store_path)
        log.info("hub_started", hub_id=self.hub_id, store=str(self.store_path))
        try:
            await self.connection.run()
        finally:
            store = self._store
            self._store = None
            await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
            self._executor.shutdown(wait=False)
            log.info("hub_stopped", hub_id=self.hub_id)

    # --- messages ---

    async def _on_message(self, message: aiomqtt.Message) -> None:
        uplink = _parse_topic(str(message.topic))
        if uplink is None:
            log.warning("message_ignored", reason="unexpected_topic", topic=str(message.topic))
            return
        payload = message.payload
        try:
            if not isinstance(payload, bytes):
                raise _Rejected("bad_body")
            device = await self._in_store(
                self._require_store().get_device, uplink.site, uplink.device
            )
            if device is None:
                raise _Rejected("unknown_device", ALARM_UNKNOWN_DEVICE)
            if not device.enabled:
                raise _Rejected("device_disabled", ALARM_UNKNOWN_DEVICE)
            body = _decode(payload, device)
        except _Rejected as exc:
            self._reject(exc, uplink, batch_id=None)
            return

        kind = body["type"]
        if kind == "batch":
            await self._on_batch(device, uplink, body)
        elif kind == "alarm":
            _log_gate_alarm(uplink, body)
        else:
            # Requests for snapshots and chunks are served by a later part of the hub.
            log.info("message_ignored", reason="unexpected_type", type=kind, **_ids(uplink))

    async def _on_batch(self, device: Device, uplink: _Uplink, body: dict[str, Any]) -> None:
        batch_id = body.get("batch_id")
        try:
            if not isinstance(batch_id, str) or not batch_id:
                raise _Rejected("bad_body")
            lane = body.get("lane")
            if lane not in LANES:
                raise _Rejected("bad_body")
            try:
                records = parse_records(body.get("records"))
            except ValueError as exc:
                raise _Rejected("bad_record") from exc
        except _Rejected as exc:
            self._reject(exc, uplink, batch_id=batch_id if isinstance(batch_id, str) else None)
            return

        new, duplicates = await self._commit(device, records, str(lane), batch_id)
        self.stored_records += new
        self.duplicate_records += duplicates
        log.debug(
            "batch_stored",
            batch_id=batch_id,
            lane=lane,
            records=len(records),
            new=new,
            duplicates=duplicates,
            **_ids(uplink),
        )
        await self._send_ack(uplink, batch_id, [record.seq for record in records])

    async def _commit(
        self, device: Device, records: list[WireRecord], lane: str, batch_id: str
    ) -> tuple[int, int]:
        """Store the batch. Raises sqlite3.Error, and then no ack is sent."""
        store = self._require_store()
        return await self._in_store(
            store.insert_batch, device, records, lane=lane, batch_id=batch_id
        )

    async def _send_ack(self, uplink: _Uplink, batch_id: str, seqs: list[int]) -> None:
        ack = {
            "type": "ack",
            "site": uplink.site,
            "device": uplink.device,
            "batch_id": batch_id,
            "seqs": seq_ranges(seqs),
            "district_time": self.clock(),
        }
        payload = encode_message(ack, self._district_key)
        try:
            await self.connection.publish(Topics(uplink.site, uplink.device).acks, payload)
        except NotConnected as exc:
            # The records are stored. The gate sends the batch again after its ack timeout,
            # and the next ack names the same seqs.
            log.warning("ack_not_sent", batch_id=batch_id, error=str(exc), **_ids(uplink))
            return
        self.acks_sent += 1

    def _reject(self, exc: _Rejected, uplink: _Uplink, *, batch_id: str | None) -> None:
        self.rejected[exc.reason] += 1
        if exc.alarm is not None:
            self.alarms[exc.alarm] += 1
        log.warning(
            "batch_rejected",
            reason=exc.reason,
            alarm=exc.alarm,
            batch_id=batch_id,
            topic_kind=uplink.kind,
            rejected_total=self.rejected[exc.reason],
            **_ids(uplink),
        )

    # --- helpers ---

    def _require_store(self) -> HubStore:
        if self._store is None:
            raise RuntimeError("Hub.run() is not running")
        return self._store

    async def _in_store(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))


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


def _log_gate_alarm(uplink: _Uplink, body: dict[str, Any]) -> None:
    fields = {
        key: body.get(key)
        for key in ("raised_at", "backlog", "bound")
        if isinstance(body.get(key), int | float)
    }
    log.error("gate_alarm", alarm=str(body.get("alarm")), **_ids(uplink), **fields)


def _ids(uplink: _Uplink) -> dict[str, str]:
    return {"site": uplink.site, "device": uplink.device}
