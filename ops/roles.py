"""Role name -> the class that implements it, and running one node process to completion."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from nodes.assemble import assemble
from nodes.deployment import Deployment
from nodes.runtime import Node, Settings
from protocol.errors import ConfigError
from protocol.topics import Role, node_id


def role_class(role: Role) -> Callable[..., Node]:
    # imported here so that starting one role does not load the others' dependencies
    if role is Role.TRUST_MODULE:
        from nodes.trust_module import TrustModule

        return TrustModule
    if role is Role.CHIP:
        from nodes.chip import Chip

        return Chip
    if role is Role.TRUST_SERVER:
        from nodes.trust_server import TrustServer

        return TrustServer
    if role is Role.PAYMENT_SERVER:
        from nodes.payment_server import PaymentServer

        return PaymentServer
    raise ConfigError(
        f"{role.value} is not a node this command runs; choose one of trust-module, chip, "
        "trust-server, payment-server (the client: `trustpay client`)"
    )


def resolve_node_id(dep: Deployment, role: Role, device: str | None, replica: int = 1) -> str:
    manifest = dep.load_manifest()
    if role.on_device:
        if device is None:
            if len(manifest.devices) != 1:
                raise ConfigError(f"--device is needed: this deployment has {len(manifest.devices)} devices")
            device = manifest.devices[0].device
        manifest.device(device)  # raises a ConfigError naming the known devices
        return node_id(role, device)
    if replica == 1:
        return manifest.servers.get(role.value, role.value)
    ids = manifest.server_ids(role)
    if not 1 <= replica <= len(ids):
        raise ConfigError(f"--replica {replica}: this deployment has {len(ids)} {role.value} identities")
    return ids[replica - 1]


async def run_node(
    dep: Deployment,
    nid: str,
    broker_url: str | None = None,
    console: TextIO | None = sys.stderr,
    console_level: str = "info",
    settings: Settings | None = None,
    metrics_port: int | None = None,
    **extra: Any,
) -> Node:
    """Run one node until it stops by itself or SIGINT/SIGTERM arrives; return it.

    With ``metrics_port``, its counters are also served to Prometheus on 127.0.0.1
    (``ops.prometheus``; imported only then, so a plain node never loads it).
    """
    parts = assemble(dep, nid, broker_url, console=console, console_level=console_level, settings=settings)
    cls = role_class(parts.config.identity.role)
    node = cls(parts.config, parts.bus, parts.logging.logger, deployment=dep, **extra)
    parts.bus.will = node.will
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(parts.logging.close)
        if metrics_port is not None:
            from .prometheus import MetricsCollector, node_source, serve

            exporter = await serve(metrics_port, MetricsCollector(node_source(node, loop)))
            stack.push_async_callback(exporter.close)
            parts.logging.logger.info("metrics.serving", url=exporter.url)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
            stack.callback(loop.remove_signal_handler, sig)
        await node.run()
    return node
