"""An MQTT fault proxy: radio links that lose, delay, duplicate, reorder and corrupt.

Nodes connect to the proxy (on 127.0.0.1) instead of the broker; each
connection gets its own connection to the broker, and the proxy reads the
packets going both ways (:mod:`ops.chaos.packets`). PUBLISH packets that a
rule of the current :class:`~ops.chaos.faults.Profile` selects (topic filter,
direction, probability, limit) get that rule's fault; every other packet, and
every byte of a stream the codec cannot read, passes through unchanged.

Randomness: each connection direction draws from its own
``random.Random(f"{seed}/{client id}/{n}/{direction}")`` (``n``: the how-many-th
connection of that client id), so the same seed and the same traffic give the
same faults, whatever order the connections arrive in.

Acknowledgements stay consistent from each side's point of view. "Sender" is
the side that sent the PUBLISH, "receiver" the side it was going to:

- drop (and a partition in drop mode): the receiver never sees it; the proxy
  answers the sender as a lossy radio after the receiver would look: PUBACK for
  QoS 1, PUBREC for QoS 2, and later PUBCOMP for the sender's PUBREL, which
  the receiver never sees either (it knows no such packet id). A PUBREL that
  comes only after a reconnect goes on to the receiver, which answers an unknown id.
- delay, reorder, partition in hold mode: the packet is forwarded later with
  its own packet id; the receiver acknowledges it then, and that ack goes back
  to the sender untouched (the sender simply waits longer).
- corrupt, truncate: the payload changes (bytes flipped / cut short; the packet
  is re-framed, so MQTT itself stays well formed); the ack passes through.
- duplicate, replay: the original is forwarded as usual (its ack passes
  through); each extra copy at QoS 1/2 gets a fresh packet id the proxy picks
  (counting down from 65535, skipping ids in flight) and tracks. The
  receiver's PUBACK for it is swallowed; for QoS 2 the proxy answers its PUBREC
  with PUBREL and swallows the PUBCOMP. The sender never hears of the copies.
  (A sender that later picks an id the proxy still has in flight would have one
  of its acks swallowed: ids the proxy picks are freed as soon as acknowledged.)
- disconnect: both TCP connections are cut and the packet is not forwarded; the
  sender has no ack, so a QoS 1/2 packet is resent when it reconnects with its
  session, exactly as after a real lost connection. With ``deliver = true`` the
  packet is forwarded first: the receiver has it, the sender never hears back
  (it cannot know the outcome: the case a retry must not turn into two).

MQTT 5 topic aliases are not resolved: a PUBLISH that carries only an alias has
an empty topic, which only the filter ``#`` matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from protocol.errors import ConfigError, Malformed

from .fault_log import AppliedFault, FaultLog
from .faults import Direction, Kind, Profile, Rule, Tally
from .packets import (
    MQTT_311,
    Ack,
    PacketType,
    Publish,
    RawPacket,
    decode_ack,
    decode_connect,
    decode_publish,
    split_packet,
)

LISTEN_HOST = "127.0.0.1"
READ_CHUNK = 65536
MAX_PACKET = 16 * 1024 * 1024  # larger than any broker here accepts: passed on unread, never buffered


class ChaosProxy:
    """Listens on 127.0.0.1:``listen_port`` (0: any free port) and forwards to the broker upstream."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: Profile | None = None,
        *,
        seed: int = 0,
        listen_port: int = 0,
        log: FaultLog | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.seed = seed
        self.log = log or FaultLog()
        self.listen_port = listen_port
        self.profile = Profile()
        self.tally = Tally()
        self.loaded_at = 0.0
        self._initial = profile or Profile()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._seen: Counter[str] = Counter()  # connections per client id, for the seeds
        self.publishes: Counter[str] = Counter()  # PUBLISH packets read, by direction

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not listening yet")
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> ChaosProxy:
        self.set_profile(self._initial)
        try:
            self._server = await asyncio.start_server(self._accept, LISTEN_HOST, self.listen_port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {LISTEN_HOST}:{self.listen_port}: {exc.strerror}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True  # a connection still reaching the broker gives up once it is there
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.cut()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def set_profile(self, profile: Profile) -> None:
        """Apply new rules from now on; packets held by the old ones are released in order."""
        self.profile = profile
        self.tally = Tally()  # limits count afresh
        self.loaded_at = asyncio.get_running_loop().time()
        for conn in self._connections:
            for link in conn.links:
                link.reset()
        self.log.note("profile", source=profile.source, rules=len(profile.rules))

    def cut_all(self) -> int:
        """Cut every connection now (both sides); returns how many."""
        conns = list(self._connections)
        for conn in conns:
            conn.cut()
        return len(conns)

    @property
    def clients(self) -> set[str]:
        """Every client id that connected through the proxy."""
        return set(self._seen) - {""}

    def seed_for(self, client_id: str, direction: Direction) -> str:
        return f"{self.seed}/{client_id}/{self._seen[client_id]}/{direction}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer), name="chaos:connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            self.log.note(
                "upstream_unreachable", upstream=f"{self.upstream[0]}:{self.upstream[1]}", error=str(exc)
            )
            writer.transport.abort()
            return
        if self._closing:
            up_writer.transport.abort()
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer, up_reader, up_writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def connected(self, client_id: str) -> None:
        self._seen[client_id] += 1


class _Connection:
    """One node's connection: the downstream socket, its upstream socket, a link each way."""

    def __init__(
        self,
        proxy: ChaosProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        broker_reader: asyncio.StreamReader,
        broker_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.version = MQTT_311  # until CONNECT says otherwise
        self.client_id = ""
        self.readers = (client_reader, broker_reader)
        self.writers = (client_writer, broker_writer)
        self.to_broker = _Link(self, Direction.TO_BROKER, sender=client_writer, receiver=broker_writer)
        self.from_broker = _Link(self, Direction.FROM_BROKER, sender=broker_writer, receiver=client_writer)
        self.to_broker.other, self.from_broker.other = self.from_broker, self.to_broker
        self.links = (self.to_broker, self.from_broker)
        self.timers: set[asyncio.TimerHandle] = set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(self.readers[0], self.to_broker), name="chaos:to-broker")
                tg.create_task(self._pump(self.readers[1], self.from_broker), name="chaos:from-broker")
        except BaseException:
            self.cut()
            raise

    def cut(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
        for writer in self.writers:
            writer.transport.abort()  # its reader sees the end of the stream: both pumps finish

    def flush_and_cut(self) -> None:
        """Cut once what was written so far has gone out (close, not abort: the buffer is sent first).

        Closing a transport also ends its reading, so both pumps finish.
        """
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
        for writer in self.writers:
            writer.close()

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        def fire() -> None:
            self.timers.discard(handle)
            action()

        handle = asyncio.get_running_loop().call_later(max(delay_s, 0.0), fire)
        self.timers.add(handle)

    async def _pump(self, reader: asyncio.StreamReader, link: _Link) -> None:
        buf = bytearray()
        opaque = False  # once a stream cannot be read, the rest passes through as it is
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(READ_CHUNK):  # ends at EOF, including after cut()
                if opaque:
                    link.write_receiver(chunk)
                else:
                    buf += chunk
                    opaque = self._packets(buf, link)
                    if opaque:
                        link.write_receiver(bytes(buf))
                        buf.clear()
                await link.receiver.drain()
        self.flush_and_cut()  # one side has gone: what it said last still reaches the other

    def _packets(self, buf: bytearray, link: _Link) -> bool:
        """Handle every whole packet at the front of ``buf``; True when the stream is unreadable."""
        while True:  # each turn removes one packet from buf, or returns
            try:
                split = split_packet(buf, MAX_PACKET)
                if split is None:
                    return False
                packet, used = split
                del buf[:used]
                link.handle(packet)
            except Malformed as exc:
                self.proxy.log.note(
                    "unreadable_stream", direction=link.direction, client_id=self.client_id, error=exc.reason
                )
                return True


class _Link:
    """One direction of one connection, with the fault state that belongs to it."""

    def __init__(
        self,
        conn: _Connection,
        direction: Direction,
        sender: asyncio.StreamWriter,
        receiver: asyncio.StreamWriter,
    ) -> None:
        self.conn = conn
        self.direction = direction
        self.sender, self.receiver = sender, receiver
        self.other: _Link = self
        self.rng = random.Random(conn.proxy.seed_for("", direction))
        self.inflight: set[int] = set()  # the sender's own QoS 1/2 packet ids, until acknowledged
        self.injected: dict[int, int] = {}  # packet id -> QoS of copies the proxy sent the receiver
        self.dropped_qos2: set[int] = set()  # the sender's ids whose PUBREL the proxy answers
        self.reorder: dict[int, list[Publish]] = {}  # rule index -> packets held
        self.partitioned: list[Publish] = []

    # -- what arrives from the sender --------------------------------------------------
    def handle(self, packet: RawPacket) -> None:
        kind = packet.type
        if kind is PacketType.CONNECT and self.direction is Direction.TO_BROKER:
            self._on_connect(packet)
        elif kind is PacketType.PUBLISH:
            self._on_publish(decode_publish(packet, self.conn.version))
            return
        elif kind in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBCOMP):
            if self._ack_of_other(decode_ack(packet)):
                return
        elif kind is PacketType.PUBREL:
            ack = decode_ack(packet)
            if ack.packet_id in self.dropped_qos2:  # the receiver never had it: close it here
                self.dropped_qos2.discard(ack.packet_id)
                self.write_sender(Ack(PacketType.PUBCOMP, ack.packet_id).encode())
                return
        self.write_receiver(packet.encode())

    def _on_connect(self, packet: RawPacket) -> None:
        connect = decode_connect(packet)
        proxy = self.conn.proxy
        proxy.connected(connect.client_id)
        self.conn.version, self.conn.client_id = connect.version, connect.client_id
        for link in self.conn.links:
            link.rng = random.Random(proxy.seed_for(connect.client_id, link.direction))
        proxy.log.note("connect", client_id=connect.client_id, version=connect.version)

    def _ack_of_other(self, ack: Ack) -> bool:
        """An ack of a PUBLISH that went the other way; True when it answers one of the proxy's copies."""
        other = self.other
        if ack.packet_id not in other.injected:
            if ack.type is not PacketType.PUBREC:
                other.inflight.discard(ack.packet_id)
            return False
        if ack.type is PacketType.PUBREC:
            self.write_sender(Ack(PacketType.PUBREL, ack.packet_id).encode())
        else:
            del other.injected[ack.packet_id]
        return True

    # -- faults ---------------------------------------------------------------------------
    def _on_publish(self, pub: Publish) -> None:
        proxy = self.conn.proxy
        proxy.publishes[self.direction] += 1
        now = asyncio.get_running_loop().time()
        for index, rule in enumerate(proxy.profile.rules):
            if not rule.matches(self.direction, pub.topic) or not proxy.tally.allows(index, rule):
                continue
            if rule.kind is Kind.PARTITION and not self._partition_active(rule, now):
                continue
            if self.rng.random() < rule.probability:
                proxy.tally.count(index)
                self._apply(index, rule, pub)
                return
        self.forward(pub)

    def _partition_active(self, rule: Rule, now: float) -> bool:
        start = self.conn.proxy.loaded_at + rule.start_ms / 1000
        return start <= now < start + rule.duration_ms / 1000

    def _apply(self, index: int, rule: Rule, pub: Publish) -> None:
        detail = ""
        if rule.kind is Kind.DROP:
            self._answer_dropped(pub)
        elif rule.kind is Kind.DELAY:
            delay_s = self.rng.uniform(*rule.delay_ms) / 1000
            detail = f"{delay_s * 1000:.0f} ms"
            self.conn.later(delay_s, lambda: self.forward(pub))
        elif rule.kind is Kind.DUPLICATE:
            self.forward(pub)
            for _ in range(rule.copies):
                self.inject(pub)
            detail = f"{rule.copies} extra"
        elif rule.kind is Kind.REORDER:
            detail = self._hold_for_reorder(index, rule, pub)
        elif rule.kind is Kind.CORRUPT:
            payload = bytearray(pub.payload)
            flipped = [self.rng.randrange(len(payload)) for _ in range(rule.flips)] if payload else []
            for pos in flipped:
                payload[pos] ^= self.rng.randrange(1, 256)
            detail = f"flipped bytes at {flipped}" if flipped else "empty payload: nothing to flip"
            self.forward(replace(pub, payload=bytes(payload)))
        elif rule.kind is Kind.TRUNCATE:
            keep = rule.keep if rule.keep is not None else self.rng.randrange(max(len(pub.payload), 1))
            detail = f"kept {min(keep, len(pub.payload))} of {len(pub.payload)} bytes"
            self.forward(replace(pub, payload=pub.payload[:keep]))
        elif rule.kind is Kind.REPLAY:
            self.forward(pub)
            delay_s = self.rng.uniform(*rule.delay_ms) / 1000
            detail = f"again in {delay_s * 1000:.0f} ms"
            self.conn.later(delay_s, lambda: self.inject(pub))
        elif rule.kind is Kind.PARTITION:
            detail = self._partition(rule, pub)
        elif rule.kind is Kind.DISCONNECT:
            if rule.deliver:
                self.forward(pub)
                self.conn.flush_and_cut()
                detail = "delivered, then cut"
            else:
                self.conn.cut()
        self._record(rule.kind, pub, detail)

    def _record(self, kind: str, pub: Publish, detail: str) -> None:
        fault = AppliedFault(
            kind,
            self.direction,
            self.conn.client_id,
            pub.topic,
            len(pub.payload),
            pub.qos,
            pub.packet_id,
            detail,
        )
        self.conn.proxy.log.record(fault)

    def _answer_dropped(self, pub: Publish) -> None:
        if pub.packet_id is None:
            return
        if pub.qos == 1:
            self.write_sender(Ack(PacketType.PUBACK, pub.packet_id).encode())
        else:
            self.dropped_qos2.add(pub.packet_id)
            self.write_sender(Ack(PacketType.PUBREC, pub.packet_id).encode())

    def _hold_for_reorder(self, index: int, rule: Rule, pub: Publish) -> str:
        held = self.reorder.setdefault(index, [])
        held.append(pub)
        if len(held) >= rule.window:
            self._release_reorder(index)
        elif len(held) == 1:  # the first of a window: never held longer than hold_ms
            self.conn.later(rule.hold_ms / 1000, lambda: self._release_reorder(index, only=held))
        return f"held {len(held)} of {rule.window}"

    def _release_reorder(self, index: int, only: list[Publish] | None = None) -> None:
        held = self.reorder.get(index)
        if not held or (only is not None and held is not only):
            return  # released already (the window filled before the timer)
        del self.reorder[index]
        order = list(held)
        self.rng.shuffle(order)
        if len(order) > 1 and order == held:
            order.reverse()  # out of order, always: a shuffle may give the order back
        for pub in order:
            self.forward(pub)

    def _partition(self, rule: Rule, pub: Publish) -> str:
        if rule.mode == "drop":
            self._answer_dropped(pub)
            return "dropped in a partition"
        self.partitioned.append(pub)
        if len(self.partitioned) == 1:
            heals = self.conn.proxy.loaded_at + (rule.start_ms + rule.duration_ms) / 1000
            self.conn.later(heals - asyncio.get_running_loop().time(), self._heal)
        return "held until the partition heals"

    def _heal(self) -> None:
        held, self.partitioned = self.partitioned, []
        for pub in held:
            self.forward(pub)

    def reset(self) -> None:
        """New rules: release what the old ones hold, in the order it came."""
        held = [pub for index in sorted(self.reorder) for pub in self.reorder[index]]
        self.reorder.clear()
        for pub in held:
            self.forward(pub)
        self._heal()

    # -- writing ----------------------------------------------------------------------
    def forward(self, pub: Publish) -> None:
        if pub.packet_id is not None:
            self.inflight.add(pub.packet_id)
        self.write_receiver(pub.encode(self.conn.version))

    def inject(self, pub: Publish) -> None:
        """A copy the sender knows nothing of: at QoS 1/2 under a packet id of the proxy's own."""
        if pub.qos:
            packet_id = self._fresh_id()
            self.injected[packet_id] = pub.qos
            pub = replace(pub, packet_id=packet_id, dup=False)
        self.write_receiver(pub.encode(self.conn.version))

    def _fresh_id(self) -> int:
        for packet_id in range(0xFFFF, 0, -1):  # bounded: 65535 candidates
            if packet_id not in self.injected and packet_id not in self.inflight:
                return packet_id
        raise RuntimeError("every packet id is in flight")

    def write_receiver(self, data: bytes) -> None:
        if not self.receiver.is_closing():
            self.receiver.write(data)

    def write_sender(self, data: bytes) -> None:
        if not self.sender.is_closing():
            self.sender.write(data)
