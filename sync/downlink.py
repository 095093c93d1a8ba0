"""The downlink: signed dataset versions from the district, assembled and applied to the cache.

The district publishes each snapshot or delta file in ``dataset_chunk`` messages on the site's
dataset topic (docs/mqtt.md, "Downlink"). ``Downlink`` writes each chunk to a spool folder on
disk before its handler returns, so a transfer cut off by a lost connection or a restart
resumes: the chunks already received are kept and only the missing ones are requested. A
complete file is checked against the SHA-256 in its messages, then applied to the cache in
version order. Its spool entry is removed only after the cache commit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiomqtt
import structlog
from nacl.signing import SigningKey

from edgenode.cache import Cache, CacheImportError, cache_version, import_snapshot
from edgenode.district_trust import DistrictTrust, unknown_signer_fields
from edgenode.snapshot import SnapshotError, SnapshotReader
from sync.delta import DeltaError, apply_delta, read_delta_header
from sync.protocol import MessageError, Topics, decode_message, encode_message

log = structlog.get_logger("sync.downlink")

MAX_CHUNK_BYTES = 64 * 1024
# NOTE: 16,384 chunks of 64 KiB cap a dataset file at 1 GiB. This is a guess at the largest
# city snapshot, not a measured size.
MAX_CHUNKS = 16_384
# Transfers kept in the spool at once. A newer transfer beyond this is rejected.
MAX_TRANSFERS = 8
STALL_S = 10.0
SNAPSHOT_RETRY_S = 60.0
# Repeated alarms of one kind are logged once per this interval, with a count of the rest.
LOG_REPEAT_INTERVAL_S = 10.0

Kind = Literal["snapshot", "delta"]
_TRANSFER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DATASET_FILE = "dataset"
_META_FILE = "transfer.json"
_CHUNKS = "chunks"


MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]


class Connection(Protocol):
    """The part of the gate's MQTT connection (sync/connection.py) that the downlink uses.

    ``publish`` raises an exception (``NotConnected``) when the broker is unreachable.
    ``subscribe`` registers a handler for every connect, and the connection passes it the
    next message only after it returns.
    """

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...

    def subscribe(self, topic: str, handler: MessageHandler) -> None: ...


class ChunkError(Exception):
    """A dataset message that is rejected. ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """The fields that every chunk of one transfer repeats and must agree on."""

    transfer_id: str
    site: str
    kind: Kind
    version: int
    base_version: int | None
    count: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Chunk:
    info: TransferInfo
    index: int
    district_time: float
    data: bytes


@dataclass(slots=True)
class _Transfer:
    info: TransferInfo
    folder: Path
    received: set[int] = field(default_factory=set)
    # Monotonic time of the last chunk or request. A transfer loaded from the spool has none,
    # so its missing chunks are requested at once.
    last_chunk_at: float = -math.inf
    assembled: bool = False

    def missing(self) -> list[int]:
        return [index for index in range(self.info.count) if index not in self.received]

    @property
    def dataset_path(self) -> Path:
        return self.folder / _DATASET_FILE


def parse_chunk(body: dict[str, Any]) -> Chunk:
    """Check a decoded ``dataset_chunk`` body's fields. Raises ChunkError."""
    if body.get("type") != "dataset_chunk":
        raise ChunkError("unexpected_type", f"message type {body.get('type')!r}")
    try:
        kind = body["kind"]
        if kind not in ("snapshot", "delta"):
            raise ValueError(f"kind {kind!r}")
        base_version = body.get("base_version")
        if kind == "delta" and not isinstance(base_version, int):
            raise ValueError("a delta needs an integer base_version")
        transfer_id = str(body["transfer_id"])
        if not _TRANSFER_ID.match(transfer_id):
            raise ValueError("transfer_id must be 1 to 64 letters, digits, '-' or '_'")
        info = TransferInfo(
            transfer_id=transfer_id,
            site=str(body["site"]),
            kind=kind,
            version=_int(body, "version"),
            base_version=base_version if kind == "delta" else None,
            count=_int(body, "count"),
            sha256=str(body["sha256"]).lower(),
        )
        index = _int(body, "index")
        district_time = float(body["district_time"])
        data = base64.b64decode(str(body["data"]), validate=True)
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise ChunkError("bad_chunk", f"invalid dataset_chunk: {exc}") from exc
    if not re.fullmatch(r"[0-9a-f]{64}", info.sha256):
        raise ChunkError("bad_chunk", "sha256 must be 64 hex digits")
    if not 1 <= info.count <= MAX_CHUNKS:
        raise ChunkError("bad_chunk", f"count {info.count} is outside 1 to {MAX_CHUNKS}")
    if not 0 <= index < info.count:
        raise ChunkError("bad_chunk", f"index {index} is outside 0 to {info.count - 1}")
    if len(data) > MAX_CHUNK_BYTES:
        raise ChunkError("chunk_too_large", f"chunk of {len(data)} bytes")
    return Chunk(info, index, district_time, data)


def _int(body: dict[str, Any], key: str) -> int:
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    return value


def chunk_messages(
    data: bytes,
    *,
    site: str,
    kind: Kind,
    version: int,
    base_version: int | None,
    transfer_id: str,
    signing_key: SigningKey,
    chunk_size: int = MAX_CHUNK_BYTES,
    district_time: Callable[[], float] = time.time,
) -> list[bytes]:
    """Split a dataset file into signed ``dataset_chunk`` messages, for the district side."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be 1 to {MAX_CHUNK_BYTES} bytes")
    pieces = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    pieces = pieces or [b""]
    digest = hashlib.sha256(data).hexdigest()
    return [
        encode_message(
            {
                "type": "dataset_chunk",
                "site": site,
                "kind": kind,
                "version": version,
                "base_version": base_version,
                "transfer_id": transfer_id,
                "index": index,
                "count": len(pieces),
                "sha256": digest,
                "district_time": district_time(),
                "data": base64.b64encode(piece).decode("ascii"),
            },
            signing_key,
        )
        for index, piece in enumerate(pieces)
    ]


class _RepeatLimiter:
    """Let one event per key through per interval, and count the ones held back."""

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def check(self, key: str) -> int | None:
        """Return the number of events held back since the last one logged, or None to hold."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class Downlink:
    """Receive the district's dataset versions and keep the cache at the newest one.

    The constructor subscribes to the site's dataset topic and loads the transfers
    left in ``state_dir/spool``. ``run()`` requests missing chunks of stalled transfers and
    must run for as long as the connection does.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        site: str,
        device: str,
        cache_path: Path,
        state_dir: Path,
        district_keys: Sequence[bytes] | DistrictTrust,
        signing_key: SigningKey,
        clock_skew_alarm_s: float = 120.0,
        stall_s: float = STALL_S,
        snapshot_retry_s: float = SNAPSHOT_RETRY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.site = site
        self.topics = Topics(site, device)
        self.cache_path = cache_path
        self.spool = state_dir / "spool"
        # The config's keys plus the district keys announced in the cache this downlink fills.
        self.trust = (
            district_keys
            if isinstance(district_keys, DistrictTrust)
            else DistrictTrust(district_keys, cache_path, clock)
        )
        self.signing_key = signing_key
        self.clock_skew_alarm_s = clock_skew_alarm_s
        self.stall_s = stall_s
        self.snapshot_retry_s = snapshot_retry_s
        self.clock = clock
        # District time minus local time from the latest valid message, in seconds.
        self.clock_skew_s: float | None = None
        self.clock_skew_alarms = 0
        self.rejections: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._version = cache_version(cache_path)
        self._snapshot_requested: tuple[int, float] | None = None
        self._limiter = _RepeatLimiter()
        self._load_spool()
        connection.subscribe(self.topics.datasets, self.handle_message)

    # --- message handling ---

    async def handle_message(self, message: aiomqtt.Message) -> None:
        """Handle one MQTT message from the dataset topic, as ``handle`` does."""
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            self._reject("bad_chunk", "payload is not bytes", topic=str(message.topic))
            return
        await self.handle(str(message.topic), bytes(payload))

    async def handle(self, topic: str, payload: bytes) -> None:
        """Handle one message from the dataset topic.

        Returns after the chunk is durably in the spool and, for the last chunk of a file,
        after the cache commit. A rejected message is logged and counted, not raised. An
        OSError from the spool propagates, and the chunk stays missing.
        """
        async with self._lock:
            try:
                chunk = self._parse(payload)
                self._check_clock(chunk)
                stored = await self._store(chunk)
            except ChunkError as exc:
                self._reject(exc.reason, str(exc), topic=topic)
                return
            transfer = self._transfers.get(chunk.info.transfer_id)
            if stored and transfer is not None and not transfer.missing():
                await self._assemble(transfer)
                await self._apply_ready()

    def _parse(self, payload: bytes) -> Chunk:
        try:
            body = decode_message(payload, self.trust.key_ids())
        except MessageError as exc:
            raise ChunkError(exc.reason, str(exc)) from exc
        chunk = parse_chunk(body)
        if chunk.info.site != self.site:
            raise ChunkError(
                "wrong_site",
                f"transfer {chunk.info.transfer_id} is for site {chunk.info.site!r}",
            )
        return chunk

    def _check_clock(self, chunk: Chunk) -> None:
        skew = chunk.district_time - self.clock()
        self.clock_skew_s = skew
        if abs(skew) <= self.clock_skew_alarm_s:
            return
        self.clock_skew_alarms += 1
        # NOTE: a chunk that waited in the broker's queue carries its old district_time, so
        # after an outage the local clock can look ahead of the district by the queue's age.
        held_back = self._limiter.check("clock_skew")
        if held_back is not None:
            log.warning(
                "clock_skew",
                skew_s=round(skew, 3),
                limit_s=self.clock_skew_alarm_s,
                transfer_id=chunk.info.transfer_id,
                alarms_not_logged=held_back,
            )

    async def _store(self, chunk: Chunk) -> bool:
        """Write a chunk to the spool. Return False for a chunk of the cache's own version."""
        info = chunk.info
        if self._version is not None and info.version <= self._version:
            self._discard(info.transfer_id)
            if info.version == self._version:
                # Chunks sent again at another gate's request for the version this gate has.
                log.debug("chunk_already_applied", transfer_id=info.transfer_id)
                return False
            raise ChunkError(
                "stale_version",
                f"{info.kind} {info.version} is not newer than the cache's {self._version}",
            )
        transfer = self._transfers.get(info.transfer_id)
        if transfer is None:
            if len(self._transfers) >= MAX_TRANSFERS:
                raise ChunkError(
                    "too_many_transfers",
                    f"{MAX_TRANSFERS} transfers are already in progress",
                )
            transfer = _Transfer(info, self.spool / info.transfer_id)
            await asyncio.to_thread(_write_meta, transfer)
            self._transfers[info.transfer_id] = transfer
            log.info(
                "transfer_started",
                transfer_id=info.transfer_id,
                kind=info.kind,
                version=info.version,
                chunks=info.count,
            )
        elif transfer.info != info:
            raise ChunkError(
                "transfer_mismatch",
                f"chunk {chunk.index} disagrees with earlier chunks of its transfer",
            )
        transfer.last_chunk_at = time.monotonic()
        if chunk.index not in transfer.received:
            await asyncio.to_thread(_write_chunk, transfer.folder, chunk.index, chunk.data)
            transfer.received.add(chunk.index)
        return True

    async def _assemble(self, transfer: _Transfer) -> None:
        if transfer.assembled:
            return
        digest = await asyncio.to_thread(_join_chunks, transfer)
        if digest != transfer.info.sha256:
            self._discard(transfer.info.transfer_id)
            self._reject(
                "file_hash_mismatch",
                "assembled file does not match the sha256 of its messages",
                transfer=transfer.info,
            )
            return
        transfer.assembled = True

    # --- applying complete files ---

    async def _apply_ready(self) -> None:
        """Apply complete files in version order while one fits the cache.

        Then reject every complete delta that cannot fit. A delta that starts past the cache's
        version, with no transfer in progress that could bridge the gap, leads to a snapshot
        request.
        """
        # Another program, such as a manual snapshot import, may have replaced the cache.
        self._version = await asyncio.to_thread(cache_version, self.cache_path)
        for _ in range(len(self._transfers) + 1):
            ready = [transfer for transfer in self._transfers.values() if transfer.assembled]
            fitting = [transfer for transfer in ready if self._fits(transfer.info)]
            if not fitting:
                break
            transfer = min(fitting, key=lambda item: item.info.version)
            await self._apply(transfer)
        if self._drop_unfit_deltas():
            await self._request_snapshot()

    def _fits(self, info: TransferInfo) -> bool:
        if info.kind == "snapshot":
            return self._version is None or info.version > self._version
        return self._version is not None and info.base_version == self._version

    def _drop_unfit_deltas(self) -> bool:
        """Reject complete deltas that cannot fit. Return whether one was ahead of the cache."""
        bridged = any(
            not transfer.assembled and self._fits(transfer.info)
            for transfer in self._transfers.values()
        )
        ahead = False
        for transfer in list(self._transfers.values()):
            info = transfer.info
            if not transfer.assembled or info.kind != "delta" or self._fits(info):
                continue
            base = info.base_version or 0
            is_ahead = self._version is None or base > self._version
            if is_ahead and bridged:
                continue  # An earlier delta or a snapshot still arriving may make it fit.
            ahead = ahead or is_ahead
            self._discard(info.transfer_id)
            self._reject(
                "version_gap",
                f"delta from {info.base_version} does not fit the cache's version {self._version}",
                transfer=info,
            )
        return ahead

    async def _apply(self, transfer: _Transfer) -> None:
        info = transfer.info
        try:
            await asyncio.to_thread(self._apply_file, transfer)
        except CacheImportError as exc:
            self._discard(info.transfer_id)
            self._reject(exc.reason, str(exc), transfer=info)
            return
        self._version = info.version
        self._discard(info.transfer_id)
        self._snapshot_requested = None
        log.info(
            "dataset_applied",
            transfer_id=info.transfer_id,
            kind=info.kind,
            version=info.version,
            base_version=info.base_version,
        )
        for other in list(self._transfers.values()):
            if other.info.version <= info.version:
                self._discard(other.info.transfer_id)
                log.info(
                    "transfer_superseded",
                    transfer_id=other.info.transfer_id,
                    version=other.info.version,
                    cache_version=info.version,
                )

    def _apply_file(self, transfer: _Transfer) -> None:
        """Check the file's signed header against its messages, then commit it to the cache."""
        info = transfer.info
        path = transfer.dataset_path
        now = self.clock()
        keys = self.trust.public_keys()
        try:
            if info.kind == "snapshot":
                with SnapshotReader(path, keys) as reader:
                    header_version, header_base = reader.header.version, None
            else:
                delta_header = read_delta_header(path, keys)
                header_version, header_base = delta_header.version, delta_header.base_version
        except (SnapshotError, DeltaError) as exc:
            raise CacheImportError(exc.reason, str(exc)) from exc
        if (header_version, header_base) != (info.version, info.base_version):
            raise CacheImportError(
                "version_mismatch",
                f"file header has version {header_version} from {header_base}, its messages "
                f"{info.version} from {info.base_version}",
            )
        if info.kind == "snapshot":
            import_snapshot(self.cache_path, path, keys, site=self.site, now=now)
        else:
            apply_delta(self.cache_path, path, keys, site=self.site, now=now)

    # --- requests to the district ---

    async def request_snapshot(self) -> None:
        """Request a snapshot, as after a version gap: for a new gate's empty cache, or a
        cache the operator wants replaced. Sent at most once per ``snapshot_retry_s`` for the
        same cache version."""
        async with self._lock:
            await self._request_snapshot()

    async def _request_snapshot(self) -> None:
        have = self._version or 0
        now = time.monotonic()
        last = self._snapshot_requested
        if last is not None and last[0] == have and now - last[1] < self.snapshot_retry_s:
            return
        body = {"what": "snapshot", "have_version": have}
        if await self._send_request(body):
            self._snapshot_requested = (have, now)
            # Info, not a warning: a new gate and a gate past a version gap both ask for one.
            log.info("snapshot_requested", have_version=have)

    async def request_missing(self, *, stalled_only: bool = True) -> int:
        """Request the missing chunks of transfers in progress. Return how many were requested.

        With ``stalled_only``, only transfers without a chunk for ``stall_s`` seconds.
        """
        async with self._lock:
            now = time.monotonic()
            requested = 0
            for transfer in list(self._transfers.values()):
                missing = transfer.missing()
                if not missing or (stalled_only and now - transfer.last_chunk_at < self.stall_s):
                    continue
                body = {"what": "chunks", "transfer_id": transfer.info.transfer_id}
                if await self._send_request(body | {"missing": missing}):
                    # Wait stall_s for these chunks before requesting them again.
                    transfer.last_chunk_at = now
                    requested += len(missing)
                    log.info(
                        "chunks_requested",
                        transfer_id=transfer.info.transfer_id,
                        missing=len(missing),
                    )
            return requested

    async def _send_request(self, fields: dict[str, Any]) -> bool:
        body = {"type": "request", "site": self.site, "device": self.topics.device}
        body |= fields | {"sent_at": self.clock()}
        try:
            await self.connection.publish(
                self.topics.requests, encode_message(body, self.signing_key), qos=1
            )
        except Exception as exc:  # NotConnected, or any failure of the connection.
            held_back = self._limiter.check("request_not_sent")
            if held_back is not None:
                log.info(
                    "request_not_sent",
                    what=fields["what"],
                    error=repr(exc),
                    failures_not_logged=held_back,
                )
            return False
        return True

    async def run(self) -> None:
        """Apply files left complete in the spool, then request stalled chunks until cancelled."""
        async with self._lock:
            for transfer in list(self._transfers.values()):
                if not transfer.missing():
                    await self._assemble(transfer)
            await self._apply_ready()
        while True:
            await self.request_missing()
            await asyncio.sleep(min(1.0, self.stall_s / 2))

    # --- spool ---

    def _load_spool(self) -> None:
        if not self.spool.is_dir():
            return
        for folder in sorted(self.spool.iterdir()):
            try:
                transfer = _read_transfer(folder)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("spool_entry_removed", folder=folder.name, error=repr(exc))
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._transfers[transfer.info.transfer_id] = transfer
            log.info(
                "transfer_resumed",
                transfer_id=transfer.info.transfer_id,
                received=len(transfer.received),
                chunks=transfer.info.count,
            )

    def _discard(self, transfer_id: str) -> None:
        self._transfers.pop(transfer_id, None)
        shutil.rmtree(self.spool / transfer_id, ignore_errors=True)

    def _reject(
        self, reason: str, error: str, *, topic: str = "", transfer: TransferInfo | None = None
    ) -> None:
        self.rejections[reason] += 1
        held_back = self._limiter.check(f"dataset_rejected:{reason}")
        if held_back is None:
            return
        ids: dict[str, Any] = {"topic": topic} if topic else {}
        if reason == "unknown_signer":
            ids |= unknown_signer_fields(self.trust)
        if transfer is not None:
            ids |= {
                "transfer_id": transfer.transfer_id,
                "kind": transfer.kind,
                "version": transfer.version,
            }
        log.warning(
            "dataset_rejected",
            reason=reason,
            error=error,
            cache_version=self._version,
            rejections_not_logged=held_back,
            **ids,
        )

    # --- status ---

    def status(self) -> dict[str, Any]:
        """Describe the cache's datasets, transfers in progress, rejections and clock skew.

        ``age_s`` of a dataset is the time since the district issued it.
        """
        now = self.clock()
        with Cache(self.cache_path) as cache:
            datasets = [
                {
                    "name": info.name,
                    "version": info.version,
                    "issued_at": info.issued_at,
                    "synced_at": info.synced_at,
                    "valid_until": info.valid_until,
                    "age_s": now - info.issued_at,
                }
                for info in cache.datasets()
            ]
        transfers = [
            asdict(transfer.info)
            | {"received": len(transfer.received), "assembled": transfer.assembled}
            for transfer in self._transfers.values()
        ]
        return {
            "version": self._version,
            "datasets": datasets,
            "transfers": transfers,
            "rejections": dict(self.rejections),
            "clock_skew_s": self.clock_skew_s,
            "clock_skew_alarms": self.clock_skew_alarms,
        }


# --- spool files; every write is fsynced before the handler returns ---


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems do not support fsync on a folder.
    finally:
        os.close(fd)


def _write_meta(transfer: _Transfer) -> None:
    (transfer.folder / _CHUNKS).mkdir(parents=True, exist_ok=True)
    data = json.dumps(asdict(transfer.info), sort_keys=True).encode("utf-8")
    _write_durably(transfer.folder / _META_FILE, data)
    _fsync_dir(transfer.folder.parent)


def _write_chunk(folder: Path, index: int, data: bytes) -> None:
    _write_durably(folder / _CHUNKS / f"{index:05d}", data)


def _join_chunks(transfer: _Transfer) -> str:
    """Join the chunks into the dataset file and return its SHA-256 in hex."""
    digest = hashlib.sha256()
    tmp = transfer.folder / (_DATASET_FILE + ".tmp")
    with tmp.open("wb") as out:
        for index in range(transfer.info.count):
            data = (transfer.folder / _CHUNKS / f"{index:05d}").read_bytes()
            digest.update(data)
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, transfer.dataset_path)
    return digest.hexdigest()


def _read_transfer(folder: Path) -> _Transfer:
    raw = json.loads((folder / _META_FILE).read_text(encoding="utf-8"))
    info = TransferInfo(**raw)
    if info.transfer_id != folder.name:
        raise ValueError(f"transfer_id {info.transfer_id!r} in folder {folder.name!r}")
    transfer = _Transfer(info, folder)
    for path in (folder / _CHUNKS).iterdir():
        if path.name.isdigit() and int(path.name) < info.count:
            transfer.received.add(int(path.name))
        else:
            path.unlink()
    # NOTE: a dataset file from before a restart is joined and hashed again, not trusted.
    transfer.dataset_path.unlink(missing_ok=True)
    return transfer
