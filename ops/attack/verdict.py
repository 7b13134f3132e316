"""What the target did with each hostile frame, and the verdict: pure functions, no I/O.

Every probe is a frame the target must not act on. The monitor (the read-only
login, checking each frame with the deployment's public certificates) says how
the frame looked on the wire; the target's *answers* say what it did: a frame
from the target naming the probe in ``reply_to`` with a message id never seen
before is a fresh answer, so the target accepted the probe. (A cached answer
re-sent to a duplicate carries the id of the first one: the target recognised
the copy and did nothing new.) An attack is defended only if no probe was
accepted, the target still answers a signed ping afterwards without having
restarted or gone offline, no money moved that should not have, and whatever
the attack checks besides held; the evidence says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ops.monitor.model import OK, Monitor, Observation, frame_digest

DEFENDED, NOT_DEFENDED = "defended", "NOT DEFENDED"
REFUSAL_TYPES = ("error", "refusal")
NOT_DELIVERED = "not delivered"  # the broker let it through to nobody (its ACL, size limit, or a cut)

Json = dict[str, Any]


@dataclass(frozen=True)
class Seen:
    """An observation with what the observer adds: the frame's digest, and whether its id was new."""

    obs: Observation
    digest: str
    new_id: bool


def digest(frame: bytes) -> str:
    return frame_digest(frame).hex()


class Sightings:
    """Frames as the monitor judged them, in order, each marked whether its message id was new."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.seen: list[Seen] = []
        self._ids: set[str] = set()

    def add(self, topic: str, frame: bytes, at_ms: int, retained: bool = False) -> Seen:
        obs = self.monitor.observe(topic, frame, at_ms, retained)
        seen = Seen(obs, digest(frame), bool(obs.message_id) and obs.message_id not in self._ids)
        self._ids.add(obs.message_id)
        self.seen.append(seen)
        return seen


@dataclass(frozen=True)
class Sent:
    """One frame the attacker published: a probe (must be refused) or load (flood traffic)."""

    label: str
    topic: str
    target: str  # the node that must not act on it
    digest: str
    size: int
    message_id: str  # hex; "" when the frame has none anyone could answer
    published: str = "published"  # or why the broker connection refused it
    probe: bool = True


@dataclass(frozen=True)
class FrameOutcome:
    sent: Sent
    monitor: str  # the monitor's verdict(s) where it arrived, or NOT_DELIVERED
    answers: tuple[str, ...]  # "type (verdict)" of each frame the target sent naming it
    accepted: bool

    def to_json(self) -> Json:
        s = self.sent
        return {
            "label": s.label,
            "topic": s.topic,
            "target": s.target,
            "size": s.size,
            "message_id": s.message_id,
            "published": s.published,
            "monitor": self.monitor,
            "answers": list(self.answers),
            "accepted": self.accepted,
        }

    def describe(self) -> str:
        answered = f"answered {', '.join(self.answers)}" if self.answers else "no answer"
        published = "" if self.sent.published == "published" else f"{self.sent.published}; "
        return f"{self.sent.label}: {published}monitor {self.monitor}; {answered}"


def outcomes(sent: list[Sent], seen: list[Seen]) -> list[FrameOutcome]:
    """What became of each frame sent, from the frames seen meanwhile (indexed once: floods are big)."""
    arrivals: dict[tuple[str, str], list[Seen]] = {}
    answers: dict[tuple[str, str], list[Seen]] = {}
    for s in seen:
        arrivals.setdefault((s.digest, s.obs.topic), []).append(s)
        if s.obs.reply_to and s.obs.sender:
            answers.setdefault((s.obs.reply_to, s.obs.sender), []).append(s)
    return [
        _outcome(s, arrivals.get((s.digest, s.topic), []), answers.get((s.message_id, s.target), []))
        for s in sent
    ]


def outcome(sent: Sent, seen: list[Seen]) -> FrameOutcome:
    return outcomes([sent], seen)[0]


def _outcome(sent: Sent, arrivals: list[Seen], answers: list[Seen]) -> FrameOutcome:
    answers = answers if sent.message_id else []
    # a typed refusal answering a frame the monitor refused too (a stamp outside the window draws
    # a rate-limited clock_skew refusal) is the target saying why it did nothing, not acceptance
    refused = bool(arrivals) and all(a.obs.verdict != OK for a in arrivals)
    fresh = [
        a
        for a in answers
        if a.new_id and a.obs.verdict == OK and not (refused and a.obs.type in REFUSAL_TYPES)
    ]
    monitor = ", ".join(sorted({a.obs.verdict for a in arrivals})) or NOT_DELIVERED
    accepted = bool(fresh) or any(a.obs.verdict == OK for a in arrivals)
    described = tuple(
        f"{a.obs.type} ({a.obs.verdict}{'' if a.new_id else ', a copy of an earlier answer'})"
        for a in answers
    )
    return FrameOutcome(sent, monitor, described, accepted)


@dataclass
class Report:
    """One attack: what was sent, what the target did, the verdict and its evidence."""

    attack: str
    attacker: str
    target: str
    frames: list[FrameOutcome] = field(default_factory=list)
    load: Json = field(default_factory=dict)  # flood traffic: counts only
    target_after: Json = field(default_factory=dict)
    events: list[Json] = field(default_factory=list)
    ledger: Json = field(default_factory=dict)
    checks: list[tuple[bool, str]] = field(default_factory=list)  # (held, what) for attack-specific checks
    verdict: str = ""
    evidence: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, held: bool, what: str) -> None:
        self.checks.append((held, what))

    def judge(self) -> str:
        """Fill in the verdict and its evidence from everything recorded."""
        failures: list[str] = []
        evidence: list[str] = []
        for frame in self.frames:
            (failures if frame.accepted else evidence).append(
                ("ACCEPTED " if frame.accepted else "") + frame.describe()
            )
        if self.load:
            evidence.append(f"load: {self.load}")
        alive = self.target_after.get("answers_ping", False)
        (evidence if alive else failures).append(f"{self.target} afterwards: {self.target_after}")
        if self.target_after.get("restarted") or self.target_after.get("went_offline"):
            failures.append(f"{self.target} went offline or restarted during the attack")
        if self.ledger and not self.ledger.get("as_expected", True):
            failures.append(f"ledger moved: before {self.ledger['before']}, after {self.ledger['after']}")
        elif self.ledger:
            kept = self.ledger["after"]
            evidence.append(f"ledger unchanged: {kept['payments']} payments, {kept['total']} cents in all")
        for held, what in self.checks:
            (evidence if held else failures).append(("" if held else "FAILED: ") + what)
        self.verdict = NOT_DEFENDED if failures else DEFENDED
        self.evidence = _counted(failures) + _counted(evidence)
        return self.verdict

    def to_json(self) -> Json:
        return {
            "kind": "attack",
            "attack": self.attack,
            "attacker": self.attacker,
            "target": self.target,
            "verdict": self.verdict,
            "evidence": self.evidence,
            "seconds": self.seconds,
            "frames": [f.to_json() for f in self.frames],
            "load": self.load,
            "target_after": self.target_after,
            "events": self.events,
            "ledger": self.ledger,
            "checks": [{"held": held, "what": what} for held, what in self.checks],
        }

    def text(self) -> str:
        who = f"{self.attacker} -> {self.target}"
        lines = [f"{self.attack:<10} {self.verdict:<13} {who}  ({self.seconds:.1f} s)"]
        lines += [f"    {line}" for line in self.evidence]
        lines += [f"    event {e['node']} {e['step']} {e['outcome']}: {e['reason']}" for e in self.events]
        return "\n".join(lines)


def _counted(lines: list[str]) -> list[str]:
    """Each distinct line once, in order, with how often it came (a flood's probes are alike)."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else f"{line} (x{n})" for line, n in counts.items()]
