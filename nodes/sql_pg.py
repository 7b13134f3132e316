"""The PostgreSQL back end of the stores: a small asyncpg pool in one schema.

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

The stores' SQL is written once with ``?`` placeholders (``nodes.sql.Tx``);
:func:`numbered` turns each statement into PostgreSQL's ``$1..$n`` once.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import asyncpg

from protocol.errors import ConfigError, TrustpayError

from .sql import REPLIES, DbUrl, Dialect, Failures, Tx

POOL_MIN, POOL_MAX = 1, 4  # one server process runs few transactions at once; replicas add their own
LOCK_TIMEOUT_MS = 5_000  # like SQLite's busy timeout: a stuck writer makes us fail, not hang

PG_DIALECT = Dialect(
    int="BIGINT", blob="BYTEA", strict="", identity="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    seq_column="seq BIGINT GENERATED ALWAYS AS IDENTITY,\n    ", seq="seq", binary=' COLLATE "C"',
)  # fmt: skip
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
_PLACEHOLDER = re.compile(r"\?")  # the stores' SQL holds no ? in a string literal


@lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """``?`` placeholders as ``$1..$n``; the stores' statements are few, so each is translated once."""
    n = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(n)}", sql)


def rows_changed(status: str) -> int:
    """The row count of a command status ("UPDATE 1", "INSERT 0 1", "DELETE 3")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgTx:
    """:class:`nodes.sql.Tx` on an asyncpg connection inside a transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return rows_changed(await self._conn.execute(numbered(sql), *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), list(rows))

    async def fetchone(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchrow(numbered(sql), *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._conn.fetch(numbered(sql), *args))


class PgConn:
    """A store's pool on one schema; ``tx`` is the unit of work, translated errors only."""

    dialect = PG_DIALECT

    def __init__(
        self, url: DbUrl, role: str, errors: Failures, *, readonly: bool = False, pool_max: int = POOL_MAX
    ) -> None:
        self.url = url
        self.schema = url.schema(role)
        self.errors = errors
        self.readonly = readonly
        self.pool_max = pool_max
        self._pool: asyncpg.Pool | None = None

    def __str__(self) -> str:
        return f"{self.url} (schema {self.schema})"

    async def open(self, schema_sql: str, version: int, marker: str) -> bool:
        """Connect; a writer creates the schema and its tables (idempotent), a reader creates nothing
        and finds no store (False, nothing open) where the schema holds no ``marker`` table."""
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
        if self.readonly and not await self.has_table(marker):
            await self.close()
            return False
        return True

    async def _create(self, conn: Any, schema_sql: str, version: int) -> None:
        # the key of the advisory lock: this schema's name, so only openers of the same schema wait
        key = int.from_bytes(
            hashlib.blake2b(self.schema.encode(), digest_size=8).digest(), "big", signed=True
        )
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(f"{_VERSION_TABLE};\n{self.dialect.ddl(schema_sql + REPLIES)}")
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
        row = await self.one("SELECT to_regclass(?)", f'"{self.schema}".{table}')
        return row is not None and row[0] is not None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def tx(self, *, read: bool = False) -> AsyncIterator[Tx]:
        """One transaction on a pooled connection: committed if the block ends, else rolled back.

        Writes run at READ COMMITTED: a conditional update re-checks its WHERE on the row a
        concurrent writer just committed, so the loser's says no. A ``read`` is REPEATABLE READ,
        so its statements agree with each other."""
        isolation = "repeatable_read" if read else "read_committed"
        pool = self._pool
        if pool is None:
            raise self.errors.failed(f"{self.errors.what} at {self.url} is not open")
        try:
            async with pool.acquire() as conn, conn.transaction(isolation=isolation, readonly=read):
                yield PgTx(conn)
        except _FOREIGN as exc:
            raise pg_error(exc, self.url, self.errors) from exc

    async def one(self, sql: str, *args: Any) -> Any:
        async with self.tx() as tx:
            return await tx.fetchone(sql, *args)

    async def all(self, sql: str, *args: Any) -> list[Any]:
        async with self.tx() as tx:
            return await tx.fetchall(sql, *args)
