"""The client reports a payment from its signed receipt, and only if the receipt is what the user asked.

A hostile chip (the chip's own identity, so its answers verify) answers
``pay.start`` with a receipt the payment-server really signed, but for
another amount, payee, currency or order. On main the client printed
"Paid 1.25 EUR to shop-1" and exited 0 while the receipt said 400.00 EUR to
shop-3 (issue 6, point 3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from nodes.bus import Bus, FakeBroker
from nodes.client import EXIT_OK, EXIT_UNKNOWN, Client
from nodes.deployment import Deployment
from nodes.runtime import Node, NodeConfig
from protocol.messages import AppInfo, Body, ChipState, PayResult, PayStart, Reports
from protocol.records import RECEIPT_DOMAIN, Receipt, sign_record

from .harness import make_node, provisioned, running

DEV = "dev-0001"
Forge = Callable[[Receipt], Receipt]


class HostileChip(Node):
    """Opens like a chip; confirms every payment with ``forge`` applied to the honest receipt."""

    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        deployment: Deployment,
        forge: Forge,
        signer: str,
    ) -> None:
        super().__init__(config, bus, log)
        self.signer_keys = deployment.load_keys(signer)
        self.forge = forge
        self.route("chip.open", self.state_of_chip)
        self.route("chip.close", self.state_of_chip)
        self.route("pay.start", self.pay)

    async def state_of_chip(self, rx: Any) -> tuple[str, Body]:
        return "chip.state", ChipState(True, True, (AppInfo("wallet", "1.0.0", 0),), b"", "")

    async def pay(self, rx: Any) -> tuple[str, Body]:
        start: PayStart = rx.envelope.body
        honest = Receipt(
            start.order_id, bytes(32), DEV, "confirmed", "", "", f"{DEV}:wallet",
            start.payee, start.amount, start.currency, 100_000 - start.amount, 1_700_000_000_000,
        )  # fmt: skip
        blob = sign_record(self.forge(honest), RECEIPT_DOMAIN, self.signer_keys).to_bytes()
        return "pay.result", PayResult("confirmed", "", "", start.order_id, blob, b"")


class QuietTrustModule(Node):
    """The trust module's identity, with no reports for the user."""

    def __init__(self, config: NodeConfig, bus: Bus, log: structlog.typing.FilteringBoundLogger) -> None:
        super().__init__(config, bus, log)
        self.route("reports.get", self.reports)

    async def reports(self, rx: Any) -> tuple[str, Body]:
        return "reports", Reports(True, ())


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return provisioned(tmp_path_factory.mktemp("intent"))


async def pay_against(
    dep: Deployment, forge: Forge, signer: str = "payment-server"
) -> tuple[int, dict[str, Any]]:
    """``pay 1.25 shop-1`` with the hostile chip; the exit code and the JSON result."""
    broker = FakeBroker()
    chip = make_node(HostileChip, dep, f"{DEV}.chip", broker, deployment=dep, forge=forge, signer=signer)
    tm = make_node(QuietTrustModule, dep, f"{DEV}.tm", broker)
    out = io.StringIO()
    client = make_node(
        Client, dep, f"{DEV}.client", broker, deployment=dep, command=["pay", "1.25", "shop-1"],
        out=out, as_json=True,
    )  # fmt: skip
    async with running(chip, tm), asyncio.timeout(20):
        await client.run()
    return client.exit_code, json.loads(out.getvalue().splitlines()[-1])


def replace(**changes: Any) -> Forge:
    return lambda receipt: dataclasses.replace(receipt, **changes)


@pytest.mark.parametrize(
    ("forge", "differs"),
    [
        (replace(amount=40_000, payee="shop-3"), "amount, payee"),
        (replace(amount=40_000), "amount"),
        (replace(payee="shop-3"), "payee"),
        (replace(currency="USD"), "currency"),
        (replace(order_id="ord-someone-elses"), "order"),
        (replace(device="dev-0002"), "device"),
    ],
    ids=["400-to-shop-3", "amount", "payee", "currency", "order", "device"],
)
async def test_a_receipt_that_is_not_what_the_user_asked_is_never_reported_as_paid(
    dep: Deployment, forge: Forge, differs: str
) -> None:
    code, result = await pay_against(dep, forge)

    assert code == EXIT_UNKNOWN, result
    assert result["status"] == "mismatch"
    assert "Paid" not in result["message"]
    assert result["message"].startswith("NOT the payment you asked for (1.25 EUR to shop-1)")
    assert result["reason"].endswith(f"it differs in {differs}"), result["reason"]


async def test_the_paid_message_is_built_from_the_receipt(dep: Deployment) -> None:
    code, result = await pay_against(dep, replace())

    assert code == EXIT_OK, result
    assert result["status"] == "confirmed"
    assert result["message"].startswith("Paid 1.25 EUR to shop-1 with wallet")
    assert result["message"].endswith("balance 998.75 EUR")
    assert result["receipt"]["amount"] == 125 and result["receipt"]["payee"] == "shop-1"


async def test_a_receipt_the_payment_server_did_not_sign_is_unknown_not_paid(dep: Deployment) -> None:
    code, result = await pay_against(dep, replace(), signer=f"{DEV}.chip")  # the chip signs it itself

    assert code == EXIT_UNKNOWN, result
    assert result["status"] == "unknown" and "Paid" not in result["message"]
    assert result["reason"] == "the receipt does not verify"
