"""A running deployment's broker keeps each device's login to its own device, retained messages included."""

from __future__ import annotations

import asyncio

import pytest

from nodes.bus import topic_matches
from protocol.topics import CRL_TOPIC, Role, acl_for

from .conftest import DEV1, DEV2, E2E, WAIT_S, chip_of, client_of

pytestmark = pytest.mark.e2e


async def test_a_device_login_receives_nothing_of_another_device_not_even_retained_status(e2e: E2E) -> None:
    """``acl_for`` confines a client login to reading ``tp/v1/dev/{its device}/+/client``.

    Mosquitto keeps to it. amqtt 0.12.1 does not: on every CONNECT,
    ``Broker._handle_client_session`` (amqtt/broker.py:599-602) walks *every* topic filter
    anyone subscribed to and sends the connecting client each retained message matching
    it (``_publish_retained_messages_for_subscription``), without the client having
    subscribed and without asking the ACL plugin, so every login gets every retained
    status of the deployment, other devices' included.
    """
    # every node of both devices has published its retained, signed "online" status by now
    retained = {s.topic for s in e2e.watcher.seen if s.status is not None}
    assert {f"tp/v1/dev/{DEV2}/chip/status", f"tp/v1/dev/{DEV2}/tm/status"} <= retained
    reads = [rule.pattern for rule in acl_for(Role.CLIENT, DEV1) if rule.access == "read"]
    own = f"tp/v1/dev/{DEV1}/+/client"
    assert reads == [own, CRL_TOPIC]  # its own device, and the revocation list everyone reads
    marker = f"tp/v1/dev/{DEV1}/chip/client"
    received: list[str] = []

    await e2e.launcher.kill(chip_of(DEV1), 15)  # its login sends the marker below: one session per login
    async with e2e.raw_client(client_of(DEV1)) as client:
        await client.subscribe(own, qos=1)
        # a message the login may read, sent after it subscribed: whatever the broker delivers on
        # connecting (retained messages) arrives before it
        async with e2e.raw_client(chip_of(DEV1)) as chip:
            await chip.publish(marker, b"marker", qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:  # bounded by the timeout; ends at the marker
                received.append(str(message.topic))
                if str(message.topic) == marker:
                    break

    leaked = [t for t in received if not any(topic_matches(pattern, t) for pattern in reads)]
    assert not leaked, f"{client_of(DEV1)} may read only {reads} but was sent {leaked}"
    assert received == [marker]
