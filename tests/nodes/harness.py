"""Nodes from a real provisioned deployment, on the in-memory bus, for fast node tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from nodes.assemble import node_config
from nodes.bus import FakeBroker, FakeBus
from nodes.deployment import Deployment
from nodes.logs import NodeLogging
from nodes.runtime import Node, Settings
from protocol.codec import unpack
from protocol.messages import StepEvent, StepEvents
from protocol.schema import from_map

N = TypeVar("N", bound=Node)

FAST = Settings(request_timeout_s=0.5, request_attempts=3)


def make_node(
    cls: Callable[..., N],
    dep: Deployment,
    node_id: str,
    broker: FakeBroker,
    settings: Settings = FAST,
    **extra: Any,
) -> N:
    config = node_config(dep, node_id, settings)
    logging = NodeLogging(node_id, dep.log_path(node_id), console=None)
    bus = FakeBus(broker, node_id)
    node = cls(config, bus, logging.logger, **extra)
    bus.will = node.will
    return node


@asynccontextmanager
async def running(*nodes: Node, timeout_s: float = 10) -> AsyncIterator[None]:
    """Run ``nodes`` until the block ends, then stop them and wait for them to finish."""
    tasks = [asyncio.create_task(node.run(), name=f"test:{node.id}") for node in nodes]
    try:
        async with asyncio.timeout(timeout_s):
            for node in nodes:
                await node.connected.wait()
        yield
    finally:
        for node in nodes:
            node.stop()
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks)


def step_events(broker: FakeBroker) -> list[StepEvent]:
    """Every step event published so far, decoded (signatures are checked elsewhere)."""
    events = []
    for _topic, frame in broker.matching("tp/v1/*/ev"):
        fields = unpack(frame[:-64])
        if fields[1] == "events":  # several of one node, in the order they happened
            events += from_map(StepEvents, unpack(fields[11]), "events").events
        else:
            events.append(from_map(StepEvent, unpack(fields[11]), "event"))
    return events


def provisioned(tmp_path: Path, devices: int = 1, replicas: int = 1) -> Deployment:
    from ops.provision import provision

    out = tmp_path / "deploy"
    provision(out, devices, broker_port=1, backend="amqtt", replicas=replicas)
    return Deployment(out)
