"""ops.prometheus: Metrics bodies as Prometheus families, served on 127.0.0.1 only.

Real HTTP on loopback (prometheus-client's own server in its thread); the end-to-end
test with running servers is ``tests/e2e/test_status_metrics.py``.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.prometheus import CountersCollector, MetricsCollector, serve
from protocol.errors import ConfigError
from protocol.messages import LATENCY_BOUNDS_MS, Count, Metrics, StepLatency

BUCKETS = [0] * (len(LATENCY_BOUNDS_MS) + 1)
BUCKETS[LATENCY_BOUNDS_MS.index(3)] = 2  # two gaps in (2, 3] ms
BUCKETS[-1] = 1  # one above the last bound
TS = Metrics(
    "trust-server",
    "trust-server",
    1_000,
    500_000,
    (
        Count("accepted", 7),
        Count("flow.C.C4.trusted", 2),
        Count("in.c2.evidence", 3),
        Count("out.c4.verdict", 3),
        Count("refused.rate_limited", 1),
        Count("rejected.bad_signature", 4),
    ),
    (StepLatency("C3>C4", 3, 20_005_000, tuple(BUCKETS)), StepLatency("bad", 1, 1, (1,))),
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


async def test_a_metrics_body_becomes_labelled_families_served_on_loopback() -> None:
    exporter = await serve(
        0, MetricsCollector(lambda: [TS]), CountersCollector("trustpay_monitor_drops", "x", dict)
    )
    try:
        text = await asyncio.to_thread(get, exporter.url)
        # bound to 127.0.0.1 itself, not every address: another loopback address is refused
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(get, exporter.url.replace("127.0.0.1", "127.0.0.2"))
    finally:
        await exporter.close()
    got = samples(text)
    node = {("node", "trust-server"), ("role", "trust-server")}

    def at(family: str, **labels: str) -> float:
        return got[(family, frozenset(node | set(labels.items())))]

    assert at("trustpay_frames_in_total", type="c2.evidence") == 3
    assert at("trustpay_frames_out_total", type="c4.verdict") == 3
    assert at("trustpay_frames_rejected_total", code="bad_signature") == 4
    assert at("trustpay_requests_refused_total", code="rate_limited") == 1
    assert at("trustpay_flow_steps_total", flow="C", step="C4", outcome="trusted") == 2
    assert at("trustpay_node_events_total", name="accepted") == 7
    assert at("trustpay_node_start_time_seconds") == 500
    # the histogram is cumulative, in seconds; a body with foreign bounds is left out, not guessed at
    assert at("trustpay_step_latency_seconds_bucket", steps="C3>C4", le="0.002") == 0
    assert at("trustpay_step_latency_seconds_bucket", steps="C3>C4", le="0.003") == 2
    assert at("trustpay_step_latency_seconds_bucket", steps="C3>C4", le="10.0") == 2
    assert at("trustpay_step_latency_seconds_bucket", steps="C3>C4", le="+Inf") == 3
    assert at("trustpay_step_latency_seconds_count", steps="C3>C4") == 3
    assert at("trustpay_step_latency_seconds_sum", steps="C3>C4") == pytest.approx(20.005)
    assert not any(labels and ("steps", "bad") in labels for _, labels in got)
    assert ("process_cpu_seconds_total", frozenset()) in got


async def test_counters_collector_and_a_busy_port() -> None:
    tallies = {"dropped": 3, "replayed": 1}
    exporter = await serve(
        0, CountersCollector("trustpay_monitor_frames", "frames by verdict", lambda: tallies)
    )
    try:
        tallies["dropped"] = 5  # read at each scrape, not at start
        text = await asyncio.to_thread(get, exporter.url)
        with pytest.raises(ConfigError, match="choose another port"):
            await serve(exporter.port)
    finally:
        await exporter.close()
    got = samples(text)
    assert got[("trustpay_monitor_frames_total", frozenset({("name", "dropped")}))] == 5
    assert got[("trustpay_monitor_frames_total", frozenset({("name", "replayed")}))] == 1
