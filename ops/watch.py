"""``trustpay watch``: follow the flows from outside, as the read-only ``monitor`` login.

Every step event and status a node publishes is verified with the
deployment's public certificates only (signature-only checks: a watcher is
not the recipient of anything), then shown; a frame that fails is counted and
shown as rejected, never believed. ``EventWatcher`` is the same thing as a
library, for the demo and the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

import aiomqtt

from nodes.assemble import broker_address
from nodes.bus import BrokerAddress
from nodes.deployment import Deployment
from protocol.certs import CertStore
from protocol.envelope import Verifier
from protocol.errors import TrustpayError
from protocol.messages import Status, StepEvent, StepEvents, reported_by
from protocol.topics import CHANNEL_EVENTS, CLIENT_ID_SEPARATOR, PREFIX, STATUS_FILTERS

from .cli_common import add_deploy_argument, add_examples, add_json_argument
from .monitor.model import Anchors

HELP = "show every signed step event and status as it happens (verified, read-only)"
# step events, and every node's status (a server replica's on its own topic)
T = TypeVar("T")

FILTERS = (f"{PREFIX}/dev/+/+/{CHANNEL_EVENTS}", f"{PREFIX}/plat/+/{CHANNEL_EVENTS}", *STATUS_FILTERS)


def public_anchors(dep: Deployment) -> Anchors:
    """The deployment's public trust anchors: all a watcher needs to check frames, no private key."""
    return Anchors(
        root=dep.load_public("root"),
        update=dep.load_public("update"),
        platform=dep.load_public("platform"),
        crl=dep.load_public("crl"),
    )


def public_verifier(dep: Deployment) -> Verifier:
    """Signature-only checks (no replay guard, any recipient), anchored in the deployment's public files."""
    anchors = public_anchors(dep)
    certs = CertStore(anchors.root, anchors.update)
    certs.install_platform(anchors.platform)
    certs.set_revocations(anchors.crl, time.time_ns() // 1_000_000_000)
    return Verifier(frozenset(), certs, None)


def monitor_client(
    address: BrokerAddress,
    version: str,
    purpose: str,
    timeout: float | None = None,
    logger: logging.Logger | None = None,
) -> aiomqtt.Client:
    """A fresh, clean-session connection (it never takes over another watcher's session)."""
    return aiomqtt.Client(
        timeout=timeout,
        logger=logger,
        hostname=address.host,
        port=address.port,
        username=address.username,
        password=address.password,
        # the monitor login's own client ids: "monitor:{purpose}-{time}" (protocol.topics)
        identifier=f"{address.username}{CLIENT_ID_SEPARATOR}{purpose}-{time.time_ns():x}",
        tls_context=address.tls,
        protocol=aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


@dataclass(frozen=True)
class Seen:
    topic: str
    sender: str
    type: str
    session: bytes
    ts_ms: int
    event: StepEvent | None
    status: Status | None


class EventWatcher:
    """Collects verified step events and statuses while the block runs."""

    def __init__(
        self,
        dep: Deployment,
        broker_url: str | None = None,
        on_seen: Callable[[Seen], None] | None = None,
        every_frame: bool = False,
    ) -> None:
        self.dep = dep
        self.broker_url = broker_url
        self.on_seen = on_seen
        self.filters = (f"{PREFIX}/#",) if every_frame else FILTERS  # every link, or events and status
        self.seen: list[Seen] = []
        self.rejected: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._verifier: Verifier | None = None

    @property
    def events(self) -> list[StepEvent]:
        return [s.event for s in self.seen if s.event is not None]

    async def __aenter__(self) -> Self:
        self._verifier = await asyncio.to_thread(public_verifier, self.dep)
        address = await asyncio.to_thread(broker_address, self.dep, "monitor", self.broker_url)
        self._task = asyncio.create_task(self._run(address), name="watch")
        async with asyncio.timeout(15):
            await self._subscribed.wait()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def _run(self, address: BrokerAddress) -> None:
        versions = ("5", "3.1.1") if address.mqtt_version == "auto" else (address.mqtt_version,)
        for attempt in range(40):  # bounded: reconnects over a broker restart, then gives up
            try:
                async with monitor_client(address, versions[attempt % len(versions)], "watch") as client:
                    for topic_filter in self.filters:
                        await client.subscribe(topic_filter, qos=1)
                    self._subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        self._on_frame(
                            str(message.topic), bytes(payload) if isinstance(payload, bytes) else b""
                        )
            except aiomqtt.MqttError:
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # reconnect backoff

    def _on_frame(self, topic: str, frame: bytes) -> None:
        assert self._verifier is not None
        try:
            received = self._verifier.open(frame, topic, time.time_ns() // 1_000_000)
        except TrustpayError as exc:
            self.rejected[exc.code] += 1
            return
        env, body = received.envelope, received.envelope.body
        # a batch of step events is seen as its events, one after another
        for item in body.events if isinstance(body, StepEvents) else (body,):
            if isinstance(item, StepEvent) and not reported_by(item, env.sender, received.topic.device):
                self.rejected["foreign_event"] += 1
                continue
            seen = Seen(
                topic,
                env.sender,
                env.type,
                env.session,
                env.ts_ms,
                item if isinstance(item, StepEvent) else None,
                item if isinstance(item, Status) else None,
            )
            self.seen.append(seen)
            if self.on_seen is not None:
                self.on_seen(seen)
        self._changed.set()

    def mark(self) -> int:
        """A position in the event stream, for ``wait_for(..., since=...)``."""
        return len(self.events)

    async def wait_for(
        self, predicate: Callable[[StepEvent], bool], timeout_s: float = 30.0, since: int = 0
    ) -> StepEvent:
        """The first event from position ``since`` on (seen or yet to come) that satisfies ``predicate``."""
        return await self._first(lambda: self.events, predicate, timeout_s, since)

    async def wait_seen(self, predicate: Callable[[Seen], bool], timeout_s: float = 30.0) -> Seen:
        """The first verified event or status (seen or yet to come) that satisfies ``predicate``."""
        return await self._first(lambda: self.seen, predicate, timeout_s, 0)

    async def _first(
        self, items: Callable[[], list[T]], predicate: Callable[[T], bool], timeout_s: float, since: int
    ) -> T:
        async with asyncio.timeout(timeout_s):
            checked = since
            while True:  # bounded by the timeout; each turn waits for a new frame
                current = items()
                for item in current[checked:]:
                    if predicate(item):
                        return item
                checked = len(current)
                self._changed.clear()
                await self._changed.wait()

def describe(seen: Seen) -> str:
    if seen.event is None and seen.status is None:
        return f"{'frame':<10} {'':<3} {seen.type:<14} {seen.sender:<16} {seen.topic}"
    if seen.event is not None:
        e = seen.event
        where = e.device or "platform"
        order = f" order={e.order_id}" if e.order_id else ""
        return f"{where:<10} {e.step:<3} {e.outcome:<9} {seen.sender:<16} {e.reason}{order}"
    assert seen.status is not None
    return f"{'status':<10} {'':<3} {seen.status.state:<9} {seen.sender}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_json_argument(parser, "one JSON object per line")
    parser.add_argument("--all", action="store_true", help="every frame on every link, not just events")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop after this long (default 1 h)")
    add_examples(
        parser,
        "trustpay watch --deploy deploy",
        "trustpay watch --all --json --seconds 60   # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
    )


async def _watch(args: argparse.Namespace) -> None:
    def show(seen: Seen) -> None:
        if args.json:
            body = seen.event or seen.status
            fields = vars(body) if body is not None else {"type": seen.type, "session": seen.session}
            data = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in fields.items()}
            print(json.dumps({"topic": seen.topic, "sender": seen.sender, **data}), flush=True)
        else:
            print(describe(seen), flush=True)

    dep = Deployment(args.deploy)
    async with EventWatcher(dep, args.broker, on_seen=show, every_frame=args.all) as watcher:
        try:
            await asyncio.sleep(args.seconds)  # the watch lasts this long, or until Ctrl-C
        finally:
            if watcher.rejected:
                print(f"rejected frames: {dict(watcher.rejected)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(args))
    return 0
