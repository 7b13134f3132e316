"""The payment-server's ledger: accounts, payments, grants and counters in SQLite.

Every rule that keeps money right is enforced by the database, not by memory:
a device's order id is a primary key (an order executes at most once, and one
device's order ids neither block nor reveal another's), a debit is a
conditional update (a payer never goes below zero, and a CHECK says so too), a
grant is consumed by a conditional update, and a counter only moves up. So two
payment-servers sharing one database (or, later, a PostgreSQL implementation of
this same interface) can never execute one order twice. All SQL lives in this
module; callers see typed rows and typed errors.

The ledger uses one aiosqlite connection (its own thread, so no query blocks
the event loop). A lock serialises this process's use of it because one
connection holds one transaction at a time; between processes, ``BEGIN
IMMEDIATE`` and the busy timeout serialise writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from protocol.errors import TrustpayError

from .deployment import Manifest

SCHEMA_VERSION = 2  # 2: payments keyed per device, grants by intent hash
PAYER, MERCHANT = "payer", "merchant"
CONFIRMED, REFUSED = "confirmed", "refused"

_SCHEMA = f"""
BEGIN IMMEDIATE;
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
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_PAYMENT_COLUMNS = "order_id, device, app, payer, payee, amount, currency, counter, status, code, created_ms"


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


def _translate(exc: sqlite3.Error, path: Path) -> LedgerError:
    if isinstance(exc, sqlite3.IntegrityError):
        return LedgerConflict(f"the ledger refused a write ({exc}); another writer changed it first, retry")
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LedgerBusy(f"the ledger {path} stayed locked by another writer; nothing was changed, retry")
    return LedgerError(f"the ledger database {path} failed: {text}; nothing was changed")


class LedgerTx:
    """The operations of one payment, inside one open transaction (see ``Ledger.transaction``)."""

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
            "SELECT device, expires_ms, used_ms, verdict_blob FROM grants"
            " WHERE intent_hash = ? AND device = ?",
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
        """Take ``amount`` if the balance covers it; the new balance, or None if it does not."""
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
        """Consume the grant; False if it was already used (by a concurrent writer)."""
        changed = await self._changed(
            "UPDATE grants SET used_ms = ? WHERE intent_hash = ? AND used_ms IS NULL", (now_ms, intent_hash)
        )
        return changed == 1

    async def advance_counter(self, device: str, app: str, counter: int) -> bool:
        """Raise the app's last counter to ``counter``; False if it is not higher."""
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
        # A duplicate (device, order id) or order hash raises IntegrityError -> LedgerConflict, rolling back
        # everything this transaction did: the database is what makes execution at-most-once.
        await self._db.execute(
            f"INSERT INTO payments ({_PAYMENT_COLUMNS}, order_hash, order_blob, receipt_blob) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                p.order_id,
                p.device,
                p.app,
                p.payer,
                p.payee,
                p.amount,
                p.currency,
                p.counter,
                p.status,
                p.code,
                p.created_ms,
                order_hash,
                order_blob,
                receipt,
            ),
        )


class Ledger:
    """The ledger database at ``path``; ``open`` before use, ``close`` after."""

    def __init__(self, path: Path, *, readonly: bool = False, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self.readonly:
            if not await asyncio.to_thread(self.path.is_file):
                raise LedgerMissing(
                    f"no ledger at {self.path}: the payment-server has not started yet "
                    "(it creates and seeds the ledger on its first start)"
                )
            target: str | Path = self.path.absolute().as_uri() + "?mode=ro"
        else:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
            target = self.path
        try:
            # isolation_level=None: we issue BEGIN ourselves, so Python never opens one behind our back
            db = await aiosqlite.connect(
                target, isolation_level=None, timeout=self.busy_timeout_s, uri=self.readonly
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        try:
            await db.execute("PRAGMA foreign_keys = ON")
            if not self.readonly:
                await db.execute("PRAGMA journal_mode = WAL")  # readers (the CLI) never block the server
                await db.execute("PRAGMA synchronous = FULL")  # a commit is on disk before we answer
                async with db.execute("PRAGMA user_version") as cur:
                    version = (await cur.fetchone() or (0,))[0]
                if version != 0 and version != SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"schema {version}, not {SCHEMA_VERSION}: provision the deployment again"
                    )
                await db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            await db.close()
            raise _translate(exc, self.path) from exc
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    @asynccontextmanager
    async def _txn(self, mode: str) -> AsyncIterator[aiosqlite.Connection]:
        db = self._db
        if db is None:
            raise LedgerError(f"the ledger {self.path} is not open")
        async with self._lock:
            try:
                await db.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # nothing half-done: whatever failed, and even on cancellation, undo it all
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                    await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _translate(exc, self.path) from exc
                raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[LedgerTx]:
        """One write transaction, taken with the write lock up front; commits only if the block ends."""
        async with self._txn("IMMEDIATE") as db:
            yield LedgerTx(db)

    async def seed(self, manifest: Manifest) -> None:
        """Create the manifest's accounts and app accounts; existing ones keep their balances."""
        async with self._txn("IMMEDIATE") as db:
            await db.executemany(
                "INSERT OR IGNORE INTO accounts (account, kind, currency, balance, opening_balance) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (a.account, a.kind, a.currency, a.opening_balance, a.opening_balance)
                    for a in (*manifest.accounts, *manifest.merchants)
                ],
            )
            await db.executemany(
                "INSERT OR IGNORE INTO app_accounts (device, app, account) VALUES (?, ?, ?)",
                [(d.device, app, account) for d in manifest.devices for app, account in d.accounts.items()],
            )

    async def store_grant(self, device: str, intent_hash: bytes, verdict: bytes, expires_ms: int) -> None:
        """Record a grant; a repeated grant may extend an unused one but never revives a used one."""
        async with self._txn("IMMEDIATE") as db:
            await db.execute(
                "INSERT INTO grants (intent_hash, device, verdict_blob, expires_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (intent_hash) DO UPDATE SET device = excluded.device, "
                "verdict_blob = excluded.verdict_blob, expires_ms = excluded.expires_ms "
                "WHERE grants.used_ms IS NULL AND excluded.expires_ms > grants.expires_ms",
                (intent_hash, device, verdict, expires_ms),
            )

    async def prune_grants(self, now_ms: int, limit: int) -> int:
        """Forget up to ``limit`` grants that expired unused (a used one stays with its payment)."""
        async with self._txn("IMMEDIATE") as db:
            cur = await db.execute(
                "DELETE FROM grants WHERE rowid IN (SELECT rowid FROM grants "
                "WHERE used_ms IS NULL AND expires_ms < ? LIMIT ?)",
                (now_ms, limit),
            )
            return cur.rowcount

    async def account_view(
        self, device: str, app: str, limit: int
    ) -> tuple[Account, list[PaymentRecord]] | None:
        """The app's account and its latest ``limit`` payments, newest first; None if no such app."""
        async with self._txn("DEFERRED") as db:
            tx = LedgerTx(db)
            name = await tx.app_account(device, app)
            account = None if name is None else await tx.account(name)
            if account is None:
                return None
            rows = await db.execute_fetchall(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payer = ? "
                "ORDER BY created_ms DESC, rowid DESC LIMIT ?",
                (account.account, limit),
            )
        return account, [PaymentRecord(*row) for row in rows]

    async def snapshot(self) -> Snapshot:
        """Every account and payment, read in one transaction so they agree with each other."""
        async with self._txn("DEFERRED") as db:
            accounts = await db.execute_fetchall(
                "SELECT account, kind, currency, balance, opening_balance FROM accounts "
                "ORDER BY kind DESC, account"  # payers, then merchants
            )
            payments = await db.execute_fetchall(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments ORDER BY created_ms, rowid"
            )
        return Snapshot(tuple(Account(*r) for r in accounts), tuple(PaymentRecord(*r) for r in payments))


async def read_snapshot(path: Path) -> Snapshot:
    """Open the ledger read-only (safe while the payment-server writes), read it, close it."""
    ledger = Ledger(path, readonly=True)
    await ledger.open()
    try:
        return await ledger.snapshot()
    finally:
        await ledger.close()
