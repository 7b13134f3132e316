"""``trustpay status``: every node's signed, retained status, read with the read-only monitor login.

Expected are the manifest's two servers and each device's chip and trust module:
exit status 0 only when all of them say "online". A device's client runs only
while a user runs it, so its row is shown but never required. A deployment
provisioned with replicas shows every replica of each server, each from its own
status topic; the first is required, the others once they have run (`up
--replicas` may run fewer than provisioned): a replica that stopped on purpose
("offline") or never ran is not, one whose connection was lost (its last will)
is. Every status
frame is verified with the deployment's public certificates
(:func:`ops.watch.public_verifier`); one that fails is shown as unverified, with
its code, and never believed.

How the command knows it has every retained status without waiting for a
timeout: after subscribing to the status topics it subscribes once more, to a
topic nobody publishes on. A broker sends a subscription's retained messages
before it answers the next subscribe (Mosquitto queues them right behind the
SUBACK; amqtt finishes sending them before it reads the next packet), so when
that last SUBACK arrives, every retained status is in the client's queue.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import aiomqtt

from nodes.assemble import broker_address
from nodes.bus import BrokerAddress
from nodes.deployment import Deployment, Manifest
from protocol.envelope import Verifier
from protocol.errors import TransportError, TrustpayError
from protocol.messages import Status
from protocol.topics import (
    CHANNEL_STATUS,
    SERVER_ROLES,
    STATUS_FILTERS,
    Role,
    channel_topic,
    node_status_topic,
)

from .cli_common import add_deploy_argument, add_examples, add_json_argument
from .watch import monitor_client, public_verifier

HELP = "show every node's signed status, version and age; exit 0 only if every expected node is online"
EXIT_STATUS = """exit status: 0 every server, chip and trust module is online; 1 some node is offline,
lost (its last will), missing or unverifiable, or the broker cannot be reached;
2 the deployment or the command line is not usable"""
EXIT_OK, EXIT_NOT_ONLINE = 0, 1
# the monitor's own status topic: it never publishes, so this subscription only marks the end
BARRIER = channel_topic(Role.MONITOR, CHANNEL_STATUS)
_PROBE_TIMEOUT_S = 2.0  # amqtt never answers an MQTT 5 CONNECT: give up on it quickly


@dataclass(frozen=True)
class NodeStatus:
    """One row of the table: what the retained status of one node says, if anything."""

    node: str
    role: str
    required: bool
    state: str  # "online" | "offline" | "lost" (last will) | "missing" | "unverified"
    version: str = ""
    at_ms: int = 0  # when the status was signed (a will: when its connection began)
    started_ms: int = 0
    problem: str = ""  # why a status was not believed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_examples(
        parser,
        "trustpay status --deploy ./deploy",
        "TRUSTPAY_DEPLOY=./deploy trustpay status --json | jq '.nodes[] | select(.state != \"online\")'",
    )
    parser.epilog = f"{parser.epilog}\n\n{EXIT_STATUS}"
    add_deploy_argument(parser)
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_json_argument(parser, "one JSON object: {ok, nodes: [...]}")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to read the broker (default 10)")


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    rows = asyncio.run(status(dep, args.broker, args.timeout))
    now = now_ms()
    ok = all_online(rows)
    if args.json:
        print(json.dumps({"ok": ok, "at_ms": now, "nodes": [asdict(r) for r in rows]}))
    else:
        print(render(rows, now))
    return EXIT_OK if ok else EXIT_NOT_ONLINE


async def status(dep: Deployment, broker_url: str | None, timeout_s: float) -> list[NodeStatus]:
    manifest = await asyncio.to_thread(dep.load_manifest)
    frames = await read_retained(dep, broker_url, timeout_s)
    verifier = await asyncio.to_thread(public_verifier, dep)
    rows = [
        judge(node, role, required, topic, frames.get(topic), verifier)
        for node, role, required, topic in expected(manifest)
    ]
    return [optional_replica(r) for r in rows]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def expected(manifest: Manifest) -> list[tuple[str, Role, bool, str]]:
    """(node id, role, required, status topic) of every node, servers (each replica) first.

    Clients are not required; a server's replicas after the first are, until
    ``optional_replica`` has seen what their status says.
    """
    rows = [(nid, r, True, node_status_topic(nid)) for r in SERVER_ROLES for nid in manifest.server_ids(r)]
    for device in manifest.devices:
        for role in (Role.CHIP, Role.TRUST_MODULE, Role.CLIENT):
            topic = channel_topic(role, CHANNEL_STATUS, device.device)
            rows.append((device.node(role), role, role is not Role.CLIENT, topic))
    return rows


def optional_replica(row: NodeStatus) -> NodeStatus:
    """A second or later replica that never ran or was stopped on purpose is not required.

    `up --replicas 1` on a deployment provisioned for more runs the first only; a
    replica that vanished (its last will: "lost") or says nothing believable stays
    required, so a crashed replica still fails the check while the others serve.
    """
    if row.node in {r.value for r in SERVER_ROLES} or Role(row.role) not in SERVER_ROLES:
        return row
    if row.state in ("missing", "offline"):
        return dataclasses.replace(row, required=False)
    return row


def judge(
    node: str, role: Role, required: bool, topic: str, frame: bytes | None, verifier: Verifier
) -> NodeStatus:
    """What the retained ``frame`` on ``node``'s status ``topic`` says, checked; never raises."""
    if frame is None:
        return NodeStatus(node, role.value, required, "missing")
    try:
        env = verifier.open(frame, topic, now_ms()).envelope
    except TrustpayError as exc:
        return NodeStatus(node, role.value, required, "unverified", problem=f"{exc.code}: {exc.reason}")
    body = env.body
    if env.type != "status" or not isinstance(body, Status) or not body.node == env.sender == node:
        problem = f"a {env.type} from {env.sender} on {node}'s status topic"
        return NodeStatus(node, role.value, required, "unverified", problem=problem)
    state = "lost" if body.state == "offline" and body.will else body.state
    return NodeStatus(node, role.value, required, state, body.version, body.at_ms, body.started_ms)


def all_online(rows: Sequence[NodeStatus]) -> bool:
    return all(r.state == "online" for r in rows if r.required)


async def read_retained(dep: Deployment, broker_url: str | None, timeout_s: float) -> dict[str, bytes]:
    """The retained frame on every status topic, by topic, as the broker holds them now."""
    address = await asyncio.to_thread(broker_address, dep, Role.MONITOR.value, broker_url)
    versions = ("5", "3.1.1") if address.mqtt_version == "auto" else (address.mqtt_version,)
    errors: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            for version in versions:  # at most two: the version the manifest implies, or both
                probe = min(_PROBE_TIMEOUT_S, timeout_s) if len(versions) > 1 else timeout_s
                try:
                    return await _read(address, version, probe)
                except aiomqtt.MqttError as exc:
                    errors.append(f"MQTT {version}: {exc}")
    except TimeoutError:
        errors.append(f"no answer in {timeout_s:g} s")
    raise TransportError(
        f"cannot read node status from the broker at {address.host}:{address.port} (monitor login): "
        f"{'; '.join(errors)}; is it running (`trustpay up`), and is --broker right?"
    )


async def _read(address: BrokerAddress, version: str, timeout_s: float) -> dict[str, bytes]:
    frames: dict[str, bytes] = {}
    async with monitor_client(address, version, "status", timeout_s) as client:
        for topic_filter in STATUS_FILTERS:
            await client.subscribe(topic_filter, qos=1)
        await client.subscribe(BARRIER, qos=0)  # see the module docstring: every retained status is in
        for _ in range(len(client.messages)):  # already queued: each read returns at once
            message = await anext(client.messages)
            payload = message.payload
            if isinstance(payload, (bytes, bytearray)):
                frames[str(message.topic)] = bytes(payload)
    return frames


# -- showing --------------------------------------------------------------------------------


def render(rows: Sequence[NodeStatus], now: int) -> str:
    lines = [f"{'NODE':<20} {'ROLE':<15} {'STATE':<11} {'VERSION':<9} SINCE"]
    for r in rows:
        lines.append(f"{r.node:<20} {r.role:<15} {r.state:<11} {r.version or '-':<9} {_since(r, now)}")
    required = [r for r in rows if r.required]
    down = [r.node for r in required if r.state != "online"]
    online = len(required) - len(down)
    summary = f"{online} of {len(required)} expected nodes online"
    lines.append(summary + (f"; not online: {', '.join(down)}" if down else ""))
    return "\n".join(lines)


def _since(r: NodeStatus, now: int) -> str:
    if r.state == "online":
        return f"up {_duration(now - r.started_ms)}"
    if r.state == "offline":
        return f"stopped {_duration(now - r.at_ms)} ago"
    if r.state == "lost":
        return f"connection lost (its last will; it had connected {_duration(now - r.at_ms)} ago)"
    if r.state == "unverified":
        return r.problem
    if not r.required and r.role == Role.CLIENT.value:
        return "not running (optional: runs while a user uses it)"
    if not r.required:
        return "not running (optional: a replica `up --replicas` did not start)"
    return "no status ever seen"


def _duration(ms: int) -> str:
    seconds = max(ms, 0) / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
