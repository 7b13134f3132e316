"""The restart policy and the backoff schedule, with the clock and the randomness passed in (no loop)."""

from __future__ import annotations

import signal

import pytest

from ops.launcher import NodeExit
from ops.supervise import Backoff, Restart


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exit_with(returncode: int) -> NodeExit:
    return NodeExit("trust-server", 4242, returncode, False, 3.0, "")


def test_doubling_from_half_a_second_capped_at_thirty_without_jitter() -> None:
    clock = Clock()
    backoff = Backoff(clock=clock, rand=lambda: 0.0)
    backoff.came_up()
    delays = []
    for _ in range(10):  # a node that dies at once after every start: no attempt comes up
        delays.append(backoff.next_delay())
        clock.now += 0.1
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff.failures == 10
    for _ in range(2000):  # a crash loop of days: the exponent stays bounded, the delay capped
        assert backoff.next_delay() == 30.0


def test_jitter_only_shortens_a_delay_by_up_to_a_quarter() -> None:
    draws = iter([0.0, 0.999, 0.5])
    backoff = Backoff(clock=Clock(), rand=lambda: next(draws))
    assert backoff.next_delay() == 0.5
    assert backoff.next_delay() == pytest.approx(1.0 * (1 - 0.25 * 0.999))
    assert backoff.next_delay() == pytest.approx(2.0 * 0.875)


def test_reset_after_it_stayed_up_a_while_but_not_after_a_short_run() -> None:
    clock = Clock()
    backoff = Backoff(clock=clock, rand=lambda: 0.0)
    backoff.came_up()
    assert [backoff.next_delay(), backoff.next_delay()] == [0.5, 1.0]
    backoff.came_up()
    clock.now += 59.9  # up, but not a while: the next delay keeps growing
    assert backoff.next_delay() == 2.0
    backoff.came_up()
    clock.now += 60.0  # up for reset_after_s: it counts as healthy again
    assert backoff.next_delay() == 0.5 and backoff.failures == 1


def test_an_attempt_that_never_came_up_does_not_reset_the_schedule() -> None:
    """The time since the last *up* must not count once that incarnation is gone: otherwise a node
    that ran for an hour and now fails at every start would restart every 0.5 s forever."""
    clock = Clock()
    backoff = Backoff(clock=clock, rand=lambda: 0.0)
    backoff.came_up()
    clock.now += 3600.0
    assert backoff.next_delay() == 0.5  # a long healthy run: start again quickly
    clock.now += 120.0  # the new attempt failed to come up, slowly
    assert backoff.next_delay() == 1.0
    clock.now += 120.0
    assert backoff.next_delay() == 2.0


def test_restart_policies_like_systemd_and_docker() -> None:
    clean, crashed, killed = exit_with(0), exit_with(1), exit_with(-signal.SIGKILL)
    assert all(Restart.ALWAYS.wants(e) for e in (clean, crashed, killed))
    assert not Restart.ON_FAILURE.wants(clean)
    assert Restart.ON_FAILURE.wants(crashed) and Restart.ON_FAILURE.wants(killed)
    assert not any(Restart.NEVER.wants(e) for e in (clean, crashed, killed))
    assert [str(p) for p in Restart] == ["always", "on-failure", "never"]
