"""Overrides and checks by ID number travel upstream like verdicts, through a real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgenode.journal import Journal
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from sync.hub_store import parse_records
from tests.broker import Broker, broker
from tests.test_sync_uplink import make_gate, running, wait_until

__all__ = ["broker"]


def test_uplink_sends_override_and_id_check(broker: Broker, tmp_path: Path) -> None:
    gate = make_gate(tmp_path, broker, "up-override")
    subject = bytes(range(16))
    with Journal(gate.journal_path, gate.device) as journal:
        deny = journal.append_verdict(
            Verdict(Outcome.DENY, (Reason.HEALTH_RED,), community_subject=subject),
            station="north",
            recorded_at=time.time(),
            latency_ms=2.0,
        )
        journal.append_override(
            deny.seq,
            decision="admit",
            reason="paper_certificate_checked",
            guard_id="G01",
            station="north",
            recorded_at=time.time(),
            clock_trusted=True,
        )
        journal.append_verdict(
            Verdict(
                Outcome.ADMIT,
                (Reason.HEALTH_GREEN,),
                community_subject=subject,
                method="id_number",
            ),
            station="north",
            recorded_at=time.time(),
            latency_ms=1.0,
        )
    ingest = gate.ingest(broker)

    async def scenario() -> None:
        connection = gate.connection()
        uplink = gate.uplink(connection)
        async with running(ingest.connection.run(), connection.run(), uplink.run()):
            await wait_until(lambda: len(ingest.stored) == 3, 30, "all three records")
            await wait_until(lambda: gate.backlog() == 0, 10, "all acks committed")

    asyncio.run(scenario())
    stored = [ingest.stored[seq] for seq in sorted(ingest.stored)]
    parsed = parse_records(stored)

    assert ingest.chain_problems() == []
    assert [record.kind for record in parsed.valid] == ["verdict", "override", "verdict"]
    assert parsed.invalid == []
    assert stored[1]["verdict_seq"] == deny.seq
    assert stored[1]["guard_id"] == "G01"
    assert stored[1]["verdict"] == "admit"
    assert stored[2]["method"] == "id_number"
    assert "method" not in stored[0]
