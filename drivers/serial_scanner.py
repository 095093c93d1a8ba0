"""Barcode scanner on a serial port (USB CDC-ACM), read through pyserial-asyncio-fast.

The scanner sends each code it reads followed by a suffix (CR, LF or CRLF). `FrameSplitter`
cuts the byte stream into frames and `decode_frame` turns one frame into a UTF-8 payload or a
`ReadError`. Both are plain code that the tests drive without a port. `SerialScanner` is the
`Source`: it opens the port, feeds the splitter and reopens the port after an unplug.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import random
import time
from dataclasses import dataclass

import serial_asyncio_fast
import structlog

from edgenode.config import SerialSourceConfig
from edgenode.reasons import Reason
from edgenode.sources import Emit, ReadError, ScanEvent, SourceState, SourceStatus

log = structlog.get_logger("drivers.serial_scanner")

SUFFIXES = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n"}

# Maximum frame length without the suffix. A QR code holds at most 2,953 bytes (version 40-L),
# so a longer frame is a stream that lost its suffix. It is cut off to keep the buffer bounded.
MAX_FRAME_BYTES = 4096

READ_CHUNK_BYTES = 4096
DEFAULT_BACKOFF_START_S = 0.2
DEFAULT_BACKOFF_MAX_S = 5.0
# A connection that lasted this long resets the reconnect backoff to its start delay.
STABLE_CONNECTION_S = 10.0
# Upper bound on waiting for the port to close after cancellation or a read failure.
CLOSE_TIMEOUT_S = 2.0

# AIM symbology identifiers ("]" + code character + modifier) whose modifier marks data that
# follows the AIM ECI protocol. QR Code 2, 4 and 6 and Han Xin 1 are from the Zebra DS457
# integration guide, table E-2. Data Matrix 4, 5 and 6 and PDF417 1 are from table B-2 of the
# Motorola DS457 manual.
ECI_SYMBOLOGY_IDS = frozenset({b"]Q2", b"]Q4", b"]Q6", b"]d4", b"]d5", b"]d6", b"]h1", b"]L1"})

# Python codec for each ECI number. Numbers as in zxing-cpp core/src/ECI.h (AIM ITS/04-001).
# ECI 000029 is GB 2312, decoded as GB18030 because GB18030 is a superset of it.
ECI_CODECS: dict[int, str] = {
    0: "cp437",
    1: "latin-1",
    2: "cp437",
    3: "latin-1",
    **{number: f"iso8859-{number - 2}" for number in range(4, 14)},  # ISO 8859-2 to 8859-11
    **{number: f"iso8859-{number - 2}" for number in range(15, 19)},  # ISO 8859-13 to 8859-16
    20: "shift_jis",
    21: "cp1250",
    22: "cp1251",
    23: "cp1252",
    24: "cp1256",
    25: "utf-16-be",
    26: "utf-8",
    27: "ascii",
    28: "big5",
    29: "gb18030",
    30: "euc_kr",
    32: "gb18030",
    33: "utf-16-le",
    34: "utf-32-be",
    35: "utf-32-le",
    170: "ascii",
}


@dataclass(frozen=True, slots=True)
class CutOff:
    """A frame that ended without its suffix, because the scanner paused or it was too long."""

    length: int  # bytes received for the frame before it was cut off
    cause: str


Frame = bytes | CutOff


class FrameSplitter:
    """Split a scanner's byte stream into frames that end with ``suffix``.

    CR and LF bytes at either end of a frame are dropped, so a scanner that sends CRLF while
    set up for CR or LF still reads. Empty frames are skipped.
    """

    def __init__(self, suffix: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not suffix:
            raise ValueError("frame suffix must not be empty")
        self._suffix = suffix
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        # True inside an overlong frame that was already reported. Its remaining bytes are
        # dropped until the next suffix or inter-byte timeout.
        self._discarding = False
        self._too_long = f"frame longer than {max_frame_bytes} bytes"

    @property
    def pending(self) -> bool:
        """True while a frame has started and its suffix has not arrived."""
        return bool(self._buffer) or self._discarding

    def feed(self, data: bytes) -> list[Frame]:
        """Append bytes read from the port and return the frames they complete."""
        self._buffer += data
        frames: list[Frame] = []

        while (end := self._buffer.find(self._suffix)) >= 0:
            frame = bytes(self._buffer[:end])
            del self._buffer[: end + len(self._suffix)]
            if self._discarding:
                self._discarding = False
            elif len(frame) > self._max_frame_bytes:
                frames.append(CutOff(len(frame), self._too_long))
            elif text := frame.strip(b"\r\n"):
                frames.append(text)

        # The last len(suffix) - 1 bytes may be the start of a suffix split across reads.
        limit = self._max_frame_bytes + len(self._suffix) - 1
        if len(self._buffer) > limit:
            if not self._discarding:
                frames.append(CutOff(len(self._buffer), self._too_long))
                self._discarding = True
            del self._buffer[: len(self._buffer) - (len(self._suffix) - 1)]
        return frames

    def expire(self) -> list[Frame]:
        """End the pending frame because no byte arrived within the inter-byte timeout."""
        length = len(self._buffer)
        has_text = bool(self._buffer.strip(b"\r\n"))
        was_discarding = self._discarding
        self._buffer.clear()
        self._discarding = False
        if was_discarding or not has_text:
            return []
        return [CutOff(length, "no suffix within the inter-byte timeout")]


def split_symbology_id(frame: bytes) -> tuple[bytes | None, bytes]:
    """Split an AIM symbology identifier such as ``]Q1`` off the front of a frame.

    An identifier is "]", a code character (a letter) and a modifier (a letter or digit).
    """
    if len(frame) >= 3 and frame[:1] == b"]" and frame[1:2].isalpha() and frame[2:3].isalnum():
        return frame[:3], frame[3:]
    return None, frame


def decode_frame(frame: bytes, charset: str | None = None) -> bytes | ReadError:
    """Decode one frame and return the code's text encoded as UTF-8, or a read error.

    An AIM symbology identifier is removed. Data behind an identifier that announces ECI
    escapes is decoded segment by segment, each in the charset its ECI designator selects.
    """
    symbology_id, data = split_symbology_id(frame)
    if symbology_id in ECI_SYMBOLOGY_IDS:
        text = decode_eci_data(data, charset)
    else:
        text = decode_text(data, charset)
    if isinstance(text, ReadError):
        return text
    return text.encode("utf-8")


def decode_text(data: bytes, charset: str | None) -> str | ReadError:
    """Decode bytes with ``charset`` if one is set, else as UTF-8, else as GB18030."""
    candidates = (charset,) if charset else ("utf-8", "gb18030")
    for candidate in candidates:
        try:
            return data.decode(candidate)
        except UnicodeDecodeError:
            continue
    return ReadError(
        Reason.CHARSET_UNSUPPORTED,
        f"{len(data)} bytes are valid in none of the charsets {', '.join(candidates)}",
    )


def decode_eci_data(data: bytes, charset: str | None) -> str | ReadError:
    r"""Decode data that follows the AIM ECI protocol.

    In that protocol, "\" and six digits select the charset of the bytes after it, and "\\" is
    one literal backslash (byte-level, as in the ECI protocol output section of the Opticon
    L-46X manual). Bytes before the first designator are decoded like data without ECI.
    """
    segments: list[tuple[int | None, bytes]] = []
    eci: int | None = None
    current = bytearray()
    index = 0
    while index < len(data):
        byte = data[index]
        if byte != 0x5C:
            current.append(byte)
            index += 1
            continue
        if data[index + 1 : index + 2] == b"\\":
            current.append(0x5C)
            index += 2
            continue
        digits = data[index + 1 : index + 7]
        if len(digits) == 6 and digits.isdigit():
            segments.append((eci, bytes(current)))
            current.clear()
            eci = int(digits)
            index += 7
            continue
        # NOTE: a backslash followed by neither a backslash nor six digits breaks the ECI
        # protocol. It is kept as a literal byte, and the code parser rejects the payload.
        current.append(byte)
        index += 1
    segments.append((eci, bytes(current)))

    parts: list[str] = []
    for segment_eci, raw in segments:
        text = decode_eci_segment(segment_eci, raw, charset)
        if isinstance(text, ReadError):
            return text
        parts.append(text)
    return "".join(parts)


def decode_eci_segment(eci: int | None, raw: bytes, charset: str | None) -> str | ReadError:
    # NOTE: ISO/IEC 18004 makes ECI 000003 (ISO 8859-1) the default for QR data before the
    # first designator, but Chinese encoders write UTF-8 or GB18030 there, so the configured
    # charset or the UTF-8, GB18030 fallback applies instead.
    if eci is None:
        return decode_text(raw, charset)
    codec = ECI_CODECS.get(eci)
    if codec is None:
        return ReadError(Reason.CHARSET_UNSUPPORTED, f"ECI {eci:06d} is not a supported charset")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        return ReadError(
            Reason.CHARSET_UNSUPPORTED,
            f"{len(raw)} bytes after ECI {eci:06d} are not valid {codec}",
        )


def backoff_delay(attempt: int, start_s: float, max_s: float) -> float:
    """Return the delay before retry ``attempt`` (0 for the first), with full jitter."""
    ceiling = min(max_s, start_s * 2 ** min(attempt, 32))
    return random.uniform(0, ceiling)


class SerialScanner:
    """A serial barcode scanner as a `Source`, reopening its port after an unplug."""

    def __init__(
        self,
        config: SerialSourceConfig,
        *,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        backoff_start_s: float = DEFAULT_BACKOFF_START_S,
    ) -> None:
        if config.charset is not None:
            try:
                codecs.lookup(config.charset)
            except LookupError:
                raise ValueError(
                    f"source {config.name}: unknown charset {config.charset!r}. "
                    "Use a Python codec name such as utf-8 or gb18030."
                ) from None
        if backoff_start_s <= 0 or backoff_max_s <= 0:
            raise ValueError(
                f"backoff delays must be positive, got start {backoff_start_s} s "
                f"and max {backoff_max_s} s"
            )
        self.name = config.name
        self.status = SourceStatus(device=config.device)
        self._config = config
        self._suffix = SUFFIXES[config.suffix]
        self._inter_byte_timeout_s = config.inter_byte_timeout_ms / 1000
        # A cap below the start delay (tests use a few milliseconds) lowers the start too.
        self._backoff_start_s = min(backoff_start_s, backoff_max_s)
        self._backoff_max_s = backoff_max_s
        # Bytes read from the port since construction, for diagnostics and tests.
        self.bytes_received = 0

    async def run(self, emit: Emit) -> None:
        """Read codes until cancelled, reopening the port whenever it fails or disappears."""
        connected_before = False
        failed_opens = 0  # open failures in the current outage, for the logs
        retry = 0  # backoff exponent, reset after a stable connection
        try:
            while True:
                try:
                    reader, writer = await serial_asyncio_fast.open_serial_connection(
                        url=self._config.device, baudrate=self._config.baudrate
                    )
                except OSError as exc:
                    # pyserial raises SerialException, a subclass of OSError, for a missing
                    # path, EIO or EACCES.
                    self._record_open_failure(exc, failed_opens)
                    failed_opens += 1
                    await self._sleep_before_retry(retry)
                    retry += 1
                    continue

                if connected_before:
                    self.status.reconnects += 1
                connected_before = True
                self.status.state = SourceState.CONNECTED
                self.status.last_error = ""
                log.info(
                    "source_connected",
                    source=self.name,
                    device=self._config.device,
                    failed_opens=failed_opens,
                    reconnects=self.status.reconnects,
                )
                failed_opens = 0
                connected_at = time.monotonic()

                try:
                    await self._read_frames(reader, emit)
                except OSError as exc:
                    self.status.state = SourceState.DISCONNECTED
                    self.status.last_error = repr(exc)
                    log.warning(
                        "source_disconnected",
                        source=self.name,
                        device=self._config.device,
                        error=repr(exc),
                    )
                finally:
                    await self._close(writer)

                # A port that opens but fails at once backs off like one that does not open.
                if time.monotonic() - connected_at >= STABLE_CONNECTION_S:
                    retry = 0
                await self._sleep_before_retry(retry)
                retry += 1
        finally:
            self.status.state = SourceState.STOPPED

    def _record_open_failure(self, exc: OSError, failed_opens: int) -> None:
        self.status.state = SourceState.DISCONNECTED
        self.status.last_error = repr(exc)
        # The first failure of an outage is logged as a warning, the retries after it as debug.
        report = log.warning if failed_opens == 0 else log.debug
        report(
            "source_open_failed",
            source=self.name,
            device=self._config.device,
            error=repr(exc),
            attempt=failed_opens + 1,
        )

    async def _sleep_before_retry(self, retry: int) -> None:
        await asyncio.sleep(backoff_delay(retry, self._backoff_start_s, self._backoff_max_s))

    async def _read_frames(self, reader: asyncio.StreamReader, emit: Emit) -> None:
        """Read and emit frames until the port fails, which raises an OSError."""
        splitter = FrameSplitter(self._suffix)
        try:
            while True:
                timeout = self._inter_byte_timeout_s if splitter.pending else None
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    self._emit_frames(splitter.expire(), emit)
                    continue
                if not data:
                    raise ConnectionError("serial port closed (end of stream)")
                self.bytes_received += len(data)
                self._emit_frames(splitter.feed(data), emit)
        except OSError:
            # A code being read when the port failed is reported as cut off.
            self._emit_frames(splitter.expire(), emit)
            raise

    def _emit_frames(self, frames: list[Frame], emit: Emit) -> None:
        for frame in frames:
            if isinstance(frame, CutOff):
                result: bytes | ReadError = ReadError(
                    Reason.SCAN_CUT_OFF, f"code cut off after {frame.length} bytes: {frame.cause}"
                )
            else:
                result = decode_frame(frame, self._config.charset)

            self.status.reads += 1
            if isinstance(result, ReadError):
                self.status.read_errors += 1
                log.info(
                    "scan_read_failed",
                    source=self.name,
                    reason=str(result.reason),
                    detail=result.detail,
                )
                emit(ScanEvent(source=self.name, read_error=result))
            else:
                emit(ScanEvent(source=self.name, payloads=(result,)))

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close the port and wait until its file descriptor is closed."""
        writer.close()
        # wait_closed re-raises the read error that closed the transport, already handled.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await writer.wait_closed()
