"""Roster and health-status feeds imported into the hub's store, from the files in data/feeds.

The store tests run on both backends: a SQLite file and a PostgreSQL database on the server
that tests/postgres.py starts (skipped without one, except under ``CI=true``).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing, redirect_stdout
from pathlib import Path

import psycopg
import pytest

from edgenode.feeds_cli import add_commands
from edgenode.i18n import translator
from sync.feed_backend import FeedBackend, open_feed_store
from sync.feeds import (
    MIGRATIONS,
    FeedError,
    FeedStore,
    ProgressBar,
    RowError,
    decode_feed,
    import_health,
    import_roster,
    parse_time,
)
from sync.feeds_pg import MIGRATIONS as PG_MIGRATIONS
from sync.feeds_pg import PostgresFeedStore
from sync.hub_store import MIGRATIONS as HUB_MIGRATIONS
from sync.hub_store import HubStore
from sync.hub_store_pg import MIGRATIONS as PG_HUB_MIGRATIONS
from sync.hub_store_pg import PostgresHubStore
from sync.store_backend import PostgresUrl
from tests.postgres import postgres_server, postgres_url

__all__ = ["postgres_server", "postgres_url"]

FEEDS = Path(__file__).resolve().parent / "data" / "feeds"


def subject(n: int) -> str:
    return f"{n:02x}" * 16


def health_subject(n: int) -> str:
    return f"{0x80 + n:02x}" * 16


def reasons(errors: list[RowError]) -> list[tuple[int, str]]:
    return [(error.line, error.reason) for error in errors]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_value(request: pytest.FixtureRequest) -> str:
    """The hub config's ``store`` value: a file name, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return "hub.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_value: str, tmp_path: Path) -> Iterator[FeedBackend]:
    location = PostgresUrl(store_value) if "://" in store_value else tmp_path / store_value
    with open_feed_store(location) as opened:
        yield opened


def test_roster_csv_rows_and_errors(store: FeedBackend) -> None:
    result = import_roster(store, FEEDS / "roster.csv", now=1_000.0)

    assert result.rows == 7
    assert result.stored == 2
    assert reasons(result.errors) == [
        (4, "invalid_subject"),
        (5, "invalid_role"),
        (6, "invalid_time"),
        (7, "missing_field"),
        (8, "duplicate_subject"),
    ]
    assert "building" in result.errors[3].message
    residents = {row.subject: row for row in store.residents("XH-0012")}
    assert sorted(residents) == [subject(1), subject(2)]
    assert residents[subject(1)].display_name == "张*丰"
    assert residents[subject(2)].display_name == "李*"
    assert residents[subject(2)].role == "visitor"
    assert residents[subject(1)].health_subject == health_subject(1)


def test_roster_dates_are_china_time(store: FeedBackend) -> None:
    import_roster(store, FEEDS / "roster.csv")

    first = {row.subject: row for row in store.residents("XH-0012")}[subject(1)]
    # 2026-01-01 00:00 at UTC+8, and the end of 2026-12-31 at UTC+8.
    assert first.valid_from == 1_767_196_800
    assert first.valid_until == 1_798_732_800


def test_full_names_and_ids_never_stored_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with FeedStore(path) as store:
        import_roster(store, FEEDS / "roster.csv")
        import_roster(store, FEEDS / "roster.json")

    files = [item for item in tmp_path.iterdir() if item.name.startswith("hub.db")]
    content = b"".join(item.read_bytes() for item in files)
    for full_name in ("张三丰", "李四", "郭靖", "黄蓉"):
        assert full_name.encode("utf-8") not in content, full_name
    for id_number in ("110101199003071234", "110101198001011111"):
        assert id_number.encode("ascii") not in content, id_number
    assert "张*丰".encode() in content


def test_full_names_and_ids_never_stored_postgres(postgres_url: str) -> None:
    with PostgresFeedStore(postgres_url) as store:
        import_roster(store, FEEDS / "roster.csv")
        import_roster(store, FEEDS / "roster.json")

    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT row_to_json(r)::text FROM feed_residents r").fetchall()
    content = "\n".join(str(row[0]) for row in rows)
    for full_name in ("张三丰", "李四", "郭靖", "黄蓉"):
        assert full_name not in content, full_name
    for id_number in ("110101199003071234", "110101198001011111"):
        assert id_number not in content, id_number
    assert "张*丰" in content


def test_roster_csv_with_bom(store: FeedBackend) -> None:
    assert (FEEDS / "roster-bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")

    result = import_roster(store, FEEDS / "roster-bom.csv")

    assert result.errors == []
    names = [row.display_name for row in store.residents("XH-0013")]
    assert names == ["陈*", "杨*华"]


def test_health_gb18030_chinese_colours(store: FeedBackend) -> None:
    with pytest.raises(UnicodeDecodeError):
        (FEEDS / "health-gb18030.csv").read_bytes().decode("utf-8")

    result = import_health(store, FEEDS / "health-gb18030.csv")

    assert result.stored == 3
    assert reasons(result.errors) == [
        (5, "invalid_colour"),
        (6, "invalid_subject"),
        (7, "missing_field"),
    ]
    statuses = store.health([health_subject(n) for n in (1, 2, 11, 12)])
    assert {key: row.colour for key, row in statuses.items()} == {
        health_subject(1): "green",
        health_subject(2): "yellow",
        health_subject(11): "red",
    }


def test_roster_json_line_numbers(store: FeedBackend) -> None:
    result = import_roster(store, FEEDS / "roster.json")

    assert result.stored == 1
    assert reasons(result.errors) == [
        (5, "not_an_object"),
        (6, "invalid_role"),
        (9, "invalid_validity"),
    ]
    assert [row.display_name for row in store.residents("XH-0014")] == ["林*"]


def test_one_line_json_errors_name_their_row(store: FeedBackend, tmp_path: Path) -> None:
    compact = tmp_path / "health.json"
    subject = "ab" * 16
    compact.write_text(
        f'[{{"health_subject": "{subject}", "colour": "green", "as_of": 1000}}, '
        f'{{"health_subject": "{subject}", "colour": "purple", "as_of": 1000}}, 7]',
        encoding="utf-8",
    )

    result = import_health(store, compact)

    assert [(error.line, error.row) for error in result.errors] == [(1, 2), (1, 3)]


def test_health_json_and_older_status(store: FeedBackend, tmp_path: Path) -> None:
    result = import_health(store, FEEDS / "health.json")
    assert reasons(result.errors) == [(3, "invalid_colour")]
    assert store.health([health_subject(21)])[health_subject(21)].colour == "red"

    older = tmp_path / "older.csv"
    older.write_text(f"health_subject,colour,as_of\n{health_subject(21)},green,1000\n")
    result = import_health(store, older)

    assert result.errors == []
    assert result.stored == 0
    assert store.health([health_subject(21)])[health_subject(21)].colour == "red"


def test_roster_removes_missing_keeps_rejected(store: FeedBackend, tmp_path: Path) -> None:
    import_roster(store, FEEDS / "roster.csv")
    header = "site,subject,health_subject,display_name,building,unit,role,valid_from,valid_until\n"
    second = tmp_path / "second.csv"
    # Subject 1 is kept although its row is rejected now, and subject 2 is left out.
    second.write_text(
        header
        + f"XH-0012,{subject(1)},{health_subject(1)},张*丰,3,1-502,tenant,2026-01-01,2026-12-31\n"
        + f"XH-0012,{subject(3)},{health_subject(3)},王*,3,1-504,resident,2026-01-01,2026-12-31\n",
        encoding="utf-8",
    )

    result = import_roster(store, second)

    assert reasons(result.errors) == [(2, "invalid_role")]
    assert result.removed == 1
    assert sorted(row.subject for row in store.residents("XH-0012")) == [subject(1), subject(3)]


def test_unreadable_feed_stores_nothing(store: FeedBackend, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"health_subject": "x"} {"a": 1}]', encoding="utf-8")

    with pytest.raises(FeedError, match="line 1"):
        import_health(store, broken)
    with pytest.raises(FeedError, match="array"):
        import_health(store, FEEDS / "roster.csv", "json")


def test_decode_feed_encodings() -> None:
    text = "姓名,健康码\n张三,绿\n"

    assert decode_feed(text.encode("utf-8")) == text
    assert decode_feed(b"\xef\xbb\xbf" + text.encode("utf-8")) == text
    assert decode_feed(text.encode("gb18030")) == text


def test_parse_time_forms() -> None:
    assert parse_time("1796400000") == 1_796_400_000
    assert parse_time("2026-01-01") == 1_767_196_800
    assert parse_time("2026-01-01", end_of_day=True) == 1_767_283_200
    assert parse_time("2026-01-01T08:00:00") == 1_767_225_600
    assert parse_time("2026-01-01T00:00:00+00:00") == 1_767_225_600
    with pytest.raises(ValueError):
        parse_time("2026-02-30")


def test_progress_bar_only_on_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        bar = ProgressBar(4, "feed.csv", stream)
        for done in range(1, 5):
            bar.update(done)
        bar.finish()

    assert plain.getvalue() == ""
    assert terminal.getvalue().endswith("feed.csv [" + "#" * 30 + "] 100%\n")


def test_store_migrates_once_beside_hub(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    HubStore(path).close()
    FeedStore(path).close()
    with FeedStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
    with HubStore(path) as hub:
        assert hub.schema_version() == len(HUB_MIGRATIONS)

    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT version FROM feeds_migrations").fetchall()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert rows == [(version,) for version in range(1, len(MIGRATIONS) + 1)]
    assert mode == "wal"


def test_postgres_store_migrates_once_beside_hub(postgres_url: str) -> None:
    PostgresHubStore(postgres_url).close()
    PostgresFeedStore(postgres_url).close()
    with PostgresFeedStore(postgres_url) as store:
        assert store.schema_version() == len(PG_MIGRATIONS)
    with PostgresHubStore(postgres_url) as hub:
        assert hub.schema_version() == len(PG_HUB_MIGRATIONS)

    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT version FROM feeds_migrations ORDER BY version").fetchall()
    assert rows == [(version,) for version in range(1, len(PG_MIGRATIONS) + 1)]


def test_both_backends_have_same_feed_migrations() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


def run_cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.tr = translator("en")
    output = io.StringIO()
    with redirect_stdout(output):
        result: int = args.handler(args)
    return result, output.getvalue()


def test_cli_import_exit_codes(store_value: str, tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'store = "{store_value}"\ndistrict_key_file = "district.key"\n', encoding="utf-8"
    )
    good = tmp_path / "good.csv"
    shutil.copy(FEEDS / "roster-bom.csv", good)

    code, output = run_cli(["import", "roster", "--config", str(config), str(FEEDS / "roster.csv")])
    assert code == 1
    assert "Read 7 rows: 2 stored, 5 rejected" in output
    assert "Line 4 (row 3): invalid_subject:" in output
    assert "Line 8 (row 7): duplicate_subject:" in output

    code, output = run_cli(["import", "roster", "--config", str(config), str(good)])
    assert code == 0
    assert "Read 2 rows: 2 stored, 0 rejected" in output

    code, output = run_cli(
        [
            "import",
            "health",
            "--config",
            str(config),
            "--format",
            "json",
            str(FEEDS / "health.json"),
        ]
    )
    assert code == 1
    assert "Line 3 (row 2): invalid_colour:" in output


def test_roster_wrong_cell_count_keeps_resident(store: FeedBackend, tmp_path: Path) -> None:
    import_roster(store, FEEDS / "roster.csv")
    header = "site,subject,health_subject,display_name,building,unit,role,valid_from,valid_until\n"
    second = tmp_path / "second.csv"
    second.write_text(
        header
        + f"XH-0012,{subject(1)},{health_subject(1)},张*丰,3,1-502,resident,2026-01-01\n"
        + f"XH-0012,{subject(2)},{health_subject(2)},李*,3,1-503,visitor,2026-01-01,2026-12-31\n",
        encoding="utf-8",
    )

    result = import_roster(store, second)

    assert reasons(result.errors) == [(2, "wrong_column_count")]
    assert result.removed == 0
    assert sorted(row.subject for row in store.residents("XH-0012")) == [subject(1), subject(2)]
