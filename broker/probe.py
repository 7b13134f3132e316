"""``python -m broker.probe nats|rabbitmq``: measure a clustered engine for trustpay's needs.

Starts the engine on free loopback ports with our logins and topic permissions
(NATS: a three-member cluster; RabbitMQ: one node of its own, with the MQTT
plugin), then checks what trustpay relies on, over MQTT 3.1.1 with aiomqtt:

* ``start_s``: until the engine accepts our logins;
* ``retained_exact`` / ``retained_wildcard``: a retained message (the revocation
  list; a node's status) read back on an exact filter / on a ``+`` filter, as
  the launcher and the operator read statuses (on NATS from another member);
* ``qos1_rt_ms`` / ``qos1_rt_per_s``: sequential QoS 1 request/response between a
  device's chip and the payment-server logins (NATS: on different members);
* ``denied_publish`` / ``denied_subscribe``: what a login gets for a topic its
  ACL does not allow, and whether its connection survives;
* ``offline_queue``: QoS 1 messages published while a clean_session=False
  subscriber was away, received when it comes back (NATS: on another member,
  after its first member was SIGKILLed).

Prints one JSON object. It is a measurement, not a test: the figures it gave
here are in the README's cluster guide.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt

from protocol.topics import CRL_TOPIC, Role, channel_topic, link_topic

from . import free_ports, identities_for
from ._base import HOST, BrokerError
from .identities import BrokerIdentity
from .nats import NatsCluster
from .rabbitmq import write_rabbitmq_definitions

DEVICE = "dev-0001"
ROUNDS = 200
WAIT_S = 30.0
CHIP_PS = link_topic(Role.CHIP, Role.PAYMENT_SERVER, DEVICE)
PS_CHIP = link_topic(Role.PAYMENT_SERVER, Role.CHIP, DEVICE)
CHIP_STATUS = channel_topic(Role.CHIP, "status", DEVICE)

Connect = Callable[..., aiomqtt.Client]  # (member index, identity, **options)


def _client(port: int, ident: BrokerIdentity, **options: Any) -> aiomqtt.Client:
    opts: dict[str, Any] = {
        "hostname": HOST,
        "port": port,
        "username": ident.username,
        "password": ident.password,
        "identifier": ident.username if ident.role is not Role.MONITOR else f"monitor:{secrets.token_hex(4)}",
        "protocol": aiomqtt.ProtocolVersion.V311,
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        "timeout": WAIT_S,
    }
    opts.update(options)
    return aiomqtt.Client(**opts)


async def _first(client: aiomqtt.Client, timeout_s: float = 3.0) -> aiomqtt.Message | None:
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(aiter(client.messages))
    except TimeoutError:
        return None


async def measure(
    ports: list[int], ids: dict[str, BrokerIdentity], kill: Callable[[int], Any]
) -> dict[str, Any]:
    """The checks of the module docstring on members ``ports`` (one port: a single node)."""
    far = ports[-1]
    out: dict[str, Any] = {}
    chip, ps, other, op = ids[f"{DEVICE}.chip"], ids["payment-server"], ids["dev-0002.chip"], ids["operator"]
    async with _client(ports[0], op) as c:
        await c.publish(CRL_TOPIC, b"crl", qos=1, retain=True)
    async with _client(ports[0], chip) as c:
        await c.publish(CHIP_STATUS, b"status", qos=1, retain=True)
    async with _client(far, chip) as c:
        await c.subscribe(CRL_TOPIC, qos=1)
        got = await _first(c)
        out["retained_exact"] = got is not None and got.payload == b"crl"
    async with _client(far, ids["operator"]) as c:
        await c.subscribe("tp/v1/dev/+/+/status", qos=1)
        got = await _first(c)
        out["retained_wildcard"] = got is not None and got.payload == b"status"
    async with _client(ports[0], ps) as server, _client(far, chip) as device:
        await server.subscribe("tp/v1/dev/+/+/ps", qos=1)
        await device.subscribe(PS_CHIP, qos=1)
        requests, replies = aiter(server.messages), aiter(device.messages)
        start = time.perf_counter()
        async with asyncio.timeout(120):
            for i in range(ROUNDS):
                await device.publish(CHIP_PS, str(i).encode(), qos=1)
                request = await anext(requests)
                await server.publish(PS_CHIP, request.payload, qos=1)
                await anext(replies)
        elapsed = time.perf_counter() - start
        out["qos1_rt_ms"] = round(elapsed / ROUNDS * 1000, 2)
        out["qos1_rt_per_s"] = round(ROUNDS / elapsed)
    for what in ("publish", "subscribe"):
        try:
            async with _client(far, other) as c:
                if what == "publish":
                    await c.publish(CHIP_PS, b"forged", qos=1)
                    verdict = "acknowledged"
                else:
                    (code,) = await c.subscribe(PS_CHIP, qos=1)
                    verdict = f"suback {code}"
                await c.publish(link_topic(Role.CHIP, Role.PAYMENT_SERVER, "dev-0002"), b"ok", qos=1)
                out[f"denied_{what}"] = verdict + ", connection kept"
        except aiomqtt.MqttError as exc:
            out[f"denied_{what}"] = f"connection closed ({exc})"
    async with _client(far, ps, clean_session=False) as c:
        await c.subscribe("tp/v1/dev/+/+/ps", qos=1)
    if len(ports) > 1:
        await kill(len(ports) - 1)  # the member the session was made on dies
    sent = {f"queued-{i}".encode() for i in range(10)}
    async with _client(ports[0], chip) as c:
        for payload in sent:
            await c.publish(CHIP_PS, payload, qos=1)
    got_back: set[bytes] = set()
    for _ in range(10):  # a member may refuse while the cluster elects new leaders (broker.nats)
        try:
            async with _client(ports[0] if len(ports) == 1 else ports[1], ps, clean_session=False) as c:
                while got_back != sent:  # bounded by _first's timeout
                    msg = await _first(c, 15.0)
                    if msg is None:
                        break
                    got_back.add(bytes(msg.payload))
            break
        except aiomqtt.MqttError:
            continue
    out["offline_queue"] = f"{len(got_back & sent)} of {len(sent)}"
    return out


async def probe_nats(tmp: Path) -> dict[str, Any]:
    ids = identities_for([DEVICE, "dev-0002"])
    by_name = {i.username: i for i in ids}
    start = time.perf_counter()
    cluster = NatsCluster(tmp, free_ports(9), ids, by_name["monitor"])
    async with cluster:
        started = time.perf_counter() - start
        result = await measure([m.port for m in cluster.members], by_name, cluster.kill_member)
    return {"engine": "nats", "members": 3, "start_s": round(started, 1), **result}


@contextlib.asynccontextmanager
async def rabbit_node(tmp: Path, ids: tuple[BrokerIdentity, ...]) -> AsyncIterator[int]:
    """One RabbitMQ node of our own (MQTT plugin, our definitions); yields its MQTT port."""
    exe, ctl = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if not exe or not ctl:
        raise BrokerError("rabbitmq-server is not installed")
    base = free_ports(3)  # AMQP, MQTT, Erlang distribution
    name = f"tp-probe-{secrets.token_hex(3)}@localhost"
    defs = write_rabbitmq_definitions(tmp, ids)
    (tmp / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = {HOST}:{base}\n"
        f"mqtt.listeners.tcp.default = {HOST}:{base + 1}\n"
        "mqtt.allow_anonymous = false\n"
        "loopback_users = none\n"
        f"load_definitions = {defs}\n"
    )
    (tmp / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    env = dict(os.environ)
    env.update(
        HOME=str(tmp),
        RABBITMQ_NODENAME=name,
        RABBITMQ_NODE_IP_ADDRESS=HOST,
        RABBITMQ_NODE_PORT=str(base),
        RABBITMQ_DIST_PORT=str(base + 2),
        RABBITMQ_CONFIG_FILE=str(tmp / "rabbitmq"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(tmp / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(tmp / "mnesia"),
        RABBITMQ_LOG_BASE=str(tmp / "log"),
        RABBITMQ_PLUGINS_EXPAND_DIR=str(tmp / "plugins"),
    )
    if os.geteuid() == 0:  # Debian's script runs the node as user rabbitmq: it must own the dir
        user = pwd.getpwnam("rabbitmq")
        for path in [tmp, *tmp.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(tmp.parent, 0o755)
    with (tmp / "stdio.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(exe, env=env, stdout=log, stderr=log)
    try:
        yield base + 1
    finally:
        stop = await asyncio.create_subprocess_exec(
            ctl,
            "-n",
            name,
            "stop",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await stop.wait()
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def probe_rabbitmq(tmp: Path) -> dict[str, Any]:
    ids = identities_for([DEVICE, "dev-0002"])
    by_name = {i.username: i for i in ids}
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    async with rabbit_node(tmp, ids) as port:
        for _ in range(600):  # bounded: until the node takes our login (or 5 minutes)
            try:
                async with _client(port, by_name["monitor"], timeout=2.0):
                    break
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)  # polling a process we cannot watch otherwise
        started = time.perf_counter() - start

        async def no_kill(_: int) -> None:
            return None

        result = await measure([port], by_name, no_kill)
    return {"engine": "rabbitmq", "members": 1, "start_s": round(started, 1), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.probe", description=__doc__.split("\n")[0])
    parser.add_argument("engine", choices=["nats", "rabbitmq"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trustpay-probe-") as tmp:
        probe = probe_nats if args.engine == "nats" else probe_rabbitmq
        result = asyncio.run(probe(Path(tmp) / "engine"))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
