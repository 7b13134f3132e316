"""Every message type: its body, the links it may travel on, and whether it is sealed.

Request/response pairs share the envelope's ``session``; a response names the
request's message id in ``reply_to``. Any request may be answered by an
``error`` (a typed refusal) instead of its normal response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .measure import LogEntry
from .topics import CHANNEL_CRL, CHANNEL_EVENTS, CHANNEL_METRICS, CHANNEL_OPS, CHANNEL_STATUS, LINKS, Role

Body = Any  # an instance of one of the body dataclasses below

TM, CHIP, CLIENT = Role.TRUST_MODULE, Role.CHIP, Role.CLIENT
TS, PS, OPS = Role.TRUST_SERVER, Role.PAYMENT_SERVER, Role.OPERATOR
ALL_LINKS = frozenset((link.src, link.dst) for link in LINKS)
FROM_OPERATOR = frozenset((OPS, role) for role in (TM, CHIP, CLIENT, TS, PS))


# -- generic ----------------------------------------------------------------
@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class Ping:
    nonce: bytes


@dataclass(frozen=True)
class Pong:
    nonce: bytes
    node: str
    role: str
    uptime_ms: int
    state: str


@dataclass(frozen=True)
class Refusal:
    """A typed refusal: ``code`` is stable for programs, ``reason`` is for people."""

    code: str
    reason: str


@dataclass(frozen=True)
class Status:
    """A node's retained status: "online" once connected, "offline" when it stops.

    The "offline" of a node that vanished is its last will, signed when it connected
    and published by the broker when the connection broke: ``will`` is then True and
    ``at_ms`` is the time of that connection, not of the loss.
    """

    node: str
    role: str
    state: str  # "online" | "offline"
    at_ms: int
    version: str  # of the trustpay package the node runs
    started_ms: int  # when this run of the node started
    will: bool  # True in the last will the broker publishes for a node that vanished


# Upper bounds, in ms, of the step latency buckets; one more bucket counts everything above.
LATENCY_BOUNDS_MS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000)
MAX_COUNTERS = 200  # a Metrics body names at most this many counters ...
MAX_LATENCIES = 64  # ... and this many step pairs, so it stays a few KB
MAX_STEP_EVENTS = 32  # a StepEvents frame carries at most this many, so it stays a few KB


@dataclass(frozen=True)
class Count:
    name: str  # "in.{type}", "out.{type}", "rejected.{code}", "flow.{flow}.{step}.{outcome}" ...
    value: int


@dataclass(frozen=True)
class StepLatency:
    """How long a node took from one step of a session to its next one (e.g. "C2>C4" at a trust module)."""

    steps: str  # "{previous step}>{step}"
    count: int
    sum_us: int
    buckets: tuple[int, ...]  # one count per LATENCY_BOUNDS_MS bound, then the overflow; not cumulative

    def quantile_ms(self, q: float) -> float:
        """The ``q`` quantile (0..1), interpolated in its bucket; in the overflow, its lower bound."""
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        rank = q * total
        seen, lower = 0, 0.0
        for bound, n in zip((*LATENCY_BOUNDS_MS, None), self.buckets, strict=False):
            if n and seen + n >= rank:
                if bound is None:
                    return lower
                return lower + (bound - lower) * (rank - seen) / n
            seen += n
            lower = float(bound) if bound is not None else lower
        return lower


@dataclass(frozen=True)
class Metrics:
    """A node's counters since it started, published every few seconds; never any payment data."""

    node: str
    role: str
    at_ms: int
    started_ms: int
    counters: tuple[Count, ...]  # sorted by name, at most MAX_COUNTERS
    latencies: tuple[StepLatency, ...]  # at most MAX_LATENCIES


@dataclass(frozen=True)
class StepEvent:
    """One step of a flow, as it happened (A1..A5, B1..B5, C1..C7)."""

    device: str
    node: str
    flow: str
    step: str
    outcome: str  # "ok" | "refused" | "failed" | "deleted" | "disabled" ...
    reason: str
    session: bytes
    order_id: str


@dataclass(frozen=True)
class StepEvents:
    """Several step events of one node in one signed frame, in the order they happened.

    A node publishes the events it logged while its previous event frame was
    still on its way together: one publish (and one PUBACK) for the batch.
    """

    events: tuple[StepEvent, ...]  # at most MAX_STEP_EVENTS


# -- A: start-up, trust module <-> chip --------------------------------------
@dataclass(frozen=True)
class AppInfo:
    name: str
    version: str
    counter: int


@dataclass(frozen=True)
class ChipState:
    enabled: bool
    open: bool
    apps: tuple[AppInfo, ...]
    update_cert: bytes
    reason: str


@dataclass(frozen=True)
class SetEnabled:
    enabled: bool
    reason: str


@dataclass(frozen=True)
class DeleteApp:
    app: str
    reason: str


# -- B: client <-> chip, client <-> trust module ------------------------------
@dataclass(frozen=True)
class Report:
    at_ms: int
    step: str
    text: str


@dataclass(frozen=True)
class Reports:
    payment_enabled: bool
    items: tuple[Report, ...]


# -- C: a payment --------------------------------------------------------------
@dataclass(frozen=True)
class PayStart:
    """Client -> chip (B3 starting C): pay ``amount`` minor units to ``payee``."""

    order_id: str
    app: str
    amount: int
    currency: str
    payee: str
    client_dyn_next: bytes  # digest of the client's dynamic data once this payment is recorded


@dataclass(frozen=True)
class PayResult:
    status: str  # "confirmed" | "refused" | "unknown"
    code: str
    reason: str
    order_id: str
    receipt: bytes  # signed receipt, empty if none
    session: bytes


@dataclass(frozen=True)
class AttestRequest:
    """Chip -> trust module: attest this device for this intent before any app code runs.

    The digests are of the app's files as the chip read them into the buffer it
    will run at C5; the trust module refuses at C2 if its own measurement differs.
    """

    app: str
    order_id: str
    intent_hash: bytes  # records.intent_hash of the pay.start
    code: bytes  # measure.digest of the chip's buffer: code, static data, dynamic data
    static: bytes
    dynamic: bytes
    client_dyn_next: bytes


@dataclass(frozen=True)
class AttestResult:
    trusted: bool
    reason: str
    verdict: bytes  # the trust-server's signed verdict
    payment_chain: tuple[bytes, ...]  # payment-server certificate, then platform certificate
    # why not trusted: "untrusted" (judged so), "attestation_unavailable" (the trust-server did
    # not answer), or the trust-server's refusal code (rate_limited, revoked ...); "" when trusted
    code: str


@dataclass(frozen=True)
class PlatformCheck:
    """C1: the platform certificate the trust module holds."""

    serial: int
    fingerprint: bytes


@dataclass(frozen=True)
class PlatformResult:
    trusted: bool
    reason: str
    platform_cert: bytes  # the platform's current certificate


@dataclass(frozen=True)
class NonceRequest:
    intent_hash: bytes


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_ms: int


@dataclass(frozen=True)
class Evidence:
    """C2: the quote over the nonce and the measurement log it covers."""

    nonce: bytes
    quote: bytes
    log: tuple[LogEntry, ...]
    app: str  # the application about to pay: the policy needs it intact


@dataclass(frozen=True)
class VerdictMessage:
    verdict: bytes  # signed Verdict
    payment_chain: tuple[bytes, ...]


@dataclass(frozen=True)
class Grant:
    """Trust-server -> payment-server: this device may pay this intent until then."""

    device: str
    intent_hash: bytes
    verdict: bytes
    expires_ms: int


@dataclass(frozen=True)
class PayOrder:
    order: bytes  # signed Order


@dataclass(frozen=True)
class PayReceipt:
    receipt: bytes  # signed Receipt


@dataclass(frozen=True)
class JournalEntry:
    """C5, chip -> trust module: the app's dynamic data will become this digest in this session."""

    app: str
    dynamic: bytes


@dataclass(frozen=True)
class SessionDone:
    """C6 (chip) / C7 (client): my dynamic data is written; measure and store it."""

    session: bytes


@dataclass(frozen=True)
class Measured:
    component: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class AccountQuery:
    app: str
    limit: int


@dataclass(frozen=True)
class PaymentLine:
    order_id: str
    payee: str
    amount: int
    currency: str
    status: str
    at_ms: int


@dataclass(frozen=True)
class AccountInfo:
    account: str
    balance: int
    currency: str
    payments: tuple[PaymentLine, ...]


# -- operator ------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseUpdate:
    release: bytes  # signed Release


@dataclass(frozen=True)
class RevocationUpdate:
    """The root-signed revocation list, retained on ``CRL_TOPIC`` for every node."""

    crl: bytes  # protocol.certs.RevocationList


@dataclass(frozen=True)
class MessageSpec:
    name: str
    body: type
    links: frozenset[tuple[Role, Role]] = frozenset()
    channels: frozenset[str] = frozenset()
    sealed: bool = False


def _spec(
    name: str,
    body: type,
    *links: tuple[Role, Role],
    channels: tuple[str, ...] = (),
    sealed: bool = False,
) -> MessageSpec:
    return MessageSpec(name, body, frozenset(links), frozenset(channels), sealed)


_OPS_REPLY = (CHANNEL_OPS,)

MESSAGE_TYPES: dict[str, MessageSpec] = {
    s.name: s
    for s in (
        MessageSpec("ping", Ping, ALL_LINKS | FROM_OPERATOR),
        MessageSpec("pong", Pong, ALL_LINKS, frozenset(_OPS_REPLY)),
        MessageSpec("error", Refusal, ALL_LINKS, frozenset(_OPS_REPLY)),
        # the answer to a sealed request is sealed too, refusals included: their reasons name amounts
        MessageSpec("refusal", Refusal, ALL_LINKS, sealed=True),
        _spec("status", Status, channels=(CHANNEL_STATUS,)),
        _spec("event", StepEvent, channels=(CHANNEL_EVENTS,)),
        _spec("events", StepEvents, channels=(CHANNEL_EVENTS,)),
        _spec("metrics", Metrics, channels=(CHANNEL_METRICS,)),
        # A
        _spec("chip.info", Empty, (TM, CHIP)),
        # it lists each app's transaction counter
        _spec("chip.state", ChipState, (CHIP, TM), (CHIP, CLIENT), sealed=True),
        _spec("chip.enable", SetEnabled, (TM, CHIP)),
        _spec("app.delete", DeleteApp, (TM, CHIP)),
        # B
        _spec("chip.open", Empty, (CLIENT, CHIP)),
        _spec("chip.close", Empty, (CLIENT, CHIP)),
        _spec("reports.get", Empty, (CLIENT, TM)),
        _spec("reports", Reports, (TM, CLIENT)),
        # C
        _spec("pay.start", PayStart, (CLIENT, CHIP), sealed=True),
        _spec("pay.result", PayResult, (CHIP, CLIENT), sealed=True),
        # the intent hash is over guessable fields, the digests give the counter away: sealed
        _spec("attest.request", AttestRequest, (CHIP, TM), sealed=True),
        _spec("attest.result", AttestResult, (TM, CHIP), sealed=True),
        _spec("c1.check", PlatformCheck, (TM, TS)),
        _spec("c1.result", PlatformResult, (TS, TM)),
        _spec("c2.nonce", NonceRequest, (TM, TS), sealed=True),
        _spec("c2.challenge", Challenge, (TS, TM)),
        _spec("c2.evidence", Evidence, (TM, TS), sealed=True),
        _spec("c4.verdict", VerdictMessage, (TS, TM), sealed=True),
        # verdicts name every installed component and version: sealed like the evidence they judge
        _spec("trust.grant", Grant, (TS, PS), sealed=True),
        _spec("trust.granted", Empty, (PS, TS)),
        _spec("pay.order", PayOrder, (CHIP, PS), sealed=True),
        _spec("pay.receipt", PayReceipt, (PS, CHIP), sealed=True),
        _spec("c5.journal", JournalEntry, (CHIP, TM), sealed=True),  # the next dynamic digest: a counter
        _spec("journalled", Empty, (TM, CHIP)),
        _spec("c6.done", SessionDone, (CHIP, TM)),
        _spec("c7.done", SessionDone, (CLIENT, TM)),
        _spec("measured", Measured, (TM, CHIP), (TM, CLIENT)),
        _spec("account.query", AccountQuery, (CLIENT, CHIP), (CHIP, PS), sealed=True),
        _spec("account.info", AccountInfo, (PS, CHIP), (CHIP, CLIENT), sealed=True),
        # operator
        _spec("release.update", ReleaseUpdate, (OPS, TM), (OPS, TS)),
        _spec("release.ok", Empty, channels=_OPS_REPLY),
        _spec("keys.reload", Empty, (OPS, TS), (OPS, PS)),
        _spec("keys.reloaded", Empty, channels=_OPS_REPLY),
        _spec("crl", RevocationUpdate, channels=(CHANNEL_CRL,)),
    )
}

def reported_by(event: StepEvent, sender: str, device: str | None) -> bool:
    """Whether ``sender``'s verified frame on ``device``'s topic (None: the platform) may carry ``event``.

    A node reports only its own steps, and a device's node only its own device's: the
    signature covers the frame, not the names inside it, so without this a hostile device
    could write steps (a "contraindicated" C4, say) into another device's history.
    """
    return event.node == sender and (device is None or event.device == device)


# The answer each request across a server's links gets (any request may get an error or a
# refusal instead). Every type on a link to or from a server is one side of a pair here
# (tests/protocol/test_replica_topics.py checks it), so which links a server's replicas
# share follows from this table, not from a list kept by hand (``shared_senders``).
SERVER_ANSWERS: dict[str, str] = {
    "c1.check": "c1.result",
    "c2.nonce": "c2.challenge",
    "c2.evidence": "c4.verdict",
    "trust.grant": "trust.granted",
    "pay.order": "pay.receipt",
    "account.query": "account.info",
}
GENERIC_TYPES = frozenset({"ping", "pong", "error", "refusal"})  # on every link; not a request of one


def shared_senders(role: Role) -> frozenset[Role]:
    """The senders whose links to ``role`` carry its requests and none of the answers it waits for.

    Replicas of ``role`` share those links (a ``$share`` subscription: each request
    reaches one replica); a link that also carries answers to ``role`` is taken by
    every replica, since an answer must reach the replica that asked.
    """
    answers = frozenset(SERVER_ANSWERS.values())
    carried: dict[Role, set[str]] = {}
    for spec in MESSAGE_TYPES.values():
        if spec.name in GENERIC_TYPES:
            continue
        for src, dst in spec.links:
            if dst is role:
                carried.setdefault(src, set()).add(spec.name)
    return frozenset(
        src
        for src, types in carried.items()
        if src is not OPS and types & SERVER_ANSWERS.keys() and not types & answers
    )
