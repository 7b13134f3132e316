"""Step events leave a node in order: the first at once, those logged meanwhile as one signed batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.runtime import Node
from protocol.codec import unpack
from protocol.messages import MAX_STEP_EVENTS

from .harness import make_node, provisioned, running, step_events

EV = "tp/v1/*/ev"


@pytest.fixture
def dep(tmp_path: Path):
    return provisioned(tmp_path)


def frame_types(broker: FakeBroker) -> list[str]:
    return [unpack(frame[:-64])[1] for _topic, frame in broker.matching(EV)]


async def published(broker: FakeBroker, count: int) -> None:
    for _ in range(10_000):  # bounded: each turn lets the node's event sender run
        if len(broker.matching(EV)) >= count:
            return
        await asyncio.sleep(0)
    raise TimeoutError(f"fewer than {count} event frames were published")


async def test_steps_logged_together_share_one_frame_and_keep_their_order(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    async with running(tm):
        for step in ("C1", "C2", "C4"):  # as one handler logs them, with no await in between
            tm.step("C", step, "ok", f"{step} done", session=b"s" * 16, order_id="ord-1")
        await published(broker, 1)
        tm.step("C", "C6", "ok", "alone")  # logged once the batch is out: a frame of its own
        await published(broker, 2)
    assert frame_types(broker) == ["events", "event"]
    events = step_events(broker)
    assert [(e.step, e.reason, e.node, e.device) for e in events] == [
        ("C1", "C1 done", tm.id, "dev-0001"),
        ("C2", "C2 done", tm.id, "dev-0001"),
        ("C4", "C4 done", tm.id, "dev-0001"),
        ("C6", "alone", tm.id, "dev-0001"),
    ]
    assert events[0].session == b"s" * 16 and events[0].order_id == "ord-1"


async def test_a_long_run_of_steps_is_cut_into_bounded_batches_and_none_is_lost(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    count = MAX_STEP_EVENTS * 2 + 3
    async with running(tm):
        for i in range(count):
            tm.step("A", "A2", "ok", f"app {i}")
    # the node waited for its logged events before it stopped
    assert frame_types(broker) == ["events", "events", "events"]
    assert [e.reason for e in step_events(broker)] == [f"app {i}" for i in range(count)]
