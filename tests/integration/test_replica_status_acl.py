"""Each server replica's login writes its own status topic only, on a real broker (every backend)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import Broker, BrokerIdentity
from protocol.topics import Role, status_topic

from .broker_harness import BACKENDS, Cast, granted, running_broker, until_marker

PS = Role.PAYMENT_SERVER


class ReplicaCast(Cast):
    """The usual logins plus a second payment-server replica's."""

    def __init__(self) -> None:
        super().__init__()
        self.replica = BrokerIdentity.for_node(PS, replica=2)
        self.all = (*self.all, self.replica)


@pytest.fixture(params=BACKENDS)
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Broker, ReplicaCast]]:
    cast = ReplicaCast()
    async with running_broker(request.param, tmp_path / "broker", cast) as b:
        yield b, cast


async def test_a_replica_cannot_overwrite_another_replicas_status(broker: tuple[Broker, ReplicaCast]) -> None:
    b, cast = broker
    first, second = status_topic(PS), status_topic(PS, None, 2)
    async with (
        b.client(cast.monitor) as witness,
        b.client(cast[PS.value]) as ps1,
        b.client(cast.replica) as ps2,
    ):
        assert granted(await witness.subscribe("tp/v1/#", qos=1))
        # each writes the other's status topic (refused), then its own (delivered)
        await ps2.publish(first, b"ps2 says ps1 is offline", qos=1, retain=True)
        await ps1.publish(second, b"ps1 says ps2 is offline", qos=1, retain=True)
        await ps1.publish(first, b"ps1 online", qos=1, retain=True)
        await ps2.publish(second, b"ps2 online", qos=1, retain=True)
        got = await until_marker(witness, b"ps2 online")
    delivered = {(m.topic.value, m.payload) for m in got}
    assert delivered == {(first, b"ps1 online"), (second, b"ps2 online")}
