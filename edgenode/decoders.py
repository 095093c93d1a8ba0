"""QR decoders behind one interface: each returns every QR code found in a frame.

The default backend is zxing-cpp. The pyzbar (ZBar) backend is kept for comparison
and as a fallback, but it cannot return a code's raw bytes (see `PyzbarDecoder`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt
import zxingcpp
from pyzbar import pyzbar

# A camera or file frame: BGR (H, W, 3), BGRA (H, W, 4) or grayscale (H, W), uint8.
Frame = npt.NDArray[np.uint8]

Corners = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DecodedSymbol:
    """One QR code found in a frame."""

    # Payload bytes. From zxing these are the symbol's exact bytes. From pyzbar they are
    # ZBar's UTF-8 re-encoding of the payload (see `PyzbarDecoder`).
    data: bytes
    # Corner points in frame pixel coordinates, clockwise on screen. zxing starts at the
    # symbol's own top-left corner, so the start follows the code's rotation. pyzbar
    # starts at the corner with the smallest x.
    corners: Corners
    # Payload as text, in the charset that the backend chose: the ECI if the code has one,
    # otherwise a guess (Shift_JIS, UTF-8, ISO-8859-1, ...). None if the backend gave none.
    text: str | None = None


class Decoder(Protocol):
    name: str

    def decode(self, frame: Frame) -> list[DecodedSymbol]: ...


DECODER_NAMES = ("zxing", "pyzbar")


class FrameError(ValueError):
    """A frame that is not a non-empty uint8 array of shape (H, W), (H, W, 3) or (H, W, 4)."""

    def __init__(self, shape: tuple[int, ...], dtype: str, problem: str) -> None:
        self.shape = shape
        self.dtype = dtype
        super().__init__(
            f"invalid frame: {problem} (got shape {shape}, dtype {dtype}); expected a "
            "non-empty uint8 array of shape (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA"
        )


class UnknownDecoderError(ValueError):
    """A decoder name that is not one of `DECODER_NAMES`."""

    def __init__(self, name: str) -> None:
        self.name = name
        valid = ", ".join(DECODER_NAMES)
        super().__init__(f"unknown decoder {name!r}; valid names: {valid}")


def check_frame(frame: object) -> Frame:
    """Return `frame` if it is a valid `Frame`, otherwise raise `FrameError`."""
    if not isinstance(frame, np.ndarray):
        raise FrameError((), type(frame).__name__, "not a numpy array")
    shape = tuple(int(n) for n in frame.shape)
    dtype = str(frame.dtype)
    if frame.dtype != np.uint8:
        raise FrameError(shape, dtype, "dtype is not uint8")
    if frame.ndim == 3 and shape[2] not in (3, 4):
        raise FrameError(shape, dtype, "a colour frame must have 3 (BGR) or 4 (BGRA) channels")
    if frame.ndim not in (2, 3):
        raise FrameError(shape, dtype, f"{frame.ndim} dimensions")
    if frame.size == 0:
        raise FrameError(shape, dtype, "frame is empty")
    return frame


# Colour to one channel. Health codes are often drawn green, yellow or red on white. In a
# luma conversion yellow modules stay light (BGR (0, 215, 255) becomes about 202 of 255,
# pure yellow 226), so neither backend finds them. The per-pixel minimum of B, G and R
# keeps any saturated colour dark and white light. Measured with this module: the minimum
# channel decodes yellow and orange codes that luma misses, but it loses 2 of the 253
# corpus photos, whose light modules are tinted (one is a cyan LED screen). So decoders
# try the minimum channel first (one pass for a coloured code) and luma only when the
# first pass finds nothing. The cost is a second pass on every frame without a code.


def min_channel(frame: Frame) -> Frame:
    """Return the per-pixel minimum of the B, G and R channels (alpha is ignored)."""
    # Strided channel views are faster here than cv2.split (1.5 ms against 5 ms or more
    # for a 1280x720 frame on the benchmark machine).
    darkest = cv2.min(cv2.min(frame[:, :, 0], frame[:, :, 1]), frame[:, :, 2])
    return np.asarray(darkest, dtype=np.uint8)


def luma(frame: Frame) -> Frame:
    """Return the ITU-R BT.601 luma of a BGR or BGRA frame, as OpenCV computes it."""
    code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return np.asarray(cv2.cvtColor(frame, code), dtype=np.uint8)


def gray_candidates(frame: Frame) -> list[Callable[[], Frame]]:
    """Return the single-channel images to try, in order, each computed only when needed."""
    if frame.ndim == 2:
        return [lambda: np.ascontiguousarray(frame)]
    return [lambda: min_channel(frame), lambda: luma(frame)]


def decode_first_hit(
    frame: object, read: Callable[[Frame], list[DecodedSymbol]]
) -> list[DecodedSymbol]:
    """Run `read` on each single-channel candidate until one yields a code."""
    valid = check_frame(frame)
    for make_gray in gray_candidates(valid):
        symbols = read(make_gray())
        if symbols:
            return symbols
    return []


class ZxingDecoder:
    """QR and Micro QR reader built on zxing-cpp."""

    name = "zxing"

    def __init__(self) -> None:
        self._formats = zxingcpp.BarcodeFormats(
            [zxingcpp.BarcodeFormat.QRCode, zxingcpp.BarcodeFormat.MicroQRCode]
        )

    def decode(self, frame: Frame) -> list[DecodedSymbol]:
        return decode_first_hit(frame, self._read)

    def _read(self, gray: Frame) -> list[DecodedSymbol]:
        # The QR detector finds codes at any rotation by itself (the rotation tests pass
        # with try_rotate off), so try_rotate, which rescans the image turned by 90
        # degrees, only costs time.
        # try_downscale also rescans smaller copies of the image. Without it a two-code
        # 1280x720 frame took about 30 % less time (3.4 ms against 4.8 ms), while the
        # corpus count and synthetic codes 120 to 700 px wide decoded the same.
        results = zxingcpp.read_barcodes(
            gray,
            formats=self._formats,
            try_rotate=False,
            try_downscale=False,
            try_invert=True,
            text_mode=zxingcpp.TextMode.Plain,
        )
        return [
            DecodedSymbol(data=result.bytes, corners=zxing_corners(result), text=result.text)
            for result in results
        ]


def zxing_corners(result: zxingcpp.Barcode) -> Corners:
    position = result.position
    points = (position.top_left, position.top_right, position.bottom_right, position.bottom_left)
    return tuple((int(point.x), int(point.y)) for point in points)


class PyzbarDecoder:
    """QR reader built on ZBar through pyzbar.

    ZBar does not return a QR code's bytes. When the code has no ECI, ZBar 0.23 guesses
    the charset of byte-mode data (Shift_JIS, UTF-8, ISO-8859-1, ...) and returns the text
    re-encoded as UTF-8, so `data` differs from the payload for any byte above 0x7F.
    Measured with libzbar0 0.23.92 and pyzbar 0.1.9: bytes 0x80-0xFF come back as their
    ISO-8859-1 reading (0xFF becomes C3 BF), and the UTF-8 bytes of "héllo" come back as
    a different, Shift_JIS-like reading. ASCII payloads come back unchanged.
    """

    name = "pyzbar"

    def decode(self, frame: Frame) -> list[DecodedSymbol]:
        return decode_first_hit(frame, self._read)

    def _read(self, gray: Frame) -> list[DecodedSymbol]:
        # pyzbar has no option to read light-on-dark codes, so the inverted image is a
        # second pass, as zxing-cpp's try_invert does internally.
        for image in (gray, cv2.bitwise_not(gray)):
            found = pyzbar.decode(image, symbols=[pyzbar.ZBarSymbol.QRCODE])
            if found:
                return [
                    DecodedSymbol(
                        data=symbol.data,
                        corners=clockwise_from_left(symbol.polygon),
                        text=symbol.data.decode("utf-8", errors="replace"),
                    )
                    for symbol in found
                ]
        return []


def clockwise_from_left(polygon: Sequence[tuple[int, int]]) -> Corners:
    """Order pyzbar's convex hull clockwise on screen, starting at the smallest (x, y)."""
    points = [(int(x), int(y)) for x, y in polygon]
    if len(points) < 3:
        return tuple(points)
    # Shoelace sum: positive means clockwise when y points down.
    area = sum(
        x0 * y1 - x1 * y0
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True)
    )
    if area < 0:
        points.reverse()
    start = points.index(min(points))
    return tuple(points[start:] + points[:start])


def create_decoder(name: str = "zxing") -> Decoder:
    """Create the decoder called `name`, one of `DECODER_NAMES`."""
    if name == "zxing":
        return ZxingDecoder()
    if name == "pyzbar":
        return PyzbarDecoder()
    raise UnknownDecoderError(name)
