"""``trustpay fleet``: many nodes of a deployment in one process, each still its own node.

A platform serves thousands of terminals; a process per device node does not
scale to that on one machine (an interpreter is ~10 MB). A fleet hosts the
device nodes of many devices (and, if asked, the servers) in one asyncio loop.
Each node keeps what made it independent as a process: its own MQTT client and
login, its own keys, certificate, state directory (and its lock), replay guard,
log file and counters. What a fleet shares is only what carries no identity:

* the manifest, read once (not once per node);
* one handler per signal for the whole process, which stops every node (a node
  installing its own would overwrite the previous node's);
* the chips' fork servers for payment-app workers (``nodes.app_forks``: each
  payment's app still runs in a fresh child, used once; a few servers for the
  fleet instead of a spare interpreter per chip).

A node that fails (its ``run`` raises) is reported and started again after a
capped, jittered backoff; the other nodes never notice. Chips start before
trust modules (a trust module asks its chip for its apps at start-up).

Reports, a line each on stdout (with ``--json`` one JSON object each): ``{"event": "up", ...}`` once
every node is connected (and every trust module has finished its start-up
flow), ``{"event": "failed", ...}`` when a node fails, and at the end
``{"event": "stopped", "counters": ...}`` with the fleet's summed counters;
SIGUSR1 prints ``{"event": "counters", ...}`` with the counters so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from nodes.app_forks import ForkSandbox
from nodes.assemble import assemble
from nodes.deployment import Deployment, Manifest
from nodes.runtime import Node, Settings
from protocol.errors import ConfigError, TrustpayError
from protocol.topics import DEVICE_ROLES, SERVER_ROLES, Role, role_from_name

from .cli_common import add_deploy_argument, add_examples, add_json_argument, add_replica_arguments

HELP = "run many nodes (the device nodes of N devices, or servers) in one process, each its own node"
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
MAX_RESTARTS = 50  # per node: a node that keeps failing stays down, reported, after this many
UP_TIMEOUT_S = 120.0
PROFILE_ENV = "TRUSTPAY_PROFILE"  # a path prefix: the fleet runs under cProfile and writes its stats there

Report = Callable[[dict[str, Any]], None]


def jittered(delay_s: float) -> float:
    """``delay_s`` shortened by up to half at random, so many nodes never retry in lockstep."""
    return delay_s * random.uniform(0.5, 1.0)


@dataclass
class Member:
    """One node of the fleet and its current incarnation."""

    node_id: str
    role: Role
    node: Node | None = None
    restarts: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set when it fails or starts again


class Fleet:
    """Nodes of one deployment in this process; ``run`` until ``stop``."""

    def __init__(
        self,
        dep: Deployment,
        node_ids: Sequence[str],
        broker_url: str | None = None,
        *,
        manifest: Manifest | None = None,
        console: TextIO | None = None,
        console_level: str = "warning",
        settings: Settings | None = None,
        report: Report | None = None,
        node_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.dep = dep
        self.manifest = manifest or dep.load_manifest()  # once for the whole fleet
        self.broker_url = broker_url
        self.console = console
        self.console_level = console_level
        self.settings = settings
        self.report: Report = report or (lambda event: None)
        self.node_kwargs = node_kwargs or {}
        order = {Role.TRUST_SERVER: 0, Role.PAYMENT_SERVER: 1, Role.CHIP: 2, Role.TRUST_MODULE: 3}
        members = []
        for nid in node_ids:
            role = _role_of(self.manifest, nid)
            if role not in order:
                raise ConfigError(f"{nid} is a {role.value}: a fleet runs chips, trust modules and servers")
            members.append(Member(nid, role))
        self.members = sorted(members, key=lambda m: order[m.role])
        self.sandbox = ForkSandbox(max_servers=8)  # shared by the fleet's chips
        self.up = asyncio.Event()
        self._stop = asyncio.Event()
        self._retired: Counter[str] = Counter()  # counters of incarnations that ended
        self._closers: dict[str, Callable[[], None]] = {}  # each node's log file

    @property
    def nodes(self) -> list[Node]:
        return [m.node for m in self.members if m.node is not None]

    def stop(self) -> None:
        self._stop.set()
        for member in self.members:
            member.stopped = True
            if member.node is not None:
                member.node.stop()

    def counters(self) -> Counter[str]:
        """Every node's counters, summed (ended incarnations included)."""
        total = Counter(self._retired)
        for node in self.nodes:
            total.update(node.counters)
        return total

    def _make(self, member: Member) -> Node:
        from .roles import role_class

        parts = assemble(
            self.dep,
            member.node_id,
            self.broker_url,
            console=self.console,
            console_level=self.console_level,
            settings=self.settings,
            manifest=self.manifest,
        )
        kwargs = dict(self.node_kwargs)
        if member.role is Role.CHIP:
            kwargs["sandbox"] = self.sandbox
        node = role_class(member.role)(
            parts.config, parts.bus, parts.logging.logger, deployment=self.dep, **kwargs
        )
        parts.bus.will = node.will
        self._closers[member.node_id] = parts.logging.close
        return node

    async def run(self) -> Counter[str]:
        """Run every node until ``stop``; return the summed counters."""
        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                phases = [
                    [m for m in self.members if m.role not in (Role.TRUST_MODULE,)],
                    [m for m in self.members if m.role is Role.TRUST_MODULE],
                ]
                for phase in phases:
                    for member in phase:
                        member.node = self._make(member)  # now, so that the phase can wait for it
                        tg.create_task(self._keep(member), name=f"fleet:{member.node_id}")
                    await self._settle(phase)
                if not self._stop.is_set():
                    self.up.set()
                    failed = [m.node_id for m in self.members if m.failures]
                    self.report(
                        {
                            "event": "up",
                            "nodes": len(self.members) - len(failed),
                            "failed": failed,
                            "seconds": round(time.monotonic() - started, 2),
                        }
                    )
                await self._stop.wait()
        finally:
            await self.sandbox.close()
            for close in self._closers.values():
                await asyncio.to_thread(close)
        return self.counters()

    async def _settle(self, phase: list[Member]) -> None:
        """Until each member of ``phase`` runs (or has failed once: reported, not waited for)."""
        waiting = [self._running(m, once=True) for m in phase]
        if waiting:
            await _unless(self._stop, asyncio.gather(*waiting), UP_TIMEOUT_S)

    async def wait_running(self, nid: str) -> Node:
        """The node ``nid`` once it runs: connected, and a trust module past its start-up checks."""
        member = next((m for m in self.members if m.node_id == nid), None)
        if member is None:
            raise ConfigError(f"{nid} is not in this fleet")
        node = await self._running(member, once=False)
        if node is None:
            raise TrustpayError(f"{nid} is not running: {member.failures[-1:] or 'stopped'}")
        return node

    async def _running(self, member: Member, once: bool) -> Node | None:
        for _ in range(MAX_RESTARTS + 2):  # one turn per incarnation at most
            node = member.node
            if member.stopped or (once and member.failures):
                return None
            if node is not None:
                ready = [node.connected]
                started = getattr(node, "started", None)
                if isinstance(started, asyncio.Event):
                    ready.append(started)
                pending = [e for e in ready if not e.is_set()]
                if not pending:
                    return node
                member.changed.clear()
                await _first(pending[0].wait(), member.changed.wait())
            else:
                member.changed.clear()
                await member.changed.wait()
        return None

    async def _keep(self, member: Member) -> None:
        """Run one node; when it fails, report it and start it again after a jittered backoff."""
        delay = RESTART_INITIAL_S
        for _ in range(MAX_RESTARTS + 1):
            if member.stopped:
                return
            try:
                if member.node is None:
                    member.node = self._make(member)
                    member.changed.set()
                await member.node.run()
                if member.stopped:
                    return
                why = "stopped by itself"
            except asyncio.CancelledError:
                raise
            except TrustpayError as exc:
                why = f"{exc.code}: {exc.reason}"
            except Exception as exc:  # a bug in one node must not end the others
                why = f"crashed: {exc!r}"
            member.failures.append(why)
            if member.node is not None:
                self._retired.update(member.node.counters)
                member.node = None  # the next incarnation is a fresh node
            member.changed.set()
            if member.stopped:
                return
            member.restarts += 1
            wait = jittered(delay)
            self.report(
                {"event": "failed", "node": member.node_id, "reason": why, "retry_in_s": round(wait, 2)}
            )
            await _unless(self._stop, asyncio.sleep(wait), None)  # a backoff timer, not synchronisation
            delay = min(delay * 2, RESTART_MAX_S)
        self.report({"event": "gave_up", "node": member.node_id, "failures": len(member.failures)})


async def _unless(stop: asyncio.Event, work: Any, timeout_s: float | None) -> None:
    """Wait for ``work`` (an awaitable) unless ``stop`` is set first or ``timeout_s`` passes."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _first(*waits: Any) -> None:
    """Return once the first of ``waits`` (coroutines) is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _role_of(manifest: Manifest, nid: str) -> Role:
    from nodes.deployment import parse_node_id

    if nid in manifest.servers.values():
        for role_value, server_id in manifest.servers.items():
            if server_id == nid:
                return role_from_name(role_value)
    return parse_node_id(nid)[0]


def fleet_node_ids(
    manifest: Manifest, devices: int | None, roles: Sequence[Role], replica: int = 1
) -> list[str]:
    """The node ids of ``roles`` for the first ``devices`` devices (all when None), servers first.

    ``replica``: which replica of each server role (1: the one named after the role).
    """
    chosen = manifest.devices if devices is None else manifest.devices[:devices]
    if devices is not None and devices > len(manifest.devices):
        raise ConfigError(f"--devices {devices}: the deployment has {len(manifest.devices)} devices")
    if not 1 <= replica <= manifest.replicas:
        raise ConfigError(f"--replica {replica}: the deployment has {manifest.replicas} per server")
    ids = [manifest.server_ids(r)[replica - 1] for r in SERVER_ROLES if r in roles]
    for role in (Role.CHIP, Role.TRUST_MODULE):
        if role in roles:
            ids += [d.node(role) for d in chosen]
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    parser.add_argument("--devices", type=int, metavar="N", help="the first N devices (default: all)")
    parser.add_argument(
        "--roles",
        default="chip,trust-module",
        help="comma-separated roles to host: chip, trust-module, trust-server, payment-server "
        "(default: chip,trust-module, every device node but the client)",
    )
    parser.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883 (default: the manifest's)")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="console log level (each node's JSON log file gets everything)",
    )
    add_replica_arguments(parser)
    add_json_argument(parser, "one JSON object per line for each event (up, failed, counters, stopped)")
    add_examples(
        parser,
        "trustpay fleet --deploy deploy --devices 1000      # 2,000 device nodes in this process",
        "trustpay fleet --roles trust-server,payment-server  # both servers in one process",
    )


def _emitter(as_json: bool) -> Report:
    def emit(event: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(event), flush=True)
            return
        kind = event.pop("event")
        if kind == "counters" or kind == "stopped":
            counters = event.pop("counters", {})
            sent = sum(v for k, v in counters.items() if k.startswith("out."))
            event["frames_sent"] = sent
        print(f"{kind:<8} " + " ".join(f"{k}={v}" for k, v in event.items()), flush=True)

    return emit


def run(args: argparse.Namespace) -> int:
    roles = [role_from_name(word.strip()) for word in args.roles.split(",") if word.strip()]
    for role in roles:
        if role not in (*SERVER_ROLES, *DEVICE_ROLES) or role is Role.CLIENT:
            raise ConfigError(f"a fleet does not run {role.value}s (the client runs from `trustpay client`)")
    dep = Deployment(args.deploy.resolve())
    manifest = dep.load_manifest()
    ids = fleet_node_ids(manifest, args.devices, roles, args.replica)
    if not ids:
        raise ConfigError("no nodes to run: check --roles and --devices")
    profile = os.environ.get(PROFILE_ENV)
    if not profile:
        return asyncio.run(_run(dep, manifest, ids, args))
    import cProfile

    # the event loop's thread, in CPU time: where a fleet's CPU goes (``trustpay bench --profile``)
    profiler = cProfile.Profile(time.process_time)
    try:
        return profiler.runcall(asyncio.run, _run(dep, manifest, ids, args))
    finally:
        profiler.dump_stats(f"{profile}.{'-'.join(r.value for r in roles)}.prof")


async def _run(dep: Deployment, manifest: Manifest, ids: list[str], args: argparse.Namespace) -> int:
    emit = _emitter(args.json)
    fleet = Fleet(
        dep,
        ids,
        args.broker,
        manifest=manifest,
        console=sys.stderr,
        console_level=args.log_level,
        report=emit,
        settings=Settings(replicas=args.replicas, shared=not args.partition) if args.replicas > 1 else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # one handler for the whole process, stopping every node
        loop.add_signal_handler(sig, fleet.stop)
    # SIGUSR1: the counters so far, as one line (``trustpay bench`` reads them before and after a run)
    loop.add_signal_handler(signal.SIGUSR1, lambda: emit({"event": "counters", "counters": fleet.counters()}))
    try:
        counters = await fleet.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
    emit({"event": "stopped", "nodes": len(ids), "counters": dict(sorted(counters.items()))})
    return 0
