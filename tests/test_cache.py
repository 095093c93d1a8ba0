"""Snapshot import: signature checks, rejection keeps the old cache, atomic replacement."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from edgenode.cache import Cache, CacheImportError, import_snapshot
from edgenode.cli import main
from edgenode.snapshot import MAGIC, write_snapshot

SITE = "XH-0012"
NOW = int(time.time())


def resident(n: int) -> dict[str, Any]:
    return {
        "dataset": "residents",
        "subject": f"{n:032x}",
        "compound": SITE,
        "building": "1",
        "unit": "101",
        "role": "resident",
        "valid_from": NOW - 1000,
        "valid_until": NOW + 1000,
        "display_name": "张*",
    }


def snapshot(
    path: Path, key: SigningKey, residents: int, *, version: int = 1, site: str = SITE
) -> Path:
    write_snapshot(
        path,
        (resident(n) for n in range(residents)),
        site=site,
        version=version,
        issued_at=NOW - 60,
        valid_until=NOW + 3600,
        signing_key=key,
    )
    return path


@pytest.fixture
def district_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def cache_path(tmp_path: Path, district_key: SigningKey) -> Path:
    """A cache holding version 1 with 3 residents."""
    path = tmp_path / "cache.db"
    import_snapshot(
        path, snapshot(tmp_path / "v1.ensnap", district_key, 3), [bytes(district_key.verify_key)]
    )
    return path


def resident_count(path: Path) -> int:
    with Cache(path) as cache:
        return next(info.rows for info in cache.datasets() if info.name == "residents")


def rejected_reason(cache_path: Path, snapshot_path: Path, keys: list[bytes], **kwargs: Any) -> str:
    with pytest.raises(CacheImportError) as caught:
        import_snapshot(cache_path, snapshot_path, keys, **kwargs)
    return caught.value.reason


def test_import_records_version_and_rows(cache_path: Path) -> None:
    with Cache(cache_path) as cache:
        infos = {info.name: info for info in cache.datasets()}
    assert infos["residents"].version == 1
    assert infos["residents"].rows == 3
    assert infos["residents"].issued_at == NOW - 60


def test_newer_snapshot_replaces_cache(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    new = snapshot(tmp_path / "v2.ensnap", district_key, 5, version=2)
    import_snapshot(cache_path, new, [bytes(district_key.verify_key)])
    assert resident_count(cache_path) == 5


def test_unknown_signer_is_rejected_and_old_cache_kept(tmp_path: Path, cache_path: Path) -> None:
    rogue = snapshot(tmp_path / "rogue.ensnap", SigningKey.generate(), 9, version=2)
    other_key = bytes(SigningKey.generate().verify_key)
    assert rejected_reason(cache_path, rogue, [other_key]) == "unknown_signer"
    assert resident_count(cache_path) == 3


def test_tampered_header_fails_signature(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    path = snapshot(tmp_path / "v2.ensnap", district_key, 9, version=2)
    data = path.read_bytes().replace(b'"version": 2', b'"version": 7', 1)
    path.write_bytes(data)
    assert rejected_reason(cache_path, path, [bytes(district_key.verify_key)]) == "bad_signature"
    assert resident_count(cache_path) == 3


def test_tampered_body_fails_hash(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    path = snapshot(tmp_path / "v2.ensnap", district_key, 50, version=2)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    reason = rejected_reason(cache_path, path, [bytes(district_key.verify_key)])
    assert reason == "body_hash_mismatch"
    assert resident_count(cache_path) == 3


def test_appended_bytes_fail_hash(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    path = snapshot(tmp_path / "v2.ensnap", district_key, 5, version=2)
    path.write_bytes(path.read_bytes() + b"\x00" * 10)
    reason = rejected_reason(cache_path, path, [bytes(district_key.verify_key)])
    assert reason == "body_hash_mismatch"


def test_snapshot_for_other_site_is_rejected(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    path = snapshot(tmp_path / "other.ensnap", district_key, 5, version=2, site="XH-0099")
    reason = rejected_reason(cache_path, path, [bytes(district_key.verify_key)], site=SITE)
    assert reason == "wrong_site"


def test_older_version_is_rejected(tmp_path: Path, district_key: SigningKey) -> None:
    cache_path = tmp_path / "cache.db"
    keys = [bytes(district_key.verify_key)]
    import_snapshot(cache_path, snapshot(tmp_path / "v5.ensnap", district_key, 2, version=5), keys)
    old = snapshot(tmp_path / "v4.ensnap", district_key, 2, version=4)
    assert rejected_reason(cache_path, old, keys) == "older_version"


def test_bad_record_is_rejected_with_its_number(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    bad = resident(99) | {"role": "landlord"}
    path = tmp_path / "bad.ensnap"
    write_snapshot(
        path, [resident(1), bad], site=SITE, version=2, issued_at=NOW, valid_until=NOW + 60,
        signing_key=district_key,
    )  # fmt: skip
    with pytest.raises(CacheImportError) as caught:
        import_snapshot(cache_path, path, [bytes(district_key.verify_key)])
    assert caught.value.reason == "bad_record"
    assert "record 2" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello", id="not-a-snapshot"),
        pytest.param(MAGIC + b"{not json}\n", id="bad-header"),
        pytest.param(
            MAGIC + json.dumps({"format": "x"}).encode() + b"\n", id="header-missing-fields"
        ),
    ],
)
def test_malformed_file_is_rejected(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, content: bytes
) -> None:
    path = tmp_path / "junk.ensnap"
    path.write_bytes(content)
    assert rejected_reason(cache_path, path, [bytes(district_key.verify_key)])
    assert resident_count(cache_path) == 3


def test_missing_snapshot_file_is_rejected(tmp_path: Path, cache_path: Path) -> None:
    assert rejected_reason(cache_path, tmp_path / "absent", []) == "file_not_found"


def test_open_reader_switches_to_new_cache_on_refresh(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    subject = bytes.fromhex(f"{4:032x}")
    with Cache(cache_path) as cache:
        assert cache.resident(subject) is None
        new = snapshot(tmp_path / "v2.ensnap", district_key, 5, version=2)
        import_snapshot(cache_path, new, [bytes(district_key.verify_key)])
        # Until refresh the reader keeps the complete old file open.
        assert cache.resident(subject) is None
        cache.refresh()
        assert cache.resident(subject) is not None


def test_failed_import_leaves_no_temporary_file(
    tmp_path: Path, cache_path: Path, district_key: SigningKey
) -> None:
    rogue = snapshot(tmp_path / "rogue.ensnap", SigningKey.generate(), 2, version=2)
    rejected_reason(cache_path, rogue, [bytes(district_key.verify_key)])
    assert sorted(p.name for p in cache_path.parent.glob("cache.db*")) == ["cache.db"]


def test_missing_cache_file_reads_as_empty(tmp_path: Path) -> None:
    with Cache(tmp_path / "none.db") as cache:
        assert cache.is_empty()
        assert cache.resident(bytes(16)) is None


def test_cache_status_json_lists_datasets(
    tmp_path: Path, district_key: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from base64 import b64encode

    config = tmp_path / "edgenode.toml"
    key = b64encode(bytes(district_key.verify_key)).decode()
    config.write_text(
        f'[device]\nid = "g"\nsite = "{SITE}"\nstate_dir = "state"\n'
        f'[trust]\ndistrict_keys = ["{key}"]\n',
        encoding="utf-8",
    )
    path = snapshot(tmp_path / "v1.ensnap", district_key, 4)
    assert main(["--lang", "en", "cache", "import", "--config", str(config), str(path)]) == 0
    capsys.readouterr()
    assert main(["cache", "status", "--json", "--config", str(config)]) == 0
    status = json.loads(capsys.readouterr().out)
    residents = next(d for d in status["datasets"] if d["dataset"] == "residents")
    assert residents["rows"] == 4
    assert residents["version"] == 1
    assert residents["stale"] is False


def test_cache_import_command_reports_rejection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edgenode.toml"
    other = b"A" * 43 + b"="
    config.write_text(
        f'[device]\nid = "g"\nsite = "{SITE}"\nstate_dir = "state"\n'
        f'[trust]\ndistrict_keys = ["{other.decode()}"]\n',
        encoding="utf-8",
    )
    path = snapshot(tmp_path / "v1.ensnap", SigningKey.generate(), 2)
    code = main(["--lang", "en", "cache", "import", "--config", str(config), str(path)])
    assert code == 1
    assert "unknown_signer" in capsys.readouterr().err
