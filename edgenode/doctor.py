"""``edgenode doctor``: a field checklist of everything a gate needs, one line per check.

Each check is a small function that returns a ``Finding``: passed, failed (with what to do)
or skipped (not configured). ``run_checks`` runs them in order, each in a thread of its own
with a time limit, so a camera or broker that hangs fails that line after its timeout and the
checklist goes on. Messages are msgids, translated only when the checklist is printed.

Exit codes (the CLI's scheme): 0 every check passed or was skipped, 1 at least one check
failed, 2 a usage error or a config file that cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiomqtt
import cv2

from edgenode.cache import Cache
from edgenode.clock import NTP_SOURCES
from edgenode.config import (
    CameraSourceConfig,
    Config,
    ConfigError,
    HidSourceConfig,
    SerialSourceConfig,
    SourceConfig,
    VideoSourceConfig,
    load_config,
)
from edgenode.i18n import N_, Translator, language_from_env, translator
from edgenode.journal import Journal, JournalError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_CONFIG = Path("/etc/edgenode/edgenode.toml")

# A V4L2 camera can take a second or two to deliver its first frame after being opened.
CAMERA_TIMEOUT_S = 10.0
# Frames read before a camera that returns only failed reads counts as not delivering.
CAMERA_READ_ATTEMPTS = 5
BROKER_TIMEOUT_S = 10.0
# Verifying the hash chain reads every record of the journal.
JOURNAL_TIMEOUT_S = 120.0
DEFAULT_TIMEOUT_S = 10.0
# Applying a delta copies cache.db, so the state folder needs room for a second cache besides
# this floor for journal growth.
MIN_FREE_BYTES = 256 * 1024 * 1024


class Status(StrEnum):
    PASSED = "pass"
    FAILED = "fail"
    SKIPPED = "skip"


@dataclass(frozen=True, slots=True)
class Finding:
    """Result of one check. ``message`` and ``fix`` are msgids formatted with ``values``."""

    status: Status
    message: str
    fix: str = ""
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the checklist: the check's id (``camera:front``), its title and finding."""

    check: str
    title: str
    finding: Finding
    title_values: Mapping[str, Any] = field(default_factory=dict)


def passed(message: str, **values: Any) -> Finding:
    return Finding(Status.PASSED, message, "", values)


def failed(message: str, fix: str, **values: Any) -> Finding:
    return Finding(Status.FAILED, message, fix, values)


def skipped(message: str, **values: Any) -> Finding:
    return Finding(Status.SKIPPED, message, "", values)


OpenCapture = Callable[[CameraSourceConfig | VideoSourceConfig], Any]


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """Time limits and thresholds. Tests replace the camera opener."""

    camera_timeout_s: float = CAMERA_TIMEOUT_S
    broker_timeout_s: float = BROKER_TIMEOUT_S
    journal_timeout_s: float = JOURNAL_TIMEOUT_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    min_free_bytes: int = MIN_FREE_BYTES
    # Opens a camera or video source the way the daemon would. None uses the real backends.
    open_capture: OpenCapture | None = None


# --- the checks ---


def check_config(path: Path) -> tuple[Finding, Config | None]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        issues = "; ".join(f"{issue.key_path}: {issue.message}" for issue in exc.issues)
        finding = failed(
            N_("{path} is invalid: {issues}"),
            N_("Fix the keys listed, then run 'edgenode config check FILE'."),
            path=str(path),
            issues=issues,
        )
        return finding, None
    return passed(N_("{path} is valid."), path=str(path)), config


def _owner_only_problem(path: Path) -> str | None:
    """Return why a secret file is unusable (missing, or readable by others), else None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"mode {stat.S_IMODE(mode):04o}"
    return None


def check_keys(config: Config) -> Finding:
    """Check the device key, broker secrets and ID lookup key: present and owner-only."""
    secrets = [config.device_key_path]
    if config.sync.tls is not None and config.sync.tls.key_file is not None:
        secrets.append(config.sync.tls.key_file)
    if config.sync.password_file is not None:
        secrets.append(config.sync.password_file)
    if config.guard.id_lookup_key_file is not None:
        secrets.append(config.guard.id_lookup_key_file)
    missing = [path for path in secrets if _owner_only_problem(path) == "missing"]
    if missing:
        return failed(
            N_("Missing: {paths}"),
            N_("Create the device key with 'edgenode init'. Copy the other files into place: "
               "the [sync] secrets and guard.id_lookup_key_file."),
            paths=", ".join(str(path) for path in missing),
        )  # fmt: skip
    problems = {path: _owner_only_problem(path) for path in secrets}
    exposed = {path: problem for path, problem in problems.items() if problem is not None}
    if exposed:
        return failed(
            N_("Readable by others or unreadable: {paths}"),
            N_("Make them owner-only: chmod 600 FILE, owned by the service user."),
            paths=", ".join(f"{path} ({problem})" for path, problem in exposed.items()),
        )
    return passed(N_("{n} key files, owner-only."), n=len(secrets))


def open_source_capture(config: CameraSourceConfig | VideoSourceConfig) -> Any:
    """Open a camera or video file the way the daemon does. Raises OSError if it fails."""
    from drivers.camera import CaptureOpenError, Picamera2Capture, open_v4l2

    if isinstance(config, VideoSourceConfig):
        capture = cv2.VideoCapture(str(config.path))
        if not capture.isOpened():
            capture.release()
            raise CaptureOpenError(f"cannot open video file {config.path}")
        return capture
    if config.backend == "picamera2":
        return Picamera2Capture(config)
    return open_v4l2(config)


def check_camera(
    config: CameraSourceConfig | VideoSourceConfig, open_capture: OpenCapture | None = None
) -> Finding:
    """Open the camera and read frames until one arrives, as the daemon's grabber would.

    NOTE: a V4L2 camera streams to one process at a time, so while `edgenode run` holds it
    this check can fail. Not yet tried on a real camera.
    """
    opener = open_capture or open_source_capture
    fix = N_("Check the cable and the device path with 'edgenode devices'.")
    try:
        capture = opener(config)
    except (OSError, cv2.error, RuntimeError) as exc:
        return failed(N_("Cannot open: {error}"), fix, error=str(exc))
    try:
        for _ in range(CAMERA_READ_ATTEMPTS):
            ok, image = capture.read()
            if ok and image is not None and getattr(image, "size", 0) > 0:
                height, width = image.shape[:2]
                return passed(
                    N_("Opened and delivered a {width}x{height} frame."),
                    width=width,
                    height=height,
                )
    except (OSError, cv2.error) as exc:
        return failed(N_("Reading a frame failed: {error}"), fix, error=str(exc))
    finally:
        capture.release()
    return failed(N_("Opened, but delivered no frame in {n} reads."), fix, n=CAMERA_READ_ATTEMPTS)


def check_serial_scanner(config: SerialSourceConfig) -> Finding:
    """Open the scanner's port for reading and writing, as the daemon does, and close it."""
    try:
        descriptor = os.open(config.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return failed(
            N_("Cannot open {device}: {error}"),
            N_("Check the cable and the device path with 'edgenode devices'; the service "
               "user needs the 'dialout' group."),
            device=config.device,
            error=exc.strerror or str(exc),
        )  # fmt: skip
    try:
        if not os.isatty(descriptor):
            return failed(
                N_("{device} is not a serial port."),
                N_("Set the scanner's path under /dev/serial/by-id/, as 'edgenode devices' "
                   "lists it."),
                device=config.device,
            )  # fmt: skip
    finally:
        os.close(descriptor)
    return passed(N_("{device} opens."), device=config.device)


def check_hid_scanner(config: HidSourceConfig) -> Finding:
    try:
        from drivers.hid_scanner import (
            DeviceMatch,
            DeviceNotFound,
            find_device,
            list_input_devices,
            open_input_device,
        )
    except ImportError as exc:
        return failed(
            N_("Keyboard-like scanners cannot be read here: {error}"),
            N_("Install edgenode on Linux, where evdev is available."),
            error=str(exc),
        )
    try:
        device = find_device(DeviceMatch.from_config(config), list_input_devices, open_input_device)
    except (DeviceNotFound, OSError) as exc:
        return failed(
            N_("Not found: {error}"),
            N_("Plug the scanner in and compare its id with 'edgenode devices'."),
            error=str(exc),
        )
    path, name = str(device.path), device.name
    device.close()
    return passed(N_("Found {name} at {path}."), name=name, path=path)


def check_scanner(config: HidSourceConfig | SerialSourceConfig) -> Finding:
    if isinstance(config, SerialSourceConfig):
        return check_serial_scanner(config)
    return check_hid_scanner(config)


def check_broker(config: Config, timeout_s: float = BROKER_TIMEOUT_S) -> Finding:
    """Connect to the broker over TLS with the gate's credentials, then disconnect."""
    from sync.connection import _read_password, _tls_context

    sync = config.sync
    if not sync.enabled:
        return skipped(N_("Sync is off in the config."))
    broker = f"{sync.broker_host}:{sync.broker_port}"
    if sync.tls is None:
        return failed(
            N_("{broker} is set up without TLS."),
            N_("Add a [sync.tls] section: plain MQTT is for tests only."),
            broker=broker,
        )

    async def connect() -> None:
        client = aiomqtt.Client(
            sync.broker_host,
            sync.broker_port,
            username=sync.username,
            password=_read_password(sync),
            # Not the daemon's client id, so a check on a running gate does not take over
            # the daemon's session.
            identifier=f"{config.device.id}-doctor",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=_tls_context(sync),
            timeout=timeout_s,
        )
        async with asyncio.timeout(timeout_s), client:
            pass

    fix = N_("Check the broker address, the network, the CA file and the credentials in [sync].")
    try:
        asyncio.run(connect())
    except TimeoutError:
        return failed(
            N_("{broker} did not answer within {seconds} s."), fix, broker=broker, seconds=timeout_s
        )
    except (aiomqtt.MqttError, OSError, ValueError) as exc:
        return failed(N_("Cannot connect to {broker}: {error}"), fix, broker=broker, error=str(exc))
    return passed(N_("Connected to {broker} over TLS."), broker=broker)


def check_cache(config: Config, now: float | None = None) -> Finding:
    now = time.time() if now is None else now
    fix = N_("Check the sync with 'edgenode sync status', or import a snapshot.")
    with Cache(config.cache_path) as cache:
        datasets = cache.datasets()
    if not datasets:
        return failed(
            N_("The cache is empty: {path}"),
            N_("Import a snapshot with 'edgenode cache import', or turn on [sync]."),
            path=str(config.cache_path),
        )
    stale = [
        f"{info.name} ({int(now - info.issued_at) // 3600} h)"
        for info in datasets
        if now - info.issued_at > config.policy.stale_after_s or now > info.valid_until
    ]
    if stale:
        return failed(N_("Stale or expired: {datasets}"), fix, datasets=", ".join(stale))
    oldest = max(int(now - info.issued_at) for info in datasets)
    return passed(
        N_("{n} datasets, the oldest issued {hours} h ago."),
        n=len(datasets),
        hours=oldest // 3600,
    )


def check_clock(config: Config) -> Finding:
    """Ask the clock source that the config trusts (``clock.ntp_source``), as the daemon does."""
    source = config.clock.ntp_source
    synchronised = NTP_SOURCES[source]()
    if synchronised is None:
        return failed(
            N_("The clock source {source} cannot be read."),
            N_("Set clock.ntp_source to what this board has: 'kernel' (adjtimex), "
               "'timedatectl' (systemd-timesyncd) or 'rtc' (a battery-backed clock)."),
            source=source,
        )  # fmt: skip
    if not synchronised:
        return failed(
            N_("Not synchronised (as reported by {source})."),
            N_("Check that an NTP client runs and can reach its servers: timedatectl status."),
            source=source,
        )
    return passed(N_("Synchronised (as reported by {source})."), source=source)


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_disk(config: Config, min_free_bytes: int = MIN_FREE_BYTES) -> Finding:
    folder = _existing_parent(config.device.state_dir)
    usage = shutil.disk_usage(folder)
    try:
        cache_bytes = config.cache_path.stat().st_size
    except OSError:
        cache_bytes = 0
    needed = max(min_free_bytes, 2 * cache_bytes)
    free_mib, needed_mib = usage.free // 2**20, needed // 2**20
    if usage.free < needed:
        return failed(
            N_("{free} MiB free on {path}, below {needed} MiB."),
            N_("Free disk space: remove old files, or move state_dir to a larger disk."),
            path=str(folder),
            free=free_mib,
            needed=needed_mib,
        )
    return passed(N_("{free} MiB free on {path}."), path=str(folder), free=free_mib)


def check_journal(config: Config) -> Finding:
    path = config.journal_path
    if not path.exists():
        return skipped(N_("No journal yet: {path}"), path=str(path))
    try:
        with Journal(path, config.device.id) as journal:
            problems = journal.verify()
            count = journal.count()
    except JournalError as exc:
        return failed(
            N_("Cannot open: {error}"),
            N_("Keep the file for inspection and tell the district."),
            error=str(exc),
        )
    if problems:
        first = problems[0]
        return failed(
            N_("The chain is broken: {n} problems, the first at record {seq}: {problem}"),
            N_("Keep the file for inspection and tell the district: records were edited or "
               "deleted."),
            n=len(problems),
            seq=first.seq,
            problem=first.problem,
        )  # fmt: skip
    return passed(N_("The chain is intact: {n} records."), n=count)


# --- running the checklist ---


def with_timeout(check: Callable[[], Finding], timeout_s: float) -> Finding:
    """Run a check in a daemon thread and fail it if it has not returned after ``timeout_s``.

    A hung check's thread is left behind as a daemon thread, which does not delay the exit.
    """
    outcome: list[Finding] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(check())
        except Exception as exc:  # An unexpected error fails the one check, not the doctor.
            errors.append(exc)

    thread = threading.Thread(target=target, name="doctor-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return failed(
            N_("No answer within {seconds} s."),
            N_("The device or service hangs: check it, then run the doctor again."),
            seconds=timeout_s,
        )
    if errors:
        return failed(
            N_("The check failed: {error}"),
            N_("Report this error with the config file."),
            error=repr(errors[0]),
        )
    return outcome[0]


def check_no_sources() -> Finding:
    """Fail a config without ``[[sources]]``, which ``edgenode run`` refuses to start with."""
    return failed(
        N_("No [[sources]] in the config: the daemon has nothing to read codes from"),
        N_("Add a [[sources]] table for each camera or scanner (see the example config)."),
    )


def _source_checks(
    sources: list[SourceConfig], options: DoctorOptions
) -> Iterator[tuple[str, str, float, Callable[[], Finding]]]:
    if not sources:
        yield ("sources", N_("Cameras and scanners are configured"), 1.0, check_no_sources)
    for source in sources:
        if isinstance(source, CameraSourceConfig | VideoSourceConfig):
            yield (
                f"camera:{source.name}",
                N_("Camera {name} delivers frames"),
                options.camera_timeout_s,
                functools.partial(check_camera, source, options.open_capture),
            )
        else:
            yield (
                f"scanner:{source.name}",
                N_("Scanner {name} is present"),
                options.timeout_s,
                functools.partial(check_scanner, source),
            )


def run_checks(config_path: Path, options: DoctorOptions | None = None) -> list[CheckResult]:
    """Run every check in order. Without a usable config only the config check runs."""
    options = options or DoctorOptions()
    finding, config = check_config(config_path)
    results = [CheckResult("config", N_("Config file is valid"), finding)]
    if config is None:
        return results

    steps: list[tuple[str, str, float, Callable[[], Finding]]] = [
        ("keys", N_("Keys are present and owner-only"), options.timeout_s,
         lambda: check_keys(config)),
        *_source_checks(config.sources, options),
        ("broker", N_("Broker is reachable over TLS"), options.broker_timeout_s + 1,
         lambda: check_broker(config, options.broker_timeout_s)),
        ("cache", N_("Cache is fresh"), options.timeout_s, lambda: check_cache(config)),
        ("clock", N_("Clock is synchronised"), options.timeout_s, lambda: check_clock(config)),
        ("disk", N_("Disk space is sufficient"), options.timeout_s,
         lambda: check_disk(config, options.min_free_bytes)),
        ("journal", N_("Journal chain is intact"), options.journal_timeout_s,
         lambda: check_journal(config)),
    ]  # fmt: skip
    for check, title, timeout_s, function in steps:
        name = check.partition(":")[2]
        title_values = {"name": name} if name else {}
        results.append(CheckResult(check, title, with_timeout(function, timeout_s), title_values))
    return results


def exit_code(results: list[CheckResult]) -> int:
    if results[0].finding.status is Status.FAILED and results[0].check == "config":
        return EXIT_USAGE
    if any(result.finding.status is Status.FAILED for result in results):
        return EXIT_FAILED
    return EXIT_OK


def result_json(result: CheckResult, tr: Translator) -> dict[str, Any]:
    finding = result.finding
    return {
        "check": result.check,
        "status": str(finding.status),
        "title": tr.gettext(result.title).format(**result.title_values),
        "message": tr.gettext(finding.message).format(**finding.values),
        "fix": tr.gettext(finding.fix) if finding.fix else None,
        "values": dict(finding.values),
    }


STATUS_WORDS = {
    Status.PASSED: N_("PASS"),
    Status.FAILED: N_("FAIL"),
    Status.SKIPPED: N_("SKIP"),
}


def format_results(results: list[CheckResult], tr: Translator) -> list[str]:
    """Format the checklist for people: one line per check, and a fix under each failure."""
    lines = []
    for result in results:
        row = result_json(result, tr)
        word = tr.gettext(STATUS_WORDS[result.finding.status])
        lines.append(f"[{word}] {row['title']}: {row['message']}")
        if row["fix"]:
            lines.append("       " + tr.gettext("What to do: {fix}").format(fix=row["fix"]))
    counts = {status: 0 for status in Status}
    for result in results:
        counts[result.finding.status] += 1
    lines.append(
        tr.gettext("{passed} passed, {failed} failed, {skipped} skipped.").format(
            passed=counts[Status.PASSED],
            failed=counts[Status.FAILED],
            skipped=counts[Status.SKIPPED],
        )
    )
    return lines


# --- the command ---


def _cmd_doctor(args: argparse.Namespace) -> int:
    path = Path(args.config or os.environ.get("EDGENODE_CONFIG", DEFAULT_CONFIG))
    results = run_checks(path)
    tr: Translator = args.tr
    if getattr(args, "lang", None) is None:
        # The config's language applies once the config is known to be valid.
        try:
            language = load_config(path).display.language
        except ConfigError:
            language = None
        tr = translator(language or language_from_env())
    code = exit_code(results)
    if args.json:
        document = {
            "config": str(path),
            "passed": code == EXIT_OK,
            "checks": [result_json(result, tr) for result in results],
        }
        print(json.dumps(document, ensure_ascii=False, sort_keys=True))
    else:
        for line in format_results(results, tr):
            print(line)
    return code


def add_commands(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check config, keys, devices, broker, cache, clock, disk and journal; "
        "exit code 0 when all pass",
    )
    doctor.add_argument(
        "--config", help=f"config file (default: $EDGENODE_CONFIG, else {DEFAULT_CONFIG})"
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=_cmd_doctor)
