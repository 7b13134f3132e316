"""The trust database in SQLite: the embedded default, one trust-server process per file.

One aiosqlite connection (``nodes.sql.SqliteConn``): WAL journal,
``synchronous=FULL`` so a commit survives a power cut, foreign keys on, every
unit of work one ``BEGIN IMMEDIATE ... COMMIT``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from protocol.errors import ConfigError
from protocol.records import Release

from .sql import SqliteConn, SqliteReplies
from .trust_db import (
    ACTIVE,
    FAILURES,
    REVOKED,
    SCHEMA_VERSION,
    AttestationRow,
    DeviceRow,
    DeviceUnknown,
    NonceRow,
    TrustDb,
    nonce_refusal,
    release_args,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    tm_node TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    registered_ms INTEGER NOT NULL,
    last_attested_ms INTEGER,
    last_status TEXT NOT NULL DEFAULT '',
    consecutive_failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS releases (
    digest BLOB PRIMARY KEY,  -- of the signed record: the same record is stored once
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    code BLOB NOT NULL,
    static BLOB NOT NULL,
    withdrawn INTEGER NOT NULL,
    issued_ms INTEGER NOT NULL,
    signed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BLOB PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash BLOB NOT NULL,
    issued_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER
);
CREATE TABLE IF NOT EXISTS attestations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash BLOB NOT NULL,
    nonce BLOB NOT NULL UNIQUE REFERENCES nonces (nonce),
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    verdict BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    granted_ms INTEGER
);
CREATE INDEX IF NOT EXISTS attestations_by_device ON attestations (device, at_ms);
CREATE TABLE IF NOT EXISTS revocations (
    number INTEGER PRIMARY KEY,
    crl BLOB NOT NULL,
    installed_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS platform_certs (
    fingerprint BLOB PRIMARY KEY,
    serial INTEGER NOT NULL,
    cert BLOB NOT NULL,
    first_seen_ms INTEGER NOT NULL
);
"""
DEVICE_COLUMNS = "device, tm_node, status, registered_ms, last_attested_ms, last_status, consecutive_failures"
INSERT_RELEASE = (
    "INSERT INTO releases (digest, kind, name, version, code, static, withdrawn, issued_ms, signed)"
    " VALUES ({}) ON CONFLICT (digest) DO NOTHING"
)


class SqliteTrustDb(TrustDb):
    """The trust database file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = SqliteConn(self.path, FAILURES)
        self.replies = SqliteReplies(self._conn)

    async def open(self) -> None:
        await self._conn.open(SCHEMA, SCHEMA_VERSION)

    async def close(self) -> None:
        await self._conn.close()

    async def seed(
        self, devices: Iterable[tuple[str, str]], releases: Iterable[tuple[Release, bytes]], now_ms: int
    ) -> None:
        async with self._conn.tx() as db:
            await db.executemany(
                "INSERT INTO devices (device, tm_node, status, registered_ms) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device) DO NOTHING",
                [(device, tm_node, ACTIVE, now_ms) for device, tm_node in devices],
            )
            await db.executemany(
                INSERT_RELEASE.format(", ".join("?" * 9)), [release_args(r, b) for r, b in releases]
            )

    async def device(self, device: str) -> DeviceRow | None:
        row = await self._conn.one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device = ?", (device,))
        return DeviceRow(*row) if row else None

    async def set_device_status(self, device: str, status: str) -> None:
        if status not in (ACTIVE, REVOKED):
            raise ConfigError(f"device status must be {ACTIVE!r} or {REVOKED!r}, not {status!r}")
        async with self._conn.tx() as db:
            cur = await db.execute("UPDATE devices SET status = ? WHERE device = ?", (status, device))
            if cur.rowcount != 1:
                raise DeviceUnknown(f"device {device} is not registered with the trust-server")

    async def add_release(self, release: Release, blob: bytes) -> bool:
        async with self._conn.tx() as db:
            cur = await db.execute(INSERT_RELEASE.format(", ".join("?" * 9)), release_args(release, blob))
            return cur.rowcount == 1

    async def releases(self) -> list[Release]:
        rows = await self._conn.all(
            "SELECT kind, name, version, code, static, withdrawn, issued_ms FROM"
            " releases ORDER BY issued_ms, withdrawn"
        )
        return [Release(k, n, v, c, s, bool(w), t) for k, n, v, c, s, w, t in rows]

    async def issue_nonce(
        self, nonce: bytes, device: str, intent_hash: bytes, issued_ms: int, expires_ms: int
    ) -> None:
        async with self._conn.tx() as db:
            await db.execute(
                "INSERT INTO nonces (nonce, device, intent_hash, issued_ms,"
                " expires_ms) VALUES (?, ?, ?, ?, ?)",
                (nonce, device, intent_hash, issued_ms, expires_ms),
            )

    async def consume_nonce(self, nonce: bytes, device: str, now_ms: int) -> NonceRow:
        async with self._conn.tx() as db:
            async with db.execute(
                "UPDATE nonces SET used_ms = ? WHERE nonce = ? AND device = ? AND used_ms IS NULL"
                " AND expires_ms >= ? RETURNING intent_hash, issued_ms, expires_ms",
                (now_ms, nonce, device, now_ms),
            ) as cur:
                won = await cur.fetchone()
            if won is not None:
                return NonceRow(nonce, device, *won)
            async with db.execute(
                "SELECT device, expires_ms, used_ms FROM nonces WHERE nonce = ?", (nonce,)
            ) as cur:
                held = await cur.fetchone()
        raise nonce_refusal(held, device, now_ms)

    async def prune_nonces(self, now_ms: int, limit: int = -1) -> int:
        async with self._conn.tx() as db:
            cur = await db.execute(
                "DELETE FROM nonces WHERE rowid IN (SELECT rowid FROM nonces "
                "WHERE used_ms IS NULL AND expires_ms < ? LIMIT ?)",
                (now_ms, limit),
            )
            return cur.rowcount

    async def record_attestation(
        self, nonce: NonceRow, status: str, reason: str, verdict: bytes, at_ms: int, passed: bool
    ) -> int:
        async with self._conn.tx() as db:
            cur = await db.execute(
                "INSERT INTO attestations (device, intent_hash, nonce, status, reason, verdict, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (nonce.device, nonce.intent_hash, nonce.nonce, status, reason, verdict, at_ms),
            )
            attestation_id = cur.lastrowid
            await db.execute(
                "UPDATE devices SET last_attested_ms = ?, last_status = ?, consecutive_failures ="
                " CASE WHEN ? THEN 0 ELSE consecutive_failures + 1 END WHERE device = ?",
                (at_ms, status, passed, nonce.device),
            )
        assert attestation_id is not None
        return attestation_id

    async def mark_granted(self, attestation_id: int, at_ms: int) -> None:
        async with self._conn.tx() as db:
            await db.execute("UPDATE attestations SET granted_ms = ? WHERE id = ?", (at_ms, attestation_id))

    async def attestations(self, device: str) -> list[AttestationRow]:
        rows = await self._conn.all(
            "SELECT id, device, intent_hash, nonce, status, reason, verdict, at_ms, granted_ms"
            " FROM attestations WHERE device = ? ORDER BY id",
            (device,),
        )
        return [AttestationRow(*row) for row in rows]

    async def note_platform(self, fingerprint: bytes, serial: int, cert: bytes, now_ms: int) -> None:
        async with self._conn.tx() as db:
            await db.execute(
                "INSERT INTO platform_certs (fingerprint, serial, cert, first_seen_ms) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (fingerprint) DO NOTHING",
                (fingerprint, serial, cert, now_ms),
            )

    async def platform_serial(self, fingerprint: bytes) -> int | None:
        row = await self._conn.one("SELECT serial FROM platform_certs WHERE fingerprint = ?", (fingerprint,))
        return int(row[0]) if row else None

    async def crl(self) -> tuple[int, bytes] | None:
        row = await self._conn.one("SELECT number, crl FROM revocations ORDER BY number DESC LIMIT 1")
        return (int(row[0]), bytes(row[1])) if row else None

    async def store_crl(self, number: int, crl: bytes, now_ms: int) -> None:
        async with self._conn.tx() as db:
            await db.execute(
                "INSERT INTO revocations (number, crl, installed_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (number) DO NOTHING",
                (number, crl, now_ms),
            )
