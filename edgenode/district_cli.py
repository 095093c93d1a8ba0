"""``edgenode district issue``: mint keys, codes, snapshots and whole demo sites."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from edgenode.codes import Colour, Role, encode_community, encode_health
from edgenode.district import (
    KEY_FILES,
    DemoResident,
    KeyFileError,
    build_snapshot,
    generate_roster,
    issuer_record,
    load_records,
    public_key_b64,
    read_key,
    roster_records,
    write_key,
)
from edgenode.i18n import Translator
from edgenode.id_numbers import new_id_lookup_key, write_id_lookup_key

DAY_S = 86_400
YEAR_S = 365 * DAY_S


class DistrictError(Exception):
    """A district command that cannot be carried out, with a message for the user."""


def _subject(value: str) -> bytes:
    try:
        subject = bytes.fromhex(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not hexadecimal: {value!r}") from exc
    if len(subject) != 16:
        raise argparse.ArgumentTypeError("a subject is 16 bytes: 32 hexadecimal digits")
    return subject


def _key(path: str) -> Any:
    try:
        return read_key(Path(path))
    except KeyFileError as exc:
        raise DistrictError(str(exc)) from exc


def _times(args: argparse.Namespace) -> tuple[int, int]:
    issued_at = int(time.time()) if args.issued_at is None else int(args.issued_at)
    return issued_at, issued_at + int(args.valid_for)


def _write_png(args: argparse.Namespace, text: str, colour: str | None = None) -> None:
    if args.png is None:
        return
    from edgenode.demo.render import write_code_png

    write_code_png(text, Path(args.png), colour=colour)


def _cmd_keys(args: argparse.Namespace) -> int:
    out = Path(args.out)
    tr: Translator = args.tr
    for role, name in KEY_FILES.items():
        path = out / name
        try:
            write_key(path, _new_key())
        except FileExistsError as exc:
            raise DistrictError(
                tr.gettext("{path} already exists; keys are never overwritten").format(path=path)
            ) from exc
        print(f"{role}\t{path}\t{public_key_b64(read_key(path))}")
    # The ID lookup key is a secret shared with the gates, so only its path is printed.
    path = out / ID_LOOKUP_KEY_FILE
    try:
        write_id_lookup_key(path, new_id_lookup_key())
    except FileExistsError as exc:
        raise DistrictError(
            tr.gettext("{path} already exists; keys are never overwritten").format(path=path)
        ) from exc
    print(f"id_lookup\t{path}\t-")
    return 0


def _new_key() -> SigningKey:
    return SigningKey.generate()


ID_LOOKUP_KEY_FILE = "id-lookup.key"


def _cmd_health(args: argparse.Namespace) -> int:
    issued_at, expires_at = _times(args)
    text = encode_health(
        _key(args.key),
        subject=args.subject,
        colour=Colour[args.colour.upper()],
        issued_at=issued_at,
        expires_at=expires_at,
        printed=args.printed,
    )
    png_colour = args.png_colour or args.colour
    _write_png(args, text, None if png_colour == "black" else png_colour)
    print(text)
    return 0


def _cmd_community(args: argparse.Namespace) -> int:
    issued_at, expires_at = _times(args)
    try:
        text = encode_community(
            _key(args.key),
            subject=args.subject,
            role=Role(args.role),
            compound=args.compound,
            building=args.building,
            unit=args.unit,
            issued_at=issued_at,
            expires_at=expires_at,
            printed=args.printed,
        )
    except ValueError as exc:
        raise DistrictError(str(exc)) from exc
    _write_png(args, text)
    print(text)
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    issued_at, _ = _times(args)
    try:
        records = list(load_records(Path(args.records)))
    except ValueError as exc:
        raise DistrictError(str(exc)) from exc
    header = build_snapshot(
        Path(args.out),
        records,
        district_key=_key(args.key),
        site=args.site,
        version=args.version,
        issued_at=issued_at,
        valid_for_s=int(args.valid_for),
    )
    tr: Translator = args.tr
    print(
        tr.gettext("Wrote snapshot {path}: site {site}, version {version}, {count} records").format(
            path=args.out, site=header.site, version=header.version, count=header.record_count
        )
    )
    return 0


def roster_json(roster: list[DemoResident]) -> list[dict[str, str]]:
    return [
        {
            "subject": person.subject.hex(),
            "health_subject": person.health_subject.hex(),
            "display_name": person.display_name,
            "building": person.building,
            "unit": person.unit,
            "role": person.role.value,
        }
        for person in roster
    ]


def site_records(
    keys: dict[str, SigningKey], roster: list[dict[str, str]], site: str, now: int
) -> list[dict[str, Any]]:
    """Snapshot records for a site: both issuer keys, then the roster with green statuses."""
    key_valid_from, key_valid_until = now - YEAR_S, now + 2 * YEAR_S
    records: list[dict[str, Any]] = [
        issuer_record(keys["health"], ["health"], key_valid_from, key_valid_until),
        issuer_record(keys["community"], ["community"], key_valid_from, key_valid_until),
    ]
    residents = [
        DemoResident(
            subject=bytes.fromhex(person["subject"]),
            health_subject=bytes.fromhex(person["health_subject"]),
            display_name=person["display_name"],
            building=person["building"],
            unit=person["unit"],
            role=Role(person["role"]),
        )
        for person in roster
    ]
    records.extend(roster_records(residents, site, now - YEAR_S, now + YEAR_S, now - 3600))
    return records


def create_site(
    out: Path,
    *,
    site: str,
    residents: int,
    seed: int = 0,
    device_id: str = "gate-01",
    now: int | None = None,
) -> dict[str, Any]:
    """Create a complete site: keys, roster, signed snapshot and a device config.

    Returns a summary with the paths. Refuses to reuse a folder that already has keys.
    """
    now = int(time.time()) if now is None else now
    out.mkdir(parents=True, exist_ok=True)
    keys = {}
    for role, name in KEY_FILES.items():
        write_key(out / name, _new_key())
        keys[role] = read_key(out / name)
    roster = generate_roster(residents, seed=seed)
    roster_path = out / "roster.json"
    roster_path.write_text(
        json.dumps(roster_json(roster), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    snapshot_path = out / "snapshot.ensnap"
    build_snapshot(
        snapshot_path,
        site_records(keys, roster_json(roster), site, now),
        district_key=keys["district"],
        site=site,
        version=1,
        issued_at=now - 600,
        valid_for_s=7 * DAY_S,
    )
    config_path = out / "edgenode.toml"
    config_path.write_text(
        f"""# Device config for the site {site}, written by 'edgenode district issue site'.
[device]
id = "{device_id}"
site = "{site}"
station = "north-gate"
state_dir = "state"

[trust]
district_keys = ["{public_key_b64(keys["district"])}"]
""",
        encoding="utf-8",
    )
    return {
        "site": site,
        "folder": str(out),
        "config": str(config_path),
        "snapshot": str(snapshot_path),
        "roster": str(roster_path),
        "residents": residents,
    }


def _cmd_site(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if any((out / name).exists() for name in KEY_FILES.values()):
        raise DistrictError(f"{out} already holds keys; choose an empty folder")
    summary = create_site(out, site=args.site, residents=args.residents, seed=args.seed)
    tr: Translator = args.tr
    print(tr.gettext("Created site {site} in {folder}: {residents} residents").format(**summary))
    print(tr.gettext("Config: {config}").format(**summary))
    print(tr.gettext("Snapshot: {snapshot}").format(**summary))
    return 0


def add_commands(commands: Any) -> None:
    from edgenode import enroll_cli, feeds_cli, hub_cli, report_cli

    district = commands.add_parser("district", help="district-side tools").add_subparsers(
        dest="district_command", required=True, metavar="COMMAND"
    )
    hub_cli.add_commands(district)
    report_cli.add_commands(district)
    feeds_cli.add_commands(district)
    enroll_cli.add_district_commands(district)
    # 'edgenode provision' is a gate command, but it is added here with the 'district enroll'
    # that writes its bundle, so that both live in enroll_cli.
    enroll_cli.add_commands(commands)
    issue = district.add_parser("issue", help="mint keys, codes and snapshots").add_subparsers(
        dest="issue_command", required=True, metavar="WHAT"
    )

    keys = issue.add_parser("keys", help="create district and issuer keys in a folder")
    keys.add_argument("--out", required=True, help="folder for the key files")
    keys.set_defaults(handler=_cmd_keys)

    def code_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--key", required=True, help="issuer key file")
        sub.add_argument(
            "--subject", required=True, type=_subject, help="pseudonymous subject, 32 hex digits"
        )
        sub.add_argument("--printed", action="store_true", help="a printed code, valid for months")
        sub.add_argument("--issued-at", type=int, help="issue time, Unix seconds (default: now)")
        sub.add_argument(
            "--valid-for", type=int, default=DAY_S, help="validity in seconds (default: 86400)"
        )
        sub.add_argument("--png", help="also write the code as a PNG image")

    health = issue.add_parser("health", help="mint a signed health code")
    code_options(health)
    health.add_argument("--colour", required=True, choices=["green", "yellow", "red"])
    health.add_argument(
        "--png-colour",
        choices=["black", "green", "yellow", "red"],
        help="module colour in the PNG (default: the status colour)",
    )
    health.set_defaults(handler=_cmd_health)

    community = issue.add_parser("community", help="mint a signed community code")
    code_options(community)
    community.add_argument("--role", default="resident", choices=[role.value for role in Role])
    community.add_argument("--compound", required=True, help="compound id")
    community.add_argument("--building", required=True)
    community.add_argument("--unit", default="")
    community.set_defaults(handler=_cmd_community)

    snapshot = issue.add_parser(
        "snapshot", help="build a signed snapshot from a JSON file of records"
    )
    snapshot.add_argument("--key", required=True, help="district key file")
    snapshot.add_argument("--site", required=True, help="compound id")
    snapshot.add_argument(
        "--records", required=True, help="JSON object: dataset name to a list of records"
    )
    snapshot.add_argument("--out", required=True, help="snapshot file to write")
    snapshot.add_argument("--version", type=int, default=1, help="dataset version (default: 1)")
    snapshot.add_argument("--issued-at", type=int, help="issue time, Unix seconds (default: now)")
    snapshot.add_argument(
        "--valid-for", type=int, default=7 * DAY_S, help="validity in seconds (default: 7 days)"
    )
    snapshot.set_defaults(handler=_cmd_snapshot)

    site = issue.add_parser("site", help="create keys, a roster, a snapshot and a device config")
    site.add_argument("--out", required=True, help="empty folder for the site")
    site.add_argument("--site", default="XH-0012", help="compound id (default: XH-0012)")
    site.add_argument("--residents", type=int, default=200, help="roster size (default: 200)")
    site.add_argument("--seed", type=int, default=0, help="roster random seed (default: 0)")
    site.set_defaults(handler=_cmd_site)
