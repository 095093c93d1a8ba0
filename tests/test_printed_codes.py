"""Printed codes on a paper card, as residents without a phone carry them, read by the camera.

The card is drawn at print size: 300 dpi, each code 30 mm wide with its 4-module quiet zone
outside that width. The camera image is the card resampled to the pixels per millimetre that
a gate camera sees at a given distance, with a little blur and sensor noise, on a grey
background. The codes then go through the same decoder, pairing and policy as a phone's.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edgenode.cache import Cache
from edgenode.codes import CommunityCode, parse_payload
from edgenode.decoders import create_decoder
from edgenode.demo.render import code_matrix
from edgenode.journal import Journal
from edgenode.pipeline import Gate
from edgenode.policy import ClockReading, Outcome
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config

PRINT_DPI = 300
PX_PER_MM_AT_PRINT = PRINT_DPI / 25.4
CODE_WIDTH_MM = 30
QUIET_ZONE_MODULES = 4
CARD_MM = (148, 105)  # A6, landscape


def draw_code(card: npt.NDArray[np.uint8], payload: str, left_mm: float, top_mm: float) -> None:
    """Draw a code CODE_WIDTH_MM wide (quiet zone not counted) onto a white card."""
    matrix = code_matrix(payload)
    modules = matrix.shape[0]
    module_px = CODE_WIDTH_MM * PX_PER_MM_AT_PRINT / modules
    image = np.where(matrix, 0, 255).astype(np.uint8)
    size = round(modules * module_px)
    scaled = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)
    left = round(left_mm * PX_PER_MM_AT_PRINT)
    top = round(top_mm * PX_PER_MM_AT_PRINT)
    card[top : top + size, left : left + size] = scaled


def print_card(health: str, community: str) -> npt.NDArray[np.uint8]:
    width = round(CARD_MM[0] * PX_PER_MM_AT_PRINT)
    height = round(CARD_MM[1] * PX_PER_MM_AT_PRINT)
    card = np.full((height, width), 250, dtype=np.uint8)
    draw_code(card, health, 20, 40)
    draw_code(card, community, 90, 40)
    return card


def photograph(card: npt.NDArray[np.uint8], px_per_mm: float, seed: int) -> npt.NDArray[np.uint8]:
    """Resample the card to the camera's pixels per millimetre and place it in a 1080p frame."""
    scale = px_per_mm / PX_PER_MM_AT_PRINT
    seen = cv2.resize(card, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    seen = cv2.GaussianBlur(seen, (0, 0), 0.6)
    frame = np.full((1080, 1920), 90, dtype=np.uint8)
    top = (1080 - seen.shape[0]) // 2
    left = (1920 - seen.shape[1]) // 2
    frame[top : top + seen.shape[0], left : left + seen.shape[1]] = seen
    noise = np.random.default_rng(seed).normal(0, 4, frame.shape)
    grey = np.clip(frame + noise, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


# Pixels per millimetre of a 1920-pixel-wide camera whose view is 315 mm and 240 mm wide at the
# card, an estimate for a card held about 30 and 20 cm from a gate camera with a 60 degree lens.
@pytest.mark.parametrize("px_per_mm", [6.1, 8.0], ids=["card_at_30cm", "card_at_20cm"])
def test_printed_card_is_admitted(tmp_path: Path, px_per_mm: float) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    health, community = site.printed()
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    frame = photograph(print_card(health, community), px_per_mm, seed=int(px_per_mm))
    clock = ClockReading(now=float(site.now))

    with Cache(config.cache_path) as cache, Journal(config.journal_path, "gate-test") as journal:
        gate = Gate(config, cache, journal, create_decoder("zxing"), clock=lambda: clock)
        events = gate.process_frame(frame, station="north", at=0.0)
        events += gate.flush(10.0)

    parsed = parse_payload(community.encode("ascii"))
    assert isinstance(parsed, CommunityCode)
    assert parsed.printed
    assert [event.verdict.outcome for event in events] == [Outcome.ADMIT]
