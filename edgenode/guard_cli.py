"""``edgenode guard add|list|remove``: the guards who may sign in at this gate with a PIN.

A PIN is read without echo from a terminal (typed twice), or as the first line of standard
input for scripts. It is never printed, logged or passed on the command line, where other
users could read it in the process list.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgenode.config import Config, load_config
from edgenode.guards import GuardStore, GuardStoreError, check_guard_id, check_pin
from edgenode.i18n import Translator, language_from_env, translator

EXIT_OK = 0
EXIT_FAILED = 1
DEFAULT_CONFIG = Path("/etc/edgenode/edgenode.toml")


def _load(args: argparse.Namespace) -> Config:
    path = Path(args.config or os.environ.get("EDGENODE_CONFIG", DEFAULT_CONFIG))
    config = load_config(path)
    if getattr(args, "lang", None) is None:
        args.tr = translator(config.display.language or language_from_env())
    return config


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_FAILED


def _read_pin(tr: Translator) -> str:
    """Read a PIN without echo from a terminal, typed twice, or one line from a pipe."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    pin = getpass.getpass(tr.gettext("PIN (6 to 12 digits): "))
    again = getpass.getpass(tr.gettext("PIN again: "))
    if pin != again:
        raise GuardStoreError("pin_mismatch", tr.gettext("The two PINs differ."))
    return pin


def _cmd_add(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    store = GuardStore(config.guards_path)
    try:
        check_guard_id(args.guard_id)
        if store.exists(args.guard_id):
            raise GuardStoreError(
                "guard_exists",
                tr.gettext("Guard {guard} exists: remove it first to set a new PIN.").format(
                    guard=args.guard_id
                ),
            )
        pin = _read_pin(tr)
        check_pin(pin)
        store.add(args.guard_id, pin)
    except GuardStoreError as exc:
        return _fail(_message(tr, exc))
    print(tr.gettext("Guard {guard} added.").format(guard=args.guard_id))
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    try:
        guards = GuardStore(config.guards_path).guards()
    except GuardStoreError as exc:
        return _fail(str(exc))
    for guard in guards:
        added = datetime.fromtimestamp(guard.added_at, UTC).isoformat(timespec="seconds")
        if args.json:
            row: dict[str, Any] = {"guard_id": guard.guard_id, "added_at": guard.added_at}
            print(json.dumps(row))
        else:
            print(f"{guard.guard_id}\t{added}")
    if not guards and not args.json:
        print(tr.gettext("No guards yet: add one with 'edgenode guard add GUARD_ID'."))
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    try:
        GuardStore(config.guards_path).remove(args.guard_id)
    except GuardStoreError as exc:
        return _fail(_message(tr, exc))
    print(tr.gettext("Guard {guard} removed.").format(guard=args.guard_id))
    return EXIT_OK


def _message(tr: Translator, exc: GuardStoreError) -> str:
    if exc.reason == "pin_invalid":
        return tr.gettext("A PIN has 6 to 12 digits and nothing else.")
    if exc.reason == "invalid_guard_id":
        return tr.gettext("A guard id has 1 to 32 of A-Z a-z 0-9 _ -.")
    if exc.reason == "unknown_guard":
        return tr.gettext("Guard not found.")
    return str(exc)


def add_commands(commands: Any) -> None:
    guard = commands.add_parser(
        "guard", help="guards who sign in at this gate with a PIN"
    ).add_subparsers(dest="guard_command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            help=f"config file (default: $EDGENODE_CONFIG, else {DEFAULT_CONFIG})",
        )

    add = guard.add_parser(
        "add",
        help="add a guard; the PIN is read without echo, or as one line from standard input",
    )
    with_config(add)
    add.add_argument("guard_id", help="guard id: 1 to 32 of A-Z a-z 0-9 _ -")
    add.set_defaults(handler=_cmd_add)

    listing = guard.add_parser("list", help="list the guards and when each was added (UTC)")
    with_config(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object per guard")
    listing.set_defaults(handler=_cmd_list)

    remove = guard.add_parser("remove", help="remove a guard; its PIN stops working at once")
    with_config(remove)
    remove.add_argument("guard_id", help="guard id")
    remove.set_defaults(handler=_cmd_remove)
