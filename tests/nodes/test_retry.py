"""The retry timer alone (no event loop), and a node recovering a lost answer well before its timeout."""

from __future__ import annotations

from pathlib import Path

from nodes.bus import FakeBroker
from nodes.retry import MAX_KEYS, RetryTimer
from nodes.runtime import Node, Settings, ping
from protocol.topics import Role

from .harness import make_node, provisioned, running


def test_a_peer_never_heard_from_gets_a_second_doubled_per_retry_within_the_timeout() -> None:
    timer = RetryTimer()
    assert [timer.wait_s("ts", "c2.nonce", n, 3.0) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert [timer.wait_s("ts", "c2.nonce", n, 0.5) for n in (1, 2, 3)] == [0.5, 0.5, 0.5]


def test_learned_answers_shorten_the_wait_never_below_the_floor_doubling_per_retry() -> None:
    timer = RetryTimer(floor_s=0.5)
    for _ in range(20):
        timer.observe("ts", "c2.nonce", 0.010)
    assert timer.wait_s("ts", "c2.nonce", 1, 3.0) == 0.5  # 10 ms answers: the floor
    assert [timer.wait_s("ts", "c2.nonce", n, 3.0) for n in (2, 3, 4)] == [1.0, 2.0, 3.0]  # capped
    assert timer.wait_s("ps", "c2.nonce", 1, 3.0) == 1.0  # another peer: not heard from yet
    for _ in range(20):
        timer.observe("ts", "c2.evidence", 2.0)
    assert timer.wait_s("ts", "c2.evidence", 1, 30.0) >= 2.0  # a slower request type learns apart
    assert timer.wait_s("ts", "c2.nonce", 1, 3.0) == 0.5  # and leaves the quick one quick
    assert timer.wait_s("ts", "c1.check", 1, 30.0) > 0.5  # a new type starts from the peer's mix


def test_slow_and_varying_answers_lengthen_the_wait() -> None:
    timer = RetryTimer(floor_s=0.1)
    for rtt in (0.2, 1.0, 0.2, 1.0, 0.2, 1.0):
        timer.observe("tm", "attest.request", rtt)
    wait = timer.wait_s("tm", "attest.request", 1, 30.0)
    assert 1.0 < wait < 30.0  # the variation counts four times over


def test_it_remembers_a_bounded_number_of_peers() -> None:
    timer = RetryTimer()
    for n in range(MAX_KEYS + 10):
        timer.observe(f"dev-{n}.tm", "c1.check", 0.01)
    assert timer.wait_s("dev-0.tm", "c1.check", 1, 3.0) == timer.initial_s  # forgotten first
    assert timer.wait_s(f"dev-{MAX_KEYS + 9}.tm", "c1.check", 1, 3.0) == timer.floor_s


async def test_a_lost_answer_is_asked_for_again_long_before_the_timeout(tmp_path: Path) -> None:
    """One attempt of 30 s: before, a lost answer meant 30 s and RequestTimeout; now one quick retry."""
    dep = provisioned(tmp_path)
    broker = FakeBroker()
    patient = Settings(request_timeout_s=30.0, request_attempts=1)
    tm = make_node(Node, dep, "dev-0001.tm", broker, patient)
    ts = make_node(Node, dep, "trust-server", broker)
    pongs: list[int] = []

    def drop_the_second_pong(topic: str, payload: bytes) -> list[bytes]:
        if topic.endswith("/ts/tm"):
            pongs.append(1)
            if len(pongs) == 2:
                return []
        return [payload]

    broker.tap = drop_the_second_pong
    async with running(tm, ts, timeout_s=20):
        await ping(tm, Role.TRUST_SERVER, "trust-server")  # learns how long a pong takes
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
    assert pong.node == "trust-server"
    assert tm.counters["request_retry"] == 1 and ts.counters["reanswered"] == 1
