"""The MQTT connection against a real Mosquitto broker: state, refusals, loss and recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest

from edgenode.config import SyncConfig
from sync.connection import Connection, ConnectionState, NotConnected
from tests.broker import Broker, broker, password_broker

__all__ = ["broker", "password_broker"]


def sync_config(target: Broker, **overrides: object) -> SyncConfig:
    values: dict[str, object] = {
        "enabled": True,
        "broker_host": target.host,
        "broker_port": target.port,
        "keepalive_s": 5,
        "reconnect_max_s": 1.0,
    }
    values.update(overrides)
    return SyncConfig.model_validate(values)


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll a condition until it holds; return the seconds it took. Fail after the timeout."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def with_running(connection: Connection, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(connection.run())
    try:
        await asyncio.wait_for(body(), timeout=60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_connects_and_publishes_online(broker: Broker) -> None:
    seen: list[bytes] = []

    async def scenario() -> None:
        connection = Connection(sync_config(broker), site="conn-online", device="gate-a")

        async def body() -> None:
            await wait_until(lambda: connection.connected, 10, "the CONNACK")
            async with aiomqtt.Client(broker.host, broker.port) as watcher:
                await watcher.subscribe(connection.topics.status)
                async for message in watcher.messages:
                    assert isinstance(message.payload, bytes)
                    seen.append(message.payload)
                    break

        await with_running(connection, body)

    asyncio.run(scenario())
    assert seen == [b"online"]


def test_publish_when_offline_raises(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = SyncConfig(enabled=True, broker_host="127.0.0.1", broker_port=1)
        connection = Connection(config, site="conn-offline", device="gate-a")
        with pytest.raises(NotConnected):
            await connection.publish(connection.topics.batches, b"x")

    asyncio.run(scenario())


def test_refused_connack_is_never_connected(password_broker: Broker, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("wrong-password\n", encoding="utf-8")
    states: list[ConnectionState] = []

    async def scenario() -> Connection:
        config = sync_config(password_broker, username="gate", password_file=password_file)
        connection = Connection(config, site="conn-refused", device="gate-a")
        connection.add_state_listener(states.append)

        async def body() -> None:
            await wait_until(lambda: connection.last_error is not None, 10, "a refused CONNACK")
            await asyncio.sleep(1.5)  # Give it time to retry, and to go wrong if it would.

        await with_running(connection, body)
        return connection

    connection = asyncio.run(scenario())
    assert ConnectionState.CONNECTED not in states
    assert connection.state is ConnectionState.DISCONNECTED
    assert connection.last_error is not None
    # Mosquitto 2.0.11 refuses a wrong password with reason code 135, Not authorized.
    assert "not authorized" in connection.last_error.lower()


def test_right_password_connects(password_broker: Broker, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("right-password\n", encoding="utf-8")

    async def scenario() -> None:
        config = sync_config(password_broker, username="gate", password_file=password_file)
        connection = Connection(config, site="conn-password", device="gate-a")

        async def body() -> None:
            await wait_until(lambda: connection.connected, 10, "the CONNACK")

        await with_running(connection, body)

    asyncio.run(scenario())


def test_reconnects_after_broker_restart(broker: Broker) -> None:
    received: list[bytes] = []

    async def scenario() -> None:
        connection = Connection(sync_config(broker), site="conn-restart", device="gate-a")
        topic = connection.topics.acks

        async def handler(message: aiomqtt.Message) -> None:
            assert isinstance(message.payload, bytes)
            received.append(message.payload)

        connection.subscribe(topic, handler)

        async def body() -> None:
            await wait_until(lambda: connection.connected, 10, "the first CONNACK")
            broker.stop()
            await wait_until(lambda: not connection.connected, 10, "the loss")
            with pytest.raises(NotConnected):
                await connection.publish(connection.topics.batches, b"x")
            broker.start()
            await wait_until(lambda: connection.connected, 15, "the reconnect")
            async with aiomqtt.Client(broker.host, broker.port) as sender:
                await sender.publish(topic, b"after-restart", qos=1)
            await wait_until(lambda: bool(received), 10, "the message after resubscribing")

        await with_running(connection, body)

    asyncio.run(scenario())
    assert received == [b"after-restart"]


def test_paused_broker_detected_within_1_5_keepalive(broker: Broker) -> None:
    keepalive_s = 5
    timings: dict[str, float] = {}

    async def scenario() -> None:
        config = sync_config(broker, keepalive_s=keepalive_s)
        connection = Connection(config, site="conn-paused", device="gate-a")

        async def body() -> None:
            await wait_until(lambda: connection.connected, 10, "the CONNACK")
            # Let a keepalive round-trip pass first, so the pause falls at an arbitrary point.
            await asyncio.sleep(keepalive_s + 1.3)
            broker.pause()
            timings["detect"] = await wait_until(
                lambda: not connection.connected, 3 * keepalive_s, "the watchdog"
            )
            broker.resume()
            await wait_until(lambda: connection.connected, 20, "the reconnect after resume")
            await connection.publish(connection.topics.batches, b"x")

        await with_running(connection, body)

    asyncio.run(scenario())
    assert timings["detect"] <= 1.5 * keepalive_s


def test_backoff_uses_full_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds: list[tuple[float, float]] = []

    def fake_uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return 0.0

    monkeypatch.setattr("sync.connection.random.uniform", fake_uniform)

    async def scenario() -> None:
        config = SyncConfig(enabled=True, broker_host="127.0.0.1", broker_port=1)
        connection = Connection(config, site="conn-backoff", device="gate-a", backoff_base_s=1.0)
        task = asyncio.create_task(connection.run())
        try:
            await wait_until(lambda: len(bounds) >= 8, 10, "eight retries")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert all(low == 0 for low, _ in bounds)
    assert [high for _, high in bounds[:8]] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
