"""Hostile input against all five roles at once: nothing forged, altered, moved or replayed is
accepted, nothing crashes a node, and the next honest payment still goes through, exactly once."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from nodes.deployment import Deployment
from nodes.runtime import Node

from .harness import provisioned
from .test_payment_flow import PAYER, SHOP, world

SEED = 20261125


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


def hostile_variants(
    frames: list[tuple[str, bytes]], topics: list[str], rng: random.Random
) -> list[tuple[str, bytes]]:
    """Every kind of bad input, built from a real payment's frames."""
    out: list[tuple[str, bytes]] = []
    for topic, frame in frames:
        out.append((topic, frame))  # exact replay
        flipped = bytearray(frame)
        bit = rng.randrange(len(frame) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        out.append((topic, bytes(flipped)))  # one bit altered
        out.append((topic, frame[: rng.randrange(1, len(frame))]))  # truncated
        out.append((topic, frame + bytes([rng.randrange(256)])))  # extended
        out.append((rng.choice([t for t in topics if t != topic]), frame))  # moved to another link
    out += [(rng.choice(topics), rng.randbytes(rng.randrange(0, 600))) for _ in range(50)]  # noise
    bomb = msgpack.packb([[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]])
    out += [(t, bomb + bytes(64)) for t in topics]  # nesting past the limit
    out += [(t, msgpack.packb(list(range(60_000))) + bytes(64)) for t in topics]  # huge array
    out += [(t, bytes(70_000)) for t in topics]  # oversize frame
    return out


async def test_hostile_frames_on_every_link_change_nothing(dep: Deployment) -> None:
    rng = random.Random(SEED)
    async with world(dep) as w:
        code, _ = await w.client("pay", "1.00", SHOP)
        assert code == 0
        captured = [(t, f) for t, f in w.broker.published if "/ev" not in t and "/status" not in t]
        topics = sorted({t for t, _ in captured})
        before = await w.balances()
        accepted_before = {n.id: n.counters["accepted"] for n in (w.tm, w.chip, w.ps)}
        for topic, frame in hostile_variants(captured, topics, rng):
            w.broker.publish(topic, frame, retain=False)
        await w.broker.drained()
        accepted_by_attack = {
            n.id: n.counters["accepted"] - accepted_before[n.id] for n in (w.tm, w.chip, w.ps)
        }
        after_attack = await w.balances()
        code, result = await w.client("pay", "2.00", SHOP)
        after = await w.balances()
        nodes: list[Node] = [w.tm, w.chip, w.ps]
        counters = {n.id: Counter(n.counters) for n in nodes}
    assert after_attack == before  # nothing the attack sent moved any money
    assert code == 0, result  # and an honest payment still goes through
    assert after[PAYER] == before[PAYER] - 200 and sum(after.values()) == sum(before.values())
    for nid, c in counters.items():
        assert c["handler_crash"] == 0 and c["task_error.internal"] == 0, (nid, c)
        assert sum(v for k, v in c.items() if k.startswith("rejected.")) > 0, nid
    assert sum(c["duplicate"] for c in counters.values()) > 0  # exact replays: dropped quietly
    assert accepted_by_attack == {n: 0 for n in accepted_by_attack}  # not one hostile frame accepted
