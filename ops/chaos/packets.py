"""A small, pure MQTT 3.1.1 / 5 packet codec: just what the fault proxy needs.

Why our own: amqtt's packet classes read from a stream and know 3.1.1 only,
paho keeps its codec internal, ``mqtt-codec`` is 3.1.1 only, and ``mqtt5`` /
``mqttproto`` are MQTT 5 only; the proxy must read both versions and pass
everything it does not change through byte for byte.

Bytes in, values out, no I/O. :func:`split_packet` cuts one packet off the
front of a buffer (``None``: more bytes needed); the packet's body is then
decoded only for the types the proxy acts on: CONNECT (protocol version,
client id), PUBLISH, the four QoS acknowledgements and SUBSCRIBE. Anything
else (CONNACK, SUBACK, PINGREQ, DISCONNECT, AUTH ...) stays an opaque
:class:`RawPacket`. MQTT 5 properties are kept as opaque bytes. Every refusal
is a :class:`MalformedPacket` (``protocol.errors.Malformed``), never an
IndexError or a UnicodeDecodeError.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.errors import Malformed, TooLarge

MAX_REMAINING = 268_435_455  # the largest a four-byte remaining length can say
MQTT_311, MQTT_5 = 4, 5  # CONNECT's protocol level byte


class MalformedPacket(Malformed):
    code = "malformed_mqtt"


class PacketTooLarge(TooLarge):
    code = "mqtt_too_large"


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


ACK_TYPES = frozenset({PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP})


@dataclass(frozen=True)
class RawPacket:
    """One packet as framed on the wire: type, the fixed header's four flag bits, the body."""

    type: PacketType
    flags: int
    body: bytes

    def encode(self) -> bytes:
        return bytes([(self.type << 4) | self.flags]) + encode_varint(len(self.body)) + self.body


@dataclass(frozen=True)
class Connect:
    version: int  # MQTT_311 or MQTT_5
    client_id: str


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present exactly when qos > 0
    properties: bytes = b""  # MQTT 5 only: the property bytes, without their length

    def encode(self, version: int) -> bytes:
        flags = (self.dup << 3) | (self.qos << 1) | self.retain
        body = _string(self.topic.encode())
        if self.qos:
            if self.packet_id is None:
                raise MalformedPacket("a QoS 1 or 2 PUBLISH needs a packet id")
            body += self.packet_id.to_bytes(2, "big")
        if version == MQTT_5:
            body += encode_varint(len(self.properties)) + self.properties
        return RawPacket(PacketType.PUBLISH, flags, body + self.payload).encode()


@dataclass(frozen=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP; ``rest`` is MQTT 5's reason code and properties, untouched."""

    type: PacketType
    packet_id: int
    rest: bytes = b""

    def encode(self) -> bytes:
        flags = 0b0010 if self.type is PacketType.PUBREL else 0
        return RawPacket(self.type, flags, self.packet_id.to_bytes(2, "big") + self.rest).encode()


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]  # (topic filter, options byte)
    properties: bytes = b""

    def encode(self, version: int) -> bytes:
        body = self.packet_id.to_bytes(2, "big")
        if version == MQTT_5:
            body += encode_varint(len(self.properties)) + self.properties
        for topic_filter, options in self.filters:
            body += _string(topic_filter.encode()) + bytes([options])
        return RawPacket(PacketType.SUBSCRIBE, 0b0010, body).encode()


# -- framing ------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING:
        raise MalformedPacket(f"remaining length {value} is outside 0..{MAX_REMAINING}")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def decode_varint(buf: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """(value, position after it), or None when ``buf`` ends inside it."""
    value = 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise MalformedPacket("a variable byte integer longer than four bytes")


def split_packet(buf: bytes | bytearray, max_size: int = MAX_REMAINING) -> tuple[RawPacket, int] | None:
    """The first packet in ``buf`` and how many bytes it took, or None until all of it is there.

    A remaining length over ``max_size`` is refused before its body arrives.
    """
    if not buf:
        return None
    try:
        ptype = PacketType(buf[0] >> 4)
    except ValueError:
        raise MalformedPacket("packet type 0 is reserved") from None
    decoded = decode_varint(buf, 1)
    if decoded is None:
        return None
    length, start = decoded
    if length > max_size:
        raise PacketTooLarge(f"a {ptype.name} of {length} bytes is over the limit of {max_size}")
    if len(buf) < start + length:
        return None
    return RawPacket(ptype, buf[0] & 0x0F, bytes(buf[start : start + length])), start + length


# -- bodies ---------------------------------------------------------------------------------


class _Reader:
    """Reads fields off a body; running past its end is a MalformedPacket."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body, self.pos, self.what = body, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise MalformedPacket(f"{self.what} ends inside a field")
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"{self.what} has a string that is not UTF-8") from exc

    def properties(self) -> bytes:
        decoded = decode_varint(self.body, self.pos)
        if decoded is None:
            raise MalformedPacket(f"{self.what} ends inside its property length")
        length, self.pos = decoded
        return self.take(length)

    def rest(self) -> bytes:
        out = self.body[self.pos :]
        self.pos = len(self.body)
        return out


def decode_connect(packet: RawPacket) -> Connect:
    r = _Reader(packet.body, "CONNECT")
    name = r.take(r.u16())
    version = r.u8()
    if name != b"MQTT" or version not in (MQTT_311, MQTT_5):
        raise MalformedPacket(f"CONNECT names protocol {name!r} level {version}; only MQTT 3.1.1 and 5")
    r.take(1 + 2)  # connect flags, keep alive
    if version == MQTT_5:
        r.properties()
    return Connect(version, r.string())


def decode_publish(packet: RawPacket, version: int) -> Publish:
    qos = (packet.flags >> 1) & 0b11
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    r = _Reader(packet.body, "PUBLISH")
    topic = r.string()
    packet_id = r.u16() if qos else None
    properties = r.properties() if version == MQTT_5 else b""
    return Publish(
        topic, r.rest(), qos, bool(packet.flags & 1), bool(packet.flags & 0b1000), packet_id, properties
    )


def decode_ack(packet: RawPacket) -> Ack:
    if packet.type not in ACK_TYPES:
        raise MalformedPacket(f"{packet.type.name} is not an acknowledgement")
    r = _Reader(packet.body, packet.type.name)
    return Ack(packet.type, r.u16(), r.rest())


def decode_subscribe(packet: RawPacket, version: int) -> Subscribe:
    r = _Reader(packet.body, "SUBSCRIBE")
    packet_id = r.u16()
    properties = r.properties() if version == MQTT_5 else b""
    filters: list[tuple[str, int]] = []
    while r.pos < len(r.body):  # each turn consumes at least three bytes or raises
        filters.append((r.string(), r.u8()))
    if not filters:
        raise MalformedPacket("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(filters), properties)


def _string(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise MalformedPacket(f"a string of {len(raw)} bytes is over MQTT's 65535")
    return len(raw).to_bytes(2, "big") + raw
