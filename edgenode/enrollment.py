"""The enrollment bundle: what an installer carries from the district to a new gate.

``edgenode district enroll`` writes it and ``edgenode provision`` reads it. The file is JSON::

    {"format": "edgenode-enrollment", "version": 1, "body": {...},
     "key_id": "…8 hex…", "signature": "…base64…"}

``signature`` is the district key's Ed25519 signature over the canonical JSON of ``body``
(sorted keys, no spaces, UTF-8). The body names the gate: site, device id and station. It
gives the broker address (``mqtts://``, or ``mqtt://`` in tests) with an optional CA
certificate and credentials. It carries the trust anchors, which are the district public keys
and the issuer keys in use, and the one-time token with its expiry. The token and any broker
password make the file a secret, so it is written readable by its owner only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgenode.codes import key_id_for

BUNDLE_FORMAT = "edgenode-enrollment"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 1024 * 1024
DEFAULT_PORTS = {"mqtts": 8883, "mqtt": 1883}


class BundleError(Exception):
    """A bundle that cannot be used. ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The gate's broker address and credentials. ``ca_pem`` is the CA certificate's PEM text."""

    host: str
    port: int
    tls: bool
    ca_pem: str | None = None
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Split ``mqtts://host:port`` or ``mqtt://host:port`` into (host, port, tls).

    Raises ValueError naming the problem.
    """
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker address {url!r} must start with mqtts:// (or mqtt:// in tests)")
    if not parts.hostname or parts.path not in ("", "/") or parts.username or parts.query:
        raise ValueError(f"broker address {url!r} must be scheme://host:port and nothing else")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"broker address {url!r} has an invalid port") from exc
    return parts.hostname, port, parts.scheme == "mqtts"


@dataclass(frozen=True, slots=True)
class Bundle:
    """The signed content of an enrollment bundle. Times are Unix seconds."""

    site: str
    device: str
    station: str
    broker: BrokerSettings
    district_keys: tuple[str, ...]
    issuers: tuple[dict[str, Any], ...]
    token: str
    issued_at: int
    expires_at: int

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        body["district_keys"] = list(self.district_keys)
        body["issuers"] = [dict(issuer) for issuer in self.issuers]
        return body

    def district_key_bytes(self) -> list[bytes]:
        return [base64.b64decode(key) for key in self.district_keys]


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def write_bundle(path: Path, bundle: Bundle, district_key: SigningKey) -> None:
    """Sign and write a bundle, readable by its owner only. Raises FileExistsError."""
    body = bundle.body()
    public = bytes(district_key.verify_key)
    if base64.b64encode(public).decode("ascii") not in bundle.district_keys:
        raise ValueError("the signing district key must be one of the bundle's district keys")
    document = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "body": body,
        "key_id": key_id_for(public).hex(),
        "signature": base64.b64encode(district_key.sign(_canonical(body)).signature).decode(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(document, out, ensure_ascii=False, indent=1)
        out.write("\n")


def read_bundle(path: Path) -> tuple[Bundle, bytes]:
    """Read a bundle and check its signature. Return it with the public key that signed it.

    The signer must be one of the bundle's own district keys, so the check proves that the
    file is intact. Only a fingerprint from the district (``--district-key``) proves who
    signed it. Raises BundleError with reason unreadable, bad_format or bad_signature.
    """
    try:
        raw = path.read_bytes()[: MAX_BUNDLE_BYTES + 1]
    except OSError as exc:
        raise BundleError("unreadable", f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError("bad_format", f"{path}: larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        document = json.loads(raw.decode("utf-8"))
        if document["format"] != BUNDLE_FORMAT or document["version"] != BUNDLE_VERSION:
            raise ValueError(f"format {document['format']!r} version {document['version']!r}")
        body = document["body"]
        signature = base64.b64decode(document["signature"], validate=True)
        bundle = _parse_body(body)
        keys = bundle.district_key_bytes()
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleError("bad_format", f"{path}: not an enrollment bundle: {exc}") from exc
    signer = {key_id_for(key).hex(): key for key in keys}.get(str(document.get("key_id")))
    if signer is None:
        raise BundleError("bad_signature", f"{path}: signed by a key the bundle does not list")
    try:
        VerifyKey(signer).verify(_canonical(body), signature)
    except (BadSignatureError, ValueError) as exc:
        raise BundleError("bad_signature", f"{path}: the signature does not verify") from exc
    return bundle, signer


def _parse_body(body: dict[str, Any]) -> Bundle:
    """Build a Bundle from a body, raising ValueError, KeyError or TypeError when invalid."""
    broker = BrokerSettings(**body["broker"])
    if not isinstance(broker.port, int) or not 0 < broker.port < 65_536:
        raise ValueError(f"broker port {broker.port!r}")
    keys = tuple(str(key) for key in body["district_keys"])
    for key in keys:
        if len(base64.b64decode(key, validate=True)) != 32:
            raise ValueError("a district key is not a 32-byte Ed25519 public key")
    if not keys:
        raise ValueError("the bundle lists no district key")
    bundle = Bundle(
        site=str(body["site"]),
        device=str(body["device"]),
        station=str(body["station"]),
        broker=broker,
        district_keys=keys,
        issuers=tuple(dict(issuer) for issuer in body["issuers"]),
        token=str(body["token"]),
        issued_at=int(body["issued_at"]),
        expires_at=int(body["expires_at"]),
    )
    if not bundle.token:
        raise ValueError("the bundle has no token")
    return bundle
