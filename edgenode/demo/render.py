"""Synthetic gate footage and phone-screen photos that show QR codes.

`edgenode demo` and the end-to-end tests use this module to produce frames in
which a resident holds up a phone that shows a health code above a community
code. Everything is drawn with numpy and OpenCV primitives and is
deterministic for a given seed.

Sizes are (width, height) in pixels, as OpenCV takes them. Images are BGR uint8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import segno

Image = npt.NDArray[np.uint8]
Homography = npt.NDArray[np.float64]
Size = tuple[int, int]

# App-like module colours (BGR). A grayscale conversion leaves yellow at about
# 190 of 255 against a white screen, so yellow is the hard case for decoders
# that do not take the per-pixel minimum over channels.
MODULE_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (80, 160, 0),
    "yellow": (0, 200, 255),
    "red": (40, 30, 220),
}

QUIET_ZONE_MODULES = 4
# Pixels per module in the phone image before it is scaled into the frame.
DESIGN_MODULE_PX = 8
# The code stack must fit in this fraction of the frame, leaving room for drift.
FIT_FRACTION = 0.92
# Largest code (modules area) as a fraction of the frame height.
MAX_CODE_FRACTION = 0.42
# Tilt angle at perspective=1, and camera distance in phone heights.
MAX_TILT_DEG = 60.0
CAMERA_DISTANCE = 1.6
# Per-frame motion of a presented phone.
DRIFT_PX = 4.0
SCALE_WOBBLE = 0.015
ROLL_WOBBLE_DEG = 0.6

SCREEN_LIGHT = (246, 246, 246)
SCREEN_DARK = (18, 18, 18)
MODULE_LIGHT_MODE = (20, 20, 20)
MODULE_DARK_MODE = (235, 235, 235)
PHONE_BODY = (38, 34, 32)
CODE_LABELS = ("HEALTH CODE", "COMMUNITY CODE")
VIDEO_FOURCC = "MJPG"
# JPEG quality 0-100 (OpenCV's default). At 1280x720 with OpenCV 5.1, quality 95
# made frames 20% larger and encoding 80% slower, and 75 already decodes.
VIDEO_QUALITY = 75


@dataclass(frozen=True)
class Effects:
    """Image degradations applied to a presented phone.

    perspective, blur and glare range from 0 (none) to 1 (severe). The demo
    uses perspective 0.5, blur 0.4 and glare 0.5, which still decode.
    In dark mode the screen is black and plain codes are drawn inverted
    (white modules). A coloured code keeps a white card behind it in dark
    mode, because coloured modules on black have no contrast once the
    decoder takes the per-pixel minimum over channels.
    """

    perspective: float = 0.0
    blur: float = 0.0
    glare: float = 0.0
    dark_mode: bool = False
    # Module colour of the health code: None (black), "green", "yellow" or "red".
    colour: str | None = None
    # In-plane rotation, counterclockwise in degrees.
    rotation_deg: float = 0.0

    def __post_init__(self) -> None:
        for name in ("perspective", "blur", "glare"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Effects.{name} must be between 0 and 1, got {value}")
        validate_colour(self.colour)


@dataclass(frozen=True)
class Presentation:
    """One person showing one or two codes (health code first) for duration_s seconds."""

    codes: tuple[str, ...]
    effects: Effects = field(default_factory=Effects)
    duration_s: float = 1.5

    def __post_init__(self) -> None:
        validate_codes(self.codes)
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")

    @property
    def colours(self) -> tuple[str | None, ...]:
        """Module colour per code: only the health code takes effects.colour."""
        return code_colours(len(self.codes), self.effects.colour)


@dataclass(frozen=True)
class PresentationSpan:
    """Time and frame span of one presentation in a rendered video.

    Frames start_frame to end_frame - 1 show the codes. start_s and end_s are
    the same bounds in seconds (start_frame / fps and end_frame / fps).
    """

    codes: tuple[str, ...]
    start_s: float
    end_s: float
    start_frame: int
    end_frame: int


@dataclass(frozen=True)
class VideoInfo:
    """A rendered video and the time span of each presentation in it."""

    path: Path
    fps: float
    size: Size
    frame_count: int
    spans: tuple[PresentationSpan, ...]


@dataclass(frozen=True)
class _Phone:
    """A phone image (BGRA, transparent outside the body) and its code stack box."""

    image: Image
    # Box around the header and all code boxes: x0, y0, x1, y1 in image pixels.
    content_box: tuple[int, int, int, int]
    module_count: int


@dataclass(frozen=True)
class _Placement:
    """A prepared presentation: the phone scaled for the frame and its pose."""

    phone: Image
    homography: Homography
    anchor: tuple[float, float]
    background: Image
    motion: npt.NDArray[np.float64]


def validate_codes(codes: Sequence[str]) -> None:
    """Raise ValueError unless codes contains one or two non-empty payloads."""
    if not 1 <= len(codes) <= 2:
        raise ValueError(f"a phone shows one or two codes, got {len(codes)}")
    for payload in codes:
        if not payload:
            raise ValueError("invalid payload: a code needs at least one character, got ''")


def validate_colour(colour: str | None) -> None:
    """Raise ValueError unless colour is None or a key of MODULE_COLOURS."""
    if colour is not None and colour not in MODULE_COLOURS:
        known = ", ".join(MODULE_COLOURS)
        raise ValueError(f"unknown module colour {colour!r}, expected None or one of {known}")


def code_colours(count: int, colour: str | None) -> tuple[str | None, ...]:
    """Return the module colour of each of count codes: the first takes colour."""
    return (colour,) + (None,) * (count - 1)


def make_qr(payload: str) -> segno.QRCode:
    """Encode payload as a QR code with error correction M.

    segno picks alphanumeric mode for payloads in the QR alphanumeric alphabet
    and byte mode otherwise. boost_error is off so the level stays M.
    """
    return segno.make(payload, error="m", boost_error=False, micro=False)


@functools.lru_cache(maxsize=64)
def code_matrix(payload: str) -> npt.NDArray[np.bool_]:
    """Return the module matrix of payload's code, without quiet zone, as a read-only array.

    Cached because segno's mask selection dominates the cost of a phone image
    and a video shows the same payloads many times.
    """
    matrix = np.array(make_qr(payload).matrix, dtype=bool)
    matrix.flags.writeable = False
    return matrix


def write_code_png(
    payload: str, path: str | Path, colour: str | None = None, scale: int = 8
) -> None:
    """Write a clean PNG of one code with a 4-module quiet zone, scale pixels per module."""
    validate_colour(colour)
    dark = "#000000"
    if colour is not None:
        blue, green, red = MODULE_COLOURS[colour]
        dark = f"#{red:02x}{green:02x}{blue:02x}"
    make_qr(payload).save(str(path), kind="png", scale=scale, border=QUIET_ZONE_MODULES, dark=dark)


def render_phone_photo(
    codes: Sequence[str],
    effects: Effects = Effects(),
    size: Size = (1280, 720),
    seed: int = 0,
) -> Image:
    """Render one still frame of a phone showing codes in front of a gate."""
    presentation = Presentation(codes=tuple(codes), effects=effects)
    background_seed, placement_seed = np.random.SeedSequence(seed).spawn(2)
    background = render_gate_background(size, np.random.default_rng(background_seed))
    placement = _place_presentation(presentation, background, np.random.default_rng(placement_seed))
    return _render_frame(placement, time_s=0.0)


def render_gate_video(
    presentations: Sequence[Presentation],
    path: str | Path,
    size: Size = (1280, 720),
    fps: float = 15,
    gap_s: float = 1.0,
    seed: int = 0,
) -> VideoInfo:
    """Write an MJPG .avi of people presenting phones at a gate.

    The video starts with gap_s seconds of empty gate scene, and another gap
    follows each presentation, the last one included. Motion-JPEG compresses
    each frame on its own, so every frame decodes the same way wherever a
    reader seeks. Raises ValueError for a path that does not end in .avi and
    RuntimeError if OpenCV cannot open the writer.
    """
    path = Path(path)
    if path.suffix.lower() != ".avi":
        raise ValueError(f"video path must end in .avi (MJPG in AVI), got {path}")
    if fps <= 0 or gap_s < 0:
        raise ValueError(f"fps must be positive and gap_s not negative, got {fps} and {gap_s}")

    background_seed, *presentation_seeds = np.random.SeedSequence(seed).spawn(
        1 + len(presentations)
    )
    background = render_gate_background(size, np.random.default_rng(background_seed))
    writer = _open_video_writer(path, fps, size)
    gap_frames = round(gap_s * fps)
    spans: list[PresentationSpan] = []
    frame_index = 0
    try:
        frame_index += _write_still(writer, background, gap_frames)
        for presentation, presentation_seed in zip(presentations, presentation_seeds, strict=True):
            rng = np.random.default_rng(presentation_seed)
            placement = _place_presentation(presentation, background, rng)
            frame_count = max(1, round(presentation.duration_s * fps))
            for offset in range(frame_count):
                writer.write(_render_frame(placement, time_s=offset / fps))
            spans.append(
                PresentationSpan(
                    codes=presentation.codes,
                    start_s=frame_index / fps,
                    end_s=(frame_index + frame_count) / fps,
                    start_frame=frame_index,
                    end_frame=frame_index + frame_count,
                )
            )
            frame_index += frame_count
            frame_index += _write_still(writer, background, gap_frames)
    finally:
        writer.release()
    return VideoInfo(path=path, fps=fps, size=size, frame_count=frame_index, spans=tuple(spans))


def _open_video_writer(path: Path, fps: float, size: Size) -> cv2.VideoWriter:
    # OpenCV's built-in MJPEG writer exists in every build. With OpenCV 5.1 at
    # perspective 0.7, blur 0.6 and glare 0.7, its frames decoded 10 of 10
    # against 8 of 10 for FFmpeg's MJPG at default settings, at twice the
    # encoding time. It ignores quality passed to the constructor, so the
    # quality is set afterwards.
    writer = cv2.VideoWriter(
        str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter.fourcc(*VIDEO_FOURCC), fps, size
    )
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an MJPG video writer for {path}")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, VIDEO_QUALITY)
    return writer


def _write_still(writer: cv2.VideoWriter, frame: Image, count: int) -> int:
    for _ in range(count):
        writer.write(frame)
    return count


# Background


def render_gate_background(size: Size, rng: np.random.Generator) -> Image:
    """Draw an empty residential-compound gate: wall, ground, pillars, bars and a guard booth."""
    width, height = size
    horizon = int(height * rng.uniform(0.62, 0.7))
    image = np.empty((height, width, 3), np.uint8)
    top = np.array([205, 195, 180]) + rng.integers(-15, 16, 3)
    bottom = np.array([150, 150, 155]) + rng.integers(-15, 16, 3)
    _fill_vertical_gradient(image[:horizon], top, bottom)
    _fill_vertical_gradient(image[horizon:], np.array([105, 105, 110]), np.array([70, 72, 75]))

    _draw_gate(image, horizon, rng)
    _draw_booth(image, horizon, rng)

    # Uniform sensor noise of -4..4 levels. Saturating uint8 arithmetic is far
    # faster than float noise on a full frame.
    noise = rng.integers(0, 9, image.shape, dtype=np.uint8)
    noisy = cv2.add(image, noise)
    result: Image = np.asarray(cv2.subtract(noisy, np.full_like(noisy, 4)), np.uint8)
    return result


def _fill_vertical_gradient(
    region: Image, top: npt.NDArray[np.int64], bottom: npt.NDArray[np.int64]
) -> None:
    weights = np.linspace(0.0, 1.0, region.shape[0])[:, None]
    column = top[None, :] * (1 - weights) + bottom[None, :] * weights
    region[:] = np.clip(column, 0, 255).astype(np.uint8)[:, None, :]


def _draw_gate(image: Image, horizon: int, rng: np.random.Generator) -> None:
    height, width = image.shape[:2]
    pillar_width = int(width * 0.07)
    pillar_top = int(height * rng.uniform(0.12, 0.2))
    pillar_colour = (
        int(rng.integers(50, 80)),
        int(rng.integers(70, 100)),
        int(rng.integers(120, 160)),
    )
    left = int(width * rng.uniform(0.06, 0.12))
    right = int(width * rng.uniform(0.66, 0.74))
    for x in (left, right):
        cv2.rectangle(image, (x, pillar_top), (x + pillar_width, horizon + 10), pillar_colour, -1)
        cv2.rectangle(
            image, (x - 6, pillar_top - 14), (x + pillar_width + 6, pillar_top), (90, 90, 95), -1
        )

    # Sliding gate between the pillars: two rails and evenly spaced bars.
    bar_colour = (60, 62, 66)
    gate_top = int(height * 0.4)
    gate_left, gate_right = left + pillar_width, right
    for y in (gate_top, horizon - 8):
        cv2.line(image, (gate_left, y), (gate_right, y), bar_colour, 6)
    spacing = max(12, width // 60)
    for x in range(gate_left + spacing, gate_right, spacing):
        cv2.line(image, (x, gate_top), (x, horizon - 8), bar_colour, 3)

    # Red sign above the gate.
    sign_left = gate_left + (gate_right - gate_left) // 4
    sign_right = gate_right - (gate_right - gate_left) // 4
    sign_top = max(0, pillar_top - int(height * 0.1))
    cv2.rectangle(image, (sign_left, sign_top), (sign_right, pillar_top - 20), (40, 40, 170), -1)


def _draw_booth(image: Image, horizon: int, rng: np.random.Generator) -> None:
    height, width = image.shape[:2]
    left = int(width * rng.uniform(0.8, 0.84))
    top = int(height * 0.3)
    cv2.rectangle(image, (left, top), (width - 1, horizon + 20), (200, 205, 210), -1)
    cv2.rectangle(image, (left, top - 16), (width - 1, top), (120, 110, 100), -1)
    window = (left + 20, top + 30), (width - 20, top + int(height * 0.15))
    cv2.rectangle(image, window[0], window[1], (140, 120, 90), -1)


def _draw_person(image: Image, centre_x: int, rng: np.random.Generator) -> None:
    """Draw a torso, shoulders and head behind where the phone will be."""
    height, width = image.shape[:2]
    clothes = tuple(int(value) for value in rng.integers(30, 140, 3))
    skin = (int(rng.integers(120, 160)), int(rng.integers(150, 185)), int(rng.integers(190, 225)))
    shoulder_y = int(height * 0.45)
    cv2.ellipse(
        image,
        (centre_x, height),
        (int(width * 0.22), height - shoulder_y),
        0,
        180,
        360,
        clothes,
        -1,
        cv2.LINE_AA,
    )
    cv2.circle(image, (centre_x, int(height * 0.3)), int(height * 0.13), skin, -1, cv2.LINE_AA)
    # Hand below the phone.
    cv2.ellipse(
        image,
        (centre_x, int(height * 0.93)),
        (int(width * 0.05), int(height * 0.08)),
        0,
        0,
        360,
        skin,
        -1,
    )


# Phone


def _render_phone(codes: Sequence[str], effects: Effects, rng: np.random.Generator) -> _Phone:
    """Draw the phone body and screen with the codes stacked vertically, before any warp."""
    validate_codes(codes)
    matrices = [code_matrix(payload) for payload in codes]
    module_count = max(matrix.shape[0] for matrix in matrices)
    box = (module_count + 2 * QUIET_ZONE_MODULES) * DESIGN_MODULE_PX
    screen_width = box
    header = round(0.13 * box)
    label = round(0.08 * box)
    content_height = header + len(codes) * (label + box)
    screen_height = max(content_height + round(0.05 * box), round(2.05 * screen_width))
    side, top = round(0.05 * box), round(0.1 * box)

    screen = _draw_screen(screen_width, screen_height, header, effects.dark_mode)
    colours = code_colours(len(codes), effects.colour)
    for index, (matrix, colour) in enumerate(zip(matrices, colours, strict=True)):
        y = header + index * (label + box) + label
        _draw_label(screen, CODE_LABELS[index], y - label, label, effects.dark_mode)
        _draw_code(screen, matrix, (0, y), box, colour, effects.dark_mode)
    if screen_height - content_height > box // 2:
        _draw_filler(screen, content_height, effects.dark_mode)
    if effects.glare > 0:
        screen = _add_glare(screen, effects.glare, rng)

    phone = _draw_body(screen, side, top)
    content_box = (side, top, side + screen_width, top + content_height)
    return _Phone(image=phone, content_box=content_box, module_count=module_count)


def _draw_screen(width: int, height: int, header: int, dark_mode: bool) -> Image:
    background = SCREEN_DARK if dark_mode else SCREEN_LIGHT
    screen = np.empty((height, width, 3), np.uint8)
    screen[:] = background
    header_colour = (48, 48, 48) if dark_mode else (190, 120, 30)
    screen[:header] = header_colour
    scale = header / 60
    cv2.putText(
        screen,
        "GATE PASS",
        (header // 3, int(header * 0.68)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (255, 255, 255),
        max(1, round(2 * scale)),
        cv2.LINE_AA,
    )
    return screen


def _draw_label(screen: Image, text: str, top: int, height: int, dark_mode: bool) -> None:
    colour = (200, 200, 200) if dark_mode else (70, 70, 70)
    scale = height / 45
    (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    origin = ((screen.shape[1] - text_width) // 2, top + int(height * 0.8))
    cv2.putText(
        screen,
        text,
        origin,
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        colour,
        max(1, round(2 * scale)),
        cv2.LINE_AA,
    )


def _draw_code(
    screen: Image,
    matrix: npt.NDArray[np.bool_],
    origin: tuple[int, int],
    box: int,
    colour: str | None,
    dark_mode: bool,
) -> None:
    """Draw matrix centred in a square box whose margin is at least the quiet zone."""
    x0, y0 = origin
    if colour is not None:
        dark, light = MODULE_COLOURS[colour], SCREEN_LIGHT
    elif dark_mode:
        dark, light = MODULE_DARK_MODE, SCREEN_DARK
    else:
        dark, light = MODULE_LIGHT_MODE, SCREEN_LIGHT
    region = screen[y0 : y0 + box, x0 : x0 + box]
    region[:] = light
    modules = np.kron(matrix, np.ones((DESIGN_MODULE_PX, DESIGN_MODULE_PX), dtype=bool))
    offset = (box - modules.shape[0]) // 2
    target = region[offset : offset + modules.shape[0], offset : offset + modules.shape[1]]
    target[modules] = dark


def _draw_filler(screen: Image, top: int, dark_mode: bool) -> None:
    """Draw grey bars where an app shows status text and buttons below a single code."""
    height, width = screen.shape[:2]
    colour = (60, 60, 60) if dark_mode else (215, 215, 215)
    bar = max(4, width // 14)
    for index in range(4):
        y = top + bar + index * 2 * bar
        if y + bar >= height - bar:
            break
        right = width - width // 8 - (index % 2) * width // 5
        cv2.rectangle(screen, (width // 8, y), (right, y + bar), colour, -1)


def _add_glare(screen: Image, strength: float, rng: np.random.Generator) -> Image:
    """Blend a soft, elongated bright streak into the screen.

    The streak's peak blends 85% of strength towards white, so at strength 0.5
    a black module under the peak becomes about 110 of 255 and stays darker
    than the white modules around it.
    """
    height, width = screen.shape[:2]
    # The streak is smooth, so compute it on a 4x coarser grid and upsample.
    grid_height, grid_width = max(2, height // 4), max(2, width // 4)
    ys, xs = np.mgrid[0:grid_height, 0:grid_width].astype(np.float32)
    ys *= height / grid_height
    xs *= width / grid_width
    centre_x = rng.uniform(0.25, 0.75) * width
    centre_y = rng.uniform(0.2, 0.8) * height
    angle = math.radians(rng.uniform(25, 65))
    along = (xs - centre_x) * math.cos(angle) + (ys - centre_y) * math.sin(angle)
    across = -(xs - centre_x) * math.sin(angle) + (ys - centre_y) * math.cos(angle)
    sigma_along, sigma_across = 0.6 * width, 0.18 * width
    coarse = (
        0.85 * strength * np.exp(-0.5 * ((along / sigma_along) ** 2 + (across / sigma_across) ** 2))
    )
    weight = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    light = screen.astype(np.float32)
    glared = light + (255.0 - light) * weight[:, :, None]
    result: Image = np.clip(glared, 0, 255).astype(np.uint8)
    return result


def _draw_body(screen: Image, side: int, top: int) -> Image:
    """Put the screen into a dark rounded body and return BGRA with an anti-aliased alpha."""
    screen_height, screen_width = screen.shape[:2]
    width, height = screen_width + 2 * side, screen_height + 2 * top
    phone = np.zeros((height, width, 4), np.uint8)
    phone[:, :, :3] = PHONE_BODY
    phone[top : top + screen_height, side : side + screen_width, :3] = screen

    alpha = np.zeros((height, width), np.uint8)
    radius = round(0.12 * width)
    _fill_rounded_rectangle(alpha, (0, 0, width - 1, height - 1), radius)
    phone[:, :, 3] = alpha
    # Speaker slot in the top bezel.
    slot_y = top // 2
    cv2.line(
        phone,
        (width // 2 - width // 10, slot_y),
        (width // 2 + width // 10, slot_y),
        (70, 70, 70, 255),
        max(2, top // 8),
    )
    return phone


def _fill_rounded_rectangle(mask: Image, box: tuple[int, int, int, int], radius: int) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(mask, (x0 + radius, y0), (x1 - radius, y1), 255, -1)
    cv2.rectangle(mask, (x0, y0 + radius), (x1, y1 - radius), 255, -1)
    for x, y in (
        (x0 + radius, y0 + radius),
        (x1 - radius, y0 + radius),
        (x0 + radius, y1 - radius),
        (x1 - radius, y1 - radius),
    ):
        cv2.circle(mask, (x, y), radius, 255, -1, cv2.LINE_AA)


# Pose and compositing


def _tilt_homography(
    width: int, height: int, perspective: float, direction: float, roll_deg: float
) -> Homography:
    """Map phone image pixels to frame-centred pixels after tilt and roll.

    The phone turns by perspective * MAX_TILT_DEG about an in-plane axis at
    angle direction (radians), seen by a pinhole camera CAMERA_DISTANCE phone
    heights away. Scale at the phone centre stays 1.
    """
    half = np.array([width / 2, height / 2])
    source = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    plane = np.column_stack([source - half, np.zeros(4)])
    axis = np.array([math.cos(direction), math.sin(direction), 0.0])
    rotation, _ = cv2.Rodrigues(axis * math.radians(perspective * MAX_TILT_DEG))
    rotated = plane @ np.asarray(rotation).T
    distance = CAMERA_DISTANCE * max(width, height)
    projected = distance * rotated[:, :2] / (distance + rotated[:, 2:3])
    roll = math.radians(-roll_deg)  # Image y points down, so negate for counterclockwise.
    roll_matrix = np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
    target = projected @ roll_matrix.T
    homography = cv2.getPerspectiveTransform(source.astype(np.float32), target.astype(np.float32))
    return np.asarray(homography, np.float64)


def _apply(homography: Homography, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    mapped = cv2.perspectiveTransform(points.reshape(-1, 1, 2), homography)
    return np.asarray(mapped, np.float64).reshape(-1, 2)


def _place_presentation(
    presentation: Presentation, background: Image, rng: np.random.Generator
) -> _Placement:
    """Scale and pose the phone for the frame and draw the person behind it."""
    effects = presentation.effects
    phone = _render_phone(presentation.codes, effects, rng)
    frame_height, frame_width = background.shape[:2]
    phone_height, phone_width = phone.image.shape[:2]
    tilt = _tilt_homography(
        phone_width,
        phone_height,
        effects.perspective,
        rng.uniform(0, 2 * math.pi),
        effects.rotation_deg,
    )

    x0, y0, x1, y1 = phone.content_box
    content = _apply(tilt, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
    extent = content.max(axis=0) - content.min(axis=0)
    modules_px = phone.module_count * DESIGN_MODULE_PX
    scale = min(
        FIT_FRACTION * frame_width / extent[0],
        FIT_FRACTION * frame_height / extent[1],
        MAX_CODE_FRACTION * frame_height / modules_px,
    )
    # NOTE: nothing rejects a frame so small that modules fall under about
    # 2 px, which no decoder reads.
    slack = max(0.0, (FIT_FRACTION * frame_width - scale * extent[0]) / 2)
    centre = np.array([frame_width / 2 + rng.uniform(-0.6, 0.6) * slack, frame_height / 2])
    shift = centre - scale * (content.min(axis=0) + content.max(axis=0)) / 2
    placement = np.array([[scale, 0, shift[0]], [0, scale, shift[1]], [0, 0, 1]]) @ tilt

    # Scale the phone image down once with area averaging, so the per-frame warp
    # stays near 1:1 and does not alias the modules. Blur is applied here once
    # too, because a per-frame filter on the whole phone region costs more than
    # encoding the frame.
    small = np.asarray(
        cv2.resize(phone.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), np.uint8
    )
    ratio = np.diag([phone_width / small.shape[1], phone_height / small.shape[0], 1.0])
    kernel = _blur_kernel(effects.blur, scale, rng)
    if kernel is not None:
        small, padding = _blur_phone(small, kernel)
        ratio = ratio @ np.array([[1, 0, -padding], [0, 1, -padding], [0, 0, 1]], np.float64)

    with_person = background.copy()
    _draw_person(with_person, int(centre[0]), rng)
    return _Placement(
        phone=small,
        homography=placement @ ratio,
        anchor=(float(centre[0]), float(centre[1])),
        background=with_person,
        motion=rng.uniform(0, 2 * math.pi, 4),
    )


def _blur_phone(phone: Image, kernel: npt.NDArray[np.float32]) -> tuple[Image, int]:
    """Blur a BGRA phone image and return it with the padding added on each side.

    Colour is blurred premultiplied by alpha, so the dark body edge fades into
    transparency instead of into black.
    """
    padding = kernel.shape[0] // 2 + 1
    padded = cv2.copyMakeBorder(
        phone, padding, padding, padding, padding, cv2.BORDER_CONSTANT, value=0
    )
    alpha = padded[:, :, 3:].astype(np.float32) / 255
    premultiplied = np.concatenate([padded[:, :, :3] * alpha, alpha * 255], axis=2)
    blurred = cv2.filter2D(premultiplied, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    blurred_alpha = blurred[:, :, 3:] / 255
    colour = blurred[:, :, :3] / np.maximum(blurred_alpha, 1e-6)
    result: Image = np.clip(np.concatenate([colour, blurred[:, :, 3:]], axis=2), 0, 255).astype(
        np.uint8
    )
    return result, padding


def _blur_kernel(
    blur: float, scale: float, rng: np.random.Generator
) -> npt.NDArray[np.float32] | None:
    """Build a motion-plus-defocus kernel: a line of up to 7 px smoothed by a Gaussian.

    Lengths are in frame pixels for a 4.5 px module, scaled with the phone.
    """
    if blur <= 0:
        return None
    module_px = scale * DESIGN_MODULE_PX
    length = 7.0 * blur * module_px / 4.5
    sigma = max(0.3, 2.0 * blur * module_px / 4.5)
    radius = math.ceil(length / 2 + 3 * sigma)
    size = 2 * radius + 1
    kernel = np.zeros((size, size), np.float32)
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    cv2.line(
        kernel,
        (round((radius - dx) * 16), round((radius - dy) * 16)),
        (round((radius + dx) * 16), round((radius + dy) * 16)),
        1.0,
        1,
        cv2.LINE_AA,
        4,
    )
    kernel = np.asarray(cv2.GaussianBlur(kernel, (size, size), sigma), np.float32)
    total = float(kernel.sum())
    if total <= 0:
        return None
    normalised: npt.NDArray[np.float32] = (kernel / total).astype(np.float32)
    return normalised


def _frame_homography(placement: _Placement, time_s: float) -> Homography:
    """Add a few pixels of drift, a small scale change and roll jitter at time_s."""
    phases = placement.motion
    dx = DRIFT_PX * math.sin(2 * math.pi * 0.5 * time_s + phases[0]) - DRIFT_PX * math.sin(
        phases[0]
    )
    dy = DRIFT_PX * math.sin(2 * math.pi * 0.35 * time_s + phases[1]) - DRIFT_PX * math.sin(
        phases[1]
    )
    scale = 1 + SCALE_WOBBLE * (
        math.sin(2 * math.pi * 0.4 * time_s + phases[2]) - math.sin(phases[2])
    )
    roll = math.radians(
        ROLL_WOBBLE_DEG * (math.sin(2 * math.pi * 0.3 * time_s + phases[3]) - math.sin(phases[3]))
    )
    cx, cy = placement.anchor
    cos, sin = scale * math.cos(roll), scale * math.sin(roll)
    wobble = np.array(
        [
            [cos, -sin, cx + dx - cos * cx + sin * cy],
            [sin, cos, cy + dy - sin * cx - cos * cy],
            [0, 0, 1],
        ]
    )
    homography: Homography = wobble @ placement.homography
    return homography


def _render_frame(placement: _Placement, time_s: float) -> Image:
    """Composite the phone, posed for time_s, over the background."""
    frame = placement.background.copy()
    frame_height, frame_width = frame.shape[:2]
    homography = _frame_homography(placement, time_s)
    phone_height, phone_width = placement.phone.shape[:2]
    corners = _apply(
        homography,
        np.array(
            [[0, 0], [phone_width, 0], [phone_width, phone_height], [0, phone_height]], np.float64
        ),
    )
    x0 = max(0, math.floor(corners[:, 0].min()))
    y0 = max(0, math.floor(corners[:, 1].min()))
    x1 = min(frame_width, math.ceil(corners[:, 0].max()) + 1)
    y1 = min(frame_height, math.ceil(corners[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return frame

    to_region = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ homography
    warped = cv2.warpPerspective(
        placement.phone,
        to_region,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0, 0),
    )
    alpha = warped[:, :, 3].astype(np.float32) / 255
    region = frame[y0:y1, x0:x1]
    composite = cv2.blendLinear(np.ascontiguousarray(warped[:, :, :3]), region, alpha, 1 - alpha)
    frame[y0:y1, x0:x1] = composite
    return frame
