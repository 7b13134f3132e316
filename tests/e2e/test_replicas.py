"""Two replicas of each server on a real Mosquitto and PostgreSQL: one is SIGKILLed mid-stream.

The replicas share a fresh PostgreSQL schema prefix of the test database (the
reason replicas exist: one database for servers anywhere); the killed replica's
last will lands on its own status topic, so `trustpay status` shows it lost while
the role's other replica stays online.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from ops.scenario import ClientRun
from ops.status_cmd import all_online, status
from protocol.topics import Role, status_topic
from tests.storage import drop_schemas, pg_url

from .conftest import (
    DEVICES,
    HAVE_MOSQUITTO,
    assert_charged_once,
    chip_of,
    node_stopped_counters,
    running_deployment,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="the mosquitto binary is not installed"),
]

PS1, PS2 = Role.PAYMENT_SERVER.value, f"{Role.PAYMENT_SERVER.value}.2"
TS1, TS2 = Role.TRUST_SERVER.value, f"{Role.TRUST_SERVER.value}.2"
PS_STATUS = status_topic(Role.PAYMENT_SERVER)


def chip_pending(dep: Any, device: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dep.state_dir(chip_of(device)) / "chip.json").read_bytes())
    return dict(data["pending"])


async def test_a_payment_server_replica_killed_mid_stream_loses_nothing_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    prefix = f"t{secrets.token_hex(6)}"
    try:
        await _kill_a_replica(tmp_path, pg_url(prefix))
    finally:
        await drop_schemas(prefix)


async def _kill_a_replica(tmp_path: Path, db: str) -> None:
    async with running_deployment(tmp_path, "mosquitto", replicas=2, db=db) as e2e:
        assert e2e.dep.database("ledger").kind == "postgresql"  # one database for every replica
        assert set(e2e.launcher.servers) == {"trust-server", "trust-server.2", PS1, PS2}
        opening = await e2e.balances()
        # every payment a distinct amount, so a double charge could not hide behind another payment
        plan = {DEVICES[0]: [101, 102, 103, 104, 105, 106], DEVICES[1]: [201, 202, 203, 204, 205, 206]}
        runs: list[tuple[str, int, ClientRun]] = []
        three_done, killed = asyncio.Event(), asyncio.Event()
        after_kill: list[ClientRun] = []

        async def stream(device: str) -> None:
            for minor in plan[device]:
                started_after_kill = killed.is_set()
                run = await e2e.pay(device, f"{minor // 100}.{minor % 100:02d}", "shop-1")
                runs.append((device, minor, run))
                if started_after_kill:
                    after_kill.append(run)
                if len(runs) >= 3:
                    three_done.set()

        async def kill_in_flight() -> None:
            await three_done.wait()
            # the replica to kill is serving: it settled a payment (the broker shares them out)
            await e2e.wait_event(0, step="C5", node=PS2, outcome="ok")
            mark = e2e.watcher.mark()
            # a grant just went out: its order is on its way to one of the payment-servers
            await e2e.wait_event(mark, step="C4", outcome="trusted")
            await e2e.launcher.kill(PS2, signal.SIGKILL)
            killed.set()

        async with asyncio.timeout(100):
            await asyncio.gather(stream(DEVICES[0]), stream(DEVICES[1]), kill_in_flight())

        # opening the client again makes each chip re-send the orders still waiting for a receipt
        for device in DEVICES:
            mark = e2e.watcher.mark()
            pending = list(chip_pending(e2e.dep, device))
            run = await e2e.client(device, "balance")
            assert run.code == 0, (run.lines, run.stderr[-2000:])
            for order_id in pending:
                settled = await e2e.wait_event(mark, step="C5", node=chip_of(device), order_id=order_id)
                assert settled.outcome in ("ok", "refused"), settled
            assert chip_pending(e2e.dep, device) == {}

        ledger = {p.order_id: p for p in (await e2e.ledger()).payments}
        confirmed = [p for p in ledger.values() if p.status == "confirmed"]
        # nothing doubled (order ids are the key), no money made or lost
        assert_charged_once(confirmed, opening, await e2e.balances())
        # nothing lost: every payment a client heard confirmed is in the ledger, and the survivor
        # carried the payments made after the kill
        told = {r.result["order_id"]: r.result["status"] for _, _, r in runs if "order_id" in r.result}
        assert all(ledger[o].status == "confirmed" for o, s in told.items() if s == "confirmed")
        assert after_kill and all(r.code == 0 for r in after_kill), [r.result for r in after_kill]
        outcomes = [(d, m, r.result.get("status"), r.result.get("code")) for d, m, r in runs]
        stored = [(p.device, p.amount, p.status, p.code) for p in ledger.values()]
        # every payment went through in the end, once
        assert len(confirmed) == len(runs), (outcomes, stored)
        assert e2e.launcher.processes[PS1].is_up and not e2e.launcher.processes[PS2].running
        # its last will, on its own topic, says it is lost; the role's other replica is still online
        will = await e2e.watcher.wait_seen(lambda s: s.status is not None and s.status.will)
        assert will.status is not None and will.status.node == PS2 and will.topic == f"{PS_STATUS}/2"
        rows = {r.node: r for r in await status(e2e.dep, e2e.launcher.broker_url, 10.0)}
        states = {nid: rows[nid].state for nid in (TS1, TS2, PS1, PS2)}
        assert states == {TS1: "online", TS2: "online", PS1: "online", PS2: "lost"}
        assert rows[PS2].required and not all_online(list(rows.values()))
    # the survivor executed orders (its counters, logged when it stopped)
    (survivor,) = node_stopped_counters(e2e.dep, PS1)
    assert survivor.get("in.pay.order", 0) > 0
