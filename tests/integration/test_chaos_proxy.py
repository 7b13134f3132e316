"""The fault proxy between real aiomqtt clients and a real broker (MQTT 5 on Mosquitto, 3.1.1 on amqtt).

The trust module of dev-a publishes on UP (to the trust-server) and the
trust-server on DOWN; both connect through the proxy, so a "to-broker" rule
acts on the publisher's connection and a "from-broker" rule on the
subscriber's. Whatever is missing is shown missing with a marker sent after it
on the same connection (tests/integration/broker_harness.py). Each fault is
observed at the subscriber with a fixed seed, and each publish that the proxy
acknowledges itself must complete (a QoS 1 publish waits for its PUBACK).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from broker import Broker, free_port
from ops.chaos.faults import BOTH, Kind, Profile, Rule
from ops.chaos.packets import MQTT_311, Ack, PacketType, Publish, RawPacket, decode_ack, split_packet
from ops.chaos.proxy import ChaosProxy
from protocol.topics import Role, link_topic

from .broker_harness import BACKENDS, WAIT_S, Cast, next_message, running_broker, until_marker

UP = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "dev-a")
DOWN = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "dev-a")
SEED = 11
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


class Rig:
    """A broker, a proxy in front of it, and the two clients connected through the proxy."""

    def __init__(
        self, cast: Cast, broker: Broker, proxy: ChaosProxy, tm: aiomqtt.Client, ts: aiomqtt.Client
    ) -> None:
        self.cast, self.broker, self.proxy, self.tm, self.ts = cast, broker, proxy, tm, ts

    async def publish(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int = 1) -> None:
        """Returns once the publish is complete: for QoS 1, once a PUBACK came back."""
        async with asyncio.timeout(WAIT_S):
            await client.publish(topic, payload, qos=qos)


def via(rig_broker: Broker, proxy: ChaosProxy, ident_name: str, cast: Cast) -> aiomqtt.Client:
    return rig_broker.client(cast[ident_name], port=proxy.port)


@contextlib.asynccontextmanager
async def rig(backend: str, tmp_path: Path, *rules: Rule) -> AsyncIterator[Rig]:
    cast = Cast()
    async with (
        running_broker(backend, tmp_path / "broker", cast) as broker,
        ChaosProxy(broker.host, broker.port, Profile(tuple(rules)), seed=SEED) as proxy,
        via(broker, proxy, "trust-server", cast) as ts,
        via(broker, proxy, "dev-a.tm", cast) as tm,
    ):
        await ts.subscribe(UP, qos=1)
        await tm.subscribe(DOWN, qos=1)
        yield Rig(cast, broker, proxy, tm, ts)


def payloads(messages: list[aiomqtt.Message]) -> list[bytes]:
    return [bytes(m.payload) for m in messages]  # type: ignore[arg-type]


async def test_passes_qos_0_and_1_both_ways_untouched(backend: str, tmp_path: Path) -> None:
    async with rig(backend, tmp_path) as r:
        await r.publish(r.tm, UP, b"up-0", qos=0)
        await r.publish(r.tm, UP, b"up-1", qos=1)
        await r.publish(r.ts, DOWN, b"down-0", qos=0)
        await r.publish(r.ts, DOWN, b"down-1", qos=1)
        up = await until_marker(r.ts, b"up-1")
        down = await until_marker(r.tm, b"down-1")
        assert payloads(up) == [b"up-0", b"up-1"]
        assert payloads(down) == [b"down-0", b"down-1"]
        qos0 = 0 if backend == "mosquitto" else 1  # amqtt delivers at the subscription's QoS, proxy or not
        assert [m.qos for m in up] == [qos0, 1] and [m.qos for m in down] == [qos0, 1]
        assert not r.proxy.log.counts


async def test_drop_both_ways_and_the_publisher_still_gets_its_ack(backend: str, tmp_path: Path) -> None:
    # without the proxy's own PUBACK the QoS 1 publish of b"lost" would never complete (WAIT_S timeout)
    rules = (
        Rule(Kind.DROP, (UP,), "to-broker", limit=1),
        Rule(Kind.DROP, (DOWN,), "from-broker", limit=1),
    )
    async with rig(backend, tmp_path, *rules) as r:
        await r.publish(r.tm, UP, b"lost")
        await r.publish(r.tm, UP, b"marker")
        await r.publish(r.ts, DOWN, b"lost")  # reaches the broker; the subscriber's copy is dropped
        await r.publish(r.ts, DOWN, b"marker")
        assert payloads(await until_marker(r.ts, b"marker")) == [b"marker"]
        assert payloads(await until_marker(r.tm, b"marker")) == [b"marker"]
        assert r.proxy.log.counts["drop"] == 2
        hit = {f.direction: f for f in r.proxy.log.recent}
        assert hit["to-broker"].topic == UP and hit["to-broker"].client_id == "dev-a.tm"
        assert hit["from-broker"].topic == DOWN and hit["from-broker"].size == len(b"lost")


async def test_duplicate_both_ways(backend: str, tmp_path: Path) -> None:
    rules = (
        Rule(Kind.DUPLICATE, (UP,), "to-broker", limit=1),
        Rule(Kind.DUPLICATE, (DOWN,), "from-broker", limit=1, copies=2),
    )
    async with rig(backend, tmp_path, *rules) as r:
        await r.publish(r.tm, UP, b"twice")
        await r.publish(r.tm, UP, b"marker")
        await r.publish(r.ts, DOWN, b"thrice")
        await r.publish(r.ts, DOWN, b"marker")
        assert payloads(await until_marker(r.ts, b"marker")) == [b"twice", b"twice", b"marker"]
        assert payloads(await until_marker(r.tm, b"marker")) == [b"thrice"] * 3 + [b"marker"]
        assert r.proxy.log.counts["duplicate"] == 2


async def test_reorder_releases_a_window_out_of_order(backend: str, tmp_path: Path) -> None:
    sent = [b"r1", b"r2", b"r3"]
    async with rig(backend, tmp_path, Rule(Kind.REORDER, (UP,), "to-broker", window=3, limit=3)) as r:
        async with asyncio.TaskGroup() as tg:  # all three in flight at once: the window fills
            for payload in sent:
                tg.create_task(r.publish(r.tm, UP, payload))
        await r.publish(r.tm, UP, b"marker")
        got = payloads(await until_marker(r.ts, b"marker"))[:-1]
        assert sorted(got) == sent
        assert got != sent
        assert r.proxy.log.counts["reorder"] == 3


async def test_corrupt_and_truncate_change_the_payload_only(backend: str, tmp_path: Path) -> None:
    original = b"0123456789abcdef"
    rules = (
        Rule(Kind.CORRUPT, (UP,), "to-broker", limit=1, flips=2),
        Rule(Kind.TRUNCATE, (UP,), "to-broker", limit=1, keep=5),
    )
    async with rig(backend, tmp_path, *rules) as r:
        await r.publish(r.tm, UP, original)  # the first rule that fires takes it: corrupt
        await r.publish(r.tm, UP, original)  # corrupt's limit is spent: truncate
        await r.publish(r.tm, UP, b"marker")
        corrupted, truncated, _ = payloads(await until_marker(r.ts, b"marker"))
        assert len(corrupted) == len(original) and corrupted != original
        assert 1 <= sum(a != b for a, b in zip(corrupted, original, strict=True)) <= 2
        assert truncated == original[:5]
        assert r.proxy.log.counts == {"corrupt": 1, "truncate": 1}


async def test_replay_sends_an_earlier_publish_again_later(backend: str, tmp_path: Path) -> None:
    async with rig(
        backend, tmp_path, Rule(Kind.REPLAY, (UP,), "to-broker", limit=1, delay_ms=(100, 200))
    ) as r:
        await r.publish(r.tm, UP, b"order-1")
        await r.publish(r.tm, UP, b"marker")
        got = payloads(await until_marker(r.ts, b"marker"))
        assert got[0] == b"order-1"
        if got.count(b"order-1") < 2:  # the copy comes 100-200 ms later, usually after the marker
            assert payloads([await next_message(r.ts)]) == [b"order-1"]
        assert r.proxy.log.counts["replay"] == 1


async def test_delay_holds_a_publish_and_its_ack(backend: str, tmp_path: Path) -> None:
    async with rig(
        backend, tmp_path, Rule(Kind.DELAY, (UP,), "to-broker", limit=1, delay_ms=(400, 400))
    ) as r:
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = asyncio.create_task(r.publish(r.tm, UP, b"slow"))
        await r.proxy.log.wait_for("delay")  # the proxy holds it now
        await r.publish(r.tm, UP, b"fast")
        first = await next_message(r.ts)
        second = await next_message(r.ts)
        arrived = loop.time() - started
        await slow  # its PUBACK came back once the broker had it
        assert payloads([first, second]) == [b"fast", b"slow"]
        assert arrived >= 0.4
        assert r.proxy.log.recent[0].detail == "400 ms"


async def test_partition_holds_then_heals_in_order(backend: str, tmp_path: Path) -> None:
    rule = Rule(Kind.PARTITION, (UP,), BOTH, mode="hold", duration_ms=500)
    async with rig(backend, tmp_path, rule) as r:
        loop = asyncio.get_running_loop()
        held = [asyncio.create_task(r.publish(r.tm, UP, p)) for p in (b"p1", b"p2")]
        await r.publish(r.ts, DOWN, b"other topic")  # the partition is on UP only
        assert payloads([await next_message(r.tm)]) == [b"other topic"]
        assert payloads([await next_message(r.ts), await next_message(r.ts)]) == [b"p1", b"p2"]
        # what the partition held came when it healed: 500 ms after the profile was loaded
        assert loop.time() >= r.proxy.loaded_at + 0.49
        await asyncio.gather(*held)
        assert r.proxy.log.counts["partition"] == 2


async def test_partition_drop_and_a_live_profile_change_heals_it(backend: str, tmp_path: Path) -> None:
    rule = Rule(Kind.PARTITION, (UP,), "to-broker", mode="drop", duration_ms=60_000)
    async with rig(backend, tmp_path, rule) as r:
        await r.publish(r.tm, UP, b"lost-1")  # acknowledged by the proxy
        await r.publish(r.tm, UP, b"lost-2")
        r.proxy.set_profile(Profile())  # the change applies to the connections already open
        await r.publish(r.tm, UP, b"marker")
        assert payloads(await until_marker(r.ts, b"marker")) == [b"marker"]
        assert r.proxy.log.counts["partition"] == 2


async def test_disconnect_cuts_the_publishers_connection_only(backend: str, tmp_path: Path) -> None:
    async with rig(backend, tmp_path, Rule(Kind.DISCONNECT, (UP,), "to-broker", limit=1)) as r:
        cut = asyncio.create_task(r.tm.publish(UP, b"cut", qos=1))  # never acknowledged
        await r.proxy.log.wait_for("disconnect")
        with pytest.raises(aiomqtt.MqttError):  # nothing is published on DOWN: only the cut ends this
            await next_message(r.tm)
        cut.cancel()
        async with via(r.broker, r.proxy, "dev-a.tm", r.cast) as tm2:
            await r.publish(tm2, UP, b"marker")
        assert payloads(await until_marker(r.ts, b"marker")) == [b"marker"]  # ts's connection survived
        assert r.proxy.log.counts["disconnect"] == 1


async def test_disconnect_after_delivering_leaves_the_sender_without_an_answer(
    backend: str, tmp_path: Path
) -> None:
    rule = Rule(Kind.DISCONNECT, (UP,), "to-broker", limit=1, deliver=True)
    async with rig(backend, tmp_path, rule) as r:
        unanswered = asyncio.create_task(r.tm.publish(UP, b"did it go?", qos=1))
        assert payloads([await next_message(r.ts)]) == [b"did it go?"]  # the broker had it
        with pytest.raises(aiomqtt.MqttError):  # ... and the publisher's connection is gone
            await next_message(r.tm)
        assert not unanswered.done()  # no PUBACK ever reached it
        unanswered.cancel()
        assert r.proxy.log.recent[0].detail == "delivered, then cut"


async def test_cut_all_ends_every_connection_through_the_proxy(backend: str, tmp_path: Path) -> None:
    async with rig(backend, tmp_path) as r:
        assert r.proxy.cut_all() == 2
        for client in (r.tm, r.ts):
            with pytest.raises(aiomqtt.MqttError):  # nothing is published: only the cut ends this
                await next_message(client)
        assert r.proxy.clients == {"dev-a.tm", "trust-server"}


async def test_the_same_seed_gives_the_same_faults(backend: str, tmp_path: Path) -> None:
    rule = Rule(Kind.DROP, (UP,), "to-broker", probability=0.5)
    runs = []
    for n in range(2):
        async with rig(backend, tmp_path / str(n), rule) as r:
            for i in range(12):
                await r.publish(r.tm, UP, b"%d" % i)
            await r.publish(r.tm, UP, b"marker")
            runs.append(payloads(await until_marker(r.ts, b"marker")))
    assert runs[0] == runs[1]
    assert 1 < len(runs[0]) < 13  # some dropped, some not


async def test_the_command_logs_faults_and_rereads_its_profile_on_sighup(
    backend: str, tmp_path: Path
) -> None:
    cast = Cast()
    profile, log = tmp_path / "faults.toml", tmp_path / "faults.log"
    profile.write_text(f'seed = 3\n[[fault]]\nkind = "drop"\ntopics = ["{UP}"]\nlimit = 1\n')
    async with running_broker(backend, tmp_path / "broker", cast) as broker:
        port = free_port()
        argv = [sys.executable, "-m", "ops.cli", "chaos", "proxy", "--listen", str(port), "--json"]
        argv += [
            "--upstream",
            broker.url,
            "--profile",
            str(profile),
            "--log",
            str(log),
            "--no-monitor-listener",
        ]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout is not None

        async def line() -> dict[str, object]:
            async with asyncio.timeout(WAIT_S):
                return dict(json.loads(await proc.stdout.readline()))  # type: ignore[union-attr]

        try:
            assert (await line())["kind"] == "listening"
            async with (
                broker.client(cast["trust-server"], port=port) as ts,
                broker.client(cast["dev-a.tm"], port=port) as tm,
            ):
                await ts.subscribe(UP, qos=1)
                await tm.publish(UP, b"lost", qos=1)
                fault = await line()
                assert (fault["kind"], fault["fault"], fault["topic"]) == ("fault", "drop", UP)
                assert fault["client_id"] == "dev-a.tm"
                profile.write_text(f'[[fault]]\nkind = "duplicate"\ntopics = ["{UP}"]\nlimit = 1\n')
                os.kill(proc.pid, signal.SIGHUP)
                assert (await line())["kind"] == "reloaded"
                await tm.publish(UP, b"twice", qos=1)
                assert (await line())["kind"] == "fault"
                await tm.publish(UP, b"marker", qos=1)
                assert payloads(await until_marker(ts, b"marker")) == [b"twice", b"twice", b"marker"]
            proc.send_signal(signal.SIGTERM)
            stopped = await line()
            assert stopped == {"kind": "stopped", "faults": {"drop": 1, "duplicate": 1}}
            async with asyncio.timeout(WAIT_S):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    logged = [json.loads(text) for text in log.read_text().splitlines()]
    faults = [entry for entry in logged if entry["event"] == "fault"]
    assert [(f["kind"], f["topic"], f["direction"]) for f in faults] == [
        ("drop", UP, "to-broker"),
        ("duplicate", UP, "to-broker"),
    ]
    assert faults[0]["size"] == len(b"lost") and faults[0]["qos"] == 1 and faults[0]["packet_id"] is not None


# -- acknowledgements as the sender sees them, on a raw MQTT 3.1.1 connection -------------------------


class RawClient:
    """A bare MQTT 3.1.1 connection, to see every packet the proxy sends back to a publisher."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.buf = reader, writer, bytearray()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int, username: str, password: str) -> AsyncIterator[RawClient]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        try:
            fields = b"".join(_string(s) for s in (username, username, password))  # client id = login
            client.send(RawPacket(PacketType.CONNECT, 0, _string("MQTT") + b"\x04\xc2\x00\x3c" + fields))
            connack = await client.packet()
            assert (connack.type, connack.body[1]) == (PacketType.CONNACK, 0)
            yield client
        finally:
            writer.transport.abort()

    def send(self, packet: RawPacket | Publish | Ack) -> None:
        self.writer.write(packet.encode(MQTT_311) if isinstance(packet, Publish) else packet.encode())

    async def packet(self) -> RawPacket:
        async with asyncio.timeout(WAIT_S):
            while (split := split_packet(self.buf)) is None:  # bounded by the timeout
                chunk = await self.reader.read(4096)
                assert chunk, "the proxy closed the connection"
                self.buf += chunk
        packet, used = split
        del self.buf[:used]
        return packet

    async def everything_until_pong(self) -> list[Ack]:
        """Every packet before the answer to a PINGREQ sent now (one connection: answered in order)."""
        self.send(RawPacket(PacketType.PINGREQ, 0, b""))
        got = []
        while (packet := await self.packet()).type is not PacketType.PINGRESP:  # bounded: packet() times out
            got.append(decode_ack(packet))
        return got


def _string(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


async def test_the_publisher_never_hears_of_copies_qos1(backend: str, tmp_path: Path) -> None:
    # without the proxy swallowing the broker's PUBACKs for its copies, the publisher would get three
    async with rig(backend, tmp_path, Rule(Kind.DUPLICATE, (UP,), "to-broker", limit=1, copies=2)) as r:
        tm = r.cast["dev-a.tm"]
        async with RawClient.connect(r.proxy.port, tm.username, tm.password) as raw:
            raw.send(Publish(UP, b"thrice", qos=1, packet_id=5))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBACK, 5)]
        got = [await next_message(r.ts) for _ in range(3)]
        assert payloads(got) == [b"thrice"] * 3


async def test_qos2_drop_and_duplicate_keep_the_publishers_handshake_whole(
    backend: str, tmp_path: Path
) -> None:
    rules = (Rule(Kind.DROP, (UP,), "to-broker", limit=1), Rule(Kind.DUPLICATE, (UP,), "to-broker", limit=1))
    async with rig(backend, tmp_path, *rules) as r:
        tm = r.cast["dev-a.tm"]
        async with RawClient.connect(r.proxy.port, tm.username, tm.password) as raw:
            # dropped: the proxy answers PUBREC, then PUBCOMP for the PUBREL the broker never sees
            raw.send(Publish(UP, b"lost", qos=2, packet_id=6))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBREC, 6)]
            raw.send(Ack(PacketType.PUBREL, 6))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBCOMP, 6)]
            # duplicated: one PUBREC and one PUBCOMP, the copy's own handshake done by the proxy
            raw.send(Publish(UP, b"twice", qos=2, packet_id=7))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBREC, 7)]
            raw.send(Ack(PacketType.PUBREL, 7))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBCOMP, 7)]
            raw.send(Publish(UP, b"marker", qos=1, packet_id=8))
            assert await raw.everything_until_pong() == [Ack(PacketType.PUBACK, 8)]
        assert payloads(await until_marker(r.ts, b"marker")) == [b"twice", b"twice", b"marker"]


async def test_bytes_that_are_not_mqtt_pass_on_to_the_broker_and_the_proxy_keeps_serving(
    backend: str, tmp_path: Path
) -> None:
    async with rig(backend, tmp_path, Rule(Kind.DUPLICATE, (UP,), "to-broker")) as r:
        _, writer = await asyncio.open_connection("127.0.0.1", r.proxy.port)
        try:
            writer.write(b"\x00\x05garbage that is no MQTT at all")  # packet type 0 is reserved
            await r.proxy.log.wait_for("unreadable_stream")  # passed on as it is, for the broker to judge
        finally:
            writer.transport.abort()
        await r.publish(r.tm, UP, b"still here")
        got = [await next_message(r.ts), await next_message(r.ts)]
        assert payloads(got) == [b"still here"] * 2  # and the faults still apply
