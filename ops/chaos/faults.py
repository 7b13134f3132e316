"""Fault rules: what to do to which PUBLISH packets, read from a TOML profile or from flags.

A profile::

    seed = 7
    [[fault]]
    kind = "drop"                      # drop delay duplicate reorder corrupt truncate
                                       # replay partition disconnect
    topics = ["tp/v1/dev/+/chip/ps"]   # MQTT filters (default "#": everything)
    direction = "to-broker"            # to-broker | from-broker | both (default)
    probability = 0.2                  # of each matching packet (default 1)
    limit = 3                          # at most this many times in all, since the profile was loaded
    delay_ms = [50, 300]               # delay; replay: how much later (a number or a [low, high] range)
    copies = 1                         # duplicate: extra copies
    window = 3                         # reorder: packets held, then released out of order
    hold_ms = 500                      # reorder: longest a held packet waits for the window to fill
    flips = 1                          # corrupt: bytes of the payload flipped
    keep = 10                          # truncate: payload bytes kept (default: a random shorter length)
    mode = "drop"                      # partition: hold (release when it heals) or drop
    start_ms = 0                       # partition: from this long after the profile was loaded
    duration_ms = 2000                 # partition: for this long
    deliver = true                     # disconnect: forward the packet, then cut (default: cut instead),
                                       # so the receiver has it and the sender never hears back

The first rule that matches a packet and whose probability draw succeeds is
applied; the others are not consulted for that packet.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.bus import topic_matches
from protocol.errors import ConfigError


class Kind(enum.StrEnum):
    DROP = "drop"
    DELAY = "delay"
    DUPLICATE = "duplicate"
    REORDER = "reorder"
    CORRUPT = "corrupt"
    TRUNCATE = "truncate"
    REPLAY = "replay"
    PARTITION = "partition"
    DISCONNECT = "disconnect"


class Direction(enum.StrEnum):
    TO_BROKER = "to-broker"
    FROM_BROKER = "from-broker"


BOTH = "both"


@dataclass(frozen=True)
class Rule:
    kind: Kind
    topics: tuple[str, ...] = ("#",)
    direction: str = BOTH
    probability: float = 1.0
    limit: int | None = None
    delay_ms: tuple[float, float] = (0.0, 0.0)
    copies: int = 1
    window: int = 2
    hold_ms: float = 500.0
    flips: int = 1
    keep: int | None = None
    mode: str = "hold"
    start_ms: float = 0.0
    duration_ms: float = 1000.0
    deliver: bool = False

    def matches(self, direction: Direction, topic: str) -> bool:
        if self.direction not in (BOTH, direction):
            return False
        return any(topic_matches(f, topic) for f in self.topics)


@dataclass(frozen=True)
class Profile:
    rules: tuple[Rule, ...] = ()
    seed: int | None = None  # the profile's own; --seed wins
    source: str = "flags"


_FIELDS: Mapping[str, tuple[type, ...]] = {  # key -> the TOML types it takes
    "topics": (list, str),
    "direction": (str,),
    "probability": (int, float),
    "limit": (int,),
    "delay_ms": (int, float, list),
    "copies": (int,),
    "window": (int,),
    "hold_ms": (int, float),
    "flips": (int,),
    "keep": (int,),
    "mode": (str,),
    "start_ms": (int, float),
    "duration_ms": (int, float),
    "deliver": (bool,),
}


def rule_from(entry: Mapping[str, Any], where: str) -> Rule:
    """One rule from a profile's table (or a flag's key=value pairs); ConfigError says what is wrong."""
    values = dict(entry)
    try:
        kind = Kind(values.pop("kind", None))
    except ValueError:
        raise ConfigError(f"{where}: kind must be one of {', '.join(Kind)}") from None
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: kind, {', '.join(_FIELDS)})")
    for key, value in values.items():
        types = _FIELDS[key]
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):  # True is an int too
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type")
    if isinstance(values.get("topics"), str):
        values["topics"] = [values["topics"]]
    if "topics" in values:
        values["topics"] = tuple(str(t) for t in values["topics"])
    if "delay_ms" in values:
        values["delay_ms"] = _range(values["delay_ms"], f"{where}: delay_ms")
    rule = Rule(kind=kind, **values)
    _check(rule, where)
    return rule


def _range(value: object, where: str) -> tuple[float, float]:
    if isinstance(value, int | float):
        return float(value), float(value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        low, high = float(value[0]), float(value[1])
        if low <= high:
            return low, high
    raise ConfigError(f"{where} must be a number or [low, high] with low <= high, not {value!r}")


def _check(rule: Rule, where: str) -> None:
    problems = [
        (rule.direction not in (BOTH, *Direction), "direction must be to-broker, from-broker or both"),
        (not 0.0 <= rule.probability <= 1.0, "probability must be within 0..1"),
        (rule.limit is not None and rule.limit < 0, "limit must not be negative"),
        (rule.delay_ms[0] < 0, "delay_ms must not be negative"),
        (rule.copies < 1, "copies must be at least 1"),
        (rule.window < 2, "window must be at least 2"),
        (rule.hold_ms <= 0 or rule.duration_ms < 0 or rule.start_ms < 0, "times must not be negative"),
        (rule.flips < 1, "flips must be at least 1"),
        (rule.keep is not None and rule.keep < 0, "keep must not be negative"),
        (rule.mode not in ("hold", "drop"), "mode must be hold or drop"),
        (not rule.topics, "topics must name at least one filter"),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"{where}: {why}")


def parse_profile(text: str, source: str) -> Profile:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"seed", "fault"})
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known: seed, fault)")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{source}: seed must be an integer")
    faults = doc.get("fault", [])
    if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
        raise ConfigError(f"{source}: faults are [[fault]] tables")
    rules = tuple(rule_from(f, f"{source} fault #{i + 1}") for i, f in enumerate(faults))
    return Profile(rules, seed, source)


def load_profile(path: Path) -> Profile:
    """Blocking (a small file): call it through asyncio.to_thread on a running loop."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the fault profile {path}: {exc.strerror}") from exc
    return parse_profile(text, str(path))


def rule_from_flag(spec: str) -> Rule:
    """``--fault 'drop probability=0.2 topics=tp/v1/dev/+/chip/ps direction=to-broker'``."""
    words = spec.split()
    if not words:
        raise ConfigError("--fault needs a kind, e.g. --fault 'drop probability=0.2'")
    entry: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"--fault {spec!r}: {word!r} is not key=value")
        entry[key] = _flag_value(key, value)
    return rule_from(entry, f"--fault {spec!r}")


def _flag_value(key: str, value: str) -> Any:
    if key == "topics":
        return value.split(",")
    if key == "delay_ms" and "," in value:
        return [_number(v) for v in value.split(",")]
    if key in ("direction", "mode"):
        return value
    if key == "deliver":
        if value not in ("true", "false"):
            raise ConfigError(f"deliver={value!r}: say true or false")
        return value == "true"
    return _number(value)


def _number(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{value!r} is not a number") from None


def profile_from(rules: Sequence[Rule], seed: int | None = None) -> Profile:
    return Profile(tuple(rules), seed, "flags")


@dataclass
class Tally:
    """How often each rule fired since the profile was loaded, over every connection (for ``limit``)."""

    fired: dict[int, int] = field(default_factory=dict)

    def allows(self, index: int, rule: Rule) -> bool:
        return rule.limit is None or self.fired.get(index, 0) < rule.limit

    def count(self, index: int) -> None:
        self.fired[index] = self.fired.get(index, 0) + 1
