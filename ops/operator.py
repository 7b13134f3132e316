"""The operator's own node: signed commands to running nodes (releases, key reloads, health pings)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nodes.assemble import assemble
from nodes.deployment import Deployment, OfflineKeys
from nodes.runtime import Node, Settings, ping
from protocol.certs import CertStore
from protocol.errors import TrustpayError
from protocol.messages import Body, Pong
from protocol.topics import Role, operator_topic

OPERATOR = Role.OPERATOR.value


@asynccontextmanager
async def operator_node(
    dep: Deployment, broker_url: str | None = None, settings: Settings | None = None
) -> AsyncIterator[Node]:
    """A connected operator node for the duration of the block."""
    parts = assemble(dep, OPERATOR, broker_url, console=None)
    if settings is not None:
        parts.config = dataclasses.replace(parts.config, settings=settings)
    node = Node(parts.config, parts.bus, parts.logging.logger)
    task = asyncio.create_task(node.run(), name="operator")
    try:
        async with asyncio.timeout(15):
            await node.connected.wait()
        yield node
    finally:
        node.stop()
        await task
        parts.logging.close()


async def command(
    node: Node, role: Role, nid: str, msg_type: str, body: Body, expect: str, device: str | None = None
) -> str:
    """Send one operator command; return "ok" or the reason it failed (never raises)."""
    try:
        await node.request(operator_topic(role, device), msg_type, body, recipient=nid, expect=expect)
    except TrustpayError as exc:
        return str(exc)
    return "ok"


async def health(node: Node, role: Role, nid: str, device: str | None = None) -> Pong | str:
    try:
        return await ping(node, role, nid, device)
    except TrustpayError as exc:
        return str(exc)


def add_offline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offline",
        type=Path,
        default=None,
        help="directory of the offline keys `trustpay provision` wrote (default: DEPLOY.offline)",
    )


def offline_keys(args: argparse.Namespace) -> OfflineKeys:
    return OfflineKeys.of(args.deploy, args.offline)


def deployment_certs(dep: Deployment) -> CertStore:
    """What the operator trusts: the deployment's root and its current revocation list."""
    certs = CertStore(dep.load_public("root"))
    certs.set_revocations(dep.load_public("crl"), time.time_ns() // 1_000_000_000)
    return certs
