"""A node's bus when its broker goes away with a publish in flight (Mosquitto and amqtt)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodes.bus import BrokerAddress, MqttBus
from ops.chaos.faults import Direction, Kind, Profile, Rule
from ops.chaos.proxy import ChaosProxy
from protocol.errors import TransportError
from protocol.topics import Role, link_topic

from .broker_harness import BACKENDS, WAIT_S, Cast, running_broker

UP = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "dev-a")


@contextlib.asynccontextmanager
async def connected_bus(address: BrokerAddress, client_id: str, **timeouts: float) -> AsyncIterator[MqttBus]:
    """A bus subscribed to nothing, running and connected; closed and awaited at the end."""
    bus = MqttBus(address, client_id, **timeouts)
    connected = asyncio.Event()
    running = asyncio.create_task(bus.run((), lambda topic, payload: None, connected))
    try:
        async with asyncio.timeout(WAIT_S):
            await connected.wait()
        yield bus
    finally:
        bus.close()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_publish_waiting_for_its_ack_fails_as_soon_as_the_connection_ends(
    backend: str, tmp_path: Path
) -> None:
    """Before, it waited out ack_timeout_s (3 s in a node) for a PUBACK that could no longer come,
    holding up the caller's retry on the next connection; here ack_timeout_s is far beyond the
    test's bound, so only noticing the disconnect can end the publish in time."""
    cast = Cast()
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        login = cast["dev-a.tm"]
        address = BrokerAddress(broker.host, broker.port, login.username, login.password, broker.mqtt_version)
        slow = WAIT_S * 6  # no timeout of its own may end the publish within the test's bound
        async with connected_bus(
            address, login.username, ack_timeout_s=slow, publish_timeout_s=slow, backoff_initial_s=WAIT_S
        ) as bus:
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)  # it takes the PUBLISH into its socket but cannot answer
            publishing = asyncio.create_task(bus.publish(UP, b"in flight"))
            done, _ = await asyncio.wait({publishing}, timeout=0.5)
            assert not done  # a stopped broker acknowledges nothing: the publish waits for its PUBACK
            await broker.kill()  # the kernel closes its sockets: the bus's reader sees the end
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(TransportError, match="the connection ended before its acknowledgement"):
                    await publishing


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_proxy_cutting_a_connection_after_delivering_a_publish_fails_it_at_once_then_reconnects(
    backend: str, tmp_path: Path
) -> None:
    """The race of a publish whose connection ends while its PUBACK is due, made deterministic:
    the fault proxy delivers the PUBLISH to the broker, then cuts the sender's connection before
    the acknowledgement can come back (``disconnect deliver=true``, exactly once)."""
    cast = Cast()
    cut_once = Rule(Kind.DISCONNECT, (UP,), Direction.TO_BROKER, limit=1, deliver=True)
    async with (
        running_broker(backend, tmp_path / "b", cast) as broker,
        ChaosProxy(broker.host, broker.port, Profile((cut_once,))) as proxy,
    ):
        login = cast["dev-a.tm"]
        address = BrokerAddress("127.0.0.1", proxy.port, login.username, login.password, broker.mqtt_version)
        slow = WAIT_S * 6  # no timeout of its own may end the publish within the test's bound
        async with connected_bus(address, login.username, ack_timeout_s=slow, publish_timeout_s=slow) as bus:
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(TransportError, match="the connection ended before its acknowledgement"):
                    await bus.publish(UP, b"delivered, never acknowledged")
                await bus.publish(UP, b"on the next connection")  # waits for the reconnect, then goes
            assert proxy.log.counts["disconnect"] == 1
            assert bus.connections == 2


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_publish_never_acknowledged_times_out_drops_the_connection_and_the_next_goes_on_a_new_one(
    backend: str, tmp_path: Path
) -> None:
    """The fault proxy holds one PUBLISH far beyond the ack timeout (no PUBACK comes while the
    connection stays up): only the bus's own ack timeout can end that publish, and it must then
    drop the connection that looks alive and carry the next publish on a new one."""
    cast = Cast()
    held = WAIT_S * 1000  # ms: past the test's bound, so the PUBACK cannot end the publish
    hold_once = Rule(Kind.DELAY, (UP,), Direction.TO_BROKER, limit=1, delay_ms=(held, held))
    async with (
        running_broker(backend, tmp_path / "b", cast) as broker,
        ChaosProxy(broker.host, broker.port, Profile((hold_once,))) as proxy,
    ):
        login = cast["dev-a.tm"]
        address = BrokerAddress("127.0.0.1", proxy.port, login.username, login.password, broker.mqtt_version)
        async with connected_bus(address, login.username, ack_timeout_s=0.5, publish_timeout_s=WAIT_S) as bus:
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(TransportError, match=r"not acknowledged in 0\.5 s"):
                    await bus.publish(UP, b"held past the ack timeout")
                await bus.publish(UP, b"on the next connection")
            assert proxy.log.counts["delay"] == 1
            assert bus.connections == 2
