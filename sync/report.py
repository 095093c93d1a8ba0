"""District reports over the hub's store: verdicts per gate and per hour, as rows and a PNG.

Records are read through a read-only SQLite connection of their own, so a report runs beside
the hubs that write the store (WAL lets readers and the writer work at the same time).
Hours are taken from each record's ``recorded_at``, the gate's time of the verdict, in
``REPORT_TIMEZONE``.

A deny is counted once, under its first reason. Gates order reasons worst first
(edgenode/policy.py), so that is the reason that decided the deny.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from edgenode.i18n import Translator, translator
from sync.store_backend import PostgresUrl, StoreLocation

if TYPE_CHECKING:
    from sync.hub_store_pg import PostgresStoreReader

log = structlog.get_logger("sync.report")

# Mainland China has one time zone and no daylight saving time.
REPORT_TIMEZONE: tzinfo = ZoneInfo("Asia/Shanghai")
VERDICTS = ("admit", "review", "deny", "incomplete", "unrecognised")
# A deny stored without any reason is counted under this name.
NO_REASON = "none"
FC_LIST_TIMEOUT_S = 10.0
# Subjects per query in ``admits_of_subjects``, well under SQLite's default limit of 32,766
# parameters (SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32).
MAX_QUERY_SUBJECTS = 500


# --- reading the store ---


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A verdict record as the hub stored it, with the site and device id of its gate."""

    site: str
    device: str
    seq: int
    verdict: str
    reasons: tuple[str, ...]
    health_subject: str | None
    community_subject: str | None
    recorded_at: float
    received_at: float
    station: str


RECORD_COLUMNS = (
    "d.site, d.device_id, r.seq, r.verdict, r.reasons, r.health_subject, "
    "r.community_subject, r.recorded_at, r.received_at, r.station"
)


class StoreReader:
    """A read-only connection to a hub store file. Raises sqlite3.Error if it cannot open."""

    def __init__(self, path: Path) -> None:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def records(
        self,
        *,
        time_column: str = "recorded_at",
        start: float | None = None,
        end: float | None = None,
        site: str | None = None,
        device: str | None = None,
    ) -> list[StoredRecord]:
        """Return verdict records with ``start <= time_column < end``, in time order."""
        where, params = record_filter(time_column, start, end, site, device, mark="?")
        rows = self._db.execute(
            f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
            f"WHERE {where} ORDER BY r.{time_column}, d.site, d.device_id, r.seq",
            params,
        ).fetchall()
        return [stored_record(row) for row in rows]

    def admits_of(
        self, site: str, community_subject: str, start: float, end: float
    ) -> list[StoredRecord]:
        """Return the site's admits of one community subject recorded in ``[start, end]``."""
        rows = self._db.execute(
            f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
            "WHERE d.site = ? AND r.community_subject = ? AND r.verdict = 'admit' "
            "AND r.kind = 'verdict' AND r.recorded_at BETWEEN ? AND ? "
            "ORDER BY r.recorded_at, d.device_id, r.seq",
            (site, community_subject, start, end),
        ).fetchall()
        return [stored_record(row) for row in rows]

    def admits_of_subjects(
        self, site: str, subjects: Sequence[str], start: float, end: float
    ) -> list[StoredRecord]:
        """Return the site's admits of any of ``subjects`` recorded in ``[start, end]``."""
        found: list[StoredRecord] = []
        for first in range(0, len(subjects), MAX_QUERY_SUBJECTS):
            chunk = list(subjects[first : first + MAX_QUERY_SUBJECTS])
            marks = ", ".join("?" for _ in chunk)
            rows = self._db.execute(
                f"SELECT {RECORD_COLUMNS} FROM records r JOIN devices d ON d.id = r.device "
                f"WHERE d.site = ? AND r.community_subject IN ({marks}) "
                "AND r.verdict = 'admit' AND r.kind = 'verdict' "
                "AND r.recorded_at BETWEEN ? AND ? ORDER BY r.recorded_at, d.device_id, r.seq",
                (site, *chunk, start, end),
            ).fetchall()
            found += [stored_record(row) for row in rows]
        return found

    def last_received(self) -> list[tuple[str, str, bool, float, float | None]]:
        """Return (site, device, enabled, registered_at, last received_at or None) per gate."""
        return last_received_rows(self._db.execute(LAST_RECEIVED_QUERY).fetchall())


# Each gate of the registry with the time its last record arrived, for the silent-gate check.
LAST_RECEIVED_QUERY = (
    "SELECT d.site, d.device_id, d.enabled, d.registered_at, MAX(r.received_at) "
    "FROM devices d LEFT JOIN records r ON r.device = d.id "
    "GROUP BY d.id ORDER BY d.site, d.device_id"
)


def record_filter(
    time_column: str,
    start: float | None,
    end: float | None,
    site: str | None,
    device: str | None,
    *,
    mark: str,
) -> tuple[str, list[Any]]:
    """Return the WHERE clause and its parameters for ``records``, with ``mark`` as the
    driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg)."""
    if time_column not in ("recorded_at", "received_at"):
        raise ValueError(f"invalid time column {time_column!r}")
    clauses = ["r.kind = 'verdict'"]
    params: list[Any] = []
    for clause, value in (
        (f"r.{time_column} >= {mark}", start),
        (f"r.{time_column} < {mark}", end),
        (f"d.site = {mark}", site),
        (f"d.device_id = {mark}", device),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def last_received_rows(
    rows: Sequence[Sequence[Any]],
) -> list[tuple[str, str, bool, float, float | None]]:
    """Convert the rows of ``LAST_RECEIVED_QUERY`` from either driver."""
    return [
        (str(site), str(device), bool(enabled), float(registered), _optional_float(last))
        for site, device, enabled, registered, last in rows
    ]


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def stored_record(row: tuple[Any, ...]) -> StoredRecord:
    return StoredRecord(
        site=str(row[0]),
        device=str(row[1]),
        seq=int(row[2]),
        verdict=str(row[3]),
        reasons=tuple(str(reason) for reason in json.loads(row[4])),
        health_subject=row[5],
        community_subject=row[6],
        recorded_at=float(row[7]),
        received_at=float(row[8]),
        station=str(row[9]),
    )


# --- counting ---


@dataclass(slots=True)
class HourRow:
    """Verdict counts of one gate in one hour, which starts at ``hour`` (time zone aware)."""

    site: str
    device: str
    hour: datetime
    admit: int = 0
    review: int = 0
    incomplete: int = 0
    unrecognised: int = 0
    denies: dict[str, int] = field(default_factory=dict)

    @property
    def deny(self) -> int:
        return sum(self.denies.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "device": self.device,
            "hour": self.hour.isoformat(),
            "admit": self.admit,
            "review": self.review,
            "deny": self.deny,
            "incomplete": self.incomplete,
            "unrecognised": self.unrecognised,
            "denies_by_reason": dict(sorted(self.denies.items())),
        }


def day_range(first: date, last: date, tz: tzinfo = REPORT_TIMEZONE) -> tuple[float, float]:
    """Return the Unix times that bound the days ``first`` to ``last``, both included."""
    if last < first:
        raise ValueError(f"the end date {last} is before the start date {first}")
    start = datetime.combine(first, datetime.min.time(), tzinfo=tz)
    end = datetime.combine(last + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    return start.timestamp(), end.timestamp()


def count_per_hour(records: Iterable[StoredRecord], tz: tzinfo = REPORT_TIMEZONE) -> list[HourRow]:
    """Count verdicts per gate and per hour. Hours without records get no row.

    A verdict outside ``VERDICTS`` is logged and left out, so the sums stay those of the
    known verdicts.
    """
    rows: dict[tuple[str, str, datetime], HourRow] = {}
    for record in records:
        local = datetime.fromtimestamp(record.recorded_at, tz)
        hour = local.replace(minute=0, second=0, microsecond=0)
        key = (record.site, record.device, hour)
        row = rows.get(key)
        if row is None:
            row = rows[key] = HourRow(record.site, record.device, hour)
        if record.verdict == "deny":
            reason = record.reasons[0] if record.reasons else NO_REASON
            row.denies[reason] = row.denies.get(reason, 0) + 1
        elif record.verdict in VERDICTS:
            setattr(row, record.verdict, getattr(row, record.verdict) + 1)
        else:
            log.warning(
                "record_not_counted",
                reason="unknown_verdict",
                verdict=record.verdict,
                site=record.site,
                device=record.device,
                seq=record.seq,
            )
    return [rows[key] for key in sorted(rows)]


def open_store_reader(location: StoreLocation) -> StoreReader | PostgresStoreReader:
    """Open read-only queries over a SQLite store file or a PostgreSQL store URL."""
    if isinstance(location, PostgresUrl):
        # Imported here: sync.hub_store_pg imports this module.
        from sync.hub_store_pg import PostgresStoreReader

        return PostgresStoreReader(location.url)
    return StoreReader(location)


def hourly_report(
    store_path: StoreLocation,
    first: date,
    last: date,
    *,
    site: str | None = None,
    device: str | None = None,
    tz: tzinfo = REPORT_TIMEZONE,
) -> list[HourRow]:
    """Read the store and count verdicts per gate and hour for the days ``first`` to ``last``."""
    start, end = day_range(first, last, tz)
    with open_store_reader(store_path) as reader:
        records = reader.records(start=start, end=end, site=site, device=device)
    return count_per_hour(records, tz)


# --- the chart ---


def cjk_font_file() -> Path | None:
    """Return a font file with Chinese glyphs from ``fc-list :lang=zh``, or None."""
    try:
        listing = subprocess.run(
            ["fc-list", ":lang=zh", "file"],
            capture_output=True,
            text=True,
            timeout=FC_LIST_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("font_lookup_failed", error=str(exc))
        return None
    for line in sorted(listing.stdout.splitlines()):
        path = Path(line.split(":", 1)[0].strip())
        if path.suffix.lower() in (".ttf", ".otf", ".ttc") and path.is_file():
            return path
    return None


def _gate_hours(rows: Sequence[HourRow]) -> Iterator[tuple[tuple[str, str], list[HourRow]]]:
    gates: dict[tuple[str, str], list[HourRow]] = {}
    for row in rows:
        gates.setdefault((row.site, row.device), []).append(row)
    yield from sorted(gates.items())


def write_chart(
    rows: Sequence[HourRow], path: Path, tr: Translator, *, max_gates: int = 12
) -> Translator:
    """Draw stacked verdict bars per hour, one panel per gate, into a PNG file.

    Returns the translator used for the labels: English when ``tr`` is Chinese but no font
    with Chinese glyphs is installed (then a warning ``chart_font_missing`` is logged).
    Raises ValueError when there are no rows or more gates than ``max_gates``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    # matplotlib logs "findfont: Failed to find font weight normal" for each weight that a CJK
    # collection (.ttc) does not list under the family's name, although the glyphs are drawn.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

    gates = list(_gate_hours(rows))
    if not gates:
        raise ValueError("no records in the report, so there is nothing to draw")
    if len(gates) > max_gates:
        raise ValueError(
            f"the report has {len(gates)} gates, at most {max_gates} fit in one chart: "
            "choose a site or a gate"
        )

    font_family: list[str] = ["DejaVu Sans"]
    if tr.language.startswith("zh"):
        font_file = cjk_font_file()
        if font_file is None:
            # NOTE: without a CJK font the Chinese labels would be drawn as empty boxes.
            log.warning("chart_font_missing", language=tr.language, fallback="en")
            tr = translator("en")
        else:
            font_manager.fontManager.addfont(str(font_file))
            # DejaVu Sans draws Latin text and digits, and matplotlib falls back to the CJK
            # font glyph by glyph, because some CJK fonts (Droid Sans Fallback) lack Latin.
            font_family.append(font_manager.FontProperties(fname=str(font_file)).get_name())

    deny_reasons = sorted({reason for row in rows for reason in row.denies})
    series: list[tuple[str, str]] = [
        ("admit", tr.gettext("Admit")),
        ("review", tr.gettext("Check manually")),
        ("incomplete", tr.gettext("Show both codes")),
        ("unrecognised", tr.gettext("Not recognised")),
    ]
    deny_word = tr.gettext("Do not admit")
    series += [(f"deny:{reason}", f"{deny_word}: {reason}") for reason in deny_reasons]

    hours = _hour_slots(rows)
    with plt.rc_context({"font.family": font_family, "axes.unicode_minus": False}):
        figure, axes_list = plt.subplots(
            len(gates), 1, figsize=(10, 2.8 * len(gates) + 0.8), squeeze=False, sharex=False
        )
        for index, ((site, device), gate_rows) in enumerate(gates):
            axes = axes_list[index][0]
            _draw_gate(axes, gate_rows, hours, series)
            axes.set_title(
                tr.gettext("Verdicts per hour at {site} / {device}").format(
                    site=site, device=device
                )
            )
            axes.set_ylabel(tr.gettext("Verdicts"))
            axes.set_xlabel(
                tr.gettext("Hour ({timezone})").format(timezone=str(gate_rows[0].hour.tzinfo))
            )
        handles, labels = axes_list[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="upper center", ncol=4, fontsize="small")
        figure.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (2.8 * len(gates) + 0.8)))
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=100)
        plt.close(figure)
    return tr


def _hour_slots(rows: Sequence[HourRow]) -> list[datetime]:
    """Return every hour from the report's first to its last, so all panels share one axis."""
    first = min(row.hour for row in rows)
    last = max(row.hour for row in rows)
    hours: list[datetime] = []
    hour = first
    while hour <= last:
        hours.append(hour)
        hour += timedelta(hours=1)
    return hours


def _draw_gate(
    axes: Any,
    rows: Sequence[HourRow],
    hours: Sequence[datetime],
    series: Sequence[tuple[str, str]],
) -> None:
    """Draw one gate's stacked bars, one slot per hour of ``hours``."""
    from matplotlib.ticker import MaxNLocator

    by_hour = {row.hour: row for row in rows}
    positions = list(range(len(hours)))
    bottoms = [0] * len(hours)
    colours = _colours(len(series))
    for (name, label), colour in zip(series, colours, strict=True):
        values = [_value(by_hour.get(hour), name) for hour in hours]
        axes.bar(positions, values, bottom=bottoms, label=label, color=colour, width=0.8)
        bottoms = [bottom + value for bottom, value in zip(bottoms, values, strict=True)]
    step = max(1, len(hours) // 12)
    axes.set_xticks(positions[::step])
    axes.set_xticklabels([hour.strftime("%m-%d %H:00") for hour in hours[::step]], fontsize=8)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(axis="y", alpha=0.3)


def _value(row: HourRow | None, name: str) -> int:
    if row is None:
        return 0
    if name.startswith("deny:"):
        return row.denies.get(name.removeprefix("deny:"), 0)
    value: int = getattr(row, name)
    return value


def _colours(count: int) -> list[str]:
    fixed = ["#4caf50", "#ffb300", "#90a4ae", "#7e57c2"]
    denies = ["#d32f2f", "#f06292", "#8d6e63", "#ff7043", "#b71c1c", "#ad1457", "#6d4c41"]
    needed = count - len(fixed)
    return fixed[:count] + [denies[i % len(denies)] for i in range(max(0, needed))]
