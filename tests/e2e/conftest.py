"""End-to-end fixtures: a fresh deployment per test, every node a real process on a real broker.

The ``e2e`` fixture provisions two devices in ``tmp_path`` for one broker
backend (the fixture is parametrized over both), starts everything the way
``trustpay demo`` does (:class:`ops.launcher.Launcher` plus
:class:`ops.watch.EventWatcher`), waits until every node is online and both
devices finished their start-up checks (step "A"), and hands the test an
:class:`E2E`: an :class:`ops.scenario.Scenario` with a few more tools (impersonating a
node, raw MQTT connections, reading the ledger's stored blobs, stopping early).

No sleeps anywhere: every wait is on an event (a step event, a status, an MQTT
message, a process exit) under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from nodes.assemble import broker_address, node_config
from nodes.bus import BrokerAddress, MqttBus
from nodes.deployment import Deployment
from nodes.logs import NodeLogging
from nodes.runtime import Node
from ops.launcher import Launcher, LaunchError
from ops.provision import DEFAULT_OPENING_BALANCE, provision
from ops.scenario import ClientRun, Scenario
from ops.watch import EventWatcher, monitor_client
from protocol.messages import StepEvent
from protocol.topics import Role, node_id

DEV1, DEV2 = "dev-0001", "dev-0002"
DEVICES = (DEV1, DEV2)
OPENING = DEFAULT_OPENING_BALANCE
WAIT_S = 30.0  # any single wait on the running system

HAVE_MOSQUITTO = shutil.which("mosquitto") is not None
BACKENDS = [
    pytest.param(
        "mosquitto",
        marks=[
            pytest.mark.mosquitto,
            pytest.mark.skipif(not HAVE_MOSQUITTO, reason="the mosquitto binary is not installed"),
        ],
        id="mosquitto",
    ),
    pytest.param("amqtt", id="amqtt"),
]


def tm_of(device: str) -> str:
    return node_id(Role.TRUST_MODULE, device)


def chip_of(device: str) -> str:
    return node_id(Role.CHIP, device)


def client_of(device: str) -> str:
    return node_id(Role.CLIENT, device)


@dataclass(frozen=True)
class StoredPayment:
    """One row of the ledger's payments table, with the signed blobs the Snapshot leaves out."""

    order_id: str
    device: str
    app: str
    payer: str
    payee: str
    amount: int
    status: str
    code: str
    counter: int
    order_blob: bytes
    receipt_blob: bytes


@dataclass
class Capture:
    """Every frame seen on some topic filters by a raw ``monitor`` connection."""

    frames: list[tuple[str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, topic: str) -> list[bytes]:
        return [frame for t, frame in self.frames if t == topic]

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # each turn waits for a new frame; bounded by the timeout
                self.changed.clear()
                await self.changed.wait()


@dataclass
class E2E(Scenario):
    tmp: Path = Path()
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def stop(self) -> None:
        """Stop the watcher, every node and the broker now (the fixture would at the end)."""
        await self.stack.aclose()

    # -- driving -------------------------------------------------------------------
    async def trustpay(self, command: str, *words: str) -> str:
        """``trustpay COMMAND`` on this deployment and broker, as an operator runs it; its stdout.

        Fails the test unless it exits 0.
        """
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ops.cli",
            command,
            "--deploy",
            str(self.dep.root),
            "--broker",
            self.launcher.broker_url,
            *words,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(WAIT_S):
            out, err = await proc.communicate()
        assert proc.returncode == 0, (out.decode(), err.decode())
        return out.decode()

    async def pay(self, device: str, amount: str, payee: str, *app: str) -> ClientRun:
        return await self.client(device, "pay", amount, payee, *app)

    def events(self, since: int = 0, **match: Any) -> list[StepEvent]:
        """Step events from position ``since`` whose fields equal ``match`` (device=, step=, node=...)."""
        return [e for e in self.watcher.events[since:] if all(getattr(e, k) == v for k, v in match.items())]

    async def wait_event(self, since: int = 0, timeout_s: float = WAIT_S, **match: Any) -> StepEvent:
        return await self.watcher.wait_for(
            lambda e: all(getattr(e, k) == v for k, v in match.items()), timeout_s, since=since
        )

    async def wait_events(
        self, count: int, since: int = 0, timeout_s: float = WAIT_S, **match: Any
    ) -> list[StepEvent]:
        """At least ``count`` events from ``since`` on matching ``match``, once they have all arrived."""
        await self.watcher.wait_for(lambda _: len(self.events(since, **match)) >= count, timeout_s, since)
        return self.events(since, **match)

    # -- the ledger ----------------------------------------------------------------
    def stored_payments(self) -> dict[str, StoredPayment]:
        """Every payment in the ledger, read-only (safe while the payment-server writes)."""
        uri = self.dep.ledger_db.absolute().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            rows = db.execute(
                "SELECT order_id, device, app, payer, payee, amount, status, code, counter, "
                "order_blob, receipt_blob FROM payments ORDER BY rowid"
            ).fetchall()
        return {row[0]: StoredPayment(*row) for row in rows}

    # -- impersonation and raw MQTT ------------------------------------------------------
    def address(self, nid: str) -> BrokerAddress:
        return broker_address(self.dep, nid, self.launcher.broker_url)

    @contextlib.asynccontextmanager
    async def impersonate(self, nid: str) -> AsyncIterator[Node]:
        """A bare :class:`Node` holding ``nid``'s keys, certificate and broker login.

        A login has one session, whose client id is its own (the broker refuses or
        forces any other), so the real node must not be running: stop it first.
        It runs on a copy of the real node's state directory, so its boot epoch is
        newer than any the real node used so far: its frames are fresh.
        """
        config = await asyncio.to_thread(node_config, self.dep, nid)
        copy = self.tmp / f"{nid}.impostor-state"
        await asyncio.to_thread(shutil.copytree, config.state_dir, copy, dirs_exist_ok=True)
        config = dataclasses.replace(config, state_dir=copy)
        logging = NodeLogging(nid, self.tmp / f"{nid}.impostor.log", console=None)
        bus = MqttBus(self.address(nid), nid, log=logging.logger)
        node = Node(config, bus, logging.logger)
        task = asyncio.create_task(node.run(), name=f"impostor:{nid}")
        try:
            async with asyncio.timeout(WAIT_S):
                await node.connected.wait()
            yield node
        finally:
            node.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAIT_S):
                    await task
            if not task.done():
                task.cancel()
            logging.close()

    @contextlib.asynccontextmanager
    async def raw_client(self, nid: str, client_id: str | None = None) -> AsyncIterator[aiomqtt.Client]:
        """A plain aiomqtt connection with ``nid``'s broker login and, unless given, its own client id."""
        a = self.address(nid)
        proto = aiomqtt.ProtocolVersion.V5 if a.mqtt_version == "5" else aiomqtt.ProtocolVersion.V311
        async with aiomqtt.Client(
            hostname=a.host,
            port=a.port,
            username=a.username,
            password=a.password,
            identifier=client_id or nid,
            protocol=proto,
            tls_context=a.tls,
        ) as client:
            yield client

    @contextlib.asynccontextmanager
    async def capture(self, *filters: str) -> AsyncIterator[Capture]:
        """Record every frame on ``filters`` as the read-only ``monitor`` login sees them."""
        a = self.address("monitor")
        capture = Capture()
        subscribed = asyncio.Event()

        async def read() -> None:
            async with monitor_client(a, a.mqtt_version, "e2e-capture") as client:
                for topic_filter in filters:
                    await client.subscribe(topic_filter, qos=1)
                subscribed.set()
                async for message in client.messages:
                    payload = message.payload
                    capture.frames.append((str(message.topic), bytes(payload)))
                    capture.changed.set()

        task = asyncio.create_task(read(), name="e2e-capture")
        try:
            async with asyncio.timeout(WAIT_S):
                waiter = asyncio.create_task(subscribed.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            if task.done():
                task.result()  # the connection failed: say why
            yield capture
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def assert_charged_once(confirmed: Sequence[Any], opening: dict[str, int], balances: dict[str, int]) -> None:
    """Nothing doubled: no app counter used twice, no device charged one amount twice (every
    payment of a test has its own amount), and the balances are the opening ones moved by
    exactly the ``confirmed`` payments (ledger rows), so no money appeared or vanished."""
    assert len({(p.device, p.app, p.counter) for p in confirmed}) == len(confirmed)
    charged = Counter((p.device, p.amount) for p in confirmed)
    assert all(n == 1 for n in charged.values()), charged
    expected = dict(opening)
    for p in confirmed:
        expected[p.payer] -= p.amount
        expected[p.payee] += p.amount
    assert balances == expected
    assert sum(balances.values()) == sum(opening.values())


def node_stopped_counters(dep: Deployment, nid: str) -> list[dict[str, int]]:
    """The counters of every ``node.stopped`` line in a node's JSON log, one per incarnation."""
    out = []
    for line in dep.log_path(nid).read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "node.stopped":
                out.append(dict(entry.get("counters", {})))
    return out


@contextlib.asynccontextmanager
async def running_deployment(
    tmp_path: Path,
    backend: str,
    *,
    tls: bool = False,
    clock_offsets: dict[str, int] | None = None,
    replicas: int = 1,
    db: str | None = None,
) -> AsyncIterator[E2E]:
    """Provision two devices, start everything, wait until both devices finished start-up.

    ``clock_offsets``: a device's chip and trust module run with their clock that far off (ms).
    ``replicas``: of each server (``trustpay up --replicas``); ``db``: the servers' database
    (``provision --db``), SQLite files when None.
    """
    root = tmp_path / "deploy"
    await asyncio.to_thread(provision, root, len(DEVICES), backend=backend, tls=tls, replicas=replicas, db=db)
    dep = Deployment(root)
    async with contextlib.AsyncExitStack() as stack:
        launcher = await stack.enter_async_context(
            Launcher(
                dep, backend=backend, log_level="warning", clock_offsets=clock_offsets, replicas=replicas
            )
        )
        watcher = await stack.enter_async_context(EventWatcher(dep, launcher.broker_url))
        scn = E2E(dep, launcher, watcher, tmp=tmp_path, stack=stack)
        try:
            await launcher.wait_all_up()
        except LaunchError as exc:
            pytest.fail(f"the deployment did not come up: {exc}\n{exc.report}")
        for device in DEVICES:
            started = await scn.wait_started(device)
            assert started.outcome == "done", f"{device} start-up: {started.outcome} {started.reason}"
        yield scn
        surprises = [e.describe() for e in launcher.unexpected_exits]
        assert not surprises, "nodes died during the test:\n" + "\n".join(surprises)


@pytest.fixture(params=BACKENDS)
async def e2e(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[E2E]:
    async with running_deployment(tmp_path, request.param) as scn:
        yield scn


@pytest.fixture
async def e2e_tls(tmp_path: Path) -> AsyncIterator[E2E]:
    """A deployment provisioned with --tls (mqtts, client certificates): Mosquitto only
    (mark the test like the mosquitto parameter of ``e2e``)."""
    async with running_deployment(tmp_path, "mosquitto", tls=True) as scn:
        yield scn
