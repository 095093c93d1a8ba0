"""``edgenode district serve`` and ``edgenode district devices``: run the hub, manage gates.

The hub reads a small TOML file of its own, for example::

    hub_id = "hub-a"                 # optional, default: the host name
    store = "hub.db"                 # relative paths are relative to this file
    # or PostgreSQL, with the password in ~/.pgpass rather than here. Either store keeps the
    # records, the imported feeds and the published datasets:
    # store = "postgresql://hub@db.district.example:5432/edgenode?sslmode=verify-full"
    district_key_file = "district.key"

    [broker]
    host = "mqtt.district.example"
    port = 8883
    [broker.tls]
    ca_file = "ca.pem"

Unknown keys are rejected. ``add_commands`` adds the commands to the ``district`` subparsers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import json
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from edgenode.config import SyncConfig, TlsConfig
from edgenode.district import KeyFileError
from edgenode.district_cli import DistrictError
from edgenode.district_keyring import DistrictSigner, announced_district_keys
from edgenode.district_keys import KeyringError
from edgenode.i18n import Translator, language_from_env, translator
from edgenode.logs import configure_logging
from sync.alarms import AlarmChecker
from sync.feed_backend import open_feed_store
from sync.hub import Hub
from sync.hub_store import PUBLIC_KEY_BYTES, HubStoreError
from sync.publisher import IssuerKey, Publisher, read_issuer_keys
from sync.store_backend import (
    HubStoreBackend,
    StoreLocation,
    StoreUnavailable,
    open_store,
    parse_store_location,
)

log = structlog.get_logger("edgenode.hub_cli")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubBrokerConfig(_Strict):
    """The ``[broker]`` table: the fields of the gate's ``[sync]`` that a hub needs."""

    host: str = Field(default="localhost", description="MQTT broker host name.")
    port: Annotated[int, Field(ge=1, le=65_535)] = 8883
    tls: TlsConfig | None = Field(
        default=None, description="TLS settings. Plain TCP when unset, for tests only."
    )
    username: str | None = None
    password_file: Path | None = Field(
        default=None, description="File holding the broker password, readable by the owner."
    )
    keepalive_s: Annotated[int, Field(ge=5, le=1_200)] = 30
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = 60.0

    def sync_config(self) -> SyncConfig:
        return SyncConfig(
            enabled=True,
            broker_host=self.host,
            broker_port=self.port,
            tls=self.tls,
            username=self.username,
            password_file=self.password_file,
            keepalive_s=self.keepalive_s,
            reconnect_max_s=self.reconnect_max_s,
        )


def _store_location(value: object) -> object:
    """Read ``store`` as a PostgresUrl (``postgresql://``) or a Path; other values pass on."""
    return parse_store_location(value) if isinstance(value, str) else value


class HubConfig(_Strict):
    hub_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = Field(
        default=None, description="Name of this hub in logs and client ids (default: host name)."
    )
    store: Annotated[StoreLocation, BeforeValidator(_store_location)] = Field(
        description="The hub store shared by the hubs of one district, with the records, "
        "the imported feeds and the published datasets: a SQLite file, or a postgresql:// "
        "URL (libpq syntax) for hubs on several machines."
    )
    district_key_file: Path = Field(description="District signing key, for the acks.")
    id_lookup_key_file: Path | None = Field(
        default=None,
        description="District ID lookup key: roster ID numbers are stored as keyed hashes "
        "under it. Unset drops ID numbers at import.",
    )
    broker: HubBrokerConfig = Field(default_factory=HubBrokerConfig)


def load_hub_config(path: Path) -> HubConfig:
    """Read and validate a hub config. Raises DistrictError listing every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DistrictError(f"cannot read hub config {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DistrictError(f"invalid hub config {path}: {exc}") from exc
    try:
        config = HubConfig.model_validate(data)
    except ValidationError as exc:
        issues = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise DistrictError(f"invalid hub config {path}: {issues}") from exc
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: HubConfig, folder: Path) -> HubConfig:
    def resolve(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else folder / value

    broker = config.broker
    tls = broker.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                name: resolve(getattr(tls, name)) for name in ("ca_file", "cert_file", "key_file")
            }
        )
    broker = broker.model_copy(update={"tls": tls, "password_file": resolve(broker.password_file)})
    return config.model_copy(
        update={
            "store": resolve(config.store) if isinstance(config.store, Path) else config.store,
            "district_key_file": resolve(config.district_key_file),
            "id_lookup_key_file": resolve(config.id_lookup_key_file),
            "broker": broker,
        }
    )


# --- serve ---


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_hub_config(Path(args.config))
    try:
        # Returns the key that the district keyring selects for this moment, so a running hub
        # switches to a rotated key at its signs_from time without a restart.
        district_key = DistrictSigner(config.district_key_file)
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    announced = functools.partial(announced_district_keys, config.district_key_file)
    issuers: Callable[[int], list[IssuerKey]] | None
    try:
        read_issuer_keys(config.district_key_file.parent)
        # Read again at each build, so the hub publishes an issuer-key rotation without a
        # restart.
        issuers = functools.partial(read_issuer_keys, config.district_key_file.parent)
    except (KeyFileError, KeyringError) as exc:
        # A hub that only ingests can run without the issuer keys, but then it cannot build
        # the snapshots that gates request.
        issuers = None
        log.warning("requests_not_served", reason="issuer_keys_unreadable", error=str(exc))
    hub = Hub(
        config.broker.sync_config(),
        store_path=config.store,
        district_key=district_key,
        hub_id=config.hub_id,
    )
    try:
        feeds = open_feed_store(config.store)
    except StoreUnavailable as exc:
        raise DistrictError(str(exc)) from exc
    with feeds:
        # The hub serves gates' chunk and snapshot requests and raises alarms over its own
        # connection, so each request and each batch is handled by one hub of the group.
        if issuers is not None:
            hub.publisher = Publisher(
                feeds,
                hub.connection,
                district_key=district_key,
                issuers=issuers,
                district_keys=announced,
            )
        hub.alarm_checker = AlarmChecker(
            config.store, connection=hub.connection, district_key=district_key
        )
        try:
            asyncio.run(_serve(hub))
        except StoreUnavailable as exc:
            # Only at start: once running, the hub logs each batch it cannot store.
            raise DistrictError(str(exc)) from exc
        finally:
            hub.alarm_checker.close()
    return 0


async def _serve(hub: Hub) -> None:
    """Run the hub until SIGTERM or SIGINT, then let it disconnect and close its store."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(hub.run(), name="hub")
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # This coroutine itself was cancelled, not the hub task.
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


# --- devices ---


def _public_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not base64: {value!r}") from exc
    if len(key) != PUBLIC_KEY_BYTES:
        raise argparse.ArgumentTypeError(
            f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, this one has {len(key)}"
        )
    return key


def _open_store(args: argparse.Namespace) -> HubStoreBackend:
    try:
        return open_store(load_hub_config(Path(args.config)).store)
    except StoreUnavailable as exc:
        raise DistrictError(str(exc)) from exc


def _cmd_devices_add(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    with _open_store(args) as store:
        try:
            store.register_device(args.site, args.device, args.public_key)
        except HubStoreError as exc:
            raise DistrictError(str(exc)) from exc
    print(
        tr.gettext("Registered device {device} at site {site}").format(
            device=args.device, site=args.site
        )
    )
    return 0


def _cmd_devices_list(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    with _open_store(args) as store:
        devices = store.list_devices()
    rows: list[dict[str, Any]] = [
        {
            "site": device.site,
            "device": device.device_id,
            "public_key": base64.b64encode(device.public_key).decode("ascii"),
            "enabled": device.enabled,
            "registered_at": device.registered_at,
        }
        for device in devices
    ]
    if args.json:
        print(json.dumps({"devices": rows}, ensure_ascii=False, indent=1))
        return 0
    if not rows:
        print(tr.gettext("No devices registered."))
        return 0
    enabled_word, disabled_word = tr.gettext("enabled"), tr.gettext("disabled")
    for row in rows:
        state = enabled_word if row["enabled"] else disabled_word
        print(f"{row['site']}\t{row['device']}\t{state}\t{row['public_key']}")
    return 0


def _cmd_devices_enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


def _cmd_devices_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    tr: Translator = args.tr
    with _open_store(args) as store:
        try:
            store.set_enabled(args.site, args.device, enabled)
        except HubStoreError as exc:
            raise DistrictError(str(exc)) from exc
    message = (
        tr.gettext("Enabled device {device} at site {site}")
        if enabled
        else tr.gettext("Disabled device {device} at site {site}")
    )
    print(message.format(device=args.device, site=args.site))
    return 0


def add_commands(district: Any) -> None:
    """Add ``serve`` and ``devices`` to the subparsers of ``edgenode district``."""
    serve = district.add_parser("serve", help="run the district hub's ingest until SIGTERM")
    serve.add_argument("--config", required=True, help="hub TOML config file")
    serve.set_defaults(handler=_cmd_serve)

    devices = district.add_parser("devices", help="the hub's registry of gates").add_subparsers(
        dest="devices_command", required=True, metavar="COMMAND"
    )

    add = devices.add_parser("add", help="register a gate and its public key, enabled")
    add.add_argument("--config", required=True, help="hub TOML config file")
    add.add_argument("--site", required=True, help="compound id")
    add.add_argument("--device", required=True, help="device id")
    add.add_argument(
        "--public-key", required=True, type=_public_key, help="the gate's Ed25519 key, base64"
    )
    add.set_defaults(handler=_cmd_devices_add)

    listing = devices.add_parser("list", help="list registered gates")
    listing.add_argument("--config", required=True, help="hub TOML config file")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_devices_list)

    for name, handler, help_text in (
        ("disable", _cmd_devices_disable, "reject a gate's batches from now on"),
        ("enable", _cmd_devices_enable, "accept a disabled gate's batches again"),
    ):
        sub = devices.add_parser(name, help=help_text)
        sub.add_argument("--config", required=True, help="hub TOML config file")
        sub.add_argument("--site", required=True, help="compound id")
        sub.add_argument("--device", required=True, help="device id")
        sub.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the hub commands without the rest of the CLI: ``python -m edgenode.hub_cli``."""
    parser = argparse.ArgumentParser(prog="edgenode-hub")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    configure_logging("info")
    args.tr = translator(language_from_env())
    try:
        result: int = args.handler(args)
    except DistrictError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
