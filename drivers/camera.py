"""Camera and video-file input sources: frames in, `ScanEvent`s with decoded payloads out.

Each source runs two threads. The grabber reads frames as fast as the capture delivers them
and keeps only the newest. So capture does not wait for the decoder, and the decoder does not
work through a backlog of stale frames while a resident waits at the gate. The decode worker
takes the newest frame, crops the region of interest, decodes it, and hands the payloads to
the event loop only when it found codes.
A frame that is replaced before the worker took it counts in `SourceStatus.frames_dropped`.

`CameraSource` reopens the camera by itself after an unplug or a stall. `VideoFileSource`
plays a video file in real time through the same threads, to try the daemon without a camera.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import structlog

from edgenode.config import CameraSourceConfig, VideoSourceConfig
from edgenode.decoders import DecodedSymbol, Decoder, Frame, create_decoder
from edgenode.sources import Emit, ScanEvent, SourceState, SourceStatus

log = structlog.get_logger("edgenode.camera")

# OpenCV prints its own warnings to stderr between the daemon's JSON log lines, for example on
# every failed open while a camera is unplugged. The source logs those events itself.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

# A connected camera that delivers no frame for this long counts as disconnected.
STALL_TIMEOUT_S = 2.0
# First reconnect delay bound. Each failed attempt doubles it, up to `reconnect_max_s`.
BACKOFF_BASE_S = 0.5
# Bound on each thread join at shutdown. A read that blocks longer than this keeps its
# thread alive past the join, and the capture is then released by that thread.
JOIN_TIMEOUT_S = 3.0
# Decode errors are logged on the first one and then once per this many.
DECODE_ERROR_LOG_EVERY = 100


class Capture(Protocol):
    """The subset of `cv2.VideoCapture` that the sources use."""

    def read(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...

    def set(self, prop_id: int, value: float, /) -> bool: ...

    def get(self, prop_id: int, /) -> float: ...

    def isOpened(self) -> bool: ...


OpenCapture = Callable[[], Capture]
Region = tuple[int, int, int, int]


class CaptureOpenError(OSError):
    """A capture device or file that could not be opened."""


class CameraBackendError(RuntimeError):
    """A camera backend that cannot run on this machine."""


@dataclass(frozen=True, slots=True)
class GrabbedFrame:
    frame: Frame
    # time.monotonic() at capture, the pairing time.
    captured_at: float
    # time.perf_counter() at capture, the start of the frame-to-verdict latency.
    received: float
    # Position in the stream since the source started, counting from 0.
    sequence: int


def crop_region(frame: Frame, roi: Region | None) -> Frame | None:
    """Return the part of `frame` inside `roi` (x, y, width, height), clipped to the frame.

    Returns the whole frame when `roi` is None, and None when the region lies outside it.
    """
    if roi is None:
        return frame
    x, y, width, height = roi
    frame_height, frame_width = frame.shape[:2]
    left, top = max(0, x), max(0, y)
    right, bottom = min(frame_width, x + width), min(frame_height, y + height)
    if right <= left or bottom <= top:
        return None
    return frame[top:bottom, left:right]


def decode_region(decoder: Decoder, frame: Frame, roi: Region | None) -> list[DecodedSymbol]:
    """Decode the codes inside `roi` of `frame`, as the camera's decode worker does.

    Corners stay in the cropped region's coordinates. A region outside the frame yields
    no code.
    """
    region = crop_region(frame, roi)
    if region is None:
        return []
    return decoder.decode(region)


def backoff_delay(attempt: int, cap_s: float, base_s: float = BACKOFF_BASE_S) -> float:
    """Return the wait before reconnect `attempt` (0 first): full jitter, capped at `cap_s`."""
    bound = min(cap_s, base_s * 2.0 ** min(attempt, 32))
    return random.uniform(0.0, bound)


def fourcc_text(value: float) -> str:
    """Return the four characters of a FOURCC code that OpenCV reports as a float."""
    code = int(value)
    chars = [chr((code >> shift) & 0xFF) for shift in (0, 8, 16, 24)]
    return "".join(chars) if all(char.isprintable() for char in chars) else f"0x{code:08x}"


def open_v4l2(config: CameraSourceConfig) -> Capture:
    """Open the camera of `config` through OpenCV's V4L2 backend, by stable path or index."""
    target: str | int = config.device or config.index
    capture = cv2.VideoCapture(target, cv2.CAP_V4L2)
    if not capture.isOpened():
        capture.release()
        raise CaptureOpenError(f"cannot open camera {target!r} with V4L2")
    return capture


class Picamera2Capture:
    """A Raspberry Pi camera through picamera2, behind the `Capture` interface.

    NOTE: this adapter has never run, because picamera2 installs only on a Raspberry Pi.
    It assumes that picamera2's "RGB888" format stores pixels in B, G, R order, as OpenCV
    expects.
    """

    def __init__(self, config: CameraSourceConfig) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise CameraBackendError("picamera2 is not installed: use backend v4l2") from exc
        self._camera = Picamera2()
        video_config = self._camera.create_video_configuration(
            main={"size": (config.width, config.height), "format": "RGB888"},
            controls={"FrameRate": float(config.fps)},
        )
        self._camera.configure(video_config)
        self._camera.start()
        self._size = (config.width, config.height)
        self._fps = float(config.fps)
        self._open = True

    def read(self) -> tuple[bool, Any]:
        if not self._open:
            return False, None
        return True, np.ascontiguousarray(self._camera.capture_array("main"))

    def release(self) -> None:
        if self._open:
            self._open = False
            self._camera.stop()
            self._camera.close()

    def set(self, prop_id: int, value: float, /) -> bool:
        return False  # the size and rate are fixed by the configuration at open

    def get(self, prop_id: int, /) -> float:
        values = {
            cv2.CAP_PROP_FRAME_WIDTH: float(self._size[0]),
            cv2.CAP_PROP_FRAME_HEIGHT: float(self._size[1]),
            cv2.CAP_PROP_FPS: self._fps,
            cv2.CAP_PROP_FOURCC: float(cv2.VideoWriter.fourcc(*"BGR3")),
        }
        return values.get(prop_id, 0.0)

    def isOpened(self) -> bool:
        return self._open


class _ThreadedFrameSource:
    """The grabber and decode-worker threads shared by the camera and video-file sources.

    Subclasses open the capture, and decide what a failed read means.
    """

    def __init__(
        self,
        name: str,
        decoder: Decoder | None,
        roi: Region | None,
        open_capture: OpenCapture,
    ) -> None:
        self.name = name
        self.status = SourceStatus()
        self._decoder = decoder if decoder is not None else create_decoder()
        self._roi = roi
        self._open_capture = open_capture
        self._stop = threading.Event()
        self._condition = threading.Condition()
        self._newest: GrabbedFrame | None = None
        self._grabbing_done = False
        self._last_frame_at = time.monotonic()
        self._stalled = threading.Event()
        self._decode_errors = 0

    # The event-loop side.

    async def run(self, emit: Emit) -> None:
        """Read and decode frames until cancelled, or until a video without `loop` ends."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        self._check_backend()
        self._stop.clear()
        self._stalled.clear()
        with self._condition:
            self._newest = None
            self._grabbing_done = False
        grabber = threading.Thread(
            target=self._grab_loop, args=(loop, finished), name=f"{self.name}-grabber"
        )
        worker = threading.Thread(
            target=self._decode_loop, args=(loop, emit, finished), name=f"{self.name}-decoder"
        )
        grabber.start()
        worker.start()
        try:
            await finished
        finally:
            self._stop.set()
            with self._condition:
                self._condition.notify_all()
            await self._join((grabber, worker))
            self.status.state = SourceState.STOPPED
            log.info("source_stopped", source=self.name, frames_dropped=self.status.frames_dropped)

    async def _join(self, threads: tuple[threading.Thread, ...]) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                break  # cancelled again while stopping: stop waiting, the threads still end
        for thread in threads:
            if thread.is_alive():
                log.warning("source_thread_still_running", source=self.name, thread=thread.name)

    def _check_backend(self) -> None:
        """Raise before any thread starts when the source cannot run at all."""

    # The grabber thread.

    def _grab_loop(self, loop: asyncio.AbstractEventLoop, finished: asyncio.Future[None]) -> None:
        capture: Capture | None = None
        sequence = 0
        try:
            while not self._stop.is_set():
                if capture is None:
                    capture = self._connect()
                    if capture is None:
                        continue
                ok, image = self._read(capture)
                captured_at, received = time.monotonic(), time.perf_counter()
                if self._stalled.is_set() or not ok:
                    self._stalled.clear()
                    capture.release()
                    capture = None
                    if not self._on_read_failure():
                        break
                    continue
                grabbed = GrabbedFrame(
                    np.asarray(image, dtype=np.uint8), captured_at, received, sequence
                )
                sequence += 1
                self._publish(grabbed)
        except Exception as exc:
            log.exception("source_grabber_failed", source=self.name, error=str(exc))
            self._finish(loop, finished, exc)
        finally:
            if capture is not None:
                capture.release()
            with self._condition:
                self._grabbing_done = True
                self._condition.notify_all()

    def _read(self, capture: Capture) -> tuple[bool, Any]:
        """Read one frame. An error raised by the driver counts as a failed read."""
        try:
            ok, image = capture.read()
        except (OSError, cv2.error) as exc:
            self.status.last_error = f"frame read failed: {exc}"
            log.warning("frame_read_failed", source=self.name, error=str(exc))
            return False, None
        if not ok or image is None or image.size == 0:
            return False, None
        return True, image

    def _publish(self, grabbed: GrabbedFrame) -> None:
        with self._condition:
            if self._newest is not None:
                self.status.frames_dropped += 1
            self._newest = grabbed
            self._last_frame_at = grabbed.captured_at
            self._condition.notify()

    def _connect(self) -> Capture | None:
        """Open the capture, or wait out one backoff step and return None."""
        raise NotImplementedError

    def _on_read_failure(self) -> bool:
        """Handle a failed or stalled read after the capture was released. False stops."""
        raise NotImplementedError

    # The decode-worker thread.

    def _decode_loop(
        self, loop: asyncio.AbstractEventLoop, emit: Emit, finished: asyncio.Future[None]
    ) -> None:
        try:
            while True:
                grabbed = self._take_newest()
                if grabbed is None:
                    break
                payloads = self._decode(grabbed)
                if payloads:
                    self.status.reads += 1
                    event = ScanEvent(
                        source=self.name,
                        payloads=payloads,
                        captured_at=grabbed.captured_at,
                        received=grabbed.received,
                    )
                    loop.call_soon_threadsafe(emit, event)
        except RuntimeError as exc:
            # call_soon_threadsafe raises RuntimeError once the event loop is closed.
            log.warning("source_worker_stopped", source=self.name, error=str(exc))
            return
        except Exception as exc:
            log.exception("source_worker_failed", source=self.name, error=str(exc))
            self._finish(loop, finished, exc)
            return
        self._finish(loop, finished, None)

    def _take_newest(self) -> GrabbedFrame | None:
        """Wait for the newest frame. Return None when the source stops and none is left."""
        with self._condition:
            while self._newest is None:
                if self._stop.is_set() or self._grabbing_done:
                    return None
                self._condition.wait(timeout=0.1)
                self._check_stall()
            grabbed, self._newest = self._newest, None
            return grabbed

    def _check_stall(self) -> None:
        # Called with the condition held. The grabber may be blocked in read(), so the
        # worker notices a stall and the grabber reconnects once its read returns.
        stale_s = time.monotonic() - self._last_frame_at
        if self.status.state == SourceState.CONNECTED and stale_s > STALL_TIMEOUT_S:
            self.status.state = SourceState.DISCONNECTED
            self.status.last_error = f"no frame for {stale_s:.1f} s"
            self._stalled.set()
            log.warning(
                "source_disconnected",
                source=self.name,
                device=self.status.device,
                error=self.status.last_error,
            )

    def _decode(self, grabbed: GrabbedFrame) -> tuple[bytes, ...]:
        try:
            symbols = decode_region(self._decoder, grabbed.frame, self._roi)
        except ValueError as exc:
            # FrameError, for a frame of a shape or type that the decoder rejects.
            self._decode_errors += 1
            if self._decode_errors % DECODE_ERROR_LOG_EVERY == 1:
                log.error(
                    "frame_decode_failed",
                    source=self.name,
                    error=str(exc),
                    errors_so_far=self._decode_errors,
                )
            return ()
        return tuple(symbol.data for symbol in symbols)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        finished: asyncio.Future[None],
        error: BaseException | None,
    ) -> None:
        def settle() -> None:
            if finished.done():
                return
            if error is None:
                finished.set_result(None)
            else:
                finished.set_exception(error)

        # call_soon_threadsafe raises RuntimeError once the event loop is closed, and then
        # no task awaits the result.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)


class CameraSource(_ThreadedFrameSource):
    """A camera read through OpenCV's V4L2 backend, or through picamera2 on a Raspberry Pi.

    `open_capture` replaces the device: tests pass a callable that returns a generated
    frame stream. `decoder` defaults to zxing.
    """

    def __init__(
        self,
        config: CameraSourceConfig,
        *,
        decoder: Decoder | None = None,
        open_capture: OpenCapture | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
    ) -> None:
        super().__init__(
            config.name, decoder, config.roi, open_capture or self._open_backend_capture
        )
        self.config = config
        self.status.device = config.device or f"index {config.index}"
        self._injected = open_capture is not None
        self._backoff_base_s = backoff_base_s
        self._failed_opens = 0
        self._ever_connected = False

    def _check_backend(self) -> None:
        injected_or_v4l2 = self._injected or self.config.backend != "picamera2"
        if not injected_or_v4l2 and importlib.util.find_spec("picamera2") is None:
            raise CameraBackendError("picamera2 is not installed: use backend v4l2")

    def _open_backend_capture(self) -> Capture:
        if self.config.backend == "picamera2":
            return Picamera2Capture(self.config)
        return open_v4l2(self.config)

    def _connect(self) -> Capture | None:
        try:
            capture = self._open_capture()
            if not capture.isOpened():
                capture.release()
                raise CaptureOpenError(f"cannot open camera {self.status.device}")
            self._configure(capture)
        except (OSError, cv2.error) as exc:
            delay = backoff_delay(
                self._failed_opens, self.config.reconnect_max_s, self._backoff_base_s
            )
            self._failed_opens += 1
            self.status.state = SourceState.DISCONNECTED
            self.status.last_error = str(exc)
            log.warning(
                "camera_open_failed",
                source=self.name,
                device=self.status.device,
                error=str(exc),
                attempt=self._failed_opens,
                retry_in_s=round(delay, 2),
            )
            self._wait(delay)
            return None

        self._failed_opens = 0
        if self._ever_connected:
            self.status.reconnects += 1
        self._ever_connected = True
        with self._condition:
            self._last_frame_at = time.monotonic()
            self.status.state = SourceState.CONNECTED
        self.status.last_error = ""
        log.info(
            "source_connected",
            source=self.name,
            device=self.status.device,
            reconnects=self.status.reconnects,
        )
        return capture

    def _configure(self, capture: Capture) -> None:
        """Request the configured format, size and rate, and log what the camera gave."""
        config = self.config
        capture.set(cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*config.pixel_format)))
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, float(config.width))
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, float(config.height))
        capture.set(cv2.CAP_PROP_FPS, float(config.fps))
        # One driver buffer, so a read returns a recent frame and not a queued one.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1.0)
        # NOTE: whether OpenCV's V4L2 backend honours a read timeout has not been checked
        # on a camera. A read that blocks past STALL_TIMEOUT_S is still noticed by the
        # worker, but the reconnect waits until that read returns.
        capture.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, STALL_TIMEOUT_S * 1000)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        log.info(
            "camera_opened",
            source=self.name,
            device=self.status.device,
            width=width,
            height=height,
            fourcc=fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)),
            fps=capture.get(cv2.CAP_PROP_FPS),
            requested_width=config.width,
            requested_height=config.height,
            requested_fourcc=config.pixel_format,
        )

    def _on_read_failure(self) -> bool:
        if self.status.state == SourceState.CONNECTED:
            self.status.state = SourceState.DISCONNECTED
            self.status.last_error = self.status.last_error or "frame read failed"
            log.warning(
                "source_disconnected",
                source=self.name,
                device=self.status.device,
                error=self.status.last_error,
            )
        # The first reopen waits one backoff step, so an unplugged camera is not hammered.
        self._wait(backoff_delay(0, self.config.reconnect_max_s, self._backoff_base_s))
        return True


class PacedFileCapture:
    """A video file read at its own frame rate, as a camera would deliver it."""

    def __init__(self, path: Path, loop: bool) -> None:
        self._capture = cv2.VideoCapture(str(path))
        if not self._capture.isOpened():
            self._capture.release()
            raise CaptureOpenError(f"cannot open video file {path}")
        fps = float(self._capture.get(cv2.CAP_PROP_FPS))
        # A container without a frame rate plays at 25 frames per second.
        self.fps = fps if fps > 0 else 25.0
        self._loop = loop
        self._next_due = time.monotonic()

    def read(self) -> tuple[bool, Any]:
        delay = self._next_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        # Frames are due at a fixed rate from the first one. A late read does not make the
        # next ones earlier than one frame interval from now.
        self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic())
        ok, image = self._capture.read()
        if not ok and self._loop:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0.0)
            ok, image = self._capture.read()
        return ok, image

    def release(self) -> None:
        self._capture.release()

    def set(self, prop_id: int, value: float, /) -> bool:
        return bool(self._capture.set(prop_id, value))

    def get(self, prop_id: int, /) -> float:
        return float(self._capture.get(prop_id))

    def isOpened(self) -> bool:
        return bool(self._capture.isOpened())


class VideoFileSource(_ThreadedFrameSource):
    """A video file played in real time through the camera's grabber and decode worker.

    Without `loop`, `run` returns once the last frame has been decoded. A file that cannot
    be opened raises `CaptureOpenError` from `run`.
    """

    def __init__(
        self,
        config: VideoSourceConfig,
        *,
        decoder: Decoder | None = None,
        open_capture: OpenCapture | None = None,
    ) -> None:
        super().__init__(
            config.name,
            decoder,
            None,
            open_capture or (lambda: PacedFileCapture(config.path, config.loop)),
        )
        self.config = config
        self.status.device = str(config.path)

    def _check_backend(self) -> None:
        if not self.config.path.is_file():
            raise CaptureOpenError(f"video file not found: {self.config.path}")

    def _connect(self) -> Capture | None:
        # CaptureOpenError ends the grabber, and `run` raises it.
        capture = self._open_capture()
        with self._condition:
            self._last_frame_at = time.monotonic()
            self.status.state = SourceState.CONNECTED
        log.info("source_connected", source=self.name, device=self.status.device)
        return capture

    def _on_read_failure(self) -> bool:
        log.info("video_ended", source=self.name, device=self.status.device)
        return False
