"""The same-run baseline: plain QoS 1 request/response on the same broker, no crypto, no database.

A baseline "payment" makes the same number of MQTT hops as an attested one,
one after another (a request, its answer, the next request...), plus the same
number of one-way publishes (trustpay's step events), with the same number of
payments in flight, each lane on its own device login as the devices are. One
responder (the trust-server's login), in a process of its own as the server
is, answers every lane from a task per message, as a node does.

Ending it never relies on cancelling a task blocked in ``client.messages``
(``bench rt`` once hung there): the responder's reader stops on a stop message
that it receives in order after everything else, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiomqtt

from protocol.topics import CHANNEL_EVENTS, Role, channel_topic, link_topic

STOP = b"stop"
_OPTS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class Login:
    username: str
    password: str


@dataclass(frozen=True)
class Lane:
    device: str
    login: Login  # the device's trust module login: it may publish on tm -> ts and read ts -> tm


def _client(host: str, port: int, login: Login, version: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
    client = aiomqtt.Client(
        host,
        port,
        username=login.username,
        password=login.password,
        identifier=login.username,  # a login may use only its own client id
        protocol=version,
        socket_options=_OPTS,
        max_inflight_messages=200,
    )
    # aiomqtt logs a warning for every publish made while more than this many are unacknowledged
    # (default 10): with 50 lanes in flight that was a line per message, CPU the baseline spent
    # on logging and the nodes do not (their bus keeps its own PUBACK futures). What is counted
    # is the answers and the latency, not how many wait.
    client.pending_calls_threshold = 1_000_000
    return client


async def _respond(client: aiomqtt.Client) -> int:
    """Echo each request on its device's answer topic; return at the stop message (how many)."""
    answered = 0
    async with asyncio.TaskGroup() as tg:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if payload == STOP:
                break
            device = str(message.topic).split("/")[3]
            answer = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, device)
            tg.create_task(client.publish(answer, payload, qos=1))
            answered += 1
    return answered


async def responder(host: str, port: int, version: aiomqtt.ProtocolVersion, login: Login) -> None:
    """The responder as its own process, as a server is (``python -m ops.bench.respond``).

    Says ``ready`` on stdout once subscribed, ``done N`` at the stop message.
    """
    async with _client(host, port, login, version) as server:
        await server.subscribe(link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "+"), qos=1)
        print("ready", flush=True)
        async with asyncio.timeout(3600):
            answered = await _respond(server)
    print(f"done {answered}", flush=True)


async def _lane(
    client: aiomqtt.Client, lane: Lane, hops: int, events: int, deadline: float, latencies: list[float]
) -> int:
    """Baseline payments on one lane until ``deadline``; how many were made."""
    request = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, lane.device)
    event_topic = channel_topic(Role.TRUST_MODULE, CHANNEL_EVENTS, lane.device)
    body = bytes(600)  # about an attested frame's size
    done = 0
    replies = aiter(client.messages)
    for _ in range(10_000_000):  # bounded; ends at the deadline
        if time.perf_counter() >= deadline:
            break
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(events):  # one-way, concurrent with the hops, as step events are
                tg.create_task(client.publish(event_topic, body[:200], qos=1))
            for _ in range(max(1, hops // 2)):
                await client.publish(request, body, qos=1)
                await anext(replies)
        latencies.append(time.perf_counter() - start)
        done += 1
    return done


async def baseline(
    host: str,
    port: int,
    version: aiomqtt.ProtocolVersion,
    responder: Login,
    lanes: Sequence[Lane],
    *,
    hops: int,
    events: int,
    seconds: float,
) -> dict[str, float]:
    """Baseline payments per second (and latency) with ``len(lanes)`` in flight for ``seconds``.

    The responder runs in a process of its own, as the servers do; the lanes run here.
    """
    import sys

    from ..parent_death import guarded

    latencies: list[float] = []
    v = "5" if version == aiomqtt.ProtocolVersion.V5 else "3.1.1"
    argv = [sys.executable, "-m", "ops.bench.respond", host, str(port), v, responder.username]
    proc = await asyncio.create_subprocess_exec(
        *guarded(argv), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(responder.password.encode() + b"\n")  # not on the command line
        await proc.stdin.drain()
        proc.stdin.close()
        async with asyncio.timeout(30):
            if (await proc.stdout.readline()).strip() != b"ready":
                raise RuntimeError("the baseline responder did not start")
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for lane in lanes:
                client = await stack.enter_async_context(_client(host, port, lane.login, version))
                await client.subscribe(link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, lane.device), qos=1)
                clients.append(client)
            start = time.perf_counter()
            async with asyncio.timeout(seconds + 60), asyncio.TaskGroup() as tg:
                runs = [
                    tg.create_task(_lane(c, lane, hops, events, start + seconds, latencies))
                    for c, lane in zip(clients, lanes, strict=True)
                ]
            elapsed = time.perf_counter() - start
            # the stop message comes after every request of this lane: the responder has seen them all
            stop_topic = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, lanes[0].device)
            await clients[0].publish(stop_topic, STOP, qos=1)
            async with asyncio.timeout(30):
                await proc.stdout.readline()
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    made = sum(r.result() for r in runs)
    ordered = sorted(latencies)
    return {
        "payments": made,
        "payments_per_second": made / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2] if ordered else 0.0,
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0,
    }


def main() -> None:
    import sys

    host, port, version, username = sys.argv[1:5]
    password = sys.stdin.readline().rstrip("\n")
    mqtt = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311
    asyncio.run(responder(host, int(port), mqtt, Login(username, password)))
