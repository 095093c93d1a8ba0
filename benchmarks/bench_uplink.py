"""Measure how fast the uplink drains a verdict backlog, and its bytes per verdict on the wire.

The script fills a journal with a backlog (default 100,000 verdicts with random
pseudonymous subjects, one deny in 50). For each drain rate it copies that journal and starts
Debian's mosquitto on a free loopback port, the test suite's ingest peer (which checks each
signature, stores records by seq and signs an ack) and the gate's Connection and Uplink. It
times the drain from the uplink's start until the ingest has stored every record and the
journal has no unacked record. Everything runs in this process's event loop on 127.0.0.1, so
the figures leave out network latency.

Bytes per verdict are the signed, compressed payload of full batches divided by their record
count, measured by encoding the journal's first batches as the uplink does.

Run from the repository root: .venv/bin/python benchmarks/bench_uplink.py [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines  # noqa: E402

from edgenode.config import SyncConfig  # noqa: E402
from edgenode.journal import Journal  # noqa: E402
from edgenode.logs import configure_logging  # noqa: E402
from edgenode.policy import Outcome, Verdict  # noqa: E402
from edgenode.reasons import Reason  # noqa: E402
from sync.connection import Connection  # noqa: E402
from sync.protocol import encode_message  # noqa: E402
from sync.uplink import Uplink, record_body  # noqa: E402
from tests.broker import Broker, IngestPeer  # noqa: E402

SITE = "bench-uplink"
DEVICE = "gate-01"
DRAIN_TIMEOUT_S = 900.0


def fill_journal(path: Path, count: int) -> None:
    """Append ``count`` verdicts with random subjects (seeded); one in 50 is a deny."""
    rng = random.Random(0)
    with Journal(path, DEVICE) as journal:
        # Durability does not matter for the fixture, and FULL sync would take minutes.
        journal._conn.execute("PRAGMA synchronous=OFF")
        started = time.time() - count * 0.5
        for n in range(count):
            deny = n % 50 == 0
            verdict = Verdict(
                outcome=Outcome.DENY if deny else Outcome.ADMIT,
                reasons=(Reason.HEALTH_RED,) if deny else (),
                health_subject=rng.randbytes(16),
                community_subject=rng.randbytes(16),
            )
            journal.append_verdict(
                verdict, station="north-gate", recorded_at=started + n * 0.5, latency_ms=4.2
            )


def bytes_per_verdict(path: Path, key: SigningKey, batch_records: int) -> float:
    """Encode the first full batches as the uplink does and return payload bytes per record."""
    with Journal(path, DEVICE) as journal:
        total_bytes = 0
        total_records = 0
        after = 0
        for _ in range(10):
            page = journal.unacked_records(batch_records, after_seq=after)
            if len(page) < batch_records:
                break
            after = page[-1].record.seq
            sent_at = time.time()
            body = {
                "type": "batch",
                "site": SITE,
                "device": DEVICE,
                "batch_id": "0" * 32,
                "sent_at": sent_at,
                "lane": "normal",
                "records": [record_body(item, sent_at) for item in page],
            }
            total_bytes += len(encode_message(body, key))
            total_records += len(page)
    return total_bytes / total_records


async def drain(
    broker: Broker, journal_path: Path, key: SigningKey, rate: float, batch_records: int
) -> dict[str, float]:
    district_key = SigningKey.generate()
    sync = SyncConfig(
        enabled=True,
        broker_host=broker.host,
        broker_port=broker.port,
        batch_max_records=batch_records,
        drain_records_per_s=rate,
    )
    ingest = IngestPeer(
        broker,
        site=SITE,
        device=DEVICE,
        device_public_key=bytes(key.verify_key),
        district_key=district_key,
    )
    connection = Connection(sync, site=SITE, device=DEVICE)
    uplink = Uplink(
        connection,
        journal_path,
        device_key=key,
        district_keys=[bytes(district_key.verify_key)],
        sync=sync,
    )
    with Journal(journal_path, DEVICE) as journal:
        total = journal.backlog_count()
    tasks = [
        asyncio.ensure_future(ingest.connection.run()),
        asyncio.ensure_future(connection.run()),
    ]
    try:
        deadline = time.monotonic() + 30
        while not (connection.connected and ingest.connection.connected):
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not accept both clients within 30 s")
            await asyncio.sleep(0.05)
        started = time.monotonic()
        tasks.append(asyncio.ensure_future(uplink.run()))
        deadline = started + DRAIN_TIMEOUT_S
        delivered_s = None
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the drain did not finish within {DRAIN_TIMEOUT_S} s")
            if delivered_s is None and len(ingest.stored) == total:
                delivered_s = time.monotonic() - started
            if delivered_s is not None and (await uplink.refresh_status()).backlog == 0:
                acked_s = time.monotonic() - started
                break
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if ingest.chain_problems():
        raise RuntimeError(f"the ingest's chain is broken: {ingest.chain_problems()[:3]}")
    return {
        "records": float(total),
        "delivered_s": delivered_s,
        "acked_s": acked_s,
        "duplicates": float(ingest.duplicates),
        "wire_bytes_per_record": ingest.batch_bytes / ingest.batch_records,
        "batches": float(len(ingest.batch_ids)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="backlog size")
    parser.add_argument("--batch", type=int, default=500, help="records per batch")
    parser.add_argument(
        "--rates",
        default="unlimited,2000",
        help="comma-separated drain rates in records per second; 'unlimited' is 1,000,000",
    )
    parser.add_argument("--output", help="also write the Markdown to this file")
    args = parser.parse_args()
    configure_logging("error", json_output=False)

    workdir = Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    lines = ["## Uplink drain over loopback", ""]
    try:
        template = workdir / "template.db"
        started = time.monotonic()
        fill_journal(template, args.records)
        fill_s = time.monotonic() - started
        key = SigningKey.generate()
        per_verdict = bytes_per_verdict(template, key, args.batch)
        size = template.stat().st_size
        lines += [
            f"Backlog: {args.records:,} verdicts (1 in 50 deny), batches of {args.batch}, "
            f"filled in {fill_s:.1f} s with synchronous=OFF (not timed below).",
            f"Journal file: {size / args.records:.0f} bytes per record on disk.",
            f"Signed, compressed batch payload: {per_verdict:.1f} bytes per verdict "
            f"(full batches of {args.batch}).",
            "",
            "| drain rate (records/s) | all records at the ingest (s) | all acks committed (s) "
            "| records/s | batches sent | duplicates | wire bytes/record |",
            "|---|---|---|---|---|---|---|",
        ]
        for label in args.rates.split(","):
            rate = 1_000_000.0 if label == "unlimited" else float(label)
            run_dir = workdir / f"run-{label}"
            run_dir.mkdir()
            journal_path = run_dir / "journal.db"
            shutil.copyfile(template, journal_path)
            broker_dir = run_dir / "broker"
            broker_dir.mkdir()
            broker = Broker(broker_dir)
            broker.start()
            try:
                result = asyncio.run(drain(broker, journal_path, key, rate, args.batch))
            finally:
                broker.kill()
            lines.append(
                f"| {label} | {result['delivered_s']:.1f} | {result['acked_s']:.1f} "
                f"| {result['records'] / result['acked_s']:,.0f} | {result['batches']:.0f} "
                f"| {result['duplicates']:.0f} | {result['wire_bytes_per_record']:.1f} |"
            )
            print(lines[-1], flush=True)
        lines += ["", "Machine:", "", *machine_lines(workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
