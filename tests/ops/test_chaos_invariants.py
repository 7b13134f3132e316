"""The chaos invariants, pure: an honest run holds them all, and each kind of damage breaks its own."""

from __future__ import annotations

import dataclasses

from nodes.ledger import Account, PaymentRecord, Snapshot
from ops.chaos.invariants import Attempt, Check, Evidence, Resolution, Verdict, check, summary
from ops.chaos.report import Report, percentiles

OPENING = 10_000
ACCOUNTS = (
    Account("dev-0001:wallet", "payer", "EUR", OPENING, OPENING),
    Account("dev-0002:wallet", "payer", "EUR", OPENING, OPENING),
    Account("shop-1", "merchant", "EUR", 0, 0),
    Account("shop-2", "merchant", "EUR", 0, 0),
)


def row(device: str, order: str, amount: int, payee: str, status: str = "confirmed") -> PaymentRecord:
    code = "" if status == "confirmed" else "insufficient_funds"
    return PaymentRecord(
        order, device, "wallet", f"{device}:wallet", payee, amount, "EUR", 1, status, code, 0
    )


def ledger(*rows: PaymentRecord) -> Snapshot:
    """The ledger after ``rows``: each confirmed one moved its amount from payer to payee."""
    balances = {a.account: a.balance for a in ACCOUNTS}
    for r in rows:
        if r.status == "confirmed":
            balances[r.payer] -= r.amount
            balances[r.payee] += r.amount
    return Snapshot(tuple(dataclasses.replace(a, balance=balances[a.account]) for a in ACCOUNTS), rows)


BEFORE = ledger()
PAID = Attempt(
    "dev-0001", 250, "shop-1", "confirmed", order_id="o1", receipt_amount=250, receipt_payee="shop-1"
)
REFUSED = Attempt("dev-0002", 99, "shop-2", "refused", "untrusted", "o2", exit_code=1)
UNKNOWN = Attempt("dev-0002", 400, "shop-1", "unknown", "no_receipt", "o3", exit_code=4)


def honest(**changes: object) -> Evidence:
    rows = (row("dev-0001", "o1", 250, "shop-1"), row("dev-0002", "o3", 400, "shop-1"))
    base = Evidence(
        attempts=(PAID, REFUSED, UNKNOWN),
        before=BEFORE,
        after=ledger(*rows),
        resolutions={"o3": Resolution("dev-0002", "o3", "confirmed")},
        altered={"tp/v1/dev/dev-0001/tm/ts": 2},
        rejected={"tp/v1/dev/dev-0001/tm/ts": 3},
        pings={"trust-server": "", "payment-server": ""},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def broken(ev: Evidence) -> dict[int, Verdict]:
    return {v.number: v for v in check(ev) if not v.held}


def test_an_honest_run_holds_every_invariant() -> None:
    verdicts = check(honest())
    assert [v.number for v in verdicts] == list(range(1, 9))
    assert all(v.held for v in verdicts), [v for v in verdicts if not v.held]


def test_an_order_applied_twice_under_one_row_breaks_1_through_the_balances() -> None:
    rows = (row("dev-0001", "o1", 250, "shop-1"), row("dev-0002", "o3", 400, "shop-1"))
    after = ledger(*rows, row("dev-0001", "o1-ghost", 250, "shop-1"))
    after = dataclasses.replace(after, payments=rows)  # the money moved twice, one row says once
    found = broken(honest(after=after))
    assert set(found) == {1}
    assert any("dev-0001:wallet moved by -500" in e for e in found[1].evidence)


def test_two_rows_for_one_order_break_1() -> None:
    rows = (row("dev-0001", "o1", 250, "shop-1"), row("dev-0001", "o1", 250, "shop-1"))
    found = broken(honest(attempts=(PAID,), after=ledger(*rows), resolutions={}))
    assert 1 in found and "in the ledger 2 times" in found[1].evidence[0]


def test_a_confirmation_the_ledger_does_not_hold_breaks_2() -> None:
    found = broken(honest(after=ledger(row("dev-0002", "o3", 400, "shop-1"))))
    assert set(found) == {2}
    assert "confirmed to its client, 0 rows" in found[2].evidence[0]


def test_a_confirmation_with_another_amount_in_the_ledger_breaks_2_and_3() -> None:
    after = ledger(row("dev-0001", "o1", 2500, "shop-1"), row("dev-0002", "o3", 400, "shop-1"))
    assert set(broken(honest(after=after))) == {2, 3}


def test_a_payment_no_client_ordered_breaks_3() -> None:
    rows = (
        row("dev-0001", "o1", 250, "shop-1"),
        row("dev-0002", "o3", 400, "shop-1"),
        row("dev-0002", "forged", 40_00, "shop-2"),
    )
    found = broken(honest(after=ledger(*rows)))
    assert set(found) == {3} and "no client asked" in found[3].evidence[0]


def test_a_payment_its_client_was_told_was_refused_but_was_confirmed_breaks_3() -> None:
    rows = (
        row("dev-0001", "o1", 250, "shop-1"),
        row("dev-0002", "o2", 99, "shop-2"),
        row("dev-0002", "o3", 400, "shop-1"),
    )
    found = broken(honest(after=ledger(*rows)))
    assert 3 in found and "told refused" in found[3].evidence[0]


def test_money_created_or_a_negative_balance_breaks_4() -> None:
    after = ledger(row("dev-0001", "o1", 250, "shop-1"), row("dev-0002", "o3", 400, "shop-1"))
    inflated = tuple(
        dataclasses.replace(a, balance=a.balance + 1) if a.account == "shop-2" else a for a in after.accounts
    )
    found = broken(honest(after=dataclasses.replace(after, accounts=inflated)))
    assert 4 in found and "held 20000 in all before and 20001 after" in found[4].evidence[0]
    overdrawn = ledger(row("dev-0001", "o1", 250, "shop-1"), row("dev-0002", "o3", 400, "shop-1"))
    negative = tuple(
        dataclasses.replace(a, balance=-5) if a.account == "shop-2" else a for a in overdrawn.accounts
    )
    found = broken(honest(after=dataclasses.replace(overdrawn, accounts=negative)))
    assert any("shop-2 is negative: -5" in e for e in found[4].evidence)


def test_an_altered_frame_not_refused_or_an_accepted_attack_breaks_5() -> None:
    found = broken(honest(rejected={"tp/v1/dev/dev-0001/tm/ts": 1}))
    assert set(found) == {5} and "2 altered frames delivered, only 1 refused" in found[5].evidence[0]
    attack = Check(False, "replayed pay.order: answered afresh")
    assert broken(honest(attacks=(Check(True, "refused"), attack)))[5].evidence == (attack.text,)


def test_a_dead_node_a_silent_node_or_a_hung_client_breaks_6() -> None:
    assert 6 in broken(honest(unexpected_exits=("payment-server (pid 7): killed by SIGSEGV",)))
    found = broken(honest(pings={"trust-server": "", "dev-0001.tm": "no answer after 4 attempts"}))
    assert "dev-0001.tm did not answer" in found[6].evidence[0]
    hung = Attempt("dev-0001", 5, "shop-1", "no_answer", exit_code=-1)
    assert 6 in broken(honest(attempts=(PAID, REFUSED, UNKNOWN, hung)))
    assert 6 in broken(honest(pings={}))


def test_an_unknown_outcome_never_looked_up_still_pending_or_disagreeing_breaks_7() -> None:
    assert "never looked up" in broken(honest(resolutions={}))[7].evidence[0]
    pending = {"o3": Resolution("dev-0002", "o3", "confirmed", pending=True)}
    assert "still holds the order" in broken(honest(resolutions=pending))[7].evidence[0]
    disagree = {"o3": Resolution("dev-0002", "o3", "absent")}
    assert "history says absent, the ledger confirmed" in broken(honest(resolutions=disagree))[7].evidence[0]


def test_a_refusal_without_a_code_or_other_than_expected_breaks_8() -> None:
    silent = dataclasses.replace(REFUSED, code="")
    assert 8 in broken(honest(attempts=(PAID, silent, UNKNOWN)))
    expected = {"dev-0002": frozenset({"clock_skew"})}
    found = broken(honest(expected_refusals=expected))
    assert any("refused with untrusted, expected one of ['clock_skew']" in e for e in found[8].evidence)
    assert any("unknown where a clear refusal" in e for e in found[8].evidence)
    assert 8 in broken(honest(scenario=(Check(False, "`up` SIGKILLed: 1 still running"),)))


def test_the_summary_and_the_report_say_how_payments_ended() -> None:
    ev = honest()
    assert summary(ev.attempts, ev.resolutions) == {
        "confirmed": 1,
        "refused untrusted": 1,
        "unknown no_receipt": 1,
        "resolved_confirmed": 1,
    }
    assert percentiles([10.0, 20.0, 30.0, 40.0]) == {"p50": 25.0, "p95": 40.0, "p99": 40.0, "max": 40.0}
    verdicts = check(dataclasses.replace(ev, pings={}))
    report = Report.build(
        scenario="lossy-radio", seed=3, devices=2, backend="mosquitto", verdicts=verdicts, evidence=ev,
        faults={"drop": 7}, rejects={"bad_signature": 2}, notes=["a note"], storm_s=1.0, total_s=2.0,
        run_dir="/tmp/x",  # type: ignore[arg-type]
    )  # fmt: skip
    assert not report.held
    text = report.text()
    assert (
        "drop 7" in text and "bad_signature 2" in text and "6. BROKEN" in text and "INVARIANTS BROKEN" in text
    )
    assert report.as_json()["invariants"][5]["evidence"] == ["no node was pinged"]
