"""The shared runtime on the in-memory bus: verified ping, retries, dedup, rejections."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodes.assemble import node_config
from nodes.bus import FakeBroker
from nodes.logs import NodeLogging
from nodes.runtime import Node, Settings, ping
from protocol.errors import Refused, RequestTimeout, TransportError
from protocol.messages import Challenge, NonceRequest, PlatformCheck, PlatformResult
from protocol.topics import Role

from .harness import make_node, provisioned, running


@pytest.fixture
def dep(tmp_path: Path):
    return provisioned(tmp_path)


async def test_two_nodes_ping_each_other(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)
    async with running(tm, ts):
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
        back = await ping(ts, Role.TRUST_MODULE, "dev-0001.tm", device="dev-0001")
    assert (pong.node, pong.role) == ("trust-server", "trust-server")
    assert (back.node, back.role) == ("dev-0001.tm", "trust-module")
    assert ts.counters["accepted"] >= 1 and tm.counters["accepted"] >= 2


async def test_lost_answer_is_resent_from_the_cache(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)
    dropped: list[str] = []

    def drop_first_pong(topic: str, payload: bytes) -> list[bytes]:
        if topic.endswith("/ts/tm") and not dropped:
            dropped.append(topic)
            return []
        return [payload]

    broker.tap = drop_first_pong
    async with running(tm, ts):
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
    assert pong.node == "trust-server"
    assert dropped
    assert ts.counters["duplicate"] == 1 and ts.counters["reanswered"] == 1
    assert tm.counters["request_retry"] == 1


async def test_duplicated_and_altered_frames_are_counted_not_handled(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)

    def duplicate_and_corrupt(topic: str, payload: bytes) -> list[bytes]:
        if topic.endswith("/tm/ts"):
            altered = bytearray(payload)
            altered[len(altered) // 2] ^= 0x01
            return [payload, payload, bytes(altered), b"\xc1garbage"]
        return [payload]

    broker.tap = duplicate_and_corrupt
    async with running(tm, ts):
        await ping(tm, Role.TRUST_SERVER, "trust-server")
        await ping(tm, Role.TRUST_SERVER, "trust-server")
    assert ts.counters["accepted"] == 2
    assert ts.counters["duplicate"] == 2
    rejected = sum(v for k, v in ts.counters.items() if k.startswith("rejected."))
    assert rejected == 4
    assert ts.counters["rejected.malformed"] >= 2


async def test_request_to_nobody_times_out_with_a_typed_error(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    async with running(tm):
        with pytest.raises(RequestTimeout, match="after 3 attempts"):
            await ping(tm, Role.TRUST_SERVER, "trust-server")
    assert tm.counters["request_retry"] == 3


async def test_a_crashing_handler_does_not_stop_the_node(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)
    calls = 0

    async def broken(rx):
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    ts.route("c1.check", broken)
    async with running(tm, ts):
        with pytest.raises(Refused, match="internal"):
            await tm.request(
                tm.link(Role.TRUST_SERVER),
                "c1.check",
                PlatformCheck(1, b""),
                recipient="trust-server",
                expect="c1.result",
            )
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
    assert pong.node == "trust-server"
    assert calls == 1
    assert ts.counters["handler_crash"] == 1


async def test_a_slow_handler_does_not_stall_the_connection(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(rx):
        started.set()
        await release.wait()  # held until the ping below has been answered
        return "c1.result", PlatformResult(True, "", b"")

    ts.route("c1.check", slow)
    async with running(tm, ts):
        stuck = asyncio.create_task(
            tm.request(
                tm.link(Role.TRUST_SERVER),
                "c1.check",
                PlatformCheck(1, b""),
                recipient="trust-server",
                expect="c1.result",
                timeout_s=5,
                attempts=1,
            )
        )
        async with asyncio.timeout(5):
            await started.wait()
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")
        release.set()
        answer = await stuck
    assert pong.node == "trust-server"
    assert answer.envelope.body.trusted


async def test_a_node_without_a_broker_stops_with_a_clear_typed_error(dep) -> None:
    class Nowhere:  # a bus whose broker never answers
        on_connect = None

        async def run(self, subscriptions, on_message, connected) -> None:
            await asyncio.Event().wait()

        async def publish(self, topic, payload, retain=False) -> None:
            raise AssertionError("nothing may be published without a connection")

        def close(self) -> None:
            pass

    config = node_config(dep, "dev-0001.tm", Settings(connect_timeout_s=0.2))
    node = Node(config, Nowhere(), NodeLogging("dev-0001.tm", None, console=None).logger)
    with pytest.raises(TransportError, match=r"could not connect to the broker within 0\.2 s"):
        async with asyncio.timeout(5):
            await node.run()


async def test_an_ordered_route_handles_one_link_in_arrival_order(dep) -> None:
    broker = FakeBroker()
    tm = make_node(Node, dep, "dev-0001.tm", broker)
    ts = make_node(Node, dep, "trust-server", broker)
    handled: list[int] = []
    first_started = asyncio.Event()
    let_first_finish = asyncio.Event()

    async def in_order(rx):
        n = rx.envelope.body.intent_hash[0]
        if n == 0:
            first_started.set()
            await let_first_finish.wait()  # the first is slow; the others must still wait for it
        handled.append(n)
        return "c2.challenge", Challenge(rx.envelope.body.intent_hash, 0)

    ts.route("c2.nonce", in_order, ordered=True)
    async with running(tm, ts):
        requests = [
            asyncio.create_task(
                tm.request(
                    tm.link(Role.TRUST_SERVER),
                    "c2.nonce",
                    NonceRequest(bytes([n]) * 32),
                    recipient="trust-server",
                    expect="c2.challenge",
                    peer=dep.load_cert("trust-server"),  # c2.nonce is sealed
                    timeout_s=5,
                    attempts=1,
                )
            )
            for n in range(5)
        ]
        async with asyncio.timeout(5):
            await first_started.wait()
        pong = await ping(tm, Role.TRUST_SERVER, "trust-server")  # other types are not held up
        assert handled == []
        let_first_finish.set()
        await asyncio.gather(*requests)
    assert pong.node == "trust-server"
    assert handled == [0, 1, 2, 3, 4]
