"""Point 7 on Mosquitto: mqtts with a client certificate and the password, nothing less.

The certificates come from ``ops.tls_material`` (what ``trustpay provision --tls``
writes): a CA, a server certificate for 127.0.0.1, a client certificate per login.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from broker import Broker, BrokerIdentity, MosquittoBroker, ServerTls, free_port
from nodes.tls import TlsFiles, client_context
from ops.tls_material import issue, make_ca

from .broker_harness import HAVE_MOSQUITTO, WAIT_S, Cast, until_marker

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed"),
]
TOPIC = "tp/v1/dev/dev-a/client/chip"


def write_pki(directory: Path, logins: list[str]) -> tuple[ServerTls, dict[str, TlsFiles]]:
    now_s = time.time_ns() // 1_000_000_000
    ca = make_ca(now_s, 1)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    server = issue(ca, "127.0.0.1", now_s, 1, server=True)
    (directory / "server.pem").write_bytes(server.cert_pem)
    (directory / "server.key").write_bytes(server.key_pem)
    clients = {}
    for login in logins:
        leaf = issue(ca, login, now_s, 1, server=False)
        (directory / f"{login}.pem").write_bytes(leaf.cert_pem)
        (directory / f"{login}.key").write_bytes(leaf.key_pem)
        clients[login] = TlsFiles(
            directory / "ca.pem", directory / f"{login}.pem", directory / f"{login}.key"
        )
    return ServerTls(directory / "ca.pem", directory / "server.pem", directory / "server.key"), clients


@contextlib.asynccontextmanager
async def tls_broker(tmp_path: Path, cast: Cast) -> AsyncIterator[Broker]:
    pki = tmp_path / "pki"
    pki.mkdir()
    server, clients = await asyncio.to_thread(write_pki, pki, [i.username for i in cast.all])
    broker = MosquittoBroker(
        tmp_path / "data",
        free_port(),
        cast.all,
        cast.monitor,
        tls=server,
        client_tls=lambda ident: client_context(clients[ident.username]),
    )
    async with broker:
        yield broker


def connect_packet(login: BrokerIdentity) -> bytes:
    """An MQTT 3.1.1 CONNECT with username and password, as a client would send it."""

    def field(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    body = field("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")  # level 4; user, password, clean
    body += field(login.username) + field(login.username) + field(login.password)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


async def answer_to_connect(port: int, login: BrokerIdentity, tls: ssl.SSLContext | None) -> bytes:
    """What the broker sends back to a CONNECT: a CONNACK starts with 0x20; a refusal is a closed
    connection (b"") or a TLS alert (raised as ssl.SSLError / ConnectionResetError)."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1" if tls else None
        )
        try:
            writer.write(connect_packet(login))
            await writer.drain()
            return await reader.read(4)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def refused_at_tls(port: int, login: BrokerIdentity, tls: ssl.SSLContext | None) -> bool:
    try:
        answer = await answer_to_connect(port, login, tls)
    except (ssl.SSLError, ConnectionResetError):
        return True
    return not answer.startswith(b"\x20")


async def test_mqtts_with_certificate_and_password_carries_messages(tmp_path: Path) -> None:
    cast = Cast()
    async with tls_broker(tmp_path, cast) as broker:
        assert broker.url.startswith("mqtts://")
        async with broker.client(cast["dev-a.chip"]) as chip, broker.client(cast["dev-a.client"]) as client:
            await chip.subscribe(TOPIC, qos=1)
            await client.publish(TOPIC, b"sealed", qos=1)
            assert [m.payload for m in await until_marker(chip, b"sealed")] == [b"sealed"]


async def test_plain_connections_and_connections_without_a_certificate_are_refused(tmp_path: Path) -> None:
    cast = Cast()
    login = cast["dev-a.client"]
    async with tls_broker(tmp_path, cast) as broker:
        assert broker.client_tls is not None
        with_cert = broker.client_tls(login)
        no_cert = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
        for port in (broker.port, broker.monitor_port):
            # a CONNECT in clear (its password readable on the wire) gets no CONNACK
            assert await refused_at_tls(port, login, None)
            # TLS without a client certificate: the handshake fails (TLS 1.3: an alert on first read)
            assert await refused_at_tls(port, login, no_cert)
        # the control: the same raw CONNECT over TLS with the login's certificate is answered
        assert (await answer_to_connect(broker.port, login, with_cert)).startswith(b"\x20\x02\x00\x00")
        # a certificate does not replace the password: a wrong one is refused (MQTT: not authorized)
        wrong = BrokerIdentity(login.username, "not-the-password", login.role, login.device)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with asyncio.timeout(WAIT_S), broker.client(wrong):
                pass
        async with broker.client(login):  # the right certificate and password get in
            pass
