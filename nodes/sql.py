"""Where a role's database lives, and what its SQLite stores share.

A database is named by a URL: ``postgresql://user@host:port/db`` for
PostgreSQL (replicas of a role share it), a file path or ``sqlite:///path`` for
the embedded SQLite default (one process). PostgreSQL URLs may carry
``?trustpay_schema=PREFIX``: each role keeps its tables in its own schema,
``PREFIX_ledger`` and ``PREFIX_trust`` (default prefix ``trustpay``), so both
roles can share one database and tests on one database stay apart.

The SQLite half of the storage lives here too: one aiosqlite connection per
store (its own thread, so no query blocks the loop), every unit of work one
``BEGIN IMMEDIATE ... COMMIT`` under a lock, and the reply log
(:class:`nodes.replies.Replies`) as a ``replies`` table. The PostgreSQL half
is ``nodes.sql_pg``, imported only when a URL asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
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


class SqliteConn:
    """One aiosqlite connection with its lock: a store's SQLite connection, shared with its reply log."""

    def __init__(self, path: Path, errors: Failures, *, readonly: bool = False, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.errors = errors
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self, schema: str, version: int) -> None:
        """Connect; a writer also creates ``schema`` (idempotent) and stamps ``version``.

        An older or newer schema is refused: provisioning again is the upgrade path.
        """
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
                    f"BEGIN IMMEDIATE;\n{schema}\n{REPLIES_SQLITE}\nPRAGMA user_version = {version};\nCOMMIT;"
                )
        except sqlite3.Error as exc:
            await db.close()
            raise sqlite_error(exc, self.path, self.errors) from exc
        self._db = db

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
    async def tx(self, mode: str = "IMMEDIATE") -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: commits if the block ends, rolls back whatever"
        " else happens (even cancellation)."""
        db = self._db
        if db is None:
            raise self.errors.failed(f"{self.errors.what} {self.path} is not open")
        async with self._lock:
            try:
                await db.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise sqlite_error(exc, self.path, self.errors) from exc
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                    await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise sqlite_error(exc, self.path, self.errors) from exc
                raise

    async def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """One read statement on its own (SQLite runs it as its own transaction)."""
        return next(iter(await self.all(sql, params)), None)

    async def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        db = self._db
        if db is None:
            raise self.errors.failed(f"{self.errors.what} {self.path} is not open")
        async with self._lock:
            try:
                return list(await db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise sqlite_error(exc, self.path, self.errors) from exc


# The reply log of a role's replicas (nodes.replies): a row per (sender, message id); a NULL frame is a
# request held but not yet answered. A claim is one conditional upsert, so two claimants never both win.
REPLIES_SQLITE = """
CREATE TABLE IF NOT EXISTS replies (
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    holder TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    topic TEXT NOT NULL DEFAULT '',
    frame BLOB,
    PRIMARY KEY (sender, message_id)
) STRICT;
CREATE INDEX IF NOT EXISTS replies_by_age ON replies (claimed_ms);
"""
CLAIM_SQL = (
    "INSERT INTO replies (sender, message_id, holder, claimed_ms)"
    " VALUES ({0}, {1}, {2}, {3}) "
    "ON CONFLICT (sender, message_id) DO UPDATE SET holder = excluded.holder,"
    " claimed_ms = excluded.claimed_ms "
    "WHERE replies.frame IS NULL AND replies.claimed_ms <= excluded.claimed_ms - {4} RETURNING holder"
)
HELD_SQL = "SELECT topic, frame FROM replies WHERE sender = {0} AND message_id = {1}"
ANSWER_SQL = (
    "INSERT INTO replies (sender, message_id, holder, claimed_ms, topic, frame) "
    "VALUES ({0}, {1}, '', {2}, {3}, {4}) "
    "ON CONFLICT (sender, message_id) DO UPDATE SET topic = excluded.topic, frame = excluded.frame"
)


def held_claim(row: Any) -> Claim:
    """What a claim that did not win finds: the stored answer, or a holder still at work."""
    if row is not None and row[1] is not None:
        return Claim(ANSWERED, str(row[0]), bytes(row[1]))
    return Claim(BUSY)


class SqliteReplies:
    """:class:`nodes.replies.Replies` in a store's SQLite database (its ``replies`` table)."""

    def __init__(self, conn: SqliteConn, lease_ms: int = LEASE_MS) -> None:
        self._conn = conn
        self.lease_ms = lease_ms

    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim:
        async with self._conn.tx() as db:
            async with db.execute(
                CLAIM_SQL.format("?", "?", "?", "?", "?"), (sender, message_id, holder, now_ms, self.lease_ms)
            ) as cur:
                if await cur.fetchone() is not None:
                    return Claim(NEW)
            async with db.execute(HELD_SQL.format("?", "?"), (sender, message_id)) as cur:
                return held_claim(await cur.fetchone())

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None:
        async with self._conn.tx() as db:
            await db.execute(
                ANSWER_SQL.format("?", "?", "?", "?", "?"), (sender, message_id, now_ms, topic, frame)
            )

    async def prune(self, before_ms: int, limit: int) -> int:
        async with self._conn.tx() as db:
            cur = await db.execute(
                "DELETE FROM replies WHERE rowid IN (SELECT rowid FROM replies WHERE claimed_ms < ? LIMIT ?)",
                (before_ms, limit),
            )
            return cur.rowcount
