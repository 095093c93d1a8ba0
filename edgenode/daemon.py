"""The gate daemon: every configured source feeds one pipeline that decides and records.

Start-up, in order: open the cache and the journal, build the gate, start one supervised task
per source, the pipeline task and the pairing ticker. Shut-down undoes it in reverse: sources
are cancelled first (so nothing new arrives), the queued scans are decided, lone codes still
waiting for a partner are resolved as incomplete, and the journal is closed. A second SIGTERM
or SIGINT during that ends the process at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from edgenode.cache import Cache
from edgenode.config import Config
from edgenode.decoders import create_decoder
from edgenode.gate_status import GateStatus, TodayCounts, read_status
from edgenode.guard_desk import GuardDesk, GuardSession, OverrideDecision, OverrideEvent
from edgenode.guards import GuardStore
from edgenode.i18n import N_, language_from_env, translator
from edgenode.id_numbers import read_id_lookup_key
from edgenode.journal import Journal
from edgenode.metrics import GateMetrics
from edgenode.pipeline import Gate, VerdictEvent, WallClock, system_clock
from edgenode.sd_notify import Notifier
from edgenode.sources import ScanEvent, Source, SourceState
from edgenode.upkeep import StorageAlarm, open_storage, purge_step, reload_config

log = structlog.get_logger("edgenode.daemon")

# Exit code when a second signal forces the exit before the clean stop finished.
EXIT_FORCED = 130
QUEUE_SIZE = 1024
# A second stop signal this soon after the first is the same request delivered twice.
REPEAT_SIGNAL_S = 0.5
TICK_INTERVAL_S = 0.2
# How often the daemon checks that at least one source is connected, in seconds.
SOURCE_CHECK_INTERVAL_S = 30.0
RESTART_BACKOFF_MAX_S = 30.0

VerdictListener = Callable[[VerdictEvent], None]
OverrideListener = Callable[[OverrideEvent], None]
# A named background coroutine that runs as long as the daemon, such as the MQTT uplink.
Service = tuple[str, Callable[[], Awaitable[None]]]


class Daemon:
    def __init__(
        self,
        config: Config,
        sources: Sequence[Source],
        *,
        listeners: Sequence[VerdictListener] = (),
        services: Sequence[Service] = (),
        clock: WallClock = system_clock,
        override_listeners: Sequence[OverrideListener] = (),
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.sources = list(sources)
        self.listeners = list(listeners)
        self.override_listeners = list(override_listeners)
        self.services = list(services)
        self.clock = clock
        # Readiness, watchdog pings and status lines for systemd. Outside a unit they do nothing.
        self.systemd = notifier if notifier is not None else Notifier.from_environment()
        self._tr = translator(config.display.language or language_from_env())
        self.scans_dropped = 0
        self._stop = asyncio.Event()
        self._signals = 0
        self._first_signal_at = 0.0
        # One thread owns the SQLite connections, so verdicts are recorded in arrival order
        # and a slow fsync never stalls the event loop that the scanners depend on.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._queue: asyncio.Queue[ScanEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._cache: Cache | None = None
        self._journal: Journal | None = None
        self._gate: Gate | None = None
        # Corrupt state files that open() moved aside, for the caller to send upstream.
        self.startup_alarms: list[StorageAlarm] = []
        # Reads the config file again on SIGHUP; None when the daemon has no file to read.
        self.config_loader: Callable[[], Config] | None = None
        self._reload_task: asyncio.Task[bool] | None = None
        self.services.append(("journal-retention", self._retain))
        self._desk: GuardDesk | None = None
        self._counts_today = TodayCounts()
        self.metrics = GateMetrics(
            config,
            self.sources,
            queued_scans=self._queue.qsize,
            scans_dropped=lambda: self.scans_dropped,
        )

    # --- life cycle ---

    def open(self) -> None:
        """Open the cache and the journal. Errors here are start-up failures."""
        self._cache, self._journal, self.startup_alarms = open_storage(self.config)
        decoder = create_decoder(self.config.decoder.backend)
        self._gate = Gate(self.config, self._cache, self._journal, decoder, clock=self.clock)
        self._desk = self._open_guard_desk(self._journal)
        self._counts_today.seed(self._journal, self.clock().now)
        if self._cache.is_empty():
            log.warning("cache_empty", path=str(self.config.cache_path))

    async def run(self) -> None:
        """Run until stop() is called or a signal arrives, then stop cleanly."""
        if self._gate is None:
            self.open()
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        log.info(
            "daemon_started",
            device=self.config.device.id,
            site=self.config.device.site,
            sources=[source.name for source in self.sources],
        )
        source_tasks = [
            asyncio.create_task(self._supervise(source), name=f"source:{source.name}")
            for source in self.sources
        ]
        service_tasks = [
            asyncio.create_task(self._supervise_service(name, start), name=name)
            for name, start in self.services
        ]
        pipeline = asyncio.create_task(self._consume(), name="pipeline")
        ticker = asyncio.create_task(self._tick(), name="pairing-ticker")
        watcher = asyncio.create_task(self._watch_sources(), name="source-watcher")
        self.systemd.ready(self._sources_status())
        try:
            await self._stop.wait()
        finally:
            self.systemd.stopping(self._tr.gettext(N_("Stopping: deciding the queued scans")))
            # Sources first, so that nothing new arrives while the queue drains. Unsent records
            # stay in the journal for the next start, so services stop with them.
            for task in source_tasks + service_tasks:
                task.cancel()
            await asyncio.gather(*source_tasks, *service_tasks, return_exceptions=True)
            ticker.cancel()
            watcher.cancel()
            await asyncio.gather(ticker, watcher, return_exceptions=True)
            await self._queue.join()
            pipeline.cancel()
            await asyncio.gather(pipeline, return_exceptions=True)
            await self._in_pipeline(self._flush)
            self._close()
            log.info("daemon_stopped", device=self.config.device.id)

    def stop(self) -> None:
        self._stop.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError):
                return  # Not the main thread (tests): the caller stops the daemon itself.
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        # Tools such as GNU timeout signal the process and then its process group, so one
        # request arrives twice within milliseconds. Only a later signal forces the exit.
        if self._signals and now - self._first_signal_at < REPEAT_SIGNAL_S:
            return
        self._signals += 1
        if self._signals == 1:
            self._first_signal_at = now
            log.info("stop_requested", signal=signal.Signals(signum).name)
            self.stop()
            return
        log.warning("forced_exit", signal=signal.Signals(signum).name)
        os._exit(EXIT_FORCED)

    def _on_reload_signal(self) -> None:
        log.info("reload_requested", signal="SIGHUP")
        loop = asyncio.get_running_loop()
        self._reload_task = loop.create_task(self.reload(), name="config-reload")

    async def reload(self) -> bool:
        """Re-read the config file and apply its policy and display sections between scans.

        Returns whether a new config was applied. An invalid file is logged with the key path
        of each error, and the running config stays.
        """
        load = self.config_loader
        if load is None:
            log.warning("config_reload_unavailable", reason="no_config_file")
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._apply_reload, load)

    def _apply_reload(self, load: Callable[[], Config]) -> bool:
        config = reload_config(self.config, load)
        if config is None:
            return False
        self.config = config
        self._tr = translator(config.display.language or language_from_env())
        if self._gate is not None:
            self._gate.reconfigure(config)
        return True

    async def _retain(self) -> None:
        """Purge expired journal records at start and then every journal.purge_interval_s."""
        loop = asyncio.get_running_loop()
        while True:
            # One step per call, so queued scans run between steps. The steps end because
            # each deletes records and none are added that are already expired.
            while await loop.run_in_executor(self._executor, self._purge_step):
                pass
            await asyncio.sleep(self.config.journal.purge_interval_s)

    def _purge_step(self) -> bool:
        if self._journal is None:
            return False
        return purge_step(self._journal, self.clock(), self.config.journal.retention_days)

    def _close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        if self._cache is not None:
            self._cache.close()
        self._executor.shutdown(wait=True)

    # --- the pipeline ---

    def emit(self, event: ScanEvent) -> None:
        """Queue a scan from a source, on the event loop's thread.

        It never blocks: when the queue is full the scan is dropped, logged and counted.
        """
        self.metrics.on_scan(event)
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.scans_dropped += 1
            log.error(
                "scan_dropped",
                source=event.source,
                queued=self._queue.qsize(),
                dropped_total=self.scans_dropped,
            )

    async def _consume(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._in_pipeline(self._process, event)
            except Exception as exc:  # A bad scan must not stop the gate.
                log.exception("scan_failed", source=event.source, error=repr(exc))
            finally:
                self._queue.task_done()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            await self._in_pipeline(self._expire)

    async def _watch_sources(self) -> None:
        """Warn while no source is connected: the gate then cannot read any code."""
        while True:
            await asyncio.sleep(SOURCE_CHECK_INTERVAL_S)
            states = {source.name: source.status.state.value for source in self.sources}
            if states and SourceState.CONNECTED.value not in states.values():
                log.warning("no_source_connected", sources=states)
            self.systemd.status(self._sources_status())

    def _sources_status(self) -> str:
        connected = sum(source.status.state == SourceState.CONNECTED for source in self.sources)
        return self._tr.gettext(N_("Running: {connected} of {total} sources connected")).format(
            connected=connected, total=len(self.sources)
        )

    async def _in_pipeline(self, function: Callable[..., None], *args: object) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, function, *args)

    def _require_gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("Daemon.open() was not called")
        return self._gate

    def _process(self, event: ScanEvent) -> None:
        gate = self._require_gate()
        station = self.config.device.station
        started = time.perf_counter()
        log.debug(
            "scan_received",
            source=event.source,
            payloads=len(event.payloads),
            read_error=None if event.read_error is None else str(event.read_error.reason),
        )
        if event.read_error is not None:
            events = gate.process_read_error(
                event.read_error, station=station, at=event.captured_at, received=event.received
            )
        else:
            events = gate.process_payloads(
                event.payloads, station=station, at=event.captured_at, received=event.received
            )
        self.metrics.observe_decision(time.perf_counter() - started)
        self._notify(events)

    def _expire(self) -> None:
        self._notify(self._require_gate().tick(time.monotonic()))
        # The watchdog is pinged only here, on the pipeline thread after a tick that ran, so a
        # pipeline stuck in a scan or a write stops the pings and systemd restarts the daemon.
        self.systemd.watchdog()

    def _flush(self) -> None:
        if self._gate is not None:
            self._notify(self._gate.flush(time.monotonic()))

    def _notify(self, events: list[VerdictEvent]) -> None:
        for event in events:
            self._counts_today.add(event)
            self.metrics.on_verdict(event)
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception as exc:
                    log.exception("listener_failed", seq=event.record.seq, error=repr(exc))

    async def status(self) -> GateStatus:
        """Take a snapshot of data age, clock trust, sources and today's counts."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_status)

    def _read_status(self) -> GateStatus:
        if self._cache is None:
            raise RuntimeError("Daemon.open() was not called")
        return read_status(
            cache=self._cache,
            clock=self.clock(),
            stale_after_s=self.config.policy.stale_after_s,
            sources=self.sources,
            counts=self._counts_today,
        )

    # --- the guard's desk ---

    def _open_guard_desk(self, journal: Journal) -> GuardDesk:
        """Build the guard's desk. A configured but unreadable ID lookup key fails the start."""
        key_file = self.config.guard.id_lookup_key_file
        return GuardDesk(
            self.config.guard,
            GuardStore(self.config.guards_path),
            journal,
            station=self.config.device.station,
            clock=self.clock,
            id_lookup_key=None if key_file is None else read_id_lookup_key(key_file),
        )

    def _require_desk(self) -> GuardDesk:
        if self._desk is None:
            raise RuntimeError("Daemon.open() was not called")
        return self._desk

    @property
    def guard_session(self) -> GuardSession | None:
        """The signed-in guard's shift, or None when no guard is signed in or the shift ended."""
        return None if self._desk is None else self._desk.session

    async def sign_in(self, guard_id: str, pin: str) -> GuardSession:
        """Start a guard's shift. Raises SignInError with a reason code on a rejected PIN.

        The argon2id PIN check takes 0.1 s or more of CPU, so it runs in a worker thread of its own
        instead of the pipeline thread, where it would hold up scans.
        """
        return await asyncio.to_thread(self._require_desk().sign_in, guard_id, pin)

    def sign_out(self) -> None:
        """End the current shift, if any."""
        self._require_desk().sign_out()

    async def check_id_number(self, id_number: str) -> VerdictEvent:
        """Decide on a resident by ID number, journal the verdict and notify every listener.

        Raises IdCheckError with a reason code for a malformed number, before any lookup.
        """
        received = time.perf_counter()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._check_id, id_number, received)

    def _check_id(self, id_number: str, received: float) -> VerdictEvent:
        desk = self._require_desk()
        event = desk.check_id_number(self._require_gate(), id_number, received=received)
        self._notify([event])
        return event

    async def override(
        self, verdict_seq: int, decision: OverrideDecision, reason: str
    ) -> OverrideEvent:
        """Journal the signed-in guard's override of a review or deny verdict.

        Raises OverrideError with a reason code when no guard is signed in, the verdict does
        not exist, is not a review or deny, or was overridden before.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._override, verdict_seq, decision, reason
        )

    def _override(self, verdict_seq: int, decision: str, reason: str) -> OverrideEvent:
        event = self._require_desk().override(verdict_seq, decision, reason)
        for listener in self.override_listeners:
            try:
                listener(event)
            except Exception as exc:
                log.exception("override_listener_failed", seq=event.record.seq, error=repr(exc))
        return event

    # --- sources and services ---

    async def _supervise_service(self, name: str, start: Callable[[], Awaitable[None]]) -> None:
        """Run a background service, restarting it with capped backoff if it fails."""
        failures = 0
        while True:
            try:
                await start()
                log.warning("service_ended", service=name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("service_failed", service=name, error=repr(exc))
            failures += 1
            await asyncio.sleep(random.uniform(0, min(RESTART_BACKOFF_MAX_S, 0.5 * 2**failures)))

    async def _supervise(self, source: Source) -> None:
        """Run a source, restarting it with capped backoff if it fails unexpectedly.

        Sources handle unplugs themselves; this catches the failures they did not expect.
        """
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await source.run(self.emit)
                log.warning("source_ended", source=source.name)
            except asyncio.CancelledError:
                source.status.state = SourceState.STOPPED
                raise
            except Exception as exc:
                source.status.state = SourceState.DISCONNECTED
                source.status.last_error = repr(exc)
                log.exception("source_failed", source=source.name, error=repr(exc))
            if time.monotonic() - started > 60:
                failures = 0
            failures += 1
            delay = random.uniform(0, min(RESTART_BACKOFF_MAX_S, 0.5 * 2**failures))
            await asyncio.sleep(delay)
