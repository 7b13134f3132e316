"""The attacker's connections and the eyes on the target: I/O lives here.

* :class:`Attacker`: a compromised node's key, certificate chain and broker
  login, read from the deployment directory as anyone holding the device's
  files could; it publishes whatever it likes where its login may write.
* :class:`Observer`: the read-only ``monitor`` login subscribed to every
  topic, each frame checked by the monitor's own model
  (:class:`ops.monitor.model.Monitor`): what reached the target, how it looked
  on the wire, what the target answered, its step events and its status.
* :func:`target_alive`: a signed ping from the operator, after the attack, to
  the target; and :func:`ledger_summary`, the ledger as the payment-server keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt

from nodes.assemble import broker_address, identity
from nodes.bus import BrokerAddress
from nodes.deployment import Deployment, parse_node_id
from nodes.ledger import read_snapshot
from nodes.runtime import Node
from nodes.store import write_atomic
from ops.monitor.model import Monitor
from ops.operator import health
from ops.watch import monitor_client, public_anchors
from protocol.errors import ConfigError
from protocol.messages import Pong
from protocol.topics import PREFIX

from .frames import AttackerIdentity, now_ms
from .verdict import Seen, Sent, Sightings, digest

WAIT_S = 15.0  # any single wait on the target
ACK_S = 3.0  # a publish not acknowledged by then was dropped by the broker (Mosquitto drops oversize ones)


def claim_epoch(state_dir: Path, node_id: str, wait_s: float = 0.0) -> int:
    """Bump the node's persisted boot epoch, as the node itself does when it starts.

    The attacker's genuine frames then carry an epoch the target has not seen,
    and the node's next real start takes a higher one: the attack leaves the
    device able to pay. While the node runs it holds the state lock: wait up
    to ``wait_s`` for it to end (a client ends with its user's command), then refuse.
    Runs in a thread (it blocks).
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:  # bounded by the deadline
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"{node_id} is running (it holds {state_dir / 'lock'}); attack as a node that is "
                        "not running, e.g. the device's client (--as DEVICE.client) while nobody pays"
                    ) from None
                time.sleep(0.05)
        path = state_dir / "epoch"
        try:
            epoch = int(path.read_text()) + 1
        except (FileNotFoundError, ValueError):
            epoch = 1
        write_atomic(path, str(epoch).encode())
        return epoch
    finally:
        os.close(fd)  # closing releases the lock


class Attacker:
    """A compromised node: its keys, chain and login, used outside the rules."""

    def __init__(self, dep: Deployment, node_id: str, broker_url: str | None) -> None:
        ident = identity(dep, node_id)
        self.dep = dep
        self.node_id = node_id
        self.role, self.device = parse_node_id(node_id)
        self.identity = AttackerIdentity(node_id, ident.keys, ident.chain)
        self.address: BrokerAddress = broker_address(dep, node_id, broker_url)

    async def fresh_epoch(self, wait_s: float = 0.0) -> None:
        """A boot epoch of the attacker's own (see :func:`claim_epoch`)."""
        state_dir = self.dep.state_dir(self.node_id)
        self.identity.epoch = await asyncio.to_thread(claim_epoch, state_dir, self.node_id, wait_s)

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str | None = None) -> AsyncIterator[aiomqtt.Client]:
        """The login's connection; ``client_id`` another node's to try a takeover."""
        a = self.address
        versions = ("5", "3.1.1") if a.mqtt_version == "auto" else (a.mqtt_version,)
        client = aiomqtt.Client(
            hostname=a.host,
            port=a.port,
            username=a.username,
            password=a.password,
            identifier=client_id or self.node_id,
            tls_context=a.tls,
            timeout=WAIT_S,
            protocol=aiomqtt.ProtocolVersion.V5 if versions[0] == "5" else aiomqtt.ProtocolVersion.V311,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        try:
            async with client:
                yield client
        finally:
            # A connection the broker cut (an oversize publish) leaves its error in a future
            # aiomqtt never reads; read it, or asyncio prints "exception was never retrieved".
            cut = client._disconnected
            if cut.done() and not cut.cancelled():
                cut.exception()

    async def publish(
        self,
        client: aiomqtt.Client,
        label: str,
        target: str,
        topic: str,
        frame: bytes,
        message_id: bytes = b"",
        probe: bool = True,
        qos: int = 1,
    ) -> Sent:
        published = "published" if qos else "published at QoS 0"
        try:
            async with asyncio.timeout(ACK_S):
                await client.publish(topic, frame, qos=qos)
        except TimeoutError:
            published = f"not acknowledged by the broker within {ACK_S:g} s"
        except aiomqtt.MqttError as exc:
            published = f"refused by the broker connection: {exc}"
        return Sent(label, topic, target, digest(frame), len(frame), message_id.hex(), published, probe)


class Observer:
    """Every frame on every topic, as the monitor login sees it, judged by the monitor's model."""

    def __init__(self, dep: Deployment, broker_url: str | None) -> None:
        self.dep = dep
        self.broker_url = broker_url
        self.sightings: Sightings | None = None
        self.captured: list[tuple[str, bytes]] = []  # verified live frames, for replay and alteration
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        anchors = await asyncio.to_thread(public_anchors, self.dep)
        self.sightings = Sightings(Monitor(anchors, now_ms()))
        address = await asyncio.to_thread(broker_address, self.dep, "monitor", self.broker_url)
        self._task = asyncio.create_task(self._run(address), name="attack-observer")
        async with asyncio.timeout(WAIT_S):
            waiter = asyncio.create_task(self._subscribed.wait())
            await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if self._task.done():
            self._task.result()  # the subscription failed: say why
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def _run(self, address: BrokerAddress) -> None:
        version = "5" if address.mqtt_version == "auto" else address.mqtt_version
        async with monitor_client(address, version, "attack") as client:
            await client.subscribe(f"{PREFIX}/#", qos=1)
            self._subscribed.set()
            async for message in client.messages:
                payload = message.payload
                frame = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
                self._on_frame(str(message.topic), frame, bool(message.retain))

    def _on_frame(self, topic: str, frame: bytes, retained: bool) -> None:
        assert self.sightings is not None
        obs = self.sightings.add(topic, frame, now_ms(), retained).obs
        if not retained and obs.verdict == "ok":
            self.captured.append((topic, frame))
        self._changed.set()

    @property
    def seen(self) -> list[Seen]:
        return self.sightings.seen if self.sightings is not None else []

    def mark(self) -> int:
        return len(self.seen)

    async def wait_for(
        self, predicate: Callable[[Seen], bool], since: int = 0, timeout_s: float = WAIT_S
    ) -> Seen:
        async with asyncio.timeout(timeout_s):
            checked = since
            while True:  # bounded by the timeout; each turn waits for a new frame
                for seen in self.seen[checked:]:
                    if predicate(seen):
                        return seen
                checked = len(self.seen)
                self._changed.clear()
                await self._changed.wait()

    def statuses(self, node: str, since: int = 0) -> list[dict[str, Any]]:
        return [s.obs.status for s in self.seen[since:] if s.obs.status and s.obs.status["node"] == node]

    def events(self, device: str | None, since: int = 0) -> list[dict[str, Any]]:
        """Verified step events of ``device`` (every device when None) from ``since`` on."""
        return [
            event
            for s in self.seen[since:]
            if s.obs.event is not None
            for event in s.obs.events or (s.obs.event,)  # a batch: each of its events
            if device is None or event["device"] == device
        ]


async def target_alive(op: Node, observer: Observer, target: str, since: int) -> dict[str, Any]:
    """A signed ping from the operator after the attack, and the target's status during it.

    The ping also orders things: once its pong is back, the target has taken
    every frame the attack sent before it off the broker.
    """
    role, device = parse_node_id(target)
    asked_at = observer.mark()  # its pong can only come after this
    start = time.perf_counter()
    answer = await health(op, role, target, device)
    ms = round((time.perf_counter() - start) * 1000, 1)
    if isinstance(answer, Pong):
        with contextlib.suppress(TimeoutError):  # the observer's copy of this pong: its view is complete
            await observer.wait_for(
                lambda s: s.obs.type == "pong" and s.obs.sender == target and s.obs.recipient == op.id,
                asked_at,
            )
    statuses = observer.statuses(target, since)
    return {
        "answers_ping": isinstance(answer, Pong),
        "ping": f"answered in {ms} ms, up {answer.uptime_ms / 1000:.1f} s"
        if isinstance(answer, Pong)
        else answer,
        "went_offline": any(s["state"] == "offline" for s in statuses),
        # a node announces itself "online" at every (re)connection: one during the attack was knocked off
        "restarted": any(s["state"] == "online" for s in statuses),
    }


async def ledger_summary(dep: Deployment) -> dict[str, Any]:
    snap = await read_snapshot(dep.database("ledger"))
    return {
        "payments": len(snap.payments),
        "confirmed": sum(1 for p in snap.payments if p.status == "confirmed"),
        "total": sum(a.balance for a in snap.accounts),
        "balances": {a.account: a.balance for a in snap.accounts},
    }
