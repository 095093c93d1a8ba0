"""Incoming QoS 1 messages are acknowledged only after their handlers have committed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from edgenode.config import SyncConfig
from sync.connection import Connection


class FakePaho:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def ack(self, mid: int, qos: int) -> None:
        self.events.append(f"ack {mid}")


class FakeClient:
    """Just enough of aiomqtt.Client for the dispatch loop: messages and the paho client."""

    def __init__(self, messages: list[aiomqtt.Message], events: list[str]) -> None:
        self._messages = messages
        self._client = FakePaho(events)

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        async def iterate() -> AsyncIterator[aiomqtt.Message]:
            for message in self._messages:
                yield message

        return iterate()


def message(topic: str, mid: int, qos: int = 1) -> aiomqtt.Message:
    return aiomqtt.Message(topic, b"x", qos=qos, retain=False, mid=mid, properties=None)


def dispatch(connection: Connection, client: FakeClient) -> None:
    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connection._dispatch(client))  # type: ignore[arg-type]


def test_ack_follows_handler_commit() -> None:
    events: list[str] = []
    connection = Connection(SyncConfig(enabled=True), site="S", device="d")

    async def handler(msg: Any) -> None:
        await asyncio.sleep(0)
        events.append(f"commit {msg.mid}")

    connection.subscribe("edgenode/v1/S/down/dataset", handler)
    dispatch(connection, FakeClient([message("edgenode/v1/S/down/dataset", 7)], events))
    assert events == ["commit 7", "ack 7"]


def test_failed_handler_is_still_acked() -> None:
    events: list[str] = []
    connection = Connection(SyncConfig(enabled=True), site="S", device="d")

    async def handler(msg: Any) -> None:
        raise RuntimeError("disk full")

    connection.subscribe("edgenode/v1/S/down/dataset", handler)
    dispatch(connection, FakeClient([message("edgenode/v1/S/down/dataset", 8)], events))
    assert events == ["ack 8"]


def test_qos0_message_is_not_acked() -> None:
    events: list[str] = []
    connection = Connection(SyncConfig(enabled=True), site="S", device="d")
    dispatch(connection, FakeClient([message("other/topic", 9, qos=0)], events))
    assert events == []
