"""Freshness and replay protection for received frames, bounded in memory.

Three checks, in this order, all after the signature has been verified (so a
forger cannot fill the tables):

1. **Time window**: the send time must lie within ``skew_ms`` of our clock, and
   not before ``floor_ms``. The floor is this receiver's start time: anything
   stamped before we started may have been accepted by our previous life, whose
   tables are gone. Senders' request retries are re-stamped, so nothing is lost.
2. **Message id**: ids seen within the window are remembered; a second frame
   with a known id from the same sender is a ``Duplicate`` (a QoS 1 redelivery
   or a request retry): dropped quietly, answered from the response cache.
3. **Sequence window** per sender and boot epoch (like IPsec's anti-replay
   window): an older epoch, or a sequence number already seen or fallen out of
   the window, is ``Replayed``.

Memory: one fixed-size window per known sender, and the id table, which is
capped; when it is full the oldest entries go and the floor rises past them,
so a frame whose id we forgot is refused as stale instead of accepted twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .errors import Duplicate, Replayed, Stale

WINDOW_BITS = 1024


@dataclass
class _SenderWindow:
    epoch: int
    top: int  # highest sequence number accepted in this epoch
    bits: int  # bit i set: sequence (top - i) accepted


class ReplayGuard:
    def __init__(
        self,
        floor_ms: int,
        skew_ms: int = 30_000,
        max_ids: int = 200_000,
    ) -> None:
        self.floor_ms = floor_ms
        self.skew_ms = skew_ms
        self.max_ids = max_ids
        self._ids: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # id -> (sender, ts)
        self._windows: dict[str, _SenderWindow] = {}

    def check(self, sender: str, message_id: bytes, ts_ms: int, epoch: int, seq: int, now_ms: int) -> None:
        """Raise if the frame is stale, a duplicate or a replay; else record it."""
        self._expire(now_ms)
        seen = self._ids.get(message_id)
        if seen is not None:
            if seen[0] == sender:
                raise Duplicate(f"message {message_id.hex()} already received", message_id)
            raise Replayed(f"message id {message_id.hex()} was used by another sender")
        if ts_ms > now_ms + self.skew_ms:
            raise Stale(f"sent {ts_ms - now_ms} ms in the future (allowed skew {self.skew_ms} ms)")
        if ts_ms < now_ms - self.skew_ms:
            raise Stale(f"sent {now_ms - ts_ms} ms ago (allowed skew {self.skew_ms} ms)")
        if ts_ms < self.floor_ms:
            raise Stale("sent before this receiver started; a retry carries a fresh stamp")
        self._check_sequence(sender, epoch, seq)
        self._ids[message_id] = (sender, ts_ms)
        while len(self._ids) > self.max_ids:
            _, (_, old_ts) = self._ids.popitem(last=False)
            self.floor_ms = max(self.floor_ms, old_ts + 1)

    def _check_sequence(self, sender: str, epoch: int, seq: int) -> None:
        win = self._windows.get(sender)
        if win is None or epoch > win.epoch:
            self._windows[sender] = _SenderWindow(epoch, seq, 1)
            return
        if epoch < win.epoch:
            raise Replayed(f"boot epoch {epoch} is older than {sender}'s current {win.epoch}")
        if seq > win.top:
            shift = seq - win.top
            # a jump past the window resets it: shifting by a huge jump would allocate gigabytes
            win.bits = 1 if shift >= WINDOW_BITS else ((win.bits << shift) | 1) & ((1 << WINDOW_BITS) - 1)
            win.top = seq
            return
        offset = win.top - seq
        if offset >= WINDOW_BITS:
            raise Replayed(f"sequence {seq} is older than {sender}'s window")
        if win.bits >> offset & 1:
            raise Replayed(f"sequence {seq} of {sender} was already used")
        win.bits |= 1 << offset

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - 2 * self.skew_ms
        while self._ids:
            first = next(iter(self._ids.values()))
            if first[1] >= horizon:
                break
            self._ids.popitem(last=False)

    @property
    def tracked_ids(self) -> int:
        return len(self._ids)
