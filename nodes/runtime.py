"""The small runtime every role stands on: verify, dispatch, request/response, status, events.

A role subclasses ``Node``, registers handlers with ``route`` and may override
``main`` (its start-up flow). ``run`` holds one ``asyncio.TaskGroup`` with the
bus connection, the role's ``main`` and every handler task; ``stop`` ends it.

Frames are verified as they arrive, by the bus's single reader (verification
is CPU work of ~60 us, no I/O). A response completes the request waiting for
it; a request starts its handler as its own task (bounded by a semaphore), or
goes to a per-link lane when the handler asked for order. So a slow or failing
handler never stalls the connection, and a rejection of any kind is counted,
logged with its typed code, and never reaches a handler.

Every node keeps a signed, retained status (online with its version and start
time; offline when it stops, or through its last will when it vanishes) and
publishes its counters every ``Settings.metrics_interval_s`` (``nodes.metrics``).

Every node also reads the retained revocation list (``CRL_TOPIC``) and installs
a newer one the moment it arrives. A verified request from a sender it revokes
is answered with a typed ``revoked`` refusal, so the sender learns why at once.

Likewise a verified request refused only because its stamp is outside the time
window gets a typed ``clock_skew`` refusal saying by how much and which way the
sender's clock is off (at most ``CLOCK_SKEW_BURST`` at once per sender, then one
a second). A requester takes such a refusal although its own stamp is outside
*its* window, but only as the answer to a request still pending, from the peer
asked: the reply_to names a random id just sent, so an old or foreign refusal
ends nothing. Every time a node reads goes through ``Node.now_ms``, which adds
``Settings.clock_offset_ms``: a node can run with its clock off, as a device's can.

A server may run as one of several replicas of its role (``Settings.replicas``,
docs/PROTOCOL.md 2.1): it answers to its id and its role's name, takes requests
through a ``$share`` subscription (or its partition of the devices), drops answers
meant for another replica from the header alone, and claims each request in the
role's shared reply log (``replies``) so that exactly one replica handles it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from protocol.certs import Certificate, CertStore, RevocationList
from protocol.envelope import (
    Envelope,
    Received,
    SenderClockSkewed,
    SenderRevoked,
    Verifier,
    new_id,
    peek,
    sign_frame,
)
from protocol.errors import (
    Duplicate,
    Malformed,
    Refused,
    Rejected,
    RequestTimeout,
    TransportError,
    TrustpayError,
)
from protocol.keys import KeyPair
from protocol.messages import (
    MAX_STEP_EVENTS,
    MESSAGE_TYPES,
    Body,
    Metrics,
    Ping,
    Pong,
    Refusal,
    Status,
    StepEvent,
    StepEvents,
    shared_senders,
)
from protocol.replay import CLOCK_SKEW, ReplayGuard
from protocol.topics import (
    CHANNEL_EVENTS,
    CHANNEL_METRICS,
    CHANNEL_OPS,
    CRL_TOPIC,
    LINKS,
    SERVER_ROLES,
    Role,
    channel_topic,
    inbound_filters,
    link_topic,
    node_status_topic,
    operator_topic,
    parse_topic,
    partition_of,
    server_replica,
    share_group,
)

from .bus import Bus
from .metrics import VERSION, StepClock, metrics_body
from .rate_limit import RateLimiter
from .replies import ANSWERED, BUSY, LEASE_MS, Replies
from .retry import RetryTimer
from .store import write_atomic

Handler = Callable[[Received], Awaitable[tuple[str, Body] | None]]
Job = Callable[[], Coroutine[Any, Any, object]]
CLOCK_SKEW_BURST, CLOCK_SKEW_PER_S = 4, 1.0  # clock_skew refusals per sender: a flood draws no more
MAX_ATTEMPTS = 1000  # a request's attempts in all; its deadline ends it long before
REPLIES_PRUNE_EVERY_S, REPLIES_PRUNE_BATCH, REPLIES_PRUNE_ROUNDS = 10.0, 1_000, 20  # the shared reply log


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Identity:
    node_id: str
    role: Role
    device: str | None
    keys: KeyPair
    cert: Certificate
    chain: tuple[bytes, ...]  # own certificate first, then the platform's for servers


@dataclass(frozen=True)
class Anchors:
    root: Certificate
    update: Certificate | None = None
    platform: Certificate | None = None
    crl: RevocationList | None = None


@dataclass(frozen=True)
class Settings:
    request_timeout_s: float = 3.0
    request_attempts: int = 4
    skew_ms: int = 30_000
    max_handlers: int = 256
    response_cache: int = 4096
    connect_timeout_s: float = 60.0  # a node gives up (with a clear error) if no broker answers by then
    metrics_interval_s: float = 10.0  # how often the node publishes its counters
    clock_offset_ms: int = 0  # added to the system clock for every stamp and check (a wrong device clock)
    replicas: int = 1  # servers: how many replicas of this role run at once
    # how replicas share requests: the broker's $share subscriptions, or (False: amqtt, NATS) a
    # static partition by device, replica k of N taking the devices with partition_of == k - 1
    shared: bool = True


@dataclass(frozen=True)
class NodeConfig:
    identity: Identity
    anchors: Anchors
    state_dir: Path
    settings: Settings = field(default_factory=Settings)


SERVER_ROLE_NAMES = frozenset(r.value for r in SERVER_ROLES)


@dataclass
class _Pending:
    """A request waiting for its answer; only a verified frame from ``peer`` ends it.

    ``peer`` is a node id, or a server role's name (``payment-server``): then any
    replica of that role may answer, i.e. any certificate of that role, which only
    the platform key issues (the verifier checked the chain before).
    """

    answer: asyncio.Future[Received]
    peer: str
    # why frames that named this request were refused: said at the timeout, never acted on
    refused: Counter[str] = field(default_factory=Counter)

    def asked(self, sender: str, role: str | None) -> bool:
        """Whether ``sender`` (certified for ``role``; None: not verified) may answer."""
        if sender == self.peer:
            return True
        return self.peer in SERVER_ROLE_NAMES and role == self.peer


@dataclass(frozen=True)
class _Route:
    handler: Handler
    ordered: bool


class IdentityInUse(TrustpayError):
    """Another process runs this node's identity: two sessions of one login kick each other off."""

    code = "identity_in_use"


def server_filters(
    role: Role, settings: Settings, box_secret: bytes
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A server's topic filters now, and those of its other mode to drop from a kept session.

    A persistent session keeps its subscriptions across runs: a server that ran alone
    (plain filters) and now runs as a replica ($share) would otherwise still get every
    request through the old plain filter, and the other way round.
    """
    plain = inbound_filters(role)
    shared = inbound_filters(role, None, shared_senders(role), share_group(role, box_secret))
    current = shared if settings.replicas > 1 and settings.shared else plain
    return current, tuple(f for f in dict.fromkeys(plain + shared) if f not in current)


def _claim(state_dir: Path, node_id: str) -> int:
    """Hold an exclusive lock on the node's state dir for as long as the node runs.

    One identity, one process: the lock is the kernel's (flock), so it goes with the
    process however it ends, and the file names the pid that holds it.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise IdentityInUse(
            f"{node_id} is already running in process {holder} (it holds {path}); "
            "stop that process first: two processes with one identity would kick each other off the broker"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _next_epoch(state_dir: Path, now_s: int | None = None) -> int:
    """Bump and persist the boot epoch, so (epoch, seq) never repeats across restarts.

    Never below the clock's seconds either: receivers refuse an epoch older than one they
    saw, so an epoch file lost or restored from a backup would otherwise lock this node out
    until every receiver restarted. Called only while holding the state dir's lock, so no
    two processes bump it at once.
    """
    path = state_dir / "epoch"
    try:
        previous = int(path.read_text())
    except (FileNotFoundError, ValueError):
        previous = 0
    epoch = max(previous + 1, time.time_ns() // 1_000_000_000 if now_s is None else now_s)
    write_atomic(path, str(epoch).encode())
    return epoch


class Node:
    """One trustpay node: identity, verifier, bus, handlers."""

    role: Role

    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        *,
        replies: Replies | None = None,
    ) -> None:
        ident = config.identity
        self.config = config
        self.id = ident.node_id
        self.role = ident.role
        self.device = ident.device
        self.keys = ident.keys
        self.bus = bus
        self.log = log
        self.settings = config.settings
        self.certs = CertStore(config.anchors.root, config.anchors.update)
        if config.anchors.platform is not None:
            self.certs.install_platform(config.anchors.platform)
        if config.anchors.crl is not None:
            self.certs.set_revocations(config.anchors.crl, self.now_ms() // 1000)
        self.counters: Counter[str] = Counter()
        self.step_clock = StepClock()
        self.peers: dict[str, Certificate] = {}
        self.connected = asyncio.Event()
        self.started_ms = self.now_ms()
        self.epoch = 0
        self._seq = 0
        self._verifier: Verifier | None = None
        # The retained revocation list comes again at every (re)connection, maybe issued long
        # before this start: no replay guard for it. Its root-signed, increasing number is what
        # keeps an old list from ever replacing a newer one (CertStore.set_revocations).
        self._crl_verifier = Verifier(frozenset(), self.certs, None)
        self._routes: dict[str, _Route] = {}
        self._pending: dict[bytes, _Pending] = {}  # by request message id
        self.retry_timer = RetryTimer()  # how long answers take, per peer and request type
        self._responses: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        # Replicas of a server share who answers what (nodes.replies); one process keeps its own cache.
        self.replies = replies
        # Plain topics every replica reads although the frames on them are for one (answers):
        # a frame addressed to another replica is dropped from its header, before any crypto.
        self._replica_topics: frozenset[str] = frozenset()
        # A partitioned replica: (its index, replicas, the senders whose requests split)
        self._partition: tuple[int, int, frozenset[Role]] | None = None
        self._lanes: dict[str, asyncio.Queue[Received]] = {}
        self._slots = asyncio.Semaphore(self.settings.max_handlers)
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outbox: set[asyncio.Task[Any]] = set()
        self._events: list[StepEvent] = []  # logged, not yet handed to the bus (step())
        self._event_sender: asyncio.Task[Any] | None = None
        self._stop = asyncio.Event()
        self.finished = asyncio.Event()  # set once ``run`` has ended and released the identity
        self._lock_fd: int | None = None
        self._skew_refusals = RateLimiter(CLOCK_SKEW_BURST, CLOCK_SKEW_PER_S, max_keys=10_000)
        self.failure: TrustpayError | None = None  # why the node stopped by itself, if it did
        self.route("ping", self._on_ping)

    def now_ms(self) -> int:
        """This node's clock: the system's plus ``Settings.clock_offset_ms``."""
        return now_ms() + self.settings.clock_offset_ms

    # -- wiring ------------------------------------------------------------
    def route(self, msg_type: str, handler: Handler, ordered: bool = False) -> None:
        if msg_type not in MESSAGE_TYPES:
            raise Malformed(f"no such message type {msg_type!r}")
        self._routes[msg_type] = _Route(handler, ordered)

    def subscriptions(self) -> tuple[str, ...]:
        if self.role not in SERVER_ROLES:
            return inbound_filters(self.role, self.device)
        return server_filters(self.role, self.settings, self.config.identity.keys.box_secret)[0]

    @property
    def replicated(self) -> bool:
        """A server running beside other replicas of its role."""
        return self.role in SERVER_ROLES and self.settings.replicas > 1

    def _my_ids(self) -> frozenset[str]:
        """Recipients this node answers to: its id, and a server also its role's name (any replica)."""
        return frozenset({self.id, self.role.value} if self.role in SERVER_ROLES else {self.id})

    async def prepare(self) -> None:
        """Load state and open databases; runs before any frame is received."""

    async def main(self) -> None:
        """The role's start-up flow, once connected; the default does nothing."""

    def state(self) -> str:
        """One word for pings and status: what this node is doing."""
        return "ready"

    # -- life cycle --------------------------------------------------------
    async def run(self) -> None:
        self._lock_fd = await asyncio.to_thread(_claim, self.config.state_dir, self.id)
        try:
            await self._run_claimed()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
            self.finished.set()  # the identity is free: another process (or node) may take it

    async def _run_claimed(self) -> None:
        self.epoch = await asyncio.to_thread(_next_epoch, self.config.state_dir)
        self.started_ms = self.now_ms()
        guard = ReplayGuard(floor_ms=self.started_ms, skew_ms=self.settings.skew_ms)
        self._verifier = Verifier(self._my_ids(), self.certs, guard, keys=self.keys)
        if self.replicated:
            shared = shared_senders(self.role)
            self._replica_topics = frozenset(
                link_topic(link.src, self.role)
                for link in LINKS
                if link.dst is self.role and not link.src.on_device and link.src not in shared
            )
            replica = server_replica(self.id)
            if not self.settings.shared and replica is not None:
                self._partition = (replica[1] - 1, self.settings.replicas, shared)
        self.log.info("node.starting", role=self.role.value, epoch=self.epoch)
        # after every (re)connection: the broker may have published our last will meanwhile
        self.bus.on_connect = self._announce
        await self.prepare()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                bus_task = tg.create_task(
                    self.bus.run(self.subscriptions(), self._on_frame, self.connected), name=f"{self.id}:bus"
                )
                self._tasks.add(tg.create_task(self._start(), name=f"{self.id}:main"))
                await self._stop.wait()
                if self._outbox:  # step events already logged should also reach the bus
                    await asyncio.wait(self._outbox, timeout=2)
                if self.connected.is_set():
                    await self._say_goodbye()
                self.bus.close()
                bus_task.cancel()
                for task in list(self._tasks):
                    task.cancel()
        finally:
            self._tg = None
            self.log.info("node.stopped", counters=dict(self.counters))
        if self.failure is not None:
            raise self.failure

    def _announce(self) -> None:
        self.spawn(self.publish_status("online"), name="status:online")

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await self.connected.wait()
        except TimeoutError:
            self.failure = TransportError(
                f"{self.id} could not connect to the broker within {self.settings.connect_timeout_s:g} s; "
                "is it running (`trustpay broker` or `trustpay up`), and is this the right address?"
            )
            self.log.error("node.unreachable_broker", reason=self.failure.reason)
            self.stop()
            return
        self.every(self.settings.metrics_interval_s, self.publish_metrics, "metrics")
        if self.replies is not None:
            self.every(REPLIES_PRUNE_EVERY_S, self.prune_replies, "prune_replies")
        await self.main()

    async def prune_replies(self) -> int:
        """Forget log entries older than any request the verifier still takes, plus a lease.

        In short batches (each one transaction), as many as a busy platform needs to keep up:
        a payment claims five requests, so 100 payments a second leave 5,000 rows a round.
        """
        assert self.replies is not None
        keep_ms = 2 * self.settings.skew_ms + LEASE_MS
        pruned = 0
        for _ in range(REPLIES_PRUNE_ROUNDS):  # bounded; the next run goes on
            batch = await self.replies.prune(self.now_ms() - keep_ms, REPLIES_PRUNE_BATCH)
            pruned += batch
            if batch < REPLIES_PRUNE_BATCH:
                break
        return pruned

    async def _say_goodbye(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self.publish_status("offline")
        except (TimeoutError, TrustpayError) as exc:
            self.log.warning("status.offline_not_sent", reason=str(exc))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the node's task group; an error is logged, never fatal."""
        if self._tg is None:
            coro.close()
            raise TransportError("node is not running")
        task = self._tg.create_task(self._guarded(coro, name), name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def every(self, interval_s: float, job: Job, name: str) -> None:
        """Run ``job`` every ``interval_s`` while the node runs; a failed run is logged, the next comes."""
        self.spawn(self._periodic(interval_s, job, name), name=f"every:{name}")

    async def _periodic(self, interval_s: float, job: Job, name: str) -> None:
        while True:  # ends when the node stops: its task group cancels the task
            await asyncio.sleep(interval_s)  # a timer, not synchronisation
            await self._guarded(job(), name)

    async def _guarded(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except TrustpayError as exc:
            self.counters[f"task_error.{exc.code}"] += 1
            self.log.warning("task.failed", task=name, code=exc.code, reason=exc.reason)
        except Exception as exc:  # a bug in a handler must not take the node down
            self.counters["task_error.internal"] += 1
            self.log.exception("task.crashed", task=name, error=repr(exc))

    def replace_identity(self, identity: Identity, platform: Certificate) -> None:
        """Switch to a new certificate chain (a platform key rotation); checked by the caller."""
        self.certs.install_platform(platform)
        self.keys = identity.keys
        self.config = dataclasses.replace(self.config, identity=identity)
        if self._verifier is not None:  # it unseals bodies with our box key
            self._verifier.keys = identity.keys

    # -- sending -----------------------------------------------------------
    def _envelope(
        self, msg_type: str, body: Body, recipient: str, session: bytes, reply_to: bytes, message_id: bytes
    ) -> Envelope:
        self._seq += 1
        return Envelope(
            type=msg_type,
            message_id=message_id,
            sender=self.id,
            recipient=recipient,
            session=session,
            reply_to=reply_to,
            ts_ms=self.now_ms(),
            epoch=self.epoch,
            seq=self._seq,
            chain=self.config.identity.chain,
            body=body,
        )

    def link(self, dst: Role, device: str | None = None) -> str:
        return link_topic(self.role, dst, device or self.device)

    def frame(
        self,
        topic: str,
        msg_type: str,
        body: Body,
        recipient: str,
        session: bytes = b"",
        reply_to: bytes = b"",
        peer: Certificate | None = None,
        message_id: bytes | None = None,
    ) -> bytes:
        env = self._envelope(msg_type, body, recipient, session, reply_to, message_id or new_id())
        self.counters[f"out.{msg_type}"] += 1
        return sign_frame(env, topic, self.keys, peer.body.box_key if peer else None)

    async def send(
        self,
        topic: str,
        msg_type: str,
        body: Body,
        recipient: str = "*",
        session: bytes = b"",
        retain: bool = False,
    ) -> None:
        await self.bus.publish(topic, self.frame(topic, msg_type, body, recipient, session), retain=retain)

    async def request(
        self,
        topic: str,
        msg_type: str,
        body: Body,
        *,
        recipient: str,
        expect: str,
        session: bytes = b"",
        peer: Certificate | None = None,
        timeout_s: float | None = None,
        attempts: int | None = None,
    ) -> Received:
        """Send a request and wait for its response, retrying with the same message id.

        Each attempt is re-stamped and re-signed (fresh time and sequence) but keeps
        its message id, so the receiver treats a retry as a duplicate and answers
        from its response cache. The request has ``attempts`` x ``timeout_s`` in
        all; within that, each attempt waits as long as answers from this peer to
        this type of request have been taking (:mod:`nodes.retry`), at most
        ``timeout_s``, so a lost frame costs a retry, not a whole timeout. A typed
        refusal raises ``Refused``; no answer at all raises ``RequestTimeout``
        (the outcome is unknown).
        """
        timeout_s = timeout_s or self.settings.request_timeout_s
        attempts = attempts or self.settings.request_attempts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s * attempts
        message_id = new_id()
        future: asyncio.Future[Received] = loop.create_future()
        pending = self._pending[message_id] = _Pending(future, recipient)
        sent = 0
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):  # bounded, and by the deadline
                left = deadline - loop.time()
                if left <= 0:
                    break
                frame = self.frame(
                    topic, msg_type, body, recipient, session, peer=peer, message_id=message_id
                )
                try:
                    await self.bus.publish(topic, frame)
                except TransportError as exc:
                    self.log.warning("request.unsent", type=msg_type, attempt=attempt, reason=exc.reason)
                    continue  # try again at once: the next publish waits for the new connection
                sent += 1
                sent_at = loop.time()
                wait = min(left, self.retry_timer.wait_s(recipient, msg_type, sent, timeout_s))
                try:
                    async with asyncio.timeout(wait):
                        answer = await asyncio.shield(future)
                except TimeoutError:
                    self.counters["request_retry"] += 1
                    self.log.info("request.retry", type=msg_type, to=recipient, attempt=attempt)
                    continue
                if sent == 1:  # an answer to the only attempt: a clean sample of how long answers take
                    self.retry_timer.observe(recipient, msg_type, loop.time() - sent_at)
                if answer.envelope.type in ("error", "refusal"):
                    refusal: Refusal = answer.envelope.body
                    raise Refused(refusal.code, refusal.reason)
                if answer.envelope.type != expect:
                    raise Malformed(
                        f"{recipient} answered {msg_type} with {answer.envelope.type}, not {expect}"
                    )
                return answer
            raise RequestTimeout(
                f"no answer to {msg_type} from {recipient} after {sent} attempts{_refusals(pending)}",
                sum(pending.refused.values()),
            )
        finally:
            self._pending.pop(message_id, None)
            if not future.done():
                future.cancel()

    async def reply(self, request: Received, msg_type: str, body: Body, *, record: bool = False) -> None:
        """Answer ``request``; ``record``: also write the answer to the replicas' reply log."""
        src = request.topic.src
        if src is Role.OPERATOR:
            topic = channel_topic(self.role, CHANNEL_OPS, self.device)
        else:
            topic = link_topic(self.role, src, request.topic.device)
        env = request.envelope
        frame = self.frame(
            topic, msg_type, body, env.sender, env.session, env.message_id, peer=request.sender_cert
        )
        self._responses[env.message_id] = (topic, frame)
        while len(self._responses) > self.settings.response_cache:
            self._responses.popitem(last=False)
        if record and self.replies is not None:
            # before publishing: once the sender has the answer, a retry elsewhere must find it
            await self.replies.answer(env.sender, env.message_id, topic, frame, self.now_ms())
        await self.bus.publish(topic, frame)

    def _status(self, state: str, will: bool = False) -> Status:
        return Status(self.id, self.role.value, state, self.now_ms(), VERSION, self.started_ms, will)

    async def publish_status(self, state: str) -> None:
        topic = self._status_topic()
        await self.send(topic, "status", self._status(state), retain=True)

    def _status_topic(self) -> str:
        """This node's own status topic: a server replica's is its own, as a broker retains one per topic."""
        return node_status_topic(self.id)

    def will(self) -> tuple[str, bytes]:
        """The signed 'offline' status the broker publishes if we vanish (made at connect time)."""
        topic = self._status_topic()
        env = self._envelope("status", self._status("offline", will=True), "*", b"", b"", new_id())
        return topic, sign_frame(env, topic, self.keys)  # not counted as sent: it may never be

    def metrics(self) -> Metrics:
        """The node's counters and step latencies so far, as the bounded body it publishes."""
        return metrics_body(
            self.id, self.role.value, self.now_ms(), self.started_ms, self.counters, self.step_clock
        )

    async def publish_metrics(self) -> None:
        if self.connected.is_set():  # cumulative counters: a missed round loses nothing
            await self.send(channel_topic(self.role, CHANNEL_METRICS, self.device), "metrics", self.metrics())

    def step(
        self,
        flow: str,
        step: str,
        outcome: str,
        reason: str = "",
        session: bytes = b"",
        order_id: str = "",
        device: str | None = None,
        **fields: Any,
    ) -> None:
        """Log a step of the patent's flows and publish it as a signed step event."""
        device = device or self.device or ""
        level = self.log.info if outcome in ("ok", "done", "trusted") else self.log.warning
        level(
            f"step.{step}",
            flow=flow,
            outcome=outcome,
            reason=reason,
            device=device,
            session=session.hex(),
            order=order_id,
            **fields,
        )
        self.counters[f"flow.{flow}.{step}.{outcome}"] += 1
        if session:
            self.step_clock.observe(session, step, time.monotonic_ns())
        if self._tg is None:
            return
        self._events.append(StepEvent(device, self.id, flow, step, outcome, reason, session, order_id))
        if self._event_sender is None or self._event_sender.done():
            task = self._event_sender = self.spawn(self._send_events(), name="events")
            self._outbox.add(task)
            task.add_done_callback(self._outbox.discard)

    async def _send_events(self) -> None:
        """Publish the logged step events in order: one at once, those logged meanwhile together.

        The first event goes out as soon as it is logged (an ``event`` frame); the
        events logged while a frame waits for its PUBACK go in the next frame, as
        one ``events`` batch (at most ``MAX_STEP_EVENTS``). So a busy node pays one
        signature, publish and acknowledgement per batch instead of per step, and
        a quiet one waits for nothing.
        """
        topic = channel_topic(self.role, CHANNEL_EVENTS, self.device)
        while self._events:  # bounded by what was logged: each turn sends at least one
            batch = self._events[:MAX_STEP_EVENTS]
            del self._events[: len(batch)]
            if len(batch) == 1:
                await self.send(topic, "event", batch[0])
            else:
                await self.send(topic, "events", StepEvents(tuple(batch)))

    # -- receiving ---------------------------------------------------------
    def _on_frame(self, topic: str, frame: bytes) -> None:
        assert self._verifier is not None
        if topic == CRL_TOPIC:
            self._on_revocations(topic, frame)
            return
        if topic in self._replica_topics:
            header = peek(frame)  # unverified: it only decides to drop, never to accept
            if header is not None and header.recipient != self.id:
                self.counters["not_for_me"] += 1
                return
        if self._partition is not None and not self._in_partition(topic, frame):
            self.counters["not_for_me"] += 1
            return
        try:
            received = self._verifier.open(frame, topic, self.now_ms())
        except SenderRevoked as exc:
            self._answer_revoked(topic, exc)
            return
        except SenderClockSkewed as exc:
            self._on_clock_skewed(topic, frame, exc)
            return
        except Duplicate as exc:
            self.counters["duplicate"] += 1
            cached = self._responses.get(exc.message_id)
            if cached is not None:
                self.counters["reanswered"] += 1
                self.spawn(self.bus.publish(*cached), name="reanswer")
            self.log.debug("frame.duplicate", topic=topic, reason=exc.reason)
            return
        except Rejected as exc:
            self.counters[f"rejected.{exc.code}"] += 1
            self.log.warning("frame.rejected", code=exc.code, reason=exc.reason, topic=topic, size=len(frame))
            self._note_refused_answer(frame, exc)
            return
        self.counters["accepted"] += 1
        env = received.envelope
        self.counters[f"in.{env.type}"] += 1
        self.peers[env.sender] = received.sender_cert
        if received.sender_cert.role in SERVER_ROLE_NAMES:
            # any replica's certificate seals to its role: replicas share the role's box key
            self.peers[received.sender_cert.role] = received.sender_cert
        if env.reply_to:
            pending = self._pending.get(env.reply_to)
            if pending is None or pending.answer.done():
                self.counters["late_answer"] += 1
            elif not pending.asked(env.sender, received.sender_cert.role):  # only the node (role) we asked
                self.counters["foreign_answer"] += 1
                self.log.warning("frame.foreign_answer", sender=env.sender, expected=pending.peer)
            else:
                pending.answer.set_result(received)
            return
        route = self._routes.get(env.type)
        if route is None:
            self.counters["unhandled"] += 1
            self.log.warning("frame.unhandled", type=env.type, sender=env.sender)
            self.spawn(
                self._refuse(received, "unsupported", f"{self.role.value} does not handle {env.type}"),
                name="refuse",
            )
            return
        if route.ordered:
            lane = self._lanes.get(topic)
            if lane is None:
                lane = self._lanes[topic] = asyncio.Queue()
                self.spawn(self._drain_lane(lane), name=f"lane:{topic}")
            lane.put_nowait(received)
        else:
            self.spawn(self._handle(route, received), name=f"handle:{env.type}")

    def _in_partition(self, topic: str, frame: bytes) -> bool:
        """Whether a partitioned replica takes this frame; decided before any cryptography.

        A device's requests go by the device id in the topic, the other role's by the
        (unverified) sender in the header: a forged header only moves a frame to a replica
        that refuses it. Everything else (answers, the operator, the list) is every replica's.
        """
        assert self._partition is not None
        index, count, senders = self._partition
        try:
            parsed = parse_topic(topic)
        except Rejected:
            return True  # let the verifier say why the topic is wrong
        if parsed.dst is not self.role or parsed.src not in senders:
            return True
        if parsed.device is not None:
            key = parsed.device
        else:
            header = peek(frame)
            if header is None:
                return True  # let the verifier say why it is malformed
            key = header.sender
        return partition_of(key, count) == index

    def _on_revocations(self, topic: str, frame: bytes) -> None:
        """Install a newer revocation list at once, before the next frame is verified."""
        try:
            received = self._crl_verifier.open(frame, topic, self.now_ms())
            crl = RevocationList.from_bytes(received.envelope.body.crl)
            changed = self.certs.set_revocations(crl, self.now_ms() // 1000)
        except Rejected as exc:
            self.counters[f"rejected.{exc.code}"] += 1
            self.log.warning("crl.rejected", code=exc.code, reason=exc.reason)
            return
        if not changed:
            return
        self.counters["crl_installed"] += 1
        self.step(
            "R", "CRL", "ok", f"revocation list {crl.body.number} installed, {len(crl.body.serials)} revoked"
        )
        self.spawn(self.revocations_changed(crl), name="crl")

    async def revocations_changed(self, crl: RevocationList) -> None:
        """A role's own follow-up once a newer revocation list is held (the trust-server stores it)."""

    def _answer_revoked(self, topic: str, exc: SenderRevoked) -> None:
        """A verified frame from a revoked sender: tell it why, never let it wait for a timeout.

        A request gets a typed ``revoked`` refusal; an answer we were waiting for ends
        that request with the same reason. Nothing of the frame's body is used.
        """
        self.counters[f"rejected.{exc.code}"] += 1
        received = exc.received
        env = received.envelope
        self.log.warning("frame.rejected", code=exc.code, reason=exc.reason, topic=topic, sender=env.sender)
        if env.reply_to:
            pending = self._pending.get(env.reply_to)
            if (
                pending is not None
                and not pending.answer.done()
                and pending.asked(env.sender, received.sender_cert.role)
            ):
                pending.answer.set_exception(exc)
            return
        if env.type in self._routes:
            reason = (
                f"{exc.reason} by revocation list {self.certs.crl_number}: {self.id} refuses its requests"
            )
            self.spawn(self._refuse(received, "revoked", reason), name="refuse:revoked")

    def _on_clock_skewed(self, topic: str, frame: bytes, exc: SenderClockSkewed) -> None:
        """A verified frame refused by the time window alone.

        A ``clock_skew`` refusal answering a request of ours still pending, from the
        peer we asked, ends it: its reply_to names the random id we just sent, which
        no old refusal can name. Anything else stays refused; a request gets a
        ``clock_skew`` refusal (rate-limited per sender), so its sender learns why.
        """
        assert self._verifier is not None
        env = exc.received.envelope
        if env.reply_to:
            pending = self._pending.get(env.reply_to)
            if (
                env.type in ("refusal", "error")
                and pending is not None
                and not pending.answer.done()
                and pending.asked(env.sender, exc.received.sender_cert.role)
            ):
                try:
                    received: Received | None = self._verifier.decode(exc.received)
                except Rejected:
                    received = None  # counted below as the stale frame it is
                if received is not None and received.envelope.body.code == CLOCK_SKEW:
                    self.counters["accepted_clock_skew"] += 1
                    self.log.warning("frame.clock_skew_refusal", sender=env.sender, ahead_ms=exc.ahead_ms)
                    pending.answer.set_result(received)
                    return
        self.counters[f"rejected.{exc.code}"] += 1
        self.log.warning("frame.rejected", code=exc.code, reason=exc.reason, topic=topic, size=len(frame))
        self._note_refused_answer(frame, exc)
        if env.reply_to or env.type not in self._routes:
            return
        if self._skew_refusals.take(env.sender, self.now_ms()):
            self.counters["clock_skew_unanswered"] += 1  # over its rate: a flood draws no more frames
            return
        # the literal CLOCK_SKEW, so that ops.protocol_doc lists the code
        self.spawn(self._refuse(exc.received, "clock_skew", self._skew_reason(exc)), name="refuse:clock_skew")

    def _skew_reason(self, exc: SenderClockSkewed) -> str:
        cert = exc.received.sender_cert
        way = "ahead of" if exc.ahead_ms > 0 else "behind"
        fix = "set the device's clock" if cert.body.device else f"set {cert.subject}'s clock"
        guard = self._verifier.guard if self._verifier is not None else None
        window = ""
        if guard is not None:
            window = f" (allowed: {guard.skew_ms / 1000:g} s behind, {guard.ahead_ms / 1000:g} s ahead)"
        return f"your clock is {abs(exc.ahead_ms) / 1000:.1f} s {way} the {self.role.value}'s; {fix}{window}"

    def _note_refused_answer(self, frame: bytes, exc: Rejected) -> None:
        """A refused frame whose unsigned header claims to answer one of our requests.

        It never ends the request (anyone can write a header: a forger would end our
        requests at will); its reason is only remembered, so that if no verified answer
        comes, the timeout says what arrived instead (e.g. a platform certificate that
        was rolled back) rather than blaming the network.
        """
        header = peek(frame)
        if header is None or not header.reply_to:
            return
        pending = self._pending.get(header.reply_to)
        if pending is not None and pending.asked(header.sender, None) and len(pending.refused) < 8:
            pending.refused[f"{exc.code}: {exc.reason}"] += 1

    async def _drain_lane(self, lane: asyncio.Queue[Received]) -> None:
        while True:
            received = await lane.get()
            await self._handle(self._routes[received.envelope.type], received)

    async def _handle(self, route: _Route, received: Received) -> None:
        async with self._slots:
            record = self.replies is not None and received.topic.src is not Role.OPERATOR
            if record and not await self._claim(received):
                return
            try:
                answer = await route.handler(received)
            except Refused as exc:
                await self._refuse(received, exc.refusal_code, exc.refusal_reason, record=record)
                return
            except TrustpayError as exc:
                await self._refuse(received, exc.code, exc.reason, record=record)
                return
            except Exception as exc:  # a bug: say so to the requester instead of leaving it waiting
                self.counters["handler_crash"] += 1
                self.log.exception("handler.crashed", type=received.envelope.type, error=repr(exc))
                await self._refuse(
                    received,
                    "internal",
                    f"{self.id} failed to handle {received.envelope.type}",
                    record=record,
                )
                return
            if answer is not None:
                await self.reply(received, *answer, record=record)

    async def _claim(self, received: Received) -> bool:
        """Claim a request in the replicas' reply log: True to handle it here, now.

        Another replica's answer is published again as it is (its signature and stamp
        are the first replica's, so the sender's replay guard decides, as for any copy);
        a request another replica is handling is dropped: the sender's retry finds the
        answer. Operator commands are not claimed: every replica carries them out.
        """
        assert self.replies is not None
        env = received.envelope
        claim = await self.replies.claim(env.sender, env.message_id, self.id, self.now_ms())
        if claim.state == ANSWERED:
            self.counters["reanswered_from_log"] += 1
            await self.bus.publish(claim.topic, claim.frame)
            return False
        if claim.state == BUSY:
            self.counters["claimed_elsewhere"] += 1
            self.log.info("request.claimed_elsewhere", type=env.type, sender=env.sender)
            return False
        return True

    async def _refuse(self, received: Received, code: str, reason: str, *, record: bool = False) -> None:
        self.counters[f"refused.{code}"] += 1
        sealed = MESSAGE_TYPES[received.envelope.type].sealed and received.topic.src is not Role.OPERATOR
        await self.reply(received, "refusal" if sealed else "error", Refusal(code, reason), record=record)

    async def _on_ping(self, received: Received) -> tuple[str, Body]:
        ping: Ping = received.envelope.body
        uptime_ms = self.now_ms() - self.started_ms
        return "pong", Pong(ping.nonce, self.id, self.role.value, uptime_ms, self.state())


def _refusals(pending: _Pending) -> str:
    if not pending.refused:
        return ""
    seen = "; ".join(f"{reason} (x{count})" for reason, count in pending.refused.items())
    return f"; frames claiming to answer it were refused (unverified, so not acted on): {seen}"


async def ping(node: Node, role: Role, recipient: str, device: str | None = None) -> Pong:
    """Ping another node (or, from an operator node, any node) and return its signed pong."""
    nonce = os.urandom(16)
    topic = operator_topic(role, device) if node.role is Role.OPERATOR else node.link(role, device)
    answer = await node.request(topic, "ping", Ping(nonce), recipient=recipient, expect="pong")
    pong: Pong = answer.envelope.body
    if pong.nonce != nonce:
        raise Malformed("pong echoes another nonce")
    return pong
