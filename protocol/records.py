"""Signed documents carried inside messages: orders, receipts, verdicts, releases.

Each is a frozen body plus a detached Ed25519 signature under its own domain
tag. They outlive the frame that carried them: the ledger stores orders and
receipts, the trust module stores verdicts and releases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Generic, TypeVar

from .codec import pack, unpack
from .errors import BadSignature
from .keys import KeyPair, verify
from .schema import from_map, to_map

B = TypeVar("B")

ORDER_DOMAIN = b"trustpay-order-v1\x00"
RECEIPT_DOMAIN = b"trustpay-receipt-v1\x00"
VERDICT_DOMAIN = b"trustpay-verdict-v1\x00"
RELEASE_DOMAIN = b"trustpay-release-v1\x00"
PACKAGE_DOMAIN = b"trustpay-package-v1\x00"


@dataclass(frozen=True)
class Signed(Generic[B]):
    """A body and its detached signature, as bytes: ``{"body": ..., "sig": ...}``."""

    body: B
    data: bytes  # the exact signed body bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return pack({"body": self.data, "sig": self.signature})


def sign_record(body: B, domain: bytes, keys: KeyPair) -> Signed[B]:
    data = pack(to_map(body))
    return Signed(body, data, keys.sign(domain, data))


def open_record(cls: type[B], blob: bytes, domain: bytes, signer_key: bytes, what: str) -> Signed[B]:
    """Decode a signed record and verify it against ``signer_key``; raise typed errors."""
    outer = from_map(_Outer, unpack(blob), what)
    try:
        verify(signer_key, domain, outer.body, outer.sig)
    except BadSignature as exc:
        raise BadSignature(f"{what} signature does not verify") from exc
    return Signed(from_map(cls, unpack(outer.body), what), outer.body, outer.sig)


def peek_record(cls: type[B], blob: bytes, what: str) -> B:
    """Decode a record's body without verifying it (to learn who should have signed it)."""
    return from_map(cls, unpack(from_map(_Outer, unpack(blob), what).body), what)


@dataclass(frozen=True)
class _Outer:
    body: bytes
    sig: bytes


def record_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=b"tp-record").digest()


@dataclass(frozen=True)
class Order:
    """A payment order made and signed by the chip for one app (C5)."""

    order_id: str
    device: str
    app: str
    payee: str
    amount: int  # minor units
    currency: str
    counter: int  # the app's transaction counter, strictly increasing
    created_ms: int


@dataclass(frozen=True)
class Intent:
    """What the user asked to pay (the client's ``pay.start``), bound from C2 to the receipt.

    The chip builds it before any app code runs; the trust-server's verdict and
    grant name its hash, and the payment-server recomputes that hash from the
    signed order, so an order that pays anything else finds no grant.
    """

    device: str
    order_id: str
    app: str
    payee: str
    amount: int
    currency: str


def intent_of(order: Order) -> Intent:
    return Intent(order.device, order.order_id, order.app, order.payee, order.amount, order.currency)


def intent_hash(intent: Intent) -> bytes:
    """Domain-separated, so it can never equal a ``record_hash`` or a measurement digest."""
    return hashlib.blake2b(pack(to_map(intent)), digest_size=32, person=b"tp-intent").digest()


INTENT_HASH_SIZE = 32


@dataclass(frozen=True)
class Receipt:
    """The payment-server's signed answer to an order: confirmed or refused."""

    order_id: str
    order_hash: bytes
    device: str
    status: str  # "confirmed" | "refused"
    code: str  # "" when confirmed, else a refusal code
    reason: str
    payer: str
    payee: str
    amount: int
    currency: str
    balance_after: int
    executed_ms: int


AFFIRMING, WARNING, CONTRAINDICATED = "affirming", "warning", "contraindicated"


@dataclass(frozen=True)
class Appraisal:
    component: str  # "client" or "app:NAME"
    version: str
    status: str  # affirming | warning | contraindicated
    reason: str


@dataclass(frozen=True)
class Verdict:
    """An attestation result in the shape of an IETF RATS EAR (C4)."""

    verifier: str
    device: str
    status: str
    appraisals: tuple[Appraisal, ...]
    nonce: bytes
    intent_hash: bytes  # the payment the user asked for (``intent_hash``), not yet an order
    policy: str
    issued_ms: int
    expires_ms: int


@dataclass(frozen=True)
class Release:
    """A released version's reference measurement: a client trust report (claim 3)."""

    kind: str  # "client" | "app"
    name: str
    version: str
    code: bytes  # digest of the code
    static: bytes  # digest of the static data
    withdrawn: bool
    issued_ms: int


@dataclass(frozen=True)
class Package:
    """What the issuer signs so the chip installs an app: its name, version and digests."""

    name: str
    version: str
    code: bytes
    static: bytes
