"""A trusted payment end to end: B1, C1-C7, B4, the money, and the receipt the ledger keeps."""

from __future__ import annotations

import pytest

from protocol.records import ORDER_DOMAIN, RECEIPT_DOMAIN, Order, Receipt, open_record

from .conftest import DEV1, DEV2, E2E, OPENING, chip_of, tm_of

pytestmark = pytest.mark.e2e


async def test_happy_path_pays_exactly_once_with_a_verifiable_receipt(e2e: E2E) -> None:
    before = await e2e.balances()
    mark = e2e.watcher.mark()

    run = await e2e.pay(DEV1, "12.50", "shop-1")

    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "confirmed"
    order_id = run.result["order_id"]
    assert run.result["amount"] == 1250

    # the money: exactly 12.50 from the payer to shop-1, nothing else moved
    after = await e2e.balances()
    assert after[f"{DEV1}:wallet"] == before[f"{DEV1}:wallet"] - 1250 == OPENING - 1250
    assert after["shop-1"] == before["shop-1"] + 1250
    assert {k: v for k, v in after.items() if k not in (f"{DEV1}:wallet", "shop-1")} == {
        k: v for k, v in before.items() if k not in (f"{DEV1}:wallet", "shop-1")
    }
    assert sum(after.values()) == sum(before.values())
    assert run.result["balance_after"] == after[f"{DEV1}:wallet"]

    # the ledger holds the chip's signed order and a receipt the payment-server signed
    stored = e2e.stored_payments()
    assert list(stored) == [order_id]
    row = stored[order_id]
    assert (row.status, row.payer, row.payee, row.amount) == ("confirmed", f"{DEV1}:wallet", "shop-1", 1250)
    ps_key = e2e.dep.load_cert("payment-server").body.sign_key
    receipt = open_record(Receipt, row.receipt_blob, RECEIPT_DOMAIN, ps_key, "receipt").body
    assert (receipt.order_id, receipt.status, receipt.amount, receipt.payee) == (
        order_id,
        "confirmed",
        1250,
        "shop-1",
    )
    assert receipt.balance_after == OPENING - 1250
    order = open_record(
        Order, row.order_blob, ORDER_DOMAIN, e2e.dep.load_cert(chip_of(DEV1)).body.sign_key, "o"
    )
    assert (order.body.order_id, order.body.device, order.body.amount) == (order_id, DEV1, 1250)

    # the steps, as signed events: C1 .. C7 in order for this order (the trust module's view),
    # the chip's C5 between its C4 and C6, and the client's B1 .. B4 around them
    c7 = await e2e.wait_event(mark, device=DEV1, step="C7", node=tm_of(DEV1), order_id=order_id)
    assert c7.outcome == "ok"
    await e2e.wait_event(mark, device=DEV1, step="B4", outcome="ok")
    flow = [e for e in e2e.events(mark, device=DEV1) if e.order_id == order_id]
    tm_steps = [e.step for e in flow if e.node == tm_of(DEV1)]
    assert tm_steps == ["C1", "C2", "C4", "C6", "C7"], flow
    assert all(e.outcome in ("ok", "trusted") for e in flow), flow
    position = {step: next(i for i, e in enumerate(flow) if e.step == step) for step in tm_steps}
    c5 = [i for i, e in enumerate(flow) if e.step == "C5" and e.node == chip_of(DEV1)]
    assert len(c5) == 1 and flow[c5[0]].outcome == "ok"
    assert position["C1"] < position["C2"] < position["C4"] < c5[0] < position["C6"] < position["C7"]
    client_steps = [e.step for e in e2e.events(mark, device=DEV1, node=f"{DEV1}.client")]
    assert client_steps == ["B1", "B3", "B4"]
    # the platform saw the same payment: C1-C4 at the trust-server, C5 at the payment-server
    platform = {e.step for e in e2e.events(mark, device=DEV1) if e.node in ("trust-server", "payment-server")}
    assert {"C1", "C2", "C3", "C4", "C5"} <= platform
    assert not e2e.events(mark, device=DEV2)
    assert not e2e.watcher.rejected
