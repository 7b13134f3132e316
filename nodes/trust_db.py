"""The trust-server's database: devices, reference values, nonces, attestations, revocations.

Everything the verifier must remember lives here and nowhere else, so several
trust-server replicas (sharing load through ``$share`` subscriptions) run on
one PostgreSQL database: a nonce issued by one replica is consumed by
whichever replica gets the evidence, and consumption is a single conditional
``UPDATE ... RETURNING``, so exactly one consumer wins.

One implementation, its SQL written once (``nodes.sql.Tx``), on the back end
the database URL names (``nodes.sql.parse_db_url``): SQLite
(``nodes.trust_db_sqlite``, the embedded default for one process) or
PostgreSQL (``nodes.trust_db_pg``; at READ COMMITTED a second replica consuming
the same nonce waits for the first to commit, re-checks the ``WHERE`` on the
committed row and gets nothing). Callers see this interface, typed rows and
typed errors; a driver's own error never gets past the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError, Rejected, TrustpayError
from protocol.records import Release, record_hash

from .sql import POSTGRESQL, Conn, DbUrl, Failures, SqlReplies, parse_db_url, write

SCHEMA_VERSION = 2  # 2: nonces and attestations bind the payment's intent hash
ACTIVE, REVOKED = "active", "revoked"


class TrustDbError(TrustpayError):
    """The trust database failed; whatever was being done was rolled back."""

    code = "trust_db"


class TrustDbBusy(TrustDbError):
    code = "trust_db_busy"


class TrustDbConflict(TrustDbError):
    """A key or constraint said no: another writer (a replica) got there first."""

    code = "trust_db_conflict"


class TrustDbUnavailable(TrustDbError):
    """The database cannot be reached or opened."""

    code = "trust_db_unavailable"


FAILURES = Failures("the trust database", TrustDbError, TrustDbBusy, TrustDbConflict, TrustDbUnavailable)


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


# DDL for both back ends: $int, $blob, ... are the dialect's (nodes.sql.Dialect)
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    tm_node TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    registered_ms $int NOT NULL,
    last_attested_ms $int,
    last_status TEXT NOT NULL DEFAULT '',
    consecutive_failures $int NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS releases (
    digest $blob PRIMARY KEY,  -- of the signed record: the same record is stored once
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    code $blob NOT NULL,
    static $blob NOT NULL,
    withdrawn $int NOT NULL,
    issued_ms $int NOT NULL,
    signed $blob NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce $blob PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash $blob NOT NULL,
    issued_ms $int NOT NULL,
    expires_ms $int NOT NULL,
    used_ms $int
);
CREATE TABLE IF NOT EXISTS attestations (
    id $identity,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash $blob NOT NULL,
    nonce $blob NOT NULL UNIQUE REFERENCES nonces (nonce),
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    verdict $blob NOT NULL,
    at_ms $int NOT NULL,
    granted_ms $int
);
CREATE INDEX IF NOT EXISTS attestations_by_device ON attestations (device, at_ms);
CREATE TABLE IF NOT EXISTS revocations (
    number $int PRIMARY KEY,
    crl $blob NOT NULL,
    installed_ms $int NOT NULL
);
CREATE TABLE IF NOT EXISTS platform_certs (
    fingerprint $blob PRIMARY KEY,
    serial $int NOT NULL,
    cert $blob NOT NULL,
    first_seen_ms $int NOT NULL
);
"""
DEVICE_COLUMNS = "device, tm_node, status, registered_ms, last_attested_ms, last_status, consecutive_failures"
INSERT_RELEASE = (
    "INSERT INTO releases (digest, kind, name, version, code, static, withdrawn, issued_ms, signed)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING"
)


class TrustDb:
    """The trust-server's store; ``open`` before use, ``close`` after. ``replies`` is the role's reply log."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.replies = SqlReplies(conn)

    def __str__(self) -> str:
        return str(self._conn)

    async def open(self) -> None:
        """Connect and create the schema if needed (idempotent)."""
        await self._conn.open(SCHEMA, SCHEMA_VERSION, "devices")

    async def close(self) -> None:
        await self._conn.close()

    async def seed(
        self, devices: Iterable[tuple[str, str]], releases: Iterable[tuple[Release, bytes]], now_ms: int
    ) -> None:
        """Register devices (device, trust-module node id) and releases; what is held stays as it is
        (a revoked device stays revoked)."""
        async with self._conn.tx() as tx:
            await tx.executemany(
                "INSERT INTO devices (device, tm_node, status, registered_ms) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device) DO NOTHING",
                [(device, tm_node, ACTIVE, now_ms) for device, tm_node in devices],
            )
            await tx.executemany(INSERT_RELEASE, [release_args(r, b) for r, b in releases])

    async def device(self, device: str) -> DeviceRow | None:
        row = await self._conn.one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device = ?", device)
        return DeviceRow(*row) if row else None

    async def set_device_status(self, device: str, status: str) -> None:
        """Raises DeviceUnknown for a device never registered."""
        if status not in (ACTIVE, REVOKED):
            raise ConfigError(f"device status must be {ACTIVE!r} or {REVOKED!r}, not {status!r}")
        changed = await write(self._conn, "UPDATE devices SET status = ? WHERE device = ?", status, device)
        if changed != 1:
            raise DeviceUnknown(f"device {device} is not registered with the trust-server")

    async def add_release(self, release: Release, blob: bytes) -> bool:
        """Store a verified release record; False when this exact record was already held."""
        return await write(self._conn, INSERT_RELEASE, *release_args(release, blob)) == 1

    async def releases(self) -> list[Release]:
        """Every release record, oldest first; on equal times a withdrawal comes last, so it wins."""
        rows = await self._conn.all(
            "SELECT kind, name, version, code, static, withdrawn, issued_ms FROM releases"
            " ORDER BY issued_ms, withdrawn"
        )
        return [Release(k, n, v, bytes(c), bytes(s), bool(w), t) for k, n, v, c, s, w, t in rows]

    async def issue_nonce(
        self, nonce: bytes, device: str, intent_hash: bytes, issued_ms: int, expires_ms: int
    ) -> None:
        await write(
            self._conn,
            "INSERT INTO nonces (nonce, device, intent_hash, issued_ms, expires_ms) VALUES (?, ?, ?, ?, ?)",
            nonce,
            device,
            intent_hash,
            issued_ms,
            expires_ms,
        )

    async def consume_nonce(self, nonce: bytes, device: str, now_ms: int) -> NonceRow:
        """Mark ``nonce`` used by ``device`` now, or raise why it cannot be (single use, atomic)."""
        async with self._conn.tx() as tx:
            won = await tx.fetchone(
                "UPDATE nonces SET used_ms = ? WHERE nonce = ? AND device = ? AND used_ms IS NULL"
                " AND expires_ms >= ? RETURNING intent_hash, issued_ms, expires_ms",
                now_ms,
                nonce,
                device,
                now_ms,
            )
            if won is not None:
                return NonceRow(nonce, device, bytes(won[0]), won[1], won[2])
            held = await tx.fetchone("SELECT device, expires_ms, used_ms FROM nonces WHERE nonce = ?", nonce)
        raise nonce_refusal(None if held is None else tuple(held), device, now_ms)

    async def prune_nonces(self, now_ms: int, limit: int = -1) -> int:
        """Forget up to ``limit`` (-1: all) challenges that expired unanswered; answered ones
        stay with their attestation. A limit keeps each run of the periodic prune short."""
        expired = "SELECT nonce FROM nonces WHERE used_ms IS NULL AND expires_ms < ?"
        if limit < 0:
            return await write(self._conn, f"DELETE FROM nonces WHERE nonce IN ({expired})", now_ms)
        return await write(
            self._conn, f"DELETE FROM nonces WHERE nonce IN ({expired} LIMIT ?)", now_ms, limit
        )

    async def record_attestation(
        self, nonce: NonceRow, status: str, reason: str, verdict: bytes, at_ms: int, passed: bool
    ) -> int:
        """Store one attestation and update the device's summary in the same transaction; its id."""
        async with self._conn.tx() as tx:
            row = await tx.fetchone(
                "INSERT INTO attestations (device, intent_hash, nonce, status, reason, verdict, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                nonce.device, nonce.intent_hash, nonce.nonce, status, reason, verdict, at_ms,
            )  # fmt: skip
            await tx.execute(
                "UPDATE devices SET last_attested_ms = ?, last_status = ?, consecutive_failures ="
                " CASE WHEN ? THEN 0 ELSE consecutive_failures + 1 END WHERE device = ?",
                at_ms,
                status,
                passed,
                nonce.device,
            )
        return int(row[0])

    async def mark_granted(self, attestation_id: int, at_ms: int) -> None:
        await write(self._conn, "UPDATE attestations SET granted_ms = ? WHERE id = ?", at_ms, attestation_id)

    async def attestations(self, device: str) -> list[AttestationRow]:
        rows = await self._conn.all(
            "SELECT id, device, intent_hash, nonce, status, reason, verdict, at_ms, granted_ms"
            " FROM attestations WHERE device = ? ORDER BY id",
            device,
        )
        return [
            AttestationRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4], r[5], bytes(r[6]), r[7], r[8])
            for r in rows
        ]

    async def note_platform(self, fingerprint: bytes, serial: int, cert: bytes, now_ms: int) -> None:
        """Remember a platform certificate we have held, so C1 can tell 'superseded' from 'unknown'."""
        await write(
            self._conn,
            "INSERT INTO platform_certs (fingerprint, serial, cert, first_seen_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (fingerprint) DO NOTHING",
            fingerprint,
            serial,
            cert,
            now_ms,
        )

    async def platform_serial(self, fingerprint: bytes) -> int | None:
        row = await self._conn.one("SELECT serial FROM platform_certs WHERE fingerprint = ?", fingerprint)
        return int(row[0]) if row else None

    async def crl(self) -> tuple[int, bytes] | None:
        """The newest revocation list held: (number, signed bytes)."""
        row = await self._conn.one("SELECT number, crl FROM revocations ORDER BY number DESC LIMIT 1")
        return (int(row[0]), bytes(row[1])) if row else None

    async def store_crl(self, number: int, crl: bytes, now_ms: int) -> None:
        await write(
            self._conn,
            "INSERT INTO revocations (number, crl, installed_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (number) DO NOTHING",
            number,
            crl,
            now_ms,
        )


def trust_db_at(url: str | Path | DbUrl) -> TrustDb:
    """The trust database at ``url`` (see ``nodes.sql.parse_db_url``), not yet open."""
    where = parse_db_url(url)
    if where.kind == POSTGRESQL:
        from .trust_db_pg import PgTrustDb  # asyncpg loads only when a deployment asks for PostgreSQL

        return PgTrustDb(where)
    from .trust_db_sqlite import SqliteTrustDb

    assert where.path is not None
    return SqliteTrustDb(where.path)


def nonce_refusal(held: Any, device: str, now_ms: int) -> NonceRejected:
    """Why a nonce could not be consumed, from its row (owner, expires_ms, used_ms) or None."""
    if held is None:
        return NonceUnknown("this nonce was never issued (or was pruned): request a new challenge (C2)")
    owner, expires_ms, used_ms = held
    if owner != device:
        return NonceWrongDevice(f"this nonce was issued to device {owner}, not to {device}")
    if used_ms is not None:
        return NonceUsed(f"this nonce was already used at {used_ms} ms: request a new challenge (C2)")
    return NonceExpired(
        f"this nonce expired at {expires_ms} ms, {now_ms - expires_ms} ms before the evidence arrived: "
        "request a new challenge and answer it within its lifetime"
    )


def release_args(release: Release, blob: bytes) -> tuple[Any, ...]:
    return (
        record_hash(blob),
        release.kind,
        release.name,
        release.version,
        release.code,
        release.static,
        int(release.withdrawn),
        release.issued_ms,
        blob,
    )
