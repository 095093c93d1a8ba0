"""Measure the decision at roster scale and the durable journal write.

The script builds two signed snapshots, a large one (default 1,000,000 residents with their
bindings and health statuses, and 1,600,000 revocations) and a small one (1,000 residents and
1,600 revocations). It imports each with ``import_snapshot`` in a child process, so the
import's peak memory is its own. Then it times ``decide`` with a real ``Cache`` over a few
hundred parsed code pairs, alternating between the two caches in rounds so that both see the
same machine load, and times ``Journal.append_verdict`` (WAL, synchronous=FULL).

Keys, subjects and codes come from fixed seeds and a fixed clock, so two runs write
identical snapshots. The script prints a Markdown section, and --output also writes it to a
file.

Run from the repository root: .venv/bin/python benchmarks/bench_decision.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines, percentile  # noqa: E402

from edgenode.cache import Cache  # noqa: E402
from edgenode.codes import (  # noqa: E402
    Colour,
    CommunityCode,
    HealthCode,
    Role,
    encode_community,
    encode_health,
    parse_payload,
)
from edgenode.config import PolicyConfig  # noqa: E402
from edgenode.district import issuer_record  # noqa: E402
from edgenode.journal import Journal  # noqa: E402
from edgenode.policy import ClockReading, Outcome, Verdict, decide  # noqa: E402
from edgenode.reasons import Reason  # noqa: E402
from edgenode.snapshot import write_snapshot  # noqa: E402

SITE = "BENCH-01"
DAY_S = 86_400
YEAR_S = 365 * DAY_S
# A fixed clock keeps the files identical between runs: 2027-01-15T08:00:00Z.
NOW = 1_800_000_000
SMALL_RESIDENTS = 1_000
SMALL_REVOCATIONS = 1_600
IMPORT_TIMEOUT_S = 3_600

DISTRICT_KEY = SigningKey(hashlib.sha256(b"edgenode-bench district").digest())
HEALTH_KEY = SigningKey(hashlib.sha256(b"edgenode-bench health issuer").digest())
COMMUNITY_KEY = SigningKey(hashlib.sha256(b"edgenode-bench community issuer").digest())

# The child process that imports a snapshot and reports its own time and peak memory. The peak
# is VmHWM, not getrusage's ru_maxrss: subprocess starts children with vfork, and ru_maxrss
# keeps the parent's peak across the exec, so it would show this script's memory instead.
IMPORT_SCRIPT = """
import json, re, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from edgenode.cache import import_snapshot
cache, snapshot, key_hex, site, now = sys.argv[2:7]
start = time.perf_counter()
header = import_snapshot(Path(cache), Path(snapshot), [bytes.fromhex(key_hex)], site=site,
                         now=float(now))
seconds = time.perf_counter() - start
status = open("/proc/self/status", encoding="ascii").read()
peak_kib = int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.MULTILINE).group(1))
print(json.dumps({"seconds": seconds, "records": header.record_count, "peak_kib": peak_kib}))
"""


# --- Deterministic roster ---


def derived_id(kind: bytes, index: int) -> bytes:
    """Return a 16-byte pseudonymous id for a roster index, the same in every run."""
    return hashlib.blake2b(
        index.to_bytes(8, "big"), digest_size=16, person=b"edgenode-bench", salt=kind.ljust(16)
    ).digest()


def resident_subject(index: int) -> bytes:
    return derived_id(b"resident", index)


def health_subject(index: int) -> bytes:
    return derived_id(b"health", index)


def role_of(index: int) -> Role:
    """Return the roster role: 94 % residents, 2 % each visitors, staff and delivery riders."""
    remainder = index % 50
    if remainder == 1:
        return Role.VISITOR
    if remainder == 2:
        return Role.STAFF
    if remainder == 3:
        return Role.DELIVERY
    return Role.RESIDENT


def colour_of(index: int) -> Colour:
    """Return the cached health status: 1 in 97 yellow, 1 in 101 red, the rest green."""
    if index % 97 == 5:
        return Colour.YELLOW
    if index % 101 == 7:
        return Colour.RED
    return Colour.GREEN


def building_of(index: int) -> str:
    return str(index % 30 + 1)


def unit_of(index: int) -> str:
    return f"{index % 33 + 1}{index % 4 + 1:02d}"


def snapshot_records(
    residents: int, revocations: int, revoked_code_ids: list[bytes]
) -> Iterator[dict[str, Any]]:
    """Yield the snapshot's records one at a time, so millions of them never sit in a list.

    The first revocations are the ids of real minted codes, so that some pairs hit them. The
    rest are ids that no minted code has.
    """
    key_valid_from, key_valid_until = NOW - YEAR_S, NOW + 2 * YEAR_S
    yield issuer_record(HEALTH_KEY, ["health"], key_valid_from, key_valid_until)
    yield issuer_record(COMMUNITY_KEY, ["community"], key_valid_from, key_valid_until)
    for index in range(residents):
        subject = resident_subject(index).hex()
        health = health_subject(index).hex()
        yield {
            "dataset": "residents",
            "subject": subject,
            "compound": SITE,
            "building": building_of(index),
            "unit": unit_of(index),
            "role": role_of(index).value,
            "valid_from": NOW - YEAR_S,
            "valid_until": NOW + YEAR_S,
            "display_name": "张*",
        }
        yield {"dataset": "bindings", "health_subject": health, "resident_subject": subject}
        yield {
            "dataset": "health_status",
            "subject": health,
            "colour": colour_of(index).name.lower(),
            "as_of": NOW - 3_600,
        }
    if len(revoked_code_ids) > revocations:
        raise ValueError(f"{len(revoked_code_ids)} revoked codes, only {revocations} revocations")
    for code_id in revoked_code_ids:
        yield {"dataset": "revocations", "code_id": code_id.hex(), "revoked_at": NOW - 600}
    for index in range(revocations - len(revoked_code_ids)):
        yield {
            "dataset": "revocations",
            "code_id": derived_id(b"revocation", index).hex(),
            "revoked_at": NOW - DAY_S,
        }


# --- Code pairs ---


@dataclass(frozen=True, slots=True)
class CodePair:
    kind: str  # "valid", "revoked" or "unknown"
    health: HealthCode
    community: CommunityCode


def parse_health(text: str) -> HealthCode:
    code = parse_payload(text.encode("ascii"))
    if not isinstance(code, HealthCode):
        raise RuntimeError(f"a minted health code did not parse: {code!r}")
    return code


def parse_community(text: str) -> CommunityCode:
    code = parse_payload(text.encode("ascii"))
    if not isinstance(code, CommunityCode):
        raise RuntimeError(f"a minted community code did not parse: {code!r}")
    return code


def mint_pair(health: bytes, community: bytes, index: int) -> tuple[str, str]:
    """Mint a dynamic health code and community code, issued 30 s before the fixed clock."""
    times = {"issued_at": NOW - 30, "expires_at": NOW + DAY_S}
    health_text = encode_health(HEALTH_KEY, subject=health, colour=colour_of(index), **times)
    community_text = encode_community(
        COMMUNITY_KEY,
        subject=community,
        role=role_of(index),
        compound=SITE,
        building=building_of(index),
        unit=unit_of(index),
        **times,
    )
    return health_text, community_text


def mint_pairs(residents: int, valid: int, revoked: int, unknown: int) -> list[CodePair]:
    """Mint pairs for residents spread evenly over the roster, plus subjects not on it.

    Every ``step``-th roster pair is marked revoked, and its health code's id goes into the
    snapshot's revocations.
    """
    count = valid + revoked
    step = count // revoked if revoked else 0
    pairs = []
    marked = 0
    for slot in range(count):
        index = slot * residents // count
        health_text, community_text = mint_pair(
            health_subject(index), resident_subject(index), index
        )
        kind = "valid"
        if step and slot % step == step - 1 and marked < revoked:
            kind = "revoked"
            marked += 1
        pairs.append(CodePair(kind, parse_health(health_text), parse_community(community_text)))
    for slot in range(unknown):
        outsider = derived_id(b"outsider", slot)
        health_text, community_text = mint_pair(outsider, outsider, slot)
        pairs.append(
            CodePair("unknown", parse_health(health_text), parse_community(community_text))
        )
    return pairs


def revoked_ids(pairs: list[CodePair]) -> list[bytes]:
    return [pair.health.code_id for pair in pairs if pair.kind == "revoked"]


# --- Building and importing ---


@dataclass(frozen=True, slots=True)
class BuiltCache:
    label: str
    residents: int
    revocations: int
    records: int
    snapshot_bytes: int
    write_s: float
    import_s: float
    import_peak_mib: float
    cache_bytes: int
    cache_path: Path


def build_cache(
    workdir: Path, label: str, residents: int, revocations: int, pairs: list[CodePair]
) -> BuiltCache:
    snapshot_path = workdir / f"{label}.ensnap"
    cache_path = workdir / f"{label}-cache.db"
    print(f"[{label}] writing snapshot {snapshot_path} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    header = write_snapshot(
        snapshot_path,
        snapshot_records(residents, revocations, revoked_ids(pairs)),
        site=SITE,
        version=1,
        issued_at=NOW - 600,
        valid_until=NOW + 7 * DAY_S,
        signing_key=DISTRICT_KEY,
    )
    write_s = time.perf_counter() - start
    print(f"[{label}] importing {header.record_count} records ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            IMPORT_SCRIPT,
            str(REPO),
            str(cache_path),
            str(snapshot_path),
            bytes(DISTRICT_KEY.verify_key).hex(),
            SITE,
            str(NOW - 60),
        ],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"import of {snapshot_path} failed:\n{result.stderr}")
    report = json.loads(result.stdout)
    return BuiltCache(
        label=label,
        residents=residents,
        revocations=revocations,
        records=header.record_count,
        snapshot_bytes=snapshot_path.stat().st_size,
        write_s=write_s,
        import_s=float(report["seconds"]),
        import_peak_mib=int(report["peak_kib"]) / 1024,
        cache_bytes=cache_path.stat().st_size,
        cache_path=cache_path,
    )


# --- Timing ---


def check_verdicts(label: str, pairs: list[CodePair], cache: Cache, clock: ClockReading) -> None:
    """Check that each kind of pair reaches the path it is meant to measure."""
    policy = PolicyConfig()
    for pair in pairs:
        verdict = decide(pair.health, pair.community, cache, clock, policy, site=SITE)
        if pair.kind == "revoked" and Reason.CODE_REVOKED not in verdict.reasons:
            raise RuntimeError(f"[{label}] a revoked pair was not denied as revoked: {verdict}")
        if pair.kind == "unknown" and Reason.NOT_RESIDENT not in verdict.reasons:
            raise RuntimeError(
                f"[{label}] a pair for a subject not on the roster was not denied: {verdict}"
            )
        if (
            pair.kind == "valid"
            and verdict.outcome == Outcome.DENY
            and Reason.HEALTH_RED not in verdict.reasons
        ):
            raise RuntimeError(f"[{label}] a valid pair was denied: {verdict}")


@dataclass(slots=True)
class Timings:
    """Per-call wall time and thread CPU time in nanoseconds, and the outcomes reached."""

    wall_ns: list[int] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


def time_decisions(
    pairs: list[CodePair],
    cache: Cache,
    clock: ClockReading,
    iterations: int,
    offset: int,
    timings: Timings,
) -> None:
    """Time ``iterations`` calls of ``decide``, cycling through the pairs, into ``timings``.

    The thread CPU time separates the work of a call from time spent waiting for a core,
    which on a shared machine is what makes the wall-time tail.
    """
    policy = PolicyConfig()
    last_admit: dict[bytes, float] = {}
    for number in range(offset, offset + iterations):
        pair = pairs[number % len(pairs)]
        cpu_start = time.thread_time_ns()
        start = time.perf_counter_ns()
        verdict = decide(
            pair.health,
            pair.community,
            cache,
            clock,
            policy,
            site=SITE,
            last_use=last_admit.get,
        )
        timings.wall_ns.append(time.perf_counter_ns() - start)
        timings.cpu_ns.append(time.thread_time_ns() - cpu_start)
        timings.outcomes[verdict.outcome.value] += 1


def time_journal(path: Path, verdicts: list[Verdict], appends: int) -> list[int]:
    """Time ``appends`` durable journal writes, cycling through real verdicts. Returns ns each."""
    durations = []
    with Journal(path, "bench-gate") as journal:
        for number in range(appends):
            verdict = verdicts[number % len(verdicts)]
            start = time.perf_counter_ns()
            journal.append_verdict(
                verdict, station="north-gate", recorded_at=float(NOW + number), latency_ms=5.0
            )
            durations.append(time.perf_counter_ns() - start)
        problems = journal.verify()
    if problems:
        raise RuntimeError(f"the journal chain is broken after the benchmark: {problems[:3]}")
    return durations


def summary_us(durations_ns: list[int]) -> dict[str, float]:
    micros = [value / 1000 for value in durations_ns]
    return {
        "p50": statistics.median(micros),
        "p99": percentile(micros, 0.99),
        "max": max(micros),
    }


# --- Report ---


def mib(size: int) -> str:
    return f"{size / 1024 / 1024:,.1f} MiB"


def import_section(built: list[BuiltCache]) -> list[str]:
    lines = [
        "### Snapshot and import",
        "",
        "| Cache | Records | Snapshot file | Generate and write snapshot | Import "
        "| Import peak RSS | Cache file |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for item in built:
        lines.append(
            f"| {item.residents:,} residents, {item.revocations:,} revocations "
            f"| {item.records:,} | {mib(item.snapshot_bytes)} | {item.write_s:.1f} s "
            f"| {item.import_s:.1f} s | {item.import_peak_mib:,.0f} MiB "
            f"| {mib(item.cache_bytes)} |"
        )
    return lines


def decision_section(
    args: argparse.Namespace,
    built: list[BuiltCache],
    timings: dict[str, Timings],
    pair_kinds: Counter[str],
) -> list[str]:
    large, small = built
    wall = {label: summary_us(item.wall_ns) for label, item in timings.items()}
    cpu = {label: summary_us(item.cpu_ns) for label, item in timings.items()}
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(pair_kinds.items()))
    lines = [
        "### `decide` with a real `Cache`",
        "",
        f"{sum(pair_kinds.values())} parsed code pairs ({kinds}; the unknown subjects are not "
        "on the roster), cycled through. Each cache gets "
        f"{args.iterations:,} calls in {args.rounds} alternating rounds, timed one call at a "
        "time: wall time with `time.perf_counter_ns` and the thread's CPU time with "
        "`time.thread_time_ns`. Both Ed25519 signature checks are part of every call. "
        "The cache files were just written, so they sit in the page cache.",
        "",
        "| Cache | wall p50 | wall p99 | wall max | CPU p50 | CPU p99 | Outcomes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for item in built:
        w, c = wall[item.label], cpu[item.label]
        counted = ", ".join(
            f"{name} {n}" for name, n in sorted(timings[item.label].outcomes.items())
        )
        lines.append(
            f"| {item.residents:,} residents | {w['p50']:,.0f} µs | {w['p99']:,.0f} µs "
            f"| {w['max']:,.0f} µs | {c['p50']:,.0f} µs | {c['p99']:,.0f} µs | {counted} |"
        )

    target = "met" if wall[large.label]["p99"] <= 1000 else "not met"
    lines += [
        "",
        f"Ratio of {large.residents:,} to {small.residents:,} residents: "
        f"wall p50 {wall[large.label]['p50'] / wall[small.label]['p50']:.2f}, "
        f"wall p99 {wall[large.label]['p99'] / wall[small.label]['p99']:.2f}, "
        f"CPU p50 {cpu[large.label]['p50'] / cpu[small.label]['p50']:.2f}, "
        f"CPU p99 {cpu[large.label]['p99'] / cpu[small.label]['p99']:.2f}. "
        f"Target wall p99 at most 1 ms at {large.residents:,} residents: {target}.",
    ]
    return lines


def journal_section(args: argparse.Namespace, journal: dict[str, float]) -> list[str]:
    return [
        "### `Journal.append_verdict` (WAL, synchronous=FULL)",
        "",
        f"{args.appends:,} appends to a new journal in the work folder, each one transaction "
        "with its commit and fsync, timed one call at a time.",
        "",
        "| p50 | p99 | max |",
        "|---:|---:|---:|",
        f"| {journal['p50'] / 1000:.2f} ms | {journal['p99'] / 1000:.2f} ms "
        f"| {journal['max'] / 1000:.2f} ms |",
    ]


def render(
    args: argparse.Namespace,
    workdir: Path,
    built: list[BuiltCache],
    timings: dict[str, Timings],
    journal: dict[str, float],
    pair_kinds: Counter[str],
) -> str:
    command = (
        "`.venv/bin/python benchmarks/bench_decision.py "
        f"--residents {args.residents} --revocations {args.revocations} "
        f"--iterations {args.iterations} --rounds {args.rounds} --appends {args.appends}`"
    )
    lines = [
        "## Decision and journal write",
        "",
        f"Command: {command}, run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Machine:",
        "",
        *machine_lines(workdir),
        "",
        *import_section(built),
        "",
        *decision_section(args, built, timings, pair_kinds),
        "",
        *journal_section(args, journal),
        "",
        "Peak RSS of the benchmark process itself, which buffers the compressed snapshot body "
        "while writing it: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB.",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, workdir: Path) -> str:
    pairs_large = mint_pairs(args.residents, args.valid_pairs, args.revoked_pairs, args.unknown)
    pairs_small = mint_pairs(SMALL_RESIDENTS, args.valid_pairs, args.revoked_pairs, args.unknown)
    built = [
        build_cache(workdir, "large", args.residents, args.revocations, pairs_large),
        build_cache(workdir, "small", SMALL_RESIDENTS, SMALL_REVOCATIONS, pairs_small),
    ]

    clock = ClockReading(now=float(NOW), synchronised=True)
    pairs = {"large": pairs_large, "small": pairs_small}
    timings = {"large": Timings(), "small": Timings()}
    verdicts: list[Verdict] = []
    per_round = max(1, args.iterations // args.rounds)
    with Cache(built[0].cache_path) as large_cache, Cache(built[1].cache_path) as small_cache:
        caches = {"large": large_cache, "small": small_cache}
        for label, cache in caches.items():
            check_verdicts(label, pairs[label], cache, clock)
            # One untimed pass, so both caches start with their pages in SQLite's cache.
            time_decisions(pairs[label], cache, clock, len(pairs[label]), 0, Timings())

        print(f"timing decide: {args.rounds} rounds of {per_round}", file=sys.stderr, flush=True)
        for round_number in range(args.rounds):
            for label, cache in caches.items():
                offset = round_number * per_round
                time_decisions(pairs[label], cache, clock, per_round, offset, timings[label])

        for pair in pairs_large:
            verdicts.append(
                decide(pair.health, pair.community, large_cache, clock, PolicyConfig(), site=SITE)
            )

    print(f"timing {args.appends} journal appends", file=sys.stderr, flush=True)
    journal_ns = time_journal(workdir / "journal.db", verdicts, args.appends)
    kinds = Counter(pair.kind for pair in pairs_large)
    return render(args, workdir, built, timings, summary_us(journal_ns), kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--residents", type=int, default=1_000_000, help="residents in the large cache"
    )
    parser.add_argument(
        "--revocations", type=int, default=1_600_000, help="revocations in the large cache"
    )
    parser.add_argument(
        "--iterations", type=int, default=20_000, help="timed decide calls per cache"
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="alternating rounds the calls are split into"
    )
    parser.add_argument(
        "--appends", type=int, default=3_000, help="timed journal appends (default: 3000)"
    )
    parser.add_argument("--valid-pairs", type=int, default=240, help="pairs of valid codes")
    parser.add_argument(
        "--revoked-pairs", type=int, default=30, help="pairs whose health code is revoked"
    )
    parser.add_argument(
        "--unknown", type=int, default=30, help="pairs for subjects not on the roster"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="folder in which a temporary folder for the files is made and removed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the files after the run")
    parser.add_argument("--output", type=Path, help="also write the Markdown section to FILE")
    args = parser.parse_args()
    if args.residents < 1 or args.revocations < args.revoked_pairs:
        parser.error("--residents must be positive and --revocations at least --revoked-pairs")

    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edgenode-bench-decision-", dir=args.workdir))
    try:
        report = run(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
