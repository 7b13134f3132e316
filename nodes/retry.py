"""How long a request waits for its answer before it is sent again, learned from the answers.

A radio link loses frames; a request whose answer was lost is recovered only by
asking again (under the same message id, so the receiver answers from its
cache). Waiting the full configured timeout for every loss makes a payment on a
lossy link take tens of seconds. So each node learns, per peer and request
type, how long answers take, the way TCP learns its retransmission timeout
(RFC 6298): a smoothed round-trip time plus four times its variation, doubled
at each retry of the same request, never below ``floor_s`` (so a loaded
machine's slower answers are not mistaken for losses) and never above the
request's configured timeout. A request type not yet answered by a peer uses
what that peer's other answers took, and a peer never heard from yet waits
``initial_s`` (TCP's 1 s), doubled per retry. Only answers to a first attempt
are samples (Karn's rule: an answer after a retry could be the answer to either).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

ALPHA, BETA, K = 1 / 8, 1 / 4, 4  # RFC 6298's gains and variance factor
MAX_KEYS = 1024  # (peer, type) pairs remembered; the oldest is forgotten first


@dataclass
class _Estimate:
    srtt: float
    rttvar: float


@dataclass
class RetryTimer:
    floor_s: float = 0.5
    initial_s: float = 1.0
    # by (peer, request type), and by peer alone (any type): least recently answered first
    _estimates: OrderedDict[tuple[str, str], _Estimate] = field(default_factory=OrderedDict)

    def wait_s(self, peer: str, msg_type: str, attempt: int, ceiling_s: float) -> float:
        """How long attempt ``attempt`` (1, 2, ...) waits for its answer."""
        est = self._estimates.get((peer, msg_type)) or self._estimates.get((peer, ""))
        rto = self.initial_s if est is None else max(self.floor_s, est.srtt + K * est.rttvar)
        return min(ceiling_s, rto * (1 << min(max(attempt - 1, 0), 16)))

    def observe(self, peer: str, msg_type: str, rtt_s: float) -> None:
        """An answer to a first attempt came after ``rtt_s`` seconds."""
        for key in ((peer, msg_type), (peer, "")):
            est = self._estimates.pop(key, None)
            if est is None:
                est = _Estimate(rtt_s, rtt_s / 2)
            else:
                est.rttvar = (1 - BETA) * est.rttvar + BETA * abs(est.srtt - rtt_s)
                est.srtt = (1 - ALPHA) * est.srtt + ALPHA * rtt_s
            self._estimates[key] = est  # most recently used last
        while len(self._estimates) > MAX_KEYS:
            self._estimates.popitem(last=False)
