"""Only a verified frame ends a pending request: a forged answer naming it in reply_to does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.runtime import Node, now_ms, ping
from protocol.certs import CertBody, issue
from protocol.envelope import Envelope, new_id, peek, sign_frame
from protocol.errors import RequestTimeout
from protocol.keys import KeyPair
from protocol.messages import Pong
from protocol.topics import Role

from .harness import make_node, provisioned, running

TS = "trust-server"
TM = "dev-0001.tm"


@pytest.fixture
def dep(tmp_path: Path):
    return provisioned(tmp_path)


def forged_pong(topic: str, request_id: bytes) -> bytes:
    """A pong 'from the trust-server' for ``request_id``, under a certificate nobody issued.

    Its unsigned header names the request; its chain does not verify
    (CertificateInvalid), the refusal today's main used to end the request with.
    """
    forger = KeyPair.generate()
    now_s = now_ms() // 1000
    cert = issue(
        CertBody(99, TS, TS, "", forger.sign_public, forger.box_public, now_s - 60, now_s + 600, "root", 1),
        forger,
    )
    env = Envelope(
        "pong",
        new_id(),
        TS,
        TM,
        b"",
        request_id,
        now_ms(),
        1,
        1,
        (cert.to_bytes(),),
        Pong(b"\x00" * 16, TS, TS, 0, "ready"),
    )
    return sign_frame(env, topic, forger)


async def test_a_forged_answer_naming_a_pending_request_does_not_end_it(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker)
    ts = make_node(Node, dep, TS, broker)
    requests: list[bytes] = []
    forged: list[bytes] = []

    def forge_the_first_answer(topic: str, payload: bytes) -> list[bytes]:
        header = peek(payload)
        if topic.endswith("/tm/ts") and header is not None and header.type == "ping":
            requests.append(header.message_id)
        if topic.endswith("/ts/tm") and not forged:
            forged.append(forged_pong(topic, requests[-1]))
            return forged  # the genuine answer is lost; the retry's answer comes through
        return [payload]

    broker.tap = forge_the_first_answer
    async with running(tm, ts):
        pong = await ping(tm, Role.TRUST_SERVER, TS)
    assert pong.node == TS
    assert forged and tm.counters["request_retry"] == 1
    assert sum(v for k, v in tm.counters.items() if k.startswith("rejected.cert")) == 1


async def test_a_request_answered_only_by_refused_frames_times_out_and_says_why(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, TM, broker)
    ts = make_node(Node, dep, TS, broker)
    requests: list[bytes] = []

    def forge_every_answer(topic: str, payload: bytes) -> list[bytes]:
        header = peek(payload)
        if topic.endswith("/tm/ts") and header is not None and header.type == "ping":
            requests.append(header.message_id)
        if topic.endswith("/ts/tm"):
            return [forged_pong(topic, requests[-1])]
        return [payload]

    broker.tap = forge_every_answer
    async with running(tm, ts):
        with pytest.raises(RequestTimeout) as info:
            await ping(tm, Role.TRUST_SERVER, TS)
    assert "no answer to ping from trust-server after 3 attempts" in info.value.reason
    assert "refused (unverified, so not acted on): cert_" in info.value.reason
