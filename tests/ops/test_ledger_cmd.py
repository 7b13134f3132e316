"""``trustpay ledger``: balances and payments read from a live ledger, as JSON and as text,
on SQLite and on PostgreSQL (``tests.storage.db_url``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from nodes.deployment import Deployment
from nodes.ledger import Ledger, PaymentRecord, ledger_at
from ops import cli, ledger_cmd
from tests.storage import PG_TEST, provisioned_on

DEV, SHOP = "dev-0001", "shop-2"
T0 = 1_700_000_000_000


@pytest.fixture
def dep(tmp_path: Path, db_url: str | None) -> Deployment:
    return provisioned_on(tmp_path, db_url)


def parse(dep: Deployment, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ledger_cmd.add_arguments(parser)
    return parser.parse_args(["--deploy", str(dep.root), *extra])


async def open_with_payments(dep: Deployment, url: str | None = None) -> Ledger:
    """A ledger as the payment-server leaves it: one confirmed and one refused payment, still open."""
    ledger = ledger_at(dep.database("ledger", url))
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


async def test_a_deployment_without_a_ledger_says_so(
    dep: Deployment,
    db_url: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await asyncio.to_thread(cli.main, ["ledger", "--deploy", str(dep.root), "--json"]) == 1
    err = capsys.readouterr().err
    assert "no ledger" in err and "payment-server has" in err and "started" in err
    # reading never creates it
    assert not dep.ledger_db.exists()
    if db_url is not None:
        schema = f"{dep.database('ledger').prefix}_ledger"
        conn = await asyncpg.connect(PG_TEST)
        try:
            assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
        finally:
            await conn.close()


async def test_db_reads_another_database_than_the_manifests(
    tmp_path: Path,
    db_url: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dep = provisioned_on(tmp_path, None)  # the manifest says SQLite; the payments are elsewhere
    other = db_url or str(tmp_path / "elsewhere.sqlite")
    await (await open_with_payments(dep, other)).close()
    args = parse(dep, "--json", "--db", other)
    assert await asyncio.to_thread(ledger_cmd.run, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["order_id"] for p in out["payments"]] == ["o-1", "o-2"]
    assert not dep.ledger_db.exists()


async def test_db_refuses_what_is_not_a_database_url(dep: Deployment) -> None:
    assert await asyncio.to_thread(
        cli.main, ["ledger", "--deploy", str(dep.root), "--db", "mysql://x/y"]
    ) == (cli.EXIT_CONFIG)


def test_not_a_deployment_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ledger", "ops.ledger_cmd")
    assert cli.main(["ledger", "--deploy", str(tmp_path)]) == cli.EXIT_CONFIG


def test_money_is_exact_decimal_text() -> None:
    assert ledger_cmd.money(100_000, 2, "EUR") == "1000.00 EUR"
    assert ledger_cmd.money(5, 2, "EUR") == "0.05 EUR"
    assert ledger_cmd.money(-1_234, 2, "EUR") == "-12.34 EUR"
    assert ledger_cmd.money(7, 0, "JPY") == "7 JPY"
