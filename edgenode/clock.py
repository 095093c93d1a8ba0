"""Clock trust for a board without a clock battery.

A Raspberry Pi has no clock battery: it starts with a time that can be days old (the time that
fake-hwclock saved at the last shutdown, where it is installed) and keeps it until an NTP
server replies. ``ClockGuard`` therefore trusts the wall clock only while something outside
vouches for it: the kernel's NTP state, systemd-timesyncd, a battery-backed clock that the
installer declared, or the district's time in a sync message.

Whatever the source, a clock reading earlier than the last time the guard trusted counts as
a backward jump and is untrusted. That last good time is kept in a small JSON file, so the
check works across reboots. Within one run the guard also extrapolates the last good time
with the monotonic clock, so a step back of more than ``BACKWARD_TOLERANCE_S`` is caught at
once and not only when the wall clock falls below the saved value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

from edgenode.policy import ClockReading

log = structlog.get_logger("edgenode.clock")

# Returns True when an NTP client has synchronised the clock, False when not, and None when
# the status cannot be read (which the guard treats as not synchronised).
NtpStatus = Callable[[], bool | None]
# Returns the latest known differences between this clock and the district's, in seconds.
DistrictSkews = Callable[[], Iterable[float | None]]

CLOCK_STATE_FILE = "clock.json"
# A wall clock this far behind the extrapolated last good time has jumped backwards.
BACKWARD_TOLERANCE_S = 2.0
# How often the NTP status is read, because timedatectl starts a process each time.
NTP_CHECK_INTERVAL_S = 30.0
# How often the last good time is written while trusted, to spare the SD card.
SAVE_INTERVAL_S = 300.0
TIMEDATECTL_TIMEOUT_S = 5.0

# adjtimex(2): the kernel sets STA_UNSYNC in the status word until an NTP client has
# disciplined the clock, and the call returns TIME_ERROR (5) while it is unsynchronised.
_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class _Timex(ctypes.Structure):
    """struct timex from <sys/timex.h> (Linux, glibc), up to the padding."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig, so it runs once per process.
    name = ctypes.util.find_library("c")
    try:
        return None if name is None else ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def kernel_ntp_synchronised() -> bool | None:
    """Read the kernel's NTP state with adjtimex(2) in read-only mode (modes = 0)."""
    libc = _libc()
    if libc is None:
        return None
    try:
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not timex.status & _STA_UNSYNC


def timedatectl_ntp_synchronised() -> bool | None:
    """Ask systemd (``timedatectl show -p NTPSynchronized``) whether NTP has synchronised."""
    try:
        result = subprocess.run(
            ["timedatectl", "show", "--property=NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=TIMEDATECTL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = result.stdout.strip()
    if result.returncode != 0 or value not in ("yes", "no"):
        return None
    return value == "yes"


def battery_clock_synchronised() -> bool:
    """Vouch for the clock always, for boards whose installer fitted a battery-backed clock."""
    return True


def first_known(*sources: NtpStatus) -> NtpStatus:
    """Combine NTP sources: the first one that can read the state decides."""

    def status() -> bool | None:
        for source in sources:
            synchronised = source()
            if synchronised is not None:
                return synchronised
        return None

    return status


NTP_SOURCES: dict[str, NtpStatus] = {
    # systemd's ProtectClock= (set in systemd/edgenode.service) makes adjtimex(2) fail with
    # EPERM even for reading, so there the state comes from timedatectl.
    "auto": first_known(kernel_ntp_synchronised, timedatectl_ntp_synchronised),
    "kernel": kernel_ntp_synchronised,
    "timedatectl": timedatectl_ntp_synchronised,
    "rtc": battery_clock_synchronised,
}


class ClockGuard:
    """The wall clock with a trust flag; ``read`` is the gate's clock.

    ``district_skews`` and ``district_skew_limit_s`` come from the sync service: a known skew
    within the limit vouches for the clock, a skew beyond it makes the clock untrusted even
    when NTP is synchronised. ``wall`` and ``monotonic`` are injectable for tests.
    """

    def __init__(
        self,
        state_path: Path,
        ntp_status: NtpStatus,
        *,
        district_skews: DistrictSkews = tuple,
        district_skew_limit_s: float = 120.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_path = state_path
        self.ntp_status = ntp_status
        self.district_skews = district_skews
        self.district_skew_limit_s = district_skew_limit_s
        self._wall = wall
        self._monotonic = monotonic
        self._ntp_synchronised = False
        self._ntp_checked_at: float | None = None
        self._saved_good = _load_last_good(state_path)
        # The last trusted reading as (wall time, monotonic time), or None.
        self._good: tuple[float, float] | None = None
        self._saved_at: float | None = None
        self._untrusted_reason: str | None = "not_checked"

    @property
    def last_good_time(self) -> float | None:
        """The latest wall time the guard trusted, in this run or a previous one."""
        if self._good is not None:
            return self._good[0]
        return self._saved_good

    def read(self) -> ClockReading:
        """Read the wall clock and decide whether to trust it."""
        now = self._wall()
        mono = self._monotonic()
        reason = self._distrust_reason(now, mono)
        self._log_change(reason, now)
        if reason is None:
            self._good = (now, mono)
            if self._saved_at is None or mono - self._saved_at >= SAVE_INTERVAL_S:
                self.save()
        return ClockReading(now=now, synchronised=reason is None)

    def save(self) -> None:
        """Write the last good time to disk. A failed write is logged, and the check then covers
        only this run."""
        good = self.last_good_time
        if good is None:
            return
        self._saved_at = self._monotonic()
        temporary = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            temporary.write_text(json.dumps({"last_good_time": good}), encoding="utf-8")
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            temporary.replace(self.state_path)
        except OSError as exc:
            log.warning("clock_state_write_failed", path=str(self.state_path), error=str(exc))
            return
        self._saved_good = good

    def _distrust_reason(self, now: float, mono: float) -> str | None:
        if self._good is not None:
            good_wall, good_mono = self._good
            if now < good_wall + (mono - good_mono) - BACKWARD_TOLERANCE_S:
                return "jumped_backwards"
        elif self._saved_good is not None and now < self._saved_good - BACKWARD_TOLERANCE_S:
            return "behind_last_good_time"
        skews = [skew for skew in self.district_skews() if skew is not None]
        if any(abs(skew) > self.district_skew_limit_s for skew in skews):
            return "district_time_disagrees"
        if skews:
            return None  # The district's time vouches for the clock.
        if not self._check_ntp(mono):
            return "ntp_unsynchronised"
        return None

    def _check_ntp(self, mono: float) -> bool:
        if self._ntp_checked_at is None or mono - self._ntp_checked_at >= NTP_CHECK_INTERVAL_S:
            self._ntp_checked_at = mono
            self._ntp_synchronised = self.ntp_status() is True
        return self._ntp_synchronised

    def _log_change(self, reason: str | None, now: float) -> None:
        if reason == self._untrusted_reason:
            return
        self._untrusted_reason = reason
        if reason is None:
            log.info("clock_trusted", now=now)
        else:
            log.warning("clock_untrusted", reason=reason, now=now, last_good=self.last_good_time)


def _load_last_good(path: Path) -> float | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A damaged file loses only the cross-reboot check, never a verdict.
        log.warning("clock_state_unreadable", path=str(path), error=str(exc))
        return None
    value = data.get("last_good_time") if isinstance(data, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    log.warning("clock_state_unreadable", path=str(path), error="no last_good_time")
    return None
