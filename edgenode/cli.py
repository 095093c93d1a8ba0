"""The ``edgenode`` command line. Only this module turns exceptions into exit codes.

Exit codes: 0 success, 1 the operation ran but failed (a rejected snapshot, a broken journal
chain, a file that cannot be read), 2 a usage or config error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.files import SourceError, iter_file_frames
from edgenode import decommission, district_cli, doctor, guard_cli, sync_cli
from edgenode.cache import Cache, CacheImportError, import_snapshot
from edgenode.cli_output import format_verdict_line, verdict_json
from edgenode.clock import CLOCK_STATE_FILE, NTP_SOURCES, ClockGuard
from edgenode.config import Config, ConfigError, load_config
from edgenode.decoders import DECODER_NAMES, create_decoder
from edgenode.i18n import LANGUAGES, N_, Translator, language_from_env, translator
from edgenode.journal import Journal, JournalError
from edgenode.logs import configure_logging
from edgenode.messages import outcome_word
from edgenode.pipeline import Gate, VerdictEvent, scan_files, system_clock
from edgenode.policy import ClockReading, Outcome

if TYPE_CHECKING:
    from edgenode.screen.server import ScreenServer
    from sync.connection import Connection

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# systemd and installers can tell a gate that never started from one that failed later.
EXIT_STARTUP = 3

# Messages for people for each SourceError reason of drivers/files.py.
SOURCE_ERRORS = {
    "file_not_found": N_("File not found: {path}"),
    "not_a_file": N_("Not a file: {path}"),
    "unreadable_image": N_("Cannot read the image: {path}"),
    "unreadable_video": N_("Cannot read the video: {path}"),
    "empty_video": N_("The video has no frames: {path}"),
    "unreadable_file": N_("Neither an image nor a video that can be read: {path}"),
}
DEFAULT_CONFIG = Path("/etc/edgenode/edgenode.toml")


class CommandError(Exception):
    """A failure to report to the user with an exit code, without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    return Path(os.environ.get("EDGENODE_CONFIG", DEFAULT_CONFIG))


def _load(args: argparse.Namespace) -> Config:
    path = _config_path(args)
    config = load_config(path)
    if args.lang is None:
        args.tr = translator(config.display.language or language_from_env())
    return config


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, sort_keys=True), flush=True)


# --- scan ---


def _cmd_scan(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    clock = system_clock
    if args.now is not None or args.clock_unsynchronised:
        offset = 0.0 if args.now is None else float(args.now) - time.time()
        synchronised = not args.clock_unsynchronised

        def clock() -> ClockReading:
            return ClockReading(now=time.time() + offset, synchronised=synchronised)

    decoder = create_decoder(args.decoder or config.decoder.backend)
    counts: dict[Outcome, int] = {}
    with (
        Cache(config.cache_path) as cache,
        Journal(config.journal_path, config.device.id) as journal,
    ):
        gate = Gate(config, cache, journal, decoder, clock=clock)

        def on_verdict(event: VerdictEvent, path: Path) -> None:
            counts[event.verdict.outcome] = counts.get(event.verdict.outcome, 0) + 1
            if args.json:
                _print_json(verdict_json(event, str(path), tr))
            else:
                print(f"{path.name} {format_verdict_line(event, tr)}", flush=True)

        scan_files(gate, [Path(p) for p in args.files], on_verdict)
    if not args.json:
        summary = ", ".join(
            f"{outcome_word(outcome, tr)} {count}" for outcome, count in sorted(counts.items())
        )
        print(tr.gettext("Verdicts: {summary}").format(summary=summary or "0"))
    return EXIT_OK


# --- decode ---


def _cmd_decode(args: argparse.Namespace) -> int:
    if args.live:
        return _cmd_decode_live(args)
    if not args.files:
        raise CommandError("give image or video files, or --live SOURCE", EXIT_USAGE)
    decoder = create_decoder(args.decoder)
    tr: Translator = args.tr
    for name in args.files:
        path = Path(name)
        seen: dict[bytes, dict[str, Any]] = {}
        for frame in iter_file_frames(path):
            for symbol in decoder.decode(frame.frame):
                entry = seen.get(symbol.data)
                if entry is None:
                    seen[symbol.data] = {
                        "file": str(path),
                        "frame": frame.index,
                        "time_s": round(frame.timestamp_s, 3),
                        "frames": 1,
                        "text": symbol.text
                        if symbol.text is not None
                        else symbol.data.decode("utf-8", errors="replace"),
                        "utf8": _is_utf8(symbol.data),
                        "hex": symbol.data.hex(),
                        "corners": [list(point) for point in symbol.corners],
                    }
                else:
                    entry["frames"] += 1
        for entry in seen.values():
            if args.json:
                _print_json(entry)
            else:
                print(f"{entry['file']}\t{entry['text']}")
        if not seen and not args.json:
            print(tr.gettext("{file}: no QR code found").format(file=path), file=sys.stderr)
    return EXIT_OK


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- cache ---


def _cmd_cache_import(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    try:
        header = import_snapshot(
            config.cache_path,
            Path(args.snapshot),
            config.trust.district_key_bytes(),
            site=config.device.site,
        )
    except CacheImportError as exc:
        message = tr.gettext("Snapshot rejected ({reason}); the cache in use is unchanged: {error}")
        raise CommandError(message.format(reason=exc.reason, error=exc)) from exc
    print(
        tr.gettext("Imported snapshot version {version} for site {site}: {count} records").format(
            version=header.version, site=header.site, count=header.record_count
        )
    )
    return EXIT_OK


def _cmd_cache_status(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    now = time.time()
    with Cache(config.cache_path) as cache:
        datasets = cache.datasets()
    rows: list[dict[str, Any]] = [
        {
            "dataset": info.name,
            "version": info.version,
            "rows": info.rows,
            "issued_at": info.issued_at,
            "synced_at": info.synced_at,
            "valid_until": info.valid_until,
            "age_s": int(now - info.issued_at),
            "stale": now - info.issued_at > config.policy.stale_after_s or now > info.valid_until,
        }
        for info in datasets
    ]
    if args.json:
        _print_json({"cache": str(config.cache_path), "datasets": rows})
        return EXIT_OK
    if not rows:
        print(tr.gettext("The cache is empty: import a snapshot with 'edgenode cache import'."))
        return EXIT_OK
    print(tr.gettext("Dataset, version, rows, age, synced at"))
    for row in rows:
        stale = tr.gettext("(stale)") if row["stale"] else ""
        synced = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["synced_at"]))
        age = _format_age(row["age_s"], tr)
        columns = f"{row['dataset']:<16} v{row['version']:<6} {row['rows']:>9}  {age:>10}"
        print(f"  {columns}  {synced} {stale}")
    return EXIT_OK


def _format_age(seconds: int, tr: Translator) -> str:
    if seconds < 3600:
        return tr.gettext("{n} min").format(n=max(seconds, 0) // 60)
    if seconds < 86400:
        return tr.gettext("{n} h").format(n=seconds // 3600)
    return tr.gettext("{n} d").format(n=seconds // 86400)


# --- journal ---


def _cmd_journal_verify(args: argparse.Namespace) -> int:
    config = _load(args)
    tr: Translator = args.tr
    if not config.journal_path.exists():
        raise CommandError(tr.gettext("Journal not found: {path}").format(path=config.journal_path))
    with Journal(config.journal_path, config.device.id) as journal:
        problems = journal.verify()
        count = journal.count()
        anchor = journal.anchor()
    if problems:
        for problem in problems:
            print(
                tr.gettext("Record {seq}: {problem}").format(
                    seq=problem.seq, problem=problem.problem
                )
            )
        print(
            tr.gettext("The journal chain is broken. Problems found: {n}.").format(n=len(problems))
        )
        return EXIT_FAILED
    print(tr.gettext("The journal chain is intact: {n} records.").format(n=count))
    if anchor.purged_records:
        purged = tr.gettext(
            "{n} older records, up to seq {seq}, were purged after the retention period."
        )
        print(purged.format(n=anchor.purged_records, seq=anchor.seq))
    return EXIT_OK


# --- config ---


def _cmd_config_check(args: argparse.Namespace) -> int:
    tr: Translator = args.tr
    path = Path(args.file)
    try:
        load_config(path)
    except ConfigError as exc:
        print(tr.gettext("{path} is invalid:").format(path=path))
        for issue in exc.issues:
            print(f"  {issue.key_path}: {issue.message}")
        return EXIT_USAGE
    print(tr.gettext("{path} is valid.").format(path=path))
    return EXIT_OK


def _build_sources(config: Config, names: Sequence[str] | None = None) -> list[Any]:
    from drivers import create_source

    chosen = [s for s in config.sources if names is None or s.name in names]
    if names is not None:
        unknown = sorted(set(names) - {s.name for s in chosen})
        if unknown:
            known = ", ".join(s.name for s in config.sources) or "-"
            raise CommandError(
                f"unknown source {', '.join(unknown)}; configured: {known}", EXIT_USAGE
            )
    patterns = config.policy.compiled_token_patterns()
    return [
        create_source(source, decoder_backend=config.decoder.backend, token_patterns=patterns)
        for source in chosen
    ]


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from edgenode.daemon import Daemon

    config = _load(args)
    tr: Translator = args.tr
    if not config.sources:
        raise CommandError(tr.gettext("No [[sources]] in the config: nothing to read."), EXIT_USAGE)
    from edgenode.upkeep import set_aside_corrupt_cache
    from sync.identity import DeviceKeyError
    from sync.service import SyncService

    listeners: list[Any] = []
    override_listeners: list[Any] = []
    services: list[Any] = []
    guard = ClockGuard(
        config.device.state_dir / CLOCK_STATE_FILE,
        NTP_SOURCES[config.clock.ntp_source],
        district_skew_limit_s=config.sync.clock_skew_alarm_s,
    )
    clock = guard.read
    network: Connection | None = None
    screen: ScreenServer | None = None
    # Voice prompts and door outputs: closed after the daemon stops, or when start-up fails.
    outputs: list[Any] = []
    try:
        # Before the downlink reads the cache's version, which fails on a corrupt file.
        cache_alarms = set_aside_corrupt_cache(config)
        if config.sync.enabled:
            sync = SyncService.from_config(config)
            listeners.append(sync.on_verdict)
            services.extend(sync.tasks())
            guard.district_skews = sync.district_skews
            network = sync.connection
        if config.screen.enabled:
            from edgenode.screen.server import ScreenServer

            screen = ScreenServer(config.screen, tr, network=network)
            listeners.append(screen.on_verdict)
            override_listeners.append(screen.on_override)
        outputs = _open_outputs(config, tr)
        listeners.extend(output.on_verdict for output in outputs)
        override_listeners.extend(output.on_override for output in outputs)
        daemon = Daemon(
            config,
            _build_sources(config),
            listeners=listeners,
            services=services,
            clock=clock,
            override_listeners=override_listeners,
        )
        if screen is not None:
            daemon.services.append(screen.service(daemon))
        daemon.open()
        daemon.config_loader = lambda: load_config(_config_path(args))
        if config.sync.enabled:
            for alarm in [*cache_alarms, *daemon.startup_alarms]:
                sync.uplink.raise_alarm(alarm.as_alarm())
        if config.sync.enabled:
            daemon.metrics.set_broker_state(lambda: sync.connection.state.value)
        if config.metrics.enabled:
            daemon.metrics.start_server()
    except (JournalError, DeviceKeyError, OSError, ValueError, sqlite3.Error) as exc:
        _close_outputs(outputs)
        raise CommandError(
            tr.gettext("Start-up failed: {error}").format(error=exc), EXIT_STARTUP
        ) from exc
    try:
        asyncio.run(daemon.run())
    finally:
        _close_outputs(outputs)
        daemon.metrics.stop_server()
        guard.save()
    return EXIT_OK


def _open_outputs(config: Config, tr: Translator) -> list[Any]:
    """Start the voice prompts and open the door outputs that the config enables."""
    from drivers.gpio import DoorOutputs, GpioError
    from drivers.voice import VoiceError, VoicePrompter

    outputs: list[Any] = []
    try:
        if config.voice.enabled:
            language = config.display.language or language_from_env()
            voice = VoicePrompter(config.voice, language)
            voice.start()
            outputs.append(voice)
        if config.door.enabled:
            door = DoorOutputs(config.door)
            door.open()
            outputs.append(door)
    except (VoiceError, GpioError) as exc:
        _close_outputs(outputs)
        raise CommandError(
            tr.gettext("Start-up failed: {error}").format(error=exc), EXIT_STARTUP
        ) from exc
    return outputs


def _close_outputs(outputs: Sequence[Any]) -> None:
    """Close outputs in reverse order; the door relay ends at its inactive level."""
    for output in reversed(outputs):
        output.close()


def _cmd_devices(args: argparse.Namespace) -> int:
    from drivers.discovery import find_devices

    tr: Translator = args.tr
    devices = find_devices()
    if args.json:
        for device in devices:
            _print_json({field: getattr(device, field) for field in device.__slots__})
        return EXIT_OK
    if not devices:
        print(tr.gettext("No cameras, input devices or serial ports found."))
        return EXIT_OK
    kinds = {
        "camera": tr.gettext("camera"),
        "input": tr.gettext("input device"),
        "serial": tr.gettext("serial port"),
    }
    for device in devices:
        config_path = device.stable_path or device.path
        details = "  ".join(part for part in (device.vid_pid, device.note) if part)
        print(f"{kinds[device.kind]:<8} {config_path}  {device.name}  {details}")
    return EXIT_OK


def _cmd_decode_live(args: argparse.Namespace) -> int:
    import asyncio

    from edgenode.sources import ScanEvent

    config = _load(args)
    tr: Translator = args.tr
    (source,) = _build_sources(config, [args.live])
    printed = 0

    async def read() -> None:
        nonlocal printed
        done = asyncio.Event()

        def show(event: ScanEvent) -> None:
            nonlocal printed
            if event.read_error is not None:
                rows = [{"source": event.source, "error": str(event.read_error.reason)}]
            else:
                rows = [
                    {"source": event.source, "text": payload.decode("utf-8", errors="replace")}
                    for payload in event.payloads
                ]
            for row in rows:
                if args.json:
                    _print_json(row)
                elif "error" in row:
                    error = tr.gettext("read error: {reason}").format(reason=row["error"])
                    print(f"{row['source']}\t{error}", flush=True)
                else:
                    print(f"{row['source']}\t{row['text']}", flush=True)
            printed += 1
            if args.count and printed >= args.count:
                done.set()

        task = asyncio.create_task(source.run(show))
        try:
            await asyncio.wait_for(done.wait(), timeout=args.seconds)
        except TimeoutError:
            pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(read())
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgenode.demo.run import run_demo

    return run_demo(Path(args.dir), people=args.people, tr=args.tr, json_output=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgenode",
        description="Edge node for health-code and community-code checks at residential gates.",
    )
    parser.add_argument(
        "--lang",
        choices=LANGUAGES,
        help="language of messages for people "
        "(default: the config's, else $EDGENODE_LANG, else zh_CN)",
    )
    parser.add_argument(
        "--log-level",
        help="log level: debug, info, warning or error (default: info for 'run', else warning)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            help=f"config file (default: $EDGENODE_CONFIG, else {DEFAULT_CONFIG})",
        )

    demo = commands.add_parser("demo", help="build a demo site, render gate footage and scan it")
    demo.add_argument(
        "--dir", default="demo-site", help="folder for the demo site (default: demo-site)"
    )
    demo.add_argument("--people", type=int, default=16, help="people in the footage (default: 16)")
    demo.add_argument("--json", action="store_true", help="print one JSON object per verdict")
    demo.set_defaults(handler=_cmd_demo)

    scan = commands.add_parser("scan", help="decode, check and decide images or videos")
    with_config(scan)
    scan.add_argument("--json", action="store_true", help="print one JSON object per verdict")
    scan.add_argument("--decoder", choices=DECODER_NAMES, help="override the config's decoder")
    scan.add_argument(
        "--now",
        type=float,
        help="decide as if the clock read this Unix time (for replaying recorded footage)",
    )
    scan.add_argument(
        "--clock-unsynchronised",
        action="store_true",
        help="treat the clock as not synchronised, as before NTP answers after a boot",
    )
    scan.add_argument("files", nargs="+", metavar="FILE", help="image or video files")
    scan.set_defaults(handler=_cmd_scan)

    decode = commands.add_parser("decode", help="print the exact payload of every QR code found")
    decode.add_argument("--json", action="store_true", help="print one JSON object per code")
    decode.add_argument(
        "--decoder", choices=DECODER_NAMES, default="zxing", help="decoder (default: zxing)"
    )
    decode.add_argument(
        "--live",
        metavar="SOURCE",
        help="read from the configured source with this name and print what it reads",
    )
    with_config(decode)
    decode.add_argument(
        "--count",
        type=int,
        default=0,
        help="with --live: stop after this many reads (a frame with two codes is one read)",
    )
    decode.add_argument(
        "--seconds", type=float, default=None, help="with --live: stop after this many seconds"
    )
    decode.add_argument("files", nargs="*", metavar="FILE", help="image or video files")

    run = commands.add_parser("run", help="run the gate daemon on the configured sources")
    with_config(run)
    run.set_defaults(handler=_cmd_run)

    devices = commands.add_parser(
        "devices", help="list cameras, input devices and serial ports with their stable paths"
    )
    devices.add_argument("--json", action="store_true", help="print one JSON object per device")
    devices.set_defaults(handler=_cmd_devices)
    decode.set_defaults(handler=_cmd_decode)

    cache = commands.add_parser("cache", help="the local data cache").add_subparsers(
        dest="cache_command", required=True, metavar="COMMAND"
    )
    cache_import = cache.add_parser("import", help="import a snapshot signed by the district")
    with_config(cache_import)
    cache_import.add_argument("snapshot", help="snapshot file")
    cache_import.set_defaults(handler=_cmd_cache_import)
    cache_status = cache.add_parser("status", help="show each dataset's version and age")
    with_config(cache_status)
    cache_status.add_argument("--json", action="store_true", help="print JSON")
    cache_status.set_defaults(handler=_cmd_cache_status)

    journal = commands.add_parser("journal", help="the verdict journal").add_subparsers(
        dest="journal_command", required=True, metavar="COMMAND"
    )
    verify = journal.add_parser("verify", help="check the journal's hash chain")
    with_config(verify)
    verify.set_defaults(handler=_cmd_journal_verify)

    config = commands.add_parser("config", help="configuration files").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    check = config.add_parser("check", help="validate a config file and list every error")
    check.add_argument("file", help="TOML config file")
    check.set_defaults(handler=_cmd_config_check)

    district_cli.add_commands(commands)
    sync_cli.add_commands(commands)
    guard_cli.add_commands(commands)
    doctor.add_commands(commands)
    decommission.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    serving = args.command == "run" or getattr(args, "district_command", None) == "serve"
    configure_logging(args.log_level or ("info" if serving else "warning"))
    args.tr = translator(args.lang or language_from_env())
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        print(args.tr.gettext("Invalid config {path}:").format(path=exc.path), file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue.key_path}: {issue.message}", file=sys.stderr)
        if not exc.path.exists():
            hint = args.tr.gettext("Name the config file with --config FILE or $EDGENODE_CONFIG.")
            print(hint, file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except (JournalError, CacheImportError, district_cli.DistrictError, FileExistsError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    except SourceError as exc:
        template = SOURCE_ERRORS.get(exc.reason)
        message = str(exc) if template is None else args.tr.gettext(template).format(path=exc.path)
        print(message, file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader of a pipe stopped early (``edgenode cache status | head``). Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return result


if __name__ == "__main__":
    sys.exit(main())
