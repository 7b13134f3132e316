"""An interim reply log for replicas on one machine: one SQLite file per role.

The reply log's home is the role's own database (``nodes.replies`` describes the
contract; the SQLite and PostgreSQL implementations in the roles' storage replace
this at merge time, see ``ops.roles.replies_for``). Until then, replicas started
by ``trustpay up --replicas`` share this file in the deployment's ``platform/``
directory. Each claim is one ``BEGIN IMMEDIATE`` transaction, so two replicas
never both get ``"new"`` for one request.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from protocol.errors import TransportError

from .replies import ANSWERED, BUSY, LEASE_MS, NEW, Claim

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    sender TEXT NOT NULL,
    message_id BLOB NOT NULL,
    holder TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    topic TEXT NOT NULL DEFAULT '',
    frame BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (sender, message_id)
) WITHOUT ROWID
"""


class FileReplies:
    """The :class:`nodes.replies.Replies` contract on a SQLite file the replicas share."""

    def __init__(self, path: Path, lease_ms: int = LEASE_MS) -> None:
        self.path = path
        self.lease_ms = lease_ms
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement at a time on the shared connection

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # an answer lost in a power cut is only re-done
            db.execute(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, work: str, *args: object) -> Claim | int | None:
        try:
            return await asyncio.to_thread(self._locked, work, *args)
        except sqlite3.Error as exc:
            raise TransportError(f"reply log {self.path}: {exc}") from exc

    def _locked(self, work: str, *args: object) -> Claim | int | None:
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = getattr(self, work)(db, *args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result  # type: ignore[no-any-return]

    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim:
        claim = await self._run("_claim", sender, message_id, holder, now_ms)
        assert isinstance(claim, Claim)
        return claim

    def _claim(
        self, db: sqlite3.Connection, sender: str, message_id: bytes, holder: str, now_ms: int
    ) -> Claim:
        row = db.execute(
            "SELECT claimed_ms, topic, frame FROM replies WHERE sender = ? AND message_id = ?",
            (sender, message_id),
        ).fetchone()
        if row is not None and row[2]:
            return Claim(ANSWERED, row[1], bytes(row[2]))
        if row is not None and now_ms - row[0] < self.lease_ms:
            return Claim(BUSY)
        db.execute(
            "INSERT OR REPLACE INTO replies (sender, message_id, holder, claimed_ms) VALUES (?, ?, ?, ?)",
            (sender, message_id, holder, now_ms),
        )
        return Claim(NEW)

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None:
        await self._run("_answer", sender, message_id, topic, frame, now_ms)

    def _answer(
        self, db: sqlite3.Connection, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int
    ) -> None:
        db.execute(
            "INSERT INTO replies (sender, message_id, holder, claimed_ms, topic, frame) "
            "VALUES (?, ?, '', ?, ?, ?) ON CONFLICT (sender, message_id) "
            "DO UPDATE SET topic = excluded.topic, frame = excluded.frame",
            (sender, message_id, now_ms, topic, frame),
        )

    async def prune(self, before_ms: int, limit: int) -> int:
        pruned = await self._run("_prune", before_ms, limit)
        assert isinstance(pruned, int)
        return pruned

    def _prune(self, db: sqlite3.Connection, before_ms: int, limit: int) -> int:
        cursor = db.execute(
            "DELETE FROM replies WHERE (sender, message_id) IN "
            "(SELECT sender, message_id FROM replies WHERE claimed_ms < ? LIMIT ?)",
            (before_ms, limit),
        )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
