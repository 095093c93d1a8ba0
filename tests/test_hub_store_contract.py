"""The hub store contract, run against both backends: a SQLite file and a real PostgreSQL.

Every test takes ``location`` and opens the store with ``open_store``, so the SQLite
``HubStore`` and the ``PostgresHubStore`` must give the same results. The PostgreSQL server
comes from tests/postgres.py; without one these tests skip, or fail under ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from sync.hub_store import MIGRATIONS as SQLITE_MIGRATIONS
from sync.hub_store import BatchInsert, HubStoreError, InvalidRecord, TokenRejected, WireRecord
from sync.hub_store_pg import MIGRATIONS as POSTGRES_MIGRATIONS
from sync.hub_store_pg import PostgresHubStore
from sync.store_backend import (
    PostgresUrl,
    StoreLocation,
    StoreUnavailable,
    open_store,
    parse_store_location,
    redact_url,
)
from tests.postgres import postgres_server, postgres_url

__all__ = ["postgres_server", "postgres_url"]

KEY = bytes(SigningKey.generate().verify_key)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreLocation]:
    if request.param == "sqlite":
        yield tmp_path / "hub.db"
    else:
        yield PostgresUrl(request.getfixturevalue("postgres_url"))


def chain(first: int, last: int, **changes: Any) -> list[WireRecord]:
    """Records ``first`` to ``last`` of one gate's hash chain (hash of seq n is n in hex)."""
    return [
        WireRecord(
            seq=seq,
            kind="verdict",
            recorded_at=100.0 + seq,
            age_s=1.5,
            station="north",
            verdict="admit",
            reasons=["none_yet"] if seq % 2 else [],
            health_subject="aa" * 16,
            community_subject=None,
            latency_ms=2.0,
            clock_trusted=True,
            prev_hash="00" * 32 if seq == 1 else f"{seq - 1:064x}",
            hash=f"{seq:064x}",
        ).model_copy(update=changes)
        for seq in range(first, last + 1)
    ]


def test_both_backends_have_same_migrations() -> None:
    assert len(POSTGRES_MIGRATIONS) == len(SQLITE_MIGRATIONS)


def test_store_migrates_once(location: StoreLocation) -> None:
    with open_store(location) as store:
        assert store.schema_version() == len(SQLITE_MIGRATIONS)
    with open_store(location) as store:
        assert store.schema_version() == len(SQLITE_MIGRATIONS)


def test_store_registry_changes(location: StoreLocation) -> None:
    with open_store(location) as store:
        device = store.register_device("S1", "gate-01", KEY, now=1000.0)
        assert device.enabled
        assert device.registered_at == 1000.0
        assert device.public_key == KEY
        with pytest.raises(HubStoreError, match="already registered"):
            store.register_device("S1", "gate-01", KEY)
        # The same device id at another site is another gate.
        other = store.register_device("S2", "gate-01", KEY)
        assert other.id != device.id
        with pytest.raises(HubStoreError, match="32 bytes"):
            store.register_device("S1", "gate-02", b"short")

        store.disable_device("S1", "gate-01")
        disabled = store.get_device("S1", "gate-01")
        assert disabled is not None
        assert not disabled.enabled
        store.enable_device("S1", "gate-01")
        enabled = store.get_device("S1", "gate-01")
        assert enabled is not None
        assert enabled.enabled
        with pytest.raises(HubStoreError, match="not registered"):
            store.disable_device("S1", "gate-99")
        assert store.get_device("S1", "gate-99") is None

        listed = [(d.site, d.device_id) for d in store.list_devices()]
        assert listed == [("S1", "gate-01"), ("S2", "gate-01")]


def test_store_insert_batch_idempotent(location: StoreLocation) -> None:
    with open_store(location) as store:
        first = store.register_device("S1", "gate-01", KEY)
        second = store.register_device("S2", "gate-01", KEY)
        result = store.insert_batch(first, chain(1, 3), lane="normal", batch_id="a")
        assert (result.new, result.duplicates) == (3, 0)
        again = store.insert_batch(first, chain(2, 4), lane="priority", batch_id="b")
        assert (again.new, again.duplicates) == (1, 2)
        other = store.insert_batch(second, chain(1, 3), lane="normal", batch_id="c")
        assert (other.new, other.duplicates) == (3, 0)
        assert store.stored_seqs(first) == [1, 2, 3, 4]
        assert store.record_count() == 7

        rows = store.records(first)
        assert rows[0]["batch_id"] == "a"
        assert rows[1]["lane"] == "normal"  # The first stored copy is kept.
        assert rows[3]["batch_id"] == "b"
        assert rows[0]["age_s"] == 1.5
        assert rows[0]["recorded_at"] == 101.0
        assert rows[0]["received_at"] > 0
        assert rows[0]["reasons"] == '["none_yet"]'
        assert rows[0]["health_subject"] == "aa" * 16
        assert rows[0]["community_subject"] is None
        assert bool(rows[0]["clock_trusted"]) is True


def test_store_keeps_override_and_method_fields(location: StoreLocation) -> None:
    id_check = chain(1, 1, method="id_number", verdict="review", reasons=["health_unknown"])
    override = chain(2, 2, kind="override", verdict="admit", reasons=["resident_known_to_guard"])
    override = [override[0].model_copy(update={"verdict_seq": 1, "guard_id": "G01"})]
    with open_store(location) as store:
        gate = store.register_device("S1", "gate-01", KEY)
        store.insert_batch(gate, id_check + override, lane="normal", batch_id="a")
        rows = store.records(gate)

    assert rows[0]["method"] == "id_number"
    assert rows[0]["verdict_seq"] is None
    assert rows[1]["kind"] == "override"
    assert rows[1]["verdict_seq"] == 1
    assert rows[1]["guard_id"] == "G01"
    assert rows[1]["method"] is None


def test_store_insert_batches_in_one_transaction(location: StoreLocation) -> None:
    with open_store(location) as store:
        first = store.register_device("S1", "gate-01", KEY)
        second = store.register_device("S1", "gate-02", KEY)
        results = store.insert_batches(
            [
                BatchInsert(first, tuple(chain(1, 3)), "normal", "a"),
                BatchInsert(second, tuple(chain(1, 2)), "normal", "b"),
                # Overlaps the first batch of the same transaction.
                BatchInsert(first, tuple(chain(3, 5)), "priority", "c"),
            ]
        )
        assert [(r.new, r.duplicates) for r in results] == [(3, 0), (2, 0), (2, 1)]
        assert results[2].chain_breaks == ()
        assert store.stored_seqs(first) == [1, 2, 3, 4, 5]
        assert store.stored_seqs(second) == [1, 2]
        assert store.insert_batches([]) == []


def test_store_insert_batches_rolls_back_whole(location: StoreLocation) -> None:
    with open_store(location) as store:
        device = store.register_device("S1", "gate-01", KEY)
        missing = dataclasses.replace(device, id=device.id + 1000)
        with pytest.raises((sqlite3.IntegrityError, psycopg.errors.ForeignKeyViolation)):
            store.insert_batches(
                [
                    BatchInsert(device, tuple(chain(1, 3)), "normal", "a"),
                    BatchInsert(missing, tuple(chain(1, 3)), "normal", "b"),
                ]
            )
        assert store.stored_seqs(device) == []


def test_store_reports_conflicts_and_chain_breaks(location: StoreLocation) -> None:
    with open_store(location) as store:
        device = store.register_device("S1", "gate-01", KEY)
        store.insert_batch(device, chain(1, 3), lane="normal", batch_id="a")
        # seq 3 again with another hash, and seq 4 not linking to the stored seq 3.
        altered = chain(3, 4, hash="ff" * 32, prev_hash="ee" * 32)
        result = store.insert_batch(device, altered, lane="normal", batch_id="b")
        assert result.conflicts == (3,)
        assert result.chain_breaks == (4,)
        assert store.records(device)[2]["hash"] == f"{3:064x}"


def test_store_keeps_invalid_records_apart(location: StoreLocation) -> None:
    invalid = [
        InvalidRecord(seq=5, reason="invalid fields: hash", body='{"seq": 5}'),
        InvalidRecord(seq=None, reason="invalid fields: seq", body="{}"),
    ]
    with open_store(location) as store:
        device = store.register_device("S1", "gate-01", KEY)
        result = store.insert_batch(
            device, chain(1, 4), lane="normal", batch_id="a", invalid=invalid
        )
        assert result.rejected == 1
        assert result.new == 4
        again = store.insert_batch(device, [], lane="normal", batch_id="b", invalid=invalid[:1])
        assert again.rejected == 1
        assert store.stored_seqs(device) == [1, 2, 3, 4]


def test_two_stores_insert_same_batch_once(location: StoreLocation) -> None:
    with open_store(location) as store:
        device = store.register_device("S1", "gate-01", KEY)
    records = chain(1, 200)
    results = []
    errors: list[BaseException] = []

    def insert(batch_id: str) -> None:
        try:
            with open_store(location) as store:
                for start in range(0, 200, 20):
                    results.append(
                        store.insert_batch(
                            device, records[start : start + 20], lane="normal", batch_id=batch_id
                        )
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sum(result.new for result in results) == 200
    assert sum(result.duplicates for result in results) == 200
    with open_store(location) as store:
        assert store.stored_seqs(device) == list(range(1, 201))


def test_store_redeems_enrollment_token_once(location: StoreLocation) -> None:
    token = b"\x01" * 32
    other_key = bytes(SigningKey.generate().verify_key)
    with open_store(location) as store:
        store.add_enrollment_token(token, "S1", "gate-01", expires_at=2000.0, now=1000.0)
        device = store.redeem_enrollment_token(token, "S1", "gate-01", KEY, now=1500.0)
        assert device.public_key == KEY
        assert device.enabled
        assert device.registered_at == 1500.0
        # The same key asking again gets the same gate back, even after expiry.
        again = store.redeem_enrollment_token(token, "S1", "gate-01", KEY, now=3000.0)
        assert again == device
        with pytest.raises(TokenRejected) as used:
            store.redeem_enrollment_token(token, "S1", "gate-01", other_key, now=1600.0)
        assert used.value.reason == "token_used"
        assert [d.device_id for d in store.list_devices()] == ["gate-01"]
        with pytest.raises(HubStoreError, match="already registered"):
            store.add_enrollment_token(b"\x02" * 32, "S1", "gate-01", expires_at=2000.0)


@pytest.mark.parametrize(
    ("token", "site", "device_id", "now", "reason"),
    [
        (b"\x09" * 32, "S1", "gate-02", 1500.0, "unknown_token"),
        (b"\x02" * 32, "S1", "gate-03", 1500.0, "token_mismatch"),
        (b"\x02" * 32, "S1", "gate-02", 2500.0, "token_expired"),
        (b"\x03" * 32, "S1", "gate-01", 1500.0, "device_registered"),
    ],
    ids=["unknown", "other-gate", "expired", "registered"],
)
def test_store_rejects_enrollment_token(
    location: StoreLocation, token: bytes, site: str, device_id: str, now: float, reason: str
) -> None:
    with open_store(location) as store:
        store.add_enrollment_token(b"\x02" * 32, "S1", "gate-02", expires_at=2000.0, now=1000.0)
        store.add_enrollment_token(b"\x03" * 32, "S1", "gate-01", expires_at=2000.0, now=1000.0)
        store.register_device("S1", "gate-01", KEY)
        with pytest.raises(TokenRejected) as rejected:
            store.redeem_enrollment_token(token, site, device_id, KEY, now=now)
        assert rejected.value.reason == reason
        assert store.get_device("S1", "gate-02") is None


# --- PostgreSQL only ---


def test_postgres_hubs_starting_together_migrate_once(postgres_url: str) -> None:
    versions: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with PostgresHubStore(postgres_url) as store:
                versions.append(store.schema_version())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert versions == [len(POSTGRES_MIGRATIONS)] * 4
    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [row[0] for row in rows] == list(range(1, len(POSTGRES_MIGRATIONS) + 1))


def test_postgres_connection_loss_raises_store_unavailable(postgres_url: str) -> None:
    with PostgresHubStore(postgres_url) as store:
        device = store.register_device("S1", "gate-01", KEY)
        backend_pid = store._session.connect().info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        with pytest.raises(StoreUnavailable, match="lost the connection"):
            store.insert_batch(device, chain(1, 3), lane="normal", batch_id="a")
        # Nothing of the failed batch was committed, and the next call connects again.
        assert store.stored_seqs(device) == []
        result = store.insert_batch(device, chain(1, 3), lane="normal", batch_id="a")
        assert result.new == 3


def test_postgres_unreachable_server_raises_store_unavailable() -> None:
    from tests.broker import free_port

    url = f"postgresql://hub:secret-password@127.0.0.1:{free_port()}/edgenode"
    with pytest.raises(StoreUnavailable, match="cannot connect") as raised:
        PostgresHubStore(url, connect_timeout_s=2)
    assert "secret-password" not in str(raised.value)


def test_postgres_password_never_logged(postgres_url: str) -> None:
    password = postgres_url.split(":")[2].split("@")[0]
    with capture_logs() as logs, PostgresHubStore(postgres_url) as store:
        store.list_devices()
        assert password not in store.location
    assert logs, "the store logs its connection"
    for entry in logs:
        assert password not in repr(entry)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://hub:pw@db:5432/edgenode", "postgresql://hub:***@db:5432/edgenode"),
        ("postgresql://hub@db/edgenode", "postgresql://hub@db/edgenode"),
        (
            "postgres://db/edgenode?sslmode=require&password=pw",
            "postgres://db/edgenode?sslmode=require&password=***",
        ),
    ],
    ids=["userinfo", "no-password", "query"],
)
def test_redact_url_hides_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hub.db", Path("hub.db")),
        ("/var/lib/edgenode/hub.db", Path("/var/lib/edgenode/hub.db")),
        ("postgresql://hub@db/edgenode", PostgresUrl("postgresql://hub@db/edgenode")),
        ("POSTGRES://hub@db/edgenode", PostgresUrl("POSTGRES://hub@db/edgenode")),
    ],
    ids=["relative-file", "absolute-file", "postgresql-url", "postgres-url"],
)
def test_parse_store_location(value: str, expected: StoreLocation) -> None:
    assert parse_store_location(value) == expected
