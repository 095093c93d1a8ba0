"""The one interface every input source implements, and the event it yields.

A camera decodes its frames in a worker of its own and yields the payloads it found; a
keyboard-wedge or serial scanner yields the payload it read. A read that yields nothing usable
(a scanner set to the wrong keyboard layout, a code cut off mid-way, an unknown charset) is a
``ScanEvent`` with a ``read_error``, so the guard still gets a verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from edgenode.reasons import Reason


@dataclass(frozen=True, slots=True)
class ReadError:
    """The cause of a read without a usable payload. ``reason`` is one of the read reasons."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class ScanEvent:
    """Codes read together by one source: one camera frame, or one scanner read."""

    source: str
    payloads: tuple[bytes, ...] = ()
    read_error: ReadError | None = None
    # time.monotonic() when the frame was captured or the read completed: pairing time.
    captured_at: float = field(default_factory=time.monotonic)
    # time.perf_counter() at capture: the start of the frame-to-verdict latency.
    received: float = field(default_factory=time.perf_counter)


class SourceState(StrEnum):
    STARTING = "starting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass(slots=True)
class SourceStatus:
    """A source's report on itself, for logs, `edgenode devices` and the guard screen."""

    state: SourceState = SourceState.STARTING
    # Device path or description of what is open, e.g. /dev/v4l/by-id/usb-...-video-index0.
    device: str = ""
    last_error: str = ""
    reads: int = 0
    read_errors: int = 0
    # Camera frames dropped because the decoder was still busy with an earlier one.
    frames_dropped: int = 0
    reconnects: int = 0


Emit = Callable[[ScanEvent], None]


class Source(Protocol):
    """An input source. ``run`` reads until cancelled, reconnecting by itself after unplugs.

    ``emit`` is called from the event loop's thread and must not block.
    """

    name: str
    status: SourceStatus

    async def run(self, emit: Emit) -> None: ...
