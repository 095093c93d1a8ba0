"""``edgenode provision``'s steps on a new gate: from an enrollment bundle to a first snapshot.

1. Check the bundle (edgenode/enrollment.py): signature, optional district-key fingerprint,
   expiry.
2. Create the device key (sync/identity.py) and write the broker files and the config to a
   staging name, ``edgenode.toml.provisioning``, validated by the config model.
3. Connect to the broker, send the signed enroll request and wait for the district's result
   (sync/enrollment.py).
4. Request a snapshot through the normal downlink (sync/downlink.py) and wait until the cache
   has it, so the gate can decide at once.
5. Rename the staged config to ``edgenode.toml``.

Only a finished run leaves ``edgenode.toml``. A run that fails before the district accepted
the key removes every file it created. After the district accepted it, the device key and the
staged config are kept, because the key is registered: running provision again with the same
bundle finishes the job, since the hub accepts the same key and token again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edgenode.cache import cache_version
from edgenode.config import Config, ConfigError, load_config
from edgenode.district_keys import fingerprint, normalise_fingerprint
from edgenode.enrollment import Bundle
from edgenode.i18n import N_
from sync.connection import Connection
from sync.downlink import Downlink
from sync.enrollment import EnrollmentClient, EnrollmentRejected
from sync.identity import ensure_device_key

log = structlog.get_logger("edgenode.provision")

CONFIG_NAME = "edgenode.toml"
STAGED_SUFFIX = ".provisioning"
CA_NAME = "broker-ca.pem"
PASSWORD_NAME = "broker.password"
CONNECT_TIMEOUT_S = 30.0
ENROLL_TIMEOUT_S = 60.0
SNAPSHOT_TIMEOUT_S = 120.0
# The enroll request and the snapshot request are sent again at this interval until a result
# or a snapshot arrives.
RESEND_S = 5.0
POLL_S = 0.1


class ProvisionError(Exception):
    """A provisioning step that failed. ``template`` is an English msgid with ``fields``."""

    def __init__(self, reason: str, template: str, **fields: Any) -> None:
        self.reason = reason
        self.template = template
        self.fields = fields
        super().__init__(template.format(**fields))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed for each network step."""

    connect_s: float = CONNECT_TIMEOUT_S
    enroll_s: float = ENROLL_TIMEOUT_S
    snapshot_s: float = SNAPSHOT_TIMEOUT_S
    resend_s: float = RESEND_S


@dataclass(frozen=True, slots=True)
class Provisioned:
    config_path: Path
    device_public_key: bytes
    cache_version: int


def check_bundle(
    bundle: Bundle, signer: bytes, *, expected_fingerprint: str | None, now: float
) -> None:
    """Check the signer against the typed fingerprint and the bundle's expiry."""
    if expected_fingerprint is not None and normalise_fingerprint(
        expected_fingerprint
    ) != normalise_fingerprint(fingerprint(signer)):
        raise ProvisionError(
            "fingerprint_mismatch",
            N_(
                "The bundle is signed by the district key {actual}, not {expected}: "
                "do not use it, and ask the district for a new bundle"
            ),
            actual=fingerprint(signer),
            expected=expected_fingerprint,
        )
    if now > bundle.expires_at:
        raise ProvisionError(
            "token_expired",
            N_("The enrollment bundle expired at {time}: ask the district for a new one"),
            time=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(bundle.expires_at)),
        )


@dataclass
class _Files:
    """Files created by this run, removed again if it fails before the district accepts."""

    created: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def write(self, path: Path, text: str, mode: int) -> None:
        if not path.exists():
            self.created.append(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def folder(self, path: Path, mode: int) -> None:
        missing = [parent for parent in (path, *path.parents) if not parent.exists()]
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        self.folders.extend(missing)

    def remove(self) -> None:
        for path in reversed(self.created):
            path.unlink(missing_ok=True)
        for folder in self.folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # Only when empty: other files may have appeared.


def _toml_string(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string: the same quotes and escapes.
    return json.dumps(str(value), ensure_ascii=False)


def config_text(bundle: Bundle, *, state_dir: Path, config_dir: Path) -> str:
    """Return the gate's config file for a bundle, with absolute paths."""
    keys = ", ".join(_toml_string(key) for key in bundle.district_keys)
    broker = bundle.broker
    lines = [
        f"# Written by 'edgenode provision' for {bundle.device} at {bundle.site}.",
        "[device]",
        f"id = {_toml_string(bundle.device)}",
        f"site = {_toml_string(bundle.site)}",
        f"station = {_toml_string(bundle.station)}",
        f"state_dir = {_toml_string(state_dir.resolve())}",
        "",
        "[trust]",
        f"district_keys = [{keys}]",
        "",
        "[sync]",
        "enabled = true",
        f"broker_host = {_toml_string(broker.host)}",
        f"broker_port = {broker.port}",
    ]
    if broker.username is not None:
        lines.append(f"username = {_toml_string(broker.username)}")
    if broker.password is not None:
        lines.append(f"password_file = {_toml_string((config_dir / PASSWORD_NAME).resolve())}")
    if broker.tls:
        lines += ["", "[sync.tls]"]
        if broker.ca_pem is not None:
            lines.append(f"ca_file = {_toml_string((config_dir / CA_NAME).resolve())}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _cleanup_unless_accepted(files: _Files, accepted: list[bool]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if not accepted:
            files.remove()
        raise


async def provision(
    bundle: Bundle,
    *,
    config_dir: Path,
    state_dir: Path,
    timeouts: Timeouts = Timeouts(),
) -> Provisioned:
    """Run steps 2 to 5 for a checked bundle. Raises ProvisionError."""
    config_path = config_dir / CONFIG_NAME
    if config_path.exists():
        raise ProvisionError(
            "already_provisioned",
            N_("{path} already exists: this gate is provisioned. Remove it to start again"),
            path=config_path,
        )
    files = _Files()
    accepted: list[bool] = []
    with _cleanup_unless_accepted(files, accepted):
        config = _stage(bundle, files, config_dir=config_dir, state_dir=state_dir)
        staged = config_dir / (CONFIG_NAME + STAGED_SUFFIX)
        key = ensure_device_key(config.device_key_path)
        connection = Connection(
            config.sync, site=bundle.site, device=bundle.device, backoff_base_s=0.5
        )
        client = EnrollmentClient(
            connection,
            site=bundle.site,
            device=bundle.device,
            device_key=key,
            district_keys=bundle.district_key_bytes(),
        )
        downlink = Downlink(
            connection,
            site=bundle.site,
            device=bundle.device,
            cache_path=config.cache_path,
            state_dir=config.device.state_dir,
            district_keys=bundle.district_key_bytes(),
            signing_key=key,
            snapshot_retry_s=timeouts.resend_s,
        )
        tasks = [
            asyncio.create_task(connection.run(), name="provision-connection"),
            asyncio.create_task(downlink.run(), name="provision-downlink"),
        ]
        try:
            await _connect(connection, timeouts.connect_s)
            await _enroll(client, bundle.token, timeouts)
            accepted.append(True)
            log.info("device_enrolled", site=bundle.site, device=bundle.device)
            version = await _first_snapshot(downlink, config.cache_path, timeouts)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        os.replace(staged, config_path)
    return Provisioned(config_path, bytes(key.verify_key), version)


def _stage(bundle: Bundle, files: _Files, *, config_dir: Path, state_dir: Path) -> Config:
    """Write the broker files, the device key's folder and the staged config, then load it."""
    try:
        files.folder(config_dir, 0o755)
        files.folder(state_dir, 0o700)
        broker = bundle.broker
        if broker.ca_pem is not None:
            files.write(config_dir / CA_NAME, broker.ca_pem, 0o644)
        if broker.password is not None:
            files.write(config_dir / PASSWORD_NAME, broker.password, 0o600)
        staged = config_dir / (CONFIG_NAME + STAGED_SUFFIX)
        text = config_text(bundle, state_dir=state_dir, config_dir=config_dir)
        files.write(staged, text, 0o644)
        key_path = state_dir / "device.key"
        if not key_path.exists():
            files.created.append(key_path)
    except OSError as exc:
        raise ProvisionError(
            "write_failed",
            N_("Cannot write {path}: {error}"),
            path=exc.filename,
            error=exc.strerror,
        ) from exc
    try:
        return load_config(staged)
    except ConfigError as exc:
        raise ProvisionError(
            "bad_bundle",
            N_("The bundle makes an invalid config: {error}"),
            error="; ".join(f"{issue.key_path}: {issue.message}" for issue in exc.issues),
        ) from exc


async def _connect(connection: Connection, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(connection.wait_connected(), timeout_s)
    except TimeoutError:
        raise ProvisionError(
            "broker_unreachable",
            N_("Could not connect to the broker at {broker} within {seconds} s: {error}"),
            broker=f"{connection.sync.broker_host}:{connection.sync.broker_port}",
            seconds=timeout_s,
            error=connection.last_error or "-",
        ) from None


async def _enroll(client: EnrollmentClient, token: str, timeouts: Timeouts) -> None:
    try:
        await client.enroll(token, timeout_s=timeouts.enroll_s, resend_s=timeouts.resend_s)
    except EnrollmentRejected as exc:
        raise ProvisionError(
            "token_rejected",
            N_("The district rejected the enrollment ({code}): {advice}"),
            code=exc.reason,
            advice=REJECTION_ADVICE.get(exc.reason, N_("ask the district for a new bundle")),
        ) from exc
    except TimeoutError:
        raise ProvisionError(
            "enroll_timeout",
            N_(
                "The district did not answer the enrollment within {seconds} s: is its hub running?"
            ),
            seconds=timeouts.enroll_s,
        ) from None


async def _first_snapshot(downlink: Downlink, cache_path: Path, timeouts: Timeouts) -> int:
    deadline = time.monotonic() + timeouts.snapshot_s
    while True:
        version = await asyncio.to_thread(cache_version, cache_path)
        if version is not None:
            return version
        if time.monotonic() >= deadline:
            raise ProvisionError(
                "snapshot_timeout",
                N_(
                    "The device is registered, but no snapshot arrived within {seconds} s: "
                    "check that the district has published this site, then run provision again"
                ),
                seconds=timeouts.snapshot_s,
            )
        await downlink.request_snapshot()
        await asyncio.sleep(POLL_S)


REJECTION_ADVICE = {
    "unknown_token": N_("the district does not know this bundle's token: ask for a new bundle"),
    "token_used": N_("this bundle was already used by another device: ask for a new bundle"),
    "token_expired": N_("the bundle expired: ask the district for a new one"),
    "token_mismatch": N_("the token is for another gate: check the bundle"),
    "device_registered": N_("this gate id is already registered: ask the district"),
}
