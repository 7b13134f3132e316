"""The ledger in SQLite: the embedded default, one payment-server process per file.

One aiosqlite connection (``nodes.sql.SqliteConn``); every write is a ``BEGIN
IMMEDIATE`` transaction, so writers in other processes wait on the busy
timeout; WAL lets the CLI read while the server writes; ``synchronous=FULL``
puts a commit on disk before the server answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from .ledger import (
    CONFIRMED,
    FAILURES,
    MERCHANT,
    PAYER,
    PAYMENT_COLUMNS,
    REFUSED,
    SCHEMA_VERSION,
    Account,
    GrantState,
    Ledger,
    LedgerConflict,
    LedgerMissing,
    LedgerTx,
    PaymentRecord,
    Snapshot,
    StoredPayment,
)
from .sql import SqliteConn, SqliteReplies

if TYPE_CHECKING:
    from .deployment import Manifest

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('{PAYER}', '{MERCHANT}')),
    currency TEXT NOT NULL,
    balance INTEGER NOT NULL,
    opening_balance INTEGER NOT NULL,
    CHECK (kind <> '{PAYER}' OR balance >= 0)
) STRICT;
CREATE TABLE IF NOT EXISTS app_accounts (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (account),
    PRIMARY KEY (device, app)
) STRICT;
CREATE TABLE IF NOT EXISTS payments (
    order_id TEXT NOT NULL,
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    counter INTEGER NOT NULL,
    order_hash BLOB NOT NULL UNIQUE,
    order_blob BLOB NOT NULL,
    receipt_blob BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('{CONFIRMED}', '{REFUSED}')),
    code TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    CHECK (status = '{REFUSED}' OR amount > 0),
    PRIMARY KEY (device, order_id)
) STRICT;
CREATE INDEX IF NOT EXISTS payments_by_payer ON payments (payer, created_ms);
CREATE TABLE IF NOT EXISTS grants (
    intent_hash BLOB PRIMARY KEY,
    device TEXT NOT NULL,
    verdict_blob BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    last_counter INTEGER NOT NULL,
    PRIMARY KEY (device, app)
) STRICT;
"""


class SqliteLedgerTx(LedgerTx):
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        async with self._db.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _changed(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self._db.execute(sql, params) as cur:
            return cur.rowcount

    async def payment(self, device: str, order_id: str) -> StoredPayment | None:
        row = await self._one(
            "SELECT order_hash, receipt_blob FROM payments WHERE device = ? AND order_id = ?",
            (device, order_id),
        )
        return None if row is None else StoredPayment(row[0], row[1])

    async def grant(self, device: str, intent_hash: bytes) -> GrantState | None:
        row = await self._one(
            "SELECT device, expires_ms, used_ms, verdict_blob FROM grants WHERE"
            " intent_hash = ? AND device = ?",
            (intent_hash, device),
        )
        return None if row is None else GrantState(*row)

    async def last_counter(self, device: str, app: str) -> int | None:
        row = await self._one("SELECT last_counter FROM counters WHERE device = ? AND app = ?", (device, app))
        return None if row is None else int(row[0])

    async def app_account(self, device: str, app: str) -> str | None:
        row = await self._one("SELECT account FROM app_accounts WHERE device = ? AND app = ?", (device, app))
        return None if row is None else str(row[0])

    async def account(self, account: str) -> Account | None:
        row = await self._one(
            "SELECT account, kind, currency, balance, opening_balance FROM accounts WHERE account = ?",
            (account,),
        )
        return None if row is None else Account(*row)

    async def debit(self, account: str, amount: int) -> int | None:
        row = await self._one(
            "UPDATE accounts SET balance = balance - ? WHERE account = ? AND balance >= ? RETURNING balance",
            (amount, account, amount),
        )
        return None if row is None else int(row[0])

    async def credit(self, account: str, amount: int) -> int:
        row = await self._one(
            "UPDATE accounts SET balance = balance + ? WHERE account = ? RETURNING balance", (amount, account)
        )
        if row is None:
            raise LedgerConflict(f"account {account!r} vanished during the payment")
        return int(row[0])

    async def use_grant(self, intent_hash: bytes, now_ms: int) -> bool:
        changed = await self._changed(
            "UPDATE grants SET used_ms = ? WHERE intent_hash = ? AND used_ms IS NULL", (now_ms, intent_hash)
        )
        return changed == 1

    async def advance_counter(self, device: str, app: str, counter: int) -> bool:
        changed = await self._changed(
            "INSERT INTO counters (device, app, last_counter) VALUES (?, ?, ?) "
            "ON CONFLICT (device, app) DO UPDATE SET last_counter = excluded.last_counter "
            "WHERE counters.last_counter < excluded.last_counter",
            (device, app, counter),
        )
        return changed == 1

    async def insert_payment(
        self, p: PaymentRecord, order_hash: bytes, order_blob: bytes, receipt: bytes
    ) -> None:
        # IntegrityError on a held key becomes LedgerConflict in SqliteConn.tx, which rolls back
        await self._db.execute(
            f"INSERT INTO payments ({PAYMENT_COLUMNS}, order_hash, order_blob, receipt_blob) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*_payment_args(p), order_hash, order_blob, receipt),
        )


def _payment_args(p: PaymentRecord) -> tuple[Any, ...]:
    return (p.order_id, p.device, p.app, p.payer, p.payee, p.amount, p.currency, p.counter, p.status, p.code,
            p.created_ms)  # fmt: skip


class SqliteLedger(Ledger):
    """The ledger database file at ``path``."""

    def __init__(self, path: Path, *, readonly: bool = False, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn = SqliteConn(self.path, FAILURES, readonly=readonly, busy_timeout_s=busy_timeout_s)
        self.replies = SqliteReplies(self._conn)

    def __str__(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        if self.readonly and not await asyncio.to_thread(self.path.is_file):
            raise LedgerMissing(
                f"no ledger at {self.path}: the payment-server has not started yet "
                "(it creates and seeds the ledger on its first start)"
            )
        await self._conn.open(SCHEMA, SCHEMA_VERSION)

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[LedgerTx]:
        # the write lock up front: a payment reads, then writes what it read
        async with self._conn.tx("IMMEDIATE") as db:
            yield SqliteLedgerTx(db)

    async def seed(self, manifest: Manifest) -> None:
        async with self._conn.tx() as db:
            await db.executemany(
                "INSERT INTO accounts (account, kind, currency, balance, opening_balance) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO NOTHING",
                [
                    (a.account, a.kind, a.currency, a.opening_balance, a.opening_balance)
                    for a in (*manifest.accounts, *manifest.merchants)
                ],
            )
            await db.executemany(
                "INSERT INTO app_accounts (device, app, account) VALUES (?, ?, ?) "
                "ON CONFLICT (device, app) DO NOTHING",
                [(d.device, app, account) for d in manifest.devices for app, account in d.accounts.items()],
            )

    async def store_grant(self, device: str, intent_hash: bytes, verdict: bytes, expires_ms: int) -> None:
        async with self._conn.tx() as db:
            await db.execute(
                "INSERT INTO grants (intent_hash, device, verdict_blob, expires_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (intent_hash) DO UPDATE SET device = excluded.device, "
                "verdict_blob = excluded.verdict_blob, expires_ms = excluded.expires_ms "
                "WHERE grants.used_ms IS NULL AND excluded.expires_ms > grants.expires_ms",
                (intent_hash, device, verdict, expires_ms),
            )

    async def prune_grants(self, now_ms: int, limit: int) -> int:
        async with self._conn.tx() as db:
            cur = await db.execute(
                "DELETE FROM grants WHERE rowid IN (SELECT rowid FROM grants "
                "WHERE used_ms IS NULL AND expires_ms < ? LIMIT ?)",
                (now_ms, limit),
            )
            return cur.rowcount

    async def account_view(
        self, device: str, app: str, limit: int
    ) -> tuple[Account, list[PaymentRecord]] | None:
        async with self._conn.tx("DEFERRED") as db:
            tx = SqliteLedgerTx(db)
            name = await tx.app_account(device, app)
            account = None if name is None else await tx.account(name)
            if account is None:
                return None
            rows = await db.execute_fetchall(
                f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE payer = ? "
                "ORDER BY created_ms DESC, rowid DESC LIMIT ?",
                (account.account, limit),
            )
        return account, [PaymentRecord(*row) for row in rows]

    async def snapshot(self) -> Snapshot:
        async with self._conn.tx("DEFERRED") as db:
            accounts = await db.execute_fetchall(
                "SELECT account, kind, currency, balance, opening_balance FROM"
                " accounts ORDER BY kind DESC, account"
            )
            payments = await db.execute_fetchall(
                f"SELECT {PAYMENT_COLUMNS} FROM payments ORDER BY created_ms, rowid"
            )
        return Snapshot(tuple(Account(*r) for r in accounts), tuple(PaymentRecord(*r) for r in payments))
