"""The clustered broker: three NATS members on free loopback ports, our logins and ACL.

Each test starts its own cluster (``nats-server`` from Debian's package) and kills
only the members it started. No sleeps: a message that must *not* arrive is shown
absent by an allowed marker sent after it on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from broker import CLUSTER_SIZE, HOST, PORTS_PER_MEMBER, NatsCluster, make_broker
from broker.nats import member_ports, permissions, subjects
from nodes import assemble
from nodes.assemble import broker_address
from nodes.bus import BrokerAddress, MqttBus
from nodes.deployment import Deployment
from ops.provision import provision
from protocol.errors import TransportError
from protocol.topics import CRL_TOPIC, Role, link_topic

from .broker_harness import Cast

pytestmark = pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")

WAIT_S = 20.0
DEV_A, DEV_B = "dev-a", "dev-b"
CHIP_TO_PS = link_topic(Role.CHIP, Role.PAYMENT_SERVER, DEV_A)
PS_TO_CHIP = link_topic(Role.PAYMENT_SERVER, Role.CHIP, DEV_A)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, cast: Cast) -> AsyncIterator[NatsCluster]:
    broker = make_broker("nats", tmp_path / "nats", None, cast.all, cast.monitor)
    assert isinstance(broker, NatsCluster)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.kill()


def persistent(c: NatsCluster, member: int, username: str, cast: Cast) -> aiomqtt.Client:
    return c.member_client(member, cast[username], clean_session=False, timeout=WAIT_S)


@contextlib.asynccontextmanager
async def connected(make: Callable[[], aiomqtt.Client]) -> AsyncIterator[aiomqtt.Client]:
    """A connection, tried again while the cluster elects new leaders after a member died.

    For a few seconds after a SIGKILL, a member may refuse a CONNECT whose session record
    it cannot read yet (seen here: NATS answers after its JetStream request times out, 4 s).
    """
    last: Exception | None = None
    for _ in range(10):  # bounded: each try ends at the client's own timeout
        client = make()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            last = exc
            continue
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)
        return
    raise AssertionError(f"no connection after 10 tries: {last!r}")


async def publish_all(make: Callable[[], aiomqtt.Client], topic: str, payloads: list[bytes]) -> None:
    """Publish each payload at QoS 1 until acknowledged, connecting again when the cluster drops one.

    Right after a member dies, NATS may never acknowledge a publish whose store request timed
    out; a new connection sends it again (a node's bus does the same after ``ack_timeout_s``).
    """
    remaining = list(payloads)
    for _ in range(10):  # bounded: each try ends at the client's timeout
        try:
            async with connected(make) as client:
                while remaining:
                    await client.publish(topic, remaining[0], qos=1)
                    remaining.pop(0)
            return
        except aiomqtt.MqttError:
            continue
    raise AssertionError(f"{len(remaining)} publishes never acknowledged")


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(WAIT_S):
        return await anext(aiter(client.messages))


def test_topics_map_to_subjects() -> None:
    assert subjects("tp/v1/dev/+/ops/tm") == ("tp.v1.dev.*.ops.tm",)
    assert subjects("tp/v1/#") == ("tp.v1", "tp.v1.>")
    with pytest.raises(Exception, match="cannot map"):
        subjects("tp/v1/a.b")
    perms = permissions(Cast()["dev-a.chip"])
    assert "tp.v1.dev.dev-a.chip.ps" in perms["publish"]["allow"]
    assert not any("dev-b" in s for s in perms["publish"]["allow"] + perms["subscribe"]["allow"])
    assert perms["subscribe"]["allow"][0] == "$MQTT.sub.>"  # QoS 1 deliveries (broker.nats)


def test_nodes_know_the_cluster_layout() -> None:
    """nodes.assemble does not import broker/: its copy of the layout must agree."""
    assert (assemble._NATS_MEMBERS, assemble._NATS_PORTS_PER_MEMBER) == (CLUSTER_SIZE, PORTS_PER_MEMBER)
    assert member_ports(20000, 3) == (20000, 20003, 20006)


async def test_three_members_carry_retained_qos1_and_acl_across(tmp_path: Path) -> None:
    cast = Cast()
    async with cluster(tmp_path, cast) as c:
        assert len(c.members) == 3 and all(m.is_running for m in c.members)
        # the revocation list, retained, published on member 0, read on member 2 by a device
        async with c.member_client(0, cast["operator"]) as op:
            await op.publish(CRL_TOPIC, b"crl-1", qos=1, retain=True)
        async with (
            c.member_client(2, cast["dev-a.chip"]) as chip,
            c.member_client(1, cast["payment-server"]) as ps,
            c.member_client(2, cast["dev-b.chip"]) as other,
        ):
            await chip.subscribe(CRL_TOPIC, qos=1)
            got = await next_message(chip)
            assert (str(got.topic), got.payload, got.retain) == (CRL_TOPIC, b"crl-1", True)
            # QoS 1 both ways between members 2 and 1
            await ps.subscribe("tp/v1/dev/+/+/ps", qos=1)
            await chip.subscribe(PS_TO_CHIP, qos=1)
            await chip.publish(CHIP_TO_PS, b"order", qos=1)
            got = await next_message(ps)
            assert (str(got.topic), got.payload) == (CHIP_TO_PS, b"order")
            await ps.publish(PS_TO_CHIP, b"receipt", qos=1)
            got = await next_message(chip)
            assert (str(got.topic), got.payload) == (PS_TO_CHIP, b"receipt")
            # another device's chip may neither read dev-a's link nor write on it
            (code,) = await other.subscribe(PS_TO_CHIP, qos=1)
            assert code.is_failure
            await other.publish(CHIP_TO_PS, b"forged", qos=1)  # acknowledged, dropped
            await other.publish(link_topic(Role.CHIP, Role.PAYMENT_SERVER, DEV_B), b"marker", qos=1)
            got = await next_message(ps)
            assert got.payload == b"marker", got.payload


async def test_a_session_survives_its_member(tmp_path: Path) -> None:
    """A clean_session=False subscriber whose member dies resumes on another: nothing lost."""
    cast = Cast()
    async with cluster(tmp_path, cast) as c:
        async with persistent(c, 2, "payment-server", cast) as ps:
            await ps.subscribe("tp/v1/dev/+/+/ps", qos=1)
        sent = [f"order-{i}".encode() for i in range(20)]
        chip = functools.partial(c.member_client, 0, cast["dev-a.chip"], timeout=8.0)
        await publish_all(chip, CHIP_TO_PS, sent[:10])
        await c.kill_member(2)  # the member the session was made on
        await publish_all(chip, CHIP_TO_PS, sent[10:])  # each acknowledged once the cluster stored it
        async with connected(lambda: persistent(c, 1, "payment-server", cast)) as ps:
            got: list[bytes] = []
            while len(set(got)) < len(sent):  # bounded by next_message's timeout
                got.append(bytes((await next_message(ps)).payload))  # type: ignore[arg-type]
        assert set(got) == set(sent)


async def test_the_bus_fails_over_to_another_member(tmp_path: Path) -> None:
    cast = Cast()
    async with cluster(tmp_path, cast) as c:
        login = cast["payment-server"]
        ports = [m.port for m in c.members]
        address = BrokerAddress(
            c.host, ports[2], login.username, login.password, "3.1.1", alternates=((c.host, ports[0]),)
        )
        bus = MqttBus(address, login.username)
        received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        up = asyncio.Event()
        task = asyncio.create_task(
            bus.run(("tp/v1/dev/+/+/ps",), lambda _t, p: received.put_nowait((p, bus.endpoint)), up)
        )
        try:
            async with asyncio.timeout(WAIT_S):
                await up.wait()
            assert bus.endpoint == (c.host, ports[2])
            await c.kill_member(2)
            chip = functools.partial(c.member_client, 1, cast["dev-a.chip"], timeout=8.0)
            await publish_all(chip, CHIP_TO_PS, [b"while-moving"])
            async with asyncio.timeout(2 * WAIT_S):
                payload, endpoint = await received.get()
            assert (payload, endpoint) == (b"while-moving", (c.host, ports[0]))  # the session moved
            assert bus.connections >= 2
            for _ in range(10):  # while the cluster elects leaders a publish may go unacknowledged
                with contextlib.suppress(TransportError):
                    await bus.publish(PS_TO_CHIP, b"after")  # acknowledged by a live member
                    break
            else:
                raise AssertionError("no publish acknowledged after the failover")
        finally:
            bus.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_provision_for_nats_writes_the_logins_and_nodes_get_every_member(tmp_path: Path) -> None:
    manifest = provision(tmp_path / "deploy", 1, backend="nats")
    dep = Deployment(tmp_path / "deploy")
    users = dep.broker_dir / "nats-users.conf"
    assert users.stat().st_mode & 0o777 == 0o600
    text = users.read_text()
    assert '"user": "dev-0001.chip"' in text and '"tp.v1.dev.dev-0001.chip.ps"' in text
    first = manifest.broker.port
    members = {(HOST, p) for p in member_ports(first, CLUSTER_SIZE)}
    chip = broker_address(dep, "dev-0001.chip")
    assert set(chip.endpoints) == members and len(chip.endpoints) == CLUSTER_SIZE
    monitor = broker_address(dep, "monitor")  # no second listener on NATS: the member's own port
    assert monitor.endpoints == (("127.0.0.1", first), *sorted(members)[1:])
    url = broker_address(dep, "payment-server", "mqtt://127.0.0.1:5001,127.0.0.1:5002?v=3.1.1")
    assert set(url.endpoints) == {("127.0.0.1", 5001), ("127.0.0.1", 5002)} and url.mqtt_version == "3.1.1"


def test_an_address_turns_through_the_members() -> None:
    one = BrokerAddress("127.0.0.1", 1, "u", "p")
    assert one.at(5) == one
    three = BrokerAddress("127.0.0.1", 1, "u", "p", "3.1.1", alternates=(("127.0.0.1", 4), ("127.0.0.1", 7)))
    assert [a.port for a in (three.at(0), three.at(1), three.at(2), three.at(3))] == [1, 4, 7, 1]
    assert three.at(1).endpoints == (("127.0.0.1", 4), ("127.0.0.1", 7), ("127.0.0.1", 1))
