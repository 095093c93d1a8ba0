"""The district report: verdict counts per gate and hour from a hub store, as rows and a PNG."""

from __future__ import annotations

import argparse
import json
import struct
from datetime import date, datetime
from pathlib import Path

import pytest

from edgenode.i18n import translator
from edgenode.report_cli import add_commands
from sync.hub_store import HubStore, WireRecord
from sync.report import REPORT_TIMEZONE, HourRow, count_per_hour, hourly_report, write_chart

PUBLIC_KEY = bytes(32)
DAY = date(2026, 12, 1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def at(hour: int, minute: int = 0, day: date = DAY) -> float:
    """Unix time of a China-time clock reading on ``day``."""
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=REPORT_TIMEZONE).timestamp()


def record(seq: int, verdict: str, recorded_at: float, *reasons: str) -> WireRecord:
    return WireRecord(
        seq=seq,
        kind="verdict",
        recorded_at=recorded_at,
        age_s=1.0,
        station="north",
        verdict=verdict,
        reasons=list(reasons),
        health_subject="aa" * 16,
        community_subject="bb" * 16,
        latency_ms=2.0,
        clock_trusted=True,
        prev_hash="00" * 32,
        hash="11" * 32,
    )


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A store with two gates at site S1 and one at S2, over two hours of 1 December."""
    path = tmp_path / "hub.db"
    with HubStore(path) as store:
        gate_a = store.register_device("S1", "gate-a", PUBLIC_KEY)
        gate_b = store.register_device("S1", "gate-b", PUBLIC_KEY)
        gate_c = store.register_device("S2", "gate-c", PUBLIC_KEY)
        store.insert_batch(
            gate_a,
            [
                record(1, "admit", at(8, 5)),
                record(2, "admit", at(8, 10)),
                record(3, "deny", at(8, 15), "health_red", "not_resident"),
                record(4, "deny", at(8, 20), "code_replayed"),
                record(5, "deny", at(8, 25), "health_red"),
                record(6, "review", at(8, 30), "health_yellow"),
                record(7, "incomplete", at(8, 35), "missing_health_code"),
                record(8, "unrecognised", at(8, 40), "unrecognised_payload"),
                record(9, "admit", at(9, 0)),
                record(10, "deny", at(9, 59), "cache_stale"),
                # The next day, outside a one-day report.
                record(11, "admit", at(0, 1, date(2026, 12, 2))),
            ],
            lane="normal",
            batch_id="a1",
        )
        store.insert_batch(
            gate_b,
            [record(1, "admit", at(8, 50)), record(2, "deny", at(9, 1))],
            lane="normal",
            batch_id="b1",
        )
        store.insert_batch(gate_c, [record(1, "admit", at(10))], lane="normal", batch_id="c1")
    return path


def rows_by_key(rows: list[HourRow]) -> dict[tuple[str, int], HourRow]:
    return {(row.device, row.hour.hour): row for row in rows}


def test_report_counts_per_gate_and_hour(store_path: Path) -> None:
    rows = rows_by_key(hourly_report(store_path, DAY, DAY))

    assert sorted(rows) == [
        ("gate-a", 8),
        ("gate-a", 9),
        ("gate-b", 8),
        ("gate-b", 9),
        ("gate-c", 10),
    ]
    eight = rows[("gate-a", 8)]
    assert eight.admit == 2
    assert eight.review == 1
    assert eight.incomplete == 1
    assert eight.unrecognised == 1
    assert eight.deny == 3
    nine = rows[("gate-a", 9)]
    assert nine.admit == 1
    assert nine.deny == 1
    assert rows[("gate-b", 8)].admit == 1
    assert rows[("gate-c", 10)].admit == 1


def test_report_splits_denies_by_first_reason(store_path: Path) -> None:
    rows = rows_by_key(hourly_report(store_path, DAY, DAY))

    assert rows[("gate-a", 8)].denies == {"health_red": 2, "code_replayed": 1}
    assert rows[("gate-a", 9)].denies == {"cache_stale": 1}
    assert rows[("gate-b", 9)].denies == {"none": 1}


def test_report_date_range_and_filters(store_path: Path) -> None:
    two_days = hourly_report(store_path, DAY, date(2026, 12, 2))
    site_one = hourly_report(store_path, DAY, DAY, site="S1")
    one_gate = hourly_report(store_path, DAY, DAY, site="S1", device="gate-b")

    assert sum(row.admit for row in two_days) == 6
    assert {row.site for row in site_one} == {"S1"}
    assert {row.device for row in one_gate} == {"gate-b"}
    assert hourly_report(store_path, date(2026, 11, 30), date(2026, 11, 30)) == []
    with pytest.raises(ValueError, match="before the start date"):
        hourly_report(store_path, DAY, date(2026, 11, 30))


def test_report_hours_are_china_time(store_path: Path) -> None:
    rows = hourly_report(store_path, DAY, DAY)

    assert all(row.hour.utcoffset() is not None for row in rows)
    assert rows[0].hour == datetime(2026, 12, 1, 8, tzinfo=REPORT_TIMEZONE)


def test_count_skips_unknown_verdict() -> None:
    from sync.report import StoredRecord

    odd = StoredRecord("S1", "g", 1, "maybe", (), None, None, at(8), at(8), "north")
    admit = StoredRecord("S1", "g", 2, "admit", (), None, None, at(8), at(8), "north")

    rows = count_per_hour([odd, admit])

    assert len(rows) == 1
    assert rows[0].admit == 1
    assert rows[0].deny == 0


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.mark.parametrize("language", ["en", "zh_CN"])
def test_chart_is_a_valid_png(store_path: Path, tmp_path: Path, language: str) -> None:
    rows = hourly_report(store_path, DAY, DAY)
    path = tmp_path / f"report-{language}.png"

    used = write_chart(rows, path, translator(language))

    width, height = png_size(path)
    assert 600 <= width <= 2000
    assert 300 <= height <= 4000
    assert path.stat().st_size > 10_000
    assert used.language in ("en", language)


def test_chart_rejects_empty_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to draw"):
        write_chart([], tmp_path / "empty.png", translator("en"))
    assert not (tmp_path / "empty.png").exists()


# --- the command ---


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgenode-district")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator("en")
    result: int = args.handler(args)
    return result


def hub_config(tmp_path: Path, store_path: Path) -> Path:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{store_path}"\ndistrict_key_file = "district.key"\n', encoding="utf-8"
    )
    return config


def test_report_command_prints_table(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = hub_config(tmp_path, store_path)

    code = run_cli(
        ["report", "--config", str(config), "--from", "2026-12-01", "--to", "2026-12-01"]
    )

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split()[:3] == ["Site", "Device", "Hour"]
    assert len(lines) == 6
    assert "health_red 2" in lines[1]


def test_report_command_json_and_png(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = hub_config(tmp_path, store_path)
    png = tmp_path / "out" / "chart.png"

    code = run_cli(
        [
            "report",
            "--config",
            str(config),
            "--site",
            "S1",
            "--from",
            "2026-12-01",
            "--to",
            "2026-12-01",
            "--json",
            "--png",
            str(png),
        ]
    )

    out = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in out if line.startswith("{")]
    assert code == 0
    assert len(objects) == 4
    assert objects[0]["denies_by_reason"] == {"code_replayed": 1, "health_red": 2}
    assert png_size(png)[0] > 0
    assert out[-1] == f"Wrote chart {png}"
