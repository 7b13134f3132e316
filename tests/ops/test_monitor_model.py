"""The monitor's model: one verdict per crafted frame, its state and summary, and a recording replayed.

No event loop, no broker: frames come from the protocol tests' deterministic PKI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ops.monitor import recording
from ops.monitor.model import Anchors, DeviceState, Monitor, Observation, percentile
from ops.monitor.view import describe
from ops.monitor_cmd import serve_metrics
from protocol.certs import sign_revocations
from protocol.envelope import MAX_FRAME, sign_frame
from protocol.keys import KeyPair
from protocol.messages import (
    Count,
    Measured,
    Metrics,
    NonceRequest,
    Ping,
    RevocationUpdate,
    SessionDone,
    Status,
    StepEvent,
    StepEvents,
)
from protocol.topics import (
    CHANNEL_EVENTS,
    CHANNEL_METRICS,
    CHANNEL_STATUS,
    CRL_TOPIC,
    Role,
    channel_topic,
    link_topic,
)

from ..protocol.factory import (
    NOW_MS,
    NOW_S,
    SESSION,
    Pki,
    envelope,
    envelope_fields,
    make_id,
    raw_frame,
    sign,
    topic_between,
)

PKI = Pki()
TM, CHIP, CLIENT = (PKI.node(r) for r in (Role.TRUST_MODULE, Role.CHIP, Role.CLIENT))
TS = PKI.node(Role.TRUST_SERVER)
ANCHORS = Anchors(PKI.root, PKI.update, PKI.platform, sign_revocations(1, NOW_S - 10, (), PKI.root_keys))
C7_TOPIC = topic_between(CLIENT, TM)


def monitor() -> Monitor:
    return Monitor(ANCHORS, started_ms=NOW_MS)


def c7_done(ts_ms: int = NOW_MS, message_id: bytes | None = None, seq: int | None = None) -> bytes:
    env = envelope(CLIENT, TM, "c7.done", SessionDone(SESSION), ts_ms=ts_ms, message_id=message_id, seq=seq)
    return sign(env, C7_TOPIC, CLIENT)


def event(step: str, outcome: str = "ok", order: str = "o-1", ts_ms: int = NOW_MS) -> tuple[str, bytes]:
    topic = channel_topic(Role.TRUST_MODULE, CHANNEL_EVENTS, "d1")
    body = StepEvent("d1", TM.name, step[0], step, outcome, f"{step} reason", SESSION, order)
    return topic, sign(envelope(TM, "*", "event", body, ts_ms=ts_ms), topic, TM)


def test_a_valid_frame_is_ok_with_its_header() -> None:
    frame = c7_done()
    obs = monitor().observe(C7_TOPIC, frame, NOW_MS + 5)
    assert (obs.verdict, obs.reason) == ("ok", "")
    assert (obs.device, obs.src, obs.dst, obs.type) == ("d1", "client", "trust-module", "c7.done")
    assert (obs.sender, obs.recipient, obs.session) == (CLIENT.name, TM.name, SESSION.hex())
    assert (obs.size, obs.sealed, obs.retained, obs.link) == (len(frame), False, False, "client->tm")


def test_a_sealed_frame_is_ok_and_stays_sealed() -> None:
    topic = topic_between(TM, TS)
    frame = sign(envelope(TM, TS, "c2.nonce", NonceRequest(b"i" * 32)), topic, TM, TS)
    obs = monitor().observe(topic, frame, NOW_MS)
    assert (obs.verdict, obs.sealed, obs.event, obs.status) == ("ok", True, None, None)


def test_a_frame_signed_with_another_key_is_a_bad_signature() -> None:
    env = envelope(CLIENT, TM, "c7.done", SessionDone(SESSION))
    forged = sign(env, C7_TOPIC, dataclasses.replace(CLIENT, keys=KeyPair.generate()))
    obs = monitor().observe(C7_TOPIC, forged, NOW_MS)
    assert obs.verdict == "bad_signature"
    assert obs.sender == CLIENT.name  # shown from the unverified header


def test_a_frame_with_one_byte_flipped_is_a_bad_signature() -> None:
    frame = bytearray(c7_done())
    at = frame.index(SESSION)  # inside the signed envelope, the structure stays valid
    frame[at] ^= 0x01
    assert monitor().observe(C7_TOPIC, bytes(frame), NOW_MS).verdict == "bad_signature"


def test_a_sender_without_a_certificate_is_unknown() -> None:
    env = dataclasses.replace(envelope(CLIENT, TM, "c7.done", SessionDone(SESSION)), chain=())
    assert monitor().observe(C7_TOPIC, sign(env, C7_TOPIC, CLIENT), NOW_MS).verdict == "unknown_sender"


def test_a_frame_of_a_type_foreign_to_its_link_is_on_the_wrong_topic() -> None:
    wrong = topic_between(CLIENT, CHIP)
    obs = monitor().observe(wrong, c7_done(), NOW_MS)
    assert obs.verdict == "wrong_topic"
    assert f"signed for {C7_TOPIC}" in obs.reason


def test_a_frame_moved_to_another_link_of_its_type_is_on_the_wrong_topic_not_altered() -> None:
    # a ping may travel client->tm and client->chip: the receiver's check sees only a failed signature;
    # the monitor finds the topic the signature holds for (without that search: bad_signature)
    signed_for, moved_to = topic_between(CLIENT, TM), topic_between(CLIENT, CHIP)
    frame = sign(envelope(CLIENT, TM, "ping", Ping(b"n" * 16)), signed_for, CLIENT)
    obs = monitor().observe(moved_to, frame, NOW_MS)
    assert (obs.verdict, obs.reason) == ("wrong_topic", f"signed for {signed_for}, published on {moved_to}")


def test_a_topic_outside_the_tree_is_on_the_wrong_topic_with_no_ends() -> None:
    obs = monitor().observe("tp/v1/nowhere", c7_done(), NOW_MS)
    assert (obs.verdict, obs.src, obs.dst, obs.device) == ("wrong_topic", None, None, None)


def test_an_old_frame_is_stale() -> None:
    assert monitor().observe(C7_TOPIC, c7_done(ts_ms=NOW_MS - 31_000), NOW_MS).verdict == "stale"


def test_an_exact_copy_is_replayed() -> None:
    m, frame = monitor(), c7_done()
    first = m.observe(C7_TOPIC, frame, NOW_MS)
    copy = m.observe(C7_TOPIC, frame, NOW_MS + 2_000)
    assert (first.verdict, copy.verdict) == ("ok", "replayed")
    assert f"exact copy of frame #{first.seq}, first seen 2000 ms earlier" in copy.reason


def test_a_retry_re_signed_under_the_same_id_is_a_duplicate() -> None:
    m, mid = monitor(), make_id()
    m.observe(C7_TOPIC, c7_done(message_id=mid, seq=1), NOW_MS)
    retry = m.observe(C7_TOPIC, c7_done(ts_ms=NOW_MS + 3_000, message_id=mid, seq=2), NOW_MS + 3_000)
    assert retry.verdict == "duplicate"
    assert "a retry of frame #1" in retry.reason


def test_a_cached_answer_re_sent_per_repeated_request_is_a_duplicate_a_further_copy_replayed() -> None:
    m, mid = monitor(), make_id()
    answer_topic = topic_between(TM, CLIENT)
    answer = sign(
        envelope(TM, CLIENT, "measured", Measured("client", True, ""), reply_to=mid), answer_topic, TM
    )
    m.observe(C7_TOPIC, c7_done(message_id=mid, seq=1), NOW_MS)
    m.observe(answer_topic, answer, NOW_MS + 1)
    m.observe(C7_TOPIC, c7_done(ts_ms=NOW_MS + 3_000, message_id=mid, seq=2), NOW_MS + 3_000)
    re_answer = m.observe(answer_topic, answer, NOW_MS + 3_001)
    again = m.observe(answer_topic, answer, NOW_MS + 3_002)
    assert re_answer.verdict == "duplicate" and "cached answer" in re_answer.reason
    assert again.verdict == "replayed"  # two answers to two arrivals of the request; a third has no cause


def test_garbage_is_malformed_and_a_huge_frame_oversize() -> None:
    m = monitor()
    assert m.observe(C7_TOPIC, b"\x93" * 100, NOW_MS).verdict == "malformed"
    huge = m.observe(C7_TOPIC, b"\x00" * (MAX_FRAME + 1), NOW_MS)
    assert (huge.verdict, huge.type, huge.size) == ("oversize", None, MAX_FRAME + 1)


def test_a_revoked_sender_is_named_once_the_revocation_list_arrives() -> None:
    m = monitor()
    crl = sign_revocations(2, NOW_S, (CLIENT.cert.serial,), PKI.root_keys)
    operator = PKI.node(Role.OPERATOR)
    crl_frame = sign(envelope(operator, "*", "crl", RevocationUpdate(crl.to_bytes())), CRL_TOPIC, operator)
    assert m.observe(C7_TOPIC, c7_done(), NOW_MS).verdict == "ok"
    assert m.observe(CRL_TOPIC, crl_frame, NOW_MS + 1, retained=True).verdict == "ok"
    assert m.observe(C7_TOPIC, c7_done(), NOW_MS + 2).verdict == "cert_revoked"


def test_status_is_checked_by_signature_only_even_when_stamped_long_ago() -> None:
    topic = channel_topic(Role.TRUST_SERVER, CHANNEL_STATUS)
    old = NOW_MS - 3_600_000  # a last will, stamped when its node connected
    frame = sign(
        envelope(TS, "*", "status", Status(TS.name, TS.role, "offline", old, "0.1.0", old, True), ts_ms=old),
        topic,
        TS,
    )
    m = monitor()
    obs = m.observe(topic, frame, NOW_MS)
    assert obs.verdict == "ok"
    assert obs.status == {
        "node": TS.name,
        "role": TS.role,
        "state": "offline",
        "at_ms": old,
        "version": "0.1.0",
        "started_ms": old,
        "will": True,
    }
    assert (m.servers[TS.name].status, m.servers[TS.name].sent) == ("offline", 1)


def test_each_server_replica_gets_its_own_row_from_its_own_status() -> None:
    name = "trust-server.2"
    keys = KeyPair.generate()
    cert = PKI.issue_cert(name, TS.role, "", keys, PKI.platform, PKI.platform_keys)
    chain = (cert.to_bytes(), PKI.platform.to_bytes())
    m = monitor()
    # a frame that fails (a forger's key under replica 3's name) makes no row
    forged = dataclasses.replace(
        envelope(
            TS, "*", "status", Status("trust-server.3", TS.role, "online", NOW_MS, "0.1.0", NOW_MS, False)
        ),
        sender="trust-server.3",
        chain=chain,
    )
    assert (
        m.observe(
            "tp/v1/plat/ts/status/3", sign_frame(forged, "tp/v1/plat/ts/status/3", keys), NOW_MS
        ).verdict
        != "ok"
    )
    assert set(m.servers) == {"trust-server", "payment-server"}
    for nid, topic, state, signer in (
        (TS.name, channel_topic(Role.TRUST_SERVER, CHANNEL_STATUS), "online", TS.keys),
        (name, "tp/v1/plat/ts/status/2", "offline", keys),
    ):
        body = Status(nid, TS.role, state, NOW_MS, "0.1.0", NOW_MS - 5, state == "offline")
        env = dataclasses.replace(
            envelope(TS, "*", "status", body), sender=nid, chain=chain if nid == name else TS.chain
        )
        assert m.observe(topic, sign_frame(env, topic, signer), NOW_MS).verdict == "ok"
    # replica 2's last will does not make the role look gone: replica 1 is still online
    assert (m.servers[TS.name].status, m.servers[name].status) == ("online", "offline")
    assert m.servers[name].sent == 1


def test_step_events_fill_the_device_row_and_the_latencies() -> None:
    m = monitor()
    for offset, (step, outcome) in enumerate([("C1", "ok"), ("C4", "trusted"), ("C5", "confirmed")]):
        topic, frame = event(step, outcome, ts_ms=NOW_MS + offset * 10)
        obs = m.observe(topic, frame, NOW_MS + offset * 10 + (offset * offset))
    assert obs.event == {
        "device": "d1",
        "node": TM.name,
        "flow": "C",
        "step": "C5",
        "outcome": "confirmed",
        "reason": "C5 reason",
        "order_id": "o-1",
        "session": SESSION.hex(),
    }
    row = m.devices["d1"]
    assert (row.trust, row.trust_reason) == ("trusted", "C4 reason")
    assert (row.last_order, row.last_order_step, row.last_order_outcome) == ("o-1", "C5", "confirmed")
    assert row.flows["C"].step == "C5"
    assert row.step_ms == {"C4": 11, "C5": 13}  # arrival gaps: 0 -> 11 -> 24


def test_a_batch_of_step_events_counts_as_each_of_its_events_in_order() -> None:
    m = monitor()
    topic = channel_topic(Role.TRUST_MODULE, CHANNEL_EVENTS, "d1")
    steps = [("C1", "ok", ""), ("C4", "trusted", ""), ("C7", "ok", "o-2")]
    body = StepEvents(
        tuple(StepEvent("d1", TM.name, "C", s, o, f"{s} reason", SESSION, order) for s, o, order in steps)
    )
    obs = m.observe(topic, sign(envelope(TM, "*", "events", body), topic, TM), NOW_MS)
    assert (obs.verdict, obs.type) == ("ok", "events")
    assert [e["step"] for e in obs.events] == ["C1", "C4", "C7"] and obs.event == obs.events[-1]
    row = m.devices["d1"]
    assert (row.trust, row.flows["C"].step, row.last_order) == ("trusted", "C7", "o-2")
    assert describe(obs).endswith("C1 ok: C1 reason; C4 trusted: C4 reason; C7 ok: C7 reason order=o-2")


def test_a_batch_signed_by_another_node_is_refused_whole() -> None:
    topic = channel_topic(Role.TRUST_MODULE, CHANNEL_EVENTS, "d1")
    body = StepEvents((StepEvent("d1", TM.name, "C", "C4", "trusted", "forged", SESSION, ""),))
    forged = sign(envelope(TM, "*", "events", body), topic, dataclasses.replace(TM, keys=KeyPair.generate()))
    m = monitor()
    obs = m.observe(topic, forged, NOW_MS)
    assert obs.verdict == "bad_signature" and obs.events == () and obs.event is None
    assert "d1" not in m.devices


def test_a_device_node_cannot_report_steps_of_another_device_or_node() -> None:
    # signed by d1's trust module on d1's topic, but naming d2, or naming d1's chip
    topic = channel_topic(Role.TRUST_MODULE, CHANNEL_EVENTS, "d1")
    body = StepEvents(
        (
            StepEvent("d2", TM.name, "C", "C4", "contraindicated", "forged", SESSION, ""),
            StepEvent("d1", CHIP.name, "C", "C4", "contraindicated", "forged", SESSION, ""),
        )
    )
    m = monitor()
    obs = m.observe(topic, sign(envelope(TM, "*", "events", body), topic, TM), NOW_MS)
    assert obs.verdict == "ok"  # the frame is the trust module's own; the names in it are not believed
    assert "d2" not in m.devices
    assert "C" not in m.devices.get("d1", DeviceState()).flows


def test_summary_counts_links_rejects_and_latency_percentiles() -> None:
    m = monitor()
    frame = c7_done()
    m.observe(C7_TOPIC, frame, NOW_MS)
    m.observe(C7_TOPIC, frame, NOW_MS + 1)
    m.note_dropped(3)
    summary = m.summary()
    assert summary["links"] == {"client->tm": {"c7.done": 2}}
    assert summary["rejects"] == {"replayed": 1}
    assert (summary["frames"], summary["dropped"]) == (2, 3)
    assert m.note_dropped(2).to_json() == {"kind": "dropped", "count": 2}
    assert percentile(list(range(1, 101)), 0.5) == 50
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([7], 0.99) == 7


def test_a_recording_replays_to_the_same_observations(tmp_path: Path) -> None:
    frame = c7_done()
    arrivals = [
        recording.Arrival(NOW_MS, C7_TOPIC, False, frame),
        recording.Arrival(NOW_MS + 1, C7_TOPIC, False, frame),
        recording.Arrival(NOW_MS + 2, link_topic(Role.CLIENT, Role.CHIP, "d1"), False, frame),
        recording.Arrival(NOW_MS + 3, C7_TOPIC, False, c7_done(ts_ms=NOW_MS - 40_000)),
    ]
    live = monitor()
    seen: list[Observation] = [live.observe(a.topic, a.frame, a.at_ms, a.retained) for a in arrivals]
    path = tmp_path / "run.jsonl"
    recorder = recording.Recorder(path, recording.Header(NOW_MS, ANCHORS))
    recorder.write([recording.record_line(a) for a in arrivals])
    recorder.write([recording.record_line(recording.Drop(NOW_MS + 4, 5))])
    recorder.close()
    with path.open("a") as f:
        f.write('{"at_ms": 1, "topic": "cut sh')  # a monitor killed mid-line

    header, records = recording.read(path)
    again = Monitor(header.anchors, header.started_ms)
    arrived = [a for a in records if isinstance(a, recording.Arrival)]
    replayed = [again.observe(a.topic, a.frame, a.at_ms, a.retained) for a in arrived]

    assert [o.to_json() for o in replayed] == [o.to_json() for o in seen]
    assert [o.verdict for o in seen] == ["ok", "replayed", "wrong_topic", "stale"]
    assert records[-1] == recording.Drop(NOW_MS + 4, 5)


def test_a_device_nodes_status_shows_in_its_row() -> None:
    topic = channel_topic(Role.CHIP, CHANNEL_STATUS, "d1")
    frame = sign(
        envelope(CHIP, "*", "status", Status(CHIP.name, CHIP.role, "online", NOW_MS, "0.1.0", NOW_MS, False)),
        topic,
        CHIP,
    )
    m = monitor()
    assert m.observe(topic, frame, NOW_MS, retained=True).verdict == "ok"
    assert m.devices["d1"].nodes == {CHIP.name: "online"}


def test_a_rejected_frames_claimed_type_gets_no_counter_of_its_own() -> None:
    # anyone with a login can write any type name: counting each would grow without bound
    env = envelope(CLIENT, TM, "c7.done", SessionDone(SESSION))
    fields = envelope_fields(env, b"body")
    fields[1] = "made-up-" + "x" * 40
    m = monitor()
    obs = m.observe(C7_TOPIC, raw_frame(fields, C7_TOPIC, CLIENT.keys), NOW_MS)
    assert (obs.verdict, obs.type) == ("unknown_type", fields[1])
    assert dict(m.links) == {("client->tm", "?"): 1}


async def test_the_monitor_serves_the_nodes_metrics_it_verified_and_its_own_tallies() -> None:
    """``trustpay monitor --metrics-port``: what Prometheus scrapes is what the monitor checked."""
    model = monitor()
    topic = channel_topic(Role.TRUST_MODULE, CHANNEL_METRICS, "d1")
    counts = (Count("flow.C.C4.trusted", 3), Count("rejected.stale", 2))
    mine = Metrics(TM.name, TM.role, NOW_MS, NOW_MS - 5_000, counts, ())
    assert model.observe(topic, sign(envelope(TM, "*", "metrics", mine), topic, TM), NOW_MS).verdict == "ok"
    # a body that names another node is kept out, even under a good signature
    other = dataclasses.replace(mine, node=CHIP.name, counters=(Count("flow.C.C4.trusted", 99),))
    model.observe(topic, sign(envelope(TM, "*", "metrics", other), topic, TM), NOW_MS + 1)
    model.observe(C7_TOPIC, b"\x93garbage" + bytes(64), NOW_MS + 2)
    exporter = await serve_metrics(model, 0)
    try:
        with await asyncio.to_thread(urllib.request.urlopen, exporter.url, timeout=5) as answer:
            text = answer.read().decode()
    finally:
        await exporter.close()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    trusted = (("flow", "C"), ("node", TM.name), ("outcome", "trusted"), ("role", TM.role), ("step", "C4"))
    assert got[("trustpay_flow_steps_total", trusted)] == 3
    assert not any(dict(labels).get("node") == CHIP.name for _, labels in got)
    assert got[("trustpay_monitor_rejected_total", (("code", "malformed"),))] == 1
    assert got[("trustpay_monitor_frames_total", (("name", "checked"),))] == 3
