"""Point 5 on both brokers: a login uses only its own client id; no publish over MAX_FRAME is delivered.

What each broker does (pinned below):
* another login's client id: Mosquitto replaces any client id on the nodes' listener
  by the username (``use_username_as_clientid``), so the CONNECT succeeds as the
  login's own session and the victim stays; amqtt (our handler in
  ``broker.amqtt_main``) refuses the CONNECT (0x02, identifier rejected) before it
  touches any session, also for a wrong password.
* a publish of MAX_FRAME + 1 bytes: acknowledged and dropped by both
  (Mosquitto's ``message_size_limit``, amqtt through our broker subclass).
* a 30 MB publish: Mosquitto disconnects the publisher at the packet header
  (``max_packet_size``); amqtt reads the packet, acknowledges and drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

import aiomqtt
import pytest

from broker import Broker, BrokerIdentity
from protocol.envelope import MAX_FRAME

from .broker_harness import BACKENDS, WAIT_S, Cast, running_broker, until_marker

PS_STATUS = "tp/v1/plat/ps/status"
TS_TO_PS = "tp/v1/plat/ts/ps"
TO_CHIP = "tp/v1/dev/dev-a/client/chip"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def v311(broker: Broker, ident: BrokerIdentity, **kwargs: object) -> aiomqtt.Client:
    """A 3.1.1 connection: the client is told no packet limit, so the broker's own check is what acts."""
    return broker.client(ident, protocol=aiomqtt.ProtocolVersion.V311, **kwargs)


async def test_a_device_login_cannot_knock_the_payment_server_off(backend: str, tmp_path: Path) -> None:
    cast = Cast()
    ps = cast["payment-server"]
    will = aiomqtt.Will(PS_STATUS, b"offline", qos=1, retain=True)
    async with running_broker(backend, tmp_path, cast) as broker:
        async with (
            broker.client(cast.monitor) as witness,
            broker.client(ps, will=will) as server,
        ):
            await witness.subscribe(PS_STATUS, qos=1)
            await server.subscribe(TS_TO_PS, qos=1)
            await server.publish(PS_STATUS, b"online", qos=1, retain=True)
            for attacker, password in (
                (cast["dev-a.client"], cast["dev-a.client"].password),
                (ps, "not-the-password"),  # amqtt used to take over before checking the password
            ):
                impostor = BrokerIdentity(attacker.username, password, attacker.role, attacker.device)
                with contextlib.suppress(aiomqtt.MqttError):  # amqtt refuses; Mosquitto renames
                    async with asyncio.timeout(WAIT_S):
                        async with broker.client(impostor, identifier="payment-server"):
                            pass
            # the server's session is intact: it still publishes, and no will was sent before this
            await server.publish(PS_STATUS, b"still-online", qos=1, retain=True)
            got = [m.payload for m in await until_marker(witness, b"still-online")]
            # and it still receives on its subscription (amqtt dropped the session's subscriptions)
            async with broker.client(cast["trust-server"]) as ts:
                await ts.publish(TS_TO_PS, b"grant", qos=1)
            assert [m.payload for m in await until_marker(server, b"grant")] == [b"grant"]
        assert b"offline" not in got, got
        async with broker.client(cast.monitor) as late:  # and the retained status says so
            await late.subscribe(PS_STATUS, qos=1)
            assert [m.payload for m in await until_marker(late, b"still-online")] == [b"still-online"]


async def test_amqtt_refuses_another_logins_client_id_and_mosquitto_renames_it(
    backend: str, tmp_path: Path
) -> None:
    cast = Cast()
    async with running_broker(backend, tmp_path, cast) as broker:
        attempt = broker.client(cast["dev-a.client"], identifier="payment-server")
        if backend == "amqtt":
            with pytest.raises(aiomqtt.MqttCodeError):
                async with asyncio.timeout(WAIT_S):
                    await attempt.__aenter__()
        else:
            async with asyncio.timeout(WAIT_S):
                async with attempt:
                    pass
            log = broker.log_tail(200)
            assert " as dev-a.client " in log and " as payment-server " not in log


async def test_several_monitor_sessions_coexist(backend: str, tmp_path: Path) -> None:
    cast = Cast()
    async with (
        running_broker(backend, tmp_path, cast) as broker,
        broker.client(cast.monitor) as one,
        broker.client(cast.monitor) as two,
    ):
        for watcher in (one, two):
            await watcher.subscribe(TO_CHIP, qos=1)
        async with broker.client(cast["dev-a.client"]) as pub:
            await pub.publish(TO_CHIP, b"m", qos=1)
        for watcher in (one, two):
            assert [m.payload for m in await until_marker(watcher, b"m")] == [b"m"]


async def test_no_publish_over_the_largest_frame_is_delivered(backend: str, tmp_path: Path) -> None:
    cast = Cast()
    publisher, receiver = cast["dev-a.client"], cast["dev-a.chip"]
    biggest, over, huge = b"a" * MAX_FRAME, b"b" * (MAX_FRAME + 1), secrets.token_bytes(30 * 1024 * 1024)
    async with running_broker(backend, tmp_path, cast) as broker:
        async with broker.client(receiver) as chip:
            await chip.subscribe(TO_CHIP, qos=1)
            async with v311(broker, publisher) as pub:
                await pub.publish(TO_CHIP, biggest, qos=1)
                await pub.publish(TO_CHIP, over, qos=1)  # acknowledged by both, then dropped
                await pub.publish(TO_CHIP, b"marker-1", qos=1)
            got = [m.payload for m in await until_marker(chip, b"marker-1")]
            assert got == [biggest, b"marker-1"], [len(p) for p in got]

            acknowledged = False
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):  # Mosquitto resets the connection
                async with asyncio.timeout(WAIT_S / 2):
                    async with v311(broker, publisher) as pub:
                        await pub.publish(TO_CHIP, huge, qos=1)
                        acknowledged = True
            # a fresh connection of the same login: anything delivered of the huge one comes first
            async with v311(broker, publisher) as pub:
                await pub.publish(TO_CHIP, b"marker-2", qos=1)
            got = [m.payload for m in await until_marker(chip, b"marker-2")]
            assert got == [b"marker-2"], [len(p) for p in got]
        log = broker.log_tail(200)
    assert acknowledged == (backend == "amqtt")
    if backend == "mosquitto":
        assert "dev-a.client disconnected due to oversize packet" in log
    else:
        assert "published 31457280 bytes" in log and "dropped" in log
