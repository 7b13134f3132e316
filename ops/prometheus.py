"""An opt-in Prometheus endpoint: trustpay's counters as ``/metrics`` on 127.0.0.1.

:class:`MetricsCollector` turns ``Metrics`` bodies (a server's own, or the ones a
monitor received from every node) into Prometheus families, one label set per
node; :class:`CountersCollector` exposes any plain counter mapping (a monitor's
own tallies). :func:`serve` starts prometheus-client's HTTP server in its own
thread on 127.0.0.1 only. That thread calls the collectors, so a source that
reads a node's live state must hop onto the node's loop (:func:`node_source`)
rather than read it from another thread.

Only ``ops`` imports this module: the nodes never load prometheus-client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from nodes.runtime import Node
from protocol.errors import ConfigError
from protocol.messages import LATENCY_BOUNDS_MS, Metrics

HOST = "127.0.0.1"  # never another interface: counters say what the platform is doing
SNAPSHOT_TIMEOUT_S = 2.0
NODE_LABELS = ("node", "role")
# counter name prefix -> (family, help, the label the rest of the name fills)
_FAMILIES = {
    "in": ("trustpay_frames_in", "verified frames received, by message type", "type"),
    "out": ("trustpay_frames_out", "frames signed and sent, by message type", "type"),
    "rejected": ("trustpay_frames_rejected", "frames refused before any handler, by reason", "code"),
    "refused": ("trustpay_requests_refused", "requests answered with a typed refusal, by code", "code"),
}
_FLOW_LABELS = ("flow", "step", "outcome")


class MetricsCollector(Collector):
    """Prometheus families from the ``Metrics`` bodies ``source`` returns at each scrape."""

    def __init__(self, source: Callable[[], Iterable[Metrics]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counters = {
            prefix: CounterMetricFamily(name, text, labels=(*NODE_LABELS, label))
            for prefix, (name, text, label) in _FAMILIES.items()
        }
        flows = CounterMetricFamily(
            "trustpay_flow_steps",
            "steps of the patent's flows, by outcome",
            labels=(*NODE_LABELS, *_FLOW_LABELS),
        )
        other = CounterMetricFamily(
            "trustpay_node_events", "every other node counter", labels=(*NODE_LABELS, "name")
        )
        started = GaugeMetricFamily(
            "trustpay_node_start_time_seconds", "when the node started", labels=NODE_LABELS
        )
        latency = HistogramMetricFamily(
            "trustpay_step_latency_seconds",
            "time from one step of a session to its next one at the node",
            labels=(*NODE_LABELS, "steps"),
        )
        for metrics in self.source():
            node = (metrics.node, metrics.role)
            started.add_metric(node, metrics.started_ms / 1000)
            for count in metrics.counters:
                prefix, _, rest = count.name.partition(".")
                flow = rest.split(".") if prefix == "flow" else []
                if prefix in counters and rest:
                    counters[prefix].add_metric((*node, rest), count.value)
                elif len(flow) == len(_FLOW_LABELS):
                    flows.add_metric((*node, *flow), count.value)
                else:
                    other.add_metric((*node, count.name), count.value)
            for lat in metrics.latencies:
                if len(lat.buckets) != len(LATENCY_BOUNDS_MS) + 1:
                    continue  # not the bounds this build knows: no honest histogram can be drawn
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BOUNDS_MS, float("inf")), lat.buckets, strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else str(bound / 1000), cumulative))
                latency.add_metric((*node, lat.steps), buckets, lat.sum_us / 1_000_000)
        yield from (*counters.values(), flows, other, started, latency)


class CountersCollector(Collector):
    """One counter family, ``{name}_total{{key=...}}``, from the mapping ``source`` returns at each scrape."""

    def __init__(
        self, name: str, text: str, source: Callable[[], Mapping[str, int]], label: str = "name"
    ) -> None:
        self.name, self.text, self.source, self.label = name, text, source, label

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.text, labels=(self.label,))
        for key, value in sorted(self.source().items()):
            family.add_metric((key,), value)
        yield family


def node_source(node: Node, loop: asyncio.AbstractEventLoop) -> Callable[[], list[Metrics]]:
    """A source for :class:`MetricsCollector` that snapshots ``node`` on its own loop (thread-safe)."""

    async def snapshot() -> Metrics:
        return node.metrics()

    def read() -> list[Metrics]:
        future = asyncio.run_coroutine_threadsafe(snapshot(), loop)
        try:
            return [future.result(SNAPSHOT_TIMEOUT_S)]
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            return []  # the node is stopping or stuck: this scrape shows nothing of it

    return read


@dataclass
class Exporter:
    """A running ``/metrics`` endpoint; ``close`` stops it."""

    server: WSGIServer
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/metrics"

    async def close(self) -> None:
        await asyncio.to_thread(self.server.shutdown)  # waits for the serving thread's loop to end
        self.server.server_close()


async def serve(port: int, *collectors: Collector, process: bool = True) -> Exporter:
    """Serve ``collectors`` (and this process's CPU and memory) on 127.0.0.1:``port`` (0: any free port)."""
    # auto_describe off: registering must not call a collector here, on the loop that its source hops to
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    try:
        server, _thread = await asyncio.to_thread(start_wsgi_server, port, HOST, registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {HOST}:{port}: {exc.strerror}; choose another port"
        ) from exc
    return Exporter(server, server.server_port)
