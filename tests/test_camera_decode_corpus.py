"""The camera's decode path on the shared QR photo corpus, turned and inverted.

Every frame goes through `drivers.camera.decode_region`, the function the camera's decode
worker calls, with no region of interest. The corpus folder is `<repo>/../shared/corpus/qr`,
or the path in EDGENODE_CORPUS. Each `qrcode-N/<stem>.<png|jpg|webp>` has its expected text
in `<stem>.txt` (UTF-8, newlines kept as stored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from drivers.camera import decode_region
from drivers.files import SourceError, read_image
from edgenode.decoders import Decoder, Frame, create_decoder
from edgenode.demo.render import Effects, render_phone_photo

pytestmark = pytest.mark.slow

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXPECTED_IMAGE_COUNT = 253
# Measured with zxing-cpp 3.1.1 and OpenCV 5.1 when these floors were set: 238 photos read
# as they are, 238 inverted, 239 turned by 90 degrees, 238 by 180 and 238 by 270.
MIN_MATCHES = {
    "as-is": 235,
    "inverted": 235,
    "rotated-90": 235,
    "rotated-180": 235,
    "rotated-270": 235,
}
# `qrcode-2/16.*` is a QR code nested inside another one. The zxing copy expects the outer
# text and the zxing-cpp copy the inner text, so both texts are correct readings of it.
NESTED_CODE_STEMS = ("zxing/qrcode-2/16", "zxing-cpp/qrcode-2/16")

VARIANTS: dict[str, Callable[[Frame], Frame]] = {
    "as-is": lambda frame: frame,
    "inverted": lambda frame: np.asarray(255 - frame, dtype=np.uint8),
    "rotated-90": lambda frame: np.asarray(cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)),
    "rotated-180": lambda frame: np.asarray(cv2.rotate(frame, cv2.ROTATE_180)),
    "rotated-270": lambda frame: np.asarray(cv2.rotate(frame, cv2.ROTATE_90_COUNTERCLOCKWISE)),
}


def corpus_root() -> Path:
    override = os.environ.get("EDGENODE_CORPUS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "qr"


@dataclass(frozen=True)
class CorpusImage:
    name: str  # path relative to the corpus root, with "/" separators
    frame: Frame
    expected: str
    # Texts that count as correct: the expected text, plus the other reading of a nested code.
    accepted: frozenset[str]


@dataclass
class VariantRun:
    matched: list[str]
    missed: list[str]
    wrong: list[tuple[str, str | None]]  # (image, text) for text that is not accepted


def iter_expected_images(root: Path) -> Iterator[tuple[Path, str]]:
    for folder in sorted(root.glob("*/qrcode-*")):
        for path in sorted(folder.iterdir()):
            expected_path = path.with_suffix(".txt")
            if path.suffix.lower() in IMAGE_SUFFIXES and expected_path.is_file():
                yield path, expected_path.read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def root() -> Path:
    path = corpus_root()
    if not path.is_dir():
        pytest.skip(f"QR corpus not found at {path}; set EDGENODE_CORPUS to its folder")
    return path


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return create_decoder("zxing")


@pytest.fixture(scope="module")
def corpus(root: Path) -> list[CorpusImage]:
    pairs = list(iter_expected_images(root))
    stems = {path.relative_to(root).with_suffix("").as_posix(): text for path, text in pairs}
    nested_texts = frozenset(stems[stem] for stem in NESTED_CODE_STEMS if stem in stems)

    images = []
    for path, expected in pairs:
        relative = path.relative_to(root)
        accepted = {expected}
        if relative.with_suffix("").as_posix() in NESTED_CODE_STEMS:
            accepted |= nested_texts
        images.append(
            CorpusImage(relative.as_posix(), read_image(path), expected, frozenset(accepted))
        )
    return images


def run_variant(decoder: Decoder, images: list[CorpusImage], variant: str) -> VariantRun:
    transform = VARIANTS[variant]
    run = VariantRun(matched=[], missed=[], wrong=[])
    for image in images:
        texts = [symbol.text for symbol in decode_region(decoder, transform(image.frame), None)]
        if image.expected in texts:
            run.matched.append(image.name)
        else:
            run.missed.append(image.name)
        run.wrong.extend((image.name, text) for text in texts if text not in image.accepted)
    return run


def test_corpus_has_expected_image_count(corpus: list[CorpusImage]) -> None:
    assert len(corpus) == EXPECTED_IMAGE_COUNT


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_camera_path_reads_corpus(
    decoder: Decoder, corpus: list[CorpusImage], variant: str
) -> None:
    run = run_variant(decoder, corpus, variant)
    assert run.wrong == []
    assert len(run.matched) >= MIN_MATCHES[variant], f"missed: {run.missed}"


@pytest.mark.parametrize(
    "image_name", ["zxing/multi-qrcode-1/1.png", "zxing-cpp/multi-1/multi-qr.png"]
)
def test_camera_path_reads_all_four_codes(root: Path, decoder: Decoder, image_name: str) -> None:
    data = json.loads((root / "multi-expected.json").read_text(encoding="utf-8"))
    expected = data[image_name]
    symbols = decode_region(decoder, read_image(root / image_name), None)
    assert len(expected) == 4
    assert sorted(symbol.text or "" for symbol in symbols) == sorted(expected)


def test_camera_path_finds_nothing_in_photos_without_code(root: Path, decoder: Decoder) -> None:
    found = {}
    decoded_count = 0
    paths = sorted(
        path for path in root.glob("*/falsepositives-*/*") if path.suffix.lower() in IMAGE_SUFFIXES
    )
    for path in paths:
        try:
            frame = read_image(path)
        except SourceError:
            continue  # OpenCV rejects the WebP samples shorter than its 32-byte header
        decoded_count += 1
        symbols = decode_region(decoder, frame, None)
        if symbols:
            found[path.relative_to(root).as_posix()] = [symbol.text for symbol in symbols]

    assert decoded_count >= 40
    assert found == {}


@pytest.mark.parametrize("colour", ["green", "yellow", "red"])
@pytest.mark.parametrize(
    "effects",
    [{}, {"perspective": 0.4, "glare": 0.4, "blur": 0.3}, {"dark_mode": True}],
    ids=["plain", "tilted-glare-blur", "dark-mode"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_coloured_code_on_phone_decodes(
    decoder: Decoder, colour: str, effects: dict[str, object], seed: int
) -> None:
    health = f"EN1:HEALTH-{colour.upper()}-{seed}"
    community = f"EN1:COMMUNITY-{seed}"
    frame = render_phone_photo(
        [health, community],
        Effects(colour=colour, **effects),
        seed=seed,  # type: ignore[arg-type]
    )
    symbols = decode_region(decoder, frame, None)
    assert {symbol.data for symbol in symbols} == {health.encode(), community.encode()}
