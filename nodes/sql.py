"""Where a role's database lives, and what its SQLite stores share.

A database is named by a URL: ``postgresql://user@host:port/db`` for
PostgreSQL (replicas of a role share it), a file path or ``sqlite:///path`` for
the embedded SQLite default (one process). PostgreSQL URLs may carry
``?trustpay_schema=PREFIX``: each role keeps its tables in its own schema,
``PREFIX_ledger`` and ``PREFIX_trust`` (default prefix ``trustpay``), so both
roles can share one database and tests on one database stay apart.

The stores (``nodes.ledger``, ``nodes.trust_db``) and the reply log
(:class:`SqlReplies`) are written once, against :class:`Tx`: SQL with ``?``
placeholders, DDL with ``$int``/``$blob``/... filled in by the back end's
:class:`Dialect`. The SQLite back end lives here: one aiosqlite connection per
store (its own thread, so no query blocks the loop), every unit of work one
``BEGIN IMMEDIATE ... COMMIT`` under a lock. The PostgreSQL one is
``nodes.sql_pg``, imported only when a URL asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Final, Literal, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosqlite

from protocol.errors import ConfigError, TrustpayError

from .replies import ANSWERED, BUSY, LEASE_MS, NEW, Claim

SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
SCHEMA_PARAM = "trustpay_schema"
DEFAULT_PREFIX = "trustpay"
WAL_ATTEMPTS = 200  # switching a new SQLite file to WAL, while another connection is setting it up
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # becomes part of an SQL identifier: nothing else gets in


@dataclass(frozen=True)
class DbUrl:
    """A parsed database location: a SQLite ``path``, or a PostgreSQL ``dsn`` and schema ``prefix``."""

    kind: Literal["sqlite", "postgresql"]
    path: Path | None = None
    dsn: str = ""
    prefix: str = DEFAULT_PREFIX

    def schema(self, role: str) -> str:
        return f"{self.prefix}_{role}"

    def __str__(self) -> str:
        """For logs and screens: the path, or the URL without a password."""
        if self.path is not None:
            return str(self.path)
        parts = urlsplit(self.dsn)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0] if "@" in parts.netloc else ""
        netloc = f"{user}@{host}" if user else host
        query = "" if self.prefix == DEFAULT_PREFIX else f"{SCHEMA_PARAM}={self.prefix}"
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_db_url(url: str | Path | DbUrl, base: Path | None = None) -> DbUrl:
    """``postgresql://...`` -> PostgreSQL; a path or ``sqlite:///path`` -> SQLite (relative to ``base``)."""
    if isinstance(url, DbUrl):
        return url
    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(text)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == SCHEMA_PARAM]
        prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(
                f"{SCHEMA_PARAM}={prefix!r}: a schema prefix is 1-40 of a-z, 0-9 and"
                f" _, not starting with a digit"
            )
        rest = urlencode([(k, v) for k, v in query if k != SCHEMA_PARAM])
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, rest, ""))
        return DbUrl(POSTGRESQL, dsn=dsn, prefix=prefix)
    if scheme == "sqlite":
        text = text[len("sqlite://") :]
    elif scheme:
        raise ConfigError(
            f"database URL {text!r}: use postgresql://... or a SQLite file path (sqlite:///path)"
        )
    if not text:
        raise ConfigError("the database URL names no SQLite file")
    path = Path(text)
    return DbUrl(SQLITE, path=path if path.is_absolute() or base is None else base / path)


def from_command_line(text: str) -> str:
    """A ``--db`` value checked, with a relative SQLite path made absolute (relative to where
    the command runs, not to the deployment the manifest's paths are relative to)."""
    where = parse_db_url(text)
    return text if where.path is None else str(where.path.absolute())


@dataclass(frozen=True)
class Failures:
    """The typed errors one store raises: a foreign driver error becomes one of these, by cause."""

    what: str  # "the ledger", "the trust database": how the messages name the store
    failed: type[TrustpayError]  # anything else: nothing was changed
    busy: type[TrustpayError]  # another writer held the lock too long
    conflict: type[TrustpayError]  # a key or constraint said no: another writer got there first
    unavailable: type[TrustpayError]  # the database cannot be reached or opened


@dataclass(frozen=True)
class Dialect:
    """What the stores' SQL leaves to the back end: column types in DDL, and how rows are ordered."""

    int: str  # a 64-bit integer column
    blob: str
    strict: str  # after a table's closing parenthesis: SQLite's type checking
    identity: str  # an id column the database numbers
    seq_column: str  # a column that orders rows by insertion, where the table has none of its own
    seq: str  # that order in ORDER BY
    binary: str  # after a TEXT column in ORDER BY: compare bytes, not the locale's collation

    def ddl(self, text: str) -> str:
        return Template(text).substitute(
            int=self.int,
            blob=self.blob,
            strict=self.strict,
            identity=self.identity,
            seq_column=self.seq_column,
        )


SQLITE_DIALECT = Dialect(
    int="INTEGER", blob="BLOB", strict=" STRICT", identity="INTEGER PRIMARY KEY AUTOINCREMENT",
    seq_column="", seq="rowid", binary="",
)  # fmt: skip


class Tx(Protocol):
    """One open transaction; SQL with ``?`` placeholders, driver errors surface at the end of ``tx``."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; how many rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, *args: Any) -> Any: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Any]: ...


class Conn(Protocol):
    """A store's connection (``SqliteConn``, ``nodes.sql_pg.PgConn``): units of work, typed errors only."""

    dialect: Dialect
    readonly: bool

    async def open(self, schema: str, version: int, marker: str) -> bool:
        """Connect; a writer creates ``schema`` (idempotent). A reader opens only a store a writer
        made (its ``marker`` table): False, and nothing open, when there is none."""

    async def close(self) -> None: ...

    def tx(self, *, read: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A write transaction, or a consistent ``read`` of several statements."""

    async def one(self, sql: str, *args: Any) -> Any:
        """One read statement on its own."""

    async def all(self, sql: str, *args: Any) -> list[Any]: ...


def sqlite_error(exc: sqlite3.Error | OSError, where: object, errors: Failures) -> TrustpayError:
    if isinstance(exc, sqlite3.IntegrityError):
        return errors.conflict(
            f"{errors.what} refused a write ({exc}); another writer changed it first, retry"
        )
    text = str(exc)
    if "locked" in text or "busy" in text:
        return errors.busy(
            f"{errors.what} {where} stayed locked by another writer; nothing was changed, retry"
        )
    if isinstance(exc, OSError) or "unable to open" in text:
        return errors.unavailable(f"cannot open {errors.what} {where}: {text}")
    return errors.failed(f"{errors.what} {where} failed: {text}; nothing was changed")


class SqliteTx:
    """:class:`Tx` on an aiosqlite connection inside ``BEGIN ... COMMIT``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._db.execute(sql, args) as cur:
            return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def fetchone(self, sql: str, *args: Any) -> Any:
        async with self._db.execute(sql, args) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._db.execute_fetchall(sql, args))


class SqliteConn:
    """One aiosqlite connection with its lock: a store's SQLite connection, shared with its reply log."""

    dialect = SQLITE_DIALECT

    def __init__(self, path: Path, errors: Failures, *, readonly: bool = False, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.errors = errors
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __str__(self) -> str:
        return str(self.path)

    async def open(self, schema: str, version: int, marker: str) -> bool:
        """Connect; a writer also creates ``schema`` (idempotent) and stamps ``version``; a reader
        finds no store (False) where no file is: a writer creates the file with its tables.

        An older or newer schema is refused: provisioning again is the upgrade path.
        """
        if self.readonly and not await asyncio.to_thread(self.path.is_file):
            return False
        if self.readonly:
            target: str | Path = self.path.absolute().as_uri() + "?mode=ro"
        else:
            target = self.path
        try:
            if not self.readonly:
                await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves, so Python never opens one behind our back
            db = await aiosqlite.connect(
                target, isolation_level=None, timeout=self.busy_timeout_s, uri=self.readonly
            )
        except (sqlite3.Error, OSError) as exc:
            raise sqlite_error(exc, self.path, self.errors) from exc
        try:
            await db.execute("PRAGMA foreign_keys = ON")
            if not self.readonly:
                await self._enter_wal(db)
                await db.execute("PRAGMA synchronous = FULL")  # a commit is on disk before we answer
                async with db.execute("PRAGMA user_version") as cur:
                    held = (await cur.fetchone() or (0,))[0]
                if held not in (0, version):
                    await db.close()
                    raise ConfigError(
                        f"{self.errors.what} {self.path} has schema {held}, not {version}: "
                        "provision the deployment again (or run the trustpay that wrote it)"
                    )
                await db.executescript(
                    f"BEGIN IMMEDIATE;\n{self.dialect.ddl(schema + REPLIES)}\n"
                    f"PRAGMA user_version = {version};\nCOMMIT;"
                )
        except sqlite3.Error as exc:
            await db.close()
            raise sqlite_error(exc, self.path, self.errors) from exc
        self._db = db
        return True

    async def _enter_wal(self, db: aiosqlite.Connection) -> None:
        """WAL journal, so readers (the CLI) never block the server.

        Switching a new file to WAL needs it to itself, and SQLite refuses at once
        ("database is locked", no busy wait) while another connection is in a
        transaction: replicas starting together on one file did, one in 25 here. So
        the switch is retried for up to the busy timeout; once one connection made the
        file WAL (it stays so), the others' switch has nothing left to do.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_timeout_s
        for attempt in range(1, WAL_ATTEMPTS + 1):  # bounded, and by the deadline
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == WAL_ATTEMPTS or loop.time() >= deadline:
                    raise
            await asyncio.sleep(min(0.005 * attempt, 0.1))

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    @asynccontextmanager
    async def tx(self, *, read: bool = False) -> AsyncIterator[Tx]:
        """One transaction: commits if the block ends, rolls back whatever else happens (even
        cancellation). A write takes the write lock up front (a payment reads, then writes what it read)."""
        mode = "DEFERRED" if read else "IMMEDIATE"
        db = self._db
        if db is None:
            raise self.errors.failed(f"{self.errors.what} {self.path} is not open")
        async with self._lock:
            try:
                await db.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise sqlite_error(exc, self.path, self.errors) from exc
            try:
                yield SqliteTx(db)
                await db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                    await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise sqlite_error(exc, self.path, self.errors) from exc
                raise

    async def one(self, sql: str, *args: Any) -> Any:
        """One read statement on its own (SQLite runs it as its own transaction)."""
        return next(iter(await self.all(sql, *args)), None)

    async def all(self, sql: str, *args: Any) -> list[Any]:
        db = self._db
        if db is None:
            raise self.errors.failed(f"{self.errors.what} {self.path} is not open")
        async with self._lock:
            try:
                return list(await db.execute_fetchall(sql, args))
            except sqlite3.Error as exc:
                raise sqlite_error(exc, self.path, self.errors) from exc


async def write(conn: Conn, sql: str, *args: Any) -> int:
    """One statement in a write transaction of its own; how many rows it changed."""
    async with conn.tx() as tx:
        return await tx.execute(sql, *args)


# The reply log of a role's replicas (nodes.replies): a row per (sender, message id); a NULL frame is a
# request held but not yet answered. A claim is one conditional upsert, so two claimants never both win.
REPLIES = """
CREATE TABLE IF NOT EXISTS replies (
    sender TEXT NOT NULL,
    message_id $blob NOT NULL,
    holder TEXT NOT NULL,
    claimed_ms $int NOT NULL,
    topic TEXT NOT NULL DEFAULT '',
    frame $blob,
    PRIMARY KEY (sender, message_id)
)$strict;
CREATE INDEX IF NOT EXISTS replies_by_age ON replies (claimed_ms);
"""
# the casts: PostgreSQL infers no type for a parameter in arithmetic on excluded.*
CLAIM_SQL = (
    "INSERT INTO replies (sender, message_id, holder, claimed_ms) VALUES (?, ?, ?, CAST(? AS {int})) "
    "ON CONFLICT (sender, message_id) DO UPDATE SET holder = excluded.holder,"
    " claimed_ms = excluded.claimed_ms "
    "WHERE replies.frame IS NULL AND replies.claimed_ms <= excluded.claimed_ms - CAST(? AS {int})"
    " RETURNING holder"
)


class SqlReplies:
    """:class:`nodes.replies.Replies` in a store's database (its ``replies`` table)."""

    def __init__(self, conn: Conn, lease_ms: int = LEASE_MS) -> None:
        self._conn = conn
        self.lease_ms = lease_ms
        self._claim = CLAIM_SQL.format(int=conn.dialect.int)

    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim:
        # one statement: a concurrent claim waits on the row, then re-checks the WHERE and gets nothing
        async with self._conn.tx() as tx:
            if await tx.fetchone(self._claim, sender, message_id, holder, now_ms, self.lease_ms) is not None:
                return Claim(NEW)
            row = await tx.fetchone(
                "SELECT topic, frame FROM replies WHERE sender = ? AND message_id = ?", sender, message_id
            )
        # what a claim that did not win finds: the stored answer, or a holder still at work
        if row is not None and row[1] is not None:
            return Claim(ANSWERED, str(row[0]), bytes(row[1]))
        return Claim(BUSY)

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None:
        await write(
            self._conn,
            "INSERT INTO replies (sender, message_id, holder, claimed_ms, topic, frame) "
            "VALUES (?, ?, '', ?, ?, ?) "
            "ON CONFLICT (sender, message_id) DO UPDATE SET topic = excluded.topic,"
            " frame = excluded.frame",
            sender, message_id, now_ms, topic, frame,
        )  # fmt: skip

    async def prune(self, before_ms: int, limit: int) -> int:
        return await write(
            self._conn,
            "DELETE FROM replies WHERE (sender, message_id) IN (SELECT sender, message_id FROM replies "
            "WHERE claimed_ms < ? LIMIT ?)",
            before_ms,
            limit,
        )
