"""Two real nodes on a real broker (Mosquitto and amqtt): signed requests and responses,
and a broker restart in the middle of the stream that loses and duplicates nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import Broker
from nodes.assemble import assemble
from nodes.deployment import Deployment
from nodes.runtime import Node, Settings, ping
from ops.broker_cmd import broker_for
from ops.provision import provision
from protocol.messages import Challenge, NonceRequest
from protocol.topics import Role

from .broker_harness import BACKENDS

DEV = "dev-0001"
REQUESTS = 40
IN_FLIGHT = 4


@pytest.fixture(params=BACKENDS)
async def deployed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Deployment, Broker]]:
    provision(tmp_path / "d", 1, backend=request.param)
    dep = Deployment(tmp_path / "d")
    broker = broker_for(dep)
    async with broker:
        yield dep, broker


def node(dep: Deployment, nid: str, broker: Broker) -> Node:
    url = f"mqtt://{broker.host}:{broker.port}?v={broker.mqtt_version}"
    parts = assemble(dep, nid, url, console=None)
    # amqtt drains for several seconds on SIGTERM before it exits: give requests a budget to outlast it
    settings = Settings(request_timeout_s=1.0, request_attempts=30)
    config = type(parts.config)(parts.config.identity, parts.config.anchors, parts.config.state_dir, settings)
    n = Node(config, parts.bus, parts.logging.logger)
    parts.bus.will = n.will
    parts.bus.backoff_max_s = 0.5
    return n


async def start(*nodes: Node) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    async with asyncio.timeout(20):
        for n in nodes:
            await n.connected.wait()
    return tasks


async def stop(nodes: tuple[Node, ...], tasks: list[asyncio.Task[None]]) -> None:
    for n in nodes:
        n.stop()
    async with asyncio.timeout(20):
        await asyncio.gather(*tasks)


async def test_signed_ping_both_ways(deployed: tuple[Deployment, Broker]) -> None:
    dep, broker = deployed
    tm, ts = node(dep, f"{DEV}.tm", broker), node(dep, "trust-server", broker)
    tasks = await start(tm, ts)
    try:
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
        back = await ping(ts, Role.TRUST_MODULE, f"{DEV}.tm", device=DEV)
    finally:
        await stop((tm, ts), tasks)
    assert (pong.node, back.node) == ("trust-server", f"{DEV}.tm")
    assert not [k for k in ts.counters if k.startswith("rejected.")]


async def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    deployed: tuple[Deployment, Broker],
) -> None:
    dep, broker = deployed
    tm, ts = node(dep, f"{DEV}.tm", broker), node(dep, "trust-server", broker)
    handled: Counter[bytes] = Counter()

    async def echo(rx):  # the application: must run exactly once per request
        handled[rx.envelope.message_id] += 1
        return "c2.challenge", Challenge(rx.envelope.body.intent_hash, 0)

    ts.route("c2.nonce", echo)
    answers: dict[int, bytes] = {}
    some_answered = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            rx = await tm.request(
                tm.link(Role.TRUST_SERVER),
                "c2.nonce",
                NonceRequest(i.to_bytes(32, "big")),
                recipient="trust-server",
                expect="c2.challenge",
                peer=dep.load_cert("trust-server"),  # c2.nonce is sealed
            )
            answers[i] = rx.envelope.body.nonce
            if len(answers) >= REQUESTS // 4:
                some_answered.set()

    tasks = await start(tm, ts)
    try:
        async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
            for _ in range(IN_FLIGHT):
                tg.create_task(worker())
            await some_answered.wait()
            await broker.restart()
    finally:
        await stop((tm, ts), tasks)
    assert sorted(answers) == list(range(REQUESTS))  # nothing lost
    assert all(answers[i] == i.to_bytes(32, "big") for i in answers)  # each answer is its own request's
    assert len(handled) == REQUESTS and set(handled.values()) == {1}  # nothing run twice
    assert tm.bus.connections >= 2 and ts.bus.connections >= 2  # the restart really cut both connections
