"""What a node reports about itself: its version, and its counters as a bounded ``Metrics`` body.

The runtime counts frames in and out by type, rejections and refusals by code
and step outcomes by flow, step and outcome, all in ``Node.counters``;
:class:`StepClock` times the gap between consecutive steps of one session. Both
are bounded (a fixed set of names and step pairs, the oldest sessions forgotten),
and nothing here ever sees an amount, a payee or a reason text.
"""

from __future__ import annotations

import bisect
import importlib.metadata
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.messages import LATENCY_BOUNDS_MS, MAX_COUNTERS, MAX_LATENCIES, Count, Metrics, StepLatency

DROPPED = "metrics.dropped"  # how many counter names did not fit in one body
_FIRST = ("rejected.", "refused.")  # kept first when the names do not all fit: they say what went wrong


def package_version() -> str:
    """The installed trustpay's version (read once, at import, off the event loop)."""
    try:
        return importlib.metadata.version("trustpay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = package_version()


@dataclass
class _Histogram:
    count: int = 0
    sum_us: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def add(self, us: int) -> None:
        self.count += 1
        self.sum_us += us
        # bisect_left: a gap of exactly 5 ms belongs to the "<= 5 ms" bucket
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS_MS, us / 1000)] += 1


class StepClock:
    """Time between consecutive steps of one session at this node, one histogram per step pair.

    Only the last step of the ``max_sessions`` most recent sessions is remembered,
    and at most ``max_pairs`` pairs are kept (a node's steps are a short fixed list,
    so the cap is never reached by honest traffic).
    """

    def __init__(self, max_sessions: int = 1024, max_pairs: int = MAX_LATENCIES) -> None:
        self.max_sessions, self.max_pairs = max_sessions, max_pairs
        self._last: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # session -> (step, ns)
        self._pairs: dict[str, _Histogram] = {}

    def observe(self, session: bytes, step: str, now_ns: int) -> None:
        previous = self._last.pop(session, None)
        self._last[session] = (step, now_ns)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)
        if previous is None:
            return
        pair = f"{previous[0]}>{step}"
        histogram = self._pairs.get(pair)
        if histogram is None:
            if len(self._pairs) >= self.max_pairs:
                return
            histogram = self._pairs[pair] = _Histogram()
        histogram.add(max(now_ns - previous[1], 0) // 1000)

    def latencies(self) -> tuple[StepLatency, ...]:
        return tuple(
            StepLatency(pair, h.count, h.sum_us, tuple(h.buckets)) for pair, h in sorted(self._pairs.items())
        )


def bounded_counts(counters: Mapping[str, int]) -> tuple[Count, ...]:
    """The counters as sorted ``Count`` records, at most ``MAX_COUNTERS`` (rejections kept first)."""
    names = sorted(counters, key=lambda name: (not name.startswith(_FIRST), name))
    if len(names) > MAX_COUNTERS:
        kept = names[: MAX_COUNTERS - 1]
        counts = {name: counters[name] for name in kept}
        counts[DROPPED] = len(names) - len(kept)
    else:
        counts = {name: counters[name] for name in names}
    return tuple(Count(name, value) for name, value in sorted(counts.items()))


def metrics_body(
    node: str, role: str, at_ms: int, started_ms: int, counters: Mapping[str, int], clock: StepClock
) -> Metrics:
    return Metrics(node, role, at_ms, started_ms, bounded_counts(counters), clock.latencies())
