"""Signed frames: the envelope, how it is signed, and how a frame is verified.

A frame on the wire is ``envelope || signature``: the canonical msgpack
encoding of the envelope array, then 64 bytes of Ed25519 signature over::

    FRAME_DOMAIN || u8 version || u16be len(topic) || topic || envelope

Binding the topic means a frame moved to another link, device or direction
fails. The body inside the envelope is itself msgpack *bytes*, decoded only
after the signature, topic, sender, recipient and freshness checks passed.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass

from .certs import Certificate, CertStore
from .codec import DEFAULT_LIMITS, Limits, Value, pack, unpack
from .errors import (
    CertificateRevoked,
    Malformed,
    NotForMe,
    Rejected,
    TooLarge,
    UnknownSender,
    UnknownType,
    UnknownVersion,
    WrongRole,
    WrongTopic,
)
from .keys import SIGNATURE_SIZE, KeyPair, verify
from .messages import MESSAGE_TYPES, Body, MessageSpec
from .replay import OutsideWindow, ReplayGuard
from .schema import from_map, to_map
from .seal import seal, unseal
from .topics import ParsedTopic, parse_topic, status_signer

VERSION = 1
FRAME_DOMAIN = b"trustpay-frame-v1\x00"
MAX_FRAME = 64 * 1024
ID_SIZE = 16
FIELDS = 12  # length of the envelope array


@dataclass(frozen=True)
class Envelope:
    """The signed header and the typed body of one message."""

    type: str
    message_id: bytes
    sender: str
    recipient: str
    session: bytes
    reply_to: bytes
    ts_ms: int
    epoch: int
    seq: int
    chain: tuple[bytes, ...]
    body: Body
    version: int = VERSION


@dataclass(frozen=True)
class Received:
    """A verified frame: the envelope, the sender's certificate and where it came from."""

    envelope: Envelope
    sender_cert: Certificate
    topic: ParsedTopic
    frame: bytes


class SenderRevoked(CertificateRevoked):
    """A frame that passed every check but one: its sender's certificate is revoked.

    It carries the verified frame (the body left undecoded) so the receiver can
    answer the sender with a typed refusal instead of leaving it to time out.
    Raised only after the signature and replay checks, so nobody but the holder
    of the revoked key can draw such answers.
    """

    def __init__(self, reason: str, received: Received) -> None:
        super().__init__(reason)
        self.received = received


class SenderClockSkewed(OutsideWindow):
    """A frame that passed every check but the time window: signature, chain and role are good.

    It carries the verified frame (the body left undecoded, :meth:`Verifier.decode`
    decodes it) so the receiver can tell the sender its clock is off, and so a
    requester can take a ``clock_skew`` refusal that answers its own pending
    request. Its id was not recorded: nothing else may act on it.
    """

    def __init__(self, reason: str, ahead_ms: int, received: Received) -> None:
        super().__init__(reason, ahead_ms)
        self.received = received


def new_id() -> bytes:
    return os.urandom(ID_SIZE)


def signed_bytes(topic: str, envelope_bytes: bytes, version: int = VERSION) -> bytes:
    t = topic.encode()
    return struct.pack(">BH", version, len(t)) + t + envelope_bytes


@dataclass(frozen=True)
class SealedBody:
    """What a party without the recipient's key (a monitor) sees of a sealed body."""

    ciphertext: bytes


def encode_envelope(env: Envelope, keys: KeyPair, peer_box: bytes | None = None) -> bytes:
    """Canonical envelope bytes; a sealed type's body is boxed for ``peer_box``."""
    spec = MESSAGE_TYPES.get(env.type)
    if spec is None:
        raise UnknownType(f"cannot send unknown message type {env.type!r}")
    if not isinstance(env.body, spec.body):
        raise Malformed(f"{env.type} needs a {spec.body.__name__} body")
    body = pack(to_map(env.body))
    if spec.sealed:
        if peer_box is None:
            raise Malformed(f"{env.type} is sealed: the recipient's box key is needed")
        body = seal(body, keys, peer_box)
    return pack(envelope_array(env, body))


def envelope_array(env: Envelope, body: bytes) -> list[Value]:
    """The wire array of ``env``, with ``body`` already encoded (and sealed if need be)."""
    return [
        env.version,
        env.type,
        env.message_id,
        env.sender,
        env.recipient,
        env.session,
        env.reply_to,
        env.ts_ms,
        env.epoch,
        env.seq,
        list(env.chain),
        body,
    ]


def sign_frame(env: Envelope, topic: str, keys: KeyPair, peer_box: bytes | None = None) -> bytes:
    """Encode (sealing if the type says so) and sign ``env`` for publication on ``topic``."""
    data = encode_envelope(env, keys, peer_box)
    frame = data + keys.sign(FRAME_DOMAIN, signed_bytes(topic, data, env.version))
    if len(frame) > MAX_FRAME:
        raise TooLarge(f"frame of {len(frame)} bytes is over the {MAX_FRAME}-byte limit")
    return frame


_HEADER_TYPES: tuple[tuple[str, type], ...] = (
    ("version", int),
    ("type", str),
    ("message_id", bytes),
    ("sender", str),
    ("recipient", str),
    ("session", bytes),
    ("reply_to", bytes),
    ("ts_ms", int),
    ("epoch", int),
    ("seq", int),
    ("chain", list),
    ("body", bytes),
)


def _parse_header(data: bytes, limits: Limits) -> Envelope:
    """The envelope with its body still the encoded (maybe sealed) bytes: nothing is trusted yet."""
    raw = unpack(data, limits)
    if not isinstance(raw, list) or len(raw) != FIELDS:
        raise Malformed(f"envelope must be an array of {FIELDS} fields")
    if not isinstance(raw[0], int) or isinstance(raw[0], bool):
        raise Malformed("envelope version must be an integer")
    if raw[0] != VERSION:
        raise UnknownVersion(f"protocol version {raw[0]} (we speak {VERSION})")
    for (name, kind), value in zip(_HEADER_TYPES, raw, strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Malformed(f"envelope field {name} must be {kind.__name__}")
    chain = raw[10]
    if len(chain) > 4 or not all(isinstance(c, bytes) for c in chain):
        raise Malformed("envelope chain must be at most 4 certificates")
    if len(raw[2]) != ID_SIZE:
        raise Malformed(f"message id must be {ID_SIZE} bytes")
    if min(raw[7], raw[8], raw[9]) < 0:
        raise Malformed("time, epoch and sequence must not be negative")
    return Envelope(
        version=raw[0],
        type=raw[1],
        message_id=raw[2],
        sender=raw[3],
        recipient=raw[4],
        session=raw[5],
        reply_to=raw[6],
        ts_ms=raw[7],
        epoch=raw[8],
        seq=raw[9],
        chain=tuple(chain),
        body=raw[11],
    )


def peek(frame: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope | None:
    """The header of a frame that failed verification, for routing its failure only; never trust it."""
    try:
        return _parse_header(bytes(frame[:-SIGNATURE_SIZE]), limits)
    except Rejected:
        return None


def _check_link(spec: MessageSpec, parsed: ParsedTopic, cert: Certificate, topic: str) -> None:
    if parsed.dst is None:
        allowed = parsed.channel in spec.channels
    else:
        allowed = (parsed.src, parsed.dst) in spec.links
    if not allowed:
        raise WrongTopic(f"a {spec.name} message does not belong on {topic}")
    if cert.role != parsed.src.value:
        raise WrongRole(f"a {cert.role} certificate cannot send on {topic}")
    if parsed.src.on_device and cert.body.device != parsed.device:
        raise WrongTopic(f"{cert.subject} belongs to device {cert.body.device}, not {parsed.device}")
    signer = status_signer(parsed)
    if signer is not None and cert.subject != signer:
        raise WrongTopic(f"{cert.subject} cannot sign {signer}'s status ({topic})")


class Verifier:
    """Everything a receiver checks, in order; sans-I/O (the caller passes the clock)."""

    def __init__(
        self,
        my_ids: frozenset[str],
        certs: CertStore,
        guard: ReplayGuard | None,
        keys: KeyPair | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.my_ids = my_ids  # empty: accept any recipient (a monitor)
        self.certs = certs
        self.guard = guard  # None: check signatures only (a monitor, retained status)
        self.keys = keys  # None: sealed bodies stay sealed (a monitor)
        self.limits = limits

    def open(self, frame: bytes, topic: str, now_ms: int) -> Received:
        if not isinstance(frame, (bytes, bytearray)):
            raise Malformed("frame is not bytes")
        if len(frame) > MAX_FRAME:
            raise TooLarge(f"frame of {len(frame)} bytes is over the {MAX_FRAME}-byte limit")
        if len(frame) <= SIGNATURE_SIZE:
            raise Malformed("frame is too short to hold a signature")
        data, signature = bytes(frame[:-SIGNATURE_SIZE]), bytes(frame[-SIGNATURE_SIZE:])
        header = _parse_header(data, self.limits)
        spec = MESSAGE_TYPES.get(header.type)
        if spec is None:
            raise UnknownType(f"unknown message type {header.type!r}")
        parsed = parse_topic(topic)
        cert = self._sender_cert(header, now_ms)
        _check_link(spec, parsed, cert, topic)
        verify(cert.body.sign_key, FRAME_DOMAIN, signed_bytes(topic, data), signature)
        if self.my_ids and header.recipient not in self.my_ids:
            raise NotForMe(f"addressed to {header.recipient}, not to {sorted(self.my_ids)}")
        if self.guard is not None:
            try:
                self.guard.check(
                    header.sender, header.message_id, header.ts_ms, header.epoch, header.seq, now_ms
                )
            except OutsideWindow as exc:
                if self.certs.is_revoked(cert):
                    raise  # a revoked sender hears nothing more about its frames
                raise SenderClockSkewed(
                    exc.reason, exc.ahead_ms, Received(header, cert, parsed, bytes(frame))
                ) from exc
        if self.certs.is_revoked(cert):
            raise SenderRevoked(
                f"{cert.subject}'s certificate {cert.serial} is revoked",
                Received(header, cert, parsed, bytes(frame)),
            )
        env = dataclasses.replace(header, body=self._body(spec, header.body, cert))
        return Received(env, cert, parsed, bytes(frame))

    def decode(self, received: Received) -> Received:
        """``received`` (from :class:`SenderClockSkewed`) with its body decoded and unsealed."""
        spec, data = MESSAGE_TYPES[received.envelope.type], received.envelope.body
        if not isinstance(data, bytes):
            raise Malformed("this frame's body is already decoded")
        body = self._body(spec, data, received.sender_cert)
        return dataclasses.replace(received, envelope=dataclasses.replace(received.envelope, body=body))

    def _body(self, spec: MessageSpec, data: bytes, sender: Certificate) -> Body:
        if spec.sealed:
            if self.keys is None:
                return SealedBody(data)
            data = unseal(data, self.keys, sender.body.box_key)
        return from_map(spec.body, unpack(data, self.limits), spec.name)

    def _sender_cert(self, header: Envelope, now_ms: int) -> Certificate:
        if not header.chain:
            raise UnknownSender(f"{header.sender} sent no certificate chain")
        cert = self.certs.resolve(list(header.chain), now_ms // 1000, allow_revoked=True)
        if cert.subject != header.sender:
            raise UnknownSender(f"frame claims sender {header.sender} but is certified for {cert.subject}")
        return cert
