"""A device whose clock is off hears a signed ``clock_skew`` refusal at once, and nothing else can end
its requests with one: not a recorded old refusal, not a refusal from a node it did not ask."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.client import EXIT_OK, EXIT_REFUSED, Client
from nodes.deployment import Deployment
from nodes.payment_server import PaymentServer
from nodes.runtime import CLOCK_SKEW_BURST, Node, ping
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from protocol.envelope import peek
from protocol.errors import Refused, RequestTimeout
from protocol.messages import Ping, Refusal
from protocol.topics import Role

from .harness import FAST, make_node, provisioned, running

TS = "trust-server"
DEV = "dev-0001"
TM = f"{DEV}.tm"
CHIP = f"{DEV}.chip"
BEHIND = dataclasses.replace(FAST, clock_offset_ms=-40_000)
AHEAD = dataclasses.replace(FAST, clock_offset_ms=40_000)


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


@pytest.mark.parametrize(("settings", "way"), [(BEHIND, "behind"), (AHEAD, "ahead of")])
async def test_a_skewed_node_is_told_by_how_much_and_which_way_at_the_first_attempt(
    dep: Deployment, settings, way: str
) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker, settings=settings)
    ts = make_node(Node, dep, TS, broker)
    async with running(tm, ts):
        with pytest.raises(Refused) as info:
            await ping(tm, Role.TRUST_SERVER, TS)
    assert info.value.refusal_code == "clock_skew"
    assert f"s {way} the trust-server's; set the device's clock" in info.value.refusal_reason
    seconds = float(info.value.refusal_reason.split("your clock is ")[1].split(" s ")[0])
    assert 39.0 <= seconds <= 41.0
    assert tm.counters["request_retry"] == 0 and tm.counters["accepted_clock_skew"] == 1
    assert ts.counters["refused.clock_skew"] == 1 and ts.counters["in.ping"] == 0  # never handled


async def test_a_node_with_its_offset_stamps_and_checks_with_that_clock(dep: Deployment) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker, settings=dataclasses.replace(FAST, clock_offset_ms=-20_000))
    ts = make_node(Node, dep, TS, broker)
    async with running(tm, ts):
        frame = tm.frame(tm.link(Role.TRUST_SERVER), "ping", Ping(b"\x00" * 16), TS)
        header = peek(frame)
        assert header is not None and abs(header.ts_ms - (ts.now_ms() - 20_000)) < 1_000
        assert abs(tm.started_ms - (ts.started_ms - 20_000)) < 1_000
        assert abs(tm.metrics().at_ms - (ts.metrics().at_ms - 20_000)) < 1_000


async def test_clock_skew_refusals_are_rate_limited_per_sender(dep: Deployment) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker, settings=BEHIND)
    ts = make_node(Node, dep, TS, broker)
    async with running(tm, ts):
        topic = tm.link(Role.TRUST_SERVER)
        flood = [tm.frame(topic, "ping", Ping(bytes(16)), TS) for _ in range(CLOCK_SKEW_BURST + 6)]
        for frame in flood:  # at once: the bucket refills one a second, not within this loop
            ts._on_frame(topic, frame)
    assert ts.counters["refused.clock_skew"] == CLOCK_SKEW_BURST
    assert ts.counters["clock_skew_unanswered"] == 6
    assert ts.counters["rejected.stale"] == CLOCK_SKEW_BURST + 6


async def test_a_recorded_old_clock_skew_refusal_does_not_end_a_new_request(dep: Deployment) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker, settings=BEHIND)
    ts = make_node(Node, dep, TS, broker)
    recorded: list[tuple[str, bytes]] = []

    def record_then_replay(topic: str, payload: bytes) -> list[bytes]:
        if not topic.endswith("/ts/tm"):
            return [payload]
        if not recorded:
            recorded.append((topic, payload))
            return [payload]
        return [recorded[0][1]]  # every later answer is lost; the attacker plays the old refusal

    broker.tap = record_then_replay
    async with running(tm, ts):
        with pytest.raises(Refused):
            await ping(tm, Role.TRUST_SERVER, TS)
        with pytest.raises(RequestTimeout):  # not Refused: the old refusal names an old request
            await ping(tm, Role.TRUST_SERVER, TS)
    assert tm.counters["accepted_clock_skew"] == 1
    assert tm.counters["rejected.stale"] >= FAST.request_attempts
    assert ts.counters["refused.clock_skew"] == 1 + FAST.request_attempts


async def test_a_clock_skew_refusal_from_a_node_not_asked_does_not_end_the_request(dep: Deployment) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker, settings=BEHIND)
    ts = make_node(Node, dep, TS, broker)
    chip = make_node(Node, dep, CHIP, broker)  # a compromised chip, its clock right: 40 s ahead of the tm
    forged: list[bytes] = []

    def forge_before_the_answer(topic: str, payload: bytes) -> list[bytes]:
        header = peek(payload)
        if topic.endswith("/tm/ts") and header is not None and header.type == "ping" and not forged:
            chip_topic = chip.link(Role.TRUST_MODULE)
            forged.append(
                chip.frame(
                    chip_topic,
                    "error",
                    Refusal("clock_skew", "forged by the chip"),
                    TM,
                    reply_to=header.message_id,
                    peer=tm.config.identity.cert,
                )
            )
            broker.publish(chip_topic, forged[0], retain=False)  # reaches the tm before the answer
        return [payload]

    broker.tap = forge_before_the_answer
    async with running(tm, ts, chip):
        with pytest.raises(Refused) as info:
            await ping(tm, Role.TRUST_SERVER, TS)
    assert forged
    assert "the trust-server's" in info.value.refusal_reason  # the genuine refusal, not the chip's
    assert tm.counters["accepted_clock_skew"] == 1 and tm.counters["rejected.stale"] == 1


async def test_a_device_40s_behind_gets_clock_skew_from_pay_through_chip_and_trust_module(
    dep: Deployment,
) -> None:
    broker = FakeBroker()
    ts = make_node(TrustServer, dep, TS, broker, deployment=dep)
    ps = make_node(PaymentServer, dep, "payment-server", broker, deployment=dep)
    chip = make_node(Chip, dep, CHIP, broker, settings=BEHIND, deployment=dep)
    tm = make_node(TrustModule, dep, TM, broker, settings=BEHIND, deployment=dep)
    async with running(ts, ps, chip, tm, timeout_s=20):
        async with asyncio.timeout(10):
            await tm.started.wait()
        out = io.StringIO()
        client = make_node(
            Client,
            dep,
            f"{DEV}.client",
            broker,
            settings=BEHIND,
            deployment=dep,
            command=["pay", "1.00", "shop-1"],
            out=out,
            as_json=True,
        )
        async with asyncio.timeout(10):
            await client.run()
    result = json.loads(out.getvalue().splitlines()[-1])
    assert client.exit_code == EXIT_REFUSED != EXIT_OK
    assert result["code"] == "clock_skew", result
    assert "40" in result["reason"] and "behind the trust-server's" in result["reason"]
    assert ts.counters["refused.clock_skew"] == 1
    assert ps.counters["in.pay.order"] == 0
