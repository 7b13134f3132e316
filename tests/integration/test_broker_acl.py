"""The broker enforces protocol.topics.acl_for, on both backends, with real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import Broker, BrokerIdentity
from protocol.topics import (
    CHANNEL_EVENTS,
    CHANNEL_OPS,
    CHANNEL_STATUS,
    CRL_TOPIC,
    LINKS,
    NODE_ROLES,
    Role,
    channel_topic,
    inbound_filters,
    link_topic,
    node_id,
    operator_topic,
)

from .broker_harness import (
    BACKENDS,
    Cast,
    granted,
    next_message,
    refused,
    running_broker,
    until_marker,
)


@pytest.fixture
def cast() -> Cast:
    return Cast()


@pytest.fixture(params=BACKENDS)
async def broker(request: pytest.FixtureRequest, tmp_path: Path, cast: Cast) -> AsyncIterator[Broker]:
    async with running_broker(request.param, tmp_path / "broker", cast) as b:
        yield b


def ident_of(cast: Cast, role: Role, device: str | None = "dev-a") -> BrokerIdentity:
    return cast[node_id(role, device if role.on_device else None)]


# (a) ---------------------------------------------------------------------------


async def test_trust_module_reaches_trust_server(broker: Broker, cast: Cast) -> None:
    topic = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "dev-a")
    async with (
        broker.client(cast["trust-server"]) as ts,
        broker.client(cast["dev-a.tm"]) as tm,
    ):
        for flt in inbound_filters(Role.TRUST_SERVER):
            assert granted(await ts.subscribe(flt, qos=1)), flt
        await tm.publish(topic, b"hello", qos=1)
        msg = await next_message(ts)
    assert (msg.topic.value, msg.payload) == (topic, b"hello")


async def test_every_link_and_channel_allowed_by_acl_is_delivered(broker: Broker, cast: Cast) -> None:
    """acl_for and inbound_filters agree: every link, operator and channel topic works."""
    receivers = {role: ident_of(cast, role) for role in NODE_ROLES}
    receivers[Role.OPERATOR] = cast["operator"]
    expected: dict[Role, set[str]] = {role: set() for role in receivers}
    sends: list[tuple[BrokerIdentity, str]] = []
    for link in LINKS:
        topic = link_topic(link.src, link.dst, "dev-a")
        sends.append((ident_of(cast, link.src), topic))
        expected[link.dst].add(topic)
    for role in NODE_ROLES:
        topic = operator_topic(role, "dev-a" if role.on_device else None)
        sends.append((cast["operator"], topic))
        expected[role].add(topic)
        for channel in (CHANNEL_EVENTS, CHANNEL_STATUS, CHANNEL_OPS):
            topic = channel_topic(role, channel, "dev-a" if role.on_device else None)
            sends.append((ident_of(cast, role), topic))
            expected[Role.OPERATOR].add(topic)

    clients = {role: broker.client(ident) for role, ident in receivers.items()}
    for client in clients.values():
        await client.__aenter__()
    try:
        for role, client in clients.items():
            if role is Role.OPERATOR:
                filters = [r.pattern for r in cast["operator"].acl if r.access == "read"]
            else:
                filters = list(inbound_filters(role, "dev-a" if role.on_device else None))
            for flt in filters:
                assert granted(await client.subscribe(flt, qos=1)), (role, flt)
        by_login = {receivers[role].username: client for role, client in clients.items()}
        for ident, topic in sends:
            if ident.username in by_login:  # one session per login: send on the one it has
                await by_login[ident.username].publish(topic, topic.encode(), qos=1)
                continue
            async with broker.client(ident) as tx:
                await tx.publish(topic, topic.encode(), qos=1)
        for role, client in clients.items():
            got: set[str] = set()
            while got != expected[role]:
                msg = await next_message(client)
                assert msg.topic.value in expected[role], (role, msg.topic.value)
                got.add(msg.topic.value)
    finally:
        for client in clients.values():
            await client.__aexit__(None, None, None)


# (b) ---------------------------------------------------------------------------

# id: (publisher, forbidden topic, allowed marker topic of the same publisher)
FORBIDDEN_PUBLISH = {
    "other-device": ("dev-a.tm", "tp/v1/dev/dev-b/tm/ts", "tp/v1/dev/dev-a/tm/ts"),
    "wrong-direction": ("dev-a.tm", "tp/v1/dev/dev-a/ts/tm", "tp/v1/dev/dev-a/tm/ts"),
    "server-topic": ("dev-a.tm", "tp/v1/plat/ts/ps", "tp/v1/dev/dev-a/tm/ts"),
    "as-operator": ("dev-a.tm", "tp/v1/dev/dev-a/ops/tm", "tp/v1/dev/dev-a/tm/ts"),
    "deeper-level": ("dev-a.tm", "tp/v1/dev/dev-a/tm/ts/x", "tp/v1/dev/dev-a/tm/ts"),
    "as-other-role": ("dev-a.chip", "tp/v1/dev/dev-a/tm/chip", "tp/v1/dev/dev-a/chip/ps"),
    "no-such-link": ("dev-a.client", "tp/v1/dev/dev-a/client/ps", "tp/v1/dev/dev-a/client/tm"),
    "other-dev-channel": ("dev-a.chip", "tp/v1/dev/dev-b/chip/ev", "tp/v1/dev/dev-a/chip/ev"),
    "server-as-device": ("trust-server", "tp/v1/dev/dev-a/tm/ts", "tp/v1/dev/dev-a/ts/tm"),
    "server-as-server": ("payment-server", "tp/v1/plat/ts/ps", "tp/v1/plat/ps/ts"),
    "crl-by-device": ("dev-a.tm", CRL_TOPIC, "tp/v1/dev/dev-a/tm/ts"),
    "crl-by-server": ("trust-server", CRL_TOPIC, "tp/v1/dev/dev-a/ts/tm"),
}


async def test_every_login_gets_the_operators_retained_revocation_list(broker: Broker, cast: Cast) -> None:
    """Published once, retained: a node that connects later still reads it on subscribing."""
    async with broker.client(cast["operator"]) as op:
        await op.publish(CRL_TOPIC, b"crl-1", qos=1, retain=True)
    for role in NODE_ROLES:
        async with broker.client(ident_of(cast, role)) as late:
            assert granted(await late.subscribe(CRL_TOPIC, qos=1)), role
            msg = await next_message(late)
        assert (msg.topic.value, msg.payload) == (CRL_TOPIC, b"crl-1"), role


@pytest.mark.parametrize(
    ("publisher", "forbidden", "marker_topic"),
    list(FORBIDDEN_PUBLISH.values()),
    ids=list(FORBIDDEN_PUBLISH),
)
async def test_forbidden_publish_is_not_delivered(
    broker: Broker, cast: Cast, publisher: str, forbidden: str, marker_topic: str
) -> None:
    async with (
        broker.client(cast.monitor) as witness,
        broker.client(cast[publisher]) as pub,
    ):
        assert granted(await witness.subscribe("tp/v1/#", qos=1))
        await pub.publish(forbidden, b"forbidden", qos=1)
        await pub.publish(marker_topic, b"marker", qos=1)
        got = await until_marker(witness, b"marker")
    assert [(m.topic.value, m.payload) for m in got] == [(marker_topic, b"marker")]


# (c), (d) ------------------------------------------------------------------------


async def test_wrong_password_is_refused(broker: Broker, cast: Cast) -> None:
    good = cast["dev-a.tm"]
    bad = BrokerIdentity(good.username, good.password + "x", good.role, good.device)
    assert await refused(broker, bad)
    assert not await refused(broker, good)


async def test_unknown_user_is_refused(broker: Broker, cast: Cast) -> None:
    stranger = BrokerIdentity("dev-c.tm", "whatever-password", Role.TRUST_MODULE, "dev-c")
    assert await refused(broker, stranger)


async def test_anonymous_is_refused(broker: Broker, cast: Cast) -> None:
    assert await refused(broker, cast.monitor, username=None, password=None)


# (e) ---------------------------------------------------------------------------

# (subscriber, forbidden filter, publisher, forbidden topic, marker topic)
FORBIDDEN_READ = [
    pytest.param(
        "dev-a.tm",
        "tp/v1/dev/dev-b/+/tm",
        "trust-server",
        "tp/v1/dev/dev-b/ts/tm",
        "tp/v1/dev/dev-a/ts/tm",
        id="other-device",
    ),
    pytest.param(
        "dev-a.tm",
        "tp/v1/#",
        "trust-server",
        "tp/v1/dev/dev-b/ts/tm",
        "tp/v1/dev/dev-a/ts/tm",
        id="whole-tree",
    ),
    pytest.param(
        "dev-a.tm",
        "tp/v1/dev/dev-a/+/chip",
        "dev-a.client",
        "tp/v1/dev/dev-a/client/chip",
        "tp/v1/dev/dev-a/client/tm",
        id="other-role-same-device",
    ),
    pytest.param(
        "dev-a.chip",
        "tp/v1/dev/+/ps/chip",
        "payment-server",
        "tp/v1/dev/dev-b/ps/chip",
        "tp/v1/dev/dev-a/ps/chip",
        id="any-device",
    ),
    pytest.param(
        "dev-a.chip",
        "tp/v1/plat/+/ts",
        "payment-server",
        "tp/v1/plat/ps/ts",
        "tp/v1/dev/dev-a/ps/chip",
        id="platform-link",
    ),
]


@pytest.mark.parametrize(
    ("subscriber", "forbidden_filter", "publisher", "forbidden", "marker_topic"), FORBIDDEN_READ
)
async def test_device_cannot_read_others_traffic(
    broker: Broker,
    cast: Cast,
    subscriber: str,
    forbidden_filter: str,
    publisher: str,
    forbidden: str,
    marker_topic: str,
) -> None:
    sub_ident = cast[subscriber]
    async with (
        broker.client(sub_ident) as sub,
        broker.client(cast[publisher]) as pub,
    ):
        for flt in inbound_filters(sub_ident.role, sub_ident.device):
            assert granted(await sub.subscribe(flt, qos=1))
        codes = await sub.subscribe(forbidden_filter, qos=1)
        if broker.backend == "amqtt":
            # documented in broker.embedded: amqtt refuses, Mosquitto grants and filters
            assert not granted(codes)
        await pub.publish(forbidden, b"forbidden", qos=1)
        await pub.publish(marker_topic, b"marker", qos=1)
        got = await until_marker(sub, b"marker")
    assert [m.payload for m in got] == [b"marker"]
