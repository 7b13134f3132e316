"""Who answers a request, and with what: the reply log replicas of one role share.

A device retries a request with the same message id until it hears an answer.
With one server process, the runtime's response cache answers a retry. With
several replicas of a role behind a shared subscription, a retry (or a replay
by someone who recorded the frame) can land on another replica than the first
attempt, which must neither run the request a second time nor stay silent. So
replicas claim each request in a log they share (the role's database) before
handling it, and write the answer frame there when they have one:

- ``claim`` returns :class:`Claim` ``"new"`` to exactly one replica, which
  handles the request and then calls ``answer``;
- a later claim of the same request gets ``"answered"`` with the stored frame,
  to publish again as it is (the device verifies the first replica's signature;
  its replay guard has not seen the frame if the first copy was lost);
- a claim while another replica holds the request, for less than the lease,
  gets ``"busy"``: the device's next retry will find the answer;
- a claim held longer than the lease with no answer (its replica died) is taken
  over: the new holder handles the request again, and the database's own rules
  (a nonce consumed once, an order id executed once) make that safe.

Keys are the sender's node id and the request's message id, so one sender
cannot claim another's requests. The SQLite and PostgreSQL implementations live
with the roles' storage; :class:`MemoryReplies` is the same contract in memory,
for one process and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

ClaimState = Literal["new", "answered", "busy"]
NEW: Final = "new"
ANSWERED: Final = "answered"
BUSY: Final = "busy"
# Longer than a server's handler takes (milliseconds; a database lock waits at most 5 s),
# and well inside a sender's request budget (4 x 3 s): a replica killed while holding a
# request must leave time for the retries to find the lease expired and another replica
# to take it over. Were a live holder slower than the lease, both would handle the request,
# and the database's rules would let only one of them change anything.
LEASE_MS = 6_000


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    topic: str = ""
    frame: bytes = b""


class Replies(Protocol):
    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim: ...

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None: ...

    async def prune(self, before_ms: int, limit: int) -> int: ...


@dataclass
class _Entry:
    holder: str
    claimed_ms: int
    topic: str = ""
    frame: bytes = b""


class MemoryReplies:
    """The reply log in one process's memory: what replicas in one process (and tests) share."""

    def __init__(self, lease_ms: int = LEASE_MS) -> None:
        self.lease_ms = lease_ms
        self._entries: dict[tuple[str, bytes], _Entry] = {}

    async def claim(self, sender: str, message_id: bytes, holder: str, now_ms: int) -> Claim:
        key = (sender, message_id)
        entry = self._entries.get(key)
        if entry is not None and entry.frame:
            return Claim(ANSWERED, entry.topic, entry.frame)
        if entry is not None and now_ms - entry.claimed_ms < self.lease_ms:
            return Claim(BUSY)
        self._entries[key] = _Entry(holder, now_ms)
        return Claim(NEW)

    async def answer(self, sender: str, message_id: bytes, topic: str, frame: bytes, now_ms: int) -> None:
        entry = self._entries.setdefault((sender, message_id), _Entry("", now_ms))
        entry.topic, entry.frame = topic, frame

    async def prune(self, before_ms: int, limit: int) -> int:
        old = [key for key, entry in self._entries.items() if entry.claimed_ms < before_ms][:limit]
        for key in old:
            del self._entries[key]
        return len(old)
