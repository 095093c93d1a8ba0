"""``edgenode district report`` and ``edgenode district alarms``: read the hub's store.

Both commands take the hub's TOML config (edgenode/hub_cli.py) for the store's path and only
read the store, so they run beside the hubs. ``add_commands`` adds them to the ``district``
subparsers.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

from edgenode.district_cli import DistrictError
from edgenode.hub_cli import load_hub_config
from edgenode.i18n import Translator
from sync.alarms import Alarm, AlarmChecker
from sync.report import REPORT_TIMEZONE, HourRow, hourly_report, write_chart
from sync.store_backend import StoreLocation, StoreUnavailable

DEFAULT_ALARM_HOURS = 24.0


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date in the form YYYY-MM-DD: {value!r}") from exc


def _positive_hours(value: str) -> float:
    try:
        hours = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of hours: {value!r}") from exc
    if not 0 < hours <= 24 * 366:
        raise argparse.ArgumentTypeError(f"hours must be above 0 and at most 8784: {value!r}")
    return hours


def _store_path(args: argparse.Namespace) -> StoreLocation:
    store = load_hub_config(Path(args.config)).store
    if isinstance(store, Path) and not store.is_file():
        raise DistrictError(f"hub store {store} not found: start the hub once to create it")
    return store


# --- report ---


def _cmd_report(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    today = datetime.now(REPORT_TIMEZONE).date()
    last: date = args.to_date or today
    first: date = args.from_date or last
    if last < first:
        raise DistrictError(f"--to {last} is before --from {first}")
    store = _store_path(args)
    try:
        rows = hourly_report(store, first, last, site=args.site, device=args.device)
    except (sqlite3.Error, StoreUnavailable) as exc:
        raise DistrictError(f"cannot read hub store {store}: {exc}") from exc

    if args.json:
        for row in rows:
            print(json.dumps(row.to_json(), ensure_ascii=False))
    elif rows:
        print(_format_table(rows, tr))
    else:
        print(
            tr.gettext("No verdicts recorded from {first} to {last}.").format(
                first=first.isoformat(), last=last.isoformat()
            )
        )

    if args.png is not None:
        if not rows:
            raise DistrictError(
                f"no chart written to {args.png}: there are no verdicts from {first} to {last}"
            )
        try:
            used = write_chart(rows, Path(args.png), tr)
        except ValueError as exc:
            raise DistrictError(str(exc)) from exc
        except OSError as exc:
            raise DistrictError(f"cannot write chart {args.png}: {exc.strerror}") from exc
        if used.language != tr.language:
            print(
                tr.gettext(
                    "No font with Chinese characters is installed, so the chart is in English."
                )
            )
        print(tr.gettext("Wrote chart {path}").format(path=args.png))
    return 0


def _format_table(rows: list[HourRow], tr: Translator) -> str:
    header = [
        tr.gettext("Site"),
        tr.gettext("Device"),
        tr.gettext("Hour"),
        tr.gettext("Admit"),
        tr.gettext("Review"),
        tr.gettext("Deny"),
        tr.gettext("Incomplete"),
        tr.gettext("Unrecognised"),
        tr.gettext("Denies by reason"),
    ]
    lines = [header]
    for row in rows:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(row.denies.items()))
        lines.append(
            [
                row.site,
                row.device,
                row.hour.strftime("%Y-%m-%d %H:00"),
                str(row.admit),
                str(row.review),
                str(row.deny),
                str(row.incomplete),
                str(row.unrecognised),
                reasons,
            ]
        )
    widths = [max(_display_width(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(_pad(cell, width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _display_width(text: str) -> int:
    """Terminal columns of a text: Chinese characters take two."""
    return sum(2 if ord(char) >= 0x1100 else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _display_width(text))


# --- alarms ---


def _cmd_alarms(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    store = _store_path(args)
    since = time.time() - args.hours * 3600
    try:
        checker = AlarmChecker(store)
        try:
            alarms = checker.check_since(since, site=args.site)
        finally:
            checker.close()
    except (sqlite3.Error, StoreUnavailable) as exc:
        raise DistrictError(f"cannot read hub store {store}: {exc}") from exc

    if args.json:
        for alarm in alarms:
            print(json.dumps(alarm.message(), ensure_ascii=False))
        return 0
    if not alarms:
        message = tr.gettext(
            "The checks over the stored records found no alarm in the last {hours} hours. "
            "Alarms raised at ingest (unknown or forged batches, rejected enrollments) are in "
            "the hubs' logs and on the alarm topic."
        )
        print(message.format(hours=f"{args.hours:g}"))
        return 0
    for alarm in alarms:
        print(_describe_alarm(alarm, tr))
    return 0


def _describe_alarm(alarm: Alarm, tr: Translator) -> str:
    when = datetime.fromtimestamp(alarm.raised_at, REPORT_TIMEZONE).strftime("%Y-%m-%d %H:%M")
    detail: dict[str, Any] = alarm.detail
    if alarm.kind == "red_code":
        text = tr.gettext("Red health code denied at {site} / {device} (seq {seq})").format(
            site=alarm.site, device=alarm.device, seq=alarm.seqs[0]
        )
    elif alarm.kind == "code_sharing":
        text = tr.gettext(
            "Community code admitted at {device} and {other} of {site}, {gap} s apart"
        ).format(
            site=alarm.site,
            device=alarm.devices[0],
            other=alarm.devices[1],
            gap=f"{float(detail['gap_s']):.0f}",
        )
    elif alarm.kind == "device_silent":
        text = tr.gettext("No records from {site} / {device} for {minutes} minutes").format(
            site=alarm.site,
            device=alarm.device,
            minutes=f"{float(detail['silent_s']) / 60:.0f}",
        )
    else:
        text = tr.gettext("The local data of {site} / {device} is out of date").format(
            site=alarm.site, device=alarm.device
        )
    subject = f"  {alarm.subject}" if alarm.subject else ""
    return f"{when}  {alarm.kind}  {text}{subject}"


def add_commands(district: Any) -> None:
    """Add ``report`` and ``alarms`` to the subparsers of ``edgenode district``."""
    report = district.add_parser(
        "report", help="count verdicts per gate and hour from the hub's store"
    )
    report.add_argument("--config", required=True, help="hub TOML config file")
    report.add_argument("--site", help="count only this compound id")
    report.add_argument("--device", help="count only this device id")
    report.add_argument(
        "--from",
        dest="from_date",
        type=_date,
        help="first day, YYYY-MM-DD in China time (default: the --to day)",
    )
    report.add_argument(
        "--to", dest="to_date", type=_date, help="last day, included (default: today)"
    )
    report.add_argument("--png", help="also write a chart of the counts to this PNG file")
    report.add_argument("--json", action="store_true", help="print one JSON object per line")
    report.set_defaults(handler=_cmd_report)

    alarms = district.add_parser("alarms", help="run the alarm checks once over the hub's store")
    alarms.add_argument("--config", required=True, help="hub TOML config file")
    alarms.add_argument("--site", help="check only this compound id")
    alarms.add_argument(
        "--hours",
        type=_positive_hours,
        default=DEFAULT_ALARM_HOURS,
        help=f"check records received in this many past hours (default: {DEFAULT_ALARM_HOURS:g})",
    )
    alarms.add_argument("--json", action="store_true", help="print one JSON object per line")
    alarms.set_defaults(handler=_cmd_alarms)
