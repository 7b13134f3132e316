"""What the monitor makes of each frame, and what it remembers: no I/O, no event loop.

Frames go in with their topic, retain flag and arrival time; one
:class:`Observation` comes out per frame, and :class:`Monitor` keeps the state
the views draw (devices, servers, rejects, messages per link). The arrival
time is the only clock, so a recording replayed later gets the same verdicts.

Every frame is checked like a receiver would, with the deployment's public
certificates only (sealed bodies stay sealed), plus a replay guard of the
monitor's own. Two things a receiver does not need to know, the monitor
works out because an operator does:

* A frame whose signature fails over its topic but holds over another topic
  its type may travel on was *moved* there: ``wrong_topic``, naming both.
* A message id seen again from the same sender is a ``duplicate`` to a node
  (it answers from its cache). The monitor tells the honest copies (a retry is
  re-signed with the same id; a cached answer is re-sent once per copy of its
  request) from an exact copy of a frame nobody had reason to send again:
  ``replayed``. A QoS 1 redelivery by a publisher after a reconnect looks the
  same as a replay at this layer; it is rare, and the reason says so.

Status and the revocation list are checked by signature only: retained
copies and a node's last will carry stamps from long before they arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from protocol.certs import Certificate, CertStore, RevocationList
from protocol.envelope import Envelope, SenderRevoked, Verifier, peek
from protocol.errors import BadSignature, Duplicate, Rejected, TooLarge, TrustpayError, WrongTopic
from protocol.messages import MESSAGE_TYPES, Metrics, Status, StepEvent, StepEvents, reported_by
from protocol.replay import ReplayGuard
from protocol.topics import (
    CHANNEL_CRL,
    CHANNEL_STATUS,
    SERVER_ROLES,
    ParsedTopic,
    Role,
    channel_topic,
    link_topic,
    parse_topic,
    server_replica,
)

OK = "ok"
SKEW_MS = 30_000  # the nodes' own default window (nodes.runtime.Settings.skew_ms)
MAX_REMEMBERED = 50_000  # frames whose digest is kept to tell copies apart
MAX_SESSIONS = 2_000  # sessions whose last step time is kept for latencies
MAX_SAMPLES = 10_000  # latency samples kept per step

Json = dict[str, Any]


@dataclass(frozen=True)
class Anchors:
    """The deployment's public trust anchors: all the monitor needs to check frames."""

    root: Certificate
    update: Certificate
    platform: Certificate
    crl: RevocationList

    def store(self, now_ms: int) -> CertStore:
        certs = CertStore(self.root, self.update)
        certs.install_platform(self.platform)
        certs.set_revocations(self.crl, now_ms // 1000)
        return certs


@dataclass(frozen=True)
class Observation:
    """One frame as the monitor saw it. Header fields of a rejected frame are unverified."""

    seq: int
    at_ms: int
    topic: str
    device: str | None
    src: str | None
    dst: str | None
    type: str | None
    sender: str | None
    recipient: str | None
    session: str
    message_id: str
    reply_to: str
    verdict: str
    reason: str
    size: int
    sealed: bool
    retained: bool
    event: Json | None = None  # of a batch (``events``), its last event
    status: Json | None = None
    events: tuple[Json, ...] = ()  # every event of an ``events`` batch, in order

    @property
    def link(self) -> str:
        """``src->dst`` in short role names or channels (``chip->tm``, ``tm->ev``); ``?`` if unknown."""
        return f"{_short(self.src)}->{_short(self.dst)}"

    def to_json(self) -> Json:
        return {
            "kind": "frame",
            "seq": self.seq,
            "at_ms": self.at_ms,
            "topic": self.topic,
            "device": self.device,
            "src": self.src,
            "dst": self.dst,
            "type": self.type,
            "sender": self.sender,
            "recipient": self.recipient,
            "session": self.session,
            "message_id": self.message_id,
            "reply_to": self.reply_to,
            "verdict": self.verdict,
            "reason": self.reason,
            "size": self.size,
            "sealed": self.sealed,
            "retained": self.retained,
            "event": self.event,
            "status": self.status,
            "events": list(self.events),
        }


@dataclass(frozen=True)
class Dropped:
    """Frames the monitor could not keep up with (its queue was full): never checked."""

    count: int

    def to_json(self) -> Json:
        return {"kind": "dropped", "count": self.count}


# -- state the views draw ------------------------------------------------------------
@dataclass
class FlowState:
    step: str
    outcome: str
    reason: str
    at_ms: int


@dataclass
class DeviceState:
    flows: dict[str, FlowState] = field(default_factory=dict)  # "A", "B", "C" -> last step
    trust: str = ""  # the last C4 outcome: trusted / refused / failed
    trust_reason: str = ""
    last_order: str = ""
    last_order_outcome: str = ""  # outcome of the last step naming the order
    last_order_step: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # its nodes' last status: online / offline
    session: str = ""  # the session whose step times ``step_ms`` holds
    step_ms: dict[str, int] = field(default_factory=dict)  # step -> ms since the previous step


@dataclass
class ServerState:
    status: str = ""
    status_at_ms: int = 0
    sent: int = 0
    received: int = 0
    rejected: int = 0  # frames claiming to come from it that failed


@dataclass(frozen=True)
class Copy:
    """A frame accepted once: its digest, how often its id arrived, its observation number."""

    digest: bytes
    seq: int
    at_ms: int
    arrivals: int = 1


def percentile(samples: list[int], fraction: float) -> int:
    """Nearest-rank percentile of ``samples`` (which must not be empty)."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * int(fraction * 1000) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


class Monitor:
    """Frames in, observations and state out."""

    def __init__(self, anchors: Anchors, started_ms: int, skew_ms: int = SKEW_MS) -> None:
        self.started_ms = started_ms
        self.skew_ms = skew_ms
        certs = anchors.store(started_ms)
        # A frame stamped before we started may be in flight to us now: only the window applies.
        # (So a copy of a frame sent before we started passes unnoticed: we never saw the original.)
        guard = ReplayGuard(floor_ms=started_ms - skew_ms, skew_ms=skew_ms)
        self._guarded = Verifier(frozenset(), certs, guard)
        self._signature_only = Verifier(frozenset(), certs, None)
        self._copies: OrderedDict[bytes, Copy] = OrderedDict()  # message id -> first accepted copy
        self._session_last: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.seq = 0
        self.dropped = 0
        self.devices: dict[str, DeviceState] = {}
        self.servers: dict[str, ServerState] = {r.value: ServerState() for r in SERVER_ROLES}
        self.rejects: Counter[str] = Counter()
        self.links: Counter[tuple[str, str]] = Counter()  # (link, type) -> frames
        self.node_metrics: dict[str, Metrics] = {}  # each node's latest verified counters
        self.latencies: dict[str, deque[int]] = {}

    # -- one frame ------------------------------------------------------------------
    def observe(self, topic: str, frame: bytes, at_ms: int, retained: bool = False) -> Observation:
        self.seq += 1
        parsed = _parse(topic)
        header: Envelope | None = None
        body: object = None
        try:
            received = self._verifier(parsed, retained).open(frame, topic, at_ms)
        except SenderRevoked as exc:
            header, verdict, reason = exc.received.envelope, exc.code, exc.reason
        except Duplicate as exc:
            header = peek(frame)  # verified: the guard only runs after the signature held
            verdict, reason = self._copy_verdict(frame, exc, header, at_ms)
        except Rejected as exc:
            header = peek(frame)
            verdict, reason = _code(exc), exc.reason
            if isinstance(exc, (BadSignature, WrongTopic)) and header is not None and parsed is not None:
                moved_from = self._signed_for(frame, header, parsed, topic, at_ms)
                if moved_from is not None:
                    verdict, reason = WrongTopic.code, f"signed for {moved_from}, published on {topic}"
        else:
            header, body, verdict, reason = received.envelope, received.envelope.body, OK, ""
            self._remember(frame, header, at_ms)
            if parsed is not None and parsed.channel == CHANNEL_CRL:
                verdict, reason = self._install_revocations(body, at_ms)
        observation = self._observation(topic, frame, at_ms, retained, parsed, header, verdict, reason, body)
        self._account(observation, body)
        return observation

    def note_dropped(self, count: int) -> Dropped:
        self.dropped += count
        return Dropped(count)

    def _verifier(self, parsed: ParsedTopic | None, retained: bool) -> Verifier:
        if retained or (parsed is not None and parsed.channel in (CHANNEL_STATUS, CHANNEL_CRL)):
            return self._signature_only
        return self._guarded

    def _copy_verdict(
        self, frame: bytes, exc: Duplicate, header: Envelope | None, at_ms: int
    ) -> tuple[str, str]:
        first = self._copies.get(exc.message_id)
        if first is None or header is None:
            return exc.code, exc.reason
        self._copies[exc.message_id] = Copy(first.digest, first.seq, first.at_ms, first.arrivals + 1)
        if frame_digest(frame) != first.digest:
            return exc.code, f"a retry of frame #{first.seq}: re-signed by its sender under the same id"
        request = self._copies.get(header.reply_to) if header.reply_to else None
        if request is not None and request.arrivals > first.arrivals:
            return exc.code, f"frame #{first.seq} sent again: the cached answer to a repeated request"
        return (
            "replayed",
            f"an exact copy of frame #{first.seq}, first seen {at_ms - first.at_ms} ms earlier: "
            "neither a re-signed retry nor the answer to one (or a rare QoS 1 redelivery)",
        )

    def _signed_for(
        self, frame: bytes, header: Envelope, parsed: ParsedTopic, topic: str, at_ms: int
    ) -> str | None:
        """Another topic of this device where the frame's signature holds: where it was taken from."""
        for candidate in _topics_of(header.type, parsed):
            if candidate == topic:
                continue
            try:
                self._signature_only.open(frame, candidate, at_ms)
            except TrustpayError:
                continue
            return candidate
        return None

    def _install_revocations(self, body: object, at_ms: int) -> tuple[str, str]:
        try:
            crl = RevocationList.from_bytes(getattr(body, "crl", b""))
            self._signature_only.certs.set_revocations(crl, at_ms // 1000)
        except TrustpayError as exc:
            return _code(exc), exc.reason
        return OK, ""

    def _remember(self, frame: bytes, header: Envelope, at_ms: int) -> None:
        horizon = at_ms - 2 * self.skew_ms  # the guard forgets ids at the same age
        while self._copies:
            oldest = next(iter(self._copies.values()))
            if oldest.at_ms >= horizon and len(self._copies) < MAX_REMEMBERED:
                break
            self._copies.popitem(last=False)
        self._copies[header.message_id] = Copy(frame_digest(frame), self.seq, at_ms)

    # -- building the observation ------------------------------------------------------
    def _observation(
        self,
        topic: str,
        frame: bytes,
        at_ms: int,
        retained: bool,
        parsed: ParsedTopic | None,
        header: Envelope | None,
        verdict: str,
        reason: str,
        body: object,
    ) -> Observation:
        spec = MESSAGE_TYPES.get(header.type) if header is not None else None
        steps = _steps(body)
        return Observation(
            seq=self.seq,
            at_ms=at_ms,
            topic=topic,
            device=parsed.device if parsed is not None else None,
            src=parsed.src.value if parsed is not None else None,
            dst=_dst(parsed),
            type=header.type if header is not None else None,
            sender=header.sender if header is not None else None,
            recipient=header.recipient if header is not None else None,
            session=header.session.hex() if header is not None else "",
            message_id=header.message_id.hex() if header is not None else "",
            reply_to=header.reply_to.hex() if header is not None else "",
            verdict=verdict,
            reason=reason,
            size=len(frame),
            sealed=spec.sealed if spec is not None else False,
            retained=retained,
            event=_body_json(steps[-1]) if steps else None,
            status=_body_json(body) if isinstance(body, Status) else None,
            events=tuple(_body_json(e) for e in steps) if isinstance(body, StepEvents) else (),
        )

    # -- state -------------------------------------------------------------------------
    def _account(self, obs: Observation, body: object) -> None:
        # a rejected frame's type is anyone's text: only known types get a counter of their own
        self.links[(obs.link, obs.type if obs.type in MESSAGE_TYPES else "?")] += 1
        claimed = self._server(obs.sender or "", verified=obs.verdict == OK)
        if obs.verdict != OK:
            self.rejects[obs.verdict] += 1
            if claimed is not None:
                claimed.rejected += 1
            return
        if claimed is not None:
            claimed.sent += 1
        if obs.recipient in self.servers:  # a request to the role (any replica) counts on the role's row
            self.servers[obs.recipient].received += 1
        if isinstance(body, Status) and body.node in self.servers:
            server = self.servers[body.node]
            server.status, server.status_at_ms = body.state, body.at_ms
        elif isinstance(body, Status) and obs.device is not None:  # the topic's device: checked
            self.devices.setdefault(obs.device, DeviceState()).nodes[body.node] = body.state
        for event in _steps(body):
            if event.device and reported_by(event, obs.sender or "", obs.device):
                self._on_step(event, obs.at_ms)
        if isinstance(body, Metrics) and body.node == obs.sender:
            self.node_metrics[body.node] = body

    def _server(self, nid: str, verified: bool) -> ServerState | None:
        """The row of server ``nid``: each role's first from the start, another replica once it
        has sent a verified frame (so its certificate, not a forged header, makes its row)."""
        row = self.servers.get(nid)
        if row is None and verified and server_replica(nid) is not None:
            row = self.servers[nid] = ServerState()
        return row

    def _on_step(self, event: StepEvent, at_ms: int) -> None:
        device = self.devices.setdefault(event.device, DeviceState())
        device.flows[event.flow] = FlowState(event.step, event.outcome, event.reason, at_ms)
        if event.step == "C4":
            device.trust, device.trust_reason = event.outcome, event.reason
        if event.order_id:
            device.last_order = event.order_id
            device.last_order_step, device.last_order_outcome = event.step, event.outcome
        if not event.session:
            return
        session = event.session.hex()
        key = (event.device, session)
        previous = self._session_last.pop(key, None)
        self._session_last[key] = at_ms
        while len(self._session_last) > MAX_SESSIONS:
            self._session_last.popitem(last=False)
        if device.session != session:
            device.session, device.step_ms = session, {}
        if previous is None:
            return
        took = at_ms - previous
        device.step_ms[event.step] = took
        self.latencies.setdefault(event.step, deque(maxlen=MAX_SAMPLES)).append(took)

    def summary(self) -> Json:
        """Messages per link and type, rejects per reason, step latencies: for the end of a run."""
        links: dict[str, dict[str, int]] = {}
        for (link, msg_type), count in sorted(self.links.items()):
            links.setdefault(link, {})[msg_type] = count
        latency = {
            step: {"n": len(s), "p50_ms": percentile(list(s), 0.5), "p99_ms": percentile(list(s), 0.99)}
            for step, s in sorted(self.latencies.items())
        }
        return {
            "kind": "summary",
            "frames": self.seq,
            "dropped": self.dropped,
            "links": links,
            "rejects": dict(sorted(self.rejects.items())),
            "latency_ms": latency,
        }


# -- helpers -------------------------------------------------------------------------
def _parse(topic: str) -> ParsedTopic | None:
    try:
        return parse_topic(topic)
    except WrongTopic:
        return None


def _dst(parsed: ParsedTopic | None) -> str | None:
    if parsed is None:
        return None
    if parsed.dst is not None:
        return parsed.dst.value
    return parsed.channel


def _topics_of(msg_type: str, parsed: ParsedTopic) -> list[str]:
    """Every topic of this device (or the platform) a ``msg_type`` frame may be signed for."""
    spec = MESSAGE_TYPES.get(msg_type)
    if spec is None:
        return []
    out = []
    for src, dst in sorted(spec.links):
        with contextlib.suppress(WrongTopic):  # operator topics and other scopes are not candidates
            out.append(link_topic(src, dst, parsed.device))
    for channel in sorted(spec.channels - {CHANNEL_CRL}):
        with contextlib.suppress(WrongTopic):
            out.append(channel_topic(parsed.src, channel, parsed.device))
    return out


def _short(end: str | None) -> str:
    if end is None:
        return "?"
    try:
        return Role(end).short
    except ValueError:
        return end  # a channel


def _code(exc: TrustpayError) -> str:
    return "oversize" if isinstance(exc, TooLarge) else exc.code


def frame_digest(frame: bytes) -> bytes:
    """What tells two frames apart: the monitor's copies table and the attack toolkit's evidence."""
    return hashlib.blake2b(frame, digest_size=16).digest()


def _steps(body: object) -> tuple[StepEvent, ...]:
    """The step events a verified body carries: one, a batch's, or none."""
    if isinstance(body, StepEvent):
        return (body,)
    return body.events if isinstance(body, StepEvents) else ()


def _body_json(body: StepEvent | Status) -> Json:
    """Every field of a clear body, bytes in hex: fields added to a body later show up by themselves."""
    return {f.name: _json_value(getattr(body, f.name)) for f in dataclasses.fields(body)}


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
