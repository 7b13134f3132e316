"""The payment-server's ledger: accounts, payments, grants and counters, behind one interface.

Every rule that keeps money right is enforced by the database, not by memory:
a device's order id is a primary key (an order executes at most once, and one
device's order ids neither block nor reveal another's), a debit is a
conditional update (a payer never goes below zero, and a CHECK says so too), a
grant is consumed by a conditional update, and a counter only moves up. So
several payment-servers sharing one database can never execute one order
twice: a second writer's key or conditional update says no, which surfaces as
:class:`LedgerConflict`, and the caller retries and finds the first result.

Two implementations, chosen by the database URL (``nodes.sql.parse_db_url``):
SQLite (``nodes.ledger_sqlite``, the embedded default for one process) and
PostgreSQL (``nodes.ledger_pg``, for replicas). All SQL lives in those
modules; callers see this interface, typed rows and typed errors.
"""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import TrustpayError

from .replies import Replies
from .sql import POSTGRESQL, DbUrl, Failures, parse_db_url

if TYPE_CHECKING:
    from .deployment import Manifest

SCHEMA_VERSION = 2  # 2: payments keyed per device, grants by intent hash
PAYER, MERCHANT = "payer", "merchant"
CONFIRMED, REFUSED = "confirmed", "refused"
PAYMENT_COLUMNS = "order_id, device, app, payer, payee, amount, currency, counter, status, code, created_ms"


class LedgerError(TrustpayError):
    """The ledger database failed; whatever was being done was rolled back."""

    code = "ledger"


class LedgerBusy(LedgerError):
    code = "ledger_busy"


class LedgerConflict(LedgerError):
    """A unique key or conditional update said no: another writer got there first."""

    code = "ledger_conflict"


class LedgerMissing(LedgerError):
    code = "no_ledger"


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or opened (PostgreSQL down, a path that cannot be created)."""

    code = "ledger_unavailable"


FAILURES = Failures("the ledger", LedgerError, LedgerBusy, LedgerConflict, LedgerUnavailable)


@dataclass(frozen=True)
class Account:
    account: str
    kind: str
    currency: str
    balance: int
    opening_balance: int


@dataclass(frozen=True)
class GrantState:
    device: str
    expires_ms: int
    used_ms: int | None
    verdict: bytes  # the signed verdict, verified when the grant was stored


@dataclass(frozen=True)
class StoredPayment:
    """What a repeated order needs: which order this id was, and the answer it got."""

    order_hash: bytes
    receipt: bytes


@dataclass(frozen=True)
class PaymentRecord:
    order_id: str
    device: str
    app: str
    payer: str
    payee: str
    amount: int
    currency: str
    counter: int
    status: str
    code: str
    created_ms: int


@dataclass(frozen=True)
class Snapshot:
    accounts: tuple[Account, ...]
    payments: tuple[PaymentRecord, ...]


class LedgerTx(abc.ABC):
    """The operations of one payment, inside one open transaction (see ``Ledger.transaction``)."""

    @abc.abstractmethod
    async def payment(self, device: str, order_id: str) -> StoredPayment | None: ...

    @abc.abstractmethod
    async def grant(self, device: str, intent_hash: bytes) -> GrantState | None: ...

    @abc.abstractmethod
    async def last_counter(self, device: str, app: str) -> int | None: ...

    @abc.abstractmethod
    async def app_account(self, device: str, app: str) -> str | None: ...

    @abc.abstractmethod
    async def account(self, account: str) -> Account | None: ...

    @abc.abstractmethod
    async def debit(self, account: str, amount: int) -> int | None:
        """Take ``amount`` if the balance covers it; the new balance, or None if it does not."""

    @abc.abstractmethod
    async def credit(self, account: str, amount: int) -> int: ...

    @abc.abstractmethod
    async def use_grant(self, intent_hash: bytes, now_ms: int) -> bool:
        """Consume the grant; False if it was already used (by a concurrent writer)."""

    @abc.abstractmethod
    async def advance_counter(self, device: str, app: str, counter: int) -> bool:
        """Raise the app's last counter to ``counter``; False if it is not higher."""

    @abc.abstractmethod
    async def insert_payment(
        self, p: PaymentRecord, order_hash: bytes, order_blob: bytes, receipt: bytes
    ) -> None:
        """Record the payment; a (device, order id) or order hash already held raises LedgerConflict,
        rolling back everything the transaction did: the database makes execution at-most-once."""


class Ledger(abc.ABC):
    """A ledger database; ``open`` before use, ``close`` after. ``replies`` is the role's reply log."""

    readonly: bool
    replies: Replies

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect; a writer creates the schema if needed, a reader (``readonly``) never creates anything."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[LedgerTx]:
        """One write transaction; commits only if the block ends, rolls back on any exception."""

    @abc.abstractmethod
    async def seed(self, manifest: Manifest) -> None:
        """Create the manifest's accounts and app accounts; existing ones keep their balances."""

    @abc.abstractmethod
    async def store_grant(self, device: str, intent_hash: bytes, verdict: bytes, expires_ms: int) -> None:
        """Record a grant; a repeated grant may extend an unused one but never revives a used one."""

    @abc.abstractmethod
    async def prune_grants(self, now_ms: int, limit: int) -> int:
        """Forget up to ``limit`` grants that expired unused (a used one stays with its payment)."""

    @abc.abstractmethod
    async def account_view(
        self, device: str, app: str, limit: int
    ) -> tuple[Account, list[PaymentRecord]] | None:
        """The app's account and its latest ``limit`` payments, newest first; None if no such app."""

    @abc.abstractmethod
    async def snapshot(self) -> Snapshot:
        """Every account (payers, then merchants) and payment (oldest first), read consistently."""


def ledger_at(url: str | Path | DbUrl, *, readonly: bool = False) -> Ledger:
    """The ledger at ``url`` (see ``nodes.sql.parse_db_url``), not yet open."""
    where = parse_db_url(url)
    if where.kind == POSTGRESQL:
        from .ledger_pg import PgLedger  # asyncpg loads only when a deployment asks for PostgreSQL

        return PgLedger(where, readonly=readonly)
    from .ledger_sqlite import SqliteLedger

    assert where.path is not None
    return SqliteLedger(where.path, readonly=readonly)


async def read_snapshot(url: str | Path | DbUrl) -> Snapshot:
    """Open the ledger read-only (safe while payment-servers write), read it, close it."""
    ledger = ledger_at(url, readonly=True)
    await ledger.open()
    try:
        return await ledger.snapshot()
    finally:
        await ledger.close()
