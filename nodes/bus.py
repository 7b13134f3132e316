"""The message bus a node talks through: a real MQTT connection, or an in-memory fake.

Both offer the same two operations. ``run`` keeps the connection up (reconnecting
with capped, jittered exponential backoff), subscribes, and hands every received message
to ``on_message`` from a single reader, so messages of one connection stay in
order. ``publish`` sends one message at QoS 1 and returns once the broker has
acknowledged it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import itertools
import random
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import TransportError
from protocol.topics import split_shared

OnMessage = Callable[[str, bytes], None]
WillFactory = Callable[[], tuple[str, bytes]]


class Bus(Protocol):
    on_connect: Callable[[], None] | None  # called after every (re)connection

    async def run(
        self, subscriptions: tuple[str, ...], on_message: OnMessage, connected: asyncio.Event
    ) -> None: ...

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str
    password: str
    mqtt_version: str = "auto"  # "5", "3.1.1" or "auto" (try 5, fall back)
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # mqtts (nodes.tls)
    # other members of a clustered broker (broker.nats), tried in turn after host:port fails
    alternates: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.alternates)

    def at(self, attempt: int) -> BrokerAddress:
        """The address for connection try ``attempt``: the members in turn (one broker: itself)."""
        ends = self.endpoints
        first = attempt % len(ends)
        (host, port), *others = ends[first:] + ends[:first]
        return replace(self, host=host, port=port, alternates=tuple(others))


@dataclass
class MqttBus:
    """An aiomqtt connection with reconnect, persistent session and a last will."""

    address: BrokerAddress
    client_id: str
    will: WillFactory | None = None
    on_connect: Callable[[], None] | None = None
    keepalive_s: int = 20
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    publish_timeout_s: float = 10.0
    ack_timeout_s: float = 3.0
    handshake_timeout_s: float = 4.0
    log: structlog.typing.FilteringBoundLogger = field(default_factory=structlog.get_logger)
    # filters a kept session may still hold from an earlier run in another mode: dropped at connect
    stale_filters: tuple[str, ...] = ()
    _client: _Connection | None = field(default=None, init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _version: str = field(default="", init=False)
    # done when a publish finds the connection dead (no PUBACK in time): run drops it and reconnects;
    # a future, not an Event: one per connection, and an Event allocates a deque for its waiters
    _kick: asyncio.Future[None] | None = field(default=None, init=False)
    _closing: bool = field(default=False, init=False)
    connections: int = field(default=0, init=False)
    endpoint: tuple[str, int] = field(default=("", 0), init=False)  # the member connected to last

    def _make_client(self, version: str) -> _Connection:
        will = None
        if self.will is not None:
            topic, payload = self.will()
            will = aiomqtt.Will(topic, payload, qos=1, retain=True)
        common = dict(
            hostname=self.endpoint[0],
            port=self.endpoint[1],
            username=self.address.username,
            password=self.address.password,
            identifier=self.client_id,
            tls_context=self.address.tls,
            will=will,
            keepalive=self.keepalive_s,
            # how long CONNACK and SUBACK may take: a broker that accepted the connection but never
            # answers (one still stopping, seen with amqtt during a restart) costs one short attempt
            timeout=self.handshake_timeout_s,
            max_inflight_messages=200,
            # Nagle costs ~44-88 ms per round trip on loopback (FIELD-NOTES).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        if version == "5":
            return _Connection(
                **common,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=_session_properties(),
            )
        return _Connection(
            **common,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
        )

    async def run(
        self, subscriptions: tuple[str, ...], on_message: OnMessage, connected: asyncio.Event
    ) -> None:
        delay = self.backoff_initial_s
        version = self.address.mqtt_version if self.address.mqtt_version != "auto" else "5"
        endpoints = self.address.endpoints
        for attempt in itertools.count():  # ends by cancellation or close(); backoff between tries
            # a clustered broker: each lost connection or failed try moves on to the next member
            # (the session, with its unacknowledged QoS 1 messages, is the cluster's, not the member's)
            self.endpoint = endpoints[attempt % len(endpoints)]
            try:
                async with self._make_client(version) as client:
                    for topic_filter in self.stale_filters:
                        await client.unsubscribe(topic_filter)
                    for topic_filter in subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    self._client, self._version = client, version
                    self.connections += 1
                    self._ready.set()
                    connected.set()
                    delay = self.backoff_initial_s
                    self.log.info(
                        "bus.connected", mqtt=version, attempt=self.connections, port=self.endpoint[1]
                    )
                    if self.on_connect is not None:
                        self.on_connect()
                    self._kick = kick = asyncio.get_running_loop().create_future()
                    async with asyncio.TaskGroup() as tg:
                        reader = tg.create_task(self._read(client, on_message), name=f"{self.client_id}:read")
                        await kick
                        reader.cancel()
                    self.log.warning("bus.reconnecting", reason="a publish was not acknowledged")
            except* aiomqtt.MqttError as group:
                if self._closing:
                    # aiomqtt turns a cancellation during a dropped connection into an MqttError:
                    # the node is stopping, so stop instead of reconnecting
                    raise asyncio.CancelledError from None
                exc = group.exceptions[0]
                self.log.warning(
                    "bus.disconnected", reason=str(exc), retry_in_s=delay, mqtt=version, port=self.endpoint[1]
                )
                if self.address.mqtt_version == "auto" and self.connections == 0:
                    # Until one connection works, alternate: amqtt refuses a v5 CONNECT.
                    version = "3.1.1" if version == "5" else "5"
            finally:
                if self._client is not None:
                    self._client.end()
                self._client = None
                _drop(self._kick)
                self._ready.clear()
                connected.clear()
            if len(endpoints) > 1 and (attempt + 1) % len(endpoints):
                continue  # another member right away; back off once every member was tried
            # jittered (up to half shorter at random): a thousand nodes of a fleet that lost the
            # broker together must not all come back in the same instant
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max_s)

    def close(self) -> None:
        """The node is stopping: the next disconnection ends ``run`` instead of reconnecting."""
        self._closing = True

    async def _read(self, client: _Connection, on_message: OnMessage) -> None:
        try:
            async for message in client.messages:
                payload = message.payload
                data = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
                on_message(str(message.topic), data)
                # not kept while waiting for the next: with its MQTT 5 properties (paho's tables
                # per packet) the last message was ~3 KiB of every idle node of a fleet
                del message, payload, data
            raise aiomqtt.MqttError("message stream ended")
        finally:
            # the reader sees the end first (or is cancelled for a dropped connection): from now on
            # publishes wait for the next connection, and those waiting on this one fail now, not
            # after the client's exit has run
            if client is self._client:
                self._ready.clear()
            client.end()

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not self._ready.is_set():  # the common case skips the timeout's setup
            try:
                async with asyncio.timeout(self.publish_timeout_s):
                    await self._ready.wait()
            except TimeoutError as exc:
                raise TransportError(f"not connected to the broker for {self.publish_timeout_s} s") from exc
        client, kick = self._client, self._kick
        if client is None:
            raise TransportError("not connected to the broker")
        try:
            acked = client.send(topic, payload, retain)
        except aiomqtt.MqttError as exc:
            if client is self._client:  # the connection is going: the next publish waits for the new one
                self._ready.clear()
                _drop(kick)
            raise TransportError(f"publish to {topic} failed: {exc}") from exc
        # one timer instead of a timeout scope: it fails the future, it cancels nothing
        timer = asyncio.get_running_loop().call_later(self.ack_timeout_s, _expire, acked)
        try:
            await acked
        except _AckTimeout as exc:
            # A connection that takes publishes but acknowledges none is dead in one direction
            # (seen with amqtt after a restart): drop it and reconnect.
            if client is self._client:  # the next publish waits for the new connection
                self._ready.clear()
            _drop(kick)
            raise TransportError(f"publish to {topic} not acknowledged in {self.ack_timeout_s} s") from exc
        except _ConnectionEnded as exc:
            # The connection ended first: no PUBACK can come on it any more, so waiting out
            # ack_timeout_s would only hold up the caller's retry on the next one.
            raise TransportError(
                f"publish to {topic}: the connection ended before its acknowledgement"
            ) from exc
        finally:
            timer.cancel()


def _drop(kick: asyncio.Future[None] | None) -> None:
    """Have ``run`` drop the connection ``kick`` belongs to (if it still runs)."""
    if kick is not None and not kick.done():
        kick.set_result(None)


@functools.cache
def _session_properties() -> Properties:
    """CONNECT's properties, one object for every connection of the process (paho only packs it:
    one per connection was ~2 KiB of each fleet node, its name tables included)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600  # keep the session (and queued QoS 1) for an hour
    return props


class _AckTimeout(Exception):
    """A publish's PUBACK did not come within ``ack_timeout_s`` (translated in ``publish``)."""


class _ConnectionEnded(Exception):
    """The connection a publish went out on ended before its PUBACK (translated in ``publish``)."""


def _expire(acked: asyncio.Future[None]) -> None:
    if not acked.done():
        acked.set_exception(_AckTimeout())


class _Connection(aiomqtt.Client):
    """One connection's aiomqtt client whose QoS 1 publish is a single future, resolved by its PUBACK.

    aiomqtt's own publish adds an event, a ``wait_for`` task and a pending-call record per
    message (and logs a warning for each beyond ten in flight); a node awaits thousands of
    publishes, so it registers the future itself. The future fails at once when the
    connection ends (``end``), since no PUBACK can come on it after that.
    """

    def __init__(self, **kwargs: object) -> None:
        self.acks: dict[int, asyncio.Future[None]] = {}
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def send(self, topic: str, payload: bytes, retain: bool) -> asyncio.Future[None]:
        """Hand one QoS 1 message to paho; the future is done at its PUBACK."""
        info = self._client.publish(topic, payload, 1, retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        # paho reads the PUBACK only from the loop's reader callback, so never before this line
        acked: asyncio.Future[None] = self._loop.create_future()
        self.acks[info.mid] = acked
        return acked

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason_code: object, properties: object
    ) -> None:
        acked = self.acks.pop(mid, None)
        if acked is not None and not acked.done():  # done: its caller was cancelled or timed out
            acked.set_result(None)

    def end(self) -> None:
        """The connection is over: fail every publish still waiting for its PUBACK."""
        acks, self.acks = self.acks, {}
        for acked in acks.values():
            if not acked.done():
                acked.set_exception(_ConnectionEnded())


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


class FakeBroker:
    """A tiny in-memory broker for fast node tests: QoS 1 semantics, retained messages.

    ``tap`` sees every publish (topic, payload) before delivery and returns the
    list of payloads to deliver, so a test can drop, duplicate or alter frames.
    Shared subscriptions (``$share/{group}/{filter}``) deliver each message to one
    member of the group, in turn, as Mosquitto does, and no retained messages;
    ``pick``, if set, chooses the member instead (a test steering a retry).
    """

    def __init__(self) -> None:
        self._subs: list[tuple[str, asyncio.Queue[tuple[str, bytes]]]] = []
        self._shared: dict[str, list[tuple[str, asyncio.Queue[tuple[str, bytes]], str]]] = {}
        self._turn: Counter[str] = Counter()
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes]] = []
        self.tap: Callable[[str, bytes], list[bytes]] | None = None
        # (topic, the members' client ids) -> index of the member to get it
        self.pick: Callable[[str, list[str]], int] | None = None
        self._publishes = asyncio.Event()  # set at every publish: what `published_at_least` waits on

    def subscribe(
        self, topic_filter: str, queue: asyncio.Queue[tuple[str, bytes]], client_id: str = ""
    ) -> None:
        group, plain = split_shared(topic_filter)
        if group is not None:
            self._shared.setdefault(group, []).append((plain, queue, client_id))
            return
        self._subs.append((topic_filter, queue))
        for topic, payload in self.retained.items():
            if topic_matches(topic_filter, topic):
                queue.put_nowait((topic, payload))

    def unsubscribe_all(self, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        self._subs = [(f, q) for f, q in self._subs if q is not queue]
        for group, members in self._shared.items():
            self._shared[group] = [(f, q, c) for f, q, c in members if q is not queue]

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published.append((topic, payload))
        self._publishes.set()
        payloads = self.tap(topic, payload) if self.tap else [payload]
        if retain:
            self.retained[topic] = payload
        for data in payloads:
            delivered: set[int] = set()
            for topic_filter, queue in self._subs:
                if id(queue) not in delivered and topic_matches(topic_filter, topic):
                    delivered.add(id(queue))
                    queue.put_nowait((topic, data))
            for group, members in self._shared.items():
                matching = [(q, c) for f, q, c in members if topic_matches(f, topic)]
                if matching:
                    names = [c for _, c in matching]
                    turn = self.pick(topic, names) if self.pick else self._turn[group]
                    self._turn[group] += 1
                    matching[turn % len(matching)][0].put_nowait((topic, data))

    async def drained(self, max_turns: int = 100_000) -> None:
        """Return once every subscriber has taken every message delivered so far."""
        for _ in range(max_turns):  # each turn lets the readers run; bounded
            shared = [q for members in self._shared.values() for _, q, _ in members]
            if all(queue.empty() for _, queue in self._subs) and all(q.empty() for q in shared):
                return
            await asyncio.sleep(0)
        raise TimeoutError("subscribers did not drain their queues")

    async def published_at_least(self, pattern: str, count: int) -> list[tuple[str, bytes]]:
        """Wait until ``count`` publishes matched ``pattern`` (bound it with ``asyncio.timeout``).

        Woken by each publish, so it also waits out work done in threads (a database's
        claim), which turns of the event loop alone do not.
        """
        while len(found := self.matching(pattern)) < count:
            self._publishes.clear()
            await self._publishes.wait()
        return found

    def matching(self, pattern: str) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.published if fnmatch.fnmatchcase(t, pattern)]


@dataclass
class FakeBus:
    broker: FakeBroker
    client_id: str
    will: WillFactory | None = None
    on_connect: Callable[[], None] | None = None
    _queue: asyncio.Queue[tuple[str, bytes]] = field(default_factory=asyncio.Queue, init=False)

    async def run(
        self, subscriptions: tuple[str, ...], on_message: OnMessage, connected: asyncio.Event
    ) -> None:
        for topic_filter in subscriptions:
            self.broker.subscribe(topic_filter, self._queue, self.client_id)
        connected.set()
        if self.on_connect is not None:
            self.on_connect()
        try:
            while True:
                topic, payload = await self._queue.get()
                on_message(topic, payload)
        finally:
            # a node's stop is a clean disconnect: a broker publishes the will only after a crash
            self.broker.unsubscribe_all(self._queue)

    def close(self) -> None:
        """Nothing to do: the in-memory bus ends when its task is cancelled."""

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.broker.publish(topic, payload, retain)
