"""The fault proxy's MQTT packet codec (ops.chaos.packets): hand-made vectors, then Hypothesis.

Pure: no event loop, no broker. The vectors are written byte by byte from the
MQTT 3.1.1 and 5 specifications, not produced by the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.chaos.packets import (
    MAX_REMAINING,
    MQTT_5,
    MQTT_311,
    Ack,
    Connect,
    MalformedPacket,
    PacketTooLarge,
    PacketType,
    Publish,
    RawPacket,
    Subscribe,
    decode_ack,
    decode_connect,
    decode_publish,
    decode_subscribe,
    decode_varint,
    encode_varint,
    split_packet,
)
from protocol.errors import Malformed

VERSIONS = (MQTT_311, MQTT_5)


def one(buf: bytes) -> RawPacket:
    split = split_packet(buf)
    assert split is not None
    packet, used = split
    assert used == len(buf)
    return packet


# -- vectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (MAX_REMAINING, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_matches_the_specification(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire
    assert decode_varint(wire) == (value, len(wire))
    assert decode_varint(wire[:-1]) is None  # cut short: more bytes needed, not an error


def test_a_fifth_length_byte_is_refused() -> None:
    with pytest.raises(MalformedPacket):
        decode_varint(b"\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedPacket):
        encode_varint(MAX_REMAINING + 1)


def test_connect_311_and_5_give_version_and_client_id() -> None:
    v311 = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1"
    v5 = b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x02c1"
    assert decode_connect(one(v311)) == Connect(MQTT_311, "c1")
    assert decode_connect(one(v5)) == Connect(MQTT_5, "c1")


def test_connect_of_another_protocol_is_refused() -> None:
    with pytest.raises(MalformedPacket, match=r"only MQTT 3\.1\.1 and 5"):
        decode_connect(one(b"\x10\x0e\x00\x04MQIs\x03\x02\x00\x3c\x00\x02c1"))


def test_publish_qos1_311_vector() -> None:
    wire = b"\x32\x09\x00\x03a/b\x00\x07hi"  # QoS 1, topic a/b, packet id 7, payload "hi"
    pub = decode_publish(one(wire), MQTT_311)
    assert pub == Publish("a/b", b"hi", qos=1, packet_id=7)
    assert pub.encode(MQTT_311) == wire


def test_publish_v5_keeps_properties_opaque() -> None:
    props = b"\x01\x01"  # payload format indicator = 1
    wire = b"\x3b\x0c\x00\x03a/b\x00\x07\x02" + props + b"hi"  # dup, QoS 1, retain
    pub = decode_publish(one(wire), MQTT_5)
    assert pub == Publish("a/b", b"hi", qos=1, retain=True, dup=True, packet_id=7, properties=props)
    assert pub.encode(MQTT_5) == wire


def test_acks_and_subscribe_vectors() -> None:
    assert decode_ack(one(b"\x40\x02\x00\x09")) == Ack(PacketType.PUBACK, 9)
    assert Ack(PacketType.PUBREL, 9).encode() == b"\x62\x02\x00\x09"  # PUBREL's reserved flags are 0010
    v5_puback = b"\x40\x03\x00\x09\x10"  # reason code 0x10: no matching subscribers
    assert decode_ack(one(v5_puback)) == Ack(PacketType.PUBACK, 9, b"\x10")
    sub = b"\x82\x08\x00\x01\x00\x03a/#\x01"
    assert decode_subscribe(one(sub), MQTT_311) == Subscribe(1, (("a/#", 1),))


def test_publish_qos3_and_bad_utf8_are_refused() -> None:
    with pytest.raises(MalformedPacket, match="QoS 3"):
        decode_publish(RawPacket(PacketType.PUBLISH, 0b0110, b"\x00\x01a\x00\x01"), MQTT_311)
    with pytest.raises(MalformedPacket, match="UTF-8"):
        decode_publish(RawPacket(PacketType.PUBLISH, 0, b"\x00\x01\xff"), MQTT_311)


def test_a_packet_over_the_limit_is_refused_before_its_body_arrives() -> None:
    header = b"\x30" + encode_varint(1_000_000)
    with pytest.raises(PacketTooLarge):
        split_packet(header, max_size=65_536)


def test_type_zero_is_refused() -> None:
    with pytest.raises(MalformedPacket):
        split_packet(b"\x00\x00")


# -- Hypothesis --------------------------------------------------------------------------------

topics = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
payloads = st.binary(max_size=300)
packet_ids = st.integers(1, 0xFFFF)


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        topic=draw(topics),
        payload=draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()),
        packet_id=draw(packet_ids) if qos else None,
        properties=draw(st.binary(max_size=20)) if version == MQTT_5 else b"",
    )


@given(st.sampled_from(VERSIONS).flatmap(lambda v: st.tuples(st.just(v), publishes(v))))
def test_publish_round_trips(case: tuple[int, Publish]) -> None:
    version, pub = case
    assert decode_publish(one(pub.encode(version)), version) == pub


@given(
    st.sampled_from(sorted(t for t in PacketType if PacketType.PUBACK <= t <= PacketType.PUBCOMP)),
    packet_ids,
    st.binary(max_size=10),
)
def test_ack_round_trips(kind: PacketType, packet_id: int, rest: bytes) -> None:
    ack = Ack(kind, packet_id, rest)
    assert decode_ack(one(ack.encode())) == ack


@given(
    st.sampled_from(VERSIONS),
    packet_ids,
    st.lists(st.tuples(topics, st.integers(0, 255)), min_size=1, max_size=4),
)
def test_subscribe_round_trips(version: int, packet_id: int, filters: list[tuple[str, int]]) -> None:
    sub = Subscribe(packet_id, tuple(filters), b"\x0b\x01" if version == MQTT_5 else b"")
    assert decode_subscribe(one(sub.encode(version)), version) == sub


@given(st.lists(st.sampled_from(VERSIONS).flatmap(publishes), max_size=6), st.data())
def test_a_stream_cut_anywhere_gives_the_same_packets(pubs: list[Publish], data: st.DataObject) -> None:
    """The proxy reads whatever TCP hands it: packets must come out whole, however the bytes arrive."""
    stream = b"".join(p.encode(MQTT_5) for p in pubs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    buf, got = bytearray(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buf += stream[start:end]
        while (split := split_packet(buf)) is not None:  # bounded: each turn removes a packet
            packet, used = split
            del buf[:used]
            got.append(decode_publish(packet, MQTT_5))
    assert got == pubs
    assert not buf


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(VERSIONS))
def test_arbitrary_bytes_give_a_packet_more_needed_or_a_typed_error(junk: bytes, version: int) -> None:
    """Never an IndexError, UnicodeDecodeError or ValueError escaping: the proxy relies on it."""
    try:
        split = split_packet(junk)
        if split is None:
            return
        packet, used = split
        assert 0 < used <= len(junk)
        if packet.type is PacketType.CONNECT:
            decode_connect(packet)
        elif packet.type is PacketType.PUBLISH:
            decode_publish(packet, version)
        elif PacketType.PUBACK <= packet.type <= PacketType.PUBCOMP:
            decode_ack(packet)
        elif packet.type is PacketType.SUBSCRIBE:
            decode_subscribe(packet, version)
    except Malformed:
        pass


@given(st.binary(min_size=1, max_size=60), st.sampled_from(VERSIONS))
def test_publish_bodies_decode_or_refuse(body: bytes, version: int) -> None:
    """Bodies with a valid frame around them: the decoder itself must refuse, not crash."""
    for flags in (0, 0b0010, 0b0100):
        try:
            pub = decode_publish(RawPacket(PacketType.PUBLISH, flags, body), version)
        except MalformedPacket:
            continue
        assert decode_publish(one(pub.encode(version)), version) == pub
