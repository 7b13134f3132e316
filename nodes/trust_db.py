"""The trust-server's database: devices, reference values, nonces, attestations, revocations.

Everything the verifier must remember lives here and nowhere else, so several
trust-server replicas (sharing load through ``$share`` subscriptions) can later
run on one PostgreSQL database with a sibling of this class: a nonce issued by
one replica is consumed by whichever replica gets the evidence, and
consumption is a single conditional ``UPDATE``, so exactly one consumer wins.

This implementation is SQLite through aiosqlite (no blocking call on the event
loop): WAL journal, ``synchronous=FULL`` so a commit survives a power cut,
foreign keys on. One connection serialises statements but not transactions, so
every unit of work takes ``_lock`` and runs as ``BEGIN IMMEDIATE ... COMMIT``.
The SQL sticks to what PostgreSQL also accepts (``RETURNING``, ``ON CONFLICT``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from protocol.errors import ConfigError, Rejected
from protocol.records import Release, record_hash

SCHEMA_VERSION = 2  # 2: nonces and attestations bind the payment's intent hash
ACTIVE, REVOKED = "active", "revoked"

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


class NonceRejected(Rejected):
    """Evidence came with a nonce that cannot be consumed; the terminal must ask for a new one."""

    code = "nonce_rejected"
    alarm = False  # a slow terminal or a retry, not by itself an attack


class NonceUnknown(NonceRejected):
    code = "nonce_unknown"


class NonceExpired(NonceRejected):
    code = "nonce_expired"


class NonceUsed(NonceRejected):
    code = "nonce_used"


class NonceWrongDevice(NonceRejected):
    code = "nonce_wrong_device"
    alarm = True  # one device presenting another's challenge is not noise


class DeviceUnknown(Rejected):
    code = "device_unknown"


@dataclass(frozen=True)
class DeviceRow:
    device: str
    tm_node: str
    status: str
    registered_ms: int
    last_attested_ms: int | None
    last_status: str
    consecutive_failures: int


@dataclass(frozen=True)
class NonceRow:
    nonce: bytes
    device: str
    intent_hash: bytes
    issued_ms: int
    expires_ms: int


@dataclass(frozen=True)
class AttestationRow:
    id: int
    device: str
    intent_hash: bytes
    nonce: bytes
    status: str
    reason: str
    verdict: bytes
    at_ms: int
    granted_ms: int | None


class TrustDb:
    """The trust-server's SQL, behind async methods; ``open`` before use, ``close`` after."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # -- life cycle ------------------------------------------------------------
    async def open(self) -> None:
        """Connect and create the schema if needed (idempotent)."""
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)  # we write BEGIN/COMMIT ourselves
        except Exception as exc:  # sqlite3.Error, OSError: a path or permission problem
            raise ConfigError(f"cannot open the trust database {self.path}: {exc}") from exc
        self._db = db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")  # another process (a replica, an ops tool) may hold it
        version = (await self._one("PRAGMA user_version"))[0]
        if version > SCHEMA_VERSION:
            await self.close()
            raise ConfigError(
                f"trust database {self.path} has schema {version}, newer than this server's "
                f"{SCHEMA_VERSION}: upgrade trustpay"
            )
        if 0 < version < SCHEMA_VERSION:
            await self.close()
            raise ConfigError(
                f"trust database {self.path} has the older schema {version}; its nonces bind orders, "
                "not intents: provision the deployment again"
            )
        async with self._tx() as tx:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    await tx.execute(statement)
            await tx.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ConfigError(f"trust database {self.path} is not open")
        return self._db

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _one(self, sql: str, *args: Any) -> Any:
        async with self._lock, self._conn().execute(sql, args) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        async with self._lock, self._conn().execute(sql, args) as cur:
            return list(await cur.fetchall())

    # -- devices -----------------------------------------------------------------
    async def seed(
        self, devices: Iterable[tuple[str, str]], releases: Iterable[tuple[Release, bytes]], now_ms: int
    ) -> None:
        """Register devices (device, trust-module node id) and releases; what is held stays as it is."""
        async with self._tx() as tx:
            for device, tm_node in devices:
                await tx.execute(
                    "INSERT INTO devices (device, tm_node, status, registered_ms) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (device) DO NOTHING",  # a revoked device stays revoked
                    (device, tm_node, ACTIVE, now_ms),
                )
            for release, blob in releases:
                await tx.execute(_INSERT_RELEASE, _release_args(release, blob))

    async def device(self, device: str) -> DeviceRow | None:
        row = await self._one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device = ?", device)
        return DeviceRow(*row) if row else None

    async def set_device_status(self, device: str, status: str) -> None:
        if status not in (ACTIVE, REVOKED):
            raise ConfigError(f"device status must be {ACTIVE!r} or {REVOKED!r}, not {status!r}")
        async with self._tx() as tx:
            cur = await tx.execute("UPDATE devices SET status = ? WHERE device = ?", (status, device))
            if cur.rowcount != 1:
                raise DeviceUnknown(f"device {device} is not registered with the trust-server")

    # -- releases ----------------------------------------------------------------
    async def add_release(self, release: Release, blob: bytes) -> bool:
        """Store a verified release record; False when this exact record was already held."""
        async with self._tx() as tx:
            cur = await tx.execute(_INSERT_RELEASE, _release_args(release, blob))
            return cur.rowcount == 1

    async def releases(self) -> list[Release]:
        """Every release record, oldest first; on equal times a withdrawal comes last, so it wins."""
        rows = await self._all(
            "SELECT kind, name, version, code, static, withdrawn, issued_ms FROM releases"
            " ORDER BY issued_ms, withdrawn"
        )
        return [Release(k, n, v, c, s, bool(w), t) for k, n, v, c, s, w, t in rows]

    # -- nonces ------------------------------------------------------------------
    async def issue_nonce(
        self, nonce: bytes, device: str, intent_hash: bytes, issued_ms: int, expires_ms: int
    ) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO nonces (nonce, device, intent_hash, issued_ms, expires_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (nonce, device, intent_hash, issued_ms, expires_ms),
            )

    async def consume_nonce(self, nonce: bytes, device: str, now_ms: int) -> NonceRow:
        """Mark ``nonce`` used by ``device`` now, or raise why it cannot be (single use, atomic)."""
        async with self._tx() as tx:
            async with tx.execute(
                "UPDATE nonces SET used_ms = ? WHERE nonce = ? AND device = ? AND used_ms IS NULL"
                " AND expires_ms >= ? RETURNING intent_hash, issued_ms, expires_ms",
                (now_ms, nonce, device, now_ms),
            ) as cur:
                won = await cur.fetchone()
            if won is not None:
                return NonceRow(nonce, device, *won)
            async with tx.execute(
                "SELECT device, expires_ms, used_ms FROM nonces WHERE nonce = ?", (nonce,)
            ) as cur:
                held = await cur.fetchone()
        if held is None:
            raise NonceUnknown("this nonce was never issued (or was pruned): request a new challenge (C2)")
        owner, expires_ms, used_ms = held
        if owner != device:
            raise NonceWrongDevice(f"this nonce was issued to device {owner}, not to {device}")
        if used_ms is not None:
            raise NonceUsed(f"this nonce was already used at {used_ms} ms: request a new challenge (C2)")
        raise NonceExpired(
            f"this nonce expired at {expires_ms} ms, {now_ms - expires_ms} ms before the evidence arrived: "
            "request a new challenge and answer it within its lifetime"
        )

    async def prune_nonces(self, now_ms: int, limit: int = -1) -> int:
        """Forget up to ``limit`` (-1: all) challenges that expired unanswered; answered ones
        stay with their attestation. A limit keeps each run of the periodic prune short."""
        async with self._tx() as tx:
            cur = await tx.execute(
                "DELETE FROM nonces WHERE rowid IN (SELECT rowid FROM nonces "
                "WHERE used_ms IS NULL AND expires_ms < ? LIMIT ?)",
                (now_ms, limit),
            )
            return cur.rowcount

    # -- attestations ---------------------------------------------------------------
    async def record_attestation(
        self, nonce: NonceRow, status: str, reason: str, verdict: bytes, at_ms: int, passed: bool
    ) -> int:
        """Store one attestation and update the device's summary in the same transaction."""
        async with self._tx() as tx:
            cur = await tx.execute(
                "INSERT INTO attestations (device, intent_hash, nonce, status, reason, verdict, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (nonce.device, nonce.intent_hash, nonce.nonce, status, reason, verdict, at_ms),
            )
            attestation_id = cur.lastrowid
            await tx.execute(
                "UPDATE devices SET last_attested_ms = ?, last_status = ?, consecutive_failures ="
                " CASE WHEN ? THEN 0 ELSE consecutive_failures + 1 END WHERE device = ?",
                (at_ms, status, passed, nonce.device),
            )
        assert attestation_id is not None
        return attestation_id

    async def mark_granted(self, attestation_id: int, at_ms: int) -> None:
        async with self._tx() as tx:
            await tx.execute("UPDATE attestations SET granted_ms = ? WHERE id = ?", (at_ms, attestation_id))

    async def attestations(self, device: str) -> list[AttestationRow]:
        rows = await self._all(
            "SELECT id, device, intent_hash, nonce, status, reason, verdict, at_ms, granted_ms"
            " FROM attestations WHERE device = ? ORDER BY id",
            device,
        )
        return [AttestationRow(*row) for row in rows]

    # -- platform certificates and revocations -----------------------------------------
    async def note_platform(self, fingerprint: bytes, serial: int, cert: bytes, now_ms: int) -> None:
        """Remember a platform certificate we have held, so C1 can tell 'superseded' from 'unknown'."""
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO platform_certs (fingerprint, serial, cert, first_seen_ms) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (fingerprint) DO NOTHING",
                (fingerprint, serial, cert, now_ms),
            )

    async def platform_serial(self, fingerprint: bytes) -> int | None:
        row = await self._one("SELECT serial FROM platform_certs WHERE fingerprint = ?", fingerprint)
        return int(row[0]) if row else None

    async def crl(self) -> tuple[int, bytes] | None:
        """The newest revocation list held: (number, signed bytes)."""
        row = await self._one("SELECT number, crl FROM revocations ORDER BY number DESC LIMIT 1")
        return (int(row[0]), bytes(row[1])) if row else None

    async def store_crl(self, number: int, crl: bytes, now_ms: int) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO revocations (number, crl, installed_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (number) DO NOTHING",
                (number, crl, now_ms),
            )


_DEVICE_COLUMNS = (
    "device, tm_node, status, registered_ms, last_attested_ms, last_status, consecutive_failures"
)
_INSERT_RELEASE = (
    "INSERT INTO releases (digest, kind, name, version, code, static, withdrawn, issued_ms, signed)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING"
)


def _release_args(release: Release, blob: bytes) -> tuple[Any, ...]:
    return (
        record_hash(blob),
        release.kind,
        release.name,
        release.version,
        release.code,
        release.static,
        release.withdrawn,
        release.issued_ms,
        blob,
    )
