"""Measure the peak resident memory and wall time of ``edgenode scan`` on the demo footage.

The script runs ``edgenode demo`` once to build a demo site with its gate video, then runs
``edgenode scan --config <site>/edgenode.toml <site>/gate-footage.avi`` as a child process
--repeat times. It prints a Markdown section, and --output also writes it to a file.

Peak memory is the child's ``ru_maxrss``. ``getrusage(RUSAGE_CHILDREN)`` only keeps the maximum
over all children waited for so far, so it would mix the demo and earlier scans into each
figure. The script therefore reads the same field for each scan alone, from ``os.wait4``.
Python's subprocess starts children with vfork, and Linux keeps the parent's peak in the
child's ``ru_maxrss`` across the exec, so this script's own peak RSS is a floor for every
figure. The report prints that floor; it stays small because the demo runs in a child.

Run from the repository root: .venv/bin/python benchmarks/bench_scan_memory.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines  # noqa: E402

EDGENODE = REPO / ".venv" / "bin" / "edgenode"
VIDEO_NAME = "gate-footage.avi"
CONFIG_NAME = "edgenode.toml"
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class ChildRun:
    exit_code: int
    wall_s: float
    peak_mib: float
    stdout: str
    stderr: str


def run_measured(command: list[str], timeout_s: float) -> ChildRun:
    """Run a command and return its exit code, wall time and peak RSS from ``os.wait4``.

    Kills the child's process group and raises TimeoutError after ``timeout_s`` seconds.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
                raise TimeoutError(f"{' '.join(command[:4])} timed out after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        wall_s = time.perf_counter() - start
        # Popen must not wait for a process that os.wait4 has already reaped.
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(process.returncode, wall_s, usage.ru_maxrss / 1024, out.read(), err.read())


def build_demo(site: Path, timeout_s: float) -> tuple[ChildRun, int]:
    """Run ``edgenode demo`` and return the run and the Unix time at which it finished.

    The demo scans its footage just before it finishes. A scan that replays the footage at
    that time therefore gets the same code ages as the demo, and a cache synced before its
    clock reading.
    """
    demo = run_measured(
        [str(EDGENODE), "--lang", "en", "demo", "--dir", str(site)], timeout_s=timeout_s
    )
    if demo.exit_code != 0:
        raise RuntimeError(f"edgenode demo failed ({demo.exit_code}):\n{demo.stderr}")
    for name in (VIDEO_NAME, CONFIG_NAME):
        if not (site / name).is_file():
            raise RuntimeError(f"edgenode demo did not write {site / name}")
    return demo, int(time.time())


def scan_command(site: Path, now: int) -> list[str]:
    # --now replays the footage at the demo's clock, so the verdicts match the demo's.
    return [
        str(EDGENODE),
        "--lang",
        "en",
        "scan",
        "--config",
        str(site / CONFIG_NAME),
        "--now",
        str(now),
        str(site / VIDEO_NAME),
    ]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def render(args: argparse.Namespace, site: Path, demo: ChildRun, scans: list[ChildRun]) -> str:
    peaks = [run.peak_mib for run in scans]
    walls = [run.wall_s for run in scans]
    video_mib = (site / VIDEO_NAME).stat().st_size / 1024 / 1024
    lines = [
        "## Memory and wall time of `edgenode scan` on the demo footage",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scan_memory.py --repeat {args.repeat}`, "
        f"run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each run is "
        "`.venv/bin/edgenode --lang en scan --config <site>/edgenode.toml --now <end of the demo> "
        f"<site>/{VIDEO_NAME}` in a child process; the video is {video_mib:,.0f} MiB.",
        "",
        "Machine:",
        "",
        *machine_lines(site),
        "",
        "| Run | Peak RSS | Wall time | Exit code | Last output line |",
        "|---:|---:|---:|---:|---|",
    ]
    for number, run in enumerate(scans, start=1):
        lines.append(
            f"| {number} | {run.peak_mib:,.1f} MiB | {run.wall_s:.1f} s | {run.exit_code} "
            f"| {last_line(run.stdout)} |"
        )
    lines += [
        "",
        f"Peak RSS: max {max(peaks):,.1f} MiB, median {statistics.median(peaks):,.1f} MiB. "
        f"Wall time: max {max(walls):.1f} s, median {statistics.median(walls):.1f} s.",
        "",
        f"For comparison, `edgenode demo` (build the site, render the video, scan it) peaked "
        f"at {demo.peak_mib:,.1f} MiB in {demo.wall_s:.1f} s. "
        "`getrusage(RUSAGE_CHILDREN).ru_maxrss` over all of them: "
        f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:,.1f} MiB. "
        "Peak RSS of this measuring script, a floor for every figure above: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="scans to run (default: 3)")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed per child (default: 600)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="folder in which a temporary folder for the demo site is made and removed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the demo site after the run")
    parser.add_argument("--output", type=Path, help="also write the Markdown section to FILE")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not EDGENODE.is_file():
        sys.exit(f"{EDGENODE} not found: install the project into .venv first")

    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edgenode-bench-scan-", dir=args.workdir))
    site = workdir / "site"
    try:
        print(f"running edgenode demo in {site} ...", file=sys.stderr, flush=True)
        demo, demo_finished_at = build_demo(site, args.timeout)
        scans = []
        for number in range(1, args.repeat + 1):
            print(f"scan {number} of {args.repeat} ...", file=sys.stderr, flush=True)
            scan = run_measured(scan_command(site, demo_finished_at), args.timeout)
            if scan.exit_code != 0:
                raise RuntimeError(f"edgenode scan failed ({scan.exit_code}):\n{scan.stderr}")
            scans.append(scan)
        report = render(args, site, demo, scans)
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
