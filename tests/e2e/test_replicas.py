"""Two replicas of each server on a real Mosquitto: one is SIGKILLed mid-stream, the other carries on."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ops.scenario import ClientRun
from protocol.topics import Role

from .conftest import DEVICES, HAVE_MOSQUITTO, chip_of, node_stopped_counters, running_deployment

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="the mosquitto binary is not installed"),
]

PS1, PS2 = Role.PAYMENT_SERVER.value, f"{Role.PAYMENT_SERVER.value}.2"


def chip_pending(dep: Any, device: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dep.state_dir(chip_of(device)) / "chip.json").read_bytes())
    return dict(data["pending"])


async def test_a_payment_server_replica_killed_mid_stream_loses_nothing_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    async with running_deployment(tmp_path, "mosquitto", replicas=2) as e2e:
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

        ledger = e2e.stored_payments()
        confirmed = [p for p in ledger.values() if p.status == "confirmed"]
        # nothing doubled: no order twice, no app counter twice, no amount charged twice
        assert len({p.order_blob for p in ledger.values()}) == len(ledger)
        assert len({(p.device, p.app, p.counter) for p in confirmed}) == len(confirmed)
        charged = Counter((p.device, p.amount) for p in confirmed)
        assert all(n == 1 for n in charged.values()), charged
        balances = await e2e.balances()
        expected = dict(opening)
        for p in confirmed:
            expected[p.payer] -= p.amount
            expected[p.payee] += p.amount
        assert balances == expected and sum(balances.values()) == sum(opening.values())
        # nothing lost: every payment a client heard confirmed is in the ledger, and the survivor
        # carried the payments made after the kill
        told = {r.result["order_id"]: r.result["status"] for _, _, r in runs if "order_id" in r.result}
        assert all(ledger[o].status == "confirmed" for o, s in told.items() if s == "confirmed")
        assert after_kill and all(r.code == 0 for r in after_kill), [r.result for r in after_kill]
        assert len(confirmed) == len(runs)  # every payment went through in the end, once
        assert e2e.launcher.processes[PS1].is_up and not e2e.launcher.processes[PS2].running
    # the survivor executed orders (its counters, logged when it stopped)
    (survivor,) = node_stopped_counters(e2e.dep, PS1)
    assert survivor.get("in.pay.order", 0) > 0
