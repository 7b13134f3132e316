"""All five roles on the in-memory bus: an attested payment, step by step (A, B, C)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.client import EXIT_OK, EXIT_REFUSED, Client
from nodes.deployment import Deployment
from nodes.payment_server import PaymentServer
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from tests.storage import provisioned_on

from .harness import make_node, provisioned, running, step_events

DEV = "dev-0001"
PAYER, SHOP = f"{DEV}:wallet", "shop-1"


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


@dataclass
class World:
    dep: Deployment
    broker: FakeBroker
    tm: TrustModule
    chip: Chip
    ps: PaymentServer

    async def client(self, *words: str) -> tuple[int, dict[str, object]]:
        out = io.StringIO()
        client = make_node(
            Client,
            self.dep,
            f"{DEV}.client",
            self.broker,
            deployment=self.dep,
            command=list(words),
            out=out,
            as_json=True,
        )
        async with asyncio.timeout(20):
            await client.run()
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        return client.exit_code, lines[-1]

    async def balances(self) -> dict[str, int]:
        return {a.account: a.balance for a in (await self.ps.ledger.snapshot()).accounts}

    def steps(self) -> list[str]:
        return [f"{e.step}:{e.outcome}" for e in step_events(self.broker)]


@asynccontextmanager
async def world(dep: Deployment) -> AsyncIterator[World]:
    broker = FakeBroker()
    ts = make_node(TrustServer, dep, "trust-server", broker, deployment=dep)
    ps = make_node(PaymentServer, dep, "payment-server", broker, deployment=dep)
    chip = make_node(Chip, dep, f"{DEV}.chip", broker, deployment=dep)
    tm = make_node(TrustModule, dep, f"{DEV}.tm", broker, deployment=dep)
    async with running(ts, ps, chip, tm, timeout_s=20):
        async with asyncio.timeout(10):
            await tm.started.wait()
        yield World(dep, broker, tm, chip, ps)


async def test_an_attested_payment_moves_exactly_its_amount(tmp_path: Path, db_url: str | None) -> None:
    # on PostgreSQL, both servers keep their state in one database, each in its own schema
    dep = provisioned_on(tmp_path, db_url)
    async with world(dep) as w:
        before = await w.balances()
        code, result = await w.client("pay", "12.50", SHOP)
        after = await w.balances()
    assert code == EXIT_OK, result
    assert result["status"] == "confirmed" and result["amount"] == 1250
    assert after[PAYER] == before[PAYER] - 1250 and after[SHOP] == before[SHOP] + 1250
    assert sum(after.values()) == sum(before.values())
    device_side = [
        f"{e.step}:{e.outcome}" for e in step_events(w.broker) if e.node.startswith(DEV) and e.flow in "BC"
    ]
    # the device's own nodes act one after the other: their events come in the patent's order
    assert device_side == [
        "B1:ok",
        "C1:trusted",
        "C2:ok",
        "C4:trusted",
        "C5:ok",
        "C6:ok",
        "C7:ok",
        "B3:ok",
        "B4:ok",
    ]
    platform_side = [f"{e.step}:{e.outcome}" for e in step_events(w.broker) if not e.node.startswith(DEV)]
    assert platform_side == ["C1:trusted", "C2:ok", "C3:ok", "C4:trusted", "C5:ok"]


async def test_dynamic_data_changed_outside_a_session_is_refused_at_c4(dep: Deployment) -> None:
    async with world(dep) as w:
        dyn = dep.app_dir(DEV, "wallet") / "dynamic.json"
        dyn.write_bytes(b'{"counter":7,"last_order":"forged"}\n')
        before = await w.balances()
        code, result = await w.client("pay", "1.00", SHOP)
        after = await w.balances()
        steps = w.steps()
    assert code == EXIT_REFUSED and result["code"] == "untrusted"
    assert "dynamic data changed" in str(result["reason"])
    assert after == before
    assert "C4:refused" in steps and "C5:ok" not in steps


async def test_payments_keep_the_device_trusted_across_a_restart(dep: Deployment) -> None:
    async with world(dep) as w:
        for amount in ("1.00", "2.00"):
            code, result = await w.client("pay", amount, SHOP)
            assert code == EXIT_OK, result
    async with world(dep) as w:  # A1/A2 after the sessions: dynamic data is as C6/C7 stored it
        code, result = await w.client("pay", "3.00", SHOP)
        balance = (await w.balances())[PAYER]
        restart_steps = w.steps()
    assert code == EXIT_OK, result
    assert balance == 100_000 - 600
    assert "A3:deleted" not in restart_steps and "A5:disabled" not in restart_steps


async def test_an_interactive_session_runs_each_command_and_shows_the_chip_as_it_is_now(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    typed = iter(["pay 1.00 shop-1", "apps", "status", "", "quit", "pay 9.00 shop-1"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    async with world(dep) as w:
        out = io.StringIO()
        client = make_node(
            Client, dep, f"{DEV}.client", w.broker, deployment=dep, out=out, as_json=True, interactive=True
        )
        async with asyncio.timeout(20):
            await client.run()
        balance = (await w.balances())[PAYER]
        steps = w.steps()
    results = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    paid, apps, status = results
    assert client.exit_code == EXIT_OK and paid["status"] == "confirmed"
    assert {a["name"]: a["counter"] for a in apps["apps"]} == {"wallet": 1, "transit": 0}  # after the payment
    assert status["enabled"] is True
    assert balance == 100_000 - 100  # "quit" ended the session: the last line was never run
    assert steps.count("B3:ok") == 3 and steps[-1] == "B4:ok"
