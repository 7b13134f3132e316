"""The operator's side of a wrong device clock: the attack verdict, and the command-line options."""

from __future__ import annotations

import argparse

import pytest

from ops.attack.frames import AttackerIdentity
from ops.attack.verdict import Sent, Sightings, digest, outcome
from ops.monitor.model import Anchors, Monitor
from ops.up_cmd import clock_offset
from protocol.certs import sign_revocations
from protocol.envelope import sign_frame
from protocol.messages import Refusal
from protocol.topics import Role

from ..protocol.factory import NOW_MS, NOW_S, Pki, envelope, topic_between

PKI = Pki()
TM, CLIENT = PKI.node(Role.TRUST_MODULE), PKI.node(Role.CLIENT)
TO_TM = topic_between(CLIENT, TM)


def sightings() -> Sightings:
    crl = sign_revocations(1, NOW_S - 10, (), PKI.root_keys)
    return Sightings(Monitor(Anchors(PKI.root, PKI.update, PKI.platform, crl), NOW_MS - 1000))


def refusal_to(request_id: bytes) -> bytes:
    body = Refusal("clock_skew", "your clock is 60.0 s ahead of the trust-module's; set the device's clock")
    env = envelope(TM, CLIENT, "error", body, reply_to=request_id)
    return sign_frame(env, topic_between(TM, CLIENT), TM.keys)


@pytest.mark.parametrize(("ahead_ms", "accepted"), [(60_000, False), (0, True)])
def test_a_clock_skew_refusal_of_a_stale_probe_is_no_acceptance_but_a_refusal_of_a_fresh_one_is(
    ahead_ms: int, accepted: bool
) -> None:
    seen = sightings()
    attacker = AttackerIdentity(CLIENT.name, CLIENT.keys, CLIENT.chain, epoch=7)
    env, frame = attacker.ping(TO_TM, TM.name, NOW_MS + ahead_ms)
    seen.add(TO_TM, frame, NOW_MS)
    seen.add(topic_between(TM, CLIENT), refusal_to(env.message_id), NOW_MS)
    probe = Sent("ping", TO_TM, TM.name, digest(frame), len(frame), env.message_id.hex())
    out = outcome(probe, seen.seen)
    assert out.answers == ("error (ok)",)
    assert out.accepted is accepted and (out.monitor == "stale") is not accepted


def test_clock_offset_is_device_equals_signed_milliseconds() -> None:
    assert clock_offset("dev-0001=-40000") == ("dev-0001", -40_000)
    assert clock_offset("dev-0002=40000") == ("dev-0002", 40_000)
    for bad in ("dev-0001", "=5", "dev-0001=ten", "dev-0001=1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            clock_offset(bad)
