"""Point 7: a deployment provisioned with --tls pays end to end over mqtts; plain MQTT is refused.

The broker (Mosquitto) requires a client certificate of the deployment CA and the
login's password on both listeners; every node, the launcher's monitor and the
client process connect with their own certificate from their own directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

import pytest

from nodes.tls import ca_path

from .conftest import DEV1, E2E, HAVE_MOSQUITTO, OPENING, WAIT_S, client_of

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="the mosquitto binary is not installed"),
]


def connect_packet(username: str, password: str) -> bytes:
    def field(text: str) -> bytes:
        return len(text.encode()).to_bytes(2, "big") + text.encode()

    body = field("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + field(username)
    body += field(username) + field(password)
    return bytes([0x10, len(body)]) + body


async def broker_answer(port: int, packet: bytes, tls: ssl.SSLContext | None) -> bytes:
    """The first bytes the broker sends back to a CONNECT (b"" when it just closes)."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1" if tls else None
        )
        try:
            writer.write(packet)
            await writer.drain()
            return await reader.read(4)
        except (ssl.SSLError, ConnectionResetError):
            return b""
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def test_a_payment_goes_through_over_mqtts(e2e_tls: E2E) -> None:
    e2e = e2e_tls
    assert e2e.dep.load_manifest().broker.tls
    assert e2e.launcher.broker_url.startswith("mqtts://")

    run = await e2e.pay(DEV1, "2.50", "shop-1")

    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "confirmed"
    balances = await e2e.balances()
    assert balances[f"{DEV1}:wallet"] == OPENING - 250 and balances["shop-1"] == 250


async def test_plain_mqtt_and_tls_without_a_client_certificate_are_refused(e2e_tls: E2E) -> None:
    e2e = e2e_tls
    port = urlsplit(e2e.launcher.broker_url).port
    assert port is not None
    login = e2e.dep.load_broker_credentials(client_of(DEV1))
    packet = connect_packet(login.username, login.password)
    no_cert = ssl.create_default_context(cafile=str(ca_path(e2e.dep)))
    for p in (port, port + 1):  # the nodes' listener and the monitor's
        assert not (await broker_answer(p, packet, None)).startswith(b"\x20")
        assert not (await broker_answer(p, packet, no_cert)).startswith(b"\x20")
    # the control: the client login's own certificate and password are answered with a CONNACK
    address = e2e.address(client_of(DEV1))
    assert address.tls is not None
    assert (await broker_answer(port, packet, address.tls)).startswith(b"\x20\x02\x00\x00")
