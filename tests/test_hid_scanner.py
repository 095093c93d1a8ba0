"""Keyboard-wedge scanner source: key event assembly, layout errors, devices and reconnects.

The recordings in tests/data/hid/*.json are key event sequences as a scanner sends them:
``events`` lists ``[timestamp_s, key_name, value]`` with value 1 for key-down, 0 for key-up
and 2 for autorepeat. ``poll_at`` lists the times at which the test calls ``poll`` after the
last event, and ``expected`` lists the reads in order, each ``{"payload": text}`` or
``{"read_error": reason, "detail_contains": text}``. The generator below wrote them. To write
them again after changing a recording's definition, run from the repository root:

    PYTHONPATH=. .venv/bin/python tests/test_hid_scanner.py --write-recordings
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from evdev import DeviceInfo
from evdev import ecodes as e
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from drivers.hid_scanner import (
    AssembledRead,
    DeviceMatch,
    DeviceNotFound,
    HidScanner,
    Keystroke,
    ScanAssembler,
    check_layout,
    find_device,
    read_text,
)
from drivers.keymap import FRENCH, GERMAN, US, Layout
from edgenode.codes import Colour, HealthCode, TokenPattern, encode_health, parse_payload
from edgenode.config import HidSourceConfig
from edgenode.reasons import Reason
from edgenode.sources import ReadError, ScanEvent, SourceState

ROOT = Path(__file__).resolve().parent.parent
RECORDINGS_DIR = ROOT / "tests" / "data" / "hid"
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "test-vectors.json").read_text("utf-8"))

VECTOR_CODE: str = VECTORS["valid"][0]["text"]
PLATFORM_URL: str = VECTORS["platform_tokens"][0]["text"]
TOKEN_PATTERNS = tuple(
    TokenPattern(entry["name"], re.compile(entry["regex"]))
    for entry in VECTORS["platform_token_patterns"]
)
URL_WITH_QUERY = "https://jkm.example.gov.cn/c/v2?t=q7nr2vxk9lmp&lang=zh-cn&from=gate/3"

# Kernel event timestamps are Unix seconds with microseconds. Recordings start at this time.
RECORDING_START_S = 1_718_092_800.0
# Scanners type a key press and release in a few milliseconds. This is 2 ms per event.
KEY_EVENT_STEP_S = 0.002
TEST_TIMEOUT_S = 10.0

Event = tuple[float, int, int]


def mint_health_code() -> str:
    """Mint a valid health code with a fresh issuer key."""
    return encode_health(
        SigningKey.generate(),
        subject=bytes(range(16)),
        colour=Colour.GREEN,
        issued_at=1_800_000_000,
        expires_at=1_800_000_300,
    )


# --- Generating key event sequences ---


def keystrokes_for(text: str, layout: Layout, *, numpad_digits: bool = False) -> list[Keystroke]:
    """Return the key presses that type ``text`` on a keyboard set to ``layout``.

    Main keys are preferred, without Shift first. With ``numpad_digits`` digits come from the
    numpad, as scanners set to "numeric keypad" mode send them.
    """
    numpad = {
        e.KEY_KP0,
        e.KEY_KP1,
        e.KEY_KP2,
        e.KEY_KP3,
        e.KEY_KP4,
        e.KEY_KP5,
        e.KEY_KP6,
        e.KEY_KP7,
        e.KEY_KP8,
        e.KEY_KP9,
        e.KEY_KPDOT,
        e.KEY_KPSLASH,
        e.KEY_KPASTERISK,
        e.KEY_KPMINUS,
        e.KEY_KPPLUS,
    }
    keys: dict[str, Keystroke] = {}
    for shift, table in ((False, layout.unshifted), (True, layout.shifted)):
        for code, character in table.items():
            if code not in numpad:
                keys.setdefault(character, Keystroke(code, shift))
    for code in numpad:
        character = layout.unshifted[code]
        if numpad_digits and character.isdigit():
            keys[character] = Keystroke(code, False)
        else:
            keys.setdefault(character, Keystroke(code, False))
    return [keys[character] for character in text]


def type_events(
    keystrokes: Sequence[Keystroke],
    *,
    start: float = RECORDING_START_S,
    step_s: float = KEY_EVENT_STEP_S,
    suffix: int | None = e.KEY_ENTER,
    repeat_every: int = 0,
) -> list[Event]:
    """Return the key events a scanner sends for ``keystrokes`` and an optional suffix key.

    Shift is pressed before and released after each shifted key. With ``repeat_every`` set,
    every n-th key also sends an autorepeat event (value 2) while it is held, and so does
    Shift when held for it.
    """
    events: list[Event] = []

    def send(code: int, value: int) -> None:
        events.append((round(start + len(events) * step_s, 6), code, value))

    presses = list(keystrokes)
    if suffix is not None:
        presses.append(Keystroke(suffix, False))
    for index, keystroke in enumerate(presses, start=1):
        repeat = repeat_every > 0 and index % repeat_every == 0
        if keystroke.shift:
            send(e.KEY_LEFTSHIFT, 1)
            if repeat:
                send(e.KEY_LEFTSHIFT, 2)
        send(keystroke.code, 1)
        if repeat:
            send(keystroke.code, 2)
            send(keystroke.code, 2)
        send(keystroke.code, 0)
        if keystroke.shift:
            send(e.KEY_LEFTSHIFT, 0)
    return events


def key_name(code: int) -> str:
    name = e.KEY[code]
    return name if isinstance(name, str) else name[0]


@dataclass
class Recording:
    """A recorded key event sequence with the reads it must produce."""

    description: str
    events: list[Event]
    expected: list[dict[str, str]]
    poll_at: list[float] = field(default_factory=list)
    inter_key_timeout_ms: int = 100
    max_scan_ms: int = 3_000

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "inter_key_timeout_ms": self.inter_key_timeout_ms,
            "max_scan_ms": self.max_scan_ms,
            "events": [[t, key_name(code), value] for t, code, value in self.events],
            "poll_at": self.poll_at,
            "expected": self.expected,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recording:
        events = [(float(t), e.ecodes[name], int(value)) for t, name, value in data["events"]]
        return cls(
            description=data["description"],
            events=events,
            expected=data["expected"],
            poll_at=[float(t) for t in data["poll_at"]],
            inter_key_timeout_ms=data["inter_key_timeout_ms"],
            max_scan_ms=data["max_scan_ms"],
        )


def _end(events: list[Event]) -> float:
    return events[-1][0]


def build_recordings() -> dict[str, Recording]:
    """Define every recording in tests/data/hid, keyed by file stem."""
    recordings: dict[str, Recording] = {}

    events = type_events(keystrokes_for(VECTOR_CODE, US))
    recordings["us_health_code_enter"] = Recording(
        "Health code from docs/test-vectors.json, US layout, Enter suffix",
        events,
        [{"payload": VECTOR_CODE}],
    )

    events = type_events(keystrokes_for(URL_WITH_QUERY, US))
    recordings["us_url_enter"] = Recording(
        "Lower-case URL with ?, =, & and /, US layout, Enter suffix",
        events,
        [{"payload": URL_WITH_QUERY}],
    )

    events = type_events(keystrokes_for(VECTOR_CODE, US, numpad_digits=True), suffix=e.KEY_KPENTER)
    recordings["us_numpad_digits"] = Recording(
        "Health code with digits from the numpad, numpad Enter suffix",
        events,
        [{"payload": VECTOR_CODE}],
    )

    events = type_events(keystrokes_for(VECTOR_CODE, US), suffix=e.KEY_TAB)
    recordings["us_tab_suffix"] = Recording(
        "Health code, US layout, Tab suffix",
        events,
        [{"payload": VECTOR_CODE}],
    )

    events = type_events(keystrokes_for(PLATFORM_URL, US), suffix=None)
    recordings["us_no_suffix_gap"] = Recording(
        "Platform URL without a suffix key, ended by the 100 ms gap",
        events,
        [{"payload": PLATFORM_URL}],
        poll_at=[_end(events) + 0.05, _end(events) + 0.101],
    )

    # A scanner that stalls mid-code types slowly: 20 ms per event, so no gap ends the read,
    # but the code takes longer than max_scan_ms=500. A short code scanned after a pause must
    # still read normally.
    slow = type_events(keystrokes_for(VECTOR_CODE[:60], US), step_s=0.02)
    after = type_events(keystrokes_for("EN:TEST", US), start=_end(slow) + 1.0)
    recordings["us_cut_off"] = Recording(
        "Code typed slower than max_scan_ms=500 allows, then a short read after a pause",
        slow + after,
        [
            {"read_error": Reason.SCAN_CUT_OFF.value, "detail_contains": "500 ms"},
            {"payload": "EN:TEST"},
        ],
        max_scan_ms=500,
    )

    events = type_events(keystrokes_for(VECTOR_CODE, US), repeat_every=7)
    recordings["us_autorepeat"] = Recording(
        "Health code with autorepeat events on every 7th key and on Shift",
        events,
        [{"payload": VECTOR_CODE}],
    )

    for stem, layout in (("de_health_code", GERMAN), ("fr_health_code", FRENCH)):
        events = type_events(keystrokes_for(VECTOR_CODE, layout))
        recordings[stem] = Recording(
            f"Health code typed by a scanner set to the {layout.name} layout",
            events,
            [
                {
                    "read_error": Reason.SCANNER_LAYOUT_ERROR.value,
                    "detail_contains": f"{layout.name} layout",
                }
            ],
        )
    return recordings


def format_recording(recording: Recording) -> str:
    """Format a recording as JSON with one event per line, so diffs stay readable."""
    data = recording.to_json()
    events = data.pop("events")
    text = json.dumps(data, indent=1)
    lines = ",\n".join(f"  {json.dumps(event)}" for event in events)
    return text[:-2] + f',\n "events": [\n{lines}\n ]\n}}\n'


def write_recordings() -> None:
    RECORDINGS_DIR.mkdir(parents=True, exist_ok=True)
    for stem, recording in build_recordings().items():
        path = RECORDINGS_DIR / f"{stem}.json"
        path.write_text(format_recording(recording), encoding="utf-8")


# --- Assembler ---


def replay(recording: Recording) -> list[AssembledRead]:
    assembler = ScanAssembler(
        inter_key_timeout_ms=recording.inter_key_timeout_ms, max_scan_ms=recording.max_scan_ms
    )
    reads: list[AssembledRead] = []
    for timestamp, code, value in recording.events:
        reads += assembler.feed(code, value, timestamp)
    for now in recording.poll_at:
        reads += assembler.poll(now)
    return reads


def assert_reads_match(reads: list[AssembledRead], expected: list[dict[str, str]]) -> None:
    assert len(reads) == len(expected), f"reads: {reads!r}"
    for read, expected_read in zip(reads, expected, strict=True):
        if "payload" in expected_read:
            assert read == expected_read["payload"].encode("ascii")
        else:
            assert isinstance(read, ReadError), f"expected a read error, got {read!r}"
            assert read.reason == expected_read["read_error"]
            assert expected_read["detail_contains"] in read.detail


RECORDING_PATHS = sorted(RECORDINGS_DIR.glob("*.json"))


def test_recordings_exist_for_every_definition() -> None:
    assert {path.stem for path in RECORDING_PATHS} == set(build_recordings())


@pytest.mark.parametrize("path", RECORDING_PATHS, ids=[path.stem for path in RECORDING_PATHS])
def test_recording_reads_back(path: Path) -> None:
    recording = Recording.from_json(json.loads(path.read_text("utf-8")))

    reads = replay(recording)

    assert_reads_match(reads, recording.expected)


def test_recorded_health_code_parses() -> None:
    path = RECORDINGS_DIR / "us_health_code_enter.json"
    reads = replay(Recording.from_json(json.loads(path.read_text("utf-8"))))

    assert len(reads) == 1
    assert isinstance(reads[0], bytes)
    assert isinstance(parse_payload(reads[0]), HealthCode)


@pytest.mark.parametrize(
    ("suffix", "poll_after_s"),
    [(e.KEY_ENTER, None), (e.KEY_KPENTER, None), (e.KEY_TAB, None), (None, 0.1)],
    ids=["enter", "numpad-enter", "tab", "gap-timeout"],
)
def test_fresh_code_reads_back(suffix: int | None, poll_after_s: float | None) -> None:
    code = mint_health_code()
    events = type_events(keystrokes_for(code, US), suffix=suffix)
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)

    reads: list[AssembledRead] = []
    for timestamp, key, value in events:
        reads += assembler.feed(key, value, timestamp)
    if poll_after_s is not None:
        assert reads == []
        reads += assembler.poll(_end(events) + poll_after_s)

    assert reads == [code.encode("ascii")]
    assert not assembler.in_progress


def test_gap_shorter_than_timeout_keeps_read_open() -> None:
    events = type_events(keystrokes_for("EN:ABC", US), suffix=None)
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    for timestamp, key, value in events:
        assembler.feed(key, value, timestamp)

    assert assembler.poll(_end(events) + 0.099) == []
    assert assembler.in_progress
    assert assembler.poll(_end(events) + 0.100) == [b"EN:ABC"]


def test_two_scans_separated_by_gap() -> None:
    first = type_events(keystrokes_for("EN:FIRST", US), suffix=None)
    second = type_events(keystrokes_for("EN:SECOND", US), start=_end(first) + 0.5)
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)

    reads: list[AssembledRead] = []
    for timestamp, key, value in first + second:
        reads += assembler.feed(key, value, timestamp)

    assert reads == [b"EN:FIRST", b"EN:SECOND"]


def test_cut_off_reported_by_poll() -> None:
    # Key events arrive every 50 ms, within the gap. The first typing key-down (E, after
    # Shift) is at 0.05 s, so the read is cut off once it is still open at 0.25 s.
    events = type_events(keystrokes_for("EN:ABC", US), step_s=0.05, suffix=None)
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=200)
    reads: list[AssembledRead] = []
    start = events[0][0]
    for timestamp, key, value in events[:5]:  # up to Shift down for N, at 0.2 s
        reads += assembler.feed(key, value, timestamp)
    assert assembler.poll(start + 0.24) == []
    reads += assembler.poll(start + 0.26)

    assert len(reads) == 1
    assert isinstance(reads[0], ReadError)
    assert reads[0].reason == Reason.SCAN_CUT_OFF
    assert not assembler.in_progress


def test_keys_after_cut_off_dropped_until_suffix() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=200)
    events = type_events(keystrokes_for("EN:ABCDEFGHIJ", US), step_s=0.03)

    reads: list[AssembledRead] = []
    for timestamp, key, value in events:
        reads += assembler.feed(key, value, timestamp)
    reads += assembler.poll(_end(events) + 1.0)

    assert [type(read) for read in reads] == [ReadError]


def test_key_ups_and_ignored_keys_type_nothing() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    events: list[Event] = [
        (0.000, e.KEY_CAPSLOCK, 1),
        (0.001, e.KEY_CAPSLOCK, 0),
        (0.002, e.KEY_A, 0),
        (0.003, e.KEY_NUMLOCK, 1),
        (0.004, e.KEY_B, 1),
        (0.005, e.KEY_B, 2),
        (0.006, e.KEY_B, 0),
        (0.007, e.KEY_ENTER, 1),
    ]
    reads: list[AssembledRead] = []
    for timestamp, key, value in events:
        reads += assembler.feed(key, value, timestamp)

    assert reads == [b"b"]


def test_shift_tracked_across_both_shift_keys() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    events: list[Event] = [
        (0.000, e.KEY_LEFTSHIFT, 1),
        (0.001, e.KEY_RIGHTSHIFT, 1),
        (0.002, e.KEY_LEFTSHIFT, 0),
        (0.003, e.KEY_A, 1),
        (0.004, e.KEY_RIGHTSHIFT, 0),
        (0.005, e.KEY_A, 1),
        (0.006, e.KEY_ENTER, 1),
    ]
    reads: list[AssembledRead] = []
    for timestamp, key, value in events:
        reads += assembler.feed(key, value, timestamp)

    assert reads == [b"Aa"]


def test_unknown_key_kept_as_replacement_character() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    reads: list[AssembledRead] = []
    for timestamp, key, value in [(0.0, e.KEY_A, 1), (0.001, e.KEY_F5, 1), (0.002, e.KEY_ENTER, 1)]:
        reads += assembler.feed(key, value, timestamp)

    assert reads == ["a\ufffd".encode()]


def test_suffix_alone_is_no_read() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)

    assert assembler.feed(e.KEY_ENTER, 1, 0.0) == []
    assert assembler.poll(1.0) == []


def test_abort_reports_read_in_progress() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    assembler.feed(e.KEY_A, 1, 0.0)

    reads = assembler.abort("device disconnected during a read")

    assert len(reads) == 1
    assert isinstance(reads[0], ReadError)
    assert reads[0].reason == Reason.SCAN_CUT_OFF
    assert assembler.abort("again") == []


def test_non_positive_timeout_rejected() -> None:
    with pytest.raises(ValueError, match="inter_key_timeout_ms=0"):
        ScanAssembler(inter_key_timeout_ms=0, max_scan_ms=3_000)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:", max_size=300))
def test_any_base45_text_reads_back(body: str) -> None:
    text = "EN:" + body
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=30_000)
    reads: list[AssembledRead] = []
    for timestamp, key, value in type_events(keystrokes_for(text, US), start=0.0):
        reads += assembler.feed(key, value, timestamp)

    assert reads == [text.encode("ascii")]


# --- Layout errors ---

LAYOUTS = [GERMAN, FRENCH]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_fresh_code_in_other_layout_is_layout_error(layout: Layout) -> None:
    keystrokes = keystrokes_for(mint_health_code(), layout)

    result = check_layout(keystrokes)

    assert result == ReadError(
        Reason.SCANNER_LAYOUT_ERROR,
        f"scanner appears set to the {layout.name} layout, expected the US layout",
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_url_in_other_layout_is_layout_error(layout: Layout) -> None:
    keystrokes = keystrokes_for(URL_WITH_QUERY, layout)

    result = check_layout(keystrokes)

    assert isinstance(result, ReadError)
    assert result.reason == Reason.SCANNER_LAYOUT_ERROR
    assert layout.name in result.detail


@pytest.mark.parametrize(
    ("layout", "mangled_prefix"),
    [(GERMAN, "EN>"), (FRENCH, "EN.")],
    ids=["German", "French"],
)
def test_other_layout_mangles_us_reading(layout: Layout, mangled_prefix: str) -> None:
    keystrokes = keystrokes_for("EN:0123456789YZ", layout)

    assert read_text(keystrokes, layout) == "EN:0123456789YZ"
    assert read_text(keystrokes, US).startswith(mangled_prefix)


def test_german_reading_swaps_y_and_z() -> None:
    assert read_text(keystrokes_for("YZyz", GERMAN), US) == "ZYzy"


def test_french_digits_read_as_symbols_in_us() -> None:
    assert read_text(keystrokes_for("1234567890", FRENCH), US) == "!@#$%^&*()"


@pytest.mark.parametrize(
    ("text", "token_patterns"),
    [
        (VECTOR_CODE, ()),
        (PLATFORM_URL, TOKEN_PATTERNS),
        (PLATFORM_URL, ()),
        (URL_WITH_QUERY, ()),
        ("HELLO WORLD", ()),
        ("EN:not base45", ()),
    ],
    ids=["code", "token-url", "url-no-patterns", "url-query", "plain-text", "bad-base45"],
)
def test_us_reading_passed_on_as_payload(
    text: str, token_patterns: tuple[TokenPattern, ...]
) -> None:
    result = check_layout(keystrokes_for(text, US), token_patterns)

    assert result == text.encode("ascii")


def test_recorded_layout_error_from_assembler() -> None:
    assembler = ScanAssembler(inter_key_timeout_ms=100, max_scan_ms=3_000)
    reads: list[AssembledRead] = []
    for timestamp, key, value in type_events(keystrokes_for(VECTOR_CODE, GERMAN)):
        reads += assembler.feed(key, value, timestamp)

    assert len(reads) == 1
    assert isinstance(reads[0], ReadError)
    assert reads[0].reason == Reason.SCANNER_LAYOUT_ERROR


# --- Fake devices ---


class FakeEvent:
    def __init__(self, type_: int, code: int, value: int) -> None:
        self.type = type_
        self.code = code
        self.value = value


UNPLUG = OSError(errno.ENODEV, "No such device")


class FakeDevice:
    """An input device whose events the test queues. Queue ``UNPLUG`` to unplug it."""

    def __init__(
        self,
        path: str,
        name: str,
        vendor: int,
        product: int,
        *,
        keyboard: bool = True,
        grab_error: OSError | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self.info = DeviceInfo(bustype=3, vendor=vendor, product=product, version=1)
        self.keyboard = keyboard
        self.grab_error = grab_error
        self.queue: asyncio.Queue[FakeEvent | OSError] = asyncio.Queue()
        self.grabbed = False
        self.closed = False
        self.calls: list[str] = []

    def capabilities(self) -> dict[int, list[int]]:
        keys = [e.KEY_A, e.KEY_ENTER] if self.keyboard else [e.KEY_VOLUMEUP]
        return {e.EV_SYN: [0], e.EV_KEY: keys}

    def grab(self) -> None:
        self.calls.append("grab")
        if self.grab_error is not None:
            raise self.grab_error
        self.grabbed = True

    def ungrab(self) -> None:
        self.calls.append("ungrab")
        self.grabbed = False

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    async def async_read_loop(self) -> AsyncIterator[FakeEvent]:
        while True:
            item = await self.queue.get()
            if isinstance(item, OSError):
                raise item
            yield item

    def type_text(self, text: str, *, suffix: int | None = e.KEY_ENTER) -> None:
        for _, code, value in type_events(keystrokes_for(text, US), suffix=suffix):
            self.queue.put_nowait(FakeEvent(e.EV_KEY, code, value))
            self.queue.put_nowait(FakeEvent(e.EV_SYN, 0, 0))


class FakeInput:
    """A fake /dev/input: the devices plugged in now, opened by path."""

    def __init__(self, *devices: FakeDevice) -> None:
        self.devices = {device.path: device for device in devices}
        self.list_calls = 0

    def list_devices(self) -> list[str]:
        self.list_calls += 1
        return list(self.devices)

    def open_device(self, path: str) -> FakeDevice:
        device = self.devices.get(path)
        if device is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        # Opening again after a close gives a fresh handle, as the kernel does.
        device.closed = False
        return device

    def plug(self, device: FakeDevice) -> None:
        self.devices[device.path] = device

    def unplug(self, device: FakeDevice) -> None:
        del self.devices[device.path]
        device.queue.put_nowait(UNPLUG)


SCANNER_VID, SCANNER_PID = 0x0C2E, 0x0B61
SCANNER_NAME = "Honeywell Imaging & Mobility 1900"


def scanner(path: str = "/dev/input/event7", **kwargs: Any) -> FakeDevice:
    return FakeDevice(path, SCANNER_NAME, SCANNER_VID, SCANNER_PID, **kwargs)


def guard_keyboard(path: str = "/dev/input/event3") -> FakeDevice:
    return FakeDevice(path, "Dell KB216 Wired Keyboard", 0x413C, 0x2113)


def hid_config(**overrides: Any) -> HidSourceConfig:
    values: dict[str, Any] = {"type": "hid", "name": "gate-scanner", "vid_pid": "0c2e:0b61"}
    values.update(overrides)
    return HidSourceConfig(**values)


def make_scanner(
    config: HidSourceConfig, fake_input: FakeInput, **kwargs: Any
) -> tuple[HidScanner, list[ScanEvent]]:
    events: list[ScanEvent] = []
    source = HidScanner(
        config,
        list_devices=fake_input.list_devices,
        open_device=fake_input.open_device,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        **kwargs,
    )
    return source, events


async def wait_until(
    condition: Callable[[], bool], description: str, timeout_s: float = 5.0
) -> None:
    """Wait until ``condition()`` is true, polling every 5 ms, or fail naming ``description``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {description}")
        await asyncio.sleep(0.005)


def run_bounded(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), timeout=TEST_TIMEOUT_S)

    asyncio.run(bounded())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- Device selection ---


@pytest.mark.parametrize(
    ("config", "expected_path"),
    [
        (hid_config(), "/dev/input/event7"),
        (hid_config(vid_pid=None, device_name=SCANNER_NAME), "/dev/input/event7"),
        (hid_config(device_name=SCANNER_NAME), "/dev/input/event7"),
        (hid_config(vid_pid="0C2E:0B61"), "/dev/input/event7"),
    ],
    ids=["vid-pid", "name", "vid-pid-and-name", "upper-case-vid-pid"],
)
def test_find_device_picks_configured_scanner(config: HidSourceConfig, expected_path: str) -> None:
    keyboard = guard_keyboard()
    fake_input = FakeInput(keyboard, scanner())

    device = find_device(
        DeviceMatch.from_config(config), fake_input.list_devices, fake_input.open_device
    )

    assert device.path == expected_path
    assert keyboard.closed


@pytest.mark.parametrize(
    "config",
    [
        hid_config(vid_pid="0c2e:0b62"),
        hid_config(vid_pid=None, device_name="Honeywell"),
        hid_config(device_name="Other Scanner"),
    ],
    ids=["other-pid", "partial-name", "vid-pid-right-name-wrong"],
)
def test_find_device_never_takes_other_keyboard(config: HidSourceConfig) -> None:
    fake_input = FakeInput(guard_keyboard(), scanner())

    with pytest.raises(DeviceNotFound, match="no keyboard input device matches"):
        find_device(
            DeviceMatch.from_config(config), fake_input.list_devices, fake_input.open_device
        )


def test_find_device_skips_interface_without_enter() -> None:
    consumer_control = scanner("/dev/input/event5", keyboard=False)
    keyboard_interface = scanner("/dev/input/event12")
    fake_input = FakeInput(keyboard_interface, consumer_control)

    device = find_device(
        DeviceMatch.from_config(hid_config()), fake_input.list_devices, fake_input.open_device
    )

    assert device is keyboard_interface
    assert consumer_control.closed


def test_find_device_orders_by_event_number() -> None:
    fake_input = FakeInput(scanner("/dev/input/event10"), scanner("/dev/input/event2"))

    device = find_device(
        DeviceMatch.from_config(hid_config()), fake_input.list_devices, fake_input.open_device
    )

    assert device.path == "/dev/input/event2"


def test_find_device_error_names_unreadable_devices() -> None:
    fake_input = FakeInput()

    def list_devices() -> list[str]:
        return ["/dev/input/event0", "/dev/input/event1"]

    with pytest.raises(DeviceNotFound) as raised:
        find_device(DeviceMatch.from_config(hid_config()), list_devices, fake_input.open_device)

    message = str(raised.value)
    assert "vid_pid=0c2e:0b61" in message
    assert "2 devices could not be opened" in message
    assert "'input' group" in message


def test_missing_device_is_disconnected_and_retried() -> None:
    async def scenario() -> None:
        fake_input = FakeInput(guard_keyboard())
        source, events = make_scanner(hid_config(), fake_input)
        task = asyncio.create_task(source.run(events.append))

        await wait_until(lambda: fake_input.list_calls >= 3, "three device searches")
        assert source.status.state == SourceState.DISCONNECTED
        assert "no keyboard input device matches vid_pid=0c2e:0b61" in source.status.last_error

        device = scanner()
        fake_input.plug(device)
        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")
        assert source.status.device == device.path
        assert source.status.last_error == ""
        assert device.grabbed

        await stop(task)

    run_bounded(scenario)


# --- The source with fake devices ---


def test_scan_emitted_as_payload() -> None:
    async def scenario() -> None:
        device = scanner()
        fake_input = FakeInput(guard_keyboard(), device)
        source, events = make_scanner(hid_config(), fake_input)
        task = asyncio.create_task(source.run(events.append))

        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")
        code = mint_health_code()
        device.type_text(code)
        await wait_until(lambda: len(events) == 1, "one scan event")

        assert events[0].source == "gate-scanner"
        assert events[0].payloads == (code.encode("ascii"),)
        assert events[0].read_error is None
        assert source.status.reads == 1
        assert device.calls == ["grab"]

        await stop(task)
        assert device.calls == ["grab", "ungrab", "close"]
        assert source.status.state == SourceState.STOPPED

    run_bounded(scenario)


def test_scan_without_suffix_ends_by_poll_timer() -> None:
    async def scenario() -> None:
        device = scanner()
        source, events = make_scanner(hid_config(inter_key_timeout_ms=50), FakeInput(device))
        task = asyncio.create_task(source.run(events.append))

        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")
        device.type_text(PLATFORM_URL, suffix=None)
        await wait_until(lambda: len(events) == 1, "one scan event")

        assert events[0].payloads == (PLATFORM_URL.encode("ascii"),)
        await stop(task)

    run_bounded(scenario)


def test_layout_error_emitted_as_read_error() -> None:
    async def scenario() -> None:
        device = scanner()
        source, events = make_scanner(hid_config(), FakeInput(device))
        task = asyncio.create_task(source.run(events.append))
        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")

        with structlog.testing.capture_logs() as logs:
            for _, code, value in type_events(keystrokes_for(VECTOR_CODE, FRENCH)):
                device.queue.put_nowait(FakeEvent(e.EV_KEY, code, value))
            await wait_until(lambda: len(events) == 1, "one scan event")

        assert events[0].payloads == ()
        assert events[0].read_error is not None
        assert events[0].read_error.reason == Reason.SCANNER_LAYOUT_ERROR
        assert "French" in events[0].read_error.detail
        assert source.status.read_errors == 1
        assert [entry["event"] for entry in logs] == ["scanner_layout_error"]
        await stop(task)

    run_bounded(scenario)


def test_grab_disabled_leaves_device_ungrabbed() -> None:
    async def scenario() -> None:
        device = scanner()
        source, events = make_scanner(hid_config(grab=False), FakeInput(device))
        task = asyncio.create_task(source.run(events.append))

        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")
        await stop(task)

        assert device.calls == ["close"]

    run_bounded(scenario)


def test_busy_device_is_disconnected_with_reason() -> None:
    async def scenario() -> None:
        device = scanner(grab_error=OSError(errno.EBUSY, "Device or resource busy"))
        fake_input = FakeInput(device)
        source, events = make_scanner(hid_config(), fake_input)
        task = asyncio.create_task(source.run(events.append))

        await wait_until(lambda: fake_input.list_calls >= 2, "two connection attempts")
        assert source.status.state == SourceState.DISCONNECTED
        assert "another program has grabbed it" in source.status.last_error
        assert device.closed

        await stop(task)

    run_bounded(scenario)


def test_unplug_and_replug_reconnects() -> None:
    async def scenario() -> None:
        first = scanner("/dev/input/event7")
        fake_input = FakeInput(guard_keyboard(), first)
        source, events = make_scanner(hid_config(), fake_input)
        task = asyncio.create_task(source.run(events.append))
        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")

        code = mint_health_code()
        with structlog.testing.capture_logs() as logs:
            # Unplugged halfway through a scan: the partial read is reported as cut off.
            for _, key, value in type_events(keystrokes_for(code[:20], US), suffix=None):
                first.queue.put_nowait(FakeEvent(e.EV_KEY, key, value))
            fake_input.unplug(first)
            await wait_until(
                lambda: source.status.state == SourceState.DISCONNECTED, "disconnection"
            )

        disconnected = [entry for entry in logs if entry["event"] == "source_disconnected"]
        assert len(disconnected) == 1
        assert disconnected[0]["source"] == "gate-scanner"
        assert disconnected[0]["device"] == "/dev/input/event7"
        assert "No such device" in disconnected[0]["error"]
        assert all(code[:10] not in repr(entry) for entry in logs)
        assert first.calls == ["grab", "ungrab", "close"]
        assert len(events) == 1
        assert events[0].read_error is not None
        assert events[0].read_error.reason == Reason.SCAN_CUT_OFF

        # The scanner comes back on a new event node, as after a real replug.
        second = scanner("/dev/input/event8")
        fake_input.plug(second)
        await wait_until(lambda: source.status.state == SourceState.CONNECTED, "reconnection")
        assert source.status.device == "/dev/input/event8"
        assert source.status.reconnects == 1
        assert second.grabbed

        second.type_text(code)
        await wait_until(lambda: len(events) == 2, "a scan after the replug")
        assert events[1].payloads == (code.encode("ascii"),)

        await stop(task)

    run_bounded(scenario)


def test_backoff_is_capped_full_jitter() -> None:
    class MaxRandom(random.Random):
        def uniform(self, a: float, b: float) -> float:
            assert a == 0
            return b

    source = HidScanner(hid_config(), backoff_initial_s=0.25, backoff_max_s=5.0, rng=MaxRandom())

    bounds = [source._backoff_delay(failures) for failures in range(1, 9)]

    assert bounds == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


# --- Through the kernel with uinput ---

UINPUT_AVAILABLE = os.access("/dev/uinput", os.R_OK | os.W_OK)
needs_uinput = pytest.mark.skipif(not UINPUT_AVAILABLE, reason="/dev/uinput not available")

UINPUT_VID, UINPUT_PID = 0xF0E1, 0xA5A5


def create_virtual_scanner(name: str) -> Any:
    from evdev import UInput

    keys = sorted(set(US.unshifted) | {e.KEY_LEFTSHIFT, e.KEY_ENTER, e.KEY_TAB, e.KEY_KPENTER})
    return UInput({e.EV_KEY: keys}, name=name, vendor=UINPUT_VID, product=UINPUT_PID)


def type_on_uinput(uinput: Any, text: str) -> None:
    for _, code, value in type_events(keystrokes_for(text, US)):
        uinput.write(e.EV_KEY, code, value)
        uinput.syn()


@needs_uinput
@pytest.mark.parametrize(
    "match",
    [{"vid_pid": f"{UINPUT_VID:04x}:{UINPUT_PID:04x}"}, {"vid_pid": None}],
    ids=["by-vid-pid", "by-name"],
)
def test_uinput_scan_unplug_replug(match: dict[str, Any]) -> None:
    name = f"edgenode test scanner {os.getpid()}"
    config = hid_config(device_name=name, **match)

    async def scenario() -> None:
        events: list[ScanEvent] = []
        source = HidScanner(config, backoff_initial_s=0.05, backoff_max_s=0.2)
        uinput = create_virtual_scanner(name)
        task = asyncio.create_task(source.run(events.append))
        try:
            await wait_until(lambda: source.status.state == SourceState.CONNECTED, "connection")
            code = mint_health_code()
            type_on_uinput(uinput, code)
            await wait_until(lambda: len(events) == 1, "one scan event")
            assert events[0].payloads == (code.encode("ascii"),)

            uinput.close()
            await wait_until(
                lambda: source.status.state == SourceState.DISCONNECTED, "disconnection"
            )

            uinput = create_virtual_scanner(name)
            await wait_until(lambda: source.status.state == SourceState.CONNECTED, "replug")
            assert source.status.reconnects == 1
            type_on_uinput(uinput, code)
            await wait_until(lambda: len(events) == 2, "a scan after the replug")
            assert events[1].payloads == (code.encode("ascii"),)
        finally:
            await stop(task)
            uinput.close()

    run_bounded(scenario)


def _write_recordings_main(argv: Iterable[str]) -> int:
    if list(argv) != ["--write-recordings"]:
        print(__doc__)
        return 2
    write_recordings()
    print(f"wrote {len(build_recordings())} recordings to {RECORDINGS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(_write_recordings_main(sys.argv[1:]))
