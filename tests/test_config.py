"""Config loading: unknown keys, bounds and bad files are errors with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgenode.cli import main
from edgenode.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "edgenode.example.toml"
MINIMAL = '[device]\nid = "gate-01"\nsite = "XH-0012"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgenode.toml"
    path.write_text(text, encoding="utf-8")
    return path


def issue_paths(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [issue.key_path for issue in caught.value.issues]


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert config.device.site == "XH-0012"


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.policy.stale_after_s == 86_400
    assert config.display.language is None
    assert config.decoder.backend == "zxing"


def test_relative_state_dir_is_taken_from_config_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + 'state_dir = "state"\n'))
    assert config.journal_path == tmp_path / "state" / "journal.db"


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        pytest.param(MINIMAL + "colour = 1\n", "device.colour", id="unknown-key"),
        pytest.param(MINIMAL + "[gpio]\npin = 4\n", "gpio", id="unknown-table"),
        pytest.param(
            MINIMAL + "[policy]\nstale_after_s = 5\n", "policy.stale_after_s", id="below-min"
        ),
        pytest.param(
            MINIMAL + "[pairing]\npair_window_ms = 999999\n",
            "pairing.pair_window_ms",
            id="above-max",
        ),
        pytest.param(MINIMAL + '[policy]\nyellow = "admit"\n', "policy.yellow", id="unsafe-yellow"),
        pytest.param(
            MINIMAL + '[decoder]\nbackend = "opencv"\n', "decoder.backend", id="bad-backend"
        ),
        pytest.param(
            MINIMAL + '[trust]\ndistrict_keys = ["bm90IGEga2V5"]\n',
            "trust.district_keys",
            id="short-key",
        ),
        pytest.param(
            MINIMAL + '[[policy.token_patterns]]\nname = "x"\nregex = "abc("\n',
            "policy.token_patterns.0.regex",
            id="bad-regex",
        ),
        pytest.param(
            MINIMAL + '[[policy.token_patterns]]\nname = "x"\nregex = "abc"\n',
            "policy.token_patterns.0.regex",
            id="regex-without-token-group",
        ),
        pytest.param('[device]\nid = "gate-01"\n', "device.site", id="missing-site"),
        pytest.param(
            MINIMAL + '[sync.tls]\nkey_file = "gate.key"\n', "sync.tls", id="key-without-cert"
        ),
    ],
)
def test_invalid_value_is_reported_with_key_path(tmp_path: Path, text: str, key_path: str) -> None:
    assert key_path in issue_paths(write(tmp_path, text))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL + "colour = 1\n[policy]\nstale_after_s = 5\n"
    assert set(issue_paths(write(tmp_path, text))) == {"device.colour", "policy.stale_after_s"}


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"[device\n", id="bad-toml"), pytest.param(b"\xff\xfe", id="not-utf8")],
)
def test_unparseable_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    assert issue_paths(path) == ["(file)"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert issue_paths(tmp_path / "absent.toml") == ["(file)"]


def test_config_check_exits_2_and_prints_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL + "colour = 1\n")
    code = main(["--lang", "en", "config", "check", str(path)])
    output = capsys.readouterr().out
    assert code == 2
    assert "device.colour" in output


def test_config_check_accepts_valid_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--lang", "en", "config", "check", str(EXAMPLE)])
    assert code == 0
    assert "is valid" in capsys.readouterr().out
