"""Measure how long the district takes to build and publish a site's snapshot and a delta.

The script imports a roster of ``--residents`` residents (default 100,000) with a green
health status each into a fresh feed store, then times, for one site:

1. ``Publisher.build`` of the first snapshot (read the feed tables, write the signed,
   compressed dataset file and commit the record digests), and ``Publisher.send`` of its
   chunks to Debian's mosquitto on a free loopback port;
2. the same for a delta after ``--changes`` residents (default 1,000) got a red health status.

Each phase runs ``--repeat`` times on fresh copies of the same store and the median is
reported. The chunks go to the broker at QoS 1 with no gate subscribed, so the figures leave
out the gates' downloads. The size of the signed file is reported beside them.

Run from the repository root: .venv/bin/python benchmarks/bench_publish.py [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines  # noqa: E402

from edgenode.config import SyncConfig  # noqa: E402
from edgenode.logs import configure_logging  # noqa: E402
from sync.connection import Connection  # noqa: E402
from sync.feeds import FeedStore, import_health, import_roster  # noqa: E402
from sync.hub import HUB_SITE  # noqa: E402
from sync.publisher import IssuerKey, Publisher, Transfer  # noqa: E402
from tests.broker import Broker  # noqa: E402

SITE = "bench-site"
ROSTER_HEADER = "site,subject,health_subject,name,building,unit,role,valid_from,valid_until\n"
CONNECT_TIMEOUT_S = 15.0


@dataclass
class Phase:
    build_s: float
    send_s: float
    data_bytes: int
    chunks: int


def write_feeds(folder: Path, residents: int, changes: int) -> tuple[Path, Path, Path]:
    """Write the roster, its green statuses, and the red statuses of ``changes`` residents."""
    health_subjects = [secrets.token_hex(16) for _ in range(residents)]
    now = int(time.time())
    roster = folder / "roster.csv"
    with roster.open("w", encoding="utf-8") as out:
        out.write(ROSTER_HEADER)
        for n, health_subject in enumerate(health_subjects):
            out.write(
                f"{SITE},{secrets.token_hex(16)},{health_subject},张*三,{n % 40 + 1},"
                f"{n % 6 + 1}-{n % 30 + 1:02d}01,resident,2026-01-01,2036-01-01\n"
            )
    green = folder / "health-green.csv"
    red = folder / "health-red.csv"
    for path, subjects, colour in (
        (green, health_subjects, "green"),
        (red, health_subjects[:changes], "red"),
    ):
        with path.open("w", encoding="utf-8") as out:
            out.write("health_subject,colour,as_of\n")
            out.writelines(f"{subject},{colour},{now}\n" for subject in subjects)
    return roster, green, red


async def build_and_send(publisher: Publisher, *, snapshot: bool) -> tuple[Transfer, float, float]:
    started = time.perf_counter()
    transfer = await asyncio.to_thread(publisher.build, SITE, snapshot=snapshot)
    built = time.perf_counter()
    await publisher.send(transfer)
    sent = time.perf_counter()
    return transfer, built - started, sent - built


async def run_once(broker: Broker, store_path: Path, red: Path) -> tuple[Phase, Phase]:
    sync = SyncConfig(enabled=True, broker_host=broker.host, broker_port=broker.port)
    connection = Connection(
        sync,
        site=HUB_SITE,
        device="bench-publisher",
        client_id=f"bench-publisher-{secrets.token_hex(4)}",
        session_expiry_s=0,
    )
    issuers = [
        IssuerKey(SigningKey.generate(), ("health",), 0, 2**32 - 1),
        IssuerKey(SigningKey.generate(), ("community",), 0, 2**32 - 1),
    ]
    running = asyncio.create_task(connection.run())
    try:
        await asyncio.wait_for(connection.wait_connected(), CONNECT_TIMEOUT_S)
        with FeedStore(store_path) as store:
            publisher = Publisher(
                store, connection, district_key=SigningKey.generate(), issuers=issuers
            )
            phases = []
            transfer, build_s, send_s = await build_and_send(publisher, snapshot=True)
            phases.append(_phase(transfer, build_s, send_s))
            result = import_health(store, red)
            if result.errors:
                raise RuntimeError(f"health feed rejected rows: {result.errors[:3]}")
            transfer, build_s, send_s = await build_and_send(publisher, snapshot=False)
            phases.append(_phase(transfer, build_s, send_s))
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    return phases[0], phases[1]


def _phase(transfer: Transfer, build_s: float, send_s: float) -> Phase:
    return Phase(build_s, send_s, len(transfer.data), transfer.chunk_count)


def median_phase(phases: list[Phase]) -> Phase:
    return Phase(
        statistics.median(p.build_s for p in phases),
        statistics.median(p.send_s for p in phases),
        phases[0].data_bytes,
        phases[0].chunks,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--residents", type=int, default=100_000, help="residents in the site")
    parser.add_argument("--changes", type=int, default=1_000, help="health changes in the delta")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--output", help="also write the Markdown to this file")
    args = parser.parse_args()
    configure_logging("error", json_output=False)

    workdir = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        roster, green, red = write_feeds(workdir, args.residents, args.changes)
        template = workdir / "template.db"
        started = time.perf_counter()
        with FeedStore(template) as store:
            for path, importer in ((roster, import_roster), (green, import_health)):
                result = importer(store, path)
                if result.errors:
                    raise RuntimeError(f"{path.name} rejected rows: {result.errors[:3]}")
        import_s = time.perf_counter() - started

        broker_dir = workdir / "broker"
        broker_dir.mkdir()
        broker = Broker(broker_dir)
        broker.start()
        snapshots: list[Phase] = []
        deltas: list[Phase] = []
        try:
            for run in range(args.repeat):
                store_path = workdir / f"run-{run}.db"
                shutil.copyfile(template, store_path)
                snapshot, delta = asyncio.run(run_once(broker, store_path, red))
                snapshots.append(snapshot)
                deltas.append(delta)
                print(f"run {run + 1}: snapshot {snapshot}, delta {delta}", flush=True)
        finally:
            broker.kill()

        lines = [
            "## Building and publishing a site's dataset",
            "",
            f"Site of {args.residents:,} residents, each with a green health status; the delta "
            f"follows {args.changes:,} red statuses. Importing both feeds took {import_s:.1f} s "
            "(not counted below). Median of "
            f"{args.repeat} runs; chunks published at QoS 1 to mosquitto on loopback.",
            "",
            "| dataset | contents | signed file | chunks | build (s) | send (s) | total (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        contents = {
            "snapshot": f"{args.residents:,} residents and their statuses",
            "delta": f"{args.changes:,} changed statuses",
        }
        for label, phases in (("snapshot", snapshots), ("delta", deltas)):
            phase = median_phase(phases)
            lines.append(
                f"| {label} | {contents[label]} | {phase.data_bytes / 1024:,.0f} KiB "
                f"| {phase.chunks} | {phase.build_s:.2f} | {phase.send_s:.2f} "
                f"| {phase.build_s + phase.send_s:.2f} |"
            )
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
