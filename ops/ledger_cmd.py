"""``trustpay ledger``: balances and payments, read from the payment-server's ledger.

The database is opened read-only (SQLite through WAL, PostgreSQL in
read-only transactions), so this works while payment-servers run and never
blocks them; ``--db URL`` reads another database than the manifest's (the one
``trustpay node payment-server --db URL`` writes). Amounts are stored in integer minor
units; the text view formats them with the manifest's currency exponent, the
JSON view keeps the integers. A deployment whose payment-server never started
has no ledger yet: that is an error (exit 1) naming what to do, not a guess
from the manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from nodes.deployment import Deployment
from nodes.ledger import Snapshot, read_snapshot
from nodes.sql import from_command_line

from .cli_common import add_deploy_argument, add_examples, add_json_argument

HELP = "show the ledger: every account's balance and every payment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "print JSON, amounts in integer minor units")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the ledger's database, e.g. postgresql://postgres@127.0.0.1:5432/trustpay "
        "(default: the manifest's); read only, never created",
    )
    add_examples(
        parser,
        "trustpay ledger --deploy deploy",
        "trustpay ledger --json | jq .total   # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
        "trustpay ledger --deploy deploy --db postgresql://postgres@127.0.0.1:5432/trustpay",
    )


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    manifest = dep.load_manifest()
    where = dep.database("ledger", None if args.db is None else from_command_line(args.db))
    snapshot = asyncio.run(read_snapshot(where))
    if args.json:
        print(json.dumps(to_json(snapshot), indent=2))
    else:
        print(to_text(snapshot, manifest.exponent, where), end="")
    return 0


def to_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "accounts": [
            {
                "account": a.account,
                "kind": a.kind,
                "currency": a.currency,
                "balance": a.balance,
                "opening_balance": a.opening_balance,
            }
            for a in snapshot.accounts
        ],
        "payments": [
            {
                "order_id": p.order_id,
                "device": p.device,
                "app": p.app,
                "payer": p.payer,
                "payee": p.payee,
                "amount": p.amount,
                "currency": p.currency,
                "status": p.status,
                "code": p.code,
                "created_ms": p.created_ms,
            }
            for p in snapshot.payments
        ],
        "total": sum(a.balance for a in snapshot.accounts),
    }


def money(minor: int, exponent: int, currency: str) -> str:
    """Integer minor units as a decimal: 100000, 2, "EUR" -> "1000.00 EUR" (no float rounding)."""
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**exponent)
    decimals = f".{frac:0{exponent}d}" if exponent else ""
    return f"{sign}{whole}{decimals} {currency}"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: frozenset[int]) -> list[str]:
    """Columns padded to their widest cell; amounts (``right``) right-aligned so decimals line up."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = (c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row))
        return "  ".join(cells).rstrip()

    return [line(row) for row in (header, *rows)]


def to_text(snapshot: Snapshot, exponent: int, path: object) -> str:
    def fmt(minor: int, currency: str) -> str:
        return money(minor, exponent, currency)

    lines = [f"ledger {path}", ""]
    accounts = [
        (a.account, a.kind, fmt(a.balance, a.currency), fmt(a.opening_balance, a.currency))
        for a in snapshot.accounts
    ]
    lines += _table(("account", "kind", "balance", "opening"), accounts, frozenset({2, 3}))
    # totals per currency: money is only conserved (and only summable) within one currency
    for currency in sorted({a.currency for a in snapshot.accounts}):
        held = [a for a in snapshot.accounts if a.currency == currency]
        total, opening = sum(a.balance for a in held), sum(a.opening_balance for a in held)
        note = "conserved" if total == opening else f"differs from the opening total by {total - opening}"
        lines.append(f"total {fmt(total, currency)} (opening {fmt(opening, currency)}, {note})")
    statuses = Counter(p.status for p in snapshot.payments)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    lines += ["", f"payments: {len(snapshot.payments)}" + (f" ({summary})" if summary else "")]
    if snapshot.payments:
        payments = [
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.created_ms / 1000)),
                p.order_id,
                p.payer or f"{p.device}:{p.app} (no account)",
                p.payee,
                fmt(p.amount, p.currency),
                p.status + (f" ({p.code})" if p.code else ""),
            )
            for p in snapshot.payments
        ]
        header = ("time (UTC)", "order", "payer", "payee", "amount", "status")
        lines += _table(header, payments, frozenset({4}))
    return "\n".join(lines) + "\n"
