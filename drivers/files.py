"""Frame sources that read image files and video files through OpenCV.

Every failure raises `SourceError`, whose `reason` is a stable snake_case code:

* `file_not_found`: nothing exists at the path.
* `not_a_file`: the path is a directory or another non-regular file.
* `unreadable_image`: OpenCV cannot decode the file as an image, or the image has an
  unsupported pixel format.
* `unreadable_video`: OpenCV cannot open the file as a video.
* `empty_video`: the video opens but yields no frame.
* `unreadable_file`: `iter_file_frames` could read the file neither as an image nor as a video.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edgenode.decoders import Frame


class SourceError(Exception):
    """A file that cannot be read as a frame source."""

    def __init__(self, path: str | Path, reason: str, message: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{message}: {self.path}")


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One frame of a video, or the only frame of an image file."""

    index: int  # 0-based position in the file
    timestamp_s: float  # presentation time from the start of the video, in seconds
    frame: Frame


def check_regular_file(path: Path) -> None:
    if not path.exists():
        raise SourceError(path, "file_not_found", "file not found")
    if not path.is_file():
        raise SourceError(path, "not_a_file", "path is not a regular file")


def read_image(path: str | Path) -> Frame:
    """Read an image file as a uint8 BGR (H, W, 3) or grayscale (H, W) frame.

    16-bit images are scaled to 8 bits. Transparent pixels are composited onto white,
    because QR images with alpha usually have a transparent light background.
    """
    path = Path(path)
    check_regular_file(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SourceError(path, "unreadable_image", "OpenCV cannot decode the file as an image")
    return normalise_image(path, image)


def normalise_image(path: Path, image: npt.NDArray[np.generic]) -> Frame:
    if image.dtype == np.uint16:
        # 65535 / 257 = 255, so the full 16-bit range maps onto the full 8-bit range.
        scaled = (image.astype(np.uint32) + 128) // 257
        image = scaled.astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError(
            path, "unreadable_image", f"unsupported pixel type {image.dtype}, expected 8 or 16 bits"
        )

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        return composite_on_white(image.astype(np.uint8))
    raise SourceError(
        path,
        "unreadable_image",
        f"unsupported image shape {image.shape}, expected 1, 3 or 4 channels",
    )


def composite_on_white(bgra: Frame) -> Frame:
    alpha = bgra[:, :, 3:4].astype(np.uint16)
    bgr = bgra[:, :, :3].astype(np.uint16)
    blended = (bgr * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def iter_video_frames(path: str | Path, max_frames: int | None = None) -> Iterator[VideoFrame]:
    """Open a video file and return an iterator over its frames, read one at a time.

    The file is opened and its first frame read before this function returns, so a missing,
    unreadable or empty video raises `SourceError` here and not on the first `next()`.
    `max_frames` stops the iteration after that many frames.
    """
    path = Path(path)
    check_regular_file(path)
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise SourceError(path, "unreadable_video", "OpenCV cannot open the file as a video")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise SourceError(path, "empty_video", "video contains no frame")
    return _video_frames(capture, np.asarray(first, dtype=np.uint8), max_frames)


def _video_frames(
    capture: cv2.VideoCapture, first: Frame, max_frames: int | None
) -> Iterator[VideoFrame]:
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    index = 0
    frame: Frame | None = first
    try:
        while frame is not None and (max_frames is None or index < max_frames):
            yield VideoFrame(index, frame_timestamp(capture, index, fps), frame)
            index += 1
            ok, image = capture.read()
            frame = np.asarray(image, dtype=np.uint8) if ok and image is not None else None
    finally:
        capture.release()


def frame_timestamp(capture: cv2.VideoCapture, index: int, fps: float) -> float:
    """Return the time of the frame just read, in seconds.

    OpenCV reports the position of the last frame read in CAP_PROP_POS_MSEC. Some
    containers report 0 for every frame, and then the time is index / fps.
    """
    position_ms = float(capture.get(cv2.CAP_PROP_POS_MSEC))
    if position_ms > 0 or index == 0:
        return position_ms / 1000.0
    if fps > 0:
        return index / fps
    return 0.0


def iter_file_frames(path: str | Path, max_frames: int | None = None) -> Iterator[VideoFrame]:
    """Return the frames of an image file (one frame at time 0) or of a video file.

    The file is read as an image first and as a video only if OpenCV cannot decode it as
    an image.
    """
    path = Path(path)
    try:
        image = read_image(path)
    except SourceError as error:
        if error.reason != "unreadable_image":
            raise
    else:
        return iter([VideoFrame(0, 0.0, image)])

    try:
        return iter_video_frames(path, max_frames)
    except SourceError as error:
        if error.reason != "unreadable_video":
            raise
        raise SourceError(
            path, "unreadable_file", "OpenCV cannot read the file as an image or as a video"
        ) from error
