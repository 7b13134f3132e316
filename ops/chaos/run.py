"""``trustpay chaos run``: a whole deployment behind the fault proxy, payments through it, then the proof.

One run, in order:

1. provision a fresh deployment (``--devices``) in the run's directory and start
   its broker; the fault proxy in front of it (and a fault-free one in front of
   the monitor listener, through which the run watches the signed step events);
2. ``trustpay up --broker PROXY`` starts every node, as an operator would (so
   its supervisor restarts what a scenario kills); the run waits until every
   device finished its start-up checks (A);
3. the *storm*: the scenario's link faults are switched on, its action plays
   out (:mod:`ops.chaos.actions`), and every device pays (``--payments`` in
   all, one client process after another per device, devices in parallel),
   each client's printed result kept as that client's record;
4. the faults are switched off; every payment whose outcome a client did not
   know is looked up the way its user would (``trustpay client history``,
   which also makes the chip send again any order it still holds);
5. every node is pinged, ``up`` is stopped, the logs are read, and the
   invariants (:mod:`ops.chaos.invariants`) are checked into a report
   (:mod:`ops.chaos.report`), also written to ``RUN_DIR/report.json``.

Everything is seeded (``--seed``): the amounts, payees and the proxy's draws.
Timing still varies between runs, so two runs with one seed hit different
frames; the invariants must hold for every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import Broker, free_port
from nodes.deployment import Deployment, parse_node_id
from nodes.ledger import read_snapshot
from nodes.runtime import ping
from ops.broker_cmd import broker_for
from ops.operator import operator_node
from ops.parent_death import guarded
from ops.provision import provision
from ops.scenario import ClientRun, run_client
from ops.up_process import UpRun, start_up
from ops.watch import EventWatcher
from protocol.errors import ConfigError, Refused, TrustpayError
from protocol.messages import StepEvent
from protocol.topics import MONITOR_PORT_OFFSET, SERVER_ROLES, Role, node_id, replica_ids

from .fault_log import AppliedFault, FaultLog
from .faults import Profile, profile_from
from .invariants import Attempt, Check, Evidence, Resolution, check
from .proxy import ChaosProxy
from .report import Report
from .scenarios import Scenario

ALTERING = ("corrupt", "truncate")
START_WAIT_S = 90.0  # deployment up and every device's start-up checks done
SETTLE_WAIT_S = 60.0  # for a chip to settle an order it held, once the faults stopped
MAX_AMOUNT = 2_000  # minor units: 20.00 at most, so balances never run out in a long run


@dataclass(frozen=True)
class RunOptions:
    scenario: Scenario
    run_dir: Path  # the deployment, its logs and the report go here
    seed: int = 0
    payments: int = 12
    devices: int = 3
    backend: str | None = None  # the scenario's own wins
    db: str | None = None  # the servers' database (`provision --db`); None: SQLite files


@dataclass
class ChaosRun:
    """What a run's action can reach: the deployment, its broker, the proxy, `up`, the progress."""

    opts: RunOptions
    dep: Deployment
    broker: Broker
    proxy: ChaosProxy
    proxy_url: str
    devices: list[str]
    watcher: EventWatcher
    up: UpRun | None = None
    attempts: list[Attempt] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)  # the scenario's own expectations
    attacks: list[Check] = field(default_factory=list)  # frames an attacker injected, and their fate
    killed: set[int] = field(default_factory=set)  # pids the scenario killed on purpose
    up_extra: tuple[str, ...] = ()  # more options for `trustpay up` (e.g. a device's clock)
    client_extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> client options
    notes: list[str] = field(default_factory=list)
    ups: list[UpRun] = field(default_factory=list)  # every `up` this run started, the current last
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    # one client at a time per device, as on a phone (a second one is refused: identity_in_use)
    _in_use: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    @property
    def replicas(self) -> int:
        """Replicas of each server role this run's `up` runs."""
        return self.opts.scenario.replicas

    def servers(self, role: Role) -> tuple[str, ...]:
        """The node ids of ``role``'s replicas that `up` runs, the first one first."""
        return replica_ids(role, self.replicas)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def expect(self, held: bool, text: str) -> None:
        self.checks.append(Check(held, text))

    async def wait_paid(self, count: int, timeout_s: float = 300.0) -> None:
        """Until ``count`` payments have ended (or all of them have)."""
        count = min(count, self.opts.payments)
        async with asyncio.timeout(timeout_s):
            while len(self.attempts) < count:  # each turn waits for one more payment; bounded
                self._progress.clear()
                await self._progress.wait()

    async def start_up(self) -> UpRun:
        logs = self.dep.logs_dir
        up = await start_up(
            self.dep, logs / f"up-{len(self.ups) + 1}.stderr", "--broker", self.proxy_url, *self.up_extra
        )
        self.ups.append(up)
        self.up = up
        return up

    def current_pid(self, nid: str) -> int:
        assert self.up is not None
        pid = self.up.node_pids().get(nid)
        if pid is None:
            raise ConfigError(f"`up` never said {nid} was up")
        return pid

    async def pay(self, device: str, amount: int, payee: str) -> Attempt:
        """One payment by ``device``'s user, recorded as its client reports it."""
        async with self._in_use[device]:
            began = time.monotonic()
            result = await self.client(device, "pay", f"{amount // 100}.{amount % 100:02d}", payee)
        attempt = _attempt(device, amount, payee, result, began)
        self.attempts.append(attempt)
        self._progress.set()
        return attempt

    async def client(self, device: str, *words: str) -> ClientRun | None:
        """``trustpay client --json`` on ``device`` through the proxy; None if it never ended."""
        try:
            return await run_client(
                self.dep, device, self.proxy_url, *self.client_extra.get(device, ()), *words
            )
        except TimeoutError:
            return None


Action = Callable[[ChaosRun], Coroutine[Any, Any, None]]


async def run_scenario(opts: RunOptions, actions: dict[str, Action]) -> Report:
    sc = opts.scenario
    backend = sc.backend or opts.backend
    root = opts.run_dir / "deploy"
    await asyncio.to_thread(opts.run_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(
        provision, root, opts.devices, backend=backend, force=True, db=opts.db, replicas=sc.replicas
    )
    dep = Deployment(root)
    manifest = await asyncio.to_thread(dep.load_manifest)
    if manifest.broker.tls:
        raise ConfigError("a chaos run needs a plain broker: the proxy reads MQTT packets")
    broker = await asyncio.to_thread(broker_for, dep, backend)
    broker.wrap_argv = guarded
    faults: list[AppliedFault] = []
    log = FaultLog(dep.logs_dir / "chaos-proxy.log", on_fault=faults.append)
    port = free_port()
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        await broker.start()
        stack.push_async_callback(broker.kill)
        stack.push_async_callback(broker.stop)
        stack.callback(log.close)
        proxy = await stack.enter_async_context(
            ChaosProxy(broker.host, broker.port, seed=opts.seed, listen_port=port, log=log)
        )
        # the run's own eyes: the monitor listener, forwarded without faults
        await stack.enter_async_context(
            ChaosProxy(broker.host, broker.monitor_port, listen_port=port + MONITOR_PORT_OFFSET)
        )
        url = f"mqtt://127.0.0.1:{port}?v={broker.mqtt_version}"
        watcher = await stack.enter_async_context(EventWatcher(dep, url))
        run = ChaosRun(opts, dep, broker, proxy, url, [d.device for d in manifest.devices], watcher)
        if sc.replicas > 1:
            run.up_extra += ("--replicas", str(sc.replicas))
            where = "PostgreSQL" if opts.db else "their shared SQLite files"
            run.note(f"{sc.replicas} replicas of each server, on {where}")
        action = actions[sc.action] if sc.action else None
        prepare = getattr(action, "prepare", None)
        if prepare is not None:
            prepare(run)  # options that must be given before anything starts (a device's clock)
        stack.push_async_callback(_close_ups, run)
        await run.start_up()
        await _wait_started(run)
        before = await read_snapshot(dep.database("ledger"))
        proxy.set_profile(profile_from(sc.rules, opts.seed))
        storm_started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for index, device in enumerate(run.devices):
                tg.create_task(_pay_from(run, index, device), name=f"chaos:pay:{device}")
            if action is not None:
                tg.create_task(action(run), name=f"chaos:action:{sc.action}")
        storm_s = time.monotonic() - storm_started
        proxy.set_profile(Profile())  # the faults stop here
        resolutions = await _resolve(run)
        after = await read_snapshot(dep.database("ledger"))
        pings = await _ping_all(run)
        assert run.up is not None
        await run.up.stop()
    rejected, reasons = await asyncio.to_thread(_rejections, dep)
    altered = Counter(f.topic for f in faults if f.kind in ALTERING)
    evidence = Evidence(
        attempts=tuple(run.attempts),
        before=before,
        after=after,
        resolutions=resolutions,
        altered=dict(altered),
        rejected=dict(rejected),
        attacks=tuple(run.attacks),
        unexpected_exits=tuple(_unexpected_exits(run)),
        pings=pings,
        expected_refusals=_expected(sc, run.devices),
        scenario=tuple(run.checks),
    )
    report = Report.build(
        scenario=sc.name,
        seed=opts.seed,
        devices=len(run.devices),
        backend=broker.backend,
        verdicts=check(evidence),
        evidence=evidence,
        faults=Counter(f.kind for f in faults),
        rejects=reasons,
        notes=run.notes,
        storm_s=storm_s,
        total_s=time.monotonic() - started,
        run_dir=opts.run_dir,
    )
    await asyncio.to_thread(
        (opts.run_dir / "report.json").write_text, json.dumps(report.as_json(), indent=2) + "\n"
    )
    return report


async def _close_ups(run: ChaosRun) -> None:
    for up in run.ups:
        await up.close()


async def _wait_started(run: ChaosRun) -> None:
    """Every device's start-up checks (A) ended "done" (a disabled device cannot pay)."""
    for device in run.devices:

        def started(e: StepEvent, d: str = device) -> bool:
            return e.step == "A" and e.device == d

        event = await run.watcher.wait_for(started, START_WAIT_S)
        if event.outcome != "done":
            raise ConfigError(f"{device} did not start: {event.outcome} ({event.reason})")


def _expected(sc: Scenario, devices: list[str]) -> dict[str, frozenset[str]]:
    return {devices[index]: codes for index, codes in sc.expected_refusals.items()}


# -- the payments ----------------------------------------------------------------------
def _share(run: ChaosRun, index: int) -> int:
    n, d = run.opts.payments, len(run.devices)
    return n // d + (1 if index < n % d else 0)


async def _pay_from(run: ChaosRun, index: int, device: str) -> None:
    rng = random.Random(f"{run.opts.seed}/{device}")
    manifest = await asyncio.to_thread(run.dep.load_manifest)
    merchants = [m.account for m in manifest.merchants]
    for _ in range(_share(run, index)):
        await run.pay(device, rng.randint(1, MAX_AMOUNT), rng.choice(merchants))


def _attempt(device: str, amount: int, payee: str, run: ClientRun | None, began: float) -> Attempt:
    ms = (time.monotonic() - began) * 1000
    data: dict[str, Any] = run.result if run is not None else {}
    if run is None or "status" not in data:
        code = -1 if run is None else run.code
        return Attempt(device, amount, payee, "no_answer", exit_code=code, latency_ms=ms, started_s=began)
    receipt = data.get("receipt") or {}
    return Attempt(
        device,
        amount,
        payee,
        str(data["status"]),
        str(data.get("code") or ""),
        str(data.get("order_id") or ""),
        run.code,
        ms,
        began,
        receipt.get("amount"),
        str(receipt.get("payee", "")),
    )


# -- after the storm ---------------------------------------------------------------------
async def _resolve(run: ChaosRun) -> dict[str, Resolution]:
    """Look up, as each user would, every order whose outcome its client did not know."""
    open_ = [a for a in run.attempts if a.order_id and a.status not in ("confirmed", "refused")]
    resolutions: dict[str, Resolution] = {}
    for device in sorted({a.device for a in open_}):
        orders = {a.order_id for a in open_ if a.device == device}
        held = await asyncio.to_thread(_held_by_chip, run.dep, device)
        if orders & held:
            # opening the chip makes it send again what it holds; wait for each one's final C5
            await run.client(device, "status")
            for order in orders & held:

                def settled(e: StepEvent, o: str = order) -> bool:
                    return e.order_id == o and e.step == "C5" and e.outcome in ("ok", "refused")

                with contextlib.suppress(TimeoutError):
                    await run.watcher.wait_for(settled, SETTLE_WAIT_S)
        history = await run.client(device, "history")
        listed = {
            p["order_id"]: p["status"]
            for p in (history.result.get("payments", []) if history is not None else [])
        }
        still = await asyncio.to_thread(_held_by_chip, run.dep, device)
        if history is None or history.code != 0:
            run.note(f"{device}: `client history` failed: {history.result if history else 'no answer'}")
            continue
        for order in orders:
            resolutions[order] = Resolution(device, order, listed.get(order, "absent"), order in still)
    return resolutions


def _held_by_chip(dep: Deployment, device: str) -> set[str]:
    """Orders the device's chip still holds to send again (its state file, as its operator reads it)."""
    path = dep.state_dir(node_id(Role.CHIP, device)) / "chip.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(data.get("pending", {}))


async def _ping_all(run: ChaosRun) -> dict[str, str]:
    manifest = await asyncio.to_thread(run.dep.load_manifest)
    nodes = [nid for role in SERVER_ROLES for nid in run.servers(role)]
    nodes += [d.node(role) for d in manifest.devices for role in (Role.CHIP, Role.TRUST_MODULE)]
    async with operator_node(run.dep, run.proxy_url) as op:

        async def one(nid: str) -> str:
            role, device = parse_node_id(nid)
            try:
                await ping(op, role, nid, device)
            except Refused:  # a signed refusal is an answer too (a device whose clock is off)
                return ""
            except TrustpayError as exc:
                return exc.reason
            return ""

        answers = await asyncio.gather(*(one(nid) for nid in nodes))
    return dict(zip(nodes, answers, strict=True))


def _unexpected_exits(run: ChaosRun) -> list[str]:
    return [
        f"{e['node']} (pid {e['pid']}): {e['how']}"
        for up in run.ups
        for e in up.deaths()
        if e["pid"] not in run.killed
    ]


def _rejections(dep: Deployment) -> tuple[Counter[str], Counter[str]]:
    """Frames the nodes refused, from their JSON logs: by topic, and by reason code."""
    by_topic: Counter[str] = Counter()
    by_code: Counter[str] = Counter()
    for path in sorted(dep.logs_dir.glob("*.log")):
        if path.name.startswith("chaos-"):
            continue
        with path.open(errors="replace") as lines:
            for line in lines:
                if '"frame.rejected"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    by_topic[str(event.get("topic", ""))] += 1
                    by_code[str(event.get("code", ""))] += 1
    return by_topic, by_code
