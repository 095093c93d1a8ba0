"""The sync side of a gate, assembled from its config: connection, uplink and downlink.

``edgenode run`` builds one ``SyncService`` when ``sync.enabled`` is set and hands the daemon
its listener, its background tasks and the district's view of the clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgenode.cache import cache_version
from edgenode.config import Config
from edgenode.district_trust import DistrictTrust
from edgenode.pipeline import VerdictEvent
from sync.connection import Connection, ConnectionState
from sync.downlink import Downlink
from sync.identity import ensure_device_key
from sync.uplink import Uplink


@dataclass(slots=True)
class SyncService:
    config: Config
    connection: Connection
    uplink: Uplink
    downlink: Downlink
    _requests: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def from_config(cls, config: Config) -> SyncService:
        """Create the device key if needed and wire the three parts together.

        The uplink and downlink subscribe in their constructors, so both exist before the
        connection runs.
        """
        device_key = ensure_device_key(config.device_key_path)
        connection = Connection(config.sync, site=config.device.site, device=config.device.id)
        # One trust object for both directions: the config's keys plus the cached announcements.
        trust = DistrictTrust(config.trust.district_key_bytes(), config.cache_path)
        uplink = Uplink.from_config(config, connection, device_key, trust)
        downlink = Downlink(
            connection,
            site=config.device.site,
            device=config.device.id,
            cache_path=config.cache_path,
            state_dir=config.device.state_dir,
            district_keys=trust,
            signing_key=device_key,
            clock_skew_alarm_s=config.sync.clock_skew_alarm_s,
        )
        service = cls(config, connection, uplink, downlink)
        connection.add_state_listener(service._on_connection_state)
        return service

    def _on_connection_state(self, state: ConnectionState) -> None:
        # A gate without data (a new one, or one whose corrupt cache was moved aside) requests
        # a snapshot at each connect until it has one. The downlink limits the repeats.
        if (
            state is not ConnectionState.CONNECTED
            or cache_version(self.config.cache_path) is not None
        ):
            return
        task = asyncio.get_running_loop().create_task(self.downlink.request_snapshot())
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def on_verdict(self, event: VerdictEvent) -> None:
        self.uplink.on_verdict(event)

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [
            ("mqtt-connection", self.connection.run),
            ("uplink", self.uplink.run),
            ("downlink", self.downlink.run),
        ]

    def district_skews(self) -> tuple[float | None, float | None]:
        """Return this clock's offsets from the district's time in the latest ack and chunk.

        edgenode.clock.ClockGuard trusts the clock while they are known and within
        ``sync.clock_skew_alarm_s``, and distrusts it while one is beyond.
        """
        return (self.uplink.status().clock_skew_s, self.downlink.clock_skew_s)
