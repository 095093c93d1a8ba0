"""Image and video file sources: decoded frames and SourceError reasons."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import segno

from drivers.files import (
    SourceError,
    VideoFrame,
    iter_file_frames,
    iter_video_frames,
    read_image,
)
from edgenode.decoders import create_decoder

PAYLOAD = "EN1:FILE SOURCE TEST 0123456789"


def code_image(payload: str = PAYLOAD, module_px: int = 4) -> np.ndarray:
    matrix = np.pad(np.array(segno.make_qr(payload).matrix, dtype=np.uint8), 4)
    gray = np.where(matrix == 1, 0, 255).astype(np.uint8)
    gray = np.kron(gray, np.ones((module_px, module_px), dtype=np.uint8))
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def write_video(path: Path, fourcc: str, frames: list[np.ndarray], fps: float = 10.0) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path.suffix}"
    for frame in frames:
        writer.write(frame)
    writer.release()


def video_frames(count: int) -> list[np.ndarray]:
    code = code_image()
    frames = []
    for index in range(count):
        frame = np.full((240, 320, 3), 255, dtype=np.uint8)
        frame[10 : 10 + code.shape[0], 10 + index * 4 : 10 + index * 4 + code.shape[1]] = code
        frames.append(frame)
    return frames


def decoded_texts(frame: np.ndarray) -> list[str | None]:
    return [symbol.text for symbol in create_decoder("zxing").decode(frame)]


def test_png_reads_as_bgr(tmp_path: Path) -> None:
    path = tmp_path / "code.png"
    cv2.imwrite(str(path), code_image())
    frame = read_image(path)
    assert frame.dtype == np.uint8
    assert frame.shape == code_image().shape
    assert decoded_texts(frame) == [PAYLOAD]


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_compressed_image_decodes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"code{suffix}"
    cv2.imwrite(str(path), code_image())
    assert decoded_texts(read_image(path)) == [PAYLOAD]


def test_grayscale_png_reads_as_gray(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), cv2.cvtColor(code_image(), cv2.COLOR_BGR2GRAY))
    frame = read_image(path)
    assert frame.ndim == 2
    assert decoded_texts(frame) == [PAYLOAD]


def test_16_bit_png_scales_to_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), code_image().astype(np.uint16) * 257)
    frame = read_image(path)
    assert frame.dtype == np.uint8
    assert int(frame.max()) == 255
    assert decoded_texts(frame) == [PAYLOAD]


def test_transparent_background_becomes_white(tmp_path: Path) -> None:
    code = code_image()
    bgra = np.zeros((*code.shape[:2], 4), dtype=np.uint8)
    dark = code[:, :, 0] == 0
    bgra[dark, 3] = 255  # dark modules opaque black, light modules fully transparent black
    path = tmp_path / "alpha.png"
    cv2.imwrite(str(path), bgra)
    frame = read_image(path)
    assert frame.shape == code.shape
    assert int(frame[~dark].min()) == 255
    assert decoded_texts(frame) == [PAYLOAD]


@pytest.mark.parametrize(("fourcc", "suffix"), [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_video_frames_come_back_in_order(tmp_path: Path, fourcc: str, suffix: str) -> None:
    path = tmp_path / f"clip{suffix}"
    write_video(path, fourcc, video_frames(5), fps=10.0)
    frames = list(iter_video_frames(path))
    assert [item.index for item in frames] == [0, 1, 2, 3, 4]
    assert [item.timestamp_s for item in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(item.frame.shape == (240, 320, 3) for item in frames)
    assert all(decoded_texts(item.frame) == [PAYLOAD] for item in frames)


def test_video_stops_at_max_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, "MJPG", video_frames(5))
    assert len(list(iter_video_frames(path, max_frames=2))) == 2


def test_file_frames_reads_image_as_one_frame(tmp_path: Path) -> None:
    path = tmp_path / "code.png"
    cv2.imwrite(str(path), code_image())
    frames = list(iter_file_frames(path))
    assert len(frames) == 1
    assert frames[0].index == 0
    assert frames[0].timestamp_s == 0.0
    assert isinstance(frames[0], VideoFrame)


def test_file_frames_reads_video(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, "MJPG", video_frames(3))
    assert [item.index for item in iter_file_frames(path)] == [0, 1, 2]


def test_video_frame_is_frozen() -> None:
    item = VideoFrame(0, 0.0, np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(AttributeError):
        item.index = 1  # type: ignore[misc]


def reason_of(reader: Callable[[Path], object], path: Path) -> SourceError:
    """Call `reader`, consume any iterator it returns, and return the SourceError raised."""
    with pytest.raises(SourceError) as caught:
        result = reader(path)
        if isinstance(result, Iterator):
            list(result)
    return caught.value


@pytest.mark.parametrize("reader", [read_image, iter_video_frames, iter_file_frames])
def test_missing_file_raises_file_not_found(
    tmp_path: Path, reader: Callable[[Path], object]
) -> None:
    error = reason_of(reader, tmp_path / "missing.png")
    assert error.reason == "file_not_found"
    assert error.path == tmp_path / "missing.png"
    assert "file not found" in str(error)


@pytest.mark.parametrize("reader", [read_image, iter_video_frames, iter_file_frames])
def test_directory_raises_not_a_file(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    assert reason_of(reader, tmp_path).reason == "not_a_file"


def test_corrupt_image_raises_unreadable_image(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    error = reason_of(read_image, path)
    assert error.reason == "unreadable_image"
    assert str(path) in str(error)


def test_corrupt_video_raises_unreadable_video(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video " * 20)
    assert reason_of(iter_video_frames, path).reason == "unreadable_video"


def test_video_without_frames_raises_empty_video(tmp_path: Path) -> None:
    path = tmp_path / "empty.avi"
    write_video_header_only(path)
    assert reason_of(iter_video_frames, path).reason == "empty_video"


def test_file_frames_reports_empty_video(tmp_path: Path) -> None:
    path = tmp_path / "empty.avi"
    write_video_header_only(path)
    assert reason_of(iter_file_frames, path).reason == "empty_video"


def test_file_neither_image_nor_video_raises_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("no pixels here\n" * 20, encoding="utf-8")
    assert reason_of(iter_file_frames, path).reason == "unreadable_file"


def test_video_errors_raise_before_iteration(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        iter_video_frames(tmp_path / "missing.avi")


def write_video_header_only(path: Path) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    writer.release()
