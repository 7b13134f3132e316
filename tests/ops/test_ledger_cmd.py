"""``trustpay ledger``: balances and payments read from a live ledger, as JSON and as text."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from nodes.deployment import Deployment
from nodes.ledger import Ledger, PaymentRecord, ledger_at
from ops import cli, ledger_cmd
from ops.provision import provision

DEV, SHOP = "dev-0001", "shop-2"
T0 = 1_700_000_000_000


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    provision(tmp_path / "deploy", 1, broker_port=1, backend="amqtt")
    return Deployment(tmp_path / "deploy")


def parse(dep: Deployment, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ledger_cmd.add_arguments(parser)
    return parser.parse_args(["--deploy", str(dep.root), *extra])


async def open_with_payments(dep: Deployment) -> Ledger:
    """A ledger as the payment-server leaves it: one confirmed and one refused payment, still open."""
    ledger = ledger_at(dep.ledger_db)
    await ledger.open()
    await ledger.seed(dep.load_manifest())
    payer = f"{DEV}:wallet"
    async with ledger.transaction() as tx:
        await tx.debit(payer, 1_050)
        await tx.credit(SHOP, 1_050)
        paid = PaymentRecord("o-1", DEV, "wallet", payer, SHOP, 1_050, "EUR", 1, "confirmed", "", T0)
        await tx.insert_payment(paid, b"h1", b"order-1", b"receipt-1")
        refused = PaymentRecord(
            "o-2", DEV, "wallet", payer, SHOP, 999_999, "EUR", 2, "refused", "insufficient_funds", T0 + 1_000
        )
        await tx.insert_payment(refused, b"h2", b"order-2", b"receipt-2")
    return ledger


async def test_json_lists_accounts_payments_and_total_while_the_server_holds_the_ledger(
    dep: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = await open_with_payments(dep)
    try:
        rc = await asyncio.to_thread(ledger_cmd.run, parse(dep, "--json"))
    finally:
        await ledger.close()
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    accounts = {a["account"]: a for a in out["accounts"]}
    assert accounts[f"{DEV}:wallet"] == {
        "account": f"{DEV}:wallet",
        "kind": "payer",
        "currency": "EUR",
        "balance": 100_000 - 1_050,
        "opening_balance": 100_000,
    }
    assert accounts[SHOP]["balance"] == 1_050 and accounts[SHOP]["kind"] == "merchant"
    assert out["total"] == sum(a["opening_balance"] for a in out["accounts"]) == 200_000
    assert [(p["order_id"], p["status"], p["code"], p["amount"]) for p in out["payments"]] == [
        ("o-1", "confirmed", "", 1_050),
        ("o-2", "refused", "insufficient_funds", 999_999),
    ]
    assert set(out["payments"][0]) == {
        "order_id",
        "device",
        "app",
        "payer",
        "payee",
        "amount",
        "currency",
        "status",
        "code",
        "created_ms",
    }


async def test_text_formats_amounts_with_the_currency_exponent(
    dep: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    await (await open_with_payments(dep)).close()
    assert await asyncio.to_thread(ledger_cmd.run, parse(dep)) == 0
    out = capsys.readouterr().out
    assert "989.50 EUR" in out and "1000.00 EUR" in out and "10.50 EUR" in out
    assert "total 2000.00 EUR (opening 2000.00 EUR, conserved)" in out
    assert "payments: 2 (1 confirmed, 1 refused)" in out
    assert "refused (insufficient_funds)" in out


def test_a_deployment_without_a_ledger_says_so(
    dep: Deployment, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ledger", "ops.ledger_cmd")  # the wiring cli.py will get
    assert cli.main(["ledger", "--deploy", str(dep.root), "--json"]) == 1
    err = capsys.readouterr().err
    assert "no ledger at" in err and "payment-server has not started" in err
    assert not dep.ledger_db.exists()  # reading never creates it


def test_not_a_deployment_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ledger", "ops.ledger_cmd")
    assert cli.main(["ledger", "--deploy", str(tmp_path)]) == cli.EXIT_CONFIG


def test_money_is_exact_decimal_text() -> None:
    assert ledger_cmd.money(100_000, 2, "EUR") == "1000.00 EUR"
    assert ledger_cmd.money(5, 2, "EUR") == "0.05 EUR"
    assert ledger_cmd.money(-1_234, 2, "EUR") == "-12.34 EUR"
    assert ledger_cmd.money(7, 0, "JPY") == "7 JPY"
