"""CameraSource and VideoFileSource on generated frame streams, through an injected capture."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog

from drivers.camera import (
    BACKOFF_BASE_S,
    STALL_TIMEOUT_S,
    CameraBackendError,
    CameraSource,
    CaptureOpenError,
    VideoFileSource,
    backoff_delay,
    crop_region,
)
from edgenode.config import CameraSourceConfig, VideoSourceConfig
from edgenode.decoders import DecodedSymbol, Frame, create_decoder
from edgenode.demo.render import (
    Presentation,
    render_gate_background,
    render_gate_video,
    render_phone_photo,
)
from edgenode.sources import ScanEvent, SourceState

HEALTH = "EN1:HEALTH-TEST-0001"
COMMUNITY = "EN1:COMMUNITY-TEST-0001"
OTHER = "EN1:HEALTH-TEST-0002"
SIZE = (1280, 720)
# Upper bound on any wait in these tests. Frames arrive every few milliseconds.
TIMEOUT_S = 10.0


class FakeCapture:
    """A generated frame stream behind the cv2.VideoCapture interface.

    Returns `frames` in a cycle, one every `interval_s`. After `fail_after` reads, or once
    released, every read fails, as a camera that was unplugged.
    """

    def __init__(
        self,
        frames: Sequence[Frame],
        interval_s: float = 0.005,
        fail_after: int | None = None,
        numbered: bool = False,
    ) -> None:
        self.frames = list(frames)
        self.interval_s = interval_s
        self.fail_after = fail_after
        self.numbered = numbered
        self.reads = 0
        self.released = threading.Event()
        self.properties: dict[int, float] = {}

    def read(self) -> tuple[bool, Any]:
        time.sleep(self.interval_s)
        if self.released.is_set() or (
            self.fail_after is not None and self.reads >= self.fail_after
        ):
            return False, None
        frame = self.frames[self.reads % len(self.frames)]
        if self.numbered:
            frame = frame.copy()
            frame[0, 0, 0], frame[0, 0, 1] = self.reads % 256, self.reads // 256
        self.reads += 1
        return True, frame

    def release(self) -> None:
        self.released.set()

    def set(self, prop_id: int, value: float, /) -> bool:
        self.properties[prop_id] = value
        return True

    def get(self, prop_id: int, /) -> float:
        return self.properties.get(prop_id, 0.0)

    def isOpened(self) -> bool:
        return not self.released.is_set()


def camera_config(**overrides: Any) -> CameraSourceConfig:
    values: dict[str, Any] = {"type": "camera", "name": "cam-test", "reconnect_max_s": 1.0}
    values.update(overrides)
    return CameraSourceConfig(**values)


def frames_until(
    source: CameraSource | VideoFileSource,
    done: Callable[[list[ScanEvent]], bool],
    timeout_s: float = TIMEOUT_S,
) -> list[ScanEvent]:
    """Run `source` until `done(events)` holds, then cancel it. Fail after `timeout_s`."""

    async def main() -> list[ScanEvent]:
        events: list[ScanEvent] = []
        reached = asyncio.Event()

        def emit(event: ScanEvent) -> None:
            events.append(event)
            if done(events):
                reached.set()

        task = asyncio.create_task(source.run(emit))
        waiter = asyncio.create_task(reached.wait())
        finished, _ = await asyncio.wait(
            {task, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert waiter in finished, f"timed out after {timeout_s} s with {len(events)} events"
        return events

    return asyncio.run(main())


def payload_sets(events: list[ScanEvent]) -> list[frozenset[bytes]]:
    return [frozenset(event.payloads) for event in events]


@pytest.fixture(scope="module")
def empty_frame() -> Frame:
    return render_gate_background(SIZE, np.random.default_rng(1))


@pytest.fixture(scope="module")
def pair_frame() -> Frame:
    return render_phone_photo([HEALTH, COMMUNITY], size=SIZE, seed=2)


@pytest.fixture(scope="module")
def other_frame() -> Frame:
    return render_phone_photo([OTHER], size=SIZE, seed=3)


def test_camera_stream_yields_exact_payloads(
    empty_frame: Frame, pair_frame: Frame, other_frame: Frame
) -> None:
    stream = [empty_frame, pair_frame, empty_frame, empty_frame, other_frame, empty_frame]
    capture = FakeCapture(stream)
    source = CameraSource(camera_config(), open_capture=lambda: capture)
    expected_pair = frozenset({HEALTH.encode(), COMMUNITY.encode()})
    expected_other = frozenset({OTHER.encode()})

    events = frames_until(
        source, lambda events: {expected_pair, expected_other} <= set(payload_sets(events))
    )

    assert set(payload_sets(events)) == {expected_pair, expected_other}
    assert all(event.source == "cam-test" for event in events)
    assert source.status.reads == len(events)
    assert source.status.state == SourceState.STOPPED


def test_event_times_come_from_capture(pair_frame: Frame) -> None:
    capture = FakeCapture([pair_frame])
    source = CameraSource(camera_config(), open_capture=lambda: capture)
    started_monotonic, started_perf = time.monotonic(), time.perf_counter()

    events = frames_until(source, lambda events: len(events) >= 2)

    for event in events:
        assert started_monotonic <= event.captured_at <= time.monotonic()
        assert started_perf <= event.received <= time.perf_counter()
    assert events[0].captured_at < events[1].captured_at


def test_camera_requests_configured_format(pair_frame: Frame) -> None:
    capture = FakeCapture([pair_frame])
    config = camera_config(width=1280, height=720, fps=30, pixel_format="MJPG")
    source = CameraSource(config, open_capture=lambda: capture)

    with structlog.testing.capture_logs() as logs:
        frames_until(source, lambda events: len(events) >= 1)

    assert capture.properties[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter.fourcc(*"MJPG")
    assert capture.properties[cv2.CAP_PROP_FRAME_WIDTH] == 1280
    assert capture.properties[cv2.CAP_PROP_FRAME_HEIGHT] == 720
    assert capture.properties[cv2.CAP_PROP_FPS] == 30
    opened = [entry for entry in logs if entry["event"] == "camera_opened"]
    assert len(opened) == 1
    assert opened[0]["width"] == 1280
    assert opened[0]["height"] == 720
    assert opened[0]["fourcc"] == "MJPG"


def test_camera_reconnects_after_unplug(pair_frame: Frame, empty_frame: Frame) -> None:
    states_at_open: list[SourceState] = []
    captures: list[FakeCapture] = []
    opened_at: list[float] = []
    source: CameraSource | None = None

    def open_capture() -> FakeCapture:
        assert source is not None
        states_at_open.append(source.status.state)
        attempt = len(states_at_open)
        if attempt in (2, 3):
            raise CaptureOpenError("camera not found")  # still unplugged
        # The first camera delivers 6 frames and then fails, as if unplugged.
        capture = FakeCapture([empty_frame, pair_frame], fail_after=6 if attempt == 1 else None)
        captures.append(capture)
        opened_at.append(time.monotonic())
        return capture

    source = CameraSource(camera_config(), open_capture=open_capture, backoff_base_s=0.01)
    pair = frozenset({HEALTH.encode(), COMMUNITY.encode()})

    def read_after_reconnect(events: list[ScanEvent]) -> bool:
        return len(opened_at) == 2 and events[-1].captured_at > opened_at[1]

    with structlog.testing.capture_logs() as logs:
        events = frames_until(source, read_after_reconnect)

    assert states_at_open[0] == SourceState.STARTING
    assert states_at_open[1:] == [SourceState.DISCONNECTED] * 3
    assert source.status.reconnects == 1
    assert frozenset(events[-1].payloads) == pair
    assert captures[0].released.is_set()
    assert captures[1].released.is_set()
    event_names = [entry["event"] for entry in logs]
    assert event_names.count("source_disconnected") == 1
    assert event_names.count("camera_open_failed") == 2
    assert event_names.count("source_connected") == 2


class RaisingCapture(FakeCapture):
    """A capture whose driver raises cv2.error after `fail_after` frames."""

    def read(self) -> tuple[bool, Any]:
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise cv2.error("VIDIOC_DQBUF: No such device")
        return super().read()


def test_camera_reconnects_after_read_error(pair_frame: Frame) -> None:
    captures: list[FakeCapture] = []

    def open_capture() -> FakeCapture:
        capture_type = FakeCapture if captures else RaisingCapture
        capture = capture_type([pair_frame], fail_after=None if captures else 3)
        captures.append(capture)
        return capture

    source = CameraSource(camera_config(), open_capture=open_capture, backoff_base_s=0.01)
    with structlog.testing.capture_logs() as logs:
        frames_until(source, lambda events: len(captures) == 2 and source.status.reads >= 5)

    assert source.status.reconnects == 1
    failures = [entry for entry in logs if entry["event"] == "frame_read_failed"]
    assert len(failures) == 1
    assert "No such device" in failures[0]["error"]


def test_camera_reports_disconnected_while_unplugged(pair_frame: Frame) -> None:
    unplugged = threading.Event()
    replug = threading.Event()
    attempts: list[int] = []
    source: CameraSource | None = None

    def open_capture() -> FakeCapture:
        assert source is not None
        attempts.append(1)
        if len(attempts) == 1:
            return FakeCapture([pair_frame], fail_after=3)
        unplugged.set()
        if not replug.is_set():
            raise CaptureOpenError("camera not found")
        return FakeCapture([pair_frame])

    source = CameraSource(camera_config(), open_capture=open_capture, backoff_base_s=0.01)
    seen: list[SourceState] = []

    def watch() -> None:
        assert source is not None
        unplugged.wait(TIMEOUT_S)
        seen.append(source.status.state)
        replug.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    frames_until(source, lambda events: replug.is_set() and source.status.reconnects == 1)
    watcher.join(TIMEOUT_S)

    assert seen == [SourceState.DISCONNECTED]
    assert source.status.last_error == ""


class StallingCapture(FakeCapture):
    """A capture whose read blocks for `stall_s` once, after `stall_after` frames."""

    def __init__(self, frames: Sequence[Frame], stall_after: int, stall_s: float) -> None:
        super().__init__(frames)
        self.stall_after = stall_after
        self.stall_s = stall_s

    def read(self) -> tuple[bool, Any]:
        if self.reads == self.stall_after:
            self.released.wait(self.stall_s)
        return super().read()


def test_camera_reconnects_after_stall(pair_frame: Frame) -> None:
    captures: list[FakeCapture] = []

    def open_capture() -> FakeCapture:
        if captures:
            capture = FakeCapture([pair_frame])
        else:
            capture = StallingCapture([pair_frame], stall_after=3, stall_s=STALL_TIMEOUT_S + 0.5)
        captures.append(capture)
        return capture

    source = CameraSource(camera_config(), open_capture=open_capture, backoff_base_s=0.01)
    with structlog.testing.capture_logs() as logs:
        frames_until(source, lambda events: len(captures) == 2 and source.status.reads >= 5)

    assert source.status.reconnects == 1
    disconnects = [entry for entry in logs if entry["event"] == "source_disconnected"]
    assert len(disconnects) == 1
    assert disconnects[0]["error"].startswith("no frame for ")


def test_slow_decoder_makes_grabber_drop_frames(empty_frame: Frame) -> None:
    capture = FakeCapture([empty_frame], interval_s=0.002, numbered=True)
    decoded: list[tuple[int, int]] = []  # (frame number, frames read by then)

    class SlowDecoder:
        name = "slow"

        def decode(self, frame: Frame) -> list[DecodedSymbol]:
            number = int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1])
            decoded.append((number, capture.reads))
            time.sleep(0.05)
            return [DecodedSymbol(data=b"frame", corners=())]

    source = CameraSource(camera_config(), decoder=SlowDecoder(), open_capture=lambda: capture)
    frames_until(source, lambda events: len(events) >= 6)

    # Only the first six decodes: later ones may run while the grabber stops.
    numbers = [number for number, _ in decoded[:6]]
    assert source.status.frames_dropped > 0
    assert numbers == sorted(numbers)
    # A queue would hand over frames 0, 1, 2, ... one by one. The newest-frame slot skips
    # the frames read during each 50 ms decode, about 25 at one read per 2 ms.
    gaps = [later - earlier for earlier, later in itertools.pairwise(numbers)]
    assert min(gaps) >= 5
    # The frame handed over is the newest read, give or take the ones read meanwhile.
    assert all(number >= read_by_then - 5 for number, read_by_then in decoded[:6])


def test_roi_crops_before_decoding(empty_frame: Frame) -> None:
    left = render_phone_photo([HEALTH], size=(640, 720), seed=4)
    right = render_phone_photo([OTHER], size=(640, 720), seed=5)
    frame = np.hstack((left, right))
    sizes: list[tuple[int, ...]] = []
    zxing = create_decoder("zxing")

    class RecordingDecoder:
        name = "recording"

        def decode(self, frame: Frame) -> list[DecodedSymbol]:
            sizes.append(frame.shape)
            return zxing.decode(frame)

    capture = FakeCapture([frame, empty_frame])
    config = camera_config(roi=(640, 0, 640, 720))
    source = CameraSource(config, decoder=RecordingDecoder(), open_capture=lambda: capture)
    events = frames_until(source, lambda events: len(events) >= 2)

    assert payload_sets(events) == [frozenset({OTHER.encode()})] * len(events)
    assert set(sizes) == {(720, 640, 3)}
    # Without the ROI both codes are read.
    assert {symbol.data for symbol in zxing.decode(frame)} == {HEALTH.encode(), OTHER.encode()}


def test_crop_region_clips_to_frame() -> None:
    frame = np.zeros((100, 200, 3), dtype=np.uint8)
    assert crop_region(frame, None) is frame
    cropped = crop_region(frame, (150, 50, 100, 100))
    assert cropped is not None
    assert cropped.shape == (50, 50, 3)
    assert crop_region(frame, (300, 0, 10, 10)) is None


def test_video_file_yields_every_presentation(tmp_path: Path) -> None:
    presentations = [
        Presentation((HEALTH, COMMUNITY), duration_s=0.8),
        Presentation((OTHER,), duration_s=0.8),
    ]
    info = render_gate_video(presentations, tmp_path / "gate.avi", fps=15, gap_s=0.4, seed=6)
    source = VideoFileSource(VideoSourceConfig(type="video", name="video-test", path=info.path))
    events: list[ScanEvent] = []

    async def play() -> None:
        await asyncio.wait_for(source.run(events.append), timeout=TIMEOUT_S + info.frame_count / 15)

    started = time.monotonic()
    asyncio.run(play())
    elapsed = time.monotonic() - started

    found = set(payload_sets(events))
    for presentation in presentations:
        assert frozenset(code.encode() for code in presentation.codes) in found
    # Played in real time: no faster than the video lasts, less a frame of slack.
    assert elapsed >= (info.frame_count - 1) / info.fps
    assert source.status.state == SourceState.STOPPED


def test_looping_video_restarts(tmp_path: Path) -> None:
    info = render_gate_video(
        [Presentation((OTHER,), duration_s=0.3)], tmp_path / "short.avi", fps=15, gap_s=0.1
    )
    config = VideoSourceConfig(type="video", name="video-loop", path=info.path, loop=True)
    source = VideoFileSource(config)
    events = frames_until(source, lambda events: len(events) > info.frame_count)
    assert len(events) > info.frame_count


def test_missing_video_file_raises(tmp_path: Path) -> None:
    config = VideoSourceConfig(type="video", name="video-missing", path=tmp_path / "none.avi")
    source = VideoFileSource(config)
    with pytest.raises(CaptureOpenError, match="video file not found"):
        asyncio.run(source.run(lambda event: None))


def test_cancel_stops_threads_and_releases(pair_frame: Frame) -> None:
    before = threading.active_count()
    capture = FakeCapture([pair_frame])
    source = CameraSource(camera_config(), open_capture=lambda: capture)

    frames_until(source, lambda events: len(events) >= 1)

    assert threading.active_count() == before
    assert capture.released.is_set()
    assert source.status.state == SourceState.STOPPED


def test_picamera2_backend_needs_module(pair_frame: Frame) -> None:
    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed here")
    source = CameraSource(camera_config(backend="picamera2"))
    with pytest.raises(CameraBackendError, match="picamera2 is not installed: use backend v4l2"):
        asyncio.run(source.run(lambda event: None))


def test_backoff_delay_is_capped() -> None:
    for attempt in range(12):
        delay = backoff_delay(attempt, cap_s=4.0)
        assert 0.0 <= delay <= min(4.0, BACKOFF_BASE_S * 2**attempt)
