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
# keeps any saturated colour dark and white light. But the minimum channel loses codes whose
# light modules are tinted (one corpus photo is a cyan LED screen), which luma reads.
#
# Trying both images costs two full passes on every frame without a code, and most camera
# frames have none. So a cheap look at a subsampled copy of the frame picks the order and
# whether the second image is worth a pass (see `compare_channel_contrast`).
# Measured in one run of benchmarks/bench_decode.py's frames on a shared 2-core AMD EPYC:
# the median over its 47 idle 1280x720 frames fell from 4.7 ms (minimum channel, then luma)
# to 2.2 ms, and two-code frames from 3.4 to 2.5 ms. The corpus still reads 238 of 253
# photos and 238 of their inverted copies, as before. Per step on idle frames: the
# comparison about 0.1 ms, luma or the minimum channel 0.5 ms each, and one zxing-cpp pass
# with try_invert about 2.1 ms. Other ideas were measured the same way and dropped. The
# minimum channel alone read only 233 inverted photos. A (min + luma) / 2 blend in one pass
# took 3.8 ms, against 3.4 ms for the minimum channel alone. A half-size first pass saw no
# trace of 79 of the 469 corpus codes that full size reads. zxing-cpp's GlobalHistogram
# binarizer was 2.5 times faster than LocalAverage but read only 217 corpus photos.
# NOTE: the idle photos are mostly grey. A scene with tiles of both kinds (a yellow sign
# and a red car on grey asphalt) costs both passes on every idle frame.

# Tile grid and tile size, in subsampled pixels, of `compare_channel_contrast`. 8 by 4 tiles
# of 20 by 20 pixels cover a 1280x720 frame with tiles of 160x180 pixels, about the size of a
# code held up to the camera.
CONTRAST_TILES_X = 8
CONTRAST_TILES_Y = 4
CONTRAST_TILE_PX = 20
# A tile counts for an image when its standard deviation is at least this many grey levels
# and the other image's is below CONTRAST_RATIO times it. The three inverted corpus photos
# that only luma reads, with no symbol seen in the minimum channel, have a minimum-channel
# deviation 0.54 to 0.73 times luma's over the whole image. Grey scenes stay near 1, so
# they get a single pass.
CONTRAST_MIN_STD = 16.0
CONTRAST_RATIO = 0.8


@dataclass(frozen=True, slots=True)
class ChannelContrast:
    """Flags for each single-channel image: true if some tile has contrast the other lacks."""

    min_channel_gain: bool
    luma_gain: bool


def min_channel(frame: Frame) -> Frame:
    """Return the per-pixel minimum of the B, G and R channels (alpha is ignored)."""
    # cv2.split then cv2.min takes about 0.5 ms for a 1280x720 frame with OpenCV 5.1, half
    # the time of cv2.min on strided channel views.
    channels = cv2.split(frame)
    darkest = cv2.min(cv2.min(channels[0], channels[1]), channels[2])
    return np.asarray(darkest, dtype=np.uint8)


def luma(frame: Frame) -> Frame:
    """Return the ITU-R BT.601 luma of a BGR or BGRA frame, as OpenCV computes it."""
    code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return np.asarray(cv2.cvtColor(frame, code), dtype=np.uint8)


def compare_channel_contrast(frame: Frame) -> ChannelContrast:
    """Compare the tile contrast of the minimum channel and of luma on a subsampled copy.

    `frame` is BGR or BGRA. Nearest-neighbour subsampling keeps the module-to-module spread
    of a code even when it skips modules, and a tile's standard deviation measures that
    spread.
    """
    size = (CONTRAST_TILES_X * CONTRAST_TILE_PX, CONTRAST_TILES_Y * CONTRAST_TILE_PX)
    small = np.asarray(cv2.resize(frame, size, interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
    # Both images stacked in one float array of (2 * height, width), so each OpenCV call
    # below runs once for both.
    stacked = np.vstack((min_channel(small), luma(small))).astype(np.float32)
    grid = (CONTRAST_TILES_X, 2 * CONTRAST_TILES_Y)
    # Exact integer shrink factors make INTER_AREA a per-tile mean.
    mean = cv2.resize(stacked, grid, interpolation=cv2.INTER_AREA)
    mean_square = cv2.resize(stacked * stacked, grid, interpolation=cv2.INTER_AREA)
    std = np.sqrt(np.maximum(mean_square - mean * mean, 0.0))
    min_std, luma_std = std[:CONTRAST_TILES_Y], std[CONTRAST_TILES_Y:]
    min_gain = (min_std >= CONTRAST_MIN_STD) & (luma_std < CONTRAST_RATIO * min_std)
    luma_gain = (luma_std >= CONTRAST_MIN_STD) & (min_std < CONTRAST_RATIO * luma_std)
    return ChannelContrast(min_channel_gain=bool(min_gain.any()), luma_gain=bool(luma_gain.any()))


@dataclass(frozen=True, slots=True)
class PassResult:
    """Outcome of one backend pass over one single-channel image."""

    symbols: list[DecodedSymbol]
    # True when the backend located a symbol that it could not decode, so the other
    # single-channel image may still read it.
    undecoded: bool = False


def decode_channels(frame: object, read: Callable[[Frame], PassResult]) -> list[DecodedSymbol]:
    """Run `read` on the single-channel image with more contrast, and on the other if needed.

    A colour frame starts with the minimum channel when some tile shows contrast there that
    luma lacks (a yellow or orange code), and with luma otherwise. The other image gets a
    pass only when the first found no code and either saw an undecodable symbol or, after
    the minimum channel, some tile favours luma.
    """
    valid = check_frame(frame)
    if valid.ndim == 2:
        return read(np.ascontiguousarray(valid)).symbols

    contrast = compare_channel_contrast(valid)
    if contrast.min_channel_gain:
        first, second, second_gain = min_channel, luma, contrast.luma_gain
    else:
        # No tile favours the minimum channel, so it gets a pass only after an undecodable
        # symbol.
        first, second, second_gain = luma, min_channel, False

    result = read(first(valid))
    if result.symbols:
        return result.symbols
    if result.undecoded or second_gain:
        return read(second(valid)).symbols
    return []


class ZxingDecoder:
    """QR and Micro QR reader built on zxing-cpp."""

    name = "zxing"

    def __init__(self) -> None:
        self._formats = zxingcpp.BarcodeFormats(
            [zxingcpp.BarcodeFormat.QRCode, zxingcpp.BarcodeFormat.MicroQRCode]
        )

    def decode(self, frame: Frame) -> list[DecodedSymbol]:
        return decode_channels(frame, self._read)

    def _read(self, gray: Frame) -> PassResult:
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
            # Symbols that fail to decode come back with `valid` false. They only decide
            # whether the other single-channel image gets a pass.
            return_errors=True,
        )
        return PassResult(
            symbols=[
                DecodedSymbol(data=result.bytes, corners=zxing_corners(result), text=result.text)
                for result in results
                if result.valid
            ],
            undecoded=any(not result.valid for result in results),
        )


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
        return decode_channels(frame, self._read)

    def _read(self, gray: Frame) -> PassResult:
        # pyzbar has no option to read light-on-dark codes, so the inverted image is a
        # second pass, as zxing-cpp's try_invert does internally.
        for image in (gray, cv2.bitwise_not(gray)):
            found = pyzbar.decode(image, symbols=[pyzbar.ZBarSymbol.QRCODE])
            if found:
                return PassResult(
                    [
                        DecodedSymbol(
                            data=symbol.data,
                            corners=clockwise_from_left(symbol.polygon),
                            text=symbol.data.decode("utf-8", errors="replace"),
                        )
                        for symbol in found
                    ]
                )
        return PassResult([])


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
