"""Freshness and replay protection for received frames, bounded in memory per sender.

Three checks, in this order, all after the signature has been verified (so only
a holder of a valid certificate can fill a table, and only its own):

1. **Time window**: the send time must lie at most ``ahead_ms`` ahead of our
   clock and at most ``skew_ms`` behind it, and not before the sender's floor.
   Every floor starts at this receiver's start time: anything stamped before we
   started may have been accepted by our previous life, whose tables are gone.
   Senders' request retries are re-stamped, so nothing is lost.
2. **Message id**: ids seen within the window are remembered per sender; a
   second frame with a known id from the same sender is a ``Duplicate`` (a QoS 1
   redelivery or a request retry): dropped quietly, answered from the response
   cache. An id already used by another sender is ``Replayed``.
3. **Sequence window** per sender and boot epoch (like IPsec's anti-replay
   window): an older epoch, or a sequence number already seen or fallen out of
   the window, is ``Replayed``.

Memory: per sender, one fixed-size sequence window and an id table capped at
``max_ids``. When a sender's table is full its oldest entry goes and *that
sender's* floor rises past it, so a frame whose id we forgot is refused as
stale instead of accepted twice. The floor never passes our clock: if the
oldest entry is stamped ahead of now, the new frame is refused instead (the
sender is flooding us with future stamps and only its own frames suffer).
Senders are certificate holders, so their number is bounded by the deployment.

A frame refused by the time window alone raises :class:`OutsideWindow`, which
says by how much the sender's stamp is off: a verified request refused so gets
a ``clock_skew`` refusal (``nodes.runtime``), so a device whose clock is wrong
hears why instead of waiting for a timeout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import Duplicate, Replayed, Stale

WINDOW_BITS = 1024
CLOCK_SKEW = "clock_skew"  # the refusal code answering a verified request refused by the time window


class OutsideWindow(Stale):
    """Stamped outside the time window; ``ahead_ms`` is the stamp minus our clock (negative: behind)."""

    def __init__(self, reason: str, ahead_ms: int) -> None:
        super().__init__(reason)
        self.ahead_ms = ahead_ms


@dataclass
class _Sender:
    floor_ms: int
    ids: OrderedDict[bytes, int] = field(default_factory=OrderedDict)  # id -> ts, oldest first
    epoch: int = -1  # -1: no frame accepted yet
    top: int = 0  # highest sequence number accepted in this epoch
    bits: int = 0  # bit i set: sequence (top - i) accepted


class ReplayGuard:
    def __init__(
        self,
        floor_ms: int,
        skew_ms: int = 30_000,
        max_ids: int = 20_000,
        ahead_ms: int = 5_000,
    ) -> None:
        self.floor_ms = floor_ms
        self.skew_ms = skew_ms
        self.ahead_ms = min(ahead_ms, skew_ms)
        self.max_ids = max_ids
        self._senders: dict[str, _Sender] = {}
        self._owners: dict[bytes, str] = {}  # every remembered id -> its sender

    def check(self, sender: str, message_id: bytes, ts_ms: int, epoch: int, seq: int, now_ms: int) -> None:
        """Raise if the frame is stale, a duplicate or a replay; else record it."""
        state = self._senders.get(sender)
        if state is None:
            state = _Sender(self.floor_ms)
        self._expire(state, now_ms)
        owner = self._owners.get(message_id)
        if owner is not None:
            if owner == sender:
                raise Duplicate(f"message {message_id.hex()} already received", message_id)
            raise Replayed(f"message id {message_id.hex()} was used by another sender")
        if ts_ms > now_ms + self.ahead_ms:
            raise OutsideWindow(
                f"sent {ts_ms - now_ms} ms in the future (allowed {self.ahead_ms} ms ahead)", ts_ms - now_ms
            )
        if ts_ms < now_ms - self.skew_ms:
            raise OutsideWindow(
                f"sent {now_ms - ts_ms} ms ago (allowed skew {self.skew_ms} ms)", ts_ms - now_ms
            )
        if ts_ms < state.floor_ms:
            raise Stale(
                "sent before this receiver started, or before ids of this sender were forgotten; "
                "a retry carries a fresh stamp"
            )
        full = len(state.ids) >= self.max_ids
        if full:
            self._check_room(sender, state, now_ms)
        _check_sequence(sender, state, epoch, seq)
        if full:
            self._forget_oldest(state)
        self._senders[sender] = state
        state.ids[message_id] = ts_ms
        self._owners[message_id] = sender

    def _check_room(self, sender: str, state: _Sender, now_ms: int) -> None:
        if next(iter(state.ids.values())) >= now_ms:
            # forgetting it would need a floor past our clock, which would refuse
            # the sender's honest frames for as long as it stamped ahead
            raise Stale(
                f"{sender} has {len(state.ids)} remembered frames stamped ahead of our clock; "
                "refused until the clock reaches them"
            )

    def _forget_oldest(self, state: _Sender) -> None:
        oldest_id, oldest_ts = state.ids.popitem(last=False)
        del self._owners[oldest_id]
        state.floor_ms = max(state.floor_ms, oldest_ts + 1)

    def _expire(self, state: _Sender, now_ms: int) -> None:
        horizon = now_ms - 2 * self.skew_ms
        while state.ids:
            message_id, ts = next(iter(state.ids.items()))
            if ts >= horizon:
                break
            del state.ids[message_id]
            del self._owners[message_id]

    def floor_of(self, sender: str) -> int:
        state = self._senders.get(sender)
        return self.floor_ms if state is None else state.floor_ms

    @property
    def tracked_ids(self) -> int:
        return len(self._owners)


def _check_sequence(sender: str, state: _Sender, epoch: int, seq: int) -> None:
    if epoch > state.epoch:
        state.epoch, state.top, state.bits = epoch, seq, 1
        return
    if epoch < state.epoch:
        raise Replayed(f"boot epoch {epoch} is older than {sender}'s current {state.epoch}")
    if seq > state.top:
        shift = seq - state.top
        # a jump past the window resets it: shifting by a huge jump would allocate gigabytes
        state.bits = 1 if shift >= WINDOW_BITS else ((state.bits << shift) | 1) & ((1 << WINDOW_BITS) - 1)
        state.top = seq
        return
    offset = state.top - seq
    if offset >= WINDOW_BITS:
        raise Replayed(f"sequence {seq} is older than {sender}'s window")
    if state.bits >> offset & 1:
        raise Replayed(f"sequence {seq} of {sender} was already used")
    state.bits |= 1 << offset
