"""``edgenode init`` and ``edgenode sync status``: the device key and the uplink's backlog.

The handlers print their own errors and return exit codes (0 success, 1 failure), so
``edgenode.cli`` only needs ``add_commands``. Config errors propagate to ``edgenode.cli``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from edgenode.codes import key_id_for
from edgenode.config import Config, load_config
from edgenode.i18n import N_, Translator, language_from_env, translator
from edgenode.journal import Journal, JournalError
from sync.identity import DeviceKeyError, ensure_device_key
from sync.uplink import STATE_FILE_NAME, STATUS_INTERVAL_S

EXIT_OK = 0
EXIT_FAILED = 1
DEFAULT_CONFIG = Path("/etc/edgenode/edgenode.toml")
# A state file older than this was not written by a running uplink.
STATE_STALE_S = 5 * STATUS_INTERVAL_S
STATE_WORDS = {
    "connected": N_("connected"),
    "connecting": N_("connecting"),
    "disconnected": N_("disconnected"),
}


def _load(args: argparse.Namespace) -> Config:
    path = Path(args.config or os.environ.get("EDGENODE_CONFIG", DEFAULT_CONFIG))
    config = load_config(path)
    if getattr(args, "lang", None) is None:
        args.tr = translator(config.display.language or language_from_env())
    return config


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_FAILED


# --- init ---


def _cmd_init(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    state_dir = config.device.state_dir
    key_path = config.device_key_path
    existed = key_path.exists()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ensure_device_key(key_path)
    except DeviceKeyError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(
            tr.gettext("Cannot create the state folder {path}: {error}").format(
                path=state_dir, error=exc.strerror
            )
        )
    public = bytes(key.verify_key)
    if existed:
        print(tr.gettext("Device key already exists: {path}").format(path=key_path))
    else:
        print(tr.gettext("Created the device key: {path}").format(path=key_path))
    print(
        tr.gettext("Device {device} at site {site}").format(
            device=config.device.id, site=config.device.site
        )
    )
    print(tr.gettext("Key id: {key_id}").format(key_id=key_id_for(public).hex()))
    print(tr.gettext("Public key (give this to the district):"))
    print(base64.b64encode(public).decode("ascii"))
    return EXIT_OK


# --- sync status ---


def read_sync_state(path: Path) -> dict[str, Any] | None:
    """Read the state file the uplink writes, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect_status(config: Config, now: float | None = None) -> dict[str, Any]:
    """Combine the journal's backlog with the connection state from the uplink's state file."""
    now = time.time() if now is None else now
    with Journal(config.journal_path, config.device.id) as journal:
        backlog = journal.backlog_count()
        oldest = journal.oldest_unacked()
        last_ack_at = journal.last_ack_at()
    state = read_sync_state(config.device.state_dir / STATE_FILE_NAME)
    written_at = None if state is None else state.get("written_at")
    state_age_s = None if not isinstance(written_at, int | float) else round(now - written_at, 1)
    stale = state_age_s is None or state_age_s > STATE_STALE_S
    return {
        "device": config.device.id,
        "site": config.device.site,
        "connection_state": _connection_state(config, state, stale),
        "last_error": None if state is None else state.get("last_error"),
        "state_file_age_s": state_age_s,
        "backlog": backlog,
        "oldest_unacked_seq": None if oldest is None else oldest.seq,
        "oldest_unacked_age_s": None if oldest is None else round(now - oldest.recorded_at, 1),
        "last_ack_at": last_ack_at,
        "clock_skew_s": None if state is None else state.get("clock_skew_s"),
        "outbox_alarm": bool(state and state.get("outbox_alarm")),
    }


def _connection_state(config: Config, state: dict[str, Any] | None, stale: bool) -> str:
    if not config.sync.enabled:
        return "disabled"
    return "unknown" if stale or state is None else str(state["connection_state"])


def _cmd_sync_status(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    if not config.journal_path.exists():
        return _fail(tr.gettext("Journal not found: {path}").format(path=config.journal_path))
    try:
        status = collect_status(config)
    except JournalError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(status, ensure_ascii=False, sort_keys=True))
        return EXIT_OK
    for line in format_status(status, tr):
        print(line)
    return EXIT_OK


def format_status(status: dict[str, Any], tr: Translator) -> list[str]:
    """Format the lines of ``edgenode sync status`` for people."""
    lines = [
        tr.gettext("Device {device} at site {site}").format(
            device=status["device"], site=status["site"]
        )
    ]
    age = status["state_file_age_s"]
    if status["connection_state"] == "disabled":
        lines.append(tr.gettext("Connection: sync is disabled in the config ([sync] enabled)"))
    elif status["connection_state"] == "unknown":
        if age is None:
            lines.append(tr.gettext("Connection: unknown (no state file: is the daemon running?)"))
        else:
            lines.append(
                tr.gettext(
                    "Connection: unknown (state file is {age} s old: is the daemon running?)"
                ).format(age=age)
            )
    else:
        lines.append(
            tr.gettext("Connection: {state} (as of {age} s ago)").format(
                state=tr.gettext(STATE_WORDS.get(status["connection_state"], "unknown")), age=age
            )
        )
    if status["last_error"]:
        lines.append(tr.gettext("Last error: {error}").format(error=status["last_error"]))
    lines.append(tr.gettext("Records not yet acked: {n}").format(n=status["backlog"]))
    if status["oldest_unacked_seq"] is not None:
        lines.append(
            tr.gettext("Oldest unacked record: #{seq}, {age} s old").format(
                seq=status["oldest_unacked_seq"], age=status["oldest_unacked_age_s"]
            )
        )
    if status["last_ack_at"] is None:
        lines.append(tr.gettext("Last ack: never"))
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["last_ack_at"]))
        lines.append(tr.gettext("Last ack: {time}").format(time=when))
    if status["clock_skew_s"] is not None:
        lines.append(
            tr.gettext("Clock skew against the district: {skew} s").format(
                skew=status["clock_skew_s"]
            )
        )
    if status["outbox_alarm"]:
        lines.append(tr.gettext("Alarm: the outbox is over its bound (outbox_full)"))
    return lines


def add_commands(commands: Any) -> None:
    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            help=f"config file (default: $EDGENODE_CONFIG, else {DEFAULT_CONFIG})",
        )

    init = commands.add_parser(
        "init", help="create the state folder and the device key, and print its public key"
    )
    with_config(init)
    init.set_defaults(handler=_cmd_init)

    sync = commands.add_parser("sync", help="the uplink to the district").add_subparsers(
        dest="sync_command", required=True, metavar="COMMAND"
    )
    status = sync.add_parser("status", help="connection state, backlog and last ack")
    with_config(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_cmd_sync_status)
