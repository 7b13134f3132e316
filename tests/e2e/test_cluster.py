"""The whole system on a clustered broker: three NATS members on loopback.

Every node is a real process; ``nodes.assemble.broker_address`` spreads the nodes
over the members (the device's chip and the servers on different ones), so a
payment crosses members. Then the member under the payment-server is SIGKILLed
while a payment is under way: the payment-server resumes its session on another
member, and every order is in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import NatsCluster
from nodes.assemble import broker_address
from protocol.topics import Role, node_id

from .conftest import DEV1, E2E, OPENING, chip_of, running_deployment, tm_of

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed"),
    pytest.mark.timeout(240),
]

PS, TS = node_id(Role.PAYMENT_SERVER), node_id(Role.TRUST_SERVER)
WAIT_S = 60.0  # a payment that lives through a member's death waits out a leader election


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[E2E]:
    async with running_deployment(tmp_path, "nats") as scn:
        yield scn


def member_of(scn: E2E, nid: str) -> int:
    """The member a node connects to first (the one it stays on while that member lives)."""
    broker = scn.launcher.broker
    assert isinstance(broker, NatsCluster)
    port = broker_address(scn.dep, nid, scn.launcher.broker_url).port
    return [m.port for m in broker.members].index(port)


async def test_payments_cross_members_and_survive_one_dying(cluster: E2E) -> None:
    scn = cluster
    broker = scn.launcher.broker
    assert isinstance(broker, NatsCluster) and len(broker.members) == 3
    placed = {nid: member_of(scn, nid) for nid in (chip_of(DEV1), tm_of(DEV1), PS, TS)}
    # the device and the platform talk only across members
    assert placed[chip_of(DEV1)] != placed[PS] and placed[tm_of(DEV1)] != placed[TS], placed
    assert placed[PS] != 0  # member 0 carries the launcher's and the test's monitor connections

    first = await scn.pay(DEV1, "1.25", "shop-1")
    assert first.code == 0, first.stderr[-3000:]
    where = await broker.placement()  # as the members themselves see it
    assert {nid: where[nid] for nid in placed} == placed, where

    # mid-stream: kill the payment-server's member once the trust link has started this payment
    since = len(scn.watcher.events)
    paying = asyncio.create_task(scn.pay(DEV1, "2.50", "shop-2"))
    await scn.wait_event(since, timeout_s=WAIT_S, device=DEV1, step="C1")
    await broker.kill_member(placed[PS])
    second = await asyncio.wait_for(paying, WAIT_S)
    assert second.code == 0, second.stderr[-3000:]

    third = await scn.pay(DEV1, "3.75", "shop-3")  # and afterwards, on two members
    assert third.code == 0, third.stderr[-3000:]
    where = await broker.placement()
    assert where[PS] != placed[PS], where  # it moved to a member still running

    orders = [run.result["order_id"] for run in (first, second, third)]
    stored = scn.stored_payments()
    assert list(stored) == orders  # each order once, none lost, none doubled
    assert [(p.status, p.amount) for p in stored.values()] == [
        ("confirmed", 125),
        ("confirmed", 250),
        ("confirmed", 375),
    ]
    balances = await scn.balances()
    assert balances[f"{DEV1}:wallet"] == OPENING - 125 - 250 - 375
    assert balances["shop-2"] == 250
