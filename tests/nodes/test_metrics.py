"""What a node says about itself: its signed status (version, start, last will) and its metrics.

The node tests run all five roles on the in-memory bus with a short metrics
interval and wait on the bus for the frames (the node's own timer paces them;
the tests never sleep). The pure pieces (``StepClock``, ``bounded_counts``,
``StepLatency.quantile_ms``) are tested without a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.client import EXIT_OK, Client
from nodes.deployment import Deployment
from nodes.metrics import DROPPED, StepClock, bounded_counts
from nodes.payment_server import PaymentServer
from nodes.runtime import Node
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from ops.watch import public_verifier
from protocol.messages import LATENCY_BOUNDS_MS, MAX_COUNTERS, Metrics, Status, StepLatency
from protocol.topics import CHANNEL_METRICS, CHANNEL_STATUS, Role, channel_topic

from .harness import FAST, make_node, provisioned, running

DEV = "dev-0001"
INTERVAL = dataclasses.replace(FAST, metrics_interval_s=0.05)
TS_METRICS = channel_topic(Role.TRUST_SERVER, CHANNEL_METRICS)
TS_STATUS = channel_topic(Role.TRUST_SERVER, CHANNEL_STATUS)


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


def now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def next_metrics(
    dep: Deployment, queue: asyncio.Queue[tuple[str, bytes]], until: Callable[[Metrics], bool]
) -> tuple[Metrics, bytes]:
    """The first verified metrics frame on ``queue`` that satisfies ``until`` (bounded by a timeout)."""
    verifier = public_verifier(dep)
    async with asyncio.timeout(10):
        while True:  # each turn takes one published frame; bounded by the timeout
            topic, frame = await queue.get()
            body = verifier.open(frame, topic, now_ms()).envelope.body  # the signature is checked here
            assert isinstance(body, Metrics)
            if until(body):
                return body, frame


def counts(metrics: Metrics) -> dict[str, int]:
    return {c.name: c.value for c in metrics.counters}


async def test_a_payment_shows_in_the_trust_servers_signed_metrics(dep: Deployment) -> None:
    broker = FakeBroker()
    seen: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    broker.subscribe(TS_METRICS, seen)
    ts = make_node(TrustServer, dep, "trust-server", broker, INTERVAL, deployment=dep)
    ps = make_node(PaymentServer, dep, "payment-server", broker, INTERVAL, deployment=dep)
    chip = make_node(Chip, dep, f"{DEV}.chip", broker, INTERVAL, deployment=dep)
    tm = make_node(TrustModule, dep, f"{DEV}.tm", broker, INTERVAL, deployment=dep)
    async with running(ts, ps, chip, tm, timeout_s=20):
        async with asyncio.timeout(10):
            await tm.started.wait()
        out = io.StringIO()
        client = make_node(
            Client, dep, f"{DEV}.client", broker, deployment=dep,
            command=["pay", "12.50", "shop-1"], out=out, as_json=True,
        )  # fmt: skip
        async with asyncio.timeout(20):
            await client.run()
        assert client.exit_code == EXIT_OK, out.getvalue()
        order = json.loads(out.getvalue().splitlines()[-1])["order_id"]
        first, _ = await next_metrics(dep, seen, lambda m: True)
        paid, frame = await next_metrics(dep, seen, lambda m: counts(m).get("flow.C.C4.trusted", 0) >= 1)
        later, _ = await next_metrics(dep, seen, lambda m: m.at_ms > paid.at_ms)
    got = counts(paid)
    assert paid.node == "trust-server" and paid.role == "trust-server" and paid.started_ms == ts.started_ms
    # frames in and out per type, and the flow outcomes, of the one attestation
    assert got["in.c1.check"] == got["in.c2.nonce"] == got["in.c2.evidence"] == 1
    assert got["out.c1.result"] == got["out.c2.challenge"] == got["out.c4.verdict"] == 1
    assert got["out.trust.grant"] == 1 and got["in.trust.granted"] == 1
    for step in ("flow.C.C1.trusted", "flow.C.C2.ok", "flow.C.C3.ok", "flow.C.C4.trusted"):
        assert got[step] == 1, step
    # the time between consecutive steps of the payment's session at the trust server
    latencies = {lat.steps: lat for lat in paid.latencies}
    assert set(latencies) == {"C1>C2", "C2>C3", "C3>C4"}
    assert all(lat.count == 1 and sum(lat.buckets) == 1 for lat in latencies.values())
    assert 0 < latencies["C2>C3"].quantile_ms(0.99) <= LATENCY_BOUNDS_MS[-1]
    # counters are cumulative, the interval keeps them coming, and nothing of the payment is in them
    assert first.at_ms < paid.at_ms < later.at_ms and counts(later)["flow.C.C4.trusted"] == 1
    assert later.at_ms - paid.at_ms >= INTERVAL.metrics_interval_s * 1000 * 0.8
    for secret in (b"shop-1", order.encode(), b"1250", b"12.50"):
        assert secret not in frame, secret


async def test_status_names_version_and_start_and_the_will_is_marked(dep: Deployment) -> None:
    broker = FakeBroker()
    ts = make_node(Node, dep, "trust-server", broker)
    verifier = public_verifier(dep)
    async with running(ts):
        async with asyncio.timeout(10):
            while TS_STATUS not in broker.retained:  # each turn lets the node publish; bounded
                await asyncio.sleep(0)
        online = verifier.open(broker.retained[TS_STATUS], TS_STATUS, now_ms()).envelope.body
        will_topic, will_frame = ts.will()
        will = verifier.open(will_frame, will_topic, now_ms()).envelope.body
    offline = verifier.open(broker.retained[TS_STATUS], TS_STATUS, now_ms()).envelope.body
    version = importlib.metadata.version("trustpay")
    assert isinstance(online, Status) and isinstance(will, Status) and isinstance(offline, Status)
    assert (online.state, online.version, online.started_ms) == ("online", version, ts.started_ms)
    assert not online.will
    assert online.at_ms >= online.started_ms > 0
    assert (will_topic, will.state, will.will, will.started_ms) == (TS_STATUS, "offline", True, ts.started_ms)
    # a clean stop says "offline" itself: not a will
    assert (offline.state, offline.will, offline.version) == ("offline", False, version)
    # the will is built at every connection but is not a frame the node sent
    assert ts.counters["out.status"] == 2


async def test_a_node_with_too_many_counter_names_still_publishes_a_valid_body(dep: Deployment) -> None:
    """Without the bound, 500 names make an array over the decoder's 256 limit: a malformed frame."""
    broker = FakeBroker()
    seen: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    broker.subscribe(TS_METRICS, seen)
    ts = make_node(Node, dep, "trust-server", broker, INTERVAL)
    for i in range(500):
        ts.counters[f"task_error.x{i:03}"] += 1
    ts.counters["rejected.bad_signature"] += 3
    async with running(ts):
        metrics, frame = await next_metrics(dep, seen, lambda m: True)
    got = counts(metrics)
    assert len(metrics.counters) == MAX_COUNTERS
    # 502 names at the first round (500 + the rejection + out.status of "online"), 199 kept
    assert got["rejected.bad_signature"] == 3 and got[DROPPED] == 502 - (MAX_COUNTERS - 1)
    assert len(frame) < 16 * 1024


# -- the pure pieces -------------------------------------------------------------------------
MS = 1_000_000  # ns


def test_step_clock_times_consecutive_steps_of_one_session() -> None:
    clock = StepClock()
    clock.observe(b"s1", "C1", 0)
    clock.observe(b"s2", "C1", 0)
    clock.observe(b"s1", "C2", 4 * MS)
    clock.observe(b"s2", "C2", 5 * MS)  # exactly on a bound: in the "<= 5 ms" bucket
    clock.observe(b"s1", "C4", 4 * MS + 20 * MS + 1000)  # 20.001 ms: above the 20 ms bound
    got = {lat.steps: lat for lat in clock.latencies()}
    assert set(got) == {"C1>C2", "C2>C4"}
    assert got["C1>C2"].count == 2 and got["C1>C2"].sum_us == 9000
    five = LATENCY_BOUNDS_MS.index(5)
    assert got["C1>C2"].buckets[five] == 2  # 4 ms and 5 ms both fall in (3, 5]
    assert got["C2>C4"].buckets[LATENCY_BOUNDS_MS.index(30)] == 1


def test_step_clock_is_bounded_in_sessions_and_pairs() -> None:
    clock = StepClock(max_sessions=2, max_pairs=1)
    clock.observe(b"old", "C1", 0)
    clock.observe(b"s2", "C1", 0)
    clock.observe(b"s3", "C1", 0)  # the oldest session is forgotten
    clock.observe(b"old", "C2", MS)  # so this starts afresh (and pushes s2 out): no pair
    assert clock.latencies() == ()
    clock.observe(b"s3", "C2", MS)
    clock.observe(b"old", "C9", MS)  # a second pair does not fit
    assert [(lat.steps, lat.count) for lat in clock.latencies()] == [("C1>C2", 1)]


def test_bounded_counts_keep_rejections_and_say_how_many_were_dropped() -> None:
    counters = {f"in.t{i:03}": i for i in range(MAX_COUNTERS + 10)} | {"rejected.replayed": 2}
    got = bounded_counts(counters)
    names = [c.name for c in got]
    assert len(got) == MAX_COUNTERS and names == sorted(names)
    assert ("rejected.replayed" in names) and dict((c.name, c.value) for c in got)[DROPPED] == 12
    small = bounded_counts({"b": 1, "a": 2})
    assert [(c.name, c.value) for c in small] == [("a", 2), ("b", 1)]


def test_latency_quantiles_interpolate_inside_the_bucket() -> None:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    buckets[LATENCY_BOUNDS_MS.index(10)] = 100  # 100 gaps in (7, 10] ms
    latency = StepLatency("C1>C2", 100, 850_000, tuple(buckets))
    assert latency.quantile_ms(0.5) == pytest.approx(8.5)
    assert latency.quantile_ms(0.99) == pytest.approx(9.97)
    buckets[-1] = 100  # and 100 above the last bound
    over = StepLatency("C1>C2", 200, 0, tuple(buckets))
    assert over.quantile_ms(0.99) == LATENCY_BOUNDS_MS[-1]
    assert StepLatency("x", 0, 0, tuple([0] * len(buckets))).quantile_ms(0.5) == 0.0
