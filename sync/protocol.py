"""The MQTT message contract between gates and the district: topics and signed messages.

docs/mqtt.md describes every topic and field. Every message body is a JSON object, compressed
with zlib and signed with Ed25519 by its sender: a gate signs with its device key, the district
with its district key. On the wire a message is:

    version (1 byte) | signer key id (4 bytes) | signature (64 bytes) | zlib(JSON body)

The signature covers the compressed body. Receivers check the signature before they
decompress, and cap the decompressed size, so a forged or hostile message costs little.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.codes import key_id_for

WIRE_VERSION = 1
TOPIC_ROOT = "edgenode/v1"
HEADER_LEN = 1 + 4 + 64
MAX_BODY_BYTES = 16 * 1024 * 1024
# The shared-subscription group that district hub processes join to split the uplink.
HUB_GROUP = "edgenode-hub"


class MessageError(Exception):
    """A message that is rejected. ``reason`` is a stable snake_case code for logs and alarms."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one device at one site."""

    site: str
    device: str

    @property
    def _device_root(self) -> str:
        return f"{TOPIC_ROOT}/{self.site}/{self.device}"

    @property
    def batches(self) -> str:
        """Gate to district: batches of journal records in sequence order, QoS 1."""
        return f"{self._device_root}/up/batch"

    @property
    def priority(self) -> str:
        """Gate to district: deny verdicts and alarms, sent ahead of any backlog, QoS 1."""
        return f"{self._device_root}/up/priority"

    @property
    def requests(self) -> str:
        """Gate to district: requests for a snapshot or for missing dataset chunks."""
        return f"{self._device_root}/up/request"

    @property
    def enroll(self) -> str:
        """Gate to district: a new gate's enroll request, signed with its new device key."""
        return f"{self._device_root}/up/enroll"

    @property
    def enroll_results(self) -> str:
        """District to gate: the signed result of an enroll request."""
        return f"{self._device_root}/down/enroll"

    @property
    def status(self) -> str:
        """Gate's online state, retained; the broker publishes 'offline' as the will."""
        return f"{self._device_root}/status"

    @property
    def acks(self) -> str:
        """District to gate: signed acknowledgements of batches after the district's commit."""
        return f"{self._device_root}/down/ack"

    @property
    def datasets(self) -> str:
        """District to every gate of the site: signed dataset versions in chunks."""
        return f"{TOPIC_ROOT}/{self.site}/down/dataset"


def hub_uplink_subscription() -> str:
    """Return the shared subscription through which hub processes split every gate's uplink."""
    return f"$share/{HUB_GROUP}/{TOPIC_ROOT}/+/+/up/#"


def encode_message(body: Mapping[str, Any], signing_key: SigningKey) -> bytes:
    """Compress and sign a message body for the wire."""
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    compressed = zlib.compress(raw.encode("utf-8"), level=6)
    signature = signing_key.sign(compressed).signature
    key_id = key_id_for(bytes(signing_key.verify_key))
    return bytes([WIRE_VERSION]) + key_id + signature + compressed


def signer_key_id(payload: bytes) -> bytes:
    """Return the key id a message claims, before its signature is checked."""
    if len(payload) < HEADER_LEN:
        raise MessageError("truncated", f"message of {len(payload)} bytes has no full header")
    return payload[1:5]


def decode_message(payload: bytes, trusted_keys: Mapping[bytes, bytes]) -> dict[str, Any]:
    """Verify and decode a message. ``trusted_keys`` maps key ids to Ed25519 public keys.

    Raises MessageError with reason truncated, unsupported_version, unknown_signer,
    bad_signature, bad_body or body_too_large.
    """
    key_id = signer_key_id(payload)
    if payload[0] != WIRE_VERSION:
        raise MessageError("unsupported_version", f"wire version {payload[0]}")
    public_key = trusted_keys.get(key_id)
    if public_key is None:
        raise MessageError("unknown_signer", f"signed by unknown key {key_id.hex()}")
    signature = payload[5:HEADER_LEN]
    compressed = payload[HEADER_LEN:]
    try:
        VerifyKey(public_key).verify(compressed, signature)
    except (BadSignatureError, ValueError) as exc:
        raise MessageError("bad_signature", f"signature by {key_id.hex()} is invalid") from exc
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(compressed, MAX_BODY_BYTES)
    except zlib.error as exc:
        raise MessageError("bad_body", f"body does not decompress: {exc}") from exc
    if decompressor.unconsumed_tail:
        raise MessageError("body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise MessageError("bad_body", f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise MessageError("bad_body", "body is not an object with a 'type'")
    return body


def trusted(*public_keys: bytes) -> dict[bytes, bytes]:
    """Build the key-id map that decode_message takes."""
    return {key_id_for(key): key for key in public_keys}
