"""End to end: codes minted by the CLI, rendered into phone photos, scanned by `edgenode scan`.

Each row of docs/policy.md is built by the same scenario as the policy table test, but every
code passes through a rendered photo, the QR decoder and the command line.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgenode.cli import main
from edgenode.demo.render import Effects, render_phone_photo
from tests.scenarios import (
    ROWS,
    SITE,
    TOKEN_PATTERN,
    Scenario,
    Site,
    TableRow,
    merge_records,
    read_policy_table,
)

TABLE = read_policy_table()
EFFECTS = (
    Effects(),
    Effects(perspective=0.4),
    Effects(blur=0.3, colour="green"),
    Effects(glare=0.4),
    Effects(dark_mode=True),
    Effects(rotation_deg=12, colour="yellow"),
    Effects(colour="red", perspective=0.3),
)


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--lang", "en", *args])
    return code, out.getvalue()


class CliMinter:
    """Mints codes through `edgenode district issue`."""

    def health(
        self, key: Path, subject: bytes, colour: str, issued_at: int, valid_for: int, printed: bool
    ) -> str:
        args = ["district", "issue", "health", "--key", str(key), "--subject", subject.hex()]
        args += ["--colour", colour, "--issued-at", str(issued_at), "--valid-for", str(valid_for)]
        return self._mint(args, printed)

    def community(
        self,
        key: Path,
        subject: bytes,
        role: str,
        compound: str,
        building: str,
        unit: str,
        issued_at: int,
        valid_for: int,
        printed: bool,
    ) -> str:
        args = ["district", "issue", "community", "--key", str(key), "--subject", subject.hex()]
        args += ["--role", role, "--compound", compound, "--building", building, "--unit", unit]
        args += ["--issued-at", str(issued_at), "--valid-for", str(valid_for)]
        return self._mint(args, printed)

    @staticmethod
    def _mint(args: list[str], printed: bool) -> str:
        code, output = run_cli(*args, *(["--printed"] if printed else []))
        assert code == 0, output
        return output.strip()


def write_photo(codes: list[str], path: Path, effects: Effects, seed: int) -> None:
    """Render the codes held up together. Three codes need two phones side by side."""
    phones = [codes[i : i + 2] for i in range(0, len(codes), 2)]
    frames = [render_phone_photo(p, effects, seed=seed + n) for n, p in enumerate(phones)]
    cv2.imwrite(str(path), np.hstack(frames))


def prepare_site(site: Site, scenario: Scenario) -> Path:
    """Write the config, build the snapshot with the CLI and import it. Returns the config."""
    folder = site.folder
    key_b64 = base64.b64encode(site.district_public_key()).decode()
    config = folder / "edgenode.toml"
    config.write_text(
        f"""
[device]
id = "gate-e2e"
site = "{SITE}"
station = "north"
state_dir = "state"

[trust]
district_keys = ["{key_b64}"]

[[policy.token_patterns]]
name = "city"
regex = '{TOKEN_PATTERN}'
""",
        encoding="utf-8",
    )
    records: dict[str, list[dict[str, Any]]] = {}
    for record in merge_records(site.base_records(), scenario.extra_records):
        fields = {k: v for k, v in record.items() if k != "dataset"}
        records.setdefault(record["dataset"], []).append(fields)
    (folder / "records.json").write_text(json.dumps(records), encoding="utf-8")
    snapshot = folder / "snapshot.ensnap"
    code, output = run_cli(
        "district", "issue", "snapshot",
        "--key", str(site.keys["district"]),
        "--site", SITE,
        "--records", str(folder / "records.json"),
        "--out", str(snapshot),
        "--issued-at", str(site.now - scenario.snapshot_age_s),
        "--valid-for", str(scenario.snapshot_valid_for),
    )  # fmt: skip
    assert code == 0, output
    if scenario.import_cache:
        code, output = run_cli("cache", "import", "--config", str(config), str(snapshot))
        assert code == 0, output
    return config


@pytest.mark.slow
@pytest.mark.parametrize("row", TABLE, ids=[row.row for row in TABLE])
def test_scanned_photo_reaches_row_verdict(row: TableRow, tmp_path: Path) -> None:
    index = list(ROWS).index(row.row)
    site = Site.create(tmp_path, int(time.time()), CliMinter())
    scenario = ROWS[row.row](site)
    config = prepare_site(site, scenario)
    photos = []
    for n, codes in enumerate(scenario.scans):
        photo = tmp_path / f"scan-{n}.png"
        write_photo(codes, photo, EFFECTS[(index + n) % len(EFFECTS)], seed=index)
        photos.append(str(photo))

    args = ["scan", "--json", "--config", str(config)]
    if scenario.clock_offset_s:
        args += ["--now", str(site.now + scenario.clock_offset_s)]
    if not scenario.clock_synchronised:
        args.append("--clock-unsynchronised")
    code, output = run_cli(*args, *photos)
    verdicts = [json.loads(line) for line in output.splitlines()]
    last = verdicts[-1]

    assert code == 0
    assert last["verdict"] == row.verdict, last
    assert last["reasons"][0] == row.reasons[0]
    assert set(row.reasons) <= set(last["reasons"])
