"""QR decoders behind one interface: each returns the exact bytes of every code in a frame.

NOTE: stub written so that other modules can import the interface; the real
zxing-cpp and pyzbar backends replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class DecodedSymbol:
    """One QR code found in a frame."""

    data: bytes
    # Corner points in frame pixel coordinates, clockwise from top-left.
    corners: tuple[tuple[int, int], ...]


class Decoder(Protocol):
    name: str

    def decode(self, frame: Frame) -> list[DecodedSymbol]: ...


DECODER_NAMES = ("zxing", "pyzbar")


def create_decoder(name: str = "zxing") -> Decoder:
    raise NotImplementedError(name)
