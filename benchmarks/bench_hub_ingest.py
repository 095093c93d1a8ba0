"""Measure the district hub's ingest: verdicts per second and ack latency, 100 gates at once.

Each run starts Debian's mosquitto on a free loopback port, a fresh hub store (a SQLite file,
or a database on a PostgreSQL server that tests/postgres.py starts with initdb) and one or
more ``edgenode district serve`` processes, as in production. 100 simulated gates, each an
MQTT client of its own in this process, then publish signed batches with a hash chain, built
and signed as sync/uplink.py does, and wait for the hub's signed ack of each. A gate keeps
``--window`` batches waiting for their ack at once, like the uplink's window.

The batches are built and signed before the clock starts, so the figure is the hub's, with
the broker and the gates' MQTT traffic on the same 2 cores. The throughput is the verdicts
acked per second from the first publish to the last ack. The ack latency of a batch runs from
its publish to the arrival of its ack at the gate. After each run the script counts the
stored records, and a run where any record is missing or stored twice fails.

Run from the repository root:
    .venv/bin/python benchmarks/bench_hub_ingest.py [--stores sqlite,postgresql] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines, percentile  # noqa: E402

from edgenode.logs import configure_logging  # noqa: E402
from sync.protocol import Topics, decode_message, encode_message, trusted  # noqa: E402
from sync.store_backend import PostgresUrl, StoreLocation, open_store  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.postgres import PostgresServer, start_server  # noqa: E402

SITE = "bench-hub"
GENESIS_HASH = "00" * 32
# Bounds on each phase, so a stuck hub or broker ends the run with an error.
HUB_START_TIMEOUT_S = 60.0
GATE_CONNECT_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0


@dataclass
class SimulatedGate:
    """One gate's key and its signed batches, ready to publish."""

    device: str
    key: SigningKey
    batches: list[tuple[str, bytes, int]] = field(default_factory=list)  # (batch_id, payload, n)
    sent_at: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    acked_records: int = 0

    @property
    def topics(self) -> Topics:
        return Topics(SITE, self.device)


def build_gates(count: int, records_per_gate: int, batch_records: int) -> list[SimulatedGate]:
    """Build and sign every gate's batches: verdicts with random subjects, one in 50 a deny."""
    rng = random.Random(0)
    gates = []
    started = time.time() - records_per_gate
    for number in range(1, count + 1):
        gate = SimulatedGate(f"gate-{number:03d}", SigningKey(rng.randbytes(32)))
        previous_hash = GENESIS_HASH
        records = []
        for seq in range(1, records_per_gate + 1):
            deny = seq % 50 == 0
            record_hash = hashlib.sha256(f"{gate.device}/{seq}".encode()).hexdigest()
            records.append(
                {
                    "seq": seq,
                    "kind": "verdict",
                    "recorded_at": started + seq,
                    "age_s": 1.0,
                    "station": "north-gate",
                    "verdict": "deny" if deny else "admit",
                    "reasons": ["health_red"] if deny else [],
                    "health_subject": rng.randbytes(16).hex(),
                    "community_subject": rng.randbytes(16).hex(),
                    "latency_ms": 4.2,
                    "clock_trusted": True,
                    "prev_hash": previous_hash,
                    "hash": record_hash,
                }
            )
            previous_hash = record_hash
        for start in range(0, records_per_gate, batch_records):
            chunk = records[start : start + batch_records]
            batch_id = secrets.token_hex(16)
            body = {
                "type": "batch",
                "site": SITE,
                "device": gate.device,
                "batch_id": batch_id,
                "sent_at": time.time(),
                "lane": "normal",
                "records": chunk,
            }
            gate.batches.append((batch_id, encode_message(body, gate.key), len(chunk)))
        gates.append(gate)
    return gates


def prepare_store(location: StoreLocation, gates: list[SimulatedGate]) -> None:
    with open_store(location) as store:
        for gate in gates:
            store.register_device(SITE, gate.device, bytes(gate.key.verify_key))


def count_records(location: StoreLocation) -> int:
    if isinstance(location, PostgresUrl):
        import psycopg

        with psycopg.connect(location.url) as db:
            row = db.execute("SELECT COUNT(*) FROM records").fetchone()
        return 0 if row is None else int(row[0])
    with sqlite3.connect(location) as db:
        return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])


def write_hub_config(
    folder: Path, broker: Broker, district_key: SigningKey, name: str, store: str
) -> Path:
    key_path = folder / "district.key"
    if not key_path.exists():
        key_path.write_text(base64.b64encode(bytes(district_key)).decode("ascii") + "\n")
        key_path.chmod(0o600)
    path = folder / f"hub-{name}.toml"
    path.write_text(
        f'hub_id = "{name}"\nstore = "{store}"\ndistrict_key_file = "district.key"\n\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nkeepalive_s = 30\n',
        encoding="utf-8",
    )
    return path


def start_hubs(configs: list[Path]) -> list[subprocess.Popen[bytes]]:
    processes = []
    for config in configs:
        with config.with_suffix(".log").open("wb") as log_file:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edgenode.hub_cli", "serve", "--config", str(config)],
                    cwd=ROOT,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            )
    deadline = time.monotonic() + HUB_START_TIMEOUT_S
    for config, process in zip(configs, processes, strict=True):
        log_path = config.with_suffix(".log")
        while "broker_connected" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_hubs(processes)
                raise RuntimeError(f"hub {config.stem} did not connect: {log_path.read_text()}")
            time.sleep(0.1)
    return processes


def stop_hubs(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


async def run_gate(
    gate: SimulatedGate,
    broker: Broker,
    district_keys: dict[bytes, object],
    window: int,
    interval_s: float,
    connected: asyncio.Event,
    go: asyncio.Event,
    ready: list[int],
) -> None:
    """Connect, wait for the start, then publish with at most ``window`` batches unacked.

    With ``interval_s`` above 0, batch n is sent no earlier than n intervals after the start
    (plus a random offset below one interval, so the gates do not send in step).
    """
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"bench-{gate.device}", keepalive=60
    ) as client:
        await client.subscribe(gate.topics.acks, qos=1)
        ready[0] += 1
        connected.set()
        await go.wait()
        in_flight: dict[str, int] = {}
        slots = asyncio.Semaphore(window)
        expected = sum(count for _, _, count in gate.batches)

        async def receive_acks() -> None:
            async for message in client.messages:
                arrived = time.monotonic()
                payload = message.payload
                assert isinstance(payload, bytes)
                ack = decode_message(payload, district_keys)  # type: ignore[arg-type]
                batch_id = ack["batch_id"]
                if batch_id not in in_flight:
                    continue  # An ack of a batch already acked.
                gate.latencies_s.append(arrived - gate.sent_at[batch_id])
                gate.acked_records += in_flight.pop(batch_id)
                slots.release()
                if gate.acked_records >= expected:
                    return

        receiver = asyncio.create_task(receive_acks())
        started = time.monotonic() + random.uniform(0, interval_s)
        for index, (batch_id, payload, count) in enumerate(gate.batches):
            if interval_s > 0:
                await asyncio.sleep(max(0.0, started + index * interval_s - time.monotonic()))
            await slots.acquire()
            gate.sent_at[batch_id] = time.monotonic()
            in_flight[batch_id] = count
            await client.publish(gate.topics.batches, payload, qos=1)
        await receiver


async def drive(
    gates: list[SimulatedGate],
    broker: Broker,
    district_key: SigningKey,
    window: int,
    interval_s: float,
) -> float:
    """Run every gate to its last ack. Return the seconds from the start to the last ack."""
    district_keys = trusted(bytes(district_key.verify_key))
    connected = asyncio.Event()
    go = asyncio.Event()
    ready = [0]
    tasks = [
        asyncio.create_task(
            run_gate(gate, broker, district_keys, window, interval_s, connected, go, ready)
        )
        for gate in gates
    ]
    try:
        deadline = time.monotonic() + GATE_CONNECT_TIMEOUT_S
        while ready[0] < len(gates):
            for task in tasks:
                if task.done():
                    task.result()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready[0]} of {len(gates)} gates connected")
            await asyncio.sleep(0.05)
        started = time.monotonic()
        go.set()
        done, pending = await asyncio.wait(tasks, timeout=RUN_TIMEOUT_S)
        if pending:
            acked = sum(gate.acked_records for gate in gates)
            raise RuntimeError(f"the run did not finish within {RUN_TIMEOUT_S} s: {acked} acked")
        for task in done:
            task.result()
        return time.monotonic() - started
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_once(
    store_kind: str,
    hubs: int,
    args: argparse.Namespace,
    workdir: Path,
    postgres: PostgresServer | None,
) -> dict[str, float]:
    run_dir = workdir / f"{store_kind}-{hubs}"
    run_dir.mkdir()
    gates = build_gates(args.gates, args.records_per_gate, args.batch)
    if store_kind == "postgresql":
        assert postgres is not None
        import psycopg

        database = f"bench_{secrets.token_hex(4)}"
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {database}".encode())
        store_text = postgres.url(database)
        location: StoreLocation = PostgresUrl(store_text)
    else:
        store_text = str(run_dir / "hub.db")
        location = Path(store_text)
    prepare_store(location, gates)
    broker_dir = run_dir / "broker"
    broker_dir.mkdir()
    broker = Broker(broker_dir)
    broker.start()
    district_key = SigningKey.generate()
    try:
        configs = [
            write_hub_config(run_dir, broker, district_key, f"h{n}", store_text)
            for n in range(hubs)
        ]
        processes = start_hubs(configs)
        try:
            cpu_before = sum(cpu_seconds(process.pid) for process in processes)
            load_before = os.getloadavg()[0]
            # The offered rate is shared by the gates: each sends a batch every interval.
            interval_s = args.gates * args.batch / args.rate if args.rate > 0 else 0.0
            elapsed = asyncio.run(drive(gates, broker, district_key, args.window, interval_s))
            hub_cpu_s = sum(cpu_seconds(process.pid) for process in processes) - cpu_before
            load_after = os.getloadavg()[0]
        finally:
            stop_hubs(processes)
    finally:
        broker.kill()
    total = args.gates * args.records_per_gate
    stored = count_records(location)
    if stored != total:
        raise RuntimeError(f"{stored} records stored, expected {total}")
    latencies_ms = [1000 * value for gate in gates for value in gate.latencies_s]
    return {
        "records": float(total),
        "elapsed_s": elapsed,
        "per_s": total / elapsed,
        "p50_ms": percentile(latencies_ms, 0.50),
        "p90_ms": percentile(latencies_ms, 0.90),
        "p99_ms": percentile(latencies_ms, 0.99),
        "max_ms": max(latencies_ms),
        "batches": float(len(latencies_ms)),
        "hub_cpu_s": hub_cpu_s,
        "load": max(load_before, load_after),
    }


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds of a process so far, from /proc/{pid}/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the file, 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated stores")
    parser.add_argument("--hubs", default="1,2", help="comma-separated hub process counts")
    parser.add_argument("--gates", type=int, default=100, help="simulated gates")
    parser.add_argument("--records-per-gate", type=int, default=1_000, help="verdicts per gate")
    parser.add_argument("--batch", type=int, default=100, help="records per batch")
    parser.add_argument("--window", type=int, default=2, help="unacked batches per gate")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered verdicts per second, all gates together; 0 sends each batch as soon as "
        "the window allows, which measures the maximum throughput",
    )
    parser.add_argument("--output", help="also write the Markdown to this file")
    args = parser.parse_args()
    configure_logging("error", json_output=False)

    workdir = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    stores = args.stores.split(",")
    postgres = start_server() if "postgresql" in stores else None
    total = args.gates * args.records_per_gate
    lines = [
        "## Hub ingest over loopback",
        "",
        f"{args.gates} gates, {args.records_per_gate:,} verdicts each ({total:,} in all), "
        f"batches of {args.batch}, {args.window} unacked batches per gate, offered rate "
        f"{f'{args.rate:,.0f} verdicts/s' if args.rate > 0 else 'unlimited'}.",
        "",
        "| store | hub processes | verdicts/s | time (s) | ack p50 (ms) | ack p90 (ms) "
        "| ack p99 (ms) | ack max (ms) | hub CPU s per 10,000 verdicts | load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for store_kind in stores:
            for hubs in (int(value) for value in args.hubs.split(",")):
                result = run_once(store_kind, hubs, args, workdir, postgres)
                lines.append(
                    f"| {store_kind} | {hubs} | {result['per_s']:,.0f} | "
                    f"{result['elapsed_s']:.1f} | {result['p50_ms']:.0f} | "
                    f"{result['p90_ms']:.0f} | {result['p99_ms']:.0f} | {result['max_ms']:.0f} | "
                    f"{result['hub_cpu_s'] * 10_000 / result['records']:.2f} | "
                    f"{result['load']:.1f} |"
                )
                print(lines[-1], flush=True)
        lines += ["", "Machine:", "", *machine_lines(workdir)]
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
