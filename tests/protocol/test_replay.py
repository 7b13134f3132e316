"""ReplayGuard: time window, restart floor, duplicate ids, sequence windows and bounded memory."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import Duplicate, Rejected, Replayed, Stale
from protocol.replay import WINDOW_BITS, OutsideWindow, ReplayGuard

from .factory import NOW_MS, exactly

SKEW = 30_000
AHEAD = 5_000


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Feed:
    """Feeds a guard frames with fresh ids."""

    def __init__(self, guard: ReplayGuard) -> None:
        self.guard = guard
        self.n = 0

    def check(
        self, seq: int, *, sender: str = "a", epoch: int = 1, ts: int = NOW_MS, now: int = NOW_MS
    ) -> bytes:
        self.n += 1
        self.guard.check(sender, mid(self.n), ts, epoch, seq, now)
        return mid(self.n)


def test_time_window_and_floor():
    g = ReplayGuard(floor_ms=NOW_MS - 10_000, skew_ms=SKEW, ahead_ms=AHEAD)
    f = Feed(g)
    # behind by up to the skew, ahead by far less: a stamp ahead is what a flooder uses
    for ts in (NOW_MS - SKEW - 1, NOW_MS + AHEAD + 1, NOW_MS + SKEW, 0):
        with exactly(OutsideWindow) as info:  # the window: a wrong clock, answered with clock_skew
            f.check(1, ts=ts)
        assert info.value.ahead_ms == ts - NOW_MS
    with exactly(Stale):  # within the window but before the floor: not the sender's clock
        f.check(1, ts=NOW_MS - 10_001)
    for seq, ts in enumerate((NOW_MS - 10_000, NOW_MS + AHEAD, NOW_MS), start=1):
        f.check(seq, ts=ts)
    assert g.tracked_ids == 3


def test_duplicate_and_foreign_id():
    g = ReplayGuard(0)
    g.check("a", mid(1), NOW_MS, 1, 1, NOW_MS)
    with exactly(Duplicate) as info:
        g.check("a", mid(1), NOW_MS, 1, 1, NOW_MS + 1)
    assert info.value.alarm is False and info.value.message_id == mid(1)
    with exactly(Duplicate):  # still a duplicate even if the copy's header differs (ids identify messages)
        g.check("a", mid(1), NOW_MS, 1, 2, NOW_MS + 1)
    with exactly(Replayed):
        g.check("b", mid(1), NOW_MS, 1, 1, NOW_MS)


def test_rejected_frames_leave_no_trace():
    g = ReplayGuard(0)
    with exactly(OutsideWindow):
        g.check("a", mid(1), NOW_MS - SKEW - 1, 1, 1, NOW_MS)
    assert g.tracked_ids == 0
    g.check("a", mid(2), NOW_MS, 1, 5, NOW_MS)
    with exactly(Replayed):
        g.check("a", mid(3), NOW_MS, 1, 5, NOW_MS)
    assert g.tracked_ids == 1
    g.check("a", mid(3), NOW_MS, 1, 6, NOW_MS)  # the refused id is usable: it was never recorded


def test_out_of_order_within_window_accepted_once():
    f = Feed(ReplayGuard(0))
    f.check(100)
    for seq in (50, 99, 1, 100 - WINDOW_BITS + 1, 101, 75):
        f.check(seq)
        with exactly(Replayed):
            f.check(seq)


def test_beyond_window_refused():
    f = Feed(ReplayGuard(0))
    top = 5 * WINDOW_BITS
    f.check(top)
    with exactly(Replayed):
        f.check(top - WINDOW_BITS)
    with exactly(Replayed):
        f.check(0)
    f.check(top - WINDOW_BITS + 1)
    # the window slides with the top
    f.check(top + 10)
    with exactly(Replayed):
        f.check(top - WINDOW_BITS + 10)
    f.check(top - WINDOW_BITS + 11)


def test_jump_forward_clears_the_window():
    f = Feed(ReplayGuard(0))
    for seq in range(1, 20):
        f.check(seq)
    f.check(19 + WINDOW_BITS + 5)
    with exactly(Replayed):
        f.check(19 + 5)  # just below the window: refused, though never seen
    f.check(19 + 6)  # the window's bottom is still new


def test_epochs():
    f = Feed(ReplayGuard(0))
    f.check(500, epoch=3)
    f.check(1, epoch=4)  # the sender restarted: its counter starts again
    f.check(2, epoch=4)
    with exactly(Replayed):
        f.check(501, epoch=3)
    with exactly(Replayed):
        f.check(2, epoch=4)
    f.check(0, epoch=2**40)


def test_senders_have_separate_windows():
    f = Feed(ReplayGuard(0))
    f.check(7, sender="a")
    f.check(7, sender="b")
    with exactly(Replayed):
        f.check(7, sender="a")


def test_large_sequence_jump_is_accepted_and_cheap():
    """seq is any signed int64: a jump must cost O(window), not O(jump) memory and time."""
    g = ReplayGuard(0)
    g.check("a", mid(1), NOW_MS, 1, 1, NOW_MS)
    started = time.perf_counter()
    g.check("a", mid(2), NOW_MS, 1, 2**63 - 1, NOW_MS)
    assert time.perf_counter() - started < 0.1
    with exactly(Replayed):
        g.check("a", mid(3), NOW_MS, 1, 2**63 - 1, NOW_MS)
    with exactly(Replayed):
        g.check("a", mid(4), NOW_MS, 1, 2, NOW_MS)


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.integers(0, 3 * WINDOW_BITS), max_size=60), epoch=st.integers(0, 5))
def test_sequence_window_matches_model(seqs, epoch):
    """Accept a sequence number iff it is new and not below the window under the highest seen."""
    f = Feed(ReplayGuard(0))
    seen: set[int] = set()
    top = None
    for seq in seqs:
        fresh = seq not in seen and (top is None or seq > top or top - seq < WINDOW_BITS)
        try:
            f.check(seq, epoch=epoch)
        except Replayed as exc:
            assert type(exc) is Replayed
            assert not fresh, f"fresh {seq} refused (top {top})"
        else:
            assert fresh, f"replayed {seq} accepted (top {top})"
            seen.add(seq)
            top = seq if top is None else max(top, seq)


# -- memory -----------------------------------------------------------------------------
def test_id_table_is_bounded_and_floor_rises():
    g = ReplayGuard(0, skew_ms=SKEW, max_ids=8)
    accepted = []
    for i in range(40):
        ts = NOW_MS - 20_000 + i * 100
        g.check("a", mid(i), ts, 1, i, NOW_MS)
        accepted.append((mid(i), ts, i))
        assert g.tracked_ids <= 8
    assert g.tracked_ids == 8
    assert g.floor_of("a") == accepted[-9][1] + 1
    assert g.floor_of("b") == 0  # only the sender that overflowed its table lost anything
    for message_id, ts, seq in accepted[:-8]:  # forgotten ids
        with exactly(Stale):
            g.check("a", message_id, ts, 1, seq, NOW_MS)
    for message_id, ts, seq in accepted[-8:]:  # remembered ids
        with exactly(Duplicate):
            g.check("a", message_id, ts, 1, seq, NOW_MS)


def test_each_sender_has_its_own_table():
    g = ReplayGuard(0, skew_ms=SKEW, max_ids=4)
    for sender in ("a", "b", "c"):
        for i in range(4):
            g.check(sender, f"{sender}{i}".encode(), NOW_MS, 1, i, NOW_MS)
    assert g.tracked_ids == 12
    assert {g.floor_of(s) for s in "abc"} == {0}


def test_a_sender_whose_table_is_full_of_future_stamps_waits_for_the_clock():
    g = ReplayGuard(0, skew_ms=SKEW, max_ids=4, ahead_ms=AHEAD)
    for i in range(4):
        g.check("flood", mid(i), NOW_MS + AHEAD, 1, i, NOW_MS)
    with exactly(Stale):  # forgetting one would need a floor past our clock
        g.check("flood", mid(10), NOW_MS, 1, 10, NOW_MS)
    assert g.floor_of("flood") == 0
    g.check("other", mid(11), NOW_MS, 1, 1, NOW_MS)
    later = NOW_MS + AHEAD + 1
    g.check("flood", mid(12), later, 1, 12, later)
    assert g.floor_of("flood") == NOW_MS + AHEAD + 1 <= later


@settings(max_examples=200, deadline=None)
@given(
    max_ids=st.integers(1, 8),
    flood=st.lists(st.tuples(st.integers(0, 2 * AHEAD), st.integers(0, 2_000)), min_size=1, max_size=60),
    honest_age=st.integers(0, SKEW),
)
def test_a_flooding_sender_never_makes_another_senders_fresh_frames_stale(max_ids, flood, honest_age):
    """One sender floods future-stamped frames (main raised everyone's floor past now)."""
    start = NOW_MS - SKEW
    g = ReplayGuard(start, skew_ms=SKEW, max_ids=max_ids)
    now = NOW_MS
    for n, (ahead, advance) in enumerate(flood):
        now += advance
        with contextlib.suppress(Rejected):  # the flooder's own frames may be refused
            g.check("flood", mid(n), now + ahead, 1, n, now)
        assert g.floor_of("flood") <= now, "a floor moved past the clock"
    honest_ts = max(start, now - honest_age)
    g.check("honest", mid(10_000), honest_ts, 1, 1, now)  # raises if it was refused
    assert g.tracked_ids <= 2 * max_ids


def test_old_ids_expire():
    g = ReplayGuard(0, skew_ms=SKEW)
    for i in range(10):
        g.check("a", mid(i), NOW_MS, 1, i, NOW_MS)
    assert g.tracked_ids == 10
    later = NOW_MS + 2 * SKEW + 1
    g.check("a", mid(100), later, 1, 100, later)
    assert g.tracked_ids == 1
    with exactly(OutsideWindow):  # forgotten, but far too old to be accepted again
        g.check("b", mid(3), NOW_MS, 1, 3, later)


def test_ids_within_twice_the_skew_are_kept():
    g = ReplayGuard(0, skew_ms=SKEW)
    g.check("a", mid(1), NOW_MS, 1, 1, NOW_MS)
    g.check("a", mid(2), NOW_MS + 2 * SKEW, 1, 2, NOW_MS + 2 * SKEW)
    assert g.tracked_ids == 2


@settings(max_examples=150, deadline=None)
@given(
    max_ids=st.integers(1, 6),
    steps=st.lists(
        st.tuples(
            st.booleans(),  # replay an earlier frame?
            st.integers(0, 1_000),  # which one (modulo), or the sender of a new frame
            st.integers(-SKEW, SKEW),  # stamp relative to now
            st.integers(0, 20_000),  # clock advance
        ),
        max_size=50,
    ),
)
def test_no_frame_is_ever_accepted_twice(max_ids, steps):
    """Whatever the arrival order, clock and table size, an accepted frame never passes again."""
    senders = 3
    g = ReplayGuard(NOW_MS - 60_000, skew_ms=SKEW, max_ids=max_ids)
    now = NOW_MS
    frames: list[tuple[str, bytes, int, int]] = []
    accepted: set[bytes] = set()
    for n, (replay, pick, offset, advance) in enumerate(steps):
        now += advance
        if replay and frames:
            frame = frames[pick % len(frames)]
        else:
            # a few senders, so that their own tables overflow and their floors rise
            frame = (f"s{pick % senders}", mid(n), now + offset, n)
            frames.append(frame)
        sender, message_id, ts, epoch = frame
        try:
            g.check(sender, message_id, ts, epoch, 1, now)
        except Rejected:
            pass
        else:
            assert message_id not in accepted, f"{message_id.hex()} accepted twice"
            accepted.add(message_id)
        assert g.tracked_ids <= senders * max_ids


@pytest.mark.parametrize("max_ids", [1, 2, 100])
def test_table_never_exceeds_max_ids(max_ids):
    g = ReplayGuard(0, max_ids=max_ids)
    for i in range(3 * max_ids):
        g.check("a", mid(i), NOW_MS + i, 1, i, NOW_MS + i)
        assert g.tracked_ids <= max_ids
