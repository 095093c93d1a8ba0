"""USB keyboard-wedge (HID) scanner source, read through evdev.

A keyboard-wedge scanner types each code it reads as key presses, usually followed by Enter.
``ScanAssembler`` turns key events into reads and has no I/O, so recorded event sequences can
test it. ``HidScanner`` finds the configured scanner among the input devices, grabs it so
scans never type into the guard's screen, feeds its events to an assembler and reconnects
after an unplug.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import evdev
import structlog
from evdev import ecodes

from drivers.keymap import IGNORED_KEYS, OTHER_LAYOUTS, SHIFT_KEYS, SUFFIX_KEYS, US, Layout
from edgenode.codes import PREFIX, Rejection, TokenPattern, parse_payload
from edgenode.config import HidSourceConfig
from edgenode.reasons import Reason
from edgenode.sources import Emit, ReadError, ScanEvent, SourceState, SourceStatus

log = structlog.get_logger(__name__)

KEY_DOWN = 1
KEY_UP = 0

# Typed in place of a key that the layout table lacks, so the payload is never silently
# shortened. The parser rejects it as not ASCII.
UNKNOWN_KEY_CHARACTER = "\ufffd"

AssembledRead = bytes | ReadError

# Kernel event timestamps have microsecond resolution, and float seconds since 1970 lose
# about 0.2 µs to rounding, so a gap within 1 µs of the timeout counts as passed.
_TIMESTAMP_RESOLUTION_S = 1e-6


class Keystroke(NamedTuple):
    """One key-down that types: the key code and whether Shift was held."""

    code: int
    shift: bool


# --- Reading key codes as text ---


def read_text(keystrokes: Iterable[Keystroke], layout: Layout) -> str:
    """Return the text that ``keystrokes`` type in ``layout``."""
    characters = []
    for keystroke in keystrokes:
        character = layout.character(keystroke.code, shift=keystroke.shift)
        characters.append(UNKNOWN_KEY_CHARACTER if character is None else character)
    return "".join(characters)


def _plausibility(text: str, token_patterns: Sequence[TokenPattern]) -> int:
    """Rank a reading: 2 if the parser accepts it, 1 if it starts like a payload, else 0."""
    result = parse_payload(text.encode("utf-8"), token_patterns)
    if not isinstance(result, Rejection):
        return 2
    if text.startswith(PREFIX) or text.lower().startswith(("http://", "https://")):
        return 1
    return 0


def check_layout(
    keystrokes: Sequence[Keystroke], token_patterns: Sequence[TokenPattern] = ()
) -> AssembledRead:
    """Return the US reading of a read as a payload, or a layout error.

    A scanner set to another keyboard layout sends the key codes where that layout puts each
    character, so the US reading is mangled. When the US reading is unrecognised or not valid
    base45, the same key codes are read with each of ``OTHER_LAYOUTS``. If one of those
    readings is more plausible than the US reading (see ``_plausibility``), the result is a
    SCANNER_LAYOUT_ERROR naming that layout. Otherwise the US text is the payload.
    """
    text = read_text(keystrokes, US)
    payload = text.encode("utf-8")
    result = parse_payload(payload, token_patterns)
    if not isinstance(result, Rejection):
        return payload
    if result.reason not in (Reason.UNRECOGNISED_PAYLOAD, Reason.BAD_BASE45):
        return payload

    best_layout: Layout | None = None
    best_score = _plausibility(text, token_patterns)
    for layout in OTHER_LAYOUTS:
        score = _plausibility(read_text(keystrokes, layout), token_patterns)
        if score > best_score:
            best_layout, best_score = layout, score
    if best_layout is None:
        return payload
    detail = f"scanner appears set to the {best_layout.name} layout, expected the US layout"
    return ReadError(Reason.SCANNER_LAYOUT_ERROR, detail)


# --- Assembling key events into reads ---


class ScanAssembler:
    """Assemble key events into reads. Pure and synchronous: the caller supplies the time.

    A read starts at its first typing key-down and ends at Enter or Tab, or when ``poll``
    finds no key event for ``inter_key_timeout_ms``. A read still being typed ``max_scan_ms`` after
    its first key is cut off and becomes a SCAN_CUT_OFF error. The keys that follow are
    dropped until the next suffix key or gap, so the rest of that scan is not read as a code.

    Only key-downs type. Key-ups and autorepeats are ignored, except that Shift is tracked
    from LEFTSHIFT and RIGHTSHIFT presses and releases. Timestamps are in seconds, all from
    one clock.
    """

    def __init__(
        self,
        *,
        inter_key_timeout_ms: int,
        max_scan_ms: int,
        token_patterns: Sequence[TokenPattern] = (),
    ) -> None:
        if inter_key_timeout_ms <= 0 or max_scan_ms <= 0:
            raise ValueError(
                f"timeouts must be positive, got inter_key_timeout_ms={inter_key_timeout_ms} "
                f"and max_scan_ms={max_scan_ms}"
            )
        self._gap_s = inter_key_timeout_ms / 1000
        self._max_scan_ms = max_scan_ms
        self._max_scan_s = max_scan_ms / 1000
        self._token_patterns = tuple(token_patterns)
        self._keystrokes: list[Keystroke] = []
        self._shift_keys_down: set[int] = set()
        self._started_at = 0.0
        self._last_key_at = 0.0
        # True after a cut-off, until the rest of that scan has passed.
        self._dropping = False

    @classmethod
    def from_config(
        cls, config: HidSourceConfig, token_patterns: Sequence[TokenPattern] = ()
    ) -> ScanAssembler:
        return cls(
            inter_key_timeout_ms=config.inter_key_timeout_ms,
            max_scan_ms=config.max_scan_ms,
            token_patterns=token_patterns,
        )

    @property
    def in_progress(self) -> bool:
        """Whether a read has started and not yet ended."""
        return bool(self._keystrokes)

    def feed(self, code: int, value: int, timestamp: float) -> list[AssembledRead]:
        """Process one key event and return the reads it completed, oldest first."""
        reads = self.poll(timestamp)
        # Any key event, including a release, shows that the scanner is still typing.
        self._last_key_at = timestamp

        if code in SHIFT_KEYS:
            if value == KEY_UP:
                self._shift_keys_down.discard(code)
            else:
                self._shift_keys_down.add(code)
            return reads
        if value != KEY_DOWN or code in IGNORED_KEYS:
            return reads

        if self._dropping:
            if code in SUFFIX_KEYS:
                self._dropping = False
            return reads

        if code in SUFFIX_KEYS:
            if self._keystrokes:
                reads.append(self._finish())
            return reads

        if not self._keystrokes:
            self._started_at = timestamp
        self._keystrokes.append(Keystroke(code, bool(self._shift_keys_down)))
        return reads

    def poll(self, now: float) -> list[AssembledRead]:
        """End a read after the gap timeout without key events, or cut off one that is too long.

        Call it regularly, e.g. every 20 ms, so a read without a suffix key completes.
        """
        gap_passed = now - self._last_key_at >= self._gap_s - _TIMESTAMP_RESOLUTION_S
        if self._dropping:
            if gap_passed:
                self._dropping = False
            return []
        if not self._keystrokes:
            return []
        if gap_passed:
            return [self._finish()]
        if now - self._started_at > self._max_scan_s:
            return [self._cut_off()]
        return []

    def abort(self, detail: str) -> list[AssembledRead]:
        """Drop a read in progress, e.g. when its device is unplugged, and report it cut off."""
        self._shift_keys_down.clear()
        self._dropping = False
        if not self._keystrokes:
            return []
        count = len(self._keystrokes)
        self._keystrokes = []
        return [ReadError(Reason.SCAN_CUT_OFF, f"{detail} after {count} keys")]

    def _finish(self) -> AssembledRead:
        keystrokes, self._keystrokes = self._keystrokes, []
        return check_layout(keystrokes, self._token_patterns)

    def _cut_off(self) -> ReadError:
        count = len(self._keystrokes)
        self._keystrokes = []
        self._dropping = True
        detail = f"read not finished within {self._max_scan_ms} ms, cut off after {count} keys"
        return ReadError(Reason.SCAN_CUT_OFF, detail)


# --- Devices ---


class DeviceInfoLike(Protocol):
    """The part of ``evdev.DeviceInfo`` that device selection reads."""

    @property
    def vendor(self) -> int: ...

    @property
    def product(self) -> int: ...


class InputEventLike(Protocol):
    """The part of ``evdev.InputEvent`` that the source reads."""

    @property
    def type(self) -> int: ...

    @property
    def code(self) -> int: ...

    @property
    def value(self) -> int: ...


class InputDeviceLike(Protocol):
    """The part of ``evdev.InputDevice`` that the source uses, so tests can pass fakes."""

    @property
    def path(self) -> str | bytes: ...

    @property
    def name(self) -> str: ...

    @property
    def info(self) -> DeviceInfoLike: ...

    def capabilities(self) -> Mapping[int, Sequence[object]]: ...

    def grab(self) -> None: ...

    def ungrab(self) -> None: ...

    def close(self) -> None: ...

    def async_read_loop(self) -> AsyncIterator[InputEventLike]: ...


DeviceLister = Callable[[], Iterable[str]]
DeviceOpener = Callable[[str], InputDeviceLike]


def list_input_devices() -> list[str]:
    """Return the readable /dev/input/event* paths, including those this user cannot write."""
    return evdev.list_devices(writable=False)


def open_input_device(path: str) -> InputDeviceLike:
    return evdev.InputDevice(path)


@dataclass(frozen=True, slots=True)
class DeviceMatch:
    """Criteria that identify the scanner: USB vendor and product id, kernel device name or both.

    When both are set, a device must match both.
    """

    vendor: int | None = None
    product: int | None = None
    name: str | None = None

    @classmethod
    def from_config(cls, config: HidSourceConfig) -> DeviceMatch:
        vendor = product = None
        if config.vid_pid is not None:
            vendor_hex, product_hex = config.vid_pid.split(":")
            vendor, product = int(vendor_hex, 16), int(product_hex, 16)
        if vendor is None and config.device_name is None:
            raise ValueError(f"source {config.name!r}: set vid_pid or device_name")
        return cls(vendor, product, config.device_name)

    def matches(self, device: InputDeviceLike) -> bool:
        if self.vendor is not None and (
            device.info.vendor != self.vendor or device.info.product != self.product
        ):
            return False
        return self.name is None or device.name == self.name

    def describe(self) -> str:
        parts = []
        if self.vendor is not None and self.product is not None:
            parts.append(f"vid_pid={self.vendor:04x}:{self.product:04x}")
        if self.name is not None:
            parts.append(f"device_name={self.name!r}")
        return " and ".join(parts)


def _event_number(path: str) -> tuple[int, str]:
    """Sort key that puts /dev/input/event2 before /dev/input/event10."""
    match = re.search(r"(\d+)$", path)
    return (int(match.group(1)) if match else -1, path)


def _is_keyboard(device: InputDeviceLike) -> bool:
    """Return whether the device reports an Enter key, so it can type a code and its suffix.

    A scanner often has further input devices with the same VID:PID, such as "Consumer
    Control", which never type a code.
    """
    keys = device.capabilities().get(ecodes.EV_KEY, ())
    return ecodes.KEY_ENTER in keys


class DeviceNotFound(Exception):
    """No input device matches the configured scanner. The message names the criteria."""


def find_device(
    match: DeviceMatch, list_devices: DeviceLister, open_device: DeviceOpener
) -> InputDeviceLike:
    """Open and return the first keyboard device that matches, in event-number order.

    Devices that do not match are closed. Raises DeviceNotFound with what was seen.
    """
    not_keyboards: list[str] = []
    unreadable = 0
    for path in sorted(list_devices(), key=_event_number):
        try:
            device = open_device(path)
        except OSError:
            # A device can vanish between listing and opening, or be unreadable to this user.
            # It is skipped and counted, and the error below reports the count.
            unreadable += 1
            continue
        if not match.matches(device):
            device.close()
            continue
        if not _is_keyboard(device):
            not_keyboards.append(path)
            device.close()
            continue
        return device

    message = f"no keyboard input device matches {match.describe()}"
    if not_keyboards:
        message += f". {', '.join(not_keyboards)} match but report no Enter key"
    if unreadable:
        message += (
            f". {unreadable} devices could not be opened, so check that the service user"
            " is in the 'input' group"
        )
    raise DeviceNotFound(message)


# --- The source ---


class HidScanner:
    """A keyboard-wedge scanner as a ``Source``.

    The device is found by VID:PID or name, never by taking any keyboard. While the device is
    missing, the status is DISCONNECTED and the source looks again with capped exponential
    backoff with full jitter. ``list_devices``, ``open_device`` and ``clock`` are for tests.
    """

    def __init__(
        self,
        config: HidSourceConfig,
        *,
        token_patterns: Sequence[TokenPattern] = (),
        list_devices: DeviceLister = list_input_devices,
        open_device: DeviceOpener = open_input_device,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = 0.02,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.status = SourceStatus()
        self._config = config
        self._match = DeviceMatch.from_config(config)
        self._assembler = ScanAssembler.from_config(config, token_patterns)
        self._list_devices = list_devices
        self._open_device = open_device
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._connected_before = False
        self._layout_error_logged = False

    async def run(self, emit: Emit) -> None:
        """Read scans until cancelled, finding the device again after every unplug."""
        failures = 0
        try:
            while True:
                device = self._connect(failures)
                if device is None:
                    failures += 1
                    await asyncio.sleep(self._backoff_delay(failures))
                    continue
                failures = 0
                try:
                    await self._read_until_unplugged(device, emit)
                finally:
                    self._release(device)
        finally:
            self.status.state = SourceState.STOPPED
            log.info("source_stopped", source=self.name)

    def _backoff_delay(self, failures: int) -> float:
        """Full jitter: a uniform delay up to the capped exponential bound."""
        bound = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(failures - 1, 30))
        return self._rng.uniform(0, bound)

    def _connect(self, failures: int) -> InputDeviceLike | None:
        """Find, open and grab the device. On failure, set DISCONNECTED and return None."""
        try:
            device = find_device(self._match, self._list_devices, self._open_device)
        except DeviceNotFound as exc:
            self._set_disconnected(str(exc))
            # Log the first failure of an outage, not every retry.
            if failures == 0:
                log.warning("source_device_not_found", source=self.name, error=str(exc))
            return None

        path = os.fsdecode(device.path)
        if self._config.grab:
            try:
                device.grab()
            except OSError as exc:
                device.close()
                message = f"cannot grab {path}: {exc.strerror or exc}"
                if exc.errno == errno.EBUSY:
                    message += " (another program has grabbed it)"
                self._set_disconnected(message)
                if failures == 0:
                    log.warning("source_grab_failed", source=self.name, device=path, error=message)
                return None

        self.status.state = SourceState.CONNECTED
        self.status.device = path
        self.status.last_error = ""
        if self._connected_before:
            self.status.reconnects += 1
        self._connected_before = True
        self._layout_error_logged = False
        log.info(
            "source_connected",
            source=self.name,
            device=path,
            device_name=device.name,
            grabbed=self._config.grab,
        )
        return device

    def _set_disconnected(self, message: str) -> None:
        self.status.state = SourceState.DISCONNECTED
        self.status.last_error = message

    async def _read_until_unplugged(self, device: InputDeviceLike, emit: Emit) -> None:
        """Feed key events to the assembler until the device fails, polling for gap ends."""
        path = os.fsdecode(device.path)
        poller = asyncio.create_task(self._poll_periodically(emit))
        try:
            async for event in device.async_read_loop():
                if event.type != ecodes.EV_KEY:
                    continue
                # NOTE: keys are timed on arrival with self._clock, not with the kernel's event
                # timestamps, which follow the wall clock and can jump. An event loop stalled
                # for longer than inter_key_timeout_ms can therefore end a read early.
                for read in self._assembler.feed(event.code, event.value, self._clock()):
                    self._emit(read, emit)
            error = "the device stopped sending events"
        except OSError as exc:
            error = f"{exc.strerror or exc} (errno {exc.errno})"
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

        for read in self._assembler.abort("device disconnected during a read"):
            self._emit(read, emit)
        self._set_disconnected(f"{path}: {error}")
        log.warning("source_disconnected", source=self.name, device=path, error=error)

    async def _poll_periodically(self, emit: Emit) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            for read in self._assembler.poll(self._clock()):
                self._emit(read, emit)

    def _emit(self, read: AssembledRead, emit: Emit) -> None:
        if isinstance(read, ReadError):
            self.status.read_errors += 1
            if read.reason == Reason.SCANNER_LAYOUT_ERROR and not self._layout_error_logged:
                # Logged once per connection: every scan repeats it until the scanner is
                # set up again.
                self._layout_error_logged = True
                log.warning(
                    "scanner_layout_error",
                    source=self.name,
                    device=self.status.device,
                    detail=read.detail,
                )
            emit(ScanEvent(source=self.name, read_error=read))
            return
        self.status.reads += 1
        emit(ScanEvent(source=self.name, payloads=(read,)))

    def _release(self, device: InputDeviceLike) -> None:
        """Ungrab and close the device. An unplugged device fails both, which is expected."""
        if self._config.grab:
            with contextlib.suppress(OSError):
                device.ungrab()
        with contextlib.suppress(OSError):
            device.close()
