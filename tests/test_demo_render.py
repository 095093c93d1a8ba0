"""Tests for the synthetic gate footage and phone photos in edgenode.demo.render.

Frames are decoded with zxing-cpp directly, after reducing BGR to one channel
by the per-pixel minimum over channels, as the product's decoder does.
"""

from __future__ import annotations

from pathlib import Path

import base45
import cv2
import numpy as np
import pytest
import zxingcpp

from edgenode.demo.render import (
    Effects,
    Presentation,
    make_qr,
    render_gate_video,
    render_phone_photo,
    write_code_png,
)


def make_payload(seed: int, length: int) -> str:
    """Return an "EN1:" payload of base45 text, like a signed code, of exactly length characters."""
    data = np.random.default_rng(seed).bytes(length)
    text = "EN1:" + str(base45.b45encode(data).decode("ascii"))
    return text[:length]


HEALTH = make_payload(1, 176)
COMMUNITY = make_payload(2, 152)
URL = "https://gate.example.cn/pass?c=8f3a2b91d0c4e7a6b5f1&sig=4b7e9d2c"


def decode(image: np.ndarray) -> list[str]:
    """Decode every QR code in a BGR or grayscale image, sorted by text."""
    gray = image.min(axis=2) if image.ndim == 3 else image
    results = zxingcpp.read_barcodes(gray, try_invert=True)
    return sorted(result.text for result in results)


def test_payloads_use_expected_modes() -> None:
    assert len(HEALTH) == 176
    assert make_qr(HEALTH).mode == "alphanumeric"
    assert make_qr(COMMUNITY).mode == "alphanumeric"
    assert make_qr(URL).mode == "byte"
    assert make_qr(HEALTH).error == "M"


DEMO_EFFECTS = [
    pytest.param(Effects(), id="none"),
    pytest.param(Effects(perspective=0.5), id="perspective-0.5"),
    pytest.param(Effects(blur=0.4), id="blur-0.4"),
    pytest.param(Effects(glare=0.5), id="glare-0.5"),
    pytest.param(Effects(dark_mode=True), id="dark-mode"),
    pytest.param(Effects(colour="green"), id="green"),
    pytest.param(Effects(colour="yellow"), id="yellow"),
    pytest.param(Effects(colour="red"), id="red"),
    pytest.param(Effects(rotation_deg=10), id="rotation-10"),
    pytest.param(Effects(perspective=0.5, blur=0.4, colour="yellow"), id="perspective-blur-yellow"),
    pytest.param(Effects(dark_mode=True, glare=0.5, rotation_deg=-10), id="dark-glare-rotation"),
    pytest.param(
        Effects(perspective=0.5, blur=0.4, glare=0.5, colour="green", rotation_deg=10),
        id="all-effects-green",
    ),
    pytest.param(Effects(dark_mode=True, colour="red", blur=0.4), id="dark-red-blur"),
]


@pytest.mark.parametrize("effects", DEMO_EFFECTS)
def test_phone_photo_decodes_both_codes(effects: Effects) -> None:
    photo = render_phone_photo((HEALTH, COMMUNITY), effects, seed=3)

    assert photo.shape == (720, 1280, 3)
    assert photo.dtype == np.uint8
    assert decode(photo) == sorted([HEALTH, COMMUNITY])


@pytest.mark.parametrize(
    "codes",
    [
        pytest.param((URL,), id="url-alone"),
        pytest.param((HEALTH,), id="health-alone"),
        pytest.param((HEALTH, URL), id="health-and-url"),
    ],
)
def test_phone_photo_decodes_other_layouts(codes: tuple[str, ...]) -> None:
    photo = render_phone_photo(codes, Effects(perspective=0.5, blur=0.4), seed=5)

    assert decode(photo) == sorted(codes)


def test_phone_photo_smaller_frame() -> None:
    photo = render_phone_photo((HEALTH, COMMUNITY), Effects(), size=(960, 540))

    assert photo.shape == (540, 960, 3)
    assert decode(photo) == sorted([HEALTH, COMMUNITY])


def test_phone_photo_same_seed_same_frame() -> None:
    effects = Effects(perspective=0.5, blur=0.4, glare=0.5)

    first = render_phone_photo((HEALTH, COMMUNITY), effects, seed=7)
    second = render_phone_photo((HEALTH, COMMUNITY), effects, seed=7)
    other = render_phone_photo((HEALTH, COMMUNITY), effects, seed=8)

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_presentation_colours_only_health_code() -> None:
    pair = Presentation((HEALTH, COMMUNITY), Effects(colour="yellow"))
    single = Presentation((HEALTH,), Effects(colour="red"))

    assert pair.colours == ("yellow", None)
    assert single.colours == ("red",)


def test_yellow_colour_on_health_code_only() -> None:
    # Yellow modules have a blue channel near 0 and a red channel near 255, so
    # yellow pixels show up as a large red-minus-blue difference.
    photo = render_phone_photo((HEALTH, COMMUNITY), Effects(colour="yellow"), seed=0)
    yellow = (photo[:, :, 2].astype(int) - photo[:, :, 0].astype(int)) > 150
    rows = np.nonzero(yellow.sum(axis=1) > 20)[0]

    assert rows.size > 100
    results = zxingcpp.read_barcodes(photo.min(axis=2), try_invert=True)
    health = next(result for result in results if result.text == HEALTH)
    community = next(result for result in results if result.text == COMMUNITY)
    assert health.position.top_left.y < community.position.top_left.y
    assert rows.max() < community.position.top_left.y


@pytest.mark.parametrize(
    "effects",
    [
        pytest.param({"perspective": 1.5}, id="perspective-above-1"),
        pytest.param({"blur": -0.1}, id="negative-blur"),
        pytest.param({"colour": "blue"}, id="unknown-colour"),
    ],
)
def test_effects_reject_invalid_values(effects: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Effects(**effects)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "codes",
    [
        pytest.param((), id="none"),
        pytest.param((HEALTH, COMMUNITY, URL), id="three"),
        pytest.param(("",), id="empty-payload"),
    ],
)
def test_presentation_rejects_code_counts(codes: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Presentation(codes)


def test_video_rejects_non_avi_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.avi"):
        render_gate_video([Presentation((HEALTH,))], tmp_path / "gate.mp4")


def read_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    frames = []
    for _ in range(10_000):
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_video_round_trips_codes_and_gaps(tmp_path: Path) -> None:
    presentations = [
        Presentation((HEALTH, COMMUNITY), Effects(), duration_s=1.0),
        Presentation(
            (COMMUNITY, HEALTH),
            Effects(perspective=0.5, blur=0.4, glare=0.5, colour="yellow", rotation_deg=10),
            duration_s=1.0,
        ),
        Presentation((URL,), Effects(dark_mode=True), duration_s=0.5),
    ]
    fps = 6
    info = render_gate_video(presentations, tmp_path / "gate.avi", fps=fps, gap_s=0.5, seed=4)
    frames = read_frames(tmp_path / "gate.avi")

    assert len(frames) == info.frame_count == 3 + 6 + 3 + 6 + 3 + 3 + 3
    assert frames[0].shape == (720, 1280, 3)
    assert [span.codes for span in info.spans] == [p.codes for p in presentations]
    assert [(span.start_s, span.end_s) for span in info.spans] == [
        (0.5, 1.5),
        (2.0, 3.0),
        (3.5, 4.0),
    ]

    presentation_frames: set[int] = set()
    for span in info.spans:
        frame_range = range(span.start_frame, span.end_frame)
        presentation_frames.update(frame_range)
        hits = sum(decode(frames[index]) == sorted(span.codes) for index in frame_range)
        assert hits >= len(frame_range) / 2, f"{span.codes[0][:12]}: {hits}/{len(frame_range)}"

    for index in sorted(set(range(len(frames))) - presentation_frames):
        assert decode(frames[index]) == [], f"code read in gap frame {index}"


def test_video_same_seed_same_frames(tmp_path: Path) -> None:
    presentations = [Presentation((HEALTH, COMMUNITY), Effects(blur=0.4), duration_s=0.5)]

    render_gate_video(presentations, tmp_path / "a.avi", fps=6, gap_s=0.2, seed=9)
    render_gate_video(presentations, tmp_path / "b.avi", fps=6, gap_s=0.2, seed=9)
    first = read_frames(tmp_path / "a.avi")
    second = read_frames(tmp_path / "b.avi")

    assert len(first) == len(second) == 5
    for index, (frame_a, frame_b) in enumerate(zip(first, second, strict=True)):
        assert np.array_equal(frame_a, frame_b), f"frame {index} differs"


def test_video_phone_moves_between_frames(tmp_path: Path) -> None:
    presentations = [Presentation((HEALTH,), Effects(), duration_s=1.0)]

    info = render_gate_video(presentations, tmp_path / "gate.avi", fps=6, gap_s=0.0)
    frames = read_frames(tmp_path / "gate.avi")

    first = zxingcpp.read_barcodes(frames[0].min(axis=2))[0].position.top_left
    last = zxingcpp.read_barcodes(frames[info.frame_count - 1].min(axis=2))[0].position.top_left
    shift = abs(first.x - last.x) + abs(first.y - last.y)
    assert 1 <= shift <= 40


@pytest.mark.parametrize(
    ("payload", "colour"),
    [
        pytest.param(HEALTH, None, id="alphanumeric-black"),
        pytest.param(HEALTH, "yellow", id="alphanumeric-yellow"),
        pytest.param(URL, "green", id="url-green"),
    ],
)
def test_write_code_png_decodes(tmp_path: Path, payload: str, colour: str | None) -> None:
    path = tmp_path / "code.png"

    write_code_png(payload, path, colour=colour, scale=4)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)

    assert path.read_bytes().startswith(b"\x89PNG")
    assert image is not None
    assert decode(image) == [payload]
    symbol = make_qr(payload).symbol_size(scale=4, border=4)
    assert image.shape[:2] == (symbol[1], symbol[0])
