"""Delta application: fit by version, signatures, atomic replacement, recorded versions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from edgenode.cache import Cache, CacheImportError, cache_version, import_snapshot
from edgenode.snapshot import write_snapshot
from sync.delta import apply_delta, write_delta

SITE = "XH-0012"
NOW = int(time.time())


def resident(n: int, building: str = "1") -> dict[str, Any]:
    return {
        "dataset": "residents",
        "subject": f"{n:032x}",
        "compound": SITE,
        "building": building,
        "unit": "101",
        "role": "resident",
        "valid_from": NOW - 1000,
        "valid_until": NOW + 1000,
        "display_name": "张*",
    }


def subject(n: int) -> bytes:
    return bytes.fromhex(f"{n:032x}")


def upsert(n: int, building: str = "1") -> dict[str, Any]:
    return {"op": "upsert"} | resident(n, building)


def delete(n: int) -> dict[str, Any]:
    return {"op": "delete", "dataset": "residents", "subject": f"{n:032x}"}


@pytest.fixture
def district_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def keys(district_key: SigningKey) -> list[bytes]:
    return [bytes(district_key.verify_key)]


def make_cache(tmp_path: Path, key: SigningKey, residents: int, version: int = 1) -> Path:
    snapshot = tmp_path / f"v{version}.ensnap"
    write_snapshot(
        snapshot,
        (resident(n) for n in range(residents)),
        site=SITE,
        version=version,
        issued_at=NOW - 600,
        valid_until=NOW + 3600,
        signing_key=key,
    )
    path = tmp_path / "cache.db"
    import_snapshot(path, snapshot, [bytes(key.verify_key)], now=NOW - 500)
    return path


@pytest.fixture
def cache_path(tmp_path: Path, district_key: SigningKey) -> Path:
    """A cache holding version 1 with residents 0 to 9."""
    return make_cache(tmp_path, district_key, 10)


def delta(
    path: Path,
    key: SigningKey,
    records: list[dict[str, Any]],
    *,
    base: int = 1,
    version: int = 2,
    site: str = SITE,
) -> Path:
    write_delta(
        path,
        records,
        site=site,
        base_version=base,
        version=version,
        issued_at=NOW - 30,
        valid_until=NOW + 7200,
        signing_key=key,
    )
    return path


def rejected_reason(cache_path: Path, delta_path: Path, keys: list[bytes], **kwargs: Any) -> str:
    with pytest.raises(CacheImportError) as caught:
        apply_delta(cache_path, delta_path, keys, **kwargs)
    return caught.value.reason


def residents_of(path: Path) -> set[int]:
    with Cache(path) as cache:
        return {n for n in range(100) if cache.resident(subject(n)) is not None}


def test_delta_upserts_and_deletes(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    changes = [upsert(3, building="7"), upsert(42), delete(5), delete(99)]
    header = apply_delta(cache_path, delta(tmp_path / "d2", district_key, changes), keys)

    assert header.version == 2
    assert residents_of(cache_path) == (set(range(10)) - {5}) | {42}
    with Cache(cache_path) as cache:
        changed = cache.resident(subject(3))
    assert changed is not None
    assert changed.building == "7"


def test_delta_records_versions_and_times(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    apply_delta(cache_path, delta(tmp_path / "d2", district_key, [upsert(42)]), keys, now=NOW)

    with Cache(cache_path) as cache:
        infos = {info.name: info for info in cache.datasets()}
    assert cache_version(cache_path) == 2
    assert {info.version for info in infos.values()} == {2}
    assert infos["residents"].rows == 11
    assert infos["residents"].issued_at == NOW - 30
    assert infos["residents"].synced_at == NOW
    assert infos["residents"].valid_until == NOW + 7200
    assert infos["revocations"].rows == 0


def test_deltas_apply_in_sequence(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    apply_delta(cache_path, delta(tmp_path / "d2", district_key, [upsert(20)]), keys)
    d3 = delta(tmp_path / "d3", district_key, [delete(20)], base=2, version=3)
    apply_delta(cache_path, d3, keys)

    assert cache_version(cache_path) == 3
    assert 20 not in residents_of(cache_path)


@pytest.mark.parametrize(("base", "version"), [(2, 3), (5, 9)])
def test_delta_ahead_of_cache_is_version_gap(
    tmp_path: Path,
    cache_path: Path,
    district_key: SigningKey,
    keys: list[bytes],
    base: int,
    version: int,
) -> None:
    path = delta(tmp_path / "gap", district_key, [upsert(42)], base=base, version=version)

    assert rejected_reason(cache_path, path, keys) == "version_gap"
    assert cache_version(cache_path) == 1
    assert 42 not in residents_of(cache_path)


def test_delta_already_applied_is_version_gap(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [upsert(42)])
    apply_delta(cache_path, path, keys)

    assert rejected_reason(cache_path, path, keys) == "version_gap"
    assert cache_version(cache_path) == 2


def test_delta_without_cache_is_version_gap(
    tmp_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [upsert(42)])

    assert rejected_reason(tmp_path / "absent.db", path, keys) == "version_gap"
    assert not (tmp_path / "absent.db").exists()


def test_unknown_signer_is_rejected(tmp_path: Path, cache_path: Path, keys: list[bytes]) -> None:
    path = delta(tmp_path / "rogue", SigningKey.generate(), [delete(1)])

    assert rejected_reason(cache_path, path, keys) == "unknown_signer"
    assert 1 in residents_of(cache_path)


def test_tampered_header_fails_signature(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [delete(1)])
    path.write_bytes(path.read_bytes().replace(b'"version": 2', b'"version": 3', 1))

    assert rejected_reason(cache_path, path, keys) == "bad_signature"
    assert cache_version(cache_path) == 1


def test_tampered_body_fails_hash(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [delete(n) for n in range(10)])
    data = bytearray(path.read_bytes())
    data[-12] ^= 0xFF
    path.write_bytes(bytes(data))

    assert rejected_reason(cache_path, path, keys) == "body_hash_mismatch"
    assert residents_of(cache_path) == set(range(10))


def test_truncated_delta_is_rejected(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [delete(n) for n in range(10)])
    path.write_bytes(path.read_bytes()[:-20])

    assert rejected_reason(cache_path, path, keys) == "body_hash_mismatch"
    assert cache_version(cache_path) == 1


def test_delta_for_other_site_is_rejected(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    path = delta(tmp_path / "d2", district_key, [delete(1)], site="XH-0099")

    assert rejected_reason(cache_path, path, keys, site=SITE) == "wrong_site"
    # Without the caller's site the cache's own site still rejects it.
    assert rejected_reason(cache_path, path, keys) == "wrong_site"
    assert 1 in residents_of(cache_path)


def test_bad_record_leaves_cache_unchanged(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    bad = upsert(50) | {"role": "landlord"}
    path = delta(tmp_path / "d2", district_key, [delete(1), upsert(42), bad])

    with pytest.raises(CacheImportError) as caught:
        apply_delta(cache_path, path, keys)

    assert caught.value.reason == "bad_record"
    assert "record 3" in str(caught.value)
    assert residents_of(cache_path) == set(range(10))
    assert cache_version(cache_path) == 1
    assert not (tmp_path / "cache.db.applying").exists()


def test_open_reader_sees_delta_after_refresh(
    tmp_path: Path, cache_path: Path, district_key: SigningKey, keys: list[bytes]
) -> None:
    with Cache(cache_path) as cache:
        apply_delta(cache_path, delta(tmp_path / "d2", district_key, [upsert(42)]), keys)
        # Until refresh the reader keeps the complete old file open.
        assert cache.resident(subject(42)) is None
        cache.refresh()
        assert cache.resident(subject(42)) is not None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        pytest.param({"op": "upsert", "dataset": "pets"}, "unknown dataset", id="dataset"),
        pytest.param({"op": "merge", "dataset": "residents"}, "op must be", id="op"),
        pytest.param({"op": "delete", "dataset": "residents"}, "lacks its key", id="key"),
    ],
)
def test_write_delta_rejects_bad_record(
    tmp_path: Path, district_key: SigningKey, record: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        delta(tmp_path / "d2", district_key, [record])


def test_write_delta_rejects_version_not_after_base(
    tmp_path: Path, district_key: SigningKey
) -> None:
    with pytest.raises(ValueError, match="must follow"):
        delta(tmp_path / "d2", district_key, [], base=3, version=3)


def changes(count: int, residents: int) -> Iterator[dict[str, Any]]:
    """Half updates of existing residents, a quarter new residents, a quarter deletes."""
    for n in range(count):
        if n % 4 == 0:
            yield delete(n * 7 % residents)
        elif n % 4 == 1:
            yield upsert(residents + n)
        else:
            yield upsert(n * 13 % residents, building="9")


@pytest.mark.slow
def test_delta_applies_to_large_cache(tmp_path: Path, district_key: SigningKey) -> None:
    residents = 100_000
    cache_path = make_cache(tmp_path, district_key, residents)
    path = delta(tmp_path / "d2", district_key, list(changes(1_000, residents)))

    # The time is printed for docs/benchmarks.md (run with -s); it is not asserted, because
    # timings on a shared machine are not a test.
    started = time.perf_counter()
    apply_delta(cache_path, path, [bytes(district_key.verify_key)])
    elapsed = time.perf_counter() - started

    size_mb = cache_path.stat().st_size / 1e6
    print(f"delta of 1000 changes on {residents} residents ({size_mb:.1f} MB): {elapsed:.3f} s")
    assert cache_version(cache_path) == 2
