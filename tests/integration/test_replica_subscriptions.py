"""A server's kept MQTT session across a change of mode (alone, then one of several replicas)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from nodes.bus import BrokerAddress, MqttBus
from nodes.runtime import Settings, server_filters
from protocol.topics import Role, link_topic

from .broker_harness import HAVE_MOSQUITTO, WAIT_S, Cast, running_broker

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed"),
]
ORDER = link_topic(Role.CHIP, Role.PAYMENT_SERVER, "dev-a")
SECRET = b"s" * 32


async def test_a_replica_no_longer_gets_requests_through_the_plain_filter_of_its_earlier_run(
    tmp_path: Path,
) -> None:
    cast = Cast()
    alone, _ = server_filters(Role.PAYMENT_SERVER, Settings(), SECRET)
    shared, stale = server_filters(Role.PAYMENT_SERVER, Settings(replicas=2), SECRET)
    assert set(alone) - set(shared) == set(stale) and all(f.startswith("$share/") for f in shared[:2])
    async with running_broker("mosquitto", tmp_path / "b", cast) as broker:
        login = cast["payment-server"]
        address = BrokerAddress(broker.host, broker.port, login.username, login.password, "5")
        got: list[bytes] = []
        arrived = asyncio.Event()

        def on_message(topic: str, payload: bytes) -> None:
            got.append(payload)
            arrived.set()

        async def session(subscriptions: tuple[str, ...], stale_filters: tuple[str, ...]) -> MqttBus:
            bus = MqttBus(address, login.username, stale_filters=stale_filters)
            connected = asyncio.Event()
            running = asyncio.create_task(bus.run(subscriptions, on_message, connected))
            async with asyncio.timeout(WAIT_S):
                await connected.wait()
            bus.close()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            return bus

        await session(alone, ())  # the first run, alone: plain filters, kept in the session
        await session(shared, stale)  # the replica's run drops them
        bus = MqttBus(address, login.username)  # a third connection, subscribing to nothing new
        connected = asyncio.Event()
        running = asyncio.create_task(bus.run((), on_message, connected))
        try:
            async with asyncio.timeout(WAIT_S):
                await connected.wait()
            async with broker.client(cast["dev-a.chip"]) as chip:
                await chip.publish(ORDER, b"order", qos=1)
                await chip.publish(ORDER, b"marker", qos=1)
            async with asyncio.timeout(WAIT_S):
                while b"marker" not in got:  # each turn waits for a message; bounded
                    arrived.clear()
                    await arrived.wait()
        finally:
            bus.close()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    # once through the shared subscription the session kept, never a second time through the old one
    assert got == [b"order", b"marker"]
