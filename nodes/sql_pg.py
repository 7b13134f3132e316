"""What the PostgreSQL stores share: a small asyncpg pool in one schema, and the reply log.

Each role keeps its tables in its own schema (``DbUrl.schema``), created at
open under an advisory lock so replicas starting together do not race the
catalog. Every connection of the pool has that schema as its ``search_path``,
so the stores' SQL names bare tables. Commits are durable: we leave
``synchronous_commit`` at its default (on), so an answer is sent only after
the commit reached PostgreSQL's write-ahead log on disk.

asyncpg's errors are translated here, at the edge, into the store's typed
errors (:class:`nodes.sql.Failures`): a key or CHECK violation, a serialization
failure or a deadlock is a *conflict* (another writer got there first; the
caller retries), a lock or statement timeout is *busy*, a lost or refused
connection is *unavailable*.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from protocol.errors import ConfigError, TrustpayError

from .replies import LEASE_MS, NEW, Claim
from .sql import ANSWER_SQL, CLAIM_SQL, HELD_SQL, DbUrl, Failures, held_claim

POOL_MIN, POOL_MAX = 1, 4  # one server process runs few transactions at once; replicas add their own
LOCK_TIMEOUT_MS = 5_000  # like SQLite's busy timeout: a stuck writer makes us fail, not hang

REPLIES_PG = """
CREATE TABLE IF NOT EXISTS replies (
    sender TEXT NOT NULL,
    message_id BYTEA NOT NULL,
    holder TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL,
    topic TEXT NOT NULL DEFAULT '',
    frame BYTEA,
    PRIMARY KEY (sender, message_id)
);
CREATE INDEX IF NOT EXISTS replies_by_age ON replies (claimed_ms);
"""
_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def pg_error(exc: BaseException, where: object, errors: Failures) -> TrustpayError:
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith("23") or state in ("40001", "40P01"):
        return errors.conflict(
            f"{errors.what} refused a write ({exc}); another writer changed it first, retry"
        )
    if state in ("55P03", "57014"):  # lock_not_available, query_canceled (our lock/statement timeouts)
        return errors.busy(
            f"{errors.what} {where} stayed locked by another writer; nothing was changed, retry"
        )
    if state.startswith(("08", "53", "57P", "28", "3D")) or isinstance(
        exc, OSError | asyncpg.InterfaceError | TimeoutError
    ):
        return errors.unavailable(f"cannot reach {errors.what} at {where}: {exc}")
    return errors.failed(f"{errors.what} {where} failed: {exc}; nothing was changed")


_FOREIGN = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgConn:
    """A store's pool on one schema; ``tx`` is the unit of work, translated errors only."""

    def __init__(
        self, url: DbUrl, role: str, errors: Failures, *, readonly: bool = False, pool_max: int = POOL_MAX
    ) -> None:
        self.url = url
        self.schema = url.schema(role)
        self.errors = errors
        self.readonly = readonly
        self.pool_max = pool_max
        self._pool: asyncpg.Pool | None = None

    async def open(self, schema_sql: str, version: int) -> None:
        """Connect; a writer creates the schema and its tables (idempotent), a reader creates nothing."""
        settings = {"search_path": self.schema, "lock_timeout": str(LOCK_TIMEOUT_MS)}
        if self.readonly:
            settings["default_transaction_read_only"] = "on"
        try:
            pool = await asyncpg.create_pool(
                self.url.dsn, min_size=POOL_MIN, max_size=self.pool_max, server_settings=settings
            )
        except _FOREIGN as exc:
            raise pg_error(exc, self.url, self.errors) from exc
        try:
            if not self.readonly:
                async with pool.acquire() as conn:
                    await self._create(conn, schema_sql, version)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, _FOREIGN):
                raise pg_error(exc, self.url, self.errors) from exc
            raise
        self._pool = pool

    async def _create(self, conn: Any, schema_sql: str, version: int) -> None:
        # the key of the advisory lock: this schema's name, so only openers of the same schema wait
        key = int.from_bytes(
            hashlib.blake2b(self.schema.encode(), digest_size=8).digest(), "big", signed=True
        )
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(f"{_VERSION_TABLE};\n{schema_sql}\n{REPLIES_PG}")
            held = await conn.fetchval("SELECT max(version) FROM schema_version")
            if held is None:
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
            elif held != version:
                raise ConfigError(
                    f"{self.errors.what} schema {self.schema} at {self.url} has"
                    f" version {held}, not {version}: "
                    "provision the deployment again (or run the trustpay that wrote it)"
                )

    async def has_table(self, table: str) -> bool:
        """Whether this schema holds ``table`` (a reader's check that a writer ever created the store)."""
        async with self.tx() as conn:
            return await conn.fetchval("SELECT to_regclass($1)", f'"{self.schema}".{table}') is not None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def tx(self, *, isolation: str = "read_committed", readonly: bool = False) -> AsyncIterator[Any]:
        """One transaction on a pooled connection: committed if the block ends, else rolled back."""
        pool = self._pool
        if pool is None:
            raise self.errors.failed(f"{self.errors.what} at {self.url} is not open")
        try:
            async with pool.acquire() as conn, conn.transaction(isolation=isolation, readonly=readonly):
                yield conn
        except _FOREIGN as exc:
            raise pg_error(exc, self.url, self.errors) from exc

    async def one(self, sql: str, *args: Any) -> Any:
        async with self.tx() as conn:
            return await conn.fetchrow(sql, *args)

    async def all(self, sql: str, *args: Any) -> list[Any]:
        async with self.tx() as conn:
            return list(await conn.fetch(sql, *args))


class PgReplies:
    """:class:`nodes.replies.Replies` in a store's PostgreSQL schema (its ``replies`` table)."""

    def __init__(self, conn: PgConn, lease_ms: int = LEASE_MS) -> None:
        self._conn = conn
        self.lease_ms = lease_ms

    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim:
        # one statement: a concurrent claim waits on the row, then re-checks the WHERE and gets nothing
        async with self._conn.tx() as conn:
            won = await conn.fetchrow(
                CLAIM_SQL.format("$1", "$2", "$3", "$4::bigint", "$5::bigint"),
                sender,
                message_id,
                holder,
                now_ms,
                self.lease_ms,
            )
            if won is not None:
                return Claim(NEW)
            return held_claim(await conn.fetchrow(HELD_SQL.format("$1", "$2"), sender, message_id))

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None:
        async with self._conn.tx() as conn:
            await conn.execute(
                ANSWER_SQL.format("$1", "$2", "$3", "$4", "$5"), sender, message_id, now_ms, topic, frame
            )

    async def prune(self, before_ms: int, limit: int) -> int:
        async with self._conn.tx() as conn:
            status = await conn.execute(
                "DELETE FROM replies WHERE (sender, message_id) IN (SELECT sender, message_id FROM replies "
                "WHERE claimed_ms < $1 LIMIT $2)",
                before_ms,
                limit,
            )
        return int(status.split()[-1])
