"""The trust-server's database: devices, reference values, nonces, attestations, revocations.

Everything the verifier must remember lives here and nowhere else, so several
trust-server replicas (sharing load through ``$share`` subscriptions) run on
one PostgreSQL database: a nonce issued by one replica is consumed by
whichever replica gets the evidence, and consumption is a single conditional
``UPDATE ... RETURNING``, so exactly one consumer wins.

Two implementations, chosen by the database URL (``nodes.sql.parse_db_url``):
SQLite (``nodes.trust_db_sqlite``, the embedded default for one process) and
PostgreSQL (``nodes.trust_db_pg``). Callers see this interface, typed rows and
typed errors; a driver's own error never gets past the store.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import Rejected, TrustpayError
from protocol.records import Release, record_hash

from .replies import Replies
from .sql import POSTGRESQL, DbUrl, Failures, parse_db_url

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


class TrustDb(abc.ABC):
    """The trust-server's store; ``open`` before use, ``close`` after. ``replies`` is the role's reply log."""

    replies: Replies

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed (idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def seed(
        self, devices: Iterable[tuple[str, str]], releases: Iterable[tuple[Release, bytes]], now_ms: int
    ) -> None:
        """Register devices (device, trust-module node id) and releases; what is held stays as it is
        (a revoked device stays revoked)."""

    @abc.abstractmethod
    async def device(self, device: str) -> DeviceRow | None: ...

    @abc.abstractmethod
    async def set_device_status(self, device: str, status: str) -> None:
        """Raises DeviceUnknown for a device never registered."""

    @abc.abstractmethod
    async def add_release(self, release: Release, blob: bytes) -> bool:
        """Store a verified release record; False when this exact record was already held."""

    @abc.abstractmethod
    async def releases(self) -> list[Release]:
        """Every release record, oldest first; on equal times a withdrawal comes last, so it wins."""

    @abc.abstractmethod
    async def issue_nonce(
        self, nonce: bytes, device: str, intent_hash: bytes, issued_ms: int, expires_ms: int
    ) -> None: ...

    @abc.abstractmethod
    async def consume_nonce(self, nonce: bytes, device: str, now_ms: int) -> NonceRow:
        """Mark ``nonce`` used by ``device`` now, or raise why it cannot be (single use, atomic)."""

    @abc.abstractmethod
    async def prune_nonces(self, now_ms: int, limit: int = -1) -> int:
        """Forget up to ``limit`` (-1: all) challenges that expired unanswered; answered ones
        stay with their attestation. A limit keeps each run of the periodic prune short."""

    @abc.abstractmethod
    async def record_attestation(
        self, nonce: NonceRow, status: str, reason: str, verdict: bytes, at_ms: int, passed: bool
    ) -> int:
        """Store one attestation and update the device's summary in the same transaction; its id."""

    @abc.abstractmethod
    async def mark_granted(self, attestation_id: int, at_ms: int) -> None: ...

    @abc.abstractmethod
    async def attestations(self, device: str) -> list[AttestationRow]: ...

    @abc.abstractmethod
    async def note_platform(self, fingerprint: bytes, serial: int, cert: bytes, now_ms: int) -> None:
        """Remember a platform certificate we have held, so C1 can tell 'superseded' from 'unknown'."""

    @abc.abstractmethod
    async def platform_serial(self, fingerprint: bytes) -> int | None: ...

    @abc.abstractmethod
    async def crl(self) -> tuple[int, bytes] | None:
        """The newest revocation list held: (number, signed bytes)."""

    @abc.abstractmethod
    async def store_crl(self, number: int, crl: bytes, now_ms: int) -> None: ...


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
