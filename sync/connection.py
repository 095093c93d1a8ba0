"""The gate's MQTT connection to the district broker, kept open for as long as the gate runs.

``Connection.run()`` connects with MQTT v5, publishes ``online`` retained on the status topic
(the broker publishes the ``offline`` will when the connection is lost), subscribes every
registered topic again after each connect and passes incoming messages to their handlers. A
lost connection is retried with capped exponential backoff and full jitter, so a fleet of gates
that lost the same broker does not reconnect in lockstep.

A broker that stops sending but keeps the TCP connection open is detected by a watchdog on
the time of the last packet received. paho-mqtt 2.x alone needs up to two keepalive intervals
(it sends PINGREQ after one idle interval, then waits another for PINGRESP); the watchdog
drops the connection once nothing has been received for 1.5 keepalive intervals.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgenode.config import SyncConfig
from sync.protocol import Topics

log = structlog.get_logger("sync.connection")

Handler = Callable[[aiomqtt.Message], Awaitable[None]]

BACKOFF_BASE_S = 0.5
# Time allowed for the CONNACK and for the broker's reply to a clean disconnect.
CONNECT_TIMEOUT_S = 10.0
# Timeout for one PUBACK or SUBACK while connected.
OPERATION_TIMEOUT_S = 10.0
WATCHDOG_INTERVAL_S = 0.25
# A session kept by the broker across short outages, so acks sent meanwhile are not lost.
SESSION_EXPIRY_S = 600
# Repeated identical connect failures are logged once per this interval, with a count.
LOG_REPEAT_INTERVAL_S = 60.0


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class NotConnected(Exception):
    """A publish while the broker is unreachable. The caller keeps the message and retries."""


class _BrokerSilent(Exception):
    """The watchdog saw no packet from the broker for 1.5 keepalive intervals."""


@dataclass(slots=True)
class _Subscription:
    topic: str
    handler: Handler
    qos: int


class _PacketClock(logging.Handler):
    """Record when paho-mqtt last received a packet, from its 'Received ...' debug lines.

    paho-mqtt 2.x logs every incoming packet (CONNACK, PUBACK, PINGRESP, PUBLISH ...) through
    the logger that aiomqtt hands it, which is the only public view of its receive path.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.last_received = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("Received "):
            self.last_received = time.monotonic()


class _RepeatFilter:
    """Let the first of a run of identical events through, then one per interval with a count."""

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._key: str | None = None
        self._last_logged = 0.0
        self._suppressed = 0

    def check(self, key: str) -> int | None:
        """Return the number of suppressed repeats if this event should be logged, else None."""
        now = time.monotonic()
        if key != self._key:
            self._key = key
            self._suppressed = 0
            self._last_logged = now
            return 0
        if now - self._last_logged >= self.interval_s:
            suppressed = self._suppressed
            self._suppressed = 0
            self._last_logged = now
            return suppressed
        self._suppressed += 1
        return None

    def reset(self) -> None:
        self._key = None


class Connection:
    """An MQTT v5 connection for one device at one site, built from the ``[sync]`` config."""

    def __init__(
        self,
        sync: SyncConfig,
        *,
        site: str,
        device: str,
        client_id: str | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        session_expiry_s: int = SESSION_EXPIRY_S,
    ) -> None:
        self.sync = sync
        self.session_expiry_s = session_expiry_s
        self.topics = Topics(site, device)
        self.client_id = client_id or f"edgenode-{site}-{device}"
        self.backoff_base_s = backoff_base_s
        self.state = ConnectionState.DISCONNECTED
        self.last_error: str | None = None
        self.state_changed_at = time.time()
        self.connected_at: float | None = None
        self._password = _read_password(sync)
        self._subscriptions: list[_Subscription] = []
        self._client: aiomqtt.Client | None = None
        # Completed when the current connection is lost, so waiting publishes end at once.
        self._lost: asyncio.Future[None] | None = None
        self._connected = asyncio.Event()
        self._was_connected = False
        self._first_connect = True
        self._repeats = _RepeatFilter()
        self._state_listeners: list[Callable[[ConnectionState], None]] = []

    # --- public interface ---

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Register an async handler for a topic filter; it is subscribed on every connect."""
        self._subscriptions.append(_Subscription(topic, handler, qos))

    def add_state_listener(self, listener: Callable[[ConnectionState], None]) -> None:
        self._state_listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, *, retain: bool = False
    ) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1). Raises NotConnected when offline.

        A PUBACK only means the broker took the message, never that the district stored it.
        """
        client = self._client
        lost = self._lost
        if client is None or lost is None or not self.connected:
            raise NotConnected(f"not connected to {self._broker_name}")
        sending = asyncio.ensure_future(
            client.publish(topic, payload, qos=qos, retain=retain, timeout=OPERATION_TIMEOUT_S)
        )
        try:
            done, _ = await asyncio.wait((sending, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sending.done():
                sending.cancel()
        if sending not in done:
            raise NotConnected(f"connection to {self._broker_name} lost during a publish")
        exc = sending.exception()
        if exc is not None:
            raise NotConnected(f"publish to {self._broker_name} failed: {exc}") from exc

    async def run(self) -> None:
        """Keep a connection open until cancelled, reconnecting after every loss."""
        attempt = 0
        while True:
            self._set_state(ConnectionState.CONNECTING)
            try:
                await self._connect_and_serve()
                error = "connection closed"
            except asyncio.CancelledError:
                self._set_state(ConnectionState.DISCONNECTED)
                raise
            except (aiomqtt.MqttError, _BrokerSilent, OSError, TimeoutError) as exc:
                error = _describe(exc)
            self.last_error = error
            self._set_state(ConnectionState.DISCONNECTED)
            if self._was_connected:
                attempt = 0
                log.warning("broker_disconnected", broker=self._broker_name, error=error)
                self._repeats.reset()
            else:
                suppressed = self._repeats.check(error)
                if suppressed is not None:
                    log.warning(
                        "broker_connect_failed",
                        broker=self._broker_name,
                        error=error,
                        attempt=attempt + 1,
                        repeats_not_logged=suppressed,
                    )
            delay = random.uniform(
                0, min(self.sync.reconnect_max_s, self.backoff_base_s * 2**attempt)
            )
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay)

    # --- one connection ---

    @property
    def _broker_name(self) -> str:
        return f"{self.sync.broker_host}:{self.sync.broker_port}"

    def _new_client(self, packet_clock: _PacketClock) -> aiomqtt.Client:
        # A logger outside logging's registry, so one per connect attempt is freed with the
        # client. It feeds only the packet clock and prints nothing.
        paho_logger = logging.Logger("sync.connection.paho", level=logging.DEBUG)
        paho_logger.propagate = False
        paho_logger.addHandler(packet_clock)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry_s
        return aiomqtt.Client(
            self.sync.broker_host,
            self.sync.broker_port,
            username=self.sync.username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=self.sync.keepalive_s,
            timeout=CONNECT_TIMEOUT_S,
            # The first connect of a process starts clean: acks for batches that an earlier
            # process sent cannot be matched any more. Reconnects resume the session.
            clean_start=self._first_connect,
            properties=properties,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            tls_context=_tls_context(self.sync),
            logger=paho_logger,
        )

    async def _connect_and_serve(self) -> None:
        self._was_connected = False
        packet_clock = _PacketClock()
        client = self._new_client(packet_clock)
        # Handlers commit what a message carries before it is acknowledged, so a crash between
        # arrival and commit makes the broker deliver the message again. aiomqtt 2.5 has no
        # option for this, so it is set on the paho client that aiomqtt wraps.
        # NOTE: `_client` is private to aiomqtt; recheck this line when upgrading aiomqtt.
        client._client.manual_ack_set(True)
        # aiomqtt bounds this itself: paho's TCP connect times out after 5 s and the CONNACK
        # wait after the client's timeout. An asyncio.wait_for around it could leave the task
        # unable to finish a cancellation (seen with Python 3.11.7 and aiomqtt 2.5.1).
        await client.__aenter__()
        self._lost = asyncio.get_running_loop().create_future()
        try:
            self._client = client
            self._first_connect = False
            for subscription in self._subscriptions:
                await client.subscribe(
                    subscription.topic, qos=subscription.qos, timeout=OPERATION_TIMEOUT_S
                )
            await client.publish(
                self.topics.status, b"online", qos=1, retain=True, timeout=OPERATION_TIMEOUT_S
            )
            self.last_error = None
            self.connected_at = time.time()
            self._set_state(ConnectionState.CONNECTED)
            self._repeats.reset()
            log.info("broker_connected", broker=self._broker_name, client_id=self.client_id)
            watchdog = asyncio.create_task(self._watch(packet_clock), name="mqtt-watchdog")
            dispatcher = asyncio.create_task(self._dispatch(client), name="mqtt-dispatch")
            try:
                done, _ = await asyncio.wait(
                    (watchdog, dispatcher), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (watchdog, dispatcher):
                    task.cancel()
                await asyncio.gather(watchdog, dispatcher, return_exceptions=True)
            for task in done:
                task.result()  # Re-raise the loss that ended the connection.
        finally:
            # The state changes before the slow close, so publishers stop at once.
            self._was_connected = self.connected
            self._client = None
            self._lost.set_result(None)
            self._set_state(ConnectionState.DISCONNECTED)
            await self._close(client)

    async def _close(self, client: aiomqtt.Client) -> None:
        try:
            # Bounded by the client's timeout, like the connect.
            await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError) as exc:
            # NOTE: when the broker never replies to the DISCONNECT, paho's socket is left to the
            # garbage collector. Closing it through aiomqtt's private client would be worse.
            log.debug("broker_disconnect_unclean", broker=self._broker_name, error=_describe(exc))

    async def _watch(self, packet_clock: _PacketClock) -> None:
        limit = 1.5 * self.sync.keepalive_s - 2 * WATCHDOG_INTERVAL_S
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            silent_for = time.monotonic() - packet_clock.last_received
            if silent_for > limit:
                raise _BrokerSilent(f"no packet from the broker for {silent_for:.1f} s")

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            for subscription in self._subscriptions:
                if not message.topic.matches(subscription.topic):
                    continue
                try:
                    await subscription.handler(message)
                except Exception as exc:  # A bad message must not end the connection.
                    log.exception(
                        "message_handler_failed", topic=str(message.topic), error=repr(exc)
                    )
            # Acknowledged once every handler has returned, after their commits. A handler
            # that failed is acknowledged too: redelivering it would fail the same way.
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)
        raise aiomqtt.MqttError("message stream ended")

    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state:
            return
        self.state = state
        self.state_changed_at = time.time()
        if state is ConnectionState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        for listener in self._state_listeners:
            listener(state)


def _describe(exc: BaseException) -> str:
    # aiomqtt's MqttCodeError text contains the reason code: "[code:135] Not authorized".
    return str(exc) or type(exc).__name__


def _read_password(sync: SyncConfig) -> str | None:
    if sync.password_file is None:
        return None
    try:
        return sync.password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read sync.password_file {sync.password_file}: {exc}") from exc


def _tls_context(sync: SyncConfig) -> ssl.SSLContext | None:
    if sync.tls is None:
        return None
    context = ssl.create_default_context(
        cafile=None if sync.tls.ca_file is None else str(sync.tls.ca_file)
    )
    if sync.tls.cert_file is not None:
        context.load_cert_chain(
            str(sync.tls.cert_file),
            None if sync.tls.key_file is None else str(sync.tls.key_file),
        )
    return context
