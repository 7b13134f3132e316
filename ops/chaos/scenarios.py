"""The shipped chaos scenarios: which faults hit which links, and what else happens mid-run.

A scenario is data: link faults for the proxy (:mod:`ops.chaos.faults`) and
the name of an *action* (:mod:`ops.chaos.actions`) that plays out beside the
payments: a broker restarted, servers (or one replica of each) killed,
``trustpay up`` killed, an app tampered with, an attacker replaying orders. The runner (:mod:`ops.chaos.run`)
turns the faults off when the payments are done, lets the system settle and
checks the invariants (:mod:`ops.chaos.invariants`).

The radio links are the wireless ones of the patent: trust module <-> trust
server and chip <-> payment server. The links inside a device (client, chip,
trust module) are wires on one board, and the nodes' status, event and metrics
channels are how the run is observed, so the radio faults leave them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ConfigError

from .faults import BOTH, Direction, Kind, Rule

RADIO = ("tp/v1/dev/+/tm/ts", "tp/v1/dev/+/ts/tm", "tp/v1/dev/+/chip/ps", "tp/v1/dev/+/ps/chip")
TO_PLATFORM = ("tp/v1/dev/+/tm/ts", "tp/v1/dev/+/chip/ps")


def _radio(kind: Kind, **fields: Any) -> Rule:
    """A fault of the radio, in both of its directions: each frame crosses the proxy twice (to
    the broker and from it), so a rule hits it where it leaves its sender, once."""
    return Rule(kind=kind, topics=RADIO, direction=Direction.TO_BROKER, **fields)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    rules: tuple[Rule, ...] = ()  # link faults while the payments run
    action: str = ""  # what else happens meanwhile (ops.chaos.actions), "" for nothing
    backend: str | None = None  # a broker this scenario needs; None: the deployment's default
    # replicas of each server `up` runs (provisioned as many); with more than one, the run's
    # --db (PostgreSQL, which replicas are for) if given, else the SQLite files they share
    replicas: int = 1
    # refusal codes a device's payments may end with in this scenario, by device index (0-based);
    # any payment with another outcome than confirmed or these is reported, not hidden
    expected_refusals: dict[int, frozenset[str]] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "lossy-radio",
            "every radio frame has a 20% chance of being lost, both ways",
            (_radio(Kind.DROP, probability=0.2),),
        ),
        Scenario(
            "noisy-radio",
            "5% of radio frames arrive with a flipped byte, 1% cut short",
            (_radio(Kind.CORRUPT, probability=0.05, flips=1), _radio(Kind.TRUNCATE, probability=0.01)),
        ),
        Scenario(
            "duplicating-radio",
            "radio frames arrive twice (20%), again up to 2 s later (10%), and out of order (windows of 3)",
            (
                _radio(Kind.DUPLICATE, probability=0.2, copies=1),
                _radio(Kind.REPLAY, probability=0.1, delay_ms=(100.0, 2000.0)),
                _radio(Kind.REORDER, probability=0.5, window=3, hold_ms=300.0),
            ),
        ),
        Scenario(
            "partition",
            "the radio goes silent for 4 s (frames to the platform lost), then heals",
            (Rule(Kind.PARTITION, RADIO, BOTH, mode="drop", start_ms=500.0, duration_ms=4000.0),),
        ),
        Scenario(
            "cut-links",
            "radio frames reach the broker but their senders' connections are cut before the "
            "acknowledgement (8 times): publishes fail while readers see the disconnect",
            (
                Rule(
                    kind=Kind.DISCONNECT,
                    topics=TO_PLATFORM,
                    direction=Direction.TO_BROKER,
                    probability=0.3,
                    limit=8,
                    deliver=True,
                ),
            ),
        ),
        Scenario(
            "broker-restart",
            "the broker is stopped and started again while payments run",
            action="restart_broker",
        ),
        Scenario(
            "broker-restart-amqtt",
            "the embedded broker (amqtt) is stopped and started again while payments run",
            action="restart_broker",
            backend="amqtt",
        ),
        Scenario(
            "kill-servers",
            "the payment-server, then the trust-server, are killed with SIGKILL; `up` restarts them",
            action="kill_servers",
        ),
        Scenario(
            "kill-replica",
            "two replicas of each server (on the run's --db, PostgreSQL): one payment-server and one "
            "trust-server replica are killed with SIGKILL mid-stream; the others carry on, `up` "
            "restarts them",
            action="kill_servers",
            replicas=2,
        ),
        Scenario(
            "kill-up",
            "`trustpay up` itself is killed with SIGKILL: every node it started must die with it; "
            "then it is started again",
            action="kill_up",
        ),
        Scenario(
            "clock-skew",
            "the last device's clock is 40 s behind: its payments are refused with clock_skew, "
            "the others pay",
            action="skew_clock",
            expected_refusals={-1: frozenset({"clock_skew"})},
        ),
        Scenario(
            "tampered-app",
            "the last device's payment app is overwritten mid-run: its payments are refused from then on",
            action="tamper_app",
            # untrusted at C3, then the trust module deletes the app (A3): unknown_app from then on
            expected_refusals={-1: frozenset({"untrusted", "app_changed", "unknown_app", "disabled"})},
        ),
        Scenario(
            "replay-orders",
            "an attacker with the last device's chip login replays captured payment orders, later and "
            "on its own device's link",
            action="replay_orders",
        ),
    )
}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ConfigError(f"no scenario {name!r}; the scenarios are: {', '.join(SCENARIOS)}") from None
