"""A real daemon with the guard's screen, run in a thread so that a browser test can drive it.

The daemon reads one ``PushSource``, which the test feeds with real code texts. Playwright's
sync API needs the test's own thread, so the daemon's event loop runs in another one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from edgenode.config import Config
from edgenode.daemon import Daemon
from edgenode.i18n import translator
from edgenode.pipeline import WallClock, system_clock
from edgenode.screen.server import NetworkState, ScreenServer
from edgenode.sources import Emit, ScanEvent, SourceState, SourceStatus

START_TIMEOUT_S = 15.0


class PushSource:
    """A source that emits the scans a test pushes from its own thread."""

    def __init__(self, name: str = "scanner", state: SourceState = SourceState.CONNECTED) -> None:
        self.name = name
        self.status = SourceStatus()
        self.connected_state = state
        self._emit: Emit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self._loop = asyncio.get_running_loop()
        self.status.state = self.connected_state
        await asyncio.Event().wait()

    def push(self, *payloads: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (self._loop is None or self._emit is None) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._loop is None or self._emit is None:
            raise TimeoutError(f"source {self.name} did not start")
        scan = ScanEvent(source=self.name, payloads=tuple(p.encode("ascii") for p in payloads))
        self._loop.call_soon_threadsafe(self._emit, scan)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ScreenGate:
    """A daemon with its screen on 127.0.0.1, started and stopped from the test's thread."""

    def __init__(
        self,
        config: Config,
        sources: list[PushSource],
        *,
        clock: WallClock = system_clock,
        network: NetworkState | None = None,
    ) -> None:
        self.config = config
        self.sources = sources
        self.clock = clock
        self.network = network
        self.daemon: Daemon | None = None
        self.screen: ScreenServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.screen.port}/"

    def start(self) -> ScreenGate:
        language = self.config.display.language or "zh_CN"
        self.screen = ScreenServer(self.config.screen, translator(language), network=self.network)
        self.daemon = Daemon(
            self.config,
            self.sources,
            listeners=[self.screen.on_verdict],
            override_listeners=[self.screen.on_override],
            clock=self.clock,
        )
        self.daemon.services.append(self.screen.service(self.daemon))
        self.daemon.open()
        self._thread = threading.Thread(target=self._run, name="screen-gate", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.screen.port is None and time.monotonic() < deadline:
            if self._failure is not None:
                raise RuntimeError("the daemon failed to start") from self._failure
            time.sleep(0.02)
        if self.screen.port is None:
            raise TimeoutError("the screen did not start listening")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            assert self.daemon is not None
            await self.daemon.run()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._failure = exc

    def stop(self) -> None:
        if self._loop is not None and self.daemon is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.daemon.stop)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
            if self._thread.is_alive():
                raise TimeoutError("the daemon did not stop")
        self._thread = None
