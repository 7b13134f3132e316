"""Nonces and grants are pruned while the servers run; nonce issue is rate-limited per device.

Every clock is injected: the tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.deployment import Deployment
from nodes.payment_server import PaymentServer
from nodes.rate_limit import RateLimiter
from nodes.runtime import Node, now_ms
from nodes.trust_server import NONCE_TTL_MS, TrustServer
from protocol.certs import Certificate
from protocol.errors import Refused, TrustpayError
from protocol.messages import Challenge, NonceRequest
from protocol.records import record_hash
from protocol.topics import Role

from .harness import make_node, provisioned, running

TS, PS = "trust-server", "payment-server"
DEV1, DEV2 = "dev-0001", "dev-0002"


class Clock:
    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path, devices=2)


async def challenge(tm: Node, n: int, ts: Certificate) -> Challenge:
    answer = await tm.request(
        tm.link(Role.TRUST_SERVER),
        "c2.nonce",
        NonceRequest(record_hash(f"order-{n}".encode())),
        recipient=TS,
        expect="c2.challenge",
        peer=ts,  # c2.nonce is sealed for the trust-server
    )
    ch: Challenge = answer.envelope.body
    return ch


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def task_names(node: Node) -> set[str]:
    return {t.get_name() for t in node._tasks}


async def test_expired_nonces_are_pruned_while_the_trust_server_runs(dep: Deployment) -> None:
    clock, broker = Clock(), FakeBroker()
    ts = make_node(TrustServer, dep, TS, broker, deployment=dep, clock=clock)
    tm = make_node(Node, dep, f"{DEV1}.tm", broker)
    async with running(ts, tm):
        await asyncio.wait_for(_until(lambda: f"{TS}:every:prune" in task_names(ts)), 10)
        issued = [await challenge(tm, n, ts.config.identity.cert) for n in range(3)]
        assert len(rows(dep.trust_db, "SELECT nonce FROM nonces")) == 3
        assert await ts.prune() == 0  # none expired yet
        clock.ms += NONCE_TTL_MS + 1
        assert await ts.db.prune_nonces(clock.ms, limit=2) == 2  # each round is bounded
        assert await ts.prune() == 1
        assert rows(dep.trust_db, "SELECT nonce FROM nonces") == []
    assert len({c.nonce for c in issued}) == 3


async def test_nonce_issue_is_rate_limited_per_device(dep: Deployment) -> None:
    clock, broker = Clock(), FakeBroker()
    ts = make_node(TrustServer, dep, TS, broker, deployment=dep, clock=clock, nonce_limit=RateLimiter(2, 1.0))
    tm1 = make_node(Node, dep, f"{DEV1}.tm", broker)
    tm2 = make_node(Node, dep, f"{DEV2}.tm", broker)
    async with running(ts, tm1, tm2):
        await challenge(tm1, 1, ts.config.identity.cert)
        await challenge(tm1, 2, ts.config.identity.cert)
        with pytest.raises(Refused) as limited:
            await challenge(tm1, 3, ts.config.identity.cert)
        await challenge(tm2, 1, ts.config.identity.cert)  # another device is not slowed by the first
        clock.ms += 1_000
        await challenge(tm1, 4, ts.config.identity.cert)
        with pytest.raises(Refused):
            await challenge(tm1, 5, ts.config.identity.cert)
        assert ts.nonce_limit.tracked == 2
        clock.ms += 10_000
        await ts.prune()  # buckets that refilled are forgotten: memory follows active devices
        assert ts.nonce_limit.tracked == 0
    assert limited.value.refusal_code == "rate_limited"
    assert "retry in 1000 ms" in limited.value.refusal_reason
    assert len(rows(dep.trust_db, "SELECT nonce FROM nonces")) == 4


def test_rate_limiter_refills_and_keeps_bounded_memory() -> None:
    limit = RateLimiter(burst=3, per_s=2.0, max_keys=2)
    assert [limit.take("a", 0) for _ in range(4)] == [0, 0, 0, 500]
    assert limit.take("a", 499) == 1 and limit.take("a", 500) == 0
    assert limit.take("b", 0) == 0
    assert limit.take("c", 0) == 500  # two buckets held, neither idle: a third key waits
    assert limit.take("c", 10_000) == 0  # once they refilled they were forgotten
    assert limit.tracked == 1
    assert limit.take("a", 5) == 0  # a clock stepping back refills nothing, and breaks nothing


async def test_expired_unused_grants_are_pruned_while_the_payment_server_runs(dep: Deployment) -> None:
    clock = Clock()
    ps = make_node(PaymentServer, dep, PS, FakeBroker(), deployment=dep, clock=clock)
    async with running(ps):
        await asyncio.wait_for(_until(lambda: f"{PS}:every:prune" in task_names(ps)), 10)
        for name, ttl in (("expired", 1_000), ("used", 1_000), ("live", 120_000)):
            await ps.ledger.store_grant(DEV1, name.encode().ljust(32, b"."), b"verdict", clock.ms + ttl)
        with contextlib.closing(sqlite3.connect(dep.ledger_db)) as conn, conn:
            conn.execute("UPDATE grants SET used_ms = 1 WHERE intent_hash = ?", (b"used".ljust(32, b"."),))
        clock.ms += 2_000
        assert await ps.prune() == 1
        left = {bytes(h).rstrip(b".") for (h,) in rows(dep.ledger_db, "SELECT intent_hash FROM grants")}
    assert left == {b"used", b"live"}


async def test_a_periodic_job_keeps_running_after_a_failed_round(dep: Deployment) -> None:
    node = make_node(Node, dep, f"{DEV1}.tm", FakeBroker())
    rounds: list[int] = []

    async def job() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise TrustpayError("the first round fails")

    async with running(node):
        node.every(0.0, job, "tick")
        await asyncio.wait_for(_until(lambda: len(rounds) >= 3), 10)
    assert node.counters["task_error.error"] == 1


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(10_000):  # each turn lets the node's tasks run; bounded
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")
