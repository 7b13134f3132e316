"""The attack toolkit's frames and verdicts, with no broker and no event loop.

Frames come from :mod:`ops.attack.frames`, go through the monitor's real
model (:class:`ops.monitor.model.Monitor`) and are judged by
:mod:`ops.attack.verdict`, so a verdict here is the one a live run would give
for the same frames. Each judging rule gets a case where it must say
NOT DEFENDED: the verdicts are worked out, not fixed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ops.attack.attacks import load_recording
from ops.attack.frames import ALTERABLE, AttackerIdentity, altered, forged_ping, garbage, oversize
from ops.attack.verdict import DEFENDED, NOT_DEFENDED, NOT_DELIVERED, Report, Sent, Sightings, digest, outcome
from ops.monitor import recording
from ops.monitor.model import Anchors, Monitor
from protocol.certs import sign_revocations
from protocol.envelope import MAX_FRAME, sign_frame
from protocol.errors import Rejected
from protocol.keys import KeyPair
from protocol.messages import Pong
from protocol.topics import Role

from ..protocol.factory import NOW_MS, NOW_S, Pki, envelope, topic_between, verifier

PKI = Pki()
TM, CHIP, CLIENT = (PKI.node(r) for r in (Role.TRUST_MODULE, Role.CHIP, Role.CLIENT))
TO_TM = topic_between(CLIENT, TM)
ALIVE = {"answers_ping": True, "went_offline": False, "restarted": False}
LEDGER = {"before": {"payments": 1, "total": 10}, "after": {"payments": 1, "total": 10}, "as_expected": True}


def attacker() -> AttackerIdentity:
    return AttackerIdentity(CLIENT.name, CLIENT.keys, CLIENT.chain, epoch=7)


def sightings() -> Sightings:
    crl = sign_revocations(1, NOW_S - 10, (), PKI.root_keys)
    return Sightings(Monitor(Anchors(PKI.root, PKI.update, PKI.platform, crl), NOW_MS - 1000))


def sent(label: str, frame: bytes, message_id: bytes, topic: str = TO_TM) -> Sent:
    return Sent(label, topic, TM.name, digest(frame), len(frame), message_id.hex())


def pong_to(request_id: bytes, nonce: bytes) -> bytes:
    env = envelope(TM, CLIENT, "pong", Pong(nonce, TM.name, "trust-module", 1, "ready"), reply_to=request_id)
    return sign_frame(env, topic_between(TM, CLIENT), TM.keys)


def judged(
    *outcomes_: object, after: dict[str, object] = ALIVE, ledger: dict[str, object] = LEDGER
) -> Report:
    report = Report("test", CLIENT.name, TM.name, target_after=dict(after), ledger=dict(ledger))
    report.frames = list(outcomes_)  # type: ignore[arg-type]
    report.judge()
    return report


def test_a_forged_ping_goes_unanswered_and_is_defended_a_genuine_one_is_answered_and_is_not() -> None:
    seen = sightings()
    forged_env, forged = forged_ping(attacker(), TO_TM, TM.name, CHIP.name)  # own key, claims the chip
    made_up_env, made_up = forged_ping(attacker(), TO_TM, TM.name, CLIENT.name, KeyPair.generate())
    genuine_env, genuine = attacker().ping(TO_TM, TM.name, NOW_MS)
    for frame in (forged, made_up, genuine):
        seen.add(TO_TM, frame, NOW_MS)
    seen.add(topic_between(TM, CLIENT), pong_to(genuine_env.message_id, genuine_env.body.nonce), NOW_MS)

    forged_out = outcome(sent("forged", forged, forged_env.message_id), seen.seen)
    made_up_out = outcome(sent("made up", made_up, made_up_env.message_id), seen.seen)
    genuine_out = outcome(sent("genuine", genuine, genuine_env.message_id), seen.seen)

    assert (forged_out.accepted, forged_out.answers) == (False, ())
    assert forged_out.monitor != "ok" and made_up_out.monitor == "bad_signature"
    assert judged(forged_out, made_up_out).verdict == DEFENDED
    assert (genuine_out.accepted, genuine_out.monitor, genuine_out.answers) == (True, "ok", ("pong (ok)",))
    report = judged(forged_out, genuine_out)
    assert report.verdict == NOT_DEFENDED and report.evidence[0].startswith("ACCEPTED genuine")


def test_a_cached_answer_sent_again_is_not_acceptance_a_fresh_answer_is() -> None:
    seen = sightings()
    env, request = attacker().ping(TO_TM, TM.name, NOW_MS)
    answer = pong_to(env.message_id, env.body.nonce)
    seen.add(TO_TM, request, NOW_MS)
    seen.add(topic_between(TM, CLIENT), answer, NOW_MS)
    mark = len(seen.seen)
    seen.add(TO_TM, request, NOW_MS + 5)  # the replay
    seen.add(topic_between(TM, CLIENT), answer, NOW_MS + 6)  # the target re-sends its cached answer

    replayed = outcome(sent("replayed", request, env.message_id), seen.seen[mark:])
    assert replayed.monitor == "replayed" and not replayed.accepted
    assert replayed.answers == ("pong (duplicate, a copy of an earlier answer)",)
    assert judged(replayed).verdict == DEFENDED

    seen.add(topic_between(TM, CLIENT), pong_to(env.message_id, env.body.nonce), NOW_MS + 7)  # a new answer
    assert outcome(sent("replayed", request, env.message_id), seen.seen[mark:]).accepted


def test_silence_alone_is_not_enough_a_gone_target_moved_money_or_failed_check_is_not_defended() -> None:
    nothing = outcome(sent("dropped", b"x", b""), [])
    assert nothing.monitor == NOT_DELIVERED and judged(nothing).verdict == DEFENDED
    assert judged(nothing, after={**ALIVE, "answers_ping": False}).verdict == NOT_DEFENDED
    assert judged(nothing, after={**ALIVE, "restarted": True}).verdict == NOT_DEFENDED
    assert judged(nothing, after={**ALIVE, "went_offline": True}).verdict == NOT_DEFENDED
    moved = {"before": {"total": 10}, "after": {"total": 9}, "as_expected": False}
    assert judged(nothing, ledger=moved).verdict == NOT_DEFENDED
    report = Report("test", CLIENT.name, TM.name, target_after=dict(ALIVE), ledger=dict(LEDGER))
    report.check(False, "the infected app paid")
    assert report.judge() == NOT_DEFENDED and report.evidence[0] == "FAILED: the infected app paid"


def test_every_garbage_shape_and_oversize_frame_is_refused_by_a_receiver_and_named_by_the_monitor() -> None:
    _, genuine = attacker().ping(TO_TM, TM.name, NOW_MS)
    receiver = verifier(PKI, TM)
    seen = sightings()
    shapes = [*garbage(random.Random(1), genuine), ("oversize", oversize(MAX_FRAME + 1))]
    assert len(shapes) >= 20
    for label, frame in shapes:
        with pytest.raises(Rejected):
            receiver.open(frame, TO_TM, NOW_MS)
        assert seen.add(TO_TM, frame, NOW_MS).obs.verdict != "ok", label
    receiver.open(genuine, TO_TM, NOW_MS)  # the frame they were made from passes: the shapes are the cause


@pytest.mark.parametrize("field", ALTERABLE)
def test_a_frame_with_one_field_changed_and_re_signed_with_the_wrong_key_is_refused(field: str) -> None:
    env = envelope(CHIP, TM, "ping", attacker().ping(TO_TM, TM.name)[0].body)
    topic = topic_between(CHIP, TM)
    frame = sign_frame(env, topic, CHIP.keys)
    verifier(PKI, TM).open(frame, topic, NOW_MS)  # the captured frame itself is good

    changed, forged = altered(frame, topic, field, CLIENT.keys)  # the attacker's own key: not the chip's
    assert getattr(changed, field) != getattr(env, field)
    with pytest.raises(Rejected):
        verifier(PKI, TM).open(forged, topic, NOW_MS)
    assert sightings().add(topic, forged, NOW_MS).obs.verdict == "bad_signature"


def test_a_monitor_recording_gives_its_live_frames_to_replay_not_the_retained_ones(tmp_path: Path) -> None:
    _, live = attacker().ping(TO_TM, TM.name, NOW_MS)
    _, retained = attacker().ping(TO_TM, TM.name, NOW_MS)
    crl = sign_revocations(1, NOW_S - 10, (), PKI.root_keys)
    header = recording.Header(NOW_MS, Anchors(PKI.root, PKI.update, PKI.platform, crl))
    path = tmp_path / "run.jsonl"
    path.write_text(
        recording.header_line(header)
        + recording.record_line(recording.Arrival(NOW_MS, TO_TM, True, retained))
        + recording.record_line(recording.Arrival(NOW_MS + 1, TO_TM, False, live))
    )
    assert load_recording(path) == [(TO_TM, live)]
