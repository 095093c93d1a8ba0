"""Measure the camera source: frame-to-verdict latency, CPU at 30 fps and idle decode cost.

(a) and (b) come from one run. Rendered 1280x720 phone photos with a health and a community
code are each shown for a few frames between empty gate frames. An injected capture delivers
them to `CameraSource` at 30 frames per second, and its events go into a real `Gate` with a
cache built from a fresh demo site. (a) is the latency from a frame's capture (`ScanEvent.received`)
to its recorded verdict (`record.latency_ms`), p50 and p99. (b) is the process CPU time over
wall time during the run. (c) is the decoder's median time on frames without a code, on the
frames of benchmarks/bench_decode.py plus empty gate scenes.

Run from the repository root: .venv/bin/python benchmarks/bench_camera.py --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_decode import idle_frames  # noqa: E402

from drivers.camera import CameraSource  # noqa: E402
from edgenode.cache import Cache, import_snapshot  # noqa: E402
from edgenode.codes import Colour, Role, encode_community, encode_health  # noqa: E402
from edgenode.config import CameraSourceConfig, load_config  # noqa: E402
from edgenode.decoders import Frame, create_decoder  # noqa: E402
from edgenode.demo.render import Effects, render_gate_background, render_phone_photo  # noqa: E402
from edgenode.district import KEY_FILES, read_key  # noqa: E402
from edgenode.district_cli import DAY_S, create_site  # noqa: E402
from edgenode.journal import Journal  # noqa: E402
from edgenode.logs import configure_logging  # noqa: E402
from edgenode.pipeline import Gate, VerdictEvent  # noqa: E402
from edgenode.sources import ScanEvent  # noqa: E402

SITE = "XH-0012"
SIZE = (1280, 720)
FPS = 30.0
# Effects cycled over the rendered people, as the demo footage varies them.
EFFECTS = (
    Effects(),
    Effects(perspective=0.4, blur=0.2),
    Effects(colour="green", glare=0.3),
    Effects(dark_mode=True),
    Effects(colour="yellow"),
)


class PacedFrames:
    """An injected capture: the given frames in a cycle, one every 1/FPS seconds.

    It stands for a camera that delivers decoded BGR frames. A real MJPG camera adds the
    JPEG decoding in `read()`, which section (d) of the report estimates.
    """

    def __init__(self, frames: list[Frame], fps: float) -> None:
        self.frames = frames
        self.interval_s = 1.0 / fps
        self.next_due = time.monotonic()
        self.reads = 0
        self.released = threading.Event()

    def read(self) -> tuple[bool, Any]:
        delay = self.next_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.next_due = max(self.next_due + self.interval_s, time.monotonic())
        if self.released.is_set():
            return False, None
        frame = self.frames[self.reads % len(self.frames)]
        self.reads += 1
        return True, frame

    def release(self) -> None:
        self.released.set()

    def set(self, prop_id: int, value: float, /) -> bool:
        return True

    def get(self, prop_id: int, /) -> float:
        return {
            cv2.CAP_PROP_FRAME_WIDTH: float(SIZE[0]),
            cv2.CAP_PROP_FRAME_HEIGHT: float(SIZE[1]),
            cv2.CAP_PROP_FPS: FPS,
        }.get(prop_id, 0.0)

    def isOpened(self) -> bool:
        return not self.released.is_set()


def build_site(folder: Path, people: int) -> tuple[Path, list[tuple[str, str]]]:
    """Create a demo site in `folder`, import its snapshot and mint codes for `people`.

    Returns the config path and one (health, community) pair per resident.
    """
    now = int(time.time())
    create_site(folder, site=SITE, residents=max(200, people * 2), now=now)
    config = load_config(folder / "edgenode.toml")
    import_snapshot(
        config.cache_path,
        folder / "snapshot.ensnap",
        config.trust.district_key_bytes(),
        site=SITE,
    )
    keys = {role: read_key(folder / name) for role, name in KEY_FILES.items()}
    roster = json.loads((folder / "roster.json").read_text(encoding="utf-8"))
    residents = [person for person in roster if person["role"] == Role.RESIDENT.value]
    pairs = []
    for person in residents[:people]:
        health = encode_health(
            keys["health"],
            subject=bytes.fromhex(person["health_subject"]),
            colour=Colour.GREEN,
            issued_at=now,
            expires_at=now + DAY_S,
        )
        community = encode_community(
            keys["community"],
            subject=bytes.fromhex(person["subject"]),
            role=Role(person["role"]),
            compound=SITE,
            building=person["building"],
            unit=person["unit"],
            issued_at=now,
            expires_at=now + DAY_S,
        )
        pairs.append((health, community))
    return folder / "edgenode.toml", pairs


def build_stream(
    pairs: list[tuple[str, str]], show_frames: int, gap_frames: int
) -> tuple[list[Frame], int]:
    """Return the frame cycle (each person shown, then empty gate) and its frames with codes."""
    empty = render_gate_background(SIZE, np.random.default_rng(0))
    frames: list[Frame] = []
    for index, codes in enumerate(pairs):
        photo = render_phone_photo(list(codes), EFFECTS[index % len(EFFECTS)], SIZE, seed=index)
        frames.extend([photo] * show_frames)
        frames.extend([empty] * gap_frames)
    return frames, len(pairs) * show_frames


async def run_camera(
    gate: Gate, frames: list[Frame], seconds: float
) -> tuple[list[VerdictEvent], dict[str, float]]:
    """Run the camera source on `frames` for `seconds`, feeding its events into `gate`."""
    capture = PacedFrames(frames, FPS)
    config = CameraSourceConfig(type="camera", name="bench-camera")
    source = CameraSource(config, decoder=gate.decoder, open_capture=lambda: capture)
    verdicts: list[VerdictEvent] = []
    station = gate.config.device.station

    def emit(event: ScanEvent) -> None:
        verdicts.extend(
            gate.process_payloads(
                event.payloads, station=station, at=event.captured_at, received=event.received
            )
        )

    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()
    task = asyncio.create_task(source.run(emit))
    deadline = wall_before + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        verdicts.extend(gate.tick(time.monotonic()))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    wall = time.monotonic() - wall_before
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    stats = {
        "wall_s": wall,
        "cpu_s": cpu,
        "frames_read": float(capture.reads),
        "frames_dropped": float(source.status.frames_dropped),
        "scan_events": float(source.status.reads),
    }
    return verdicts, stats


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def idle_decode_times(repeat: int) -> list[float]:
    """Return per-call decode times in ms on frames without a code, frames interleaved."""
    decoder = create_decoder("zxing")
    frames = idle_frames(8)
    frames += [render_gate_background(SIZE, np.random.default_rng(seed)) for seed in range(10)]
    for frame in frames[:3]:
        decoder.decode(frame)  # warm-up
    times = []
    for _ in range(repeat):
        for frame in frames:
            start = time.perf_counter()
            found = decoder.decode(frame)
            times.append((time.perf_counter() - start) * 1000)
            if found:
                raise RuntimeError("an idle frame yielded a code")
    return times


def jpeg_decode_ms(frames: list[Frame]) -> float:
    """Return the median time to decode one of `frames` from JPEG (quality 75), in ms."""
    encoded = [cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75])[1] for frame in frames]
    times = []
    for _ in range(3):
        for data in encoded:
            start = time.perf_counter()
            cv2.imdecode(data, cv2.IMREAD_COLOR)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_lines() -> list[str]:
    load = os.getloadavg()
    return [
        f"- CPU: {cpu_model()}, `os.cpu_count()` = {os.cpu_count()}",
        f"- Python {platform.python_version()}, zxing-cpp "
        f"{importlib.metadata.version('zxing-cpp')}, OpenCV {cv2.__version__}, "
        f"{platform.system()} {platform.release()}",
        f"- Load average at the end of the run: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
        "- The machine is shared with other jobs and noisy, so absolute times vary from run "
        "to run.",
    ]


def run(seconds: float, people: int, show_frames: int, gap_frames: int, repeat: int) -> str:
    configure_logging("warning", json_output=True)
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-camera-") as folder:
        config_path, pairs = build_site(Path(folder), people)
        frames, coded_frames = build_stream(pairs, show_frames, gap_frames)
        config = load_config(config_path)
        with (
            Cache(config.cache_path) as cache,
            Journal(config.journal_path, config.device.id) as journal,
        ):
            gate = Gate(config, cache, journal, create_decoder(config.decoder.backend))
            verdicts, stats = asyncio.run(run_camera(gate, frames, seconds))

    latencies = [event.record.latency_ms or 0.0 for event in verdicts]
    outcomes: dict[str, int] = {}
    for event in verdicts:
        outcomes[event.verdict.outcome.value] = outcomes.get(event.verdict.outcome.value, 0) + 1
    idle = idle_decode_times(repeat)
    jpeg_ms = jpeg_decode_ms(frames[:: max(1, len(frames) // 20)])
    cores = stats["cpu_s"] / stats["wall_s"]
    decoded = stats["frames_read"] - stats["frames_dropped"]

    lines = [
        f"Stream: {people} people, each shown for {show_frames} frames with "
        f"{gap_frames} empty frames after, {len(frames)} frames in a cycle "
        f"({coded_frames} with codes), 1280x720 BGR at {FPS:.0f} fps for "
        f"{stats['wall_s']:.1f} s.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| (a) verdicts recorded | {len(verdicts)} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}) | |",
        f"| (a) capture to verdict p50 | {statistics.median(latencies):.1f} ms | |"
        if latencies
        else "| (a) capture to verdict p50 | no verdict | |",
        f"| (a) capture to verdict p99 | {percentile(latencies, 0.99):.1f} ms | at most 50 ms |"
        if latencies
        else "| (a) capture to verdict p99 | no verdict | at most 50 ms |",
        f"| (a) capture to verdict max | {max(latencies):.1f} ms | |"
        if latencies
        else "| (a) capture to verdict max | no verdict | |",
        f"| (b) frames read, decoded, dropped | {stats['frames_read']:.0f}, {decoded:.0f}, "
        f"{stats['frames_dropped']:.0f} | |",
        f"| (b) process CPU over wall time | {cores:.2f} cores | at most 1 core |",
        f"| (c) idle decode median ({len(idle) // repeat} frames x {repeat}) "
        f"| {statistics.median(idle):.2f} ms | at most 3 ms |",
        f"| (c) idle decode p90 | {percentile(idle, 0.9):.2f} ms | |",
        f"| (d) JPEG decode of one 1280x720 frame, median | {jpeg_ms:.2f} ms | |",
        "",
        "Machine:",
        "",
        *machine_lines(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="run time of (a) and (b) in s (default: 30)"
    )
    parser.add_argument("--people", type=int, default=40, help="people rendered (default: 40)")
    parser.add_argument(
        "--show-frames", type=int, default=4, help="frames each person is shown (default: 4)"
    )
    parser.add_argument(
        "--gap-frames", type=int, default=4, help="empty frames after each person (default: 4)"
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="times each idle frame is decoded (default: 5)"
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args()
    if args.seconds <= 0 or min(args.people, args.show_frames, args.repeat) < 1:
        parser.error("--seconds, --people, --show-frames and --repeat must be positive")
    if args.gap_frames < 0:
        parser.error("--gap-frames must not be negative")

    report = run(args.seconds, args.people, args.show_frames, args.gap_frames, args.repeat)
    print(report, end="")
    if args.output:
        args.output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
