"""Helpers for the broker tests: a cast of identities, a broker that is always
cleaned up, and bounded waits on aiomqtt message streams.

No sleeps anywhere: to show a message was *not* delivered, the same
connection sends an allowed marker right after it. One connection's messages
reach a subscriber in order, so once the marker is in, the other one is not
coming.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import Broker, BrokerIdentity, identities_for, make_broker

WAIT_S = 10.0
DEVICES = ("dev-a", "dev-b")

HAVE_MOSQUITTO = shutil.which("mosquitto") is not None

BACKENDS = [
    pytest.param(
        "mosquitto",
        marks=[
            pytest.mark.mosquitto,
            pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed"),
        ],
    ),
    pytest.param("amqtt"),
]


class Cast:
    """Credentials for every role of dev-a and dev-b and the platform roles."""

    def __init__(self) -> None:
        self.all: tuple[BrokerIdentity, ...] = identities_for(DEVICES)
        self._by_name = {i.username: i for i in self.all}

    def __getitem__(self, username: str) -> BrokerIdentity:
        return self._by_name[username]

    @property
    def monitor(self) -> BrokerIdentity:
        return self["monitor"]


@contextlib.asynccontextmanager
async def running_broker(
    backend: str, data_dir: Path, cast: Cast, port: int | None = None
) -> AsyncIterator[Broker]:
    broker = make_broker(backend, data_dir, port, cast.all, cast.monitor)
    try:
        await broker.start()
        yield broker
    finally:
        try:
            await broker.stop()
        finally:
            await broker.kill()  # a no-op unless stop() itself failed


def persistent_client(broker: Broker, ident: BrokerIdentity) -> aiomqtt.Client:
    """A client whose session (subscriptions, queued QoS 1) outlives its connection.

    Its client id is the login's own: the session belongs to the login.
    """
    if broker.mqtt_version == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        return broker.client(ident, clean_start=False, properties=props)
    return broker.client(ident, clean_session=False)


async def next_message(client: aiomqtt.Client, wait: float = WAIT_S) -> aiomqtt.Message:
    async with asyncio.timeout(wait):
        return await anext(client.messages)


async def until_marker(client: aiomqtt.Client, marker: bytes, wait: float = WAIT_S) -> list[aiomqtt.Message]:
    """Everything ``client`` receives up to and including the marker payload."""
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(wait):
        async for msg in client.messages:
            got.append(msg)
            if msg.payload == marker:
                return got
    raise AssertionError("message stream ended before the marker")


def granted(reason_codes: Sequence[object]) -> bool:
    """True if every SUBACK entry is a grant (QoS 0-2) on either protocol version."""
    values = [getattr(rc, "value", rc) for rc in reason_codes]
    return all(isinstance(v, int) and v < 0x80 for v in values)


async def refused(broker: Broker, ident: BrokerIdentity, **kwargs: object) -> bool:
    """Whether the broker answers CONNECT for ``ident`` with a refusal."""
    try:
        async with asyncio.timeout(WAIT_S):
            async with broker.client(ident, **kwargs):
                return False
    except aiomqtt.MqttCodeError:
        return True
