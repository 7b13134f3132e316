"""Integrity measurement (claim 2), the measurement log and signed quotes.

A component (the client, or one payment app) is measured as three separately
hashed parts, its code, static data and dynamic data, combined into one
digest. Measurements are appended to a log whose running aggregate is
extended like a TPM PCR (``aggregate = H(aggregate || digest)``), and a quote
signs (verifier's nonce, aggregate, log digest), so the verifier can replay the
log, check it reaches the quoted aggregate, and appraise every entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .codec import pack, unpack
from .errors import BadSignature, MeasurementMismatch
from .keys import KeyPair, verify
from .schema import from_map, to_map

DIGEST_SIZE = 32
QUOTE_DOMAIN = b"trustpay-quote-v1\x00"
ZERO = bytes(DIGEST_SIZE)

CLIENT = "client"
APP = "app"
INSTALL_IMAGE_TAG = b"trustpay-install-v1\x00"


def digest(data: bytes, tag: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=tag[:16]).digest()


def install_image(files: Mapping[str, bytes]) -> bytes:
    """One byte string standing for a whole tree of files: the client install's measured "code".

    ``files`` maps each relative path ("nodes/client.py", "/"-separated) to its
    bytes. Paths are sorted, and every path and content is length-prefixed, so
    two different trees never give the same image (no file can pose as the end
    of another). ``ops.client_boot`` repeats these lines with the standard
    library only; a test pins the two together.
    """
    image = bytearray(INSTALL_IMAGE_TAG)
    for path in sorted(files):
        name, data = path.encode(), files[path]
        image += len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big") + data
    return bytes(image)


@dataclass(frozen=True)
class Measurement:
    """One component's three part digests and their combination."""

    kind: str  # "client" | "app"
    name: str
    version: str
    code: bytes
    static: bytes
    dynamic: bytes

    @property
    def digest(self) -> bytes:
        return digest(
            pack([self.kind, self.name, self.version, self.code, self.static, self.dynamic]),
            b"tp-measurement",
        )

    @property
    def component(self) -> str:
        return self.kind if self.kind == CLIENT else f"{self.kind}:{self.name}"


def dynamic_digest(data: bytes) -> bytes:
    """The dynamic-data part of a measurement, as ``measure`` computes it."""
    return digest(data, b"tp-dynamic")


def measure(kind: str, name: str, version: str, code: bytes, static: bytes, dynamic: bytes) -> Measurement:
    """Hash each part separately (claim 2) and return the measurement."""
    return Measurement(
        kind,
        name,
        version,
        digest(code, b"tp-code"),
        digest(static, b"tp-static"),
        dynamic_digest(dynamic),
    )


def extend(aggregate: bytes, entry_digest: bytes) -> bytes:
    return digest(aggregate + entry_digest, b"tp-extend")


@dataclass(frozen=True)
class LogEntry:
    """A measurement as the trust module recorded it, with its own verdict on dynamic data."""

    measurement: Measurement
    dynamic_as_stored: bool  # dynamic data equals what the trust module last stored


class MeasurementLog:
    """Append-only log with a running aggregate."""

    def __init__(self) -> None:
        self._entries: list[LogEntry] = []
        self.aggregate = ZERO

    def append(self, entry: LogEntry) -> None:
        self._entries.append(entry)
        self.aggregate = extend(self.aggregate, entry_digest(entry))

    @property
    def entries(self) -> tuple[LogEntry, ...]:
        return tuple(self._entries)


def entry_digest(entry: LogEntry) -> bytes:
    return digest(pack(to_map(entry)), b"tp-log-entry")


def log_digest(entries: Iterable[LogEntry]) -> bytes:
    return digest(pack([to_map(e) for e in entries]), b"tp-log")


def replay_log(entries: Iterable[LogEntry]) -> bytes:
    aggregate = ZERO
    for entry in entries:
        aggregate = extend(aggregate, entry_digest(entry))
    return aggregate


@dataclass(frozen=True)
class QuoteBody:
    device: str
    nonce: bytes
    aggregate: bytes
    log_digest: bytes
    at_ms: int


@dataclass(frozen=True)
class Quote:
    body: QuoteBody
    signature: bytes

    def to_bytes(self) -> bytes:
        return pack(to_map(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        return from_map(cls, unpack(data), "quote")


def make_quote(device: str, nonce: bytes, log: MeasurementLog, keys: KeyPair, at_ms: int) -> Quote:
    body = QuoteBody(device, nonce, log.aggregate, log_digest(log.entries), at_ms)
    return Quote(body, keys.sign(QUOTE_DOMAIN, pack(to_map(body))))


def check_quote(quote: Quote, entries: tuple[LogEntry, ...], signer_key: bytes, nonce: bytes) -> None:
    """Verify the quote's signature, nonce and that the log reaches its aggregate."""
    try:
        verify(signer_key, QUOTE_DOMAIN, pack(to_map(quote.body)), quote.signature)
    except BadSignature as exc:
        raise BadSignature("quote is not signed by the device's trust module") from exc
    if quote.body.nonce != nonce:
        raise MeasurementMismatch("quote is over another nonce")
    if log_digest(entries) != quote.body.log_digest:
        raise MeasurementMismatch("measurement log does not match the quoted log digest")
    if replay_log(entries) != quote.body.aggregate:
        raise MeasurementMismatch("measurement log does not reach the quoted aggregate")
