"""``edgenode decommission``: retire a gate so that it keeps no personal data.

The steps, in order:

1. Check that ``edgenode run`` is stopped.
2. Deliver the journal's backlog to the district, or discard it with ``--force``.
3. Ask the district to disable the device, in a message signed by the device key, and wait
   for its signed confirmation.
4. Overwrite and delete the state folder (cache, journal, keys, backups, files moved aside),
   the config file and the broker secrets it names, then check that none of them remains.

NOTE: zeroing a file before deleting it does not reach every copy on flash storage: an SD
card's wear levelling can keep old blocks. A card that held personal data is retired by
reformatting or destroying it, unless the state folder sat on an encrypted volume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from nacl.signing import SigningKey

from edgenode.config import Config, load_config
from edgenode.district_trust import DistrictTrust, unknown_signer_fields
from edgenode.i18n import N_, Translator, language_from_env, translator
from edgenode.journal import Journal, JournalError
from sync.connection import Connection, NotConnected
from sync.identity import DeviceKeyError, ensure_device_key
from sync.protocol import MessageError, decode_message, encode_message
from sync.uplink import STATE_FILE_NAME, Uplink

log = structlog.get_logger("edgenode.decommission")

DEFAULT_CONFIG = Path("/etc/edgenode/edgenode.toml")
DEFAULT_TIMEOUT_S = 60.0
# How often the backlog is counted while it drains.
POLL_INTERVAL_S = 0.5
WIPE_BLOCK_BYTES = 1024 * 1024
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class DecommissionError(Exception):
    """A step that failed. ``reason`` is a stable snake_case code for logs and tests."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# --- the checks before anything is deleted ---


def running_daemon_pid(state_dir: Path) -> int | None:
    """Return the pid of an ``edgenode run`` that wrote the sync state file and still runs."""
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text(encoding="utf-8"))
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or b"edgenode" not in cmdline:
        return None
    return pid


def backlog_count(config: Config) -> int:
    """Count the journal's records without a district ack (0 when there is no journal)."""
    if not config.journal_path.exists():
        return 0
    with Journal(config.journal_path, config.device.id) as journal:
        return journal.backlog_count()


async def deliver_backlog(config: Config, device_key: SigningKey, timeout_s: float) -> int:
    """Run the uplink until the district has acked every record or the time is up.

    Returns the number of records still without an ack.
    """
    connection = Connection(config.sync, site=config.device.site, device=config.device.id)
    uplink = Uplink.from_config(config, connection, device_key)
    tasks = [
        asyncio.create_task(connection.run(), name="decommission-connection"),
        asyncio.create_task(uplink.run(), name="decommission-uplink"),
    ]
    deadline = time.monotonic() + timeout_s
    remaining = backlog_count(config)
    try:
        while remaining and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL_S)
            if any(task.done() for task in tasks):
                break
            remaining = await asyncio.to_thread(backlog_count, config)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return remaining


async def request_disable(
    config: Config, device_key: SigningKey, *, discarded: int, timeout_s: float
) -> None:
    """Ask the district to disable this device and wait for its signed confirmation.

    Raises DecommissionError (not_connected, not_confirmed) when the time is up first.
    """
    connection = Connection(config.sync, site=config.device.site, device=config.device.id)
    topics = connection.topics
    trust = DistrictTrust(config.trust.district_key_bytes(), config.cache_path)
    confirmed = asyncio.Event()

    async def on_message(message: aiomqtt.Message) -> None:
        if not isinstance(message.payload, bytes):
            return
        try:
            body = decode_message(message.payload, trust.key_ids())
        except MessageError as exc:
            explanation = unknown_signer_fields(trust) if exc.reason == "unknown_signer" else {}
            log.warning("confirmation_rejected", reason=exc.reason, **explanation)
            return
        if (
            body.get("type") == "decommissioned"
            and body.get("site") == topics.site
            and body.get("device") == topics.device
        ):
            confirmed.set()

    connection.subscribe(topics.acks, on_message)
    runner = asyncio.create_task(connection.run(), name="decommission-request")
    try:
        async with asyncio.timeout(timeout_s):
            await _publish_request(connection, device_key, discarded)
            await confirmed.wait()
    except TimeoutError as exc:
        if not connection.connected:
            raise DecommissionError(
                "not_connected", f"broker unreachable: {connection.last_error}"
            ) from exc
        raise DecommissionError(
            "not_confirmed", f"no confirmation from the district within {timeout_s:g} s"
        ) from exc
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _publish_request(connection: Connection, device_key: SigningKey, discarded: int) -> None:
    """Publish the signed request once connected, again after each lost connection."""
    topics = connection.topics
    body = {
        "type": "decommission",
        "site": topics.site,
        "device": topics.device,
        "requested_at": time.time(),
        "discarded_records": discarded,
    }
    payload = encode_message(body, device_key)
    while True:  # Ends when published, or when the caller's timeout cancels it.
        await connection.wait_connected()
        try:
            await connection.publish(topics.priority, payload, qos=1)
        except NotConnected:
            await asyncio.sleep(POLL_INTERVAL_S)
            continue
        log.info("decommission_requested", site=topics.site, device=topics.device)
        return


# --- the wipe ---


def wipe_targets(config: Config, config_path: Path) -> list[Path]:
    """List the files and folders that hold this gate's data, keys or secrets."""
    targets = [config.device.state_dir, config_path]
    sync = config.sync
    if sync.password_file is not None:
        targets.append(sync.password_file)
    if sync.tls is not None:
        targets += [path for path in (sync.tls.key_file, sync.tls.cert_file) if path is not None]
    guard = getattr(config, "guard", None)
    lookup_key = getattr(guard, "id_lookup_key_file", None)
    if isinstance(lookup_key, Path):
        targets.append(lookup_key)
    return targets


def wipe(targets: Iterable[Path]) -> tuple[int, list[Path]]:
    """Zero and delete each file, and each folder with everything in it.

    Returns (files removed, paths that still exist afterwards). Symbolic links are removed
    and never followed.
    """
    removed = 0
    for target in targets:
        if target.is_dir() and not target.is_symlink():
            for folder, folders, files in os.walk(target, topdown=False):
                # os.walk lists a link to a folder among the folders and does not enter it.
                links = [name for name in folders if (Path(folder) / name).is_symlink()]
                for name in [*files, *links]:
                    removed += _wipe_file(Path(folder) / name)
                _remove_folder(Path(folder))
        elif os.path.lexists(target):
            removed += _wipe_file(target)
    remaining = [target for target in targets if os.path.lexists(target)]
    return removed, remaining


def _wipe_file(path: Path) -> int:
    try:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            _zero(path, info.st_size)
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("wipe_failed", path=str(path), error=str(exc))
        return 0
    return 1


def _zero(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        block = bytes(min(size, WIPE_BLOCK_BYTES))
        written = 0
        while written < size:
            written += os.write(fd, block[: size - written])
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError as exc:
        log.error("wipe_failed", path=str(folder), error=str(exc))


# --- the command ---

CONFIRM_FIRST = N_("This deletes every file of gate {device}. Add --yes to go ahead.")
DAEMON_RUNNING = N_(
    "edgenode run is still running (pid {pid}). Stop it first, "
    "for example with systemctl stop edgenode."
)
COULD_NOT_REMOVE = N_("Could not remove {path}")
WIPED = N_("Removed {n} files. No data of gate {device} remains.")
UNSENT_SYNC_DISABLED = N_(
    "{n} records were never sent to the district, and sync is disabled. "
    "Use --force to discard them."
)
DISABLE_BY_HAND = N_("Sync is disabled: disable gate {device} at the district by hand.")
DELIVERING = N_("Delivering {n} records to the district.")
STILL_UNACKED = N_(
    "{n} records still have no ack from the district. Run this again when the district "
    "is reachable, or use --force to discard them."
)
NOT_CONFIRMED = N_(
    "The district did not confirm that gate {device} is disabled: {error}. "
    "Use --force to wipe the gate anyway."
)
NOT_CONFIRMED_FORCED = N_(
    "The district did not confirm: disable gate {device} at the district by hand."
)
CONFIRMED = N_("The district disabled gate {device}.")


def _cmd_decommission(args: argparse.Namespace) -> int:
    config_path = Path(args.config or os.environ.get("EDGENODE_CONFIG", DEFAULT_CONFIG))
    config = load_config(config_path)
    if getattr(args, "lang", None) is None:
        args.tr = translator(config.display.language or language_from_env())
    tr: Translator = args.tr
    device = config.device.id
    if not args.yes:
        print(tr.gettext(CONFIRM_FIRST).format(device=device))
        return EXIT_USAGE
    pid = running_daemon_pid(config.device.state_dir)
    if pid is not None:
        print(tr.gettext(DAEMON_RUNNING).format(pid=pid))
        return EXIT_FAILED
    try:
        _tell_district(config, args, tr)
    except DecommissionError as exc:
        print(str(exc))
        return EXIT_FAILED

    removed, remaining = wipe(wipe_targets(config, config_path))
    for path in remaining:
        print(tr.gettext(COULD_NOT_REMOVE).format(path=path))
    if remaining:
        return EXIT_FAILED
    log.warning("device_wiped", device=device, files=removed)
    print(tr.gettext(WIPED).format(n=removed, device=device))
    return EXIT_OK


def _tell_district(config: Config, args: argparse.Namespace, tr: Translator) -> None:
    """Deliver the backlog and get the district's confirmation, as far as --force allows."""
    device = config.device.id
    try:
        backlog = backlog_count(config)
    except JournalError as exc:
        if not args.force:
            raise DecommissionError("journal_unreadable", str(exc)) from exc
        backlog = 0
    if not config.sync.enabled:
        if backlog and not args.force:
            message = tr.gettext(UNSENT_SYNC_DISABLED).format(n=backlog)
            raise DecommissionError("backlog", message)
        print(tr.gettext(DISABLE_BY_HAND).format(device=device))
        return

    try:
        device_key = ensure_device_key(config.device_key_path)
    except DeviceKeyError as exc:
        raise DecommissionError("device_key", str(exc)) from exc
    if backlog:
        print(tr.gettext(DELIVERING).format(n=backlog))
        backlog = asyncio.run(deliver_backlog(config, device_key, args.timeout_s))
        if backlog and not args.force:
            raise DecommissionError("backlog", tr.gettext(STILL_UNACKED).format(n=backlog))

    try:
        asyncio.run(
            request_disable(config, device_key, discarded=backlog, timeout_s=args.timeout_s)
        )
    except DecommissionError as exc:
        if not args.force:
            message = tr.gettext(NOT_CONFIRMED).format(device=device, error=exc)
            raise DecommissionError(exc.reason, message) from exc
        print(tr.gettext(NOT_CONFIRMED_FORCED).format(device=device))
        return
    print(tr.gettext(CONFIRMED).format(device=device))


def add_commands(commands: Any) -> None:
    decommission = commands.add_parser(
        "decommission",
        help="deliver the backlog, have the district disable this gate, then wipe its data",
    )
    decommission.add_argument(
        "--config", help=f"config file (default: $EDGENODE_CONFIG, else {DEFAULT_CONFIG})"
    )
    decommission.add_argument(
        "--yes", action="store_true", help="confirm that every file of this gate is deleted"
    )
    decommission.add_argument(
        "--force",
        action="store_true",
        help="wipe even when records are undelivered or the district does not confirm",
    )
    decommission.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the backlog, and again for the district's confirmation "
        f"(default: {DEFAULT_TIMEOUT_S:g})",
    )
    decommission.set_defaults(handler=_cmd_decommission)
