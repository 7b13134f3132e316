"""Two replicas of each server on the in-memory bus: shared subscriptions, one reply log per role.

The fake broker delivers a ``$share`` subscription's messages to one member in
turn (``pick`` steers a chosen frame); every replica has its own identity, key
and state dir, and the replicas of a role share its database and reply log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.client import EXIT_OK, Client
from nodes.deployment import Deployment
from nodes.payment_server import PaymentServer
from nodes.replies import BUSY, LEASE_MS, MemoryReplies
from nodes.runtime import Node, Settings, ping
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from protocol.envelope import Received, peek
from protocol.errors import RequestTimeout
from protocol.messages import Ping, Pong
from protocol.topics import Role, link_topic, partition_of

from .harness import FAST, make_node, provisioned, running

DEVICES = ("dev-0001", "dev-0002")
SHOP = "shop-1"
REPLICATED = dataclasses.replace(FAST, replicas=2, request_timeout_s=1.0, request_attempts=4)


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path, devices=2, replicas=2)


@pytest.fixture
def dep_on(tmp_path: Path, db_url: str | None) -> Deployment:
    """The same deployment with the servers' databases on SQLite files, then on PostgreSQL."""
    from ops.provision import provision

    provision(tmp_path / "deploy", 2, broker_port=1, backend="amqtt", replicas=2, db=db_url)
    return Deployment(tmp_path / "deploy")


@dataclass
class Platform:
    dep: Deployment
    broker: FakeBroker
    ts: tuple[TrustServer, TrustServer]
    ps: tuple[PaymentServer, PaymentServer]
    chips: dict[str, Chip]

    async def pay(self, device: str, amount: str) -> tuple[int, dict[str, object]]:
        out = io.StringIO()
        client = make_node(
            Client,
            self.dep,
            f"{device}.client",
            self.broker,
            REPLICATED,
            deployment=self.dep,
            command=["pay", amount, SHOP],
            out=out,
            as_json=True,
        )
        async with asyncio.timeout(30):
            await client.run()
        return client.exit_code, json.loads(out.getvalue().splitlines()[-1])

    async def balances(self) -> dict[str, int]:
        return {a.account: a.balance for a in (await self.ps[0].ledger.snapshot()).accounts}


@asynccontextmanager
async def platform(
    dep: Deployment,
    broker: FakeBroker | None = None,
    settings: Settings = REPLICATED,
    devices: tuple[str, ...] = DEVICES,
) -> AsyncIterator[Platform]:
    broker = broker or FakeBroker()
    # the replicas of a role share its database, and the reply log in it (ledger.replies, db.replies)
    ts = tuple(
        make_node(TrustServer, dep, nid, broker, settings, deployment=dep)
        for nid in ("trust-server", "trust-server.2")
    )
    ps = tuple(
        make_node(PaymentServer, dep, nid, broker, settings, deployment=dep)
        for nid in ("payment-server", "payment-server.2")
    )
    chips = {d: make_node(Chip, dep, f"{d}.chip", broker, REPLICATED, deployment=dep) for d in devices}
    tms = [make_node(TrustModule, dep, f"{d}.tm", broker, REPLICATED, deployment=dep) for d in devices]
    async with running(*ts, *ps, *chips.values(), *tms, timeout_s=30):
        async with asyncio.timeout(20):
            for tm in tms:
                await tm.started.wait()
        yield Platform(dep, broker, ts, ps, chips)  # type: ignore[arg-type]


def to(node_id: str) -> Callable[[str, list[str]], int]:
    """A ``FakeBroker.pick`` handing every shared frame to ``node_id`` when it is a member."""
    return lambda topic, names: names.index(node_id) if node_id in names else 0


async def short_ping(chip: Chip, recipient: str) -> Received:
    """A ping to the payment-server that gives up after two short attempts."""
    return await chip.request(
        chip.link(Role.PAYMENT_SERVER),
        "ping",
        Ping(os.urandom(16)),
        recipient=recipient,
        expect="pong",
        timeout_s=0.2,
        attempts=2,
    )


def handled(node: Node, msg_type: str) -> int:
    return node.counters[f"in.{msg_type}"]


async def test_payments_from_two_devices_spread_over_both_replicas_of_each_server(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        results = [await p.pay(device, amount) for amount in ("1.00", "2.00") for device in DEVICES]
        after = await p.balances()
    assert all(code == EXIT_OK for code, _ in results), results
    for device in DEVICES:
        assert after[f"{device}:wallet"] == before[f"{device}:wallet"] - 300
    assert after[SHOP] == before[SHOP] + 600
    # the shared subscription spreads requests: every replica of both roles did part of the work
    assert all(handled(ps, "pay.order") + handled(ps, "trust.grant") > 0 for ps in p.ps)
    assert all(handled(ts, "c2.nonce") + handled(ts, "c2.evidence") > 0 for ts in p.ts)
    assert sum(handled(ps, "pay.order") for ps in p.ps) == 4  # nothing handled twice
    # the payment-server's answers to a trust-server replica reach the others too: they drop them unread
    assert all(ts.counters["not_for_me"] > 0 for ts in p.ts)
    assert sum(ts.counters["foreign_answer"] + ts.counters["rejected.not_for_me"] for ts in p.ts) == 0


async def test_a_retry_landing_on_the_other_replica_is_answered_from_the_log_and_executes_once(
    dep_on: Deployment,
) -> None:
    dep = dep_on
    broker = FakeBroker()
    dropped: list[bytes] = []
    orders: list[int] = []
    order_topic = link_topic(Role.CHIP, Role.PAYMENT_SERVER, DEVICES[0])

    def tap(topic: str, frame: bytes) -> list[bytes]:
        header = peek(frame)
        if header is not None and header.type == "pay.receipt" and not dropped:
            dropped.append(frame)  # the first receipt is lost on its way to the chip
            return []
        return [frame]

    def pick(topic: str, names: list[str]) -> int:
        if topic != order_topic:
            return 0
        orders.append(len(orders))
        # the first attempt to replica 1, the retry to replica 2
        return names.index("payment-server" if len(orders) == 1 else "payment-server.2")

    async with platform(dep, broker) as p:
        broker.tap, broker.pick = tap, pick
        before = await p.balances()
        code, result = await p.pay(DEVICES[0], "4.00")
        after = await p.balances()
    assert code == EXIT_OK, result
    assert dropped and len(orders) >= 2
    first, second = p.ps
    assert first.counters["flow.C.C5.ok"] == 1  # executed by the replica that got it first ...
    assert second.counters["reanswered_from_log"] >= 1  # ... the other one sent its stored answer
    assert second.counters["flow.C.C5.ok"] == 0
    assert after[f"{DEVICES[0]}:wallet"] == before[f"{DEVICES[0]}:wallet"] - 400


async def test_a_replayed_request_to_the_other_replica_changes_nothing(dep_on: Deployment) -> None:
    dep = dep_on
    broker = FakeBroker()
    order_topic = link_topic(Role.CHIP, Role.PAYMENT_SERVER, DEVICES[0])
    async with platform(dep, broker) as p:
        broker.pick = to("payment-server")  # every request to replica 1
        code, _ = await p.pay(DEVICES[0], "3.00")
        assert code == EXIT_OK
        recorded = [f for t, f in broker.published if t == order_topic and peek(f).type == "pay.order"]  # type: ignore[union-attr]
        before = await p.balances()
        receipts = len(broker.matching("*/ps/chip"))
        broker.pick = to("payment-server.2")  # the attacker's replay reaches replica 2
        broker.publish(order_topic, recorded[0], retain=False)
        async with asyncio.timeout(10):  # replica 2 claims it in the database, then answers from the log
            await broker.published_at_least("*/ps/chip", receipts + 1)
        after = await p.balances()
    assert after == before
    assert p.ps[1].counters["reanswered_from_log"] == 1
    assert p.ps[1].counters["flow.C.C5.ok"] == 0 and p.ps[1].counters["ledger_conflict"] == 0
    # the stored frame went out again as it was: the chip's replay guard drops it as a duplicate
    resent = broker.matching("*/ps/chip")[receipts:]
    assert len(resent) == 1 and resent[0][1] in [f for _, f in broker.published[: -len(resent)]]


async def test_a_request_to_a_role_is_answered_by_any_replica_to_a_node_id_only_by_that_node(
    dep: Deployment,
) -> None:
    broker = FakeBroker()
    async with platform(dep, broker) as p:
        chip = p.chips[DEVICES[0]]
        broker.pick = to("payment-server.2")  # the shared subscription hands it to replica 2
        pong: Pong = await ping(chip, Role.PAYMENT_SERVER, "payment-server")
        assert pong.node == "payment-server.2"
        # addressed to replica 1's node id, it is a role address too (replica 1 keeps the role's name);
        # addressed to replica 2's id and handed to replica 1, nobody answers: replica 1 refuses it
        broker.pick = to("payment-server")
        with pytest.raises(RequestTimeout):
            await short_ping(chip, "payment-server.2")
        assert p.ps[0].counters["rejected.not_for_me"] >= 1


async def test_an_answer_from_a_replica_not_asked_or_of_another_role_ends_nothing(dep: Deployment) -> None:
    broker = FakeBroker()
    async with platform(dep, broker) as p:
        chip = p.chips[DEVICES[0]]
        ps1, ps2 = p.ps
        topic = link_topic(Role.PAYMENT_SERVER, Role.CHIP, DEVICES[0])

        def forge(answerer: Node, recipient: str) -> None:
            # no ping of the chip reaches a server; the first is answered by ``answerer`` at once
            answered: list[bytes] = []

            def tap(t: str, frame: bytes) -> list[bytes]:
                header = peek(frame)
                if header is None or header.type != "ping" or header.sender != chip.id:
                    return [frame]
                if not answered:
                    answered.append(header.message_id)
                    pong = Pong(b"\0" * 16, answerer.id, answerer.role.value, 0, "ready")
                    forged = answerer.frame(topic, "pong", pong, chip.id, header.session, header.message_id)
                    asyncio.get_running_loop().call_soon(broker.publish, topic, forged, False)
                return []

            broker.tap = tap

        forge(ps1, "payment-server.2")  # asked replica 2 by its id: replica 1's answer is foreign
        with pytest.raises(RequestTimeout):
            await short_ping(chip, "payment-server.2")
        assert chip.counters["foreign_answer"] >= 1
        # asked the role: replica 2's answer ends it (its nonce is not ours, which ping() checks)
        forge(ps2, "payment-server")
        with pytest.raises(Exception, match="nonce"):
            await ping(chip, Role.PAYMENT_SERVER, "payment-server")
        # a trust-server's answer to the payment-server's role ends nothing: not on this topic, not of it
        chip.counters.clear()
        forge(p.ts[1], "payment-server")
        with pytest.raises(RequestTimeout):
            await short_ping(chip, "payment-server")
        assert chip.counters["rejected.wrong_role"] >= 1


async def test_a_frame_for_another_replica_is_dropped_before_its_signature_is_checked(
    dep: Deployment,
) -> None:
    broker = FakeBroker()
    async with platform(dep, broker) as p:
        ts1, ts2 = p.ts
        topic = link_topic(Role.PAYMENT_SERVER, Role.TRUST_SERVER)
        frame = bytearray(p.ps[0].frame(topic, "trust.granted", _empty(), "trust-server.2", b"", b"\1" * 16))
        frame[-1] ^= 1  # a bad signature: checking it would count rejected.bad_signature
        broker.publish(topic, bytes(frame), retain=False)
        await broker.drained()
    assert ts1.counters["not_for_me"] == 1 and ts1.counters["rejected.bad_signature"] == 0
    assert ts2.counters["rejected.bad_signature"] == 1  # the replica it names does check it


def _empty() -> object:
    from protocol.messages import Empty

    return Empty()


async def test_without_shared_subscriptions_each_replica_takes_its_devices_and_drops_the_rest_unread(
    tmp_path: Path,
) -> None:
    # amqtt and NATS deliver nothing on $share: every replica subscribes plainly, keeps its partition
    dep = provisioned(tmp_path, devices=4, replicas=2)
    devices = ("dev-0001", "dev-0004")
    assert [partition_of(d, 2) for d in devices] == [0, 1]  # one device for each replica
    partitioned = dataclasses.replace(REPLICATED, shared=False)
    async with platform(dep, settings=partitioned, devices=devices) as p:
        before = await p.balances()
        results = [await p.pay(device, "1.00") for device in devices]
        after = await p.balances()
    assert all(code == EXIT_OK for code, _ in results), results
    assert all(after[f"{d}:wallet"] == before[f"{d}:wallet"] - 100 for d in devices)
    for k, ps in enumerate(p.ps):
        mine = [d for d in devices if partition_of(d, 2) == k]
        assert handled(ps, "pay.order") == len(mine)  # exactly its own devices' orders
        assert ps.counters["rejected.bad_signature"] == ps.counters["rejected.not_for_me"] == 0
    for k, ts in enumerate(p.ts):
        mine = [d for d in devices if partition_of(d, 2) == k]
        assert handled(ts, "c2.evidence") == len(mine)
        # the others' requests were dropped before verification, never reached a handler
        others = len(devices) - len(mine)
        assert ts.counters["not_for_me"] >= 3 * others  # c1.check, c2.nonce, c2.evidence at least


async def test_the_reply_log_is_pruned_past_any_frame_the_verifier_still_takes(dep: Deployment) -> None:
    log = MemoryReplies()
    ps = make_node(
        PaymentServer, dep, "payment-server", FakeBroker(), REPLICATED, deployment=dep, replies=log
    )
    now = ps.now_ms()
    old = now - 2 * REPLICATED.skew_ms - LEASE_MS - 1_000
    for i in range(2_500):  # more than one batch: a busy platform's ten seconds
        await log.claim("dev-0001.chip", i.to_bytes(16, "big"), "payment-server", old)
    await log.claim("dev-0001.chip", b"\xff" * 16, "payment-server", now)
    assert await ps.prune_replies() == 2_500
    assert (await log.claim("dev-0001.chip", b"\xff" * 16, "payment-server.2", now)).state == BUSY
