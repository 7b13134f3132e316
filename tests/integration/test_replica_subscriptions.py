"""A server's kept MQTT session across a change of mode (alone, then one of several replicas)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from nodes.bus import BrokerAddress, MqttBus
from nodes.runtime import Settings, server_filters
from protocol.topics import Role, link_topic, share_group, shared_filter

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


async def _orders_reaching_the_replica(tmp_path: Path, group: str) -> int:
    """10 orders from dev-a's chip, a device login of dev-b in the share group ``group``,
    the payment-server replica in the group its key names: how many orders reach the replica."""
    cast = Cast()
    orders = link_topic(Role.CHIP, Role.PAYMENT_SERVER, "+")
    async with (
        running_broker("mosquitto", tmp_path / "b", cast) as broker,
        broker.client(cast["payment-server"]) as replica,
        broker.client(cast["dev-b.chip"]) as intruder,
        broker.client(cast["dev-a.chip"]) as chip,
    ):
        await replica.subscribe(shared_filter(share_group(Role.PAYMENT_SERVER, SECRET), orders), qos=1)
        await intruder.subscribe(shared_filter(group, orders), qos=1)  # granted: the ACL acts at delivery
        for i in range(10):
            await chip.publish(ORDER, b"order-%d" % i, qos=1)
        await chip.publish(ORDER, b"marker", qos=1)
        got = []
        async with asyncio.timeout(WAIT_S):
            async for message in replica.messages:  # ends at the marker; bounded by the timeout
                if message.payload == b"marker":
                    break
                got.append(message.payload)
    return len(got)


async def test_a_device_login_cannot_join_the_replicas_share_group_and_swallow_requests(
    tmp_path: Path,
) -> None:
    # the group the replicas use is named from the role's secret key: a device's guesses are other groups
    for guess in ("payment-server", "ps", "trustpay"):
        assert await _orders_reaching_the_replica(tmp_path / guess, guess) == 10
    # the control: joined to the replica's own group, the intruder's share of the orders is lost
    # (Mosquitto 2.0.11 hands it the turn, then refuses it the message)
    group = share_group(Role.PAYMENT_SERVER, SECRET)
    assert await _orders_reaching_the_replica(tmp_path / "control", group) < 10
