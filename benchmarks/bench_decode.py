"""Measure QR decode time per 1280x720 frame for the zxing and pyzbar decoders.

Both decoders read the same frames: two-code frames (two "EN1:" codes of 165 characters,
about 250 px wide, on a noisy textured background, half of them with mild perspective)
and idle frames without a code (the corpus's false-positive photos placed into the frame,
and blank frames). The script prints a Markdown table, and --output also writes it to a file.

Run from the repository root: .venv/bin/python benchmarks/bench_decode.py --repeat 5
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import segno

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from drivers.files import SourceError, read_image  # noqa: E402
from edgenode.decoders import DecodedSymbol, Frame, create_decoder  # noqa: E402

WIDTH, HEIGHT = 1280, 720
CODE_PX = 250
QR_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
DECODERS = ("zxing", "pyzbar")

FloatImage = npt.NDArray[np.float32]


def corpus_root() -> Path:
    override = os.environ.get("EDGENODE_CORPUS")
    return Path(override) if override else REPO.parent / "shared" / "corpus" / "qr"


def random_payload(rng: np.random.Generator) -> str:
    return "EN1:" + "".join(rng.choice(list(QR_ALPHANUMERIC), 161))


def textured_background(rng: np.random.Generator) -> FloatImage:
    coarse = rng.normal(150, 40, (HEIGHT // 8, WIDTH // 8, 3)).astype(np.float32)
    background = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    stripes = (np.sin(np.arange(WIDTH, dtype=np.float32) / 7.0) * 20)[None, :, None]
    return np.asarray(background + stripes, dtype=np.float32)


def paste_code(
    canvas: FloatImage, payload: str, left: int, top: int, rng: np.random.Generator, tilt: bool
) -> None:
    matrix = np.pad(np.array(segno.make_qr(payload, error="m").matrix, dtype=np.uint8), 4)
    gray = np.where(matrix == 1, 0.0, 255.0).astype(np.float32)
    code = cv2.resize(gray, (CODE_PX, CODE_PX), interpolation=cv2.INTER_AREA)
    source = np.array([[0, 0], [CODE_PX, 0], [CODE_PX, CODE_PX], [0, CODE_PX]], dtype=np.float32)
    jitter = rng.uniform(-15, 15, (4, 2)) if tilt else np.zeros((4, 2))
    target = (source + jitter + np.array([left, top])).astype(np.float32)
    transform = cv2.getPerspectiveTransform(source, target)
    warped = cv2.warpPerspective(code, transform, (WIDTH, HEIGHT))
    mask = cv2.warpPerspective(np.ones_like(code), transform, (WIDTH, HEIGHT))
    canvas *= 1 - mask[:, :, None]
    canvas += (warped * mask)[:, :, None]


def finish(canvas: FloatImage, rng: np.random.Generator) -> Frame:
    blurred = cv2.GaussianBlur(canvas, (0, 0), 0.8)
    noisy = blurred + rng.normal(0, 5, canvas.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def two_code_frames(count: int, seed: int) -> list[tuple[Frame, set[str]]]:
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        canvas = textured_background(rng)
        payloads = {random_payload(rng), random_payload(rng)}
        for payload, left in zip(sorted(payloads), (150, 760), strict=True):
            top = int(rng.integers(60, HEIGHT - CODE_PX - 60))
            paste_code(canvas, payload, left, top, rng, tilt=index % 2 == 1)
        frames.append((finish(canvas, rng), payloads))
    return frames


def idle_frames(seed: int) -> list[Frame]:
    """Return blank frames and the false-positive photos scaled to cover 1280x720."""
    rng = np.random.default_rng(seed)
    frames = [
        finish(np.full((HEIGHT, WIDTH, 3), level, np.float32), rng) for level in (40, 128, 220)
    ]
    for path in sorted(corpus_root().glob("*/falsepositives-*/*")):
        try:
            photo = read_image(path)
        except SourceError:
            continue  # OpenCV rejects the 30-byte WebP samples
        if photo.ndim == 2:
            photo = np.asarray(cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
        scale = max(WIDTH / photo.shape[1], HEIGHT / photo.shape[0])
        covered = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        top = (covered.shape[0] - HEIGHT) // 2
        left = (covered.shape[1] - WIDTH) // 2
        cropped = covered[top : top + HEIGHT, left : left + WIDTH].astype(np.float32)
        frames.append(finish(cropped, rng))
    return frames


def time_calls(
    decode: Callable[[Frame], list[DecodedSymbol]], frames: list[Frame], repeat: int
) -> list[float]:
    """Return per-call times in milliseconds, frames interleaved across repeats."""
    for frame in frames[:3]:
        decode(frame)  # warm-up
    times = []
    for _ in range(repeat):
        for frame in frames:
            start = time.perf_counter()
            decode(frame)
            times.append((time.perf_counter() - start) * 1000)
    return times


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_lines() -> list[str]:
    return [
        f"- CPU: {cpu_model()} (`platform.processor()`: {platform.processor() or 'empty'}, "
        f"`os.cpu_count()`: {os.cpu_count()})",
        f"- Python {platform.python_version()}, "
        f"zxing-cpp {importlib.metadata.version('zxing-cpp')}, "
        f"pyzbar {importlib.metadata.version('pyzbar')}, OpenCV {cv2.__version__}",
    ]


def run(repeat: int, frame_count: int, seed: int) -> str:
    coded = two_code_frames(frame_count, seed)
    idle = idle_frames(seed + 1)
    coded_frames = [frame for frame, _ in coded]

    rows = []
    medians: dict[str, dict[str, float]] = {}
    for name in DECODERS:
        decoder = create_decoder(name)
        found = sum(
            len(payloads & {symbol.text for symbol in decoder.decode(frame)})
            for frame, payloads in coded
        )
        coded_times = time_calls(decoder.decode, coded_frames, repeat)
        idle_times = time_calls(decoder.decode, idle, repeat)
        medians[name] = {
            "coded": statistics.median(coded_times),
            "idle": statistics.median(idle_times),
        }
        rows.append(
            f"| {name} | {found}/{2 * len(coded)} | {medians[name]['coded']:.1f} "
            f"| {percentile(coded_times, 0.9):.1f} | {medians[name]['idle']:.1f} "
            f"| {percentile(idle_times, 0.9):.1f} |"
        )

    coded_ratio = medians["pyzbar"]["coded"] / medians["zxing"]["coded"]
    idle_ratio = medians["pyzbar"]["idle"] / medians["zxing"]["idle"]
    lines = [
        f"Frames: {len(coded)} two-code frames and {len(idle)} idle frames, 1280x720 BGR, "
        f"each timed {repeat} times after a warm-up. Times in ms per frame.",
        "",
        "| decoder | codes read | two-code median | two-code p90 | idle median | idle p90 |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"pyzbar / zxing median ratio: {coded_ratio:.2f} on two-code frames, "
        f"{idle_ratio:.2f} on idle frames.",
        "",
        "Machine:",
        "",
        *machine_lines(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=5, help="times each frame is decoded (default: 5)"
    )
    parser.add_argument(
        "--frames", type=int, default=20, help="number of two-code frames (default: 20)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed for the frames")
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args()
    if args.repeat < 1 or args.frames < 1:
        parser.error("--repeat and --frames must be at least 1")

    report = run(args.repeat, args.frames, args.seed)
    print(report, end="")
    if args.output:
        args.output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
