"""``edgenode district import`` and ``edgenode district publish``: feeds in, datasets out.

Both read the hub's TOML config (edgenode/hub_cli.py) for the store (a SQLite file or a
PostgreSQL URL), the district key and the broker. ``publish`` reads the issuer keys
``issuer-health.key`` and ``issuer-community.key`` from the folder of the district key file.
``add_commands`` adds the commands to the ``district`` subparsers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgenode.district import KeyFileError
from edgenode.district_cli import DistrictError
from edgenode.district_keyring import DistrictSigner, announced_district_keys
from edgenode.district_keys import KeyringError
from edgenode.hub_cli import HubConfig, load_hub_config
from edgenode.i18n import Translator
from edgenode.id_numbers import IdLookupKeyError, read_id_lookup_key
from sync.connection import Connection, NotConnected
from sync.feed_backend import FeedBackend, Transfer, open_feed_store
from sync.feeds import FeedError, ImportResult, import_health, import_roster
from sync.hub import HUB_SITE
from sync.publisher import DAY_S, IssuerKey, Publisher, read_issuer_keys
from sync.store_backend import StoreUnavailable

CONNECT_TIMEOUT_S = 30.0


@contextmanager
def _feed_store(config: HubConfig) -> Iterator[FeedBackend]:
    """Open the feed store of the hub config. Raises DistrictError when it is unreachable."""
    try:
        store = open_feed_store(config.store)
    except StoreUnavailable as exc:
        raise DistrictError(str(exc)) from exc
    with store:
        try:
            yield store
        except StoreUnavailable as exc:
            raise DistrictError(str(exc)) from exc


def _cmd_import(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    config = load_hub_config(Path(args.config))
    with _feed_store(config) as store:
        try:
            if args.feed == "roster":
                result = import_roster(
                    store, Path(args.file), args.format, id_lookup_key=_id_lookup_key(config)
                )
            else:
                result = import_health(store, Path(args.file), args.format)
        except FeedError as exc:
            raise DistrictError(f"{args.file}: {exc}") from exc
    _print_result(tr, args.feed, result)
    return 1 if result.errors else 0


def _id_lookup_key(config: HubConfig) -> bytes | None:
    if config.id_lookup_key_file is None:
        return None
    try:
        return read_id_lookup_key(config.id_lookup_key_file)
    except IdLookupKeyError as exc:
        raise DistrictError(str(exc)) from exc


def _print_result(tr: Translator, feed: str, result: ImportResult) -> None:
    print(
        tr.gettext("Read {rows} rows: {stored} stored, {bad} rejected").format(
            rows=result.rows, stored=result.stored, bad=len(result.errors)
        )
    )
    if feed == "roster" and result.removed:
        print(
            tr.gettext("Removed {count} residents missing from the roster").format(
                count=result.removed
            )
        )
    for error in result.errors:
        print(
            tr.gettext("Line {line} (row {row}): {reason}: {message}").format(
                line=error.line, row=error.row, reason=error.reason, message=error.message
            )
        )


def _cmd_publish(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    config = load_hub_config(Path(args.config))
    try:
        # The district keyring decides which district key signs and which keys are announced.
        district_key = DistrictSigner(config.district_key_file)
        issuers = read_issuer_keys(config.district_key_file.parent)
    except (KeyFileError, KeyringError) as exc:
        raise DistrictError(str(exc)) from exc
    with _feed_store(config) as store:
        transfer = asyncio.run(_publish(config, store, district_key, issuers, args))
    message = (
        tr.gettext("Published snapshot version {version} for site {site} in {chunks} chunks")
        if transfer.kind == "snapshot"
        else tr.gettext(
            "Published delta from version {base} to {version} for site {site} in {chunks} chunks"
        )
    )
    print(
        message.format(
            version=transfer.version,
            base=transfer.base_version,
            site=transfer.site,
            chunks=transfer.chunk_count,
        )
    )
    return 0


async def _publish(
    config: HubConfig,
    store: FeedBackend,
    district_key: DistrictSigner,
    issuers: Sequence[IssuerKey],
    args: argparse.Namespace,
) -> Transfer:
    tr: Translator = args.tr
    hub_id = config.hub_id or "cli"
    connection = Connection(
        config.broker.sync_config(),
        site=HUB_SITE,
        device=f"publisher-{hub_id}",
        client_id=f"edgenode-publisher-{hub_id}-{os.getpid()}-{secrets.token_hex(4)}",
        session_expiry_s=0,
    )
    publisher = Publisher(
        store,
        connection,
        district_key=district_key,
        issuers=issuers,
        district_keys=functools.partial(announced_district_keys, config.district_key_file),
        valid_for_s=args.valid_for,
    )
    running = asyncio.create_task(connection.run())
    try:
        try:
            await asyncio.wait_for(connection.wait_connected(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise DistrictError(
                tr.gettext(
                    "Could not connect to the broker at {host}:{port} within {seconds} s"
                ).format(
                    host=config.broker.host, port=config.broker.port, seconds=CONNECT_TIMEOUT_S
                )
            ) from None
        try:
            return await publisher.publish(args.site, snapshot=args.snapshot)
        except NotConnected as exc:
            # The version is committed, so gates that miss it recover by their requests.
            raise DistrictError(
                tr.gettext("Publishing to the broker failed: {error}").format(error=exc)
            ) from exc
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def add_commands(district: Any) -> None:
    """Add ``import`` and ``publish`` to the subparsers of ``edgenode district``."""
    importing = district.add_parser(
        "import", help="import a roster or health-status feed into the hub's store"
    ).add_subparsers(dest="import_command", required=True, metavar="FEED")
    for feed, help_text in (
        ("roster", "residents of one or more sites; the file is each site's full roster"),
        ("health", "health statuses (green, yellow, red) by health subject"),
    ):
        sub = importing.add_parser(feed, help=help_text)
        sub.add_argument("--config", required=True, help="hub TOML config file")
        sub.add_argument(
            "--format", choices=("csv", "json"), help="file format (default: from the suffix)"
        )
        sub.add_argument("file", help="CSV (UTF-8 or GB18030) or JSON array file")
        sub.set_defaults(handler=_cmd_import, feed=feed)

    publish = district.add_parser(
        "publish", help="sign and publish a site's dataset version to its gates"
    )
    publish.add_argument("--config", required=True, help="hub TOML config file")
    publish.add_argument("--site", required=True, help="compound id")
    publish.add_argument(
        "--snapshot",
        action="store_true",
        help="publish a full snapshot (default: a delta, or a snapshot the first time)",
    )
    publish.add_argument(
        "--valid-for",
        type=int,
        default=7 * DAY_S,
        help="validity of the version in seconds (default: 7 days)",
    )
    publish.set_defaults(handler=_cmd_publish)
