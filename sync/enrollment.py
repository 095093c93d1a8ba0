"""Enrollment over MQTT: a new gate registers its device key with a one-time token.

The installer's bundle (edgenode/enrollment.py) carries the token. ``edgenode provision``
creates the device key and sends an ``enroll`` message on
``edgenode/v1/{site}/{device}/up/enroll``, signed with that new key and carrying its public
half, so the signature proves that the sender has the private key it registers. The hub
(``EnrollmentService``) checks the token against the hash that ``district enroll`` stored,
marks the token used and registers the device in one store transaction, then sends a
district-signed ``enroll_result`` on ``edgenode/v1/{site}/{device}/down/enroll``
(docs/mqtt.md, "enroll").

A token is used once. The same device key sending the same token again gets ``accepted``
again, so a gate whose first result was lost can send its request again. Any other use is
rejected with a reason code from ``REJECT_REASONS``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
import structlog
from nacl.signing import SigningKey

from edgenode.district_keyring import DistrictKeySource, current_key
from sync.hub_store import PUBLIC_KEY_BYTES, Device, TokenRejected
from sync.protocol import (
    HEADER_LEN,
    WIRE_VERSION,
    MessageError,
    Topics,
    decode_message,
    encode_message,
    trusted,
)

log = structlog.get_logger("sync.enrollment")

ENROLL_KIND = "enroll"
# An enroll body is a few hundred bytes. The hub decompresses it before it has checked the
# signature, so it stops at this size.
MAX_ENROLL_BODY_BYTES = 16 * 1024
# Reason codes of a rejected enrollment, in enroll_result messages and in the hub's logs.
REJECT_REASONS = frozenset(
    {
        "bad_body",
        "bad_signature",
        "device_mismatch",
        "unknown_token",
        "token_used",
        "token_expired",
        "token_mismatch",
        "device_registered",
    }
)


def hash_token(token: str) -> bytes:
    """Return the SHA-256 of a token: the only form of it that the hub stores."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> str:
    """Return a new one-time token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


class Publishing(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None: ...


class TokenStore(Protocol):
    """The part of the hub store (sync/store_backend.py) that enrollment uses."""

    def redeem_enrollment_token(
        self,
        token_hash: bytes,
        site: str,
        device_id: str,
        public_key: bytes,
        *,
        now: float | None = None,
    ) -> Device: ...


class EnrollmentRejected(Exception):
    """An enrollment that the hub rejected. ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# --- the hub's side ---


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    site: str
    device: str
    token: str
    public_key: bytes
    request_id: str


class EnrollmentService:
    """Check ``enroll`` messages and send their results, for one hub process.

    ``in_store`` runs a function on the hub's store thread and ``store`` returns the open
    store. ``on_rejected(site, device, reason)`` is called for each rejection, for the hub's
    counters and alarms.
    """

    def __init__(
        self,
        connection: Publishing,
        *,
        district_key: DistrictKeySource,
        in_store: Callable[[Callable[[], Device]], Awaitable[Device]],
        store: Callable[[], TokenStore],
        on_rejected: Callable[[str, str, str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.district_key = district_key
        self._in_store = in_store
        self._store = store
        self._on_rejected = on_rejected
        self.clock = clock

    async def handle(self, site: str, device: str, payload: object) -> None:
        """Check one enroll message from ``edgenode/v1/{site}/{device}/up/enroll`` and reply.

        Errors from the store (sqlite3.Error, StoreUnavailable) propagate, and then no result is
        sent, so the gate sends its request again.
        """
        request_id = ""
        try:
            request = parse_enroll(payload, site, device)
            request_id = request.request_id
            registered = await self._redeem(request)
        except EnrollmentRejected as exc:
            self._on_rejected(site, device, exc.reason)
            log.error(
                "enroll_rejected",
                reason=exc.reason,
                error=str(exc),
                site=site,
                device=device,
                request_id=request_id or None,
            )
            await self._send_result(site, device, request_id, exc.reason)
            return
        log.info(
            "device_enrolled",
            site=site,
            device=device,
            request_id=request_id,
            registered_at=registered.registered_at,
        )
        await self._send_result(site, device, request_id, None)

    async def _redeem(self, request: EnrollRequest) -> Device:
        def redeem() -> Device:
            return self._store().redeem_enrollment_token(
                hash_token(request.token),
                request.site,
                request.device,
                request.public_key,
                now=self.clock(),
            )

        try:
            return await self._in_store(redeem)
        except TokenRejected as exc:
            raise EnrollmentRejected(exc.reason, str(exc)) from exc

    async def _send_result(
        self, site: str, device: str, request_id: str, reason: str | None
    ) -> None:
        body = {
            "type": "enroll_result",
            "site": site,
            "device": device,
            "request_id": request_id,
            "accepted": reason is None,
            "reason": reason,
            "district_time": self.clock(),
        }
        try:
            await self.connection.publish(
                Topics(site, device).enroll_results,
                encode_message(body, current_key(self.district_key)),
            )
        except (
            Exception
        ) as exc:  # NotConnected: the gate sends its request again after its resend interval.
            log.warning("enroll_result_not_sent", site=site, device=device, error=repr(exc))


def parse_enroll(payload: object, site: str, device: str) -> EnrollRequest:
    """Check an enroll message's signature against the key it carries, and its fields.

    Raises EnrollmentRejected. The token's own checks are the store's
    (``HubStore.redeem_enrollment_token``).
    """
    if not isinstance(payload, bytes | bytearray):
        raise EnrollmentRejected("bad_body", "payload is not bytes")
    payload = bytes(payload)
    body = _peek_body(payload)
    try:
        public_key = base64.b64decode(str(body.get("public_key")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnrollmentRejected("bad_body", "public_key is not base64") from exc
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise EnrollmentRejected("bad_body", f"public_key has {len(public_key)} bytes, not 32")
    try:
        verified = decode_message(payload, trusted(public_key))
    except MessageError as exc:
        reason = "bad_signature" if exc.reason == "unknown_signer" else exc.reason
        raise EnrollmentRejected(
            reason if reason in REJECT_REASONS else "bad_body", str(exc)
        ) from exc
    if verified.get("site") != site or verified.get("device") != device:
        raise EnrollmentRejected("device_mismatch", "the body names another site or device")
    token, request_id = verified.get("token"), verified.get("request_id")
    if verified.get("type") != "enroll" or not isinstance(token, str) or not token:
        raise EnrollmentRejected("bad_body", "not an enroll body with a token")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise EnrollmentRejected("bad_body", "request_id is not a string of 1 to 64 characters")
    return EnrollRequest(site, device, token, public_key, request_id)


def _peek_body(payload: bytes) -> dict[str, Any]:
    """Decode a body before its signature is checked, to find the key that should verify it."""
    if len(payload) < HEADER_LEN or payload[0] != WIRE_VERSION:
        raise EnrollmentRejected("bad_body", "not a signed message of wire version 1")
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(payload[HEADER_LEN:], MAX_ENROLL_BODY_BYTES)
        body = json.loads(raw)
    except (zlib.error, ValueError) as exc:
        raise EnrollmentRejected("bad_body", f"body does not decode: {exc}") from exc
    if decompressor.unconsumed_tail or not isinstance(body, dict):
        raise EnrollmentRejected("bad_body", "body is too large or not an object")
    return body


# --- the gate's side ---


class Subscribing(Publishing, Protocol):
    def subscribe(
        self, topic: str, handler: Callable[[aiomqtt.Message], Awaitable[None]], qos: int = 1
    ) -> None: ...


class EnrollmentClient:
    """Send a gate's enroll request and wait for the district's result.

    Create it before the connection runs, because it subscribes to the result topic on every
    connect.
    """

    def __init__(
        self,
        connection: Subscribing,
        *,
        site: str,
        device: str,
        device_key: SigningKey,
        district_keys: Sequence[bytes],
    ) -> None:
        self.connection = connection
        self.topics = Topics(site, device)
        self.site = site
        self.device = device
        self.device_key = device_key
        self._trusted = trusted(*district_keys)
        self.request_id = secrets.token_hex(8)
        self._result: dict[str, Any] | None = None
        self.ignored = 0
        connection.subscribe(self.topics.enroll_results, self._on_message)

    async def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        try:
            if not isinstance(payload, bytes | bytearray):
                raise MessageError("bad_body", "payload is not bytes")
            body = decode_message(bytes(payload), self._trusted)
        except MessageError as exc:
            self.ignored += 1
            log.warning("enroll_result_ignored", reason=exc.reason, error=str(exc))
            return
        if body.get("type") != "enroll_result" or body.get("request_id") != self.request_id:
            # The result of an earlier attempt, or of another installer's request.
            self.ignored += 1
            log.info("enroll_result_ignored", reason="other_request")
            return
        self._result = body

    def request_body(self, token: str) -> bytes:
        body = {
            "type": "enroll",
            "site": self.site,
            "device": self.device,
            "token": token,
            "public_key": base64.b64encode(bytes(self.device_key.verify_key)).decode("ascii"),
            "request_id": self.request_id,
            "sent_at": time.time(),
        }
        return encode_message(body, self.device_key)

    async def enroll(self, token: str, *, timeout_s: float, resend_s: float) -> None:
        """Send the request every ``resend_s`` until the result arrives or ``timeout_s`` ends.

        Raises EnrollmentRejected for a rejection and TimeoutError when no result came. A send
        that fails because the connection is down is tried again at the next interval.
        """
        deadline = time.monotonic() + timeout_s
        next_send = 0.0
        while self._result is None:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no enrollment result within {timeout_s} s")
            if now >= next_send:
                next_send = now + resend_s
                try:
                    await self.connection.publish(self.topics.enroll, self.request_body(token))
                except Exception as exc:  # NotConnected: sent again at the next interval.
                    log.warning("enroll_request_not_sent", error=repr(exc))
            await asyncio.sleep(0.05)
        result = self._result
        if result.get("accepted") is True:
            return
        reason = str(result.get("reason"))
        raise EnrollmentRejected(reason, f"the district rejected the enrollment: {reason}")
