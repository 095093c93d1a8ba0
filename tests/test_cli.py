"""Command-line behaviour: decode for installers, district minting, and errors with exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgenode.cli import main

SUBJECT = "00112233445566778899aabbccddeeff"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--lang", "en", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(capsys, "district", "issue", "keys", "--out", str(tmp_path / "keys"))
    assert code == 0, err
    return tmp_path / "keys"


def test_keys_are_owner_only(keys: Path) -> None:
    modes = {path.name: path.stat().st_mode & 0o777 for path in keys.iterdir()}
    assert set(modes.values()) == {0o600}


def test_keys_are_never_overwritten(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "district", "issue", "keys", "--out", str(keys))
    assert code == 1
    assert "already exists" in err


@pytest.mark.parametrize("colour", ["green", "yellow", "red"])
def test_decode_reads_minted_png_exactly(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], colour: str
) -> None:
    png = tmp_path / "health.png"
    code, text, _ = run(
        capsys, "district", "issue", "health", "--key", str(keys / "issuer-health.key"),
        "--subject", SUBJECT, "--colour", colour, "--png", str(png),
    )  # fmt: skip
    assert code == 0
    code, output, _ = run(capsys, "decode", "--json", str(png))
    decoded = [json.loads(line) for line in output.splitlines()]
    assert code == 0
    assert [d["text"] for d in decoded] == [text.strip()]
    assert decoded[0]["file"] == str(png)


def test_decode_reports_image_without_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2
    import numpy as np

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 255, np.uint8))
    code, output, err = run(capsys, "decode", str(blank))
    assert code == 0
    assert output == ""
    assert "no QR code found" in err


def test_community_code_with_bad_field_is_an_error(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "district", "issue", "community", "--key", str(keys / "issuer-community.key"),
        "--subject", SUBJECT, "--compound", "X" * 40, "--building", "1",
    )  # fmt: skip
    assert code == 1
    assert "compound" in err


def test_missing_key_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "district", "issue", "health", "--key", str(tmp_path / "absent.key"),
        "--subject", SUBJECT, "--colour", "green",
    )  # fmt: skip
    assert code == 1
    assert "not found" in err


def test_scan_of_missing_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edgenode.toml"
    config.write_text('[device]\nid = "g"\nsite = "X"\nstate_dir = "state"\n', encoding="utf-8")
    code, _, err = run(capsys, "scan", "--config", str(config), str(tmp_path / "absent.png"))
    assert code == 1
    assert "absent.png" in err


def test_scan_with_invalid_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edgenode.toml"
    config.write_text('[device]\nid = "g"\n', encoding="utf-8")
    code, _, err = run(capsys, "scan", "--config", str(config), "x.png")
    assert code == 2
    assert "device.site" in err


def test_site_command_builds_an_importable_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    code, _, err = run(capsys, "district", "issue", "site", "--out", str(site), "--residents", "20")
    assert code == 0, err
    config = str(site / "edgenode.toml")
    code, _, err = run(capsys, "cache", "import", "--config", config, str(site / "snapshot.ensnap"))
    assert code == 0, err
    code, output, _ = run(capsys, "cache", "status", "--config", config)
    assert code == 0
    assert "residents" in output


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    output = capsys.readouterr().out
    for command in ("demo", "scan", "decode", "cache", "journal", "config", "district"):
        assert command in output


def test_init_creates_device_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    from edgenode.district import read_key

    config = tmp_path / "edgenode.toml"
    config.write_text('[device]\nid = "gate-01"\nsite = "X"\nstate_dir = "state"\n')
    code, first, _ = run(capsys, "init", "--config", str(config))
    key_path = tmp_path / "state" / "device.key"
    public = base64.b64encode(bytes(read_key(key_path).verify_key)).decode()
    assert code == 0
    assert "Created the device key" in first
    assert first.splitlines()[-1] == public
    assert key_path.stat().st_mode & 0o777 == 0o600

    code, second, _ = run(capsys, "init", "--config", str(config))
    assert code == 0
    assert "already exists" in second
    assert second.splitlines()[-1] == public


def test_scan_json_has_the_documented_fields(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "health.png"
    run(
        capsys, "district", "issue", "health", "--key", str(keys / "issuer-health.key"),
        "--subject", SUBJECT, "--colour", "green", "--png", str(png),
    )  # fmt: skip
    config = tmp_path / "edgenode.toml"
    config.write_text('[device]\nid = "g"\nsite = "X"\nstate_dir = "state"\n')
    code, output, _ = run(capsys, "scan", "--json", "--config", str(config), str(png))
    (verdict,) = [json.loads(line) for line in output.splitlines()]
    assert code == 0
    assert verdict["verdict"] == "incomplete"
    assert verdict["reasons"] == ["missing_community_code"]
    assert isinstance(verdict["latency_ms"], float)


def test_output_to_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    example = root / "config" / "edgenode.example.toml"
    process = subprocess.Popen(
        [sys.executable, "-m", "edgenode.cli", "config", "check", str(example)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # The reader is gone before the command prints.
    _, stderr = process.communicate(timeout=60)

    assert b"Traceback" not in stderr
    assert process.returncode == 0
