"""The invariants a chaos run must end with, checked from what was recorded: pure, no I/O.

The evidence comes from three independent places: what each client process
printed (its own record of what the user asked and was told), the ledger
before and after (the payment-server's durable truth), and what the nodes and
the fault proxy logged (frames altered on the way, frames the nodes refused).
A check that fails names the payments or frames that break it, so a broken run
can be read without re-running it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nodes.ledger import PaymentRecord, Snapshot

FINAL = ("confirmed", "refused")  # what a client may be told and rely on
NEVER_STARTED = ("disabled", "invalid", "error")  # the chip was never asked to pay
MAX_EVIDENCE = 8  # lines of evidence kept per invariant: enough to start reading


@dataclass(frozen=True)
class Attempt:
    """One payment a client was asked to make, and what that client said at the end."""

    device: str
    amount: int
    payee: str
    # confirmed, refused, unknown, mismatch, disabled, invalid; error: the client could not run
    # (e.g. no broker), nothing asked of the chip; no_answer: it printed nothing
    status: str
    code: str = ""
    order_id: str = ""  # "" when the client printed no result
    exit_code: int = 0
    latency_ms: float = 0.0
    started_s: float = 0.0  # monotonic clock of the run when the client started
    receipt_amount: int | None = None  # what the signed receipt said, when there was one
    receipt_payee: str = ""

    @property
    def name(self) -> str:
        return f"{self.device}/{self.order_id or '?'} ({self.amount} to {self.payee})"


@dataclass(frozen=True)
class Resolution:
    """An order whose outcome its client did not know, looked up once the faults stopped."""

    device: str
    order_id: str
    status: str  # what the account's history says: confirmed, refused, or absent
    pending: bool = False  # the chip still holds the order, to send again: not final yet


@dataclass(frozen=True)
class Check:
    """One thing a scenario expects beyond the invariants (e.g. nothing survives a killed `up`)."""

    held: bool
    text: str


@dataclass(frozen=True)
class Evidence:
    attempts: tuple[Attempt, ...]
    before: Snapshot
    after: Snapshot
    resolutions: Mapping[str, Resolution] = field(default_factory=dict)  # by order id
    altered: Mapping[str, int] = field(default_factory=dict)  # topic -> altered frames delivered
    rejected: Mapping[str, int] = field(default_factory=dict)  # topic -> frames the nodes refused
    attacks: tuple[Check, ...] = ()  # each injected frame's fate: held = refused, nothing done
    unexpected_exits: tuple[str, ...] = ()
    pings: Mapping[str, str] = field(default_factory=dict)  # node -> "" when it answered, else why not
    expected_refusals: Mapping[str, frozenset[str]] = field(default_factory=dict)  # device -> codes
    scenario: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Verdict:
    number: int
    name: str
    held: bool
    evidence: tuple[str, ...]

    def line(self) -> str:
        return f"{self.number}. {'held  ' if self.held else 'BROKEN'}  {self.name}"


def check(ev: Evidence) -> list[Verdict]:
    checks = (
        ("no order executed twice", _once),
        ("every confirmed payment is in the ledger once, as asked", _confirmed_in_ledger),
        ("nothing in the ledger that no client ordered", _nothing_unordered),
        ("money is conserved and no balance is negative", _conserved),
        ("no altered, forged or replayed frame was accepted", _nothing_forged),
        ("no node crashed or hung; each answers a signed ping", _alive),
        ("every unknown outcome resolved to one answer client and ledger share", _resolved),
        ("every failure said clearly what happened", _clear),
    )
    verdicts = []
    for number, (name, fn) in enumerate(checks, 1):
        broken = fn(ev)
        verdicts.append(Verdict(number, name, not broken, tuple(broken[:MAX_EVIDENCE])))
    return verdicts


def _new_payments(ev: Evidence) -> list[PaymentRecord]:
    old = {(p.device, p.order_id) for p in ev.before.payments}
    return [p for p in ev.after.payments if (p.device, p.order_id) not in old]


def _rows(ev: Evidence) -> dict[tuple[str, str], list[PaymentRecord]]:
    rows: dict[tuple[str, str], list[PaymentRecord]] = {}
    for p in ev.after.payments:
        rows.setdefault((p.device, p.order_id), []).append(p)
    return rows


def _once(ev: Evidence) -> list[str]:
    broken = [
        f"order {device}/{order} is in the ledger {len(rows)} times"
        for (device, order), rows in _rows(ev).items()
        if len(rows) > 1
    ]
    # an order applied twice under one row would still move the money twice: every balance must
    # have moved by exactly the payments the ledger holds
    moved: Counter[str] = Counter()
    for p in _new_payments(ev):
        if p.status == "confirmed":
            moved[p.payer] -= p.amount
            moved[p.payee] += p.amount
    before = {a.account: a.balance for a in ev.before.accounts}
    for account in ev.after.accounts:
        delta = account.balance - before.get(account.account, 0)
        if delta != moved[account.account]:
            broken.append(
                f"{account.account} moved by {delta}, but its confirmed payments add up to "
                f"{moved[account.account]}"
            )
    return broken


def _confirmed_in_ledger(ev: Evidence) -> list[str]:
    rows = _rows(ev)
    broken = []
    for a in ev.attempts:
        if a.status != "confirmed":
            continue
        found = rows.get((a.device, a.order_id), [])
        if len(found) != 1:
            broken.append(f"{a.name}: confirmed to its client, {len(found)} rows in the ledger")
            continue
        row = found[0]
        if (row.status, row.amount, row.payee) != ("confirmed", a.amount, a.payee):
            broken.append(
                f"{a.name}: confirmed to its client, the ledger says {row.status} {row.amount} to {row.payee}"
            )
    return broken


def _nothing_unordered(ev: Evidence) -> list[str]:
    asked = {(a.device, a.order_id): a for a in ev.attempts if a.order_id}
    broken = []
    for p in _new_payments(ev):
        a = asked.get((p.device, p.order_id))
        if a is None:
            broken.append(f"{p.device}/{p.order_id}: {p.status} {p.amount} to {p.payee}, no client asked")
        elif (p.amount, p.payee) != (a.amount, a.payee):
            broken.append(f"{a.name}: the ledger holds {p.amount} to {p.payee}")
        elif a.status == "refused" and p.status == "confirmed":
            broken.append(f"{a.name}: its client was told refused ({a.code}), the ledger confirmed it")
    return broken


def _conserved(ev: Evidence) -> list[str]:
    total_before = sum(a.balance for a in ev.before.accounts)
    total_after = sum(a.balance for a in ev.after.accounts)
    broken = []
    if total_before != total_after:
        broken.append(f"the accounts held {total_before} in all before and {total_after} after")
    broken += [f"{a.account} is negative: {a.balance}" for a in ev.after.accounts if a.balance < 0]
    return broken


def _nothing_forged(ev: Evidence) -> list[str]:
    # every altered frame the proxy delivered reached a node that must have refused it: on each
    # topic, at least as many refusals as altered deliveries (honest traffic adds only refusals)
    broken = [
        f"{topic}: {count} altered frames delivered, only {ev.rejected.get(topic, 0)} refused"
        for topic, count in sorted(ev.altered.items())
        if ev.rejected.get(topic, 0) < count
    ]
    broken += [c.text for c in ev.attacks if not c.held]
    return broken


def _alive(ev: Evidence) -> list[str]:
    broken = [f"died: {exit_}" for exit_ in ev.unexpected_exits]
    broken += [f"{node} did not answer a signed ping: {why}" for node, why in sorted(ev.pings.items()) if why]
    if not ev.pings:
        broken.append("no node was pinged")
    broken += [
        f"{a.name}: the client hung or crashed (exit {a.exit_code})"
        for a in ev.attempts
        if a.status == "no_answer"
    ]
    return broken


def _resolved(ev: Evidence) -> list[str]:
    rows = _rows(ev)
    broken = []
    for a in ev.attempts:
        if a.status in FINAL or a.status in NEVER_STARTED or a.status == "no_answer":
            continue
        r = ev.resolutions.get(a.order_id)
        if r is None:
            broken.append(f"{a.name}: outcome {a.status}, never looked up")
            continue
        if r.pending:
            broken.append(f"{a.name}: its chip still holds the order to send again")
            continue
        ledger = rows.get((a.device, a.order_id), [])
        in_ledger = ledger[0].status if ledger else "absent"
        if r.status != in_ledger:
            broken.append(f"{a.name}: the client's history says {r.status}, the ledger {in_ledger}")
    return broken


def _clear(ev: Evidence) -> list[str]:
    broken = []
    for a in ev.attempts:
        allowed = ev.expected_refusals.get(a.device, frozenset())
        if a.status in ("refused", "error") and not a.code:
            broken.append(f"{a.name}: {a.status} without a reason code")
        elif a.status == "refused" and allowed and a.code not in allowed:
            broken.append(f"{a.name}: refused with {a.code}, expected one of {sorted(allowed)}")
        elif allowed and a.status not in ("refused", "disabled", "confirmed"):
            broken.append(f"{a.name}: {a.status} where a clear refusal ({sorted(allowed)}) was expected")
    broken += [c.text for c in ev.scenario if not c.held]
    return broken


def summary(attempts: Sequence[Attempt], resolutions: Mapping[str, Resolution]) -> dict[str, int]:
    """Payments by how they ended: told at once, or resolved once the faults stopped."""
    counts: Counter[str] = Counter(f"{a.status} {a.code}" if a.code else a.status for a in attempts)
    late = [resolutions[a.order_id] for a in attempts if a.status not in FINAL and a.order_id in resolutions]
    counts.update(f"resolved_{r.status}" for r in late)
    return dict(counts)
