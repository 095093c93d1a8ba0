"""``district keys``, ``district enroll`` and ``edgenode provision``: keys and new gates.

The district commands read the hub's TOML config (edgenode/hub_cli.py): the key folder is the
folder of its ``district_key_file``, and enrollment tokens go into its store. Errors reach
the user as DistrictError, which ``edgenode.cli`` prints with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from pydantic import ValidationError

from edgenode.config import DeviceConfig
from edgenode.district import KeyFileError
from edgenode.district_cli import DistrictError
from edgenode.district_keyring import (
    DistrictKeyEntry,
    DistrictSigner,
    announced_district_keys,
    describe_district_keys,
    rotate_district_key,
)
from edgenode.district_keys import (
    ISSUER_ROLES,
    ActiveIssuerKey,
    KeyringError,
    active_issuer_keys,
    describe_keys,
    fingerprint,
    rotate_issuer_key,
)
from edgenode.enrollment import (
    BrokerSettings,
    Bundle,
    BundleError,
    parse_broker_url,
    read_bundle,
    write_bundle,
)
from edgenode.hub_cli import HubConfig, load_hub_config
from edgenode.i18n import N_, Translator
from edgenode.provision import (
    ProvisionError,
    Timeouts,
    check_bundle,
    provision,
)
from sync.enrollment import hash_token, new_token
from sync.hub_store import HubStoreError
from sync.identity import DeviceKeyError
from sync.store_backend import StoreUnavailable, open_store

DAY_S = 86_400
BUNDLE_ADVICE = {
    "unreadable": N_("The bundle file cannot be read: check the path and the permissions."),
    "bad_format": N_("The file is not an enrollment bundle, or it is damaged: ask for a new one."),
    "bad_signature": N_(
        "The bundle's signature does not verify: the file was changed or damaged, so do not "
        "use it, and ask the district for a new one."
    ),
}
STATE_WORDS = {
    "in use": N_("in use"),
    "retiring": N_("retiring"),
    "retired": N_("retired"),
    "announced": N_("announced"),
}


def _when(tr: Translator, seconds: int | None) -> str:
    if seconds is None or seconds >= 2**32 - 1:
        return tr.gettext("no end")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _key_folder(args: argparse.Namespace) -> tuple[Path, HubConfig]:
    config = load_hub_config(Path(args.config))
    return config.district_key_file.parent, config


# --- district keys ---


def _cmd_keys_show(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    folder, config = _key_folder(args)
    try:
        now = int(time.time())
        rows = describe_district_keys(config.district_key_file, now) + [
            row for row in describe_keys(folder, now) if row["role"] != "district"
        ]
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    if args.json:
        print(json.dumps({"keys": rows}, ensure_ascii=False, indent=1))
        return 0
    unsafe = False
    for row in rows:
        state = tr.gettext(STATE_WORDS[row["state"]])
        validity = tr.gettext("{start} to {end}").format(
            start=_when(tr, row["valid_from"]) if row["valid_from"] else "-",
            end=_when(tr, row["valid_until"]),
        )
        print(f"{row['role']}\t{state}\t{row['fingerprint']}\t{validity}\t{row['file']}")
        if row["owner_only"] is False:
            unsafe = True
            print(
                tr.gettext(
                    "Warning: {file} is readable by others: run 'chmod 600 {file}' and replace "
                    "the key if others may have copied it"
                ).format(file=row["file"])
            )
    return 1 if unsafe else 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    if args.role == "district":
        return _rotate_district_key(args)
    tr: Translator = args.tr
    folder, _ = _key_folder(args)
    overlap_s = int(args.overlap_days * DAY_S)
    try:
        rotation = rotate_issuer_key(folder, args.role, overlap_s=overlap_s, now=int(time.time()))
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    print(
        tr.gettext(
            "New {role} issuer key {key_id} in {file}: sign new codes with it from now on"
        ).format(role=args.role, key_id=rotation.new.key_id, file=folder / rotation.new.file)
    )
    print(
        tr.gettext(
            "The old key {key_id} is trusted until {end}; run 'edgenode district publish' for "
            "each site now, and again after that time so the gates drop it"
        ).format(key_id=rotation.old.key_id, end=_when(tr, rotation.old.valid_until))
    )
    return 0


def _rotate_district_key(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    _, config = _key_folder(args)
    key_file = config.district_key_file
    try:
        rotation = rotate_district_key(
            key_file, overlap_s=int(args.overlap_days * DAY_S), now=int(time.time())
        )
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    print(
        tr.gettext(
            "New district key {key_id} in {file}: the gates receive it with the next dataset "
            "versions"
        ).format(key_id=rotation.new.key_id, file=key_file.parent / rotation.new.file)
    )
    print(
        tr.gettext(
            "The hubs sign with the new key from {start}, and the old key {key_id} is "
            "announced until {end}. Run 'edgenode district publish' for each site now, and "
            "again after {end} so the gates drop the old key"
        ).format(
            start=_when(tr, rotation.new.signs_from),
            key_id=rotation.old.key_id,
            end=_when(tr, rotation.old.valid_until),
        )
    )
    print(
        tr.gettext(
            "A gate offline for the whole first half of the overlap rejects the new key's "
            "data: add the new key to its trust.district_keys"
        )
    )
    return 0


# --- district enroll ---


def _read_optional(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DistrictError(f"cannot read the {what} file {path}: {exc}") from exc


def _check_gate(args: argparse.Namespace) -> None:
    """Check the gate's names against the gate's config model before a token is stored."""
    try:
        DeviceConfig(id=args.gate, site=args.site, station=args.station)
    except ValidationError as exc:
        issues = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise DistrictError(f"invalid gate for a config: {issues}") from exc
    if args.valid_for <= 0:
        raise DistrictError(
            f"--valid-for must be a positive number of seconds, not {args.valid_for}"
        )


def _build_bundle(
    args: argparse.Namespace,
    district_key: SigningKey,
    issuers: list[ActiveIssuerKey],
    now: int,
    announced: list[DistrictKeyEntry],
) -> Bundle:
    try:
        host, port, tls = parse_broker_url(args.broker)
    except ValueError as exc:
        raise DistrictError(str(exc)) from exc
    if args.ca_file is not None and not tls:
        raise DistrictError(args.tr.gettext("--ca-file needs an mqtts:// broker address"))
    if not tls:
        warning = args.tr.gettext(
            "Warning: {broker} has no TLS, so the gate's traffic and broker password cross the "
            "network in clear text. Use mqtts:// outside tests."
        )
        print(warning.format(broker=args.broker), file=sys.stderr)
    broker = BrokerSettings(
        host=host,
        port=port,
        tls=tls,
        ca_pem=_read_optional(args.ca_file, "CA certificate"),
        username=args.username,
        password=_read_optional(args.password_file, "password"),
    )
    return Bundle(
        site=args.site,
        device=args.gate,
        station=args.station,
        broker=broker,
        district_keys=_bundle_district_keys(district_key, announced),
        issuers=tuple(
            {
                "role": issuer.role,
                "public_key": bytes(issuer.key.verify_key).hex(),
                "valid_from": issuer.valid_from,
                "valid_until": issuer.valid_until,
            }
            for issuer in issuers
        ),
        token=new_token(),
        issued_at=now,
        expires_at=now + args.valid_for,
    )


def _bundle_district_keys(
    district_key: SigningKey, announced: list[DistrictKeyEntry]
) -> tuple[str, ...]:
    """Return the signing key, then the other announced district keys, in base64.

    During a rotation's overlap the new gate then trusts the old and the new key, as the
    gates that received the announcement do.
    """
    signing = bytes(district_key.verify_key)
    others = [bytes.fromhex(entry.public_key) for entry in announced]
    keys = [signing] + [key for key in others if key != signing]
    return tuple(base64.b64encode(key).decode("ascii") for key in keys)


def _cmd_enroll(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    folder, config = _key_folder(args)
    _check_gate(args)
    out = Path(args.out)
    if out.exists():
        raise DistrictError(
            tr.gettext("{path} already exists; choose another file").format(path=out)
        )
    now = int(time.time())
    try:
        district_key = DistrictSigner(config.district_key_file)()
        issuers = active_issuer_keys(folder, now)
        announced = announced_district_keys(config.district_key_file, now)
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    bundle = _build_bundle(args, district_key, issuers, now, announced)

    # The token is stored before the file is written, so a bundle never carries a token that
    # the hub does not know.
    try:
        with open_store(config.store) as store:
            store.add_enrollment_token(
                hash_token(bundle.token),
                args.site,
                args.gate,
                expires_at=bundle.expires_at,
                now=now,
            )
    except (HubStoreError, StoreUnavailable) as exc:
        raise DistrictError(str(exc)) from exc
    try:
        write_bundle(out, bundle, district_key)
    except FileExistsError as exc:
        raise DistrictError(
            tr.gettext("{path} already exists; choose another file").format(path=out)
        ) from exc

    print(
        tr.gettext("Wrote the enrollment bundle {path} for {gate} at {site}").format(
            path=out, gate=args.gate, site=args.site
        )
    )
    print(tr.gettext("The token expires at {time}").format(time=_when(tr, bundle.expires_at)))
    print(
        tr.gettext("District key fingerprint, for the installer: {fingerprint}").format(
            fingerprint=fingerprint(bytes(district_key.verify_key))
        )
    )
    return 0


# --- edgenode provision ---


def _cmd_provision(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    try:
        bundle, signer = read_bundle(Path(args.bundle))
        check_bundle(bundle, signer, expected_fingerprint=args.district_key, now=time.time())
        print(
            tr.gettext(
                "Bundle for {gate} at {site}, signed by the district key {fingerprint}"
            ).format(gate=bundle.device, site=bundle.site, fingerprint=fingerprint(signer))
        )
        if args.district_key is None:
            print(tr.gettext("Compare this fingerprint with the one the district gave you."))
        timeouts = Timeouts(connect_s=args.timeout, enroll_s=args.timeout, snapshot_s=args.timeout)
        result = asyncio.run(
            provision(
                bundle,
                config_dir=Path(args.config_dir),
                state_dir=Path(args.state_dir),
                timeouts=timeouts,
            )
        )
    except BundleError as exc:
        advice = BUNDLE_ADVICE.get(exc.reason, BUNDLE_ADVICE["bad_format"])
        raise DistrictError(
            tr.gettext("Invalid enrollment bundle ({reason}): {error}").format(
                reason=exc.reason, error=exc
            )
            + "\n"
            + tr.gettext(advice)
        ) from exc
    except ProvisionError as exc:
        fields = {
            key: tr.gettext(value) if key == "advice" else value
            for key, value in exc.fields.items()
        }
        raise DistrictError(tr.gettext(exc.template).format(**fields)) from exc
    except DeviceKeyError as exc:
        raise DistrictError(str(exc)) from exc
    print(
        tr.gettext("Provisioned {gate} at {site}: config {config}, data version {version}").format(
            gate=bundle.device,
            site=bundle.site,
            config=result.config_path,
            version=result.cache_version,
        )
    )
    print(
        tr.gettext("Device public key: {key}").format(
            key=base64.b64encode(result.device_public_key).decode("ascii")
        )
    )
    return 0


def add_district_commands(district: Any) -> None:
    """Add ``keys`` and ``enroll`` to the subparsers of ``edgenode district``."""
    keys = district.add_parser(
        "keys", help="the district key and the issuer keys: fingerprints and rotation"
    ).add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    show = keys.add_parser("show", help="list the keys with fingerprints and validity")
    show.add_argument("--config", required=True, help="hub TOML config file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_cmd_keys_show)

    rotate = keys.add_parser(
        "rotate",
        help="create the next issuer or district key; both keys are trusted during the overlap",
    )
    rotate.add_argument("--config", required=True, help="hub TOML config file")
    rotate.add_argument(
        "--role",
        required=True,
        choices=(*ISSUER_ROLES, "district"),
        help="which key: an issuer's, or the district key that signs the gates' data",
    )
    rotate.add_argument(
        "--overlap-days",
        type=float,
        default=7.0,
        help="days during which the old key stays trusted (default: 7)",
    )
    rotate.set_defaults(handler=_cmd_keys_rotate)

    enroll = district.add_parser(
        "enroll", help="write a signed enrollment bundle with a one-time token for a new gate"
    )
    enroll.add_argument("--config", required=True, help="hub TOML config file")
    enroll.add_argument("--site", required=True, help="compound id")
    enroll.add_argument("--gate", required=True, help="device id of the new gate")
    enroll.add_argument("--station", default="gate", help="station name (default: gate)")
    enroll.add_argument(
        "--broker", required=True, help="broker address for the gate: mqtts://host:port"
    )
    enroll.add_argument("--ca-file", help="CA certificate (PEM) that the gate trusts")
    enroll.add_argument("--username", help="broker user name for the gate")
    enroll.add_argument("--password-file", help="file holding the gate's broker password")
    enroll.add_argument(
        "--valid-for",
        type=int,
        default=7 * DAY_S,
        help="seconds until the token expires (default: 7 days)",
    )
    enroll.add_argument("--out", required=True, help="bundle file to write (a new file)")
    enroll.set_defaults(handler=_cmd_enroll)


def add_commands(commands: Any) -> None:
    """Add ``provision`` to the top-level subparsers of ``edgenode``."""
    sub = commands.add_parser(
        "provision", help="set up this gate from an enrollment bundle and register it"
    )
    sub.add_argument("bundle", help="enrollment bundle file from 'edgenode district enroll'")
    sub.add_argument(
        "--config-dir",
        default="/etc/edgenode",
        help="folder for edgenode.toml and the broker files (default: /etc/edgenode)",
    )
    sub.add_argument(
        "--state-dir",
        default="/var/lib/edgenode",
        help="folder for the device key, cache and journal (default: /var/lib/edgenode)",
    )
    sub.add_argument(
        "--district-key",
        help="the district key fingerprint that the district gave you, to check the bundle",
    )
    sub.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds allowed for each network step (default: 60)",
    )
    sub.set_defaults(handler=_cmd_provision)
