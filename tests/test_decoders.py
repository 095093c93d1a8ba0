"""Decoder behaviour on QR codes generated with segno."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import segno

from edgenode.decoders import (
    DECODER_NAMES,
    DecodedSymbol,
    Frame,
    FrameError,
    UnknownDecoderError,
    create_decoder,
)

QR_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
WHITE = (255, 255, 255)


def alphanumeric_payload(seed: int, length: int = 150) -> str:
    rng = random.Random(seed)
    return "EN1:" + "".join(rng.choice(QR_ALPHANUMERIC) for _ in range(length))


def code_mask(payload: str | bytes, module_px: int = 4, quiet_zone: int = 4) -> np.ndarray:
    """Return a boolean image of the code, True where a module is dark."""
    matrix = np.array(segno.make_qr(payload, error="m").matrix, dtype=np.uint8)
    matrix = np.pad(matrix, quiet_zone)
    return np.kron(matrix, np.ones((module_px, module_px), dtype=np.uint8)).astype(bool)


def draw_code(
    payload: str | bytes,
    dark: tuple[int, int, int] = (0, 0, 0),
    light: tuple[int, int, int] = WHITE,
    module_px: int = 4,
) -> Frame:
    """Return a BGR frame with the code drawn in `dark` on `light`."""
    mask = code_mask(payload, module_px)
    frame = np.empty((*mask.shape, 3), dtype=np.uint8)
    frame[:] = light
    frame[mask] = dark
    return frame


def camera_like(frame: Frame, seed: int = 0) -> Frame:
    """Add uneven lighting, blur and sensor noise, as a camera would."""
    rng = np.random.default_rng(seed)
    width = frame.shape[1]
    lighting = np.linspace(0.7, 1.0, width, dtype=np.float32)[None, :, None]
    blurred = cv2.GaussianBlur(frame.astype(np.float32) * lighting, (0, 0), 1.0)
    noisy = blurred + rng.normal(0, 10, frame.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def texts(symbols: list[DecodedSymbol]) -> list[str | None]:
    return [symbol.text for symbol in symbols]


def payloads(symbols: list[DecodedSymbol]) -> list[bytes]:
    return [symbol.data for symbol in symbols]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_alphanumeric_payload_decodes_exactly(decoder_name: str, seed: int) -> None:
    payload = alphanumeric_payload(seed)
    frame = camera_like(draw_code(payload), seed)
    symbols = create_decoder(decoder_name).decode(frame)
    assert payloads(symbols) == [payload.encode("ascii")]


@pytest.mark.parametrize(
    "dark",
    [(0, 160, 0), (0, 215, 255), (0, 0, 200), (0, 255, 255), (0, 165, 255)],
    ids=["green", "yellow", "red", "pure-yellow", "orange"],
)
def test_coloured_code_decodes(dark: tuple[int, int, int]) -> None:
    payload = alphanumeric_payload(4)
    frame = camera_like(draw_code(payload, dark=dark))
    symbols = create_decoder("zxing").decode(frame)
    assert texts(symbols) == [payload]


def test_yellow_code_vanishes_in_luma() -> None:
    """Yellow on white is nearly white in luma, which is why decoders use the min channel."""
    frame = draw_code(alphanumeric_payload(5), dark=(0, 215, 255))
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    assert int(gray.min()) >= 190


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_yellow_code_decodes(decoder_name: str) -> None:
    payload = alphanumeric_payload(6)
    frame = camera_like(draw_code(payload, dark=(0, 215, 255)))
    symbols = create_decoder(decoder_name).decode(frame)
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_dark_mode_code_decodes(decoder_name: str) -> None:
    payload = alphanumeric_payload(7)
    frame = camera_like(draw_code(payload, dark=WHITE, light=(0, 0, 0)))
    symbols = create_decoder(decoder_name).decode(frame)
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("angle", [90, 180, 270, 30])
def test_rotated_code_decodes(angle: int) -> None:
    payload = alphanumeric_payload(8)
    code = draw_code(payload)
    canvas = np.full((600, 600, 3), 255, dtype=np.uint8)
    top = (600 - code.shape[0]) // 2
    canvas[top : top + code.shape[0], top : top + code.shape[1]] = code
    rotation = cv2.getRotationMatrix2D((300, 300), angle, 1.0)
    rotated = cv2.warpAffine(canvas, rotation, (600, 600), borderValue=WHITE)
    symbols = create_decoder("zxing").decode(camera_like(rotated))
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_two_codes_in_one_frame_both_decode(decoder_name: str) -> None:
    first, second = alphanumeric_payload(9), alphanumeric_payload(10)
    left, right = draw_code(first, dark=(0, 160, 0)), draw_code(second)
    frame = np.full((480, 800, 3), 200, dtype=np.uint8)
    frame[40 : 40 + left.shape[0], 20 : 20 + left.shape[1]] = left
    frame[60 : 60 + right.shape[0], 420 : 420 + right.shape[1]] = right
    symbols = create_decoder(decoder_name).decode(camera_like(frame))
    assert sorted(texts(symbols)) == sorted([first, second])


def test_corners_follow_code_position() -> None:
    code = draw_code(alphanumeric_payload(11))
    frame = np.full((500, 700, 3), 255, dtype=np.uint8)
    frame[50 : 50 + code.shape[0], 300 : 300 + code.shape[1]] = code
    (symbol,) = create_decoder("zxing").decode(frame)
    xs = [x for x, _ in symbol.corners]
    ys = [y for _, y in symbol.corners]
    assert len(symbol.corners) == 4
    assert min(xs) >= 300
    assert max(xs) <= 300 + code.shape[1]
    assert min(ys) >= 50
    assert max(ys) <= 50 + code.shape[0]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_corners_run_clockwise(decoder_name: str) -> None:
    frame = draw_code(alphanumeric_payload(12))
    (symbol,) = create_decoder(decoder_name).decode(frame)
    points = list(symbol.corners)
    shoelace = sum(
        x0 * y1 - x1 * y0
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True)
    )
    # With y pointing down, a positive shoelace sum is clockwise on screen.
    assert shoelace > 0


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_bgra_frame_decodes(decoder_name: str) -> None:
    payload = alphanumeric_payload(13)
    frame = cv2.cvtColor(draw_code(payload, dark=(0, 160, 0)), cv2.COLOR_BGR2BGRA)
    symbols = create_decoder(decoder_name).decode(frame)
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_grayscale_frame_decodes(decoder_name: str) -> None:
    payload = alphanumeric_payload(14)
    frame = cv2.cvtColor(draw_code(payload), cv2.COLOR_BGR2GRAY)
    symbols = create_decoder(decoder_name).decode(frame)
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_non_contiguous_frame_decodes(decoder_name: str) -> None:
    payload = alphanumeric_payload(15)
    code = draw_code(payload)
    # Every second column of a twice-as-wide array: a view that is not C-contiguous.
    view = np.zeros((code.shape[0], code.shape[1] * 2, 3), dtype=np.uint8)[:, ::2]
    view[:] = code
    symbols = create_decoder(decoder_name).decode(view)
    assert texts(symbols) == [payload]


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_blank_frame_yields_nothing(decoder_name: str) -> None:
    frame = np.full((720, 1280, 3), 128, dtype=np.uint8)
    assert create_decoder(decoder_name).decode(frame) == []


def test_binary_payload_comes_back_exact_from_zxing() -> None:
    payload = bytes(range(0x80, 0x100)) + b"\x00\x01EN1"
    frame = camera_like(draw_code(payload))
    symbols = create_decoder("zxing").decode(frame)
    assert payloads(symbols) == [payload]


def test_pyzbar_reencodes_binary_payload() -> None:
    """ZBar returns its text reading re-encoded as UTF-8, not the symbol's bytes."""
    payload = bytes(range(0x80, 0x100))
    symbols = create_decoder("pyzbar").decode(draw_code(payload))
    assert payloads(symbols) == [payload.decode("latin-1").encode("utf-8")]


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((10, 10), dtype=np.float32),
        np.zeros((10, 10), dtype=np.uint16),
        np.zeros((10, 10, 2), dtype=np.uint8),
        np.zeros((10, 10, 5), dtype=np.uint8),
        np.zeros((10,), dtype=np.uint8),
        np.zeros((2, 10, 10, 3), dtype=np.uint8),
        np.zeros((0, 10, 3), dtype=np.uint8),
        np.zeros((10, 0), dtype=np.uint8),
        [[0, 255], [255, 0]],
    ],
    ids=[
        "float32",
        "uint16",
        "two-channels",
        "five-channels",
        "one-dimension",
        "four-dimensions",
        "zero-height",
        "zero-width",
        "python-list",
    ],
)
@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_invalid_frame_raises_frame_error(decoder_name: str, frame: object) -> None:
    decoder = create_decoder(decoder_name)
    with pytest.raises(FrameError, match="expected a non-empty uint8 array"):
        decoder.decode(frame)  # type: ignore[arg-type]


def test_frame_error_carries_shape_and_dtype() -> None:
    with pytest.raises(FrameError) as caught:
        create_decoder("zxing").decode(np.zeros((4, 5, 2), dtype=np.uint16))
    assert caught.value.shape == (4, 5, 2)
    assert caught.value.dtype == "uint16"
    assert isinstance(caught.value, ValueError)


def test_unknown_decoder_name_raises() -> None:
    with pytest.raises(UnknownDecoderError, match="valid names: zxing, pyzbar"):
        create_decoder("opencv")


def test_unknown_decoder_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        create_decoder("")


@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_create_decoder_sets_name(decoder_name: str) -> None:
    assert create_decoder(decoder_name).name == decoder_name


def test_default_decoder_is_zxing() -> None:
    assert create_decoder().name == "zxing"
