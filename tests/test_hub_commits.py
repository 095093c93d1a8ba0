"""The hub's committer: batches stored together, and a failing batch kept from the others.

A SQLite trigger makes the store reject one gate's records, as a full disk or a constraint
would, while a real Mosquitto carries both gates' batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

from nacl.signing import SigningKey
from structlog.testing import capture_logs

from tests.broker import Broker, broker
from tests.test_hub import (
    assert_stored_once,
    gate_tasks,
    make_gate,
    make_hub,
    register,
    running,
    wait_connected,
    wait_until,
)

__all__ = ["broker"]


def test_failing_batch_does_not_fail_others(broker: Broker, tmp_path: Path) -> None:
    district_key = SigningKey.generate()
    store_path = tmp_path / "hub.db"
    good = make_gate(tmp_path, broker, district_key, "hub-commits", "gate-good")
    bad = make_gate(tmp_path, broker, district_key, "hub-commits", "gate-bad")
    good.append(300)
    bad.append(300)
    register(store_path, good, bad)
    with closing(sqlite3.connect(store_path)) as db, db:
        db.execute(
            "CREATE TRIGGER reject_bad_gate BEFORE INSERT ON records WHEN NEW.device = "
            "(SELECT id FROM devices WHERE device_id = 'gate-bad') "
            "BEGIN SELECT RAISE(ABORT, 'rejected by the test trigger'); END"
        )
    hub = make_hub(broker, store_path, district_key, "a")

    async def scenario() -> None:
        async with running(hub.run()):
            await wait_connected(hub)
            # Another writer holds the write lock, so the committer waits and both gates'
            # batches queue up behind it, to be committed in one group.
            with closing(sqlite3.connect(store_path, isolation_level=None)) as writer:
                writer.execute("BEGIN IMMEDIATE")
                async with running(*gate_tasks(good, bad)):
                    await wait_until(
                        lambda: hub._commits.qsize() >= 3, 30, "batches queued behind the lock"
                    )
                    writer.execute("ROLLBACK")
                    await wait_until(lambda: good.backlog() == 0, 30, "the good gate acked")
                    assert bad.backlog() == 300
                    with closing(sqlite3.connect(store_path)) as db, db:
                        db.execute("DROP TRIGGER reject_bad_gate")
                    # The bad gate sends its batches again after its ack timeout.
                    await wait_until(lambda: bad.backlog() == 0, 30, "the bad gate acked")

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert_stored_once(store_path, good, 300)
    assert_stored_once(store_path, bad, 300)
    failures = [entry for entry in logs if entry["event"] == "batch_not_stored"]
    assert failures
    assert {entry["device"] for entry in failures} == {"gate-bad"}
    assert {entry["reason"] for entry in failures} == {"store_error"}
