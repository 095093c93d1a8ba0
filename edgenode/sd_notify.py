"""Service status for systemd over the sd_notify protocol: readiness, watchdog, stopping.

The protocol is documented in sd_notify(3): the service manager passes a datagram socket in
$NOTIFY_SOCKET (a file path, or an abstract name written with a leading "@"), and the service
sends newline-separated VARIABLE=value lines to it. $WATCHDOG_USEC carries WatchdogSec= in
microseconds and $WATCHDOG_PID the process it applies to.

This is a few lines over the standard library rather than a dependency. The `sdnotify` package
has had no release since 2017. systemd-python is a C extension that needs the libsystemd
headers to build, which the offline wheel bundle for a Raspberry Pi cannot count on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("edgenode.sd_notify")


class Notifier:
    """Sends state changes to systemd; every method is a no-op outside a Type=notify unit.

    Sending never raises: a notification that fails is logged (once until one succeeds again)
    and the daemon goes on, because the gate must keep deciding even if systemd is restarting.
    """

    def __init__(self, socket_address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(socket_address)
        self.watchdog_interval_s = (
            watchdog_usec / 1_000_000 if watchdog_usec and self._address else None
        )
        self._last_ping = -float("inf")
        self._failing = False
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier from $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        watchdog_usec: int | None = None
        watchdog_pid = env.get("WATCHDOG_PID", "")
        # systemd sets WATCHDOG_PID to the main process, so a child that inherited the
        # environment must not ping in its parent's place.
        if not watchdog_pid or watchdog_pid == str(os.getpid()):
            try:
                watchdog_usec = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                watchdog_usec = None
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify(f"STOPPING=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        """Ping the watchdog, at most twice per interval as sd_watchdog_enabled(3) advises.

        Call it from the loop whose progress it vouches for. Returns True when a ping was sent.
        """
        if self.watchdog_interval_s is None:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._last_ping < self.watchdog_interval_s / 2:
                return False
            self._last_ping = now
        return self.notify("WATCHDOG=1")

    def notify(self, message: str) -> bool:
        """Send one message of newline-separated assignments. Returns True when it was sent."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failing:
                log.warning("sd_notify_failed", message=message.split("\n")[0], error=repr(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify_recovered")
        self._failing = False
        return True


def _socket_address(value: str | None) -> str | None:
    """Turn $NOTIFY_SOCKET into an address for sendto(), or None when it is unset or unusable.

    NOTE: newer systemd releases may also pass "vsock:CID:PORT" (a virtual machine's host).
    Such an address is ignored here, so a gate run that way sends no notifications.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("sd_notify_socket_unsupported", address=value)
    return None
