"""The payment-server's ledger: accounts, payments, grants and counters, behind one interface.

Every rule that keeps money right is enforced by the database, not by memory:
a device's order id is a primary key (an order executes at most once, and one
device's order ids neither block nor reveal another's), a debit is a
conditional update (a payer never goes below zero, and a CHECK says so too), a
grant is consumed by a conditional update, and a counter only moves up. So
several payment-servers sharing one database can never execute one order
twice: a second writer's key or conditional update says no, which surfaces as
:class:`LedgerConflict`, and the caller retries and finds the first result.

One implementation, its SQL written once (``nodes.sql.Tx``), on the back end
the database URL names (``nodes.sql.parse_db_url``): SQLite
(``nodes.ledger_sqlite``, the embedded default for one process) or PostgreSQL
(``nodes.ledger_pg``, for replicas; payments run at READ COMMITTED, so a
concurrent writer's conditional update re-checks the committed row and says no).
Callers see this interface, typed rows and typed errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import TrustpayError

from .sql import POSTGRESQL, Conn, DbUrl, Failures, SqlReplies, Tx, parse_db_url, write

if TYPE_CHECKING:
    from .deployment import Manifest

SCHEMA_VERSION = 2  # 2: payments keyed per device, grants by intent hash
PAYER, MERCHANT = "payer", "merchant"
CONFIRMED, REFUSED = "confirmed", "refused"
PAYMENT_COLUMNS = "order_id, device, app, payer, payee, amount, currency, counter, status, code, created_ms"
ACCOUNT_COLUMNS = "account, kind, currency, balance, opening_balance"


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


# DDL for both back ends: $int, $blob, ... are the dialect's (nodes.sql.Dialect)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('{PAYER}', '{MERCHANT}')),
    currency TEXT NOT NULL,
    balance $int NOT NULL,
    opening_balance $int NOT NULL,
    CHECK (kind <> '{PAYER}' OR balance >= 0)
)$strict;
CREATE TABLE IF NOT EXISTS app_accounts (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (account),
    PRIMARY KEY (device, app)
)$strict;
CREATE TABLE IF NOT EXISTS payments (
    ${{seq_column}}order_id TEXT NOT NULL,
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    amount $int NOT NULL,
    currency TEXT NOT NULL,
    counter $int NOT NULL,
    order_hash $blob NOT NULL UNIQUE,
    order_blob $blob NOT NULL,
    receipt_blob $blob NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('{CONFIRMED}', '{REFUSED}')),
    code TEXT NOT NULL,
    created_ms $int NOT NULL,
    CHECK (status = '{REFUSED}' OR amount > 0),
    PRIMARY KEY (device, order_id)
)$strict;
CREATE INDEX IF NOT EXISTS payments_by_payer ON payments (payer, created_ms);
CREATE TABLE IF NOT EXISTS grants (
    intent_hash $blob PRIMARY KEY,
    device TEXT NOT NULL,
    verdict_blob $blob NOT NULL,
    expires_ms $int NOT NULL,
    used_ms $int
)$strict;
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    last_counter $int NOT NULL,
    PRIMARY KEY (device, app)
)$strict;
"""


class LedgerTx:
    """The operations of one payment, inside one open transaction (see ``Ledger.transaction``)."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def payment(self, device: str, order_id: str) -> StoredPayment | None:
        row = await self._tx.fetchone(
            "SELECT order_hash, receipt_blob FROM payments WHERE device = ? AND order_id = ?",
            device,
            order_id,
        )
        return None if row is None else StoredPayment(bytes(row[0]), bytes(row[1]))

    async def grant(self, device: str, intent_hash: bytes) -> GrantState | None:
        row = await self._tx.fetchone(
            "SELECT device, expires_ms, used_ms, verdict_blob FROM grants"
            " WHERE intent_hash = ? AND device = ?",
            intent_hash,
            device,
        )
        return None if row is None else GrantState(row[0], row[1], row[2], bytes(row[3]))

    async def last_counter(self, device: str, app: str) -> int | None:
        row = await self._tx.fetchone(
            "SELECT last_counter FROM counters WHERE device = ? AND app = ?", device, app
        )
        return None if row is None else int(row[0])

    async def app_account(self, device: str, app: str) -> str | None:
        row = await self._tx.fetchone(
            "SELECT account FROM app_accounts WHERE device = ? AND app = ?", device, app
        )
        return None if row is None else str(row[0])

    async def account(self, account: str) -> Account | None:
        row = await self._tx.fetchone(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account = ?", account)
        return None if row is None else Account(*row)

    async def debit(self, account: str, amount: int) -> int | None:
        """Take ``amount`` if the balance covers it; the new balance, or None if it does not."""
        row = await self._tx.fetchone(
            "UPDATE accounts SET balance = balance - ? WHERE account = ? AND balance >= ? RETURNING balance",
            amount,
            account,
            amount,
        )
        return None if row is None else int(row[0])

    async def credit(self, account: str, amount: int) -> int:
        row = await self._tx.fetchone(
            "UPDATE accounts SET balance = balance + ? WHERE account = ? RETURNING balance", amount, account
        )
        if row is None:
            raise LedgerConflict(f"account {account!r} vanished during the payment")
        return int(row[0])

    async def use_grant(self, intent_hash: bytes, now_ms: int) -> bool:
        """Consume the grant; False if it was already used (by a concurrent writer)."""
        changed = await self._tx.execute(
            "UPDATE grants SET used_ms = ? WHERE intent_hash = ? AND used_ms IS NULL", now_ms, intent_hash
        )
        return changed == 1

    async def advance_counter(self, device: str, app: str, counter: int) -> bool:
        """Raise the app's last counter to ``counter``; False if it is not higher."""
        changed = await self._tx.execute(
            "INSERT INTO counters (device, app, last_counter) VALUES (?, ?, ?) "
            "ON CONFLICT (device, app) DO UPDATE SET last_counter = excluded.last_counter "
            "WHERE counters.last_counter < excluded.last_counter",
            device,
            app,
            counter,
        )
        return changed == 1

    async def insert_payment(
        self, p: PaymentRecord, order_hash: bytes, order_blob: bytes, receipt: bytes
    ) -> None:
        """Record the payment; a (device, order id) or order hash already held raises LedgerConflict,
        rolling back everything the transaction did: the database makes execution at-most-once."""
        # the key violation becomes LedgerConflict where the back end's tx translates it, after the rollback
        await self._tx.execute(
            f"INSERT INTO payments ({PAYMENT_COLUMNS}, order_hash, order_blob, receipt_blob) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            p.order_id, p.device, p.app, p.payer, p.payee, p.amount, p.currency, p.counter, p.status, p.code,
            p.created_ms, order_hash, order_blob, receipt,
        )  # fmt: skip


class Ledger:
    """A ledger database; ``open`` before use, ``close`` after. ``replies`` is the role's reply log."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.readonly = conn.readonly
        self.replies = SqlReplies(conn)

    def __str__(self) -> str:
        return str(self._conn)

    async def open(self) -> None:
        """Connect; a writer creates the schema if needed, a reader (``readonly``) never creates anything."""
        if not await self._conn.open(SCHEMA, SCHEMA_VERSION, "payments"):
            raise LedgerMissing(
                f"no ledger at {self._conn}: no payment-server has started on it yet "
                "(the first one creates and seeds the ledger)"
            )

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[LedgerTx]:
        """One write transaction; commits only if the block ends, rolls back on any exception."""
        async with self._conn.tx() as tx:
            yield LedgerTx(tx)

    async def seed(self, manifest: Manifest) -> None:
        """Create the manifest's accounts and app accounts; existing ones keep their balances."""
        async with self._conn.tx() as tx:
            await tx.executemany(
                f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (account) DO NOTHING",
                [
                    (a.account, a.kind, a.currency, a.opening_balance, a.opening_balance)
                    for a in (*manifest.accounts, *manifest.merchants)
                ],
            )
            await tx.executemany(
                "INSERT INTO app_accounts (device, app, account) VALUES (?, ?, ?) "
                "ON CONFLICT (device, app) DO NOTHING",
                [(d.device, app, account) for d in manifest.devices for app, account in d.accounts.items()],
            )

    async def store_grant(self, device: str, intent_hash: bytes, verdict: bytes, expires_ms: int) -> None:
        """Record a grant; a repeated grant may extend an unused one but never revives a used one."""
        await write(
            self._conn,
            "INSERT INTO grants (intent_hash, device, verdict_blob, expires_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (intent_hash) DO UPDATE SET device = excluded.device, "
            "verdict_blob = excluded.verdict_blob, expires_ms = excluded.expires_ms "
            "WHERE grants.used_ms IS NULL AND excluded.expires_ms > grants.expires_ms",
            intent_hash,
            device,
            verdict,
            expires_ms,
        )

    async def prune_grants(self, now_ms: int, limit: int) -> int:
        """Forget up to ``limit`` grants that expired unused (a used one stays with its payment)."""
        return await write(
            self._conn,
            "DELETE FROM grants WHERE intent_hash IN (SELECT intent_hash FROM grants "
            "WHERE used_ms IS NULL AND expires_ms < ? LIMIT ?)",
            now_ms,
            limit,
        )

    async def account_view(
        self, device: str, app: str, limit: int
    ) -> tuple[Account, list[PaymentRecord]] | None:
        """The app's account and its latest ``limit`` payments, newest first; None if no such app."""
        seq = self._conn.dialect.seq
        async with self._conn.tx(read=True) as tx:
            in_tx = LedgerTx(tx)
            name = await in_tx.app_account(device, app)
            account = None if name is None else await in_tx.account(name)
            if account is None:
                return None
            rows = await tx.fetchall(
                f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE payer = ?"
                f" ORDER BY created_ms DESC, {seq} DESC LIMIT ?",
                account.account,
                limit,
            )
        return account, [PaymentRecord(*row) for row in rows]

    async def snapshot(self) -> Snapshot:
        """Every account (payers, then merchants) and payment (oldest first), read consistently."""
        binary, seq = self._conn.dialect.binary, self._conn.dialect.seq
        async with self._conn.tx(read=True) as tx:
            accounts = await tx.fetchall(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY kind{binary} DESC, account{binary}"
            )
            payments = await tx.fetchall(f"SELECT {PAYMENT_COLUMNS} FROM payments ORDER BY created_ms, {seq}")
        return Snapshot(tuple(Account(*r) for r in accounts), tuple(PaymentRecord(*r) for r in payments))


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
