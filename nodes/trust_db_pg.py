"""The trust database in PostgreSQL: what trust-server replicas share.

Tables in the schema ``{prefix}_trust``. A nonce is consumed by one
``UPDATE ... WHERE used_ms IS NULL ... RETURNING``: at READ COMMITTED a second
replica consuming the same nonce waits for the first to commit, re-checks the
``WHERE`` on the committed row and gets nothing, so exactly one wins.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.errors import ConfigError
from protocol.records import Release

from .sql import DbUrl
from .sql_pg import POOL_MAX, PgConn, PgReplies
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

ROLE = "trust"
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    tm_node TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    registered_ms BIGINT NOT NULL,
    last_attested_ms BIGINT,
    last_status TEXT NOT NULL DEFAULT '',
    consecutive_failures BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS releases (
    digest BYTEA PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    code BYTEA NOT NULL,
    static BYTEA NOT NULL,
    withdrawn BIGINT NOT NULL,
    issued_ms BIGINT NOT NULL,
    signed BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BYTEA PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash BYTEA NOT NULL,
    issued_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms BIGINT
);
CREATE TABLE IF NOT EXISTS attestations (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices (device),
    intent_hash BYTEA NOT NULL,
    nonce BYTEA NOT NULL UNIQUE REFERENCES nonces (nonce),
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    verdict BYTEA NOT NULL,
    at_ms BIGINT NOT NULL,
    granted_ms BIGINT
);
CREATE INDEX IF NOT EXISTS attestations_by_device ON attestations (device, at_ms);
CREATE TABLE IF NOT EXISTS revocations (
    number BIGINT PRIMARY KEY,
    crl BYTEA NOT NULL,
    installed_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS platform_certs (
    fingerprint BYTEA PRIMARY KEY,
    serial BIGINT NOT NULL,
    cert BYTEA NOT NULL,
    first_seen_ms BIGINT NOT NULL
);
"""
DEVICE_COLUMNS = "device, tm_node, status, registered_ms, last_attested_ms, last_status, consecutive_failures"
INSERT_RELEASE = (
    "INSERT INTO releases (digest, kind, name, version, code, static, withdrawn, issued_ms, signed)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (digest) DO NOTHING"
)


class PgTrustDb(TrustDb):
    """The trust database in the schema ``{prefix}_trust`` of the PostgreSQL database at ``url``."""

    def __init__(self, url: DbUrl, *, pool_max: int = POOL_MAX) -> None:
        self.url = url
        self._conn = PgConn(url, ROLE, FAILURES, pool_max=pool_max)
        self.replies = PgReplies(self._conn)

    async def open(self) -> None:
        await self._conn.open(SCHEMA, SCHEMA_VERSION)

    async def close(self) -> None:
        await self._conn.close()

    async def seed(
        self, devices: Iterable[tuple[str, str]], releases: Iterable[tuple[Release, bytes]], now_ms: int
    ) -> None:
        async with self._conn.tx() as conn:
            await conn.executemany(
                "INSERT INTO devices (device, tm_node, status, registered_ms) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (device) DO NOTHING",
                [(device, tm_node, ACTIVE, now_ms) for device, tm_node in devices],
            )
            await conn.executemany(INSERT_RELEASE, [release_args(r, b) for r, b in releases])

    async def device(self, device: str) -> DeviceRow | None:
        row = await self._conn.one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device = $1", device)
        return DeviceRow(*row) if row else None

    async def set_device_status(self, device: str, status: str) -> None:
        if status not in (ACTIVE, REVOKED):
            raise ConfigError(f"device status must be {ACTIVE!r} or {REVOKED!r}, not {status!r}")
        async with self._conn.tx() as conn:
            changed = await conn.execute("UPDATE devices SET status = $1 WHERE device = $2", status, device)
        if changed != "UPDATE 1":
            raise DeviceUnknown(f"device {device} is not registered with the trust-server")

    async def add_release(self, release: Release, blob: bytes) -> bool:
        async with self._conn.tx() as conn:
            return bool(await conn.execute(INSERT_RELEASE, *release_args(release, blob)) == "INSERT 0 1")

    async def releases(self) -> list[Release]:
        rows = await self._conn.all(
            "SELECT kind, name, version, code, static, withdrawn, issued_ms FROM"
            " releases ORDER BY issued_ms, withdrawn"
        )
        return [Release(k, n, v, bytes(c), bytes(s), bool(w), t) for k, n, v, c, s, w, t in rows]

    async def issue_nonce(
        self, nonce: bytes, device: str, intent_hash: bytes, issued_ms: int, expires_ms: int
    ) -> None:
        async with self._conn.tx() as conn:
            await conn.execute(
                "INSERT INTO nonces (nonce, device, intent_hash, issued_ms,"
                " expires_ms) VALUES ($1, $2, $3, $4, $5)",
                nonce,
                device,
                intent_hash,
                issued_ms,
                expires_ms,
            )

    async def consume_nonce(self, nonce: bytes, device: str, now_ms: int) -> NonceRow:
        async with self._conn.tx() as conn:
            won = await conn.fetchrow(
                "UPDATE nonces SET used_ms = $1 WHERE nonce = $2 AND device = $3 AND used_ms IS NULL"
                " AND expires_ms >= $1 RETURNING intent_hash, issued_ms, expires_ms",
                now_ms,
                nonce,
                device,
            )
            if won is not None:
                return NonceRow(nonce, device, bytes(won[0]), won[1], won[2])
            held = await conn.fetchrow(
                "SELECT device, expires_ms, used_ms FROM nonces WHERE nonce = $1", nonce
            )
        raise nonce_refusal(None if held is None else tuple(held), device, now_ms)

    async def prune_nonces(self, now_ms: int, limit: int = -1) -> int:
        async with self._conn.tx() as conn:
            status = await conn.execute(
                "DELETE FROM nonces WHERE nonce IN (SELECT nonce FROM nonces "
                "WHERE used_ms IS NULL AND expires_ms < $1 LIMIT $2)",
                now_ms,
                None if limit < 0 else limit,  # LIMIT NULL: no limit
            )
        return int(status.split()[-1])

    async def record_attestation(
        self, nonce: NonceRow, status: str, reason: str, verdict: bytes, at_ms: int, passed: bool
    ) -> int:
        async with self._conn.tx() as conn:
            attestation_id = await conn.fetchval(
                "INSERT INTO attestations (device, intent_hash, nonce, status, reason, verdict, at_ms)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                nonce.device,
                nonce.intent_hash,
                nonce.nonce,
                status,
                reason,
                verdict,
                at_ms,
            )
            await conn.execute(
                "UPDATE devices SET last_attested_ms = $1, last_status = $2, consecutive_failures ="
                " CASE WHEN $3 THEN 0 ELSE consecutive_failures + 1 END WHERE device = $4",
                at_ms,
                status,
                passed,
                nonce.device,
            )
        return int(attestation_id)

    async def mark_granted(self, attestation_id: int, at_ms: int) -> None:
        async with self._conn.tx() as conn:
            await conn.execute("UPDATE attestations SET granted_ms = $1 WHERE id = $2", at_ms, attestation_id)

    async def attestations(self, device: str) -> list[AttestationRow]:
        rows = await self._conn.all(
            "SELECT id, device, intent_hash, nonce, status, reason, verdict, at_ms, granted_ms"
            " FROM attestations WHERE device = $1 ORDER BY id",
            device,
        )
        return [
            AttestationRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4], r[5], bytes(r[6]), r[7], r[8])
            for r in rows
        ]

    async def note_platform(self, fingerprint: bytes, serial: int, cert: bytes, now_ms: int) -> None:
        async with self._conn.tx() as conn:
            await conn.execute(
                "INSERT INTO platform_certs (fingerprint, serial, cert,"
                " first_seen_ms) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (fingerprint) DO NOTHING",
                fingerprint,
                serial,
                cert,
                now_ms,
            )

    async def platform_serial(self, fingerprint: bytes) -> int | None:
        row = await self._conn.one("SELECT serial FROM platform_certs WHERE fingerprint = $1", fingerprint)
        return int(row[0]) if row else None

    async def crl(self) -> tuple[int, bytes] | None:
        row = await self._conn.one("SELECT number, crl FROM revocations ORDER BY number DESC LIMIT 1")
        return (int(row[0]), bytes(row[1])) if row else None

    async def store_crl(self, number: int, crl: bytes, now_ms: int) -> None:
        async with self._conn.tx() as conn:
            await conn.execute(
                "INSERT INTO revocations (number, crl, installed_ms) VALUES ($1, $2, $3)"
                " ON CONFLICT (number) DO NOTHING",
                number,
                crl,
                now_ms,
            )
