"""sd_notify: readiness, watchdog pings from the pipeline's work loop, and stopping.

A real AF_UNIX datagram socket takes the place of the one systemd passes in $NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgenode.daemon import Daemon
from edgenode.pipeline import VerdictEvent
from edgenode.reasons import Reason
from edgenode.sd_notify import Notifier
from edgenode.sources import Emit, ReadError, ScanEvent, SourceState, SourceStatus
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config

TIMEOUT_S = 10
# WatchdogSec=200ms, so the daemon may ping every 100 ms and pings once per 200 ms tick.
WATCHDOG_USEC = 200_000
# With no progress, five tick intervals must pass without a single ping.
SILENCE_S = 1.0


class NotifySocket:
    """A bound datagram socket that collects what the service sends, like systemd does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Read every datagram waiting now, add it to ``messages`` and return the new ones."""
        new = []
        while True:
            try:
                new.append(self.sock.recv(4096).decode("utf-8"))
            except BlockingIOError:
                break
        self.messages.extend(new)
        return new

    def count(self, line: str) -> int:
        self.drain()
        return sum(line in message.split("\n") for message in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # A socket path must fit in sun_path (108 bytes), which pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as folder:
        receiver = NotifySocket(str(Path(folder) / "notify.sock"))
        yield receiver
        receiver.close()


def notifier_for(receiver: NotifySocket) -> Notifier:
    return Notifier.from_environment(
        {
            "NOTIFY_SOCKET": receiver.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": str(os.getpid()),
        }
    )


# --- the notifier alone ---


def test_ready_sends_ready_and_status(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.address)

    assert notifier.ready("Running")
    assert notify_socket.drain() == ["READY=1\nSTATUS=Running"]


def test_abstract_socket_address_is_supported() -> None:
    receiver = NotifySocket(f"@edgenode-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        Notifier(receiver.address).stopping("Stopping")
        assert receiver.drain() == ["STOPPING=1\nSTATUS=Stopping"]
    finally:
        receiver.close()


def test_watchdog_pings_at_most_twice_per_interval(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.address, watchdog_usec=60_000_000)

    sent = [notifier.watchdog() for _ in range(5)]

    assert sent == [True, False, False, False, False]
    assert notify_socket.drain() == ["WATCHDOG=1"]


def test_no_socket_makes_every_call_a_no_op() -> None:
    notifier = Notifier.from_environment({})

    assert not notifier.enabled
    assert not notifier.ready("Running")
    assert not notifier.watchdog()


def test_watchdog_for_another_process_is_ignored(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environment(
        {
            "NOTIFY_SOCKET": notify_socket.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
    )

    assert notifier.watchdog_interval_s is None
    assert not notifier.watchdog()


def test_unreachable_socket_returns_false_without_raising() -> None:
    notifier = Notifier("/nonexistent/edgenode/notify.sock")

    assert not notifier.ready("Running")


def test_relative_socket_path_is_ignored() -> None:
    assert not Notifier("notify.sock").enabled


# --- the daemon ---


class TriggeredSource:
    """A source that connects at once and emits one unreadable scan when ``trigger`` is set."""

    def __init__(self) -> None:
        self.name = "wedge"
        self.status = SourceStatus()
        self.trigger = threading.Event()

    async def run(self, emit: Emit) -> None:
        self.status.state = SourceState.CONNECTED
        deadline = time.monotonic() + TIMEOUT_S
        while not self.trigger.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.trigger.is_set():
            error = ReadError(Reason.SCANNER_LAYOUT_ERROR, "test scan")
            emit(ScanEvent(source=self.name, read_error=error))
        await asyncio.Event().wait()


class BlockingListener:
    """A verdict listener that blocks the pipeline thread until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, event: VerdictEvent) -> None:
        self.entered.set()
        self.release.wait(TIMEOUT_S)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site.create(tmp_path, int(time.time()), DirectMinter())


def make_daemon(
    site: Site, receiver: NotifySocket
) -> tuple[Daemon, TriggeredSource, BlockingListener]:
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    source = TriggeredSource()
    listener = BlockingListener()
    daemon = Daemon(config, [source], listeners=[listener], notifier=notifier_for(receiver))
    return daemon, source, listener


async def poll(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    """Poll ``check()`` until it returns true or ``timeout_s`` passes, and return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


def test_daemon_sends_ready_with_status(site: Site, notify_socket: NotifySocket) -> None:
    daemon, _, _ = make_daemon(site, notify_socket)

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        await poll(lambda: notify_socket.count("READY=1") > 0)
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())
    ready = [message for message in notify_socket.messages if "READY=1" in message]
    assert len(ready) == 1
    assert "STATUS=" in ready[0]


def test_daemon_sends_stopping_on_stop(site: Site, notify_socket: NotifySocket) -> None:
    daemon, _, _ = make_daemon(site, notify_socket)

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        await poll(lambda: notify_socket.count("READY=1") > 0)
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())
    assert notify_socket.count("STOPPING=1") == 1


def test_watchdog_pings_arrive_while_pipeline_works(
    site: Site, notify_socket: NotifySocket
) -> None:
    daemon, _, _ = make_daemon(site, notify_socket)

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        await poll(lambda: notify_socket.count("WATCHDOG=1") >= 3)
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())
    assert notify_socket.count("WATCHDOG=1") >= 3


def test_watchdog_pings_stop_while_pipeline_is_blocked(
    site: Site, notify_socket: NotifySocket
) -> None:
    daemon, source, listener = make_daemon(site, notify_socket)
    pings_while_blocked: list[str] = []
    pinged_after_release = False

    async def scenario() -> None:
        nonlocal pinged_after_release
        task = asyncio.create_task(daemon.run())
        try:
            await poll(lambda: notify_socket.count("WATCHDOG=1") >= 2)
            source.trigger.set()
            await poll(listener.entered.is_set)
            # Every ping sent before the pipeline thread entered the listener is queued by
            # now, because sendto() on a local datagram socket returns after queueing.
            notify_socket.drain()
            # Absence can only be shown over a window: any ping in it is a failure.
            await asyncio.sleep(SILENCE_S)
            pings_while_blocked.extend(m for m in notify_socket.drain() if "WATCHDOG=1" in m)
            before = notify_socket.count("WATCHDOG=1")
            listener.release.set()
            pinged_after_release = await poll(lambda: notify_socket.count("WATCHDOG=1") > before)
        finally:
            listener.release.set()
            daemon.stop()
            await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())
    assert listener.entered.is_set()
    assert pings_while_blocked == []
    assert pinged_after_release
