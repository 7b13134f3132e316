"""Fault rules from a TOML profile or flags (ops.chaos.faults): what is read, what is refused and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.chaos.faults import Direction, Kind, Rule, load_profile, parse_profile, rule_from_flag
from protocol.errors import ConfigError

PROFILE = """
seed = 7
[[fault]]
kind = "drop"
topics = ["tp/v1/dev/+/chip/ps"]
direction = "to-broker"
probability = 0.2

[[fault]]
kind = "delay"
delay_ms = [50, 300]
limit = 3
"""


def test_a_profile_reads_into_rules() -> None:
    profile = parse_profile(PROFILE, "lossy.toml")
    assert profile.seed == 7
    drop, delay = profile.rules
    assert drop == Rule(Kind.DROP, ("tp/v1/dev/+/chip/ps",), "to-broker", probability=0.2)
    assert delay.delay_ms == (50.0, 300.0) and delay.limit == 3 and delay.topics == ("#",)


def test_a_rule_selects_by_topic_filter_and_direction() -> None:
    rule = parse_profile(PROFILE, "p").rules[0]
    assert rule.matches(Direction.TO_BROKER, "tp/v1/dev/dev-0001/chip/ps")
    assert not rule.matches(Direction.FROM_BROKER, "tp/v1/dev/dev-0001/chip/ps")  # one direction
    assert not rule.matches(Direction.TO_BROKER, "tp/v1/dev/dev-0001/ps/chip")  # one link
    assert Rule(Kind.DROP).matches(Direction.FROM_BROKER, "anything/at/all")  # everything


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[fault]]\nkind = "melt"', "kind must be one of"),
        ('[[fault]]\nkind = "drop"\nprobabilty = 0.2', "unknown key 'probabilty'"),
        ('[[fault]]\nkind = "drop"\nprobability = 2', "probability must be within 0..1"),
        ('[[fault]]\nkind = "drop"\nprobability = "high"', "wrong type"),
        ('[[fault]]\nkind = "delay"\ndelay_ms = [300, 50]', "low <= high"),
        ('[[fault]]\nkind = "drop"\ndirection = "sideways"', "direction must be"),
        ('[[fault]]\nkind = "partition"\nmode = "sulk"', "mode must be hold or drop"),
        ('[[fault]]\nkind = "reorder"\nwindow = 1', "window must be at least 2"),
        ('[[fault]]\nkind = "disconnect"\ndeliver = "yes"', "wrong type"),
        ('[[fault]]\nkind = "drop"\nlimit = true', "wrong type"),
        ("seed = 1.5", "seed must be an integer"),
        ("sede = 1", "unknown key 'sede'"),
        ("[[fault", "not TOML"),
    ],
)
def test_a_bad_profile_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        parse_profile(text, "p.toml")
    assert caught.value.reason.startswith("p.toml")


def test_a_missing_profile_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the fault profile"):
        load_profile(tmp_path / "nope.toml")


def test_a_flag_reads_like_a_profile_table() -> None:
    rule = rule_from_flag("delay delay_ms=50,300 topics=a/#,b/+ direction=from-broker probability=0.5")
    assert rule == Rule(Kind.DELAY, ("a/#", "b/+"), "from-broker", 0.5, delay_ms=(50.0, 300.0))
    with pytest.raises(ConfigError, match="not key=value"):
        rule_from_flag("drop often")
    with pytest.raises(ConfigError, match="not a number"):
        rule_from_flag("drop probability=lots")
    assert rule_from_flag("disconnect deliver=true").deliver
    with pytest.raises(ConfigError, match="true or false"):
        rule_from_flag("disconnect deliver=1")
