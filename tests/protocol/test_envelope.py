"""Signed frames: round trips, sealing, tamper evidence, topic binding and the ordered checks."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol.certs import sign_revocations
from protocol.codec import pack
from protocol.envelope import MAX_FRAME, SealedBody, SenderClockSkewed, SenderRevoked, Verifier
from protocol.errors import (
    BadSignature,
    CertificateExpired,
    Duplicate,
    Malformed,
    NotForMe,
    Rejected,
    Replayed,
    SealError,
    Stale,
    TooLarge,
    UnknownSender,
    UnknownType,
    UnknownVersion,
    WrongRole,
    WrongTopic,
)
from protocol.keys import SIGNATURE_SIZE
from protocol.messages import MESSAGE_TYPES, Empty, PayStart, Ping, Refusal, Status
from protocol.replay import OutsideWindow, ReplayGuard
from protocol.schema import to_map
from protocol.seal import unseal
from protocol.topics import Role, channel_topic, link_topic

from .factory import (
    NOW_MS,
    NOW_S,
    Identity,
    Pki,
    envelope,
    envelope_fields,
    exactly,
    example,
    raw_frame,
    routes_for,
    sample_bodies,
    sign,
    topic_between,
    verifier,
    with_ops_recipient,
)

PKI = Pki()
BODIES = sample_bodies(PKI)
TM = PKI.node(Role.TRUST_MODULE)
CHIP = PKI.node(Role.CHIP)
CLIENT = PKI.node(Role.CLIENT)
TS = PKI.node(Role.TRUST_SERVER)
PS = PKI.node(Role.PAYMENT_SERVER)
TM2 = PKI.node(Role.TRUST_MODULE, "d2")
MONITOR = PKI.node(Role.MONITOR)

TM_TS = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "d1")
TS_TM = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "d1")

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame_for(sender: Identity, receiver: Identity, type_: str, body=None, topic: str | None = None, **kw):
    topic = topic or topic_between(sender, receiver)
    env = envelope(sender, receiver, type_, BODIES[type_] if body is None else body, **kw)
    return sign(env, topic, sender, receiver), topic, env


def flip(frame: bytes, bit: int) -> bytes:
    out = bytearray(frame)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- round trips -------------------------------------------------------------------------
ROUTES = [
    (name, with_ops_recipient(route, PKI))
    for name, spec in sorted(MESSAGE_TYPES.items())
    for route in routes_for(PKI, spec.links, spec.channels)
]


@pytest.mark.parametrize(
    ("type_", "route"),
    ROUTES,
    ids=[f"{name}:{route.topic.removeprefix('tp/v1/')}" for name, route in ROUTES],
)
def test_round_trip_every_type_on_every_route(type_, route):
    env = envelope(route.sender, route.receiver or "anyone", type_, BODIES[type_])
    frame = sign(env, route.topic, route.sender, route.receiver)
    got = verifier(PKI, route.receiver).open(frame, route.topic, NOW_MS)
    assert got.envelope == env
    assert got.sender_cert == route.sender.cert
    assert got.frame == frame
    assert got.topic.src.value == route.sender.role


def test_all_types_covered_by_round_trip():
    assert {name for name, _ in ROUTES} == set(MESSAGE_TYPES)
    assert all(MESSAGE_TYPES[name].links or MESSAGE_TYPES[name].channels for name in MESSAGE_TYPES)


SEALED = sorted(name for name, spec in MESSAGE_TYPES.items() if spec.sealed)


@pytest.mark.parametrize("type_", SEALED)
def test_sealed_body_hidden_from_monitor_and_third_parties(type_):
    spec = MESSAGE_TYPES[type_]
    src, dst = sorted(spec.links)[0]
    sender, receiver = PKI.node(src), PKI.node(dst)
    frame, topic, env = frame_for(sender, receiver, type_)
    plain = pack(to_map(env.body))
    assert plain not in frame

    # the recipient reads it
    assert verifier(PKI, receiver).open(frame, topic, NOW_MS).envelope.body == env.body
    # a monitor without keys sees the ciphertext only, and that ciphertext is the recipient's to open
    seen = verifier(PKI, None, replay=False).open(frame, topic, NOW_MS).envelope.body
    assert isinstance(seen, SealedBody)
    assert unseal(seen.ciphertext, receiver.keys, sender.box_public) == plain
    # a third party holding keys of its own cannot open it
    pool = (MONITOR, TM2, TS, PS, CLIENT, CHIP, TM)
    others = [p for p in pool if p.name not in (sender.name, receiver.name)]
    assert len(others) == 5
    for other in others:
        with pytest.raises(SealError):
            verifier(PKI, None, replay=False, keys=other.keys).open(frame, topic, NOW_MS)


def test_sealed_type_needs_peer_key():
    env = envelope(CLIENT, CHIP, "pay.start", BODIES["pay.start"])
    with exactly(Malformed):
        sign(env, topic_between(CLIENT, CHIP), CLIENT, None)


def test_sealed_to_wrong_peer_fails_for_recipient():
    env = envelope(CLIENT, CHIP, "pay.start", BODIES["pay.start"])
    topic = topic_between(CLIENT, CHIP)
    frame = sign(env, topic, CLIENT, TM)  # boxed for the trust module, addressed to the chip
    with exactly(SealError):
        verifier(PKI, CHIP).open(frame, topic, NOW_MS)


def test_sealed_body_tamper_after_signing_is_bad_signature_not_seal_error():
    frame, topic, _ = frame_for(CLIENT, CHIP, "pay.start")
    # flip the last byte of the ciphertext, which sits right before the signature
    with exactly(BadSignature):
        verifier(PKI, CHIP).open(flip(frame, (len(frame) - SIGNATURE_SIZE - 1) * 8), topic, NOW_MS)


def test_body_of_wrong_type_refused_at_signing():
    env = envelope(TM, TS, "c1.check", Ping(b"x"))
    with exactly(Malformed):
        sign(env, TM_TS, TM)


# -- tamper evidence ------------------------------------------------------------------
DEVICE_FRAME, _, _ = frame_for(TM, TS, "c2.evidence")  # sealed, device chain
SERVER_FRAME, _, _ = frame_for(TS, TM, "c1.result")  # server chain of two certificates
SMALL_FRAME, _, _ = frame_for(TM, TS, "ping")
TAMPER_CASES = [(DEVICE_FRAME, TM_TS, TS), (SERVER_FRAME, TS_TM, TM), (SMALL_FRAME, TM_TS, TS)]


def _assert_flip_rejected(frame: bytes, topic: str, receiver: Identity, bit: int, store=None) -> None:
    v = verifier(PKI, receiver, store=store)
    try:
        v.open(flip(frame, bit), topic, NOW_MS)
    except Rejected as exc:
        if bit >= (len(frame) - SIGNATURE_SIZE) * 8:
            assert type(exc) is BadSignature, f"bit {bit} in the signature gave {exc!r}"
    else:
        pytest.fail(f"frame with bit {bit} flipped was accepted")


@pytest.mark.parametrize("case", range(len(TAMPER_CASES)), ids=["device-sealed", "server", "small"])
@FUZZ
@given(data=st.data())
def test_any_single_bit_flip_is_rejected(case, data):
    frame, topic, receiver = TAMPER_CASES[case]
    bit = data.draw(st.integers(0, len(frame) * 8 - 1), label="bit")
    _assert_flip_rejected(frame, topic, receiver, bit)


@pytest.mark.parametrize("case", range(len(TAMPER_CASES)), ids=["device-sealed", "server", "small"])
def test_every_single_bit_flip_is_rejected_exhaustive(case):
    frame, topic, receiver = TAMPER_CASES[case]
    assert verifier(PKI, receiver).open(frame, topic, NOW_MS)  # the untouched frame is fine
    store = PKI.store()
    for bit in range(len(frame) * 8):
        _assert_flip_rejected(frame, topic, receiver, bit, store)


@pytest.mark.parametrize("case", range(len(TAMPER_CASES)), ids=["device-sealed", "server", "small"])
def test_truncation_at_every_length_is_rejected(case):
    frame, topic, receiver = TAMPER_CASES[case]
    store = PKI.store()
    for n in range(len(frame)):
        with pytest.raises(Rejected):
            verifier(PKI, receiver, store=store).open(frame[:n], topic, NOW_MS)
    for n in range(SIGNATURE_SIZE + 1):
        with exactly(Malformed):
            verifier(PKI, receiver, store=store).open(frame[:n], topic, NOW_MS)


@FUZZ
@given(extra=st.binary(min_size=1, max_size=200))
def test_extension_with_any_bytes_is_rejected(extra):
    with pytest.raises(Rejected):
        verifier(PKI, TS).open(SMALL_FRAME + extra, TM_TS, NOW_MS)


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0" * SIGNATURE_SIZE, bytes(65)])
def test_extension_examples(extra):
    with pytest.raises(Rejected):
        verifier(PKI, TS).open(DEVICE_FRAME + extra, TM_TS, NOW_MS)


def test_signature_swapped_between_frames_rejected():
    other, _, _ = frame_for(TM, TS, "ping")
    forged = SMALL_FRAME[:-SIGNATURE_SIZE] + other[-SIGNATURE_SIZE:]
    with exactly(BadSignature):
        verifier(PKI, TS).open(forged, TM_TS, NOW_MS)


# -- topic binding --------------------------------------------------------------------
def test_device_frame_on_another_device_topic():
    frame, _, _ = frame_for(TM, TS, "c1.check")
    with exactly(WrongTopic):
        verifier(PKI, TS).open(frame, link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "d2"), NOW_MS)


def test_server_frame_on_another_device_topic():
    frame, _, _ = frame_for(TS, TM, "c2.challenge")
    d2 = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "d2")
    # the server's certificate fits any device: only the signed topic stops it
    with exactly(BadSignature):
        verifier(PKI, TM2).open(frame, d2, NOW_MS)


def test_frame_in_the_other_direction():
    frame, _, _ = frame_for(TM, TS, "c1.check")
    with exactly(WrongTopic):
        verifier(PKI, TS).open(frame, TS_TM, NOW_MS)


def test_ping_in_the_other_direction_is_wrong_role():
    frame, _, _ = frame_for(TM, TS, "ping")  # ping may travel on every link
    with exactly(WrongRole):
        verifier(PKI, TS).open(frame, TS_TM, NOW_MS)


def test_frame_on_another_link_of_the_same_sender():
    frame, _, _ = frame_for(TM, TS, "c1.check")
    with exactly(WrongTopic):
        verifier(PKI, CHIP).open(frame, link_topic(Role.TRUST_MODULE, Role.CHIP, "d1"), NOW_MS)


def test_ping_on_another_link_of_the_same_sender_is_bad_signature():
    frame, _, _ = frame_for(TM, TS, "ping")
    with exactly(BadSignature):
        verifier(PKI, None).open(frame, link_topic(Role.TRUST_MODULE, Role.CHIP, "d1"), NOW_MS)


def test_frame_on_a_channel_topic():
    frame, _, _ = frame_for(TM, TS, "ping")
    with exactly(WrongTopic):
        verifier(PKI, None).open(frame, channel_topic(Role.TRUST_MODULE, "status", "d1"), NOW_MS)


def test_status_from_the_wrong_role_channel():
    env = envelope(TM, "monitor", "status", BODIES["status"])
    frame = sign(env, channel_topic(Role.TRUST_MODULE, "status", "d1"), TM)
    with exactly(WrongRole):
        verifier(PKI, None).open(frame, channel_topic(Role.CHIP, "status", "d1"), NOW_MS)


@pytest.mark.parametrize(
    "topic", ["", "tp/v1", "tp/v2/dev/d1/tm/ts", "tp/v1/dev/d1/tm/xx", "tp/v1/dev/d+/tm/ts"]
)
def test_not_a_topic(topic):
    with exactly(WrongTopic):
        verifier(PKI, TS).open(SMALL_FRAME, topic, NOW_MS)


# -- the ordered checks ------------------------------------------------------------------
def test_wrong_recipient():
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    with exactly(NotForMe):
        verifier(PKI, PS).open(frame, topic, NOW_MS)
    env = envelope(TM, "payment-server", "c1.check", BODIES["c1.check"])
    with exactly(NotForMe):
        verifier(PKI, TS).open(sign(env, TM_TS, TM), TM_TS, NOW_MS)


def test_unknown_type():
    env = envelope(TM, TS, "ping", BODIES["ping"])
    fields = envelope_fields(env, pack(to_map(env.body)))
    fields[1] = "c9.nope"
    with exactly(UnknownType):
        verifier(PKI, TS).open(raw_frame(fields, TM_TS, TM.keys), TM_TS, NOW_MS)
    with exactly(UnknownType):
        sign(dataclasses.replace(env, type="c9.nope"), TM_TS, TM)


def test_version_2():
    env = envelope(TM, TS, "ping", BODIES["ping"], version=2)
    with exactly(UnknownVersion):
        verifier(PKI, TS).open(sign(env, TM_TS, TM), TM_TS, NOW_MS)


def test_no_chain():
    frame, topic, _ = frame_for(TM, TS, "c1.check", chain=())
    with exactly(UnknownSender):
        verifier(PKI, TS).open(frame, topic, NOW_MS)


def test_chain_of_another_node():
    # claims to be d1.tm, carries (and signs with) d1.chip's certificate
    env = dataclasses.replace(envelope(TM, TS, "c1.check", BODIES["c1.check"]), chain=CHIP.chain)
    with exactly(UnknownSender):
        verifier(PKI, TS).open(sign(env, TM_TS, CHIP), TM_TS, NOW_MS)
    # carries d2.tm's certificate while claiming to be d1.tm
    env = dataclasses.replace(envelope(TM, TS, "c1.check", BODIES["c1.check"]), chain=TM2.chain)
    with exactly(UnknownSender):
        verifier(PKI, TS).open(sign(env, TM_TS, TM2), TM_TS, NOW_MS)


def test_chain_of_another_node_signed_with_own_key_is_bad_signature():
    # d1.tm's name and chain, but d2.tm's signing key
    env = envelope(TM, TS, "c1.check", BODIES["c1.check"])
    with exactly(BadSignature):
        verifier(PKI, TS).open(sign(env, TM_TS, TM2), TM_TS, NOW_MS)


def test_device_cert_sending_as_server():
    env = envelope(TM, TM, "c1.result", BODIES["c1.result"])
    with exactly(WrongRole):
        verifier(PKI, TM).open(sign(env, TS_TM, TM), TS_TM, NOW_MS)


def test_server_cert_sending_as_device():
    topic = link_topic(Role.CHIP, Role.PAYMENT_SERVER, "d1")
    env = envelope(PS, PS, "pay.order", BODIES["pay.order"])
    with exactly(WrongRole):
        verifier(PKI, PS).open(sign(env, topic, PS, PS), topic, NOW_MS)


def test_operator_and_monitor_cannot_send_on_links():
    op = PKI.node(Role.OPERATOR)
    for sender in (op, MONITOR):
        env = envelope(sender, TS, "ping", BODIES["ping"])
        with exactly(WrongRole):
            verifier(PKI, TS).open(sign(env, TM_TS, sender), TM_TS, NOW_MS)


def test_expired_and_revoked_sender():
    old = PKI.device_node(Role.TRUST_MODULE, "d1", not_after=NOW_S - 1)
    frame, topic, _ = frame_for(old, TS, "c1.check")
    with exactly(CertificateExpired):
        verifier(PKI, TS).open(frame, topic, NOW_MS)

    frame, topic, env = frame_for(TM, TS, "c1.check")
    store = PKI.store()
    store.set_revocations(sign_revocations(1, NOW_S, (TM.cert.serial,), PKI.root_keys), NOW_S)
    with exactly(SenderRevoked) as info:
        verifier(PKI, TS, store=store).open(frame, topic, NOW_MS)
    # what the receiver needs to answer the sender, and nothing decoded from the body
    revoked = info.value.received
    assert (revoked.envelope.message_id, revoked.envelope.sender) == (env.message_id, TM.name)
    assert revoked.sender_cert == TM.cert and isinstance(revoked.envelope.body, bytes)


def test_revoked_sender_is_named_only_after_its_signature_and_freshness_verify():
    """Only the holder of the revoked key can draw a "revoked" answer: a forged or replayed
    frame under a revoked certificate fails as any forged or replayed frame does."""
    store = PKI.store()
    store.set_revocations(sign_revocations(1, NOW_S, (TM.cert.serial,), PKI.root_keys), NOW_S)
    guard = ReplayGuard(floor_ms=0)
    receiver = Verifier(frozenset({TS.name}), store, guard, keys=TS.keys)
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    with exactly(BadSignature):
        receiver.open(flip(frame, len(frame) * 8 - 1), topic, NOW_MS)
    with exactly(SenderRevoked):
        receiver.open(frame, topic, NOW_MS)
    with exactly(Duplicate):
        receiver.open(frame, topic, NOW_MS)
    stale, topic, _ = frame_for(TM, TS, "c1.check", ts_ms=NOW_MS - 60_000)
    with exactly(OutsideWindow):  # not SenderClockSkewed: a revoked sender draws no clock_skew answer
        receiver.open(stale, topic, NOW_MS)


def test_revocation_applies_to_a_cached_sender():
    store = PKI.store()
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    verifier(PKI, TS, store=store).open(frame, topic, NOW_MS)
    store.set_revocations(sign_revocations(1, NOW_S, (TM.cert.serial,), PKI.root_keys), NOW_S)
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    with exactly(SenderRevoked):
        verifier(PKI, TS, store=store).open(frame, topic, NOW_MS)


def test_stale_and_future():
    # 30 s behind, but only 5 s ahead (ReplayGuard's defaults)
    for ts in (NOW_MS - 30_001, NOW_MS + 5_001, NOW_MS - 3_600_000, 0):
        frame, topic, _ = frame_for(TM, TS, "c1.check", ts_ms=ts)
        with exactly(SenderClockSkewed) as info:
            verifier(PKI, TS, floor_ms=0).open(frame, topic, NOW_MS)
        assert info.value.ahead_ms == ts - NOW_MS and info.value.received.frame == frame
    for ts in (NOW_MS - 30_000, NOW_MS + 5_000):
        frame, topic, _ = frame_for(TM, TS, "c1.check", ts_ms=ts)
        assert verifier(PKI, TS, floor_ms=0).open(frame, topic, NOW_MS)


def test_exact_duplicate_is_quiet():
    v = verifier(PKI, TS)
    frame, topic, env = frame_for(TM, TS, "c1.check")
    v.open(frame, topic, NOW_MS)
    with exactly(Duplicate) as info:
        v.open(frame, topic, NOW_MS + 5)
    assert info.value.alarm is False
    assert info.value.message_id == env.message_id
    assert Replayed.alarm is True


def test_same_seq_new_id_is_replayed():
    v = verifier(PKI, TS)
    frame, topic, _ = frame_for(TM, TS, "c1.check", seq=7)
    v.open(frame, topic, NOW_MS)
    again, _, _ = frame_for(TM, TS, "c1.check", seq=7)
    with exactly(Replayed) as info:
        v.open(again, topic, NOW_MS)
    assert info.value.alarm is True


def test_forged_frame_does_not_poison_the_replay_tables():
    v = verifier(PKI, TS)
    frame, topic, env = frame_for(TM, TS, "c1.check", seq=3)
    forged = frame[:-SIGNATURE_SIZE] + bytes(SIGNATURE_SIZE)
    with exactly(BadSignature):
        v.open(forged, topic, NOW_MS)
    assert v.open(frame, topic, NOW_MS).envelope.message_id == env.message_id


def test_signature_checked_before_recipient_and_replay():
    v = verifier(PKI, PS)
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    with exactly(BadSignature):
        v.open(flip(frame, len(frame) * 8 - 1), topic, NOW_MS)


def test_replay_after_receiver_restart_is_stale():
    frame, topic, _ = frame_for(TM, TS, "c1.check", ts_ms=NOW_MS)
    verifier(PKI, TS).open(frame, topic, NOW_MS)
    restart = NOW_MS + 2_000
    reborn = verifier(PKI, TS, guard=ReplayGuard(floor_ms=restart))
    with exactly(Stale):
        reborn.open(frame, topic, restart + 10)
    fresh, _, _ = frame_for(TM, TS, "c1.check", ts_ms=restart + 5)
    assert reborn.open(fresh, topic, restart + 10)


def test_sender_restart_with_new_epoch():
    v = verifier(PKI, TS)
    for seq in (1, 2, 50):
        v.open(frame_for(TM, TS, "c1.check", epoch=1, seq=seq)[0], TM_TS, NOW_MS)
    v.open(frame_for(TM, TS, "c1.check", epoch=2, seq=1)[0], TM_TS, NOW_MS)
    v.open(frame_for(TM, TS, "c1.check", epoch=2, seq=2)[0], TM_TS, NOW_MS)
    with exactly(Replayed):
        v.open(frame_for(TM, TS, "c1.check", epoch=1, seq=51)[0], TM_TS, NOW_MS)


def test_replay_state_is_per_sender():
    v = verifier(PKI, TS)
    v.open(frame_for(TM, TS, "c1.check", seq=9)[0], TM_TS, NOW_MS)
    d2 = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "d2")
    assert v.open(frame_for(TM2, TS, "c1.check", seq=9, topic=d2)[0], d2, NOW_MS)


def test_huge_sequence_number_is_handled():
    """A signed frame with seq near 2**63 must be accepted or Rejected, never crash the receiver."""
    v = verifier(PKI, TS)
    v.open(frame_for(TM, TS, "c1.check", seq=1)[0], TM_TS, NOW_MS)
    try:
        v.open(frame_for(TM, TS, "c1.check", seq=2**63 - 1)[0], TM_TS, NOW_MS)
    except Rejected:
        return
    with exactly(Replayed):  # accepted: everything below it is now out of the window
        v.open(frame_for(TM, TS, "c1.check", seq=2)[0], TM_TS, NOW_MS)


# -- malformed headers ---------------------------------------------------------------
def _with_fields(edit) -> bytes:
    env = envelope(TM, TS, "c1.check", BODIES["c1.check"])
    fields = envelope_fields(env, pack(to_map(env.body)))
    edit(fields)
    return raw_frame(fields, TM_TS, TM.keys)


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("short id", lambda f: f.__setitem__(2, b"x" * 15)),
        ("long id", lambda f: f.__setitem__(2, b"x" * 17)),
        ("negative seq", lambda f: f.__setitem__(9, -1)),
        ("negative epoch", lambda f: f.__setitem__(8, -1)),
        ("negative time", lambda f: f.__setitem__(7, -1)),
        ("bool version", lambda f: f.__setitem__(0, True)),
        ("bool seq", lambda f: f.__setitem__(9, True)),
        ("str id", lambda f: f.__setitem__(2, "x" * 16)),
        ("five certs", lambda f: f.__setitem__(10, f[10] * 5)),
        ("non-bytes cert", lambda f: f.__setitem__(10, ["cert"])),
        ("str body", lambda f: f.__setitem__(11, "body")),
        ("extra field", lambda f: f.append(b"")),
        ("missing field", lambda f: f.pop()),
        ("body not msgpack", lambda f: f.__setitem__(11, b"\xc1")),
        ("body not a map", lambda f: f.__setitem__(11, pack([1]))),
        ("body extra field", lambda f: f.__setitem__(11, pack({"serial": 1, "fingerprint": b"h", "x": 1}))),
        ("body wrong field type", lambda f: f.__setitem__(11, pack({"serial": "1", "fingerprint": b"h"}))),
        ("cert not a cert", lambda f: f.__setitem__(10, [pack({"body": 1})])),
    ],
)
def test_malformed_header_or_body(name, edit):
    with exactly(Malformed):
        verifier(PKI, TS).open(_with_fields(edit), TM_TS, NOW_MS)


def test_envelope_not_an_array():
    frame = raw_frame({"version": 1}, TM_TS, TM.keys)  # type: ignore[arg-type]
    with exactly(Malformed):
        verifier(PKI, TS).open(frame, TM_TS, NOW_MS)


def test_too_large():
    env = envelope(TM, "monitor", "status", example(Status, text="x" * 1000))
    topic = channel_topic(Role.TRUST_MODULE, "status", "d1")
    frame = sign(env, topic, TM)
    assert verifier(PKI, None).open(frame, topic, NOW_MS)
    with exactly(TooLarge):
        verifier(PKI, None).open(frame + bytes(MAX_FRAME), topic, NOW_MS)
    with exactly(TooLarge):
        body = example(PayStart, blob=b"x" * MAX_FRAME)
        sign(envelope(CLIENT, CHIP, "pay.start", body), topic_between(CLIENT, CHIP), CLIENT, CHIP)


def test_not_bytes():
    with exactly(Malformed):
        verifier(PKI, TS).open("frame", TM_TS, NOW_MS)  # type: ignore[arg-type]
    assert verifier(PKI, TS).open(bytearray(SMALL_FRAME), TM_TS, NOW_MS)


def test_monitor_accepts_any_recipient_without_replay_state():
    mon = Verifier(frozenset(), PKI.store(), None)
    frame, topic, _ = frame_for(TM, TS, "c1.check")
    assert mon.open(frame, topic, NOW_MS)
    assert mon.open(frame, topic, NOW_MS)  # no guard: a retained frame may be seen again


# -- fuzzing --------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_only_raise_rejected(data):
    with pytest.raises(Rejected):
        verifier(PKI, TS).open(data, TM_TS, NOW_MS)


@FUZZ
@given(frame=st.sampled_from([SMALL_FRAME, DEVICE_FRAME]), data=st.data())
def test_random_byte_edits_only_raise_rejected(frame, data):
    pos = data.draw(st.integers(0, len(frame) - 1))
    repl = data.draw(st.binary(min_size=0, max_size=8))
    edited = frame[:pos] + repl + frame[pos + 1 :]
    assume(edited != frame)
    with pytest.raises(Rejected):
        verifier(PKI, TS).open(edited, TM_TS, NOW_MS)


int64 = st.integers(-(2**63), 2**63 - 1)
scalar = st.none() | st.booleans() | int64 | st.binary(max_size=20) | st.text(max_size=8)
field = scalar | st.lists(scalar, max_size=3) | st.dictionaries(st.text(max_size=5), scalar, max_size=3)


@FUZZ
@given(
    type_=st.sampled_from(sorted(MESSAGE_TYPES)),
    body=st.binary(max_size=64) | st.builds(lambda d: pack(d), st.dictionaries(st.text(max_size=12), field)),
    edits=st.dictionaries(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 9]), field, max_size=2),
)
def test_signed_garbage_only_raises_rejected(type_, body, edits):
    """Frames correctly signed by a real sender but carrying nonsense never crash the receiver."""
    env = envelope(TM, TS, "ping", Ping(b""))
    fields = envelope_fields(env, body)
    fields[1] = type_
    for index, value in edits.items():
        fields[index] = value
    try:
        frame = raw_frame(fields, TM_TS, TM.keys)
    except Rejected:
        return
    with contextlib.suppress(Rejected):
        verifier(PKI, TS).open(frame, TM_TS, NOW_MS)


def test_empty_body_types():
    frame, topic, _ = frame_for(TM, CHIP, "chip.info")
    assert verifier(PKI, CHIP).open(frame, topic, NOW_MS).envelope.body == Empty()


def test_a_frame_refused_only_by_its_stamp_is_handed_back_verified_with_its_body_undecoded():
    body = Refusal("clock_skew", "your clock is 40.0 s behind")
    frame, topic, env = frame_for(TS, TM, "refusal", body, ts_ms=NOW_MS + 40_000)
    receiver = verifier(PKI, TM, floor_ms=0)
    with exactly(SenderClockSkewed) as info:
        receiver.open(frame, topic, NOW_MS)
    held = info.value.received
    assert held.sender_cert == TS.cert and isinstance(held.envelope.body, bytes)  # still sealed
    assert receiver.decode(held).envelope == env
    with exactly(Malformed):
        receiver.decode(receiver.decode(held))
    assert receiver.guard is not None and receiver.guard.tracked_ids == 0  # its id was not recorded


def test_only_the_time_window_hands_a_frame_back():
    """A forged, misaddressed or replayed frame stamped outside the window fails as before."""
    frame, topic, _ = frame_for(TS, TM, "refusal", Refusal("clock_skew", "x"), ts_ms=NOW_MS + 40_000)
    receiver = verifier(PKI, TM, floor_ms=0)
    with exactly(BadSignature):
        receiver.open(flip(frame, len(frame) * 8 - 1), topic, NOW_MS)
    with exactly(NotForMe):
        verifier(PKI, TM2, floor_ms=0).open(frame, topic, NOW_MS)
    with exactly(WrongRole):  # moved to another link
        receiver.open(frame, TM_TS, NOW_MS)
    within, _, env = frame_for(TS, TM, "refusal", Refusal("clock_skew", "x"), ts_ms=NOW_MS)
    receiver.open(within, topic, NOW_MS)
    replayed = frame_for(
        TS, TM, "refusal", Refusal("clock_skew", "x"), ts_ms=NOW_MS + 40_000, message_id=env.message_id
    )[0]
    with exactly(Duplicate):  # an id already seen is a duplicate whatever its stamp
        receiver.open(replayed, topic, NOW_MS)
