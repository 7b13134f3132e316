"""The ledger in PostgreSQL: what payment-server replicas share.

The same rules as the SQLite ledger, enforced by the same kind of SQL: the
(device, order id) key, a conditional debit under ``CHECK (balance >= 0)``, a
grant consumed by a conditional ``UPDATE``, a counter raised only by a
conditional upsert. Payments run at READ COMMITTED: PostgreSQL re-checks a
conditional update's ``WHERE`` on the row a concurrent writer just committed,
so the loser's update says no (or its insert hits the key) and the payment
retries as a :class:`nodes.ledger.LedgerConflict`; snapshots read at
REPEATABLE READ so accounts and payments agree. Tables live in the schema
``{prefix}_ledger``; ``seq`` orders payments made in the same millisecond.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

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
from .sql import DbUrl
from .sql_pg import POOL_MAX, PgConn, PgReplies

if TYPE_CHECKING:
    from .deployment import Manifest

ROLE = "ledger"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('{PAYER}', '{MERCHANT}')),
    currency TEXT NOT NULL,
    balance BIGINT NOT NULL,
    opening_balance BIGINT NOT NULL,
    CHECK (kind <> '{PAYER}' OR balance >= 0)
);
CREATE TABLE IF NOT EXISTS app_accounts (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (account),
    PRIMARY KEY (device, app)
);
CREATE TABLE IF NOT EXISTS payments (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    order_id TEXT NOT NULL,
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    counter BIGINT NOT NULL,
    order_hash BYTEA NOT NULL UNIQUE,
    order_blob BYTEA NOT NULL,
    receipt_blob BYTEA NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('{CONFIRMED}', '{REFUSED}')),
    code TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    CHECK (status = '{REFUSED}' OR amount > 0),
    PRIMARY KEY (device, order_id)
);
CREATE INDEX IF NOT EXISTS payments_by_payer ON payments (payer, created_ms);
CREATE TABLE IF NOT EXISTS grants (
    intent_hash BYTEA PRIMARY KEY,
    device TEXT NOT NULL,
    verdict_blob BYTEA NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms BIGINT
);
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL,
    app TEXT NOT NULL,
    last_counter BIGINT NOT NULL,
    PRIMARY KEY (device, app)
);
"""
_ACCOUNT_COLUMNS = "account, kind, currency, balance, opening_balance"


class PgLedgerTx(LedgerTx):
    def __init__(self, conn: Any) -> None:
        self._conn = conn  # an asyncpg connection inside an open transaction

    async def payment(self, device: str, order_id: str) -> StoredPayment | None:
        row = await self._conn.fetchrow(
            "SELECT order_hash, receipt_blob FROM payments WHERE device = $1 AND order_id = $2",
            device,
            order_id,
        )
        return None if row is None else StoredPayment(bytes(row[0]), bytes(row[1]))

    async def grant(self, device: str, intent_hash: bytes) -> GrantState | None:
        row = await self._conn.fetchrow(
            "SELECT device, expires_ms, used_ms, verdict_blob FROM grants WHERE"
            " intent_hash = $1 AND device = $2",
            intent_hash,
            device,
        )
        return None if row is None else GrantState(row[0], row[1], row[2], bytes(row[3]))

    async def last_counter(self, device: str, app: str) -> int | None:
        value = await self._conn.fetchval(
            "SELECT last_counter FROM counters WHERE device = $1 AND app = $2", device, app
        )
        return None if value is None else int(value)

    async def app_account(self, device: str, app: str) -> str | None:
        value = await self._conn.fetchval(
            "SELECT account FROM app_accounts WHERE device = $1 AND app = $2", device, app
        )
        return None if value is None else str(value)

    async def account(self, account: str) -> Account | None:
        row = await self._conn.fetchrow(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account = $1", account
        )
        return None if row is None else Account(*row)

    async def debit(self, account: str, amount: int) -> int | None:
        value = await self._conn.fetchval(
            "UPDATE accounts SET balance = balance - $1 WHERE account = $2 AND"
            " balance >= $1 RETURNING balance",
            amount,
            account,
        )
        return None if value is None else int(value)

    async def credit(self, account: str, amount: int) -> int:
        value = await self._conn.fetchval(
            "UPDATE accounts SET balance = balance + $1 WHERE account = $2 RETURNING balance", amount, account
        )
        if value is None:
            raise LedgerConflict(f"account {account!r} vanished during the payment")
        return int(value)

    async def use_grant(self, intent_hash: bytes, now_ms: int) -> bool:
        status = await self._conn.execute(
            "UPDATE grants SET used_ms = $1 WHERE intent_hash = $2 AND used_ms IS NULL", now_ms, intent_hash
        )
        return bool(status == "UPDATE 1")

    async def advance_counter(self, device: str, app: str, counter: int) -> bool:
        status = await self._conn.execute(
            "INSERT INTO counters (device, app, last_counter) VALUES ($1, $2, $3) "
            "ON CONFLICT (device, app) DO UPDATE SET last_counter = excluded.last_counter "
            "WHERE counters.last_counter < excluded.last_counter",
            device,
            app,
            counter,
        )
        return bool(status == "INSERT 0 1")

    async def insert_payment(
        self, p: PaymentRecord, order_hash: bytes, order_blob: bytes, receipt: bytes
    ) -> None:
        # a held key raises UniqueViolation, which PgConn.tx turns into LedgerConflict after the rollback
        await self._conn.execute(
            f"INSERT INTO payments ({PAYMENT_COLUMNS}, order_hash, order_blob, receipt_blob) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            p.order_id, p.device, p.app, p.payer, p.payee, p.amount, p.currency, p.counter, p.status, p.code,
            p.created_ms, order_hash, order_blob, receipt,
        )  # fmt: skip


class PgLedger(Ledger):
    """The ledger in the schema ``{prefix}_ledger`` of the PostgreSQL database at ``url``."""

    def __init__(self, url: DbUrl, *, readonly: bool = False, pool_max: int = POOL_MAX) -> None:
        self.url = url
        self.readonly = readonly
        self._conn = PgConn(url, ROLE, FAILURES, readonly=readonly, pool_max=pool_max)
        self.replies = PgReplies(self._conn)

    def __str__(self) -> str:
        return f"{self.url} (schema {self._conn.schema})"

    async def open(self) -> None:
        await self._conn.open(SCHEMA, SCHEMA_VERSION)
        if self.readonly and not await self._conn.has_table("payments"):
            await self._conn.close()
            raise LedgerMissing(
                f"no ledger in schema {self._conn.schema} at {self.url}: no payment-server has started "
                "on this database yet (the first one creates and seeds the ledger)"
            )

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[LedgerTx]:
        async with self._conn.tx() as conn:
            yield PgLedgerTx(conn)

    async def seed(self, manifest: Manifest) -> None:
        async with self._conn.tx() as conn:
            await conn.executemany(
                f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) VALUES ($1, $2, $3, $4, $4) "
                "ON CONFLICT (account) DO NOTHING",
                [
                    (a.account, a.kind, a.currency, a.opening_balance)
                    for a in (*manifest.accounts, *manifest.merchants)
                ],
            )
            await conn.executemany(
                "INSERT INTO app_accounts (device, app, account) VALUES ($1, $2, $3) "
                "ON CONFLICT (device, app) DO NOTHING",
                [(d.device, app, account) for d in manifest.devices for app, account in d.accounts.items()],
            )

    async def store_grant(self, device: str, intent_hash: bytes, verdict: bytes, expires_ms: int) -> None:
        async with self._conn.tx() as conn:
            await conn.execute(
                "INSERT INTO grants (intent_hash, device, verdict_blob, expires_ms) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (intent_hash) DO UPDATE SET device = excluded.device, "
                "verdict_blob = excluded.verdict_blob, expires_ms = excluded.expires_ms "
                "WHERE grants.used_ms IS NULL AND excluded.expires_ms > grants.expires_ms",
                intent_hash,
                device,
                verdict,
                expires_ms,
            )

    async def prune_grants(self, now_ms: int, limit: int) -> int:
        async with self._conn.tx() as conn:
            status = await conn.execute(
                "DELETE FROM grants WHERE intent_hash IN (SELECT intent_hash FROM grants "
                "WHERE used_ms IS NULL AND expires_ms < $1 LIMIT $2)",
                now_ms,
                limit,
            )
        return int(status.split()[-1])

    async def account_view(
        self, device: str, app: str, limit: int
    ) -> tuple[Account, list[PaymentRecord]] | None:
        async with self._conn.tx(isolation="repeatable_read", readonly=True) as conn:
            tx = PgLedgerTx(conn)
            name = await tx.app_account(device, app)
            account = None if name is None else await tx.account(name)
            if account is None:
                return None
            rows = await conn.fetch(
                f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE payer = $1 "
                "ORDER BY created_ms DESC, seq DESC LIMIT $2",
                account.account,
                limit,
            )
        return account, [PaymentRecord(*row) for row in rows]

    async def snapshot(self) -> Snapshot:
        async with self._conn.tx(isolation="repeatable_read", readonly=True) as conn:
            accounts = await conn.fetch(
                f'SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY kind COLLATE "C" DESC, account COLLATE "C"'
            )
            payments = await conn.fetch(f"SELECT {PAYMENT_COLUMNS} FROM payments ORDER BY created_ms, seq")
        return Snapshot(tuple(Account(*r) for r in accounts), tuple(PaymentRecord(*r) for r in payments))
