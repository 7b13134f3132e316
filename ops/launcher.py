"""Run a whole deployment as real processes and know, from signed status messages, when it is up.

``async with Launcher(dep) as up`` starts the deployment's broker (unless a
broker URL is given), subscribes to every node's retained status as the
``monitor`` login, then starts each node as ``python -m ops.cli node ROLE``:
the two servers, then every device's chip, then every trust module (the trust
module asks its chip for its apps at start-up, the chip needs nothing). Each
phase waits for the previous one to be online. A node is *up* only when its
signed "online" status arrives, verified against the deployment's certificates
and newer than its process (a retained status from an earlier run means nothing).

Nothing is restarted behind anyone's back (:class:`ops.supervise.Supervisor`
does that for ``trustpay up``): an exit is recorded as a :class:`NodeExit` with
the tail of the node's log and console output, and counted as unexpected unless
the launcher itself sent the signal. Leaving the block stops the device nodes,
then the servers (SIGTERM, bounded wait, SIGKILL for stragglers), then the
broker it started, also when the block failed. Every child (the broker too)
runs behind :func:`ops.parent_death.guarded`: if this process dies without
leaving the block (SIGKILL), the kernel kills them.

With ``fleet=True`` the device nodes run in two processes (``trustpay fleet``:
every chip in one, every trust module in the other), each node still its own MQTT
client with its own identity; a fleet restarts its own failing nodes, and
stopping or restarting one of its nodes from here stops or restarts its fleet.

Nodes stay in the caller's process group, so a terminal's Ctrl-C reaches them
(and the broker) directly as well; the ordered stop then only mops up. Each
node's stdout and stderr go to ``logs/{node_id}.stderr`` next to its JSON log.

    async with Launcher(dep, devices=1) as up:
        await up.wait_all_up()
        await up.kill("payment-server", signal.SIGKILL)
        await up.restart("payment-server")  # returns once its new "online" arrived
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiomqtt

from broker import Broker
from nodes.assemble import broker_address
from nodes.bus import BrokerAddress
from nodes.deployment import Deployment, Manifest
from protocol.envelope import Verifier
from protocol.errors import ConfigError, TrustpayError
from protocol.messages import Status
from protocol.topics import SERVER_ROLES, STATUS_FILTERS, Role, server_replica

from .broker_cmd import broker_for
from .parent_death import guarded
from .watch import monitor_client, public_verifier

TAIL_LINES = 12
_TAIL_BYTES = 64 * 1024  # enough for TAIL_LINES lines; a long run's log is never read whole
_SUBSCRIBE_TIMEOUT_S = 15.0
_MONITOR_CONNECTS = 1000  # bounds the reconnect loop over a long run
_MONITOR_FAILURES = 20  # consecutive failed connects before the monitor gives up
_KILL_WAIT_S = 5.0  # after SIGKILL, which cannot be ignored
_MIN_GRACE_S = 5.0  # a clean stop takes up to 2 s to flush events plus 2 s to say "offline"
# amqtt never answers an MQTT 5 CONNECT: while the version is unknown, give up on one quickly
_PROBE_TIMEOUT_S = 2.0
_MQTT_TIMEOUT_S = 10.0  # aiomqtt's default, once the version is known


# paho logs a broker going away ("failed to receive on socket") to the console; the monitor
# keeps its last error in Launcher.monitor_error instead
_QUIET = logging.getLogger("trustpay.launcher.monitor")
_QUIET.setLevel(logging.CRITICAL)


class LaunchError(TrustpayError):
    """Some nodes did not come up (or died); ``report`` has their log tails."""

    code = "launch"

    def __init__(self, reason: str, report: str = "") -> None:
        super().__init__(reason)
        self.report = report


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class NodeExit:
    node_id: str
    pid: int
    returncode: int
    deliberate: bool  # the launcher sent the signal (kill, restart, shutdown)
    uptime_s: float
    tail: str

    @property
    def how(self) -> str:
        rc = self.returncode
        if rc < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def describe(self) -> str:
        head = f"{self.node_id} (pid {self.pid}) exited after {self.uptime_s:.1f} s: {self.how}"
        return f"{head}\n{self.tail}" if self.tail else head


@dataclass(eq=False)
class NodeProcess:
    """One incarnation of one node's process."""

    node_id: str
    role: Role
    device: str | None
    incarnation: int = 1
    proc: asyncio.subprocess.Process | None = None  # None until started
    started_ms: int = 0  # wall clock at spawn: statuses stamped before it are stale
    started_at: float = 0.0  # loop time at spawn
    up_at: float | None = None  # loop time its "online" arrived
    exit: NodeExit | None = None
    deliberate: bool = False  # set before the launcher signals it
    offsets: tuple[int, int] = (0, 0)  # sizes of its log and console file at spawn
    online: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def is_up(self) -> bool:
        return self.online.is_set() and self.exit is None

    @property
    def up_after_s(self) -> float | None:
        return None if self.up_at is None else self.up_at - self.started_at


def console_path(dep: Deployment, node_id: str) -> Path:
    """Where a launched node's stdout and stderr go (its JSON log is ``dep.log_path``)."""
    return dep.logs_dir / f"{node_id}.stderr"


class Launcher:
    """A deployment's broker and nodes as processes; see the module docstring."""

    def __init__(
        self,
        dep: Deployment,
        devices: int | None = None,
        broker_url: str | None = None,
        backend: str | None = None,
        *,
        up_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        log_level: str = "info",
        metrics_port: int | None = None,
        clock_offsets: Mapping[str, int] | None = None,
        on_up: Callable[[NodeProcess], None] | None = None,
        on_exit: Callable[[NodeExit], None] | None = None,
        fleet: bool = False,
        replicas: int = 1,
        db: str | None = None,
    ) -> None:
        if broker_url and backend:
            raise ConfigError("--backend chooses the broker to start; with --broker none is started")
        self.dep = dep
        self.devices = devices
        self.backend = backend
        self.up_timeout_s = up_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_level = log_level
        self.metrics_port = metrics_port  # the trust-server's; the payment-server's is the next one
        self.clock_offsets = dict(clock_offsets or {})  # device -> ms its chip and trust module are off
        self.on_up, self.on_exit = on_up, on_exit
        # fleet mode: every chip in one process and every trust module in another (ops.fleet), each
        # node still its own MQTT client and identity; a device node's process is then its fleet's
        self.fleet = fleet
        self.replicas = replicas  # of each server role, each its own process and identity
        self.db = db  # the servers' database instead of the manifest's (`trustpay node --db`)
        self._servers: list[str] = []  # server node ids in start order (metrics ports follow it)
        self._partition = False  # replicas split by device: the broker has no shared subscriptions
        self._fleets: dict[Role, NodeProcess] = {}  # the incarnation that started each fleet process
        self._device_count = 0
        self._online_ms: dict[str, int] = {}  # each node's latest verified "online" stamp
        self.broker: Broker | None = None  # set only when this launcher started it
        self.broker_url = broker_url or ""
        self.processes: dict[str, NodeProcess] = {}  # current incarnation of each node, in start order
        self.unexpected_exits: list[NodeExit] = []
        self.rejected: Counter[str] = Counter()  # status frames that failed verification, by code
        self.stale = 0  # verified statuses older than the process they name
        self.monitor_error = ""
        self._phases: list[list[str]] = []
        self._verifier: Verifier | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._launch_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set on every online, exit or monitor change
        self._subscribed = False
        self.mqtt_version = ""  # what the monitor connected with
        self._monitor_gone = False
        self._stopping = False
        self._started_at = 0.0
        self._deadline = 0.0

    # -- entering and leaving ------------------------------------------------
    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._deadline = self._started_at + self.up_timeout_s
        manifest = await asyncio.to_thread(self.dep.load_manifest)
        self._plan(manifest)
        self._verifier = await asyncio.to_thread(public_verifier, self.dep)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            if not self.broker_url:
                self.broker = await asyncio.to_thread(broker_for, self.dep, self.backend)
                self.broker.wrap_argv = guarded
                await self.broker.start()
                # tell the nodes the version too: the manifest's backend may not be the one running
                self.broker_url = f"{self.broker.url}?v={self.broker.mqtt_version}"
            address = await asyncio.to_thread(broker_address, self.dep, "monitor", self.broker_url)
            self._monitor_task = self._tg.create_task(self._monitor(address), name="launcher:monitor")
            await self._wait_subscribed()
            # a node left to find the version itself waits out a 10 s timeout on amqtt (v5 hangs)
            self.broker_url = _with_version(self.broker_url, self.mqtt_version)
            self._launch_task = self._tg.create_task(self._launch(), name="launcher:launch")
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown(et, exc, tb)

    def _plan(self, manifest: Manifest) -> None:
        count = len(manifest.devices) if self.devices is None else self.devices
        if not 0 <= count <= len(manifest.devices):
            raise ConfigError(f"--devices {count}: this deployment has {len(manifest.devices)} devices")
        devices = manifest.devices[:count]
        self._device_count = count
        unknown = sorted(set(self.clock_offsets) - {d.device for d in devices})
        if unknown:
            raise ConfigError(f"--clock-offset names devices this run does not start: {', '.join(unknown)}")
        if self.fleet and self.clock_offsets:
            raise ConfigError("--clock-offset sets one device's nodes apart: it needs --fleet off")
        self._check_replicas(manifest)
        servers: list[tuple[Role, str | None, str]] = [
            (r, None, nid) for r in SERVER_ROLES for nid in manifest.server_ids(r)[: self.replicas]
        ]
        self._servers = [nid for _, _, nid in servers]
        phases: list[list[tuple[Role, str | None, str]]] = [
            servers,
            [(Role.CHIP, d.device, d.node(Role.CHIP)) for d in devices],
            [(Role.TRUST_MODULE, d.device, d.node(Role.TRUST_MODULE)) for d in devices],
        ]
        for phase in phases:
            for role, device, nid in phase:
                self.processes[nid] = NodeProcess(nid, role, device)
        self._phases = [[nid for _, _, nid in phase] for phase in phases if phase]

    def _check_replicas(self, manifest: Manifest) -> None:
        if not 1 <= self.replicas <= manifest.replicas:
            raise ConfigError(
                f"--replicas {self.replicas}: this deployment has {manifest.replicas} identities per "
                f"server; provision it with `trustpay provision --replicas {max(self.replicas, 1)}`"
            )
        # amqtt 0.12.1 and NATS 2.9 accept a $share subscription and deliver nothing on it: there
        # the replicas split the devices between them (Settings.shared)
        self._partition = (self.backend or manifest.broker.backend) != "mosquitto"

    @property
    def servers(self) -> tuple[str, ...]:
        """The server node ids this launcher runs: each role's replicas, in start order."""
        return tuple(self._servers)

    def metrics_port_of(self, node_id: str) -> int | None:
        """Where a server serves Prometheus: ``metrics_port`` + its place among the servers.

        One replica each: the trust-server on P, the payment-server on P+1, as before.
        """
        if self.metrics_port is None or node_id not in self._servers:
            return None
        return self.metrics_port + self._servers.index(node_id)

    # -- waiting -------------------------------------------------------------
    async def wait_all_up(self, timeout_s: float | None = None) -> float:
        """Seconds from launch until the last node came up; LaunchError if some did not."""
        await self._wait_for(list(self.processes), timeout_s)
        return max((p.up_at or 0.0) for p in self.processes.values()) - self._started_at

    async def wait_online(self, node_id: str, timeout_s: float | None = None) -> NodeProcess:
        """The current incarnation of ``node_id`` once its "online" arrived."""
        await self._wait_for([node_id], timeout_s)
        return self.processes[node_id]

    async def wait_exit(self, node_id: str, timeout_s: float | None = None) -> NodeExit:
        """The exit of the current incarnation of ``node_id`` (as recorded, with its tails)."""
        node = self._node(node_id)
        async with asyncio.timeout(timeout_s or self.stop_timeout_s):
            await node.exited.wait()
        assert node.exit is not None
        return node.exit

    async def wait_failure(self) -> str:
        """Block until a node exits unexpectedly or the status monitor is lost; say which."""
        while True:  # each turn waits for a change; bounded by the caller (a signal or a timeout)
            if self.unexpected_exits:
                return self.unexpected_exits[0].describe()
            if self._monitor_gone:
                return self._broker_lost()
            self._changed.clear()
            await self._changed.wait()

    async def wait_broker_lost(self) -> str:
        """Block until the status monitor gave up on the broker; say why."""
        while not self._monitor_gone:  # each turn waits for a change; bounded by the caller
            self._changed.clear()
            await self._changed.wait()
        return self._broker_lost()

    def _broker_lost(self) -> str:
        return f"lost the broker: {self.monitor_error}"

    async def _wait_for(self, node_ids: Sequence[str], timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        await self._settle(node_ids, self._deadline if timeout_s is None else loop.time() + timeout_s)
        missing = [n for n in (self._node(nid) for nid in node_ids) if not n.is_up]
        if not missing and not self._monitor_gone:
            return
        lines = [f"{n.node_id}: {self._state(n)}" for n in missing]
        if self._monitor_gone:
            lines.insert(0, f"status monitor lost the broker: {self.monitor_error}")
        running = [n for n in missing if n.proc is not None and n.exit is None]
        tails = [n.exit.tail for n in missing if n.exit is not None and n.exit.tail]
        tails += await asyncio.to_thread(self._tails, running)
        names = ", ".join(n.node_id for n in missing) or "(status unknown)"
        raise LaunchError(f"not up: {names}", "\n".join([*lines, *tails]))

    async def _settle(self, node_ids: Sequence[str], deadline: float) -> None:
        """Return when all are up, one of them exited, the monitor is gone, or at the deadline."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                while True:  # each turn waits for a change; bounded by the deadline
                    nodes = [self._node(n) for n in node_ids]
                    if self._monitor_gone or any(n.exit for n in nodes) or all(n.is_up for n in nodes):
                        return
                    self._changed.clear()
                    await self._changed.wait()

    def _state(self, node: NodeProcess) -> str:
        if node.proc is None:
            return "never started (an earlier node did not come up)"
        if node.exit is not None:
            return node.exit.how
        return f"running (pid {node.pid}) but no signed 'online' status yet"

    def _node(self, node_id: str) -> NodeProcess:
        try:
            return self.processes[node_id]
        except KeyError:
            raise ConfigError(f"{node_id} is not a node this launcher runs") from None

    # -- starting ------------------------------------------------------------
    async def _launch(self) -> None:
        for phase in self._phases:
            for nid in phase:
                try:
                    await self._spawn(self.processes[nid])
                except OSError as exc:  # recorded as an exit so every waiter sees it
                    self._record(self.processes[nid], NodeExit(nid, 0, 127, False, 0.0, f"spawn: {exc}"))
                    return
            await self._settle(phase, self._deadline)
            if not all(self.processes[nid].is_up for nid in phase):
                return  # later phases stay unstarted; the waiters report why

    async def _spawn(self, node: NodeProcess) -> None:
        assert self._tg is not None
        if self.fleet and node.device is not None:
            host = self._fleets.get(node.role)
            if host is not None and host.running:  # its fleet runs (it restarts its own nodes): join it
                node.proc, node.started_ms, node.started_at = host.proc, host.started_ms, host.started_at
                node.offsets = host.offsets
                self._tg.create_task(self._watch(node), name=f"launcher:watch:{node.node_id}")
                if self._online_ms.get(node.node_id, 0) >= node.started_ms:  # said so before we asked
                    self._came_up(node)
                return
            self._fleets[node.role] = node
            argv = [sys.executable, "-m", "ops.cli", "fleet", "--deploy", str(self.dep.root)]
            argv += ["--roles", node.role.value, "--devices", str(self._device_count)]
            argv += ["--broker", self.broker_url, "--log-level", self.log_level]
            await self._exec(node, argv, f"fleet-{node.role.value}")
            return
        argv = [sys.executable, "-m", "ops.cli", "node", node.role.value, "--deploy", str(self.dep.root)]
        argv += ["--broker", self.broker_url, "--log-level", self.log_level]
        if node.device is not None:
            argv += ["--device", node.device]
        port = self.metrics_port_of(node.node_id)
        if port is not None:
            argv += ["--metrics-port", str(port)]
        if self.db is not None and node.device is None:
            argv += ["--db", self.db]
        replica = server_replica(node.node_id) if node.device is None else None
        if replica is not None and self.replicas > 1:
            argv += ["--replica", str(replica[1]), "--replicas", str(self.replicas)]
            if self._partition:
                argv.append("--partition")
        skew = self.clock_offsets.get(node.device, 0) if node.device is not None else 0
        if skew:
            argv += ["--clock-offset-ms", str(skew)]
        await self._exec(node, argv, node.node_id, skew)

    async def _exec(self, node: NodeProcess, argv: list[str], console: str, skew: int = 0) -> None:
        assert self._tg is not None
        node.offsets, out = await asyncio.to_thread(self._open_console, node, console)
        # by the node's own clock, which stamps its statuses
        node.started_ms, node.started_at = now_ms() + skew, asyncio.get_running_loop().time()
        try:
            # same session and process group: a terminal's Ctrl-C reaches the nodes too
            node.proc = await asyncio.create_subprocess_exec(
                *guarded(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=False,
            )
        finally:
            out.close()  # the child holds its own descriptor
        self._tg.create_task(self._watch(node), name=f"launcher:watch:{node.node_id}")

    def _open_console(self, node: NodeProcess, console: str) -> tuple[tuple[int, int], IO[bytes]]:
        path = console_path(self.dep, console)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = self.dep.log_path(node.node_id)
        log_size = log.stat().st_size if log.exists() else 0
        out = path.open("ab")
        return (log_size, out.tell()), out

    async def _watch(self, node: NodeProcess) -> None:
        assert node.proc is not None
        rc = await node.proc.wait()
        deliberate = node.deliberate or self._stopping
        tail = "" if deliberate else await asyncio.to_thread(self._tail, node)
        uptime = asyncio.get_running_loop().time() - node.started_at
        self._record(node, NodeExit(node.node_id, node.proc.pid, rc, deliberate, uptime, tail))

    def _record(self, node: NodeProcess, exit_: NodeExit) -> None:
        node.exit = exit_
        if not exit_.deliberate:
            self.unexpected_exits.append(exit_)
        node.exited.set()
        self._changed.set()
        if self.on_exit is not None:
            self.on_exit(exit_)

    # -- status monitor --------------------------------------------------------
    async def _wait_subscribed(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SUBSCRIBE_TIMEOUT_S):
                while not (self._subscribed or self._monitor_gone):  # bounded by the timeout
                    self._changed.clear()
                    await self._changed.wait()
        if not self._subscribed:
            raise LaunchError(f"cannot watch node status at {self.broker_url}: {self.monitor_error}")

    async def _monitor(self, address: BrokerAddress) -> None:
        versions = ("5", "3.1.1") if address.mqtt_version == "auto" else (address.mqtt_version,)
        timeout = _PROBE_TIMEOUT_S if len(versions) > 1 else _MQTT_TIMEOUT_S
        failures = 0
        for attempt in range(_MONITOR_CONNECTS):
            version = versions[failures % len(versions)]
            member = address.at(attempt)  # a clustered broker: each try on the next member
            try:
                async with monitor_client(member, version, "monitor-up", timeout, _QUIET) as client:
                    for topic_filter in STATUS_FILTERS:
                        await client.subscribe(topic_filter, qos=1)
                    versions, timeout, failures = (version,), _MQTT_TIMEOUT_S, 0  # keep what worked
                    self.mqtt_version, self._subscribed = version, True
                    self._changed.set()
                    async for message in client.messages:
                        self._on_status(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                failures += 1
                self.monitor_error = str(exc)
            if failures >= _MONITOR_FAILURES:
                break
            await asyncio.sleep(min(0.05 * 2**failures, 2.0))  # reconnect backoff, not synchronisation
        self._monitor_gone = True
        self._changed.set()

    def _on_status(self, topic: str, payload: object) -> None:
        assert self._verifier is not None
        if not isinstance(payload, (bytes, bytearray)):
            self.rejected["not_bytes"] += 1
            return
        try:
            env = self._verifier.open(bytes(payload), topic, now_ms()).envelope
        except TrustpayError as exc:
            self.rejected[exc.code] += 1
            return
        status = env.body
        if env.type != "status" or not isinstance(status, Status) or status.node != env.sender:
            self.rejected["not_status"] += 1
            return
        if status.state == "online":
            self._online_ms[status.node] = max(self._online_ms.get(status.node, 0), status.at_ms)
        node = self.processes.get(status.node)
        if node is None or node.proc is None:
            return  # a client, or a node we did not start
        if status.at_ms < node.started_ms:
            self.stale += 1  # retained from an earlier run or incarnation (or its last will)
            return
        if status.state == "online" and not node.online.is_set():
            self._came_up(node)

    def _came_up(self, node: NodeProcess) -> None:
        node.up_at = asyncio.get_running_loop().time()
        node.online.set()
        self._changed.set()
        if self.on_up is not None:
            self.on_up(node)

    # -- deliberate kills and restarts ----------------------------------------
    async def kill(self, node_id: str, sig: int = signal.SIGKILL) -> NodeExit:
        """Send ``sig`` to a node and wait (bounded) for its exit; not counted as unexpected."""
        node = self._node(node_id)
        if not node.running or node.proc is None:
            raise LaunchError(f"{node_id} is not running")
        node.deliberate = True
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(sig)
        return await self.wait_exit(node_id)

    async def restart(self, node_id: str, timeout_s: float | None = None) -> NodeProcess:
        """Stop ``node_id`` if it runs (SIGTERM, then SIGKILL), start it again, wait for "online"."""
        old = self._node(node_id)
        if self._stopping:
            raise LaunchError("the launcher is stopping")
        if old.running:
            await self._stop_nodes([old], asyncio.get_running_loop().time() + self.stop_timeout_s)
        new = NodeProcess(node_id, old.role, old.device, old.incarnation + 1)
        self.processes[node_id] = new
        await self._spawn(new)
        return await self.wait_online(node_id, timeout_s or self.up_timeout_s)

    async def stop_node(self, node_id: str) -> None:
        """Stop the current incarnation of ``node_id`` if it runs (SIGTERM, then SIGKILL)."""
        deadline = asyncio.get_running_loop().time() + self.stop_timeout_s
        await self._stop_nodes([self._node(node_id)], deadline)

    # -- stopping --------------------------------------------------------------
    async def _shutdown(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping = True
        try:
            try:
                if self._launch_task is not None:
                    self._launch_task.cancel()
                nodes = list(self.processes.values())
                # one budget for both groups: after a terminal's Ctrl-C every node is already
                # stopping, and a node that hangs should cost stop_timeout_s once, not twice
                deadline = asyncio.get_running_loop().time() + self.stop_timeout_s
                await self._stop_nodes([n for n in nodes if n.device is not None], deadline)
                await self._stop_nodes([n for n in nodes if n.device is None], deadline)
            finally:
                for node in self.processes.values():  # only if stopping itself failed or was cancelled
                    if node.running and node.proc is not None:
                        with contextlib.suppress(ProcessLookupError):
                            node.proc.kill()
                if self._monitor_task is not None:
                    self._monitor_task.cancel()
                if self._tg is not None:
                    tg, self._tg = self._tg, None
                    # only a cancellation is the task group's business: handed any other error,
                    # it would wrap the caller's exception in an ExceptionGroup
                    if et is not None and issubclass(et, asyncio.CancelledError):
                        await tg.__aexit__(et, exc, tb)
                    else:
                        await tg.__aexit__(None, None, None)
        finally:
            if self.broker is not None:
                await self.broker.stop()

    async def _stop_nodes(self, nodes: Sequence[NodeProcess], deadline: float) -> None:
        """SIGTERM all at once, wait until ``deadline`` (at least a moment), SIGKILL whoever is left."""
        alive = [n for n in nodes if n.running]
        for node in alive:
            node.deliberate = True
            assert node.proc is not None
            with contextlib.suppress(ProcessLookupError):
                node.proc.terminate()
        grace = max(deadline - asyncio.get_running_loop().time(), _MIN_GRACE_S)
        if not await _wait_procs(alive, grace):
            for node in alive:
                if node.running and node.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        node.proc.kill()
            await _wait_procs(alive, _KILL_WAIT_S)

    # -- reading what a node left behind ---------------------------------------
    def _tails(self, nodes: Sequence[NodeProcess]) -> list[str]:
        return [self._tail(n) for n in nodes]

    def _console_of(self, node: NodeProcess) -> str:
        return f"fleet-{node.role.value}" if self.fleet and node.device is not None else node.node_id

    def _tail(self, node: NodeProcess) -> str:
        """The end of what this incarnation wrote to its JSON log and its console (blocking I/O)."""
        log_off, out_off = node.offsets
        parts = []
        for label, path, offset, pretty in (
            ("log", self.dep.log_path(node.node_id), log_off, True),
            ("stderr", console_path(self.dep, self._console_of(node)), out_off, False),
        ):
            lines = _read_tail(path, offset)
            shown = [_pretty(line) if pretty else line for line in lines] or ["(nothing)"]
            parts.append(f"  --- {label} of {node.node_id}: {path}\n" + "\n".join(f"  {s}" for s in shown))
        return "\n".join(parts)


def _with_version(url: str, version: str) -> str:
    """``url`` with ``?v=version`` unless it names a version already."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    query = parse_qs(parts.query)
    if "v" in query or not version:
        return url
    return urlunsplit(parts._replace(query=urlencode({**query, "v": version}, doseq=True)))


async def _wait_procs(nodes: Sequence[NodeProcess], timeout_s: float) -> bool:
    """True if every process exited within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            for node in nodes:
                if node.proc is not None:
                    await node.proc.wait()
    except TimeoutError:
        return False
    return True


def _read_tail(path: Path, offset: int, lines: int = TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(offset, size - _TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def _pretty(line: str) -> str:
    """A JSON log line as ``level event key=value ...``; anything else as it is."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    head = f"{event.pop('level', '?'):<7} {event.pop('event', '?')}"
    for key in ("ts", "node", "role", "device"):
        event.pop(key, None)
    return " ".join([head, *(f"{k}={v}" for k, v in event.items())])
