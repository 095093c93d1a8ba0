"""Serial scanner source: framing, AIM and ECI decoding, unplug and cancellation.

Most tests run the real `SerialScanner` on a pseudo-terminal pair: the scanner opens the
slave's path like a /dev/serial/by-id path, and the test writes to the master as a scanner
would. Every wait is bounded by asyncio.wait_for, because pytest-timeout is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from drivers.serial_scanner import (
    MAX_FRAME_BYTES,
    CutOff,
    FrameSplitter,
    SerialScanner,
    backoff_delay,
    decode_frame,
)
from edgenode.config import SerialSourceConfig
from edgenode.reasons import Reason
from edgenode.sources import ReadError, ScanEvent, SourceState

# Bound on each wait for the scanner, generous because a loaded 2-core CI machine can stall.
WAIT_S = 5.0
# Bound on a whole test.
TEST_S = 20.0
# Inter-byte timeout for tests that split a code over writes, long enough that a stalled
# machine does not cut the code off between two writes.
PATIENT_TIMEOUT_MS = 1000
CUT_OFF_TIMEOUT_MS = 150

CODE = b"HC1:6BFOXN*TS0BI$ZD4N9:9S6RCVN5+O30K3/XIV0W23NTDEXWK G2EP4J0B"
CHINESE = "健康码 绿码 张三"


class Pty:
    """A pseudo-terminal pair. The test writes to the master as the scanner would."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.closed = False

    async def write(self, data: bytes) -> None:
        # In a thread, because a write larger than the tty buffer blocks until the scanner
        # reads, and the scanner reads on this event loop.
        await asyncio.to_thread(self._write_all, data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.master, view)
            view = view[written:]

    def fds_opened_by_others(self) -> int:
        """Count this process's file descriptors on the slave, besides the test's own."""
        count = 0
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(name) != self.slave and os.readlink(f"/proc/self/fd/{name}") == self.path:
                    count += 1
        return count

    def close(self) -> None:
        if not self.closed:
            os.close(self.master)
            os.close(self.slave)
            self.closed = True


@pytest.fixture
def pty() -> Iterator[Pty]:
    terminal = Pty()
    yield terminal
    terminal.close()


def make_scanner(
    device: str,
    *,
    suffix: str = "cr",
    inter_byte_timeout_ms: int = PATIENT_TIMEOUT_MS,
    charset: str | None = None,
    backoff_max_s: float = 0.02,
) -> SerialScanner:
    config = SerialSourceConfig.model_validate(
        {
            "type": "serial",
            "name": "gate-scanner",
            "device": device,
            "suffix": suffix,
            "inter_byte_timeout_ms": inter_byte_timeout_ms,
            "charset": charset,
        }
    )
    return SerialScanner(config, backoff_max_s=backoff_max_s)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TEST_S))


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}") from None


@contextlib.asynccontextmanager
async def running(scanner: SerialScanner) -> AsyncIterator[asyncio.Queue[ScanEvent]]:
    """Run the scanner until the block ends, and yield the queue of its events."""
    events: asyncio.Queue[ScanEvent] = asyncio.Queue()
    task = asyncio.create_task(scanner.run(events.put_nowait))
    try:
        await wait_until(lambda: scanner.status.state == SourceState.CONNECTED, "connection")
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)


async def next_event(events: asyncio.Queue[ScanEvent]) -> ScanEvent:
    try:
        return await asyncio.wait_for(events.get(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"no scan event within {WAIT_S} s") from None


def has_received(scanner: SerialScanner, total: int) -> bool:
    return scanner.bytes_received >= total


async def write_in_parts(pty: Pty, scanner: SerialScanner, parts: list[bytes]) -> None:
    """Write each part only after the scanner has read the ones before it."""
    expected = scanner.bytes_received
    for part in parts:
        expected += len(part)
        await pty.write(part)
        await wait_until(partial(has_received, scanner, expected), f"{expected} bytes read")


# --- framing over a pseudo-terminal ---


def test_code_split_over_writes_is_one_event(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        async with running(scanner) as events:
            await write_in_parts(pty, scanner, [CODE[:10], CODE[10:30], CODE[30:] + b"\r"])
            event = await next_event(events)
            await pty.write(b"SENTINEL\r")
            sentinel = await next_event(events)

        assert event.payloads == (CODE,)
        assert event.read_error is None
        assert event.source == "gate-scanner"
        assert sentinel.payloads == (b"SENTINEL",)
        assert scanner.status.reads == 2

    run(scenario)


def test_two_codes_in_one_write_are_two_events(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        async with running(scanner) as events:
            await pty.write(b"FIRST-CODE\rSECOND-CODE\r")
            first = await next_event(events)
            second = await next_event(events)

        assert first.payloads == (b"FIRST-CODE",)
        assert second.payloads == (b"SECOND-CODE",)

    run(scenario)


def test_cut_off_code_is_read_error(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path, inter_byte_timeout_ms=CUT_OFF_TIMEOUT_MS)
        async with running(scanner) as events:
            await pty.write(CODE[:20])
            cut_off = await next_event(events)
            await pty.write(CODE + b"\r")
            full = await next_event(events)

        assert cut_off.payloads == ()
        assert cut_off.read_error is not None
        assert cut_off.read_error.reason == Reason.SCAN_CUT_OFF
        assert full.payloads == (CODE,)
        assert scanner.status.read_errors == 1

    run(scenario)


def test_overlong_frame_is_cut_off_once(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        async with running(scanner) as events:
            # An endless stream without a suffix, then the suffix and a normal code.
            await pty.write(b"A" * (3 * MAX_FRAME_BYTES) + b"\r" + CODE + b"\r")
            cut_off = await next_event(events)
            full = await next_event(events)

        assert cut_off.read_error is not None
        assert cut_off.read_error.reason == Reason.SCAN_CUT_OFF
        assert cut_off.payloads == ()
        assert full.payloads == (CODE,)

    run(scenario)


@pytest.mark.parametrize(
    ("suffix", "terminator"),
    [("cr", b"\r"), ("lf", b"\n"), ("crlf", b"\r\n")],
    ids=["cr", "lf", "crlf"],
)
def test_suffix_setting_ends_frames(pty: Pty, suffix: str, terminator: bytes) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path, suffix=suffix)
        async with running(scanner) as events:
            await pty.write(b"ONE" + terminator)
            one = await next_event(events)
            # The terminator's last byte arrives in a write of its own.
            await write_in_parts(pty, scanner, [b"TWO" + terminator[:-1], terminator[-1:]])
            two = await next_event(events)

        assert one.payloads == (b"ONE",)
        assert two.payloads == (b"TWO",)

    run(scenario)


def test_bare_suffixes_are_ignored(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path, suffix="crlf")
        async with running(scanner) as events:
            await pty.write(b"\r\n\r\n" + CODE + b"\r\n")
            event = await next_event(events)

        assert event.payloads == (CODE,)
        assert scanner.status.reads == 1

    run(scenario)


# --- decoding over a pseudo-terminal ---

DECODE_CASES = [
    pytest.param(b"]Q1" + CODE, CODE, id="qr-aim-prefix-removed"),
    pytest.param(
        b"]Q2\\000029" + CHINESE.encode("gb18030"),
        CHINESE.encode("utf-8"),
        id="qr-eci-gb18030",
    ),
    pytest.param(
        b"]Q2\\000026" + CHINESE.encode("utf-8"),
        CHINESE.encode("utf-8"),
        id="qr-eci-utf8",
    ),
    pytest.param(
        b"]Q2ID:\\000003caf\xe9 \\000029" + "张".encode("gb18030"),
        "ID:café 张".encode(),
        id="qr-eci-switch-mid-code",
    ),
    pytest.param(b"]Q2C:\\\\share\\\\x", b"C:\\share\\x", id="qr-eci-literal-backslash"),
    pytest.param(CHINESE.encode("gb18030"), CHINESE.encode("utf-8"), id="gb18030-without-aim"),
    pytest.param(CHINESE.encode("utf-8"), CHINESE.encode("utf-8"), id="utf8-without-aim"),
    pytest.param(b"]d2" + CODE, CODE, id="datamatrix-aim-prefix-removed"),
    pytest.param(b"]E06901234567892", b"6901234567892", id="ean-aim-prefix-removed"),
    pytest.param(CODE, CODE, id="ascii-unchanged"),
]


@pytest.mark.parametrize(("frame", "payload"), DECODE_CASES)
def test_frame_decodes_to_utf8_payload(pty: Pty, frame: bytes, payload: bytes) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        async with running(scanner) as events:
            await pty.write(frame + b"\r")
            event = await next_event(events)

        assert event.read_error is None
        assert event.payloads == (payload,)

    run(scenario)


def test_bytes_valid_in_no_charset_are_rejected(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        async with running(scanner) as events:
            await pty.write(b"HC1:\xff\xfe\x80\r")
            event = await next_event(events)

        assert event.payloads == ()
        assert event.read_error is not None
        assert event.read_error.reason == Reason.CHARSET_UNSUPPORTED
        assert b"HC1" not in event.read_error.detail.encode()

    run(scenario)


# --- unplug, replug and cancellation ---


def repoint_symlink(link: Path, target: str) -> None:
    """Replace the symlink in one step, as udev does for a /dev/serial/by-id link."""
    temporary = link.with_name(link.name + ".new")
    temporary.symlink_to(target)
    os.replace(temporary, link)


def test_unplug_and_replug_reconnects_by_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = tmp_path / "usb-Gate_Scanner_0001-if00"
        first = Pty()
        second: Pty | None = None
        link.symlink_to(first.path)
        scanner = make_scanner(str(link))
        try:
            async with running(scanner) as events:
                await first.write(b"BEFORE\r")
                before = await next_event(events)

                first.close()
                await wait_until(
                    lambda: scanner.status.state == SourceState.DISCONNECTED, "disconnection"
                )
                second = Pty()
                repoint_symlink(link, second.path)
                await wait_until(
                    lambda: scanner.status.state == SourceState.CONNECTED, "reconnection"
                )
                await second.write(b"AFTER\r")
                after = await next_event(events)
        finally:
            first.close()
            if second is not None:
                second.close()

        assert before.payloads == (b"BEFORE",)
        assert after.payloads == (b"AFTER",)
        assert scanner.status.reconnects == 1
        assert scanner.status.device == str(link)

    run(scenario)


def test_missing_device_connects_when_it_appears(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = tmp_path / "usb-Gate_Scanner_0001-if00"
        scanner = make_scanner(str(link))
        events: asyncio.Queue[ScanEvent] = asyncio.Queue()
        task = asyncio.create_task(scanner.run(events.put_nowait))
        terminal = Pty()
        try:
            await wait_until(
                lambda: scanner.status.state == SourceState.DISCONNECTED, "failed open"
            )
            link.symlink_to(terminal.path)
            await wait_until(lambda: scanner.status.state == SourceState.CONNECTED, "connection")
            await terminal.write(CODE + b"\r")
            event = await next_event(events)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, WAIT_S)
            terminal.close()

        assert event.payloads == (CODE,)
        assert scanner.status.reconnects == 0

    run(scenario)


def test_cancelling_run_closes_port(pty: Pty) -> None:
    async def scenario() -> None:
        scanner = make_scanner(pty.path)
        task = asyncio.create_task(scanner.run(lambda event: None))
        await wait_until(lambda: scanner.status.state == SourceState.CONNECTED, "connection")
        assert pty.fds_opened_by_others() == 1

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)

        assert pty.fds_opened_by_others() == 0
        assert scanner.status.state == SourceState.STOPPED

    run(scenario)


# --- framing and decoding without a port ---


def test_splitter_drops_overlong_tail_until_suffix() -> None:
    splitter = FrameSplitter(b"\r", max_frame_bytes=8)

    first = splitter.feed(b"0123456789")
    second = splitter.feed(b"ABCDEFGHIJ")
    third = splitter.feed(b"KL\rNEXT\r")

    assert len(first) == 1
    assert isinstance(first[0], CutOff)
    assert second == []
    assert third == [b"NEXT"]
    assert not splitter.pending


def test_splitter_keeps_split_crlf() -> None:
    splitter = FrameSplitter(b"\r\n", max_frame_bytes=4)

    assert splitter.feed(b"ABCD\r") == []
    assert splitter.feed(b"\n") == [b"ABCD"]


def test_splitter_ignores_stray_lf_with_cr_suffix() -> None:
    splitter = FrameSplitter(b"\r")

    frames = splitter.feed(b"ONE\r\nTWO\r\n")

    assert frames == [b"ONE", b"TWO"]
    assert splitter.expire() == []


def test_splitter_expire_reports_partial_frame() -> None:
    splitter = FrameSplitter(b"\r\n")

    splitter.feed(b"HALF\r")
    frames = splitter.expire()

    assert frames == [CutOff(5, "no suffix within the inter-byte timeout")]
    assert not splitter.pending


def test_decode_unknown_eci_is_charset_unsupported() -> None:
    result = decode_frame(b"]Q2\\000899\x00\x01")

    assert isinstance(result, ReadError)
    assert result.reason == Reason.CHARSET_UNSUPPORTED
    assert "000899" in result.detail


def test_decode_invalid_bytes_after_eci_is_charset_unsupported() -> None:
    result = decode_frame(b"]Q2\\000026\xff")

    assert isinstance(result, ReadError)
    assert result.reason == Reason.CHARSET_UNSUPPORTED


def test_decode_configured_charset_has_no_fallback() -> None:
    latin = decode_frame(b"caf\xe9", charset="latin-1")
    strict = decode_frame(CHINESE.encode("gb18030"), charset="utf-8")

    assert latin == "café".encode()
    assert isinstance(strict, ReadError)
    assert strict.reason == Reason.CHARSET_UNSUPPORTED


def test_scanner_rejects_unknown_charset() -> None:
    with pytest.raises(ValueError, match="unknown charset 'klingon'"):
        make_scanner("/dev/null", charset="klingon")


@pytest.mark.parametrize("attempt", [0, 1, 5, 40], ids=lambda n: f"attempt-{n}")
def test_backoff_delay_stays_under_cap(attempt: int) -> None:
    delays = [backoff_delay(attempt, start_s=0.2, max_s=5.0) for _ in range(200)]

    assert min(delays) >= 0
    assert max(delays) <= min(5.0, 0.2 * 2**attempt)
