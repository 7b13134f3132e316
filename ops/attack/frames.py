"""Hostile frames, made without I/O: genuine, forged, altered, future-stamped, oversize, garbage.

An :class:`AttackerIdentity` is what a compromised node's directory gives away:
its signing key and certificate chain. Its genuine frames carry a boot epoch
claimed like the node's own (:func:`claim_epoch` in :mod:`.session`) and
sequence numbers of their own, so the target's replay guard treats them as the
node's: the point is to see what the target does with frames the attacker
*can* sign, not only with ones it cannot.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from protocol.codec import pack
from protocol.envelope import (
    FIELDS,
    FRAME_DOMAIN,
    Envelope,
    envelope_array,
    new_id,
    peek,
    sign_frame,
    signed_bytes,
)
from protocol.keys import SIGNATURE_SIZE, KeyPair
from protocol.messages import Body, Ping

OVERSIZE_BYTES = (64 * 1024 + 1, 256 * 1024)  # just over the largest frame, and well over it
NESTING = 10_000  # levels of msgpack arrays in the deepest garbage frame


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class AttackerIdentity:
    """A node's key and certificate chain in the attacker's hands, and the epoch it claimed."""

    node_id: str
    keys: KeyPair
    chain: tuple[bytes, ...]
    epoch: int = 0
    _seq: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def envelope(
        self, msg_type: str, body: Body, recipient: str, ts_ms: int | None = None, sender: str | None = None
    ) -> Envelope:
        return Envelope(
            type=msg_type,
            message_id=new_id(),
            sender=sender or self.node_id,
            recipient=recipient,
            session=b"",
            reply_to=b"",
            ts_ms=now_ms() if ts_ms is None else ts_ms,
            epoch=self.epoch,
            seq=next(self._seq),
            chain=self.chain,
            body=body,
        )

    def ping(self, topic: str, recipient: str, ts_ms: int | None = None) -> tuple[Envelope, bytes]:
        """A genuine ping: the target must answer it (the yardstick every other frame is held to)."""
        env = self.envelope("ping", Ping(os.urandom(16)), recipient, ts_ms)
        return env, sign_frame(env, topic, self.keys)


def forged_ping(
    identity: AttackerIdentity, topic: str, recipient: str, claimed_sender: str, keys: KeyPair | None = None
) -> tuple[Envelope, bytes]:
    """A ping claiming ``claimed_sender``, the attacker's chain, signed with ``keys`` (default: its own)."""
    env = identity.envelope("ping", Ping(os.urandom(16)), recipient, sender=claimed_sender)
    return env, sign_frame(env, topic, keys or identity.keys)


def with_chain(env: Envelope, chain: tuple[bytes, ...]) -> Envelope:
    return dataclasses.replace(env, chain=chain)


ALTERABLE = ("session", "recipient", "ts_ms", "message_id", "seq")


def altered(frame: bytes, topic: str, field: str, keys: KeyPair) -> tuple[Envelope, bytes]:
    """``frame`` with one header field changed, re-signed for ``topic`` with ``keys`` (not the sender's).

    The body stays the bytes that were captured (sealed or not): only the field
    changes, and the signature is the attacker's.
    """
    header = peek(frame)
    if header is None:
        raise ValueError("the captured frame is not a readable envelope")
    if field == "session":
        session = header.session or b"\x00"
        env = dataclasses.replace(header, session=bytes([session[0] ^ 1]) + session[1:])
    elif field == "recipient":
        env = dataclasses.replace(header, recipient=header.recipient + "x")
    elif field == "ts_ms":
        env = dataclasses.replace(header, ts_ms=header.ts_ms + 1)
    elif field == "message_id":
        env = dataclasses.replace(header, message_id=new_id())
    elif field == "seq":
        env = dataclasses.replace(header, seq=header.seq + 1)
    else:
        raise ValueError(f"cannot alter {field!r}; choose one of {', '.join(ALTERABLE)}")
    return env, _sign_raw(env, header.body, topic, keys)


def _sign_raw(env: Envelope, body: object, topic: str, keys: KeyPair) -> bytes:
    """Sign ``env`` whose body is already encoded bytes (as captured), without re-encoding it."""
    assert isinstance(body, bytes)
    data = pack(envelope_array(env, body))
    return data + keys.sign(FRAME_DOMAIN, signed_bytes(topic, data, env.version))


def oversize(size: int) -> bytes:
    """A frame-like blob of ``size`` bytes: a valid-looking msgpack array padded past the limit."""
    head = pack([1, "ping"])
    return head + os.urandom(max(0, size - len(head)))


def garbage(rng: random.Random, genuine: bytes) -> Iterator[tuple[str, bytes]]:
    """Malformed frames of every shape, each with a name; ``genuine`` is a signed frame to mangle."""
    yield "empty", b""
    yield "one byte", b"\x00"
    for n in (16, 64, 1024):
        yield f"{n} random bytes", rng.randbytes(n)
    for name, value in (
        ("msgpack int", 7),
        ("msgpack str", "ping"),
        ("msgpack map", {"type": "ping", "sender": "payment-server"}),
        ("msgpack empty array", []),
        ("envelope array too short", [1, "ping", b"x" * 16]),
        ("envelope array of wrong types", ["1", 2, 3, 4, 5, 6, 7, "8", "9", "10", {}, 12]),
        ("envelope of nils", [None] * FIELDS),
    ):
        yield name, msgpack.packb(value, use_bin_type=True) + rng.randbytes(SIGNATURE_SIZE)
    yield f"arrays nested {NESTING} deep", b"\x91" * NESTING + b"\xc0"
    yield f"maps nested {NESTING} deep", b"\x81\xa1k" * NESTING + b"\xc0"
    yield "array claiming 2^32-1 items", b"\xdd\xff\xff\xff\xff"
    yield "bin claiming 4 GiB", b"\xc6\xff\xff\xff\xff"
    yield "signed frame without its signature", genuine[:-SIGNATURE_SIZE]
    yield "signed frame, signature zeroed", genuine[:-SIGNATURE_SIZE] + bytes(SIGNATURE_SIZE)
    yield "signed frame, last byte flipped", genuine[:-1] + bytes([genuine[-1] ^ 1])
    yield "signed frame twice over", genuine + genuine
