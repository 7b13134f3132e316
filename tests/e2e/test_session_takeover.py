"""Point 5: a device's login using the payment-server's client id does not knock it off the broker.

On main, a device's client login connecting with client id ``payment-server`` took
over the server's session: the broker published its last will ("offline") each time.
Now Mosquitto makes the connection the client login's own session
(``use_username_as_clientid``) and amqtt refuses it before touching any session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiomqtt
import pytest

from nodes.runtime import now_ms
from ops.watch import public_verifier
from protocol.messages import Status

from .conftest import DEV1, E2E, OPENING, WAIT_S, client_of

pytestmark = pytest.mark.e2e

PS = "payment-server"
PS_STATUS = "tp/v1/plat/ps/status"


def connections_logged(e2e: E2E) -> int:
    lines = e2e.dep.log_path(PS).read_text().splitlines()
    return sum(1 for line in lines if json.loads(line).get("event") == "bus.connected")


async def test_a_device_login_with_the_payment_servers_client_id_does_not_knock_it_off(e2e: E2E) -> None:
    seen = len(e2e.watcher.seen)
    connected = connections_logged(e2e)
    assert connected >= 1
    for _ in range(3):
        with contextlib.suppress(aiomqtt.MqttError):  # amqtt refuses; Mosquitto renames it
            async with asyncio.timeout(WAIT_S), e2e.raw_client(client_of(DEV1), PS) as impostor:
                await impostor.publish(f"tp/v1/dev/{DEV1}/client/chip", b"x", qos=1)

    run = await e2e.pay(DEV1, "1.25", "shop-1")

    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert (await e2e.balances())[f"{DEV1}:wallet"] == OPENING - 125
    states = [s.status.state for s in e2e.watcher.seen[seen:] if s.status is not None and s.sender == PS]
    assert "offline" not in states, states
    assert connections_logged(e2e) == connected  # never dropped, never reconnected
    async with e2e.capture(PS_STATUS) as capture:  # the retained status a newcomer gets
        await capture.wait_until(lambda: bool(capture.on(PS_STATUS)))
    verifier = await asyncio.to_thread(public_verifier, e2e.dep)
    status = verifier.open(capture.on(PS_STATUS)[0], PS_STATUS, now_ms()).envelope.body
    assert isinstance(status, Status) and status.state == "online"
