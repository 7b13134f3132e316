"""``trustpay bench``: attested payments per second from many devices, beside a same-run baseline.

The deployment runs as processes, one per role, so each role's CPU can be read
from /proc: the broker, the trust-server, the payment-server, every chip in one
fleet process and every trust module in another (``ops.fleet``; each node is
still its own MQTT client with its own identity). The clients, one per device,
run in this process (their CPU is this process's): each opens its chip once
(B1) and then runs ``pay`` commands (B3) exactly as ``trustpay client`` does,
each counted only once its signed receipt is verified and matches what was
asked. ``concurrency`` payments are in flight at any moment, each on a device
not paying already.

Then, on the same broker with the nodes stopped, the baseline
(:mod:`ops.bench.baseline`): the same hops per payment, measured here, as
plain QoS 1 request/response, with the same concurrency.

Messages per payment come from the nodes' own counters (``out.*``), read
before and after the measured window (SIGUSR1 to a fleet: no extra subscriber
loads the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from nodes.assemble import assemble
from nodes.client import Client
from nodes.deployment import Deployment, Manifest, load_json
from protocol.errors import TrustpayError
from protocol.messages import Empty
from protocol.topics import Role, node_id

from ..parent_death import guarded
from .baseline import Lane, Login, baseline
from .cpu import CpuMeter, rss_kib

UP_TIMEOUT_S = 60.0
# messages that are not part of a payment's hops: said apart, never counted as its link frames
NOT_LINK = ("event", "events", "metrics", "status", "pong", "ping")


class BenchError(TrustpayError):
    code = "bench"


@dataclass
class FleetProcess:
    """One ``trustpay fleet`` process of the run, and the JSON lines it printed."""

    name: str
    proc: asyncio.subprocess.Process
    up: asyncio.Event = field(default_factory=asyncio.Event)
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    failures: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "up":
                self.up.set()
            elif kind in ("failed", "gave_up"):
                self.failures.append(event)
            elif kind == "stopped":
                self.final = event
            elif kind == "counters":
                self.lines.put_nowait(event)

    async def counters(self) -> Counter[str]:
        """The fleet's counters now (it answers SIGUSR1 with one line)."""
        self.proc.send_signal(signal.SIGUSR1)
        async with asyncio.timeout(30):
            event = await self.lines.get()
        return Counter(event["counters"])


class _BenchClient(Client):
    """A device's client held open: B1 once, then the bench's ``pay`` commands, B4 at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = asyncio.Event()

    async def session(self) -> int:
        static = await asyncio.to_thread(self.dep.read_client_data, self.device or "", "static")
        self._static_bytes = static
        self.static = load_json(static, "client static data")
        await self.request(
            self.link(Role.CHIP), "chip.open", Empty(), recipient=self.chip_id, expect="chip.state"
        )
        self.step("B", "B1", "ok", "payment chip opened")
        self.opened.set()
        await self._stop.wait()
        return 0

    async def pay_once(self, amount: str, payee: str) -> tuple[int, str]:
        """One ``pay`` command, as typed by the user; its exit code and what it printed."""
        assert isinstance(self.out, io.StringIO)
        self.out.seek(0)
        self.out.truncate()
        code = await self.execute(["pay", amount, payee])
        return code, self.out.getvalue().strip().splitlines()[-1] if self.out.getvalue() else ""


async def _start_fleet(
    dep: Deployment,
    name: str,
    roles: str,
    devices: int | None,
    broker_url: str,
    tg: asyncio.TaskGroup,
    extra: tuple[str, ...] = (),
) -> FleetProcess:
    argv = [sys.executable, "-m", "ops.cli", "fleet", "--deploy", str(dep.root), "--roles", roles]
    argv += ["--broker", broker_url, "--log-level", "error", "--json", *extra]
    if devices is not None:
        argv += ["--devices", str(devices)]
    dep.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(dep.logs_dir / f"bench-{name}.stderr", "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *guarded(argv), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err
        )
    fleet = FleetProcess(name, proc)
    tg.create_task(fleet.read(), name=f"bench:read:{name}")
    return fleet


async def _wait_up(fleet: FleetProcess, dep: Deployment) -> None:
    try:
        async with asyncio.timeout(UP_TIMEOUT_S):
            waiting = asyncio.ensure_future(fleet.up.wait())
            ended = asyncio.ensure_future(fleet.proc.wait())
            await asyncio.wait((waiting, ended), return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            ended.cancel()
    except TimeoutError:
        pass
    if not fleet.up.is_set():
        tail = (dep.logs_dir / f"bench-{fleet.name}.stderr").read_text(errors="replace")[-2000:]
        raise BenchError(f"the {fleet.name} fleet did not come up: {fleet.failures or tail}")


async def _stop_fleet(fleet: FleetProcess) -> None:
    if fleet.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            fleet.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await fleet.proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            fleet.proc.kill()
        await fleet.proc.wait()


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


async def _clients(dep: Deployment, manifest: Manifest, devices: list[str], url: str) -> list[_BenchClient]:
    clients = []
    for device in devices:
        parts = assemble(dep, node_id(Role.CLIENT, device), url, console=None, manifest=manifest)
        client = _BenchClient(
            parts.config,
            parts.bus,
            parts.logging.logger,
            deployment=dep,
            out=io.StringIO(),
            as_json=True,
        )
        parts.bus.will = client.will
        clients.append(client)
    return clients


async def _drive(
    clients: list[_BenchClient],
    concurrency: int,
    seconds: float,
    latencies: list[float],
    errors: Counter[str],
) -> tuple[int, float]:
    """Payments from free devices, ``concurrency`` at a time, until ``seconds`` have passed."""
    free: asyncio.Queue[_BenchClient] = asyncio.Queue()
    for client in clients:
        free.put_nowait(client)
    made = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal made
        for _ in range(10_000_000):  # bounded; ends at the deadline
            if time.perf_counter() >= deadline:
                return
            client = await free.get()
            began = time.perf_counter()
            try:
                code, line = await client.pay_once("1.00", "shop-1")
            finally:
                free.put_nowait(client)
            if code == 0:
                made += 1
                latencies.append(time.perf_counter() - began)
            else:
                try:
                    errors[str(json.loads(line).get("code") or json.loads(line).get("status"))] += 1
                except ValueError:
                    errors[f"exit {code}"] += 1

    async with asyncio.TaskGroup() as tg:
        for i in range(concurrency):
            tg.create_task(worker(), name=f"bench:worker:{i}")
    return made, time.perf_counter() - start


def _message_stats(before: Counter[str], after: Counter[str], payments: int) -> dict[str, float]:
    sent = after - before
    out = {k[4:]: v for k, v in sent.items() if k.startswith("out.")}
    total = sum(out.values())
    link = sum(v for k, v in out.items() if k not in NOT_LINK)
    per = max(payments, 1)
    inbound = sum(v for k, v in sent.items() if k.startswith("in."))
    steps = sum(v for k, v in sent.items() if k.startswith("flow."))  # every step logged, batched or not
    return {
        "messages": total,
        "messages_per_payment": round(total / per, 2),
        "link_frames_per_payment": round(link / per, 2),
        "step_events_per_payment": round(steps / per, 2),
        # the frames they took: one per event, or one per batch (runtime.Node.step)
        "step_event_frames_per_payment": round((out.get("event", 0) + out.get("events", 0)) / per, 2),
        "frames_received_per_payment": round(inbound / per, 2),
    }


async def load(
    dep: Deployment,
    *,
    devices: int,
    concurrency: int,
    seconds: float,
    broker_url: str | None,
    backend: str | None,
    crypto_us: tuple[float, float],
    run_baseline: bool = True,
    mqtt: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """The whole run: nodes up, warm-up, the measured window, the baseline; the result as a dict.

    ``mqtt``: the MQTT version every node and the baseline speak (default: the broker's best).
    ``replicas``: of each server, each its own process (``trustpay up --replicas``).
    """
    from ops.broker_cmd import broker_for

    manifest = dep.load_manifest()
    if devices > len(manifest.devices):
        raise BenchError(f"--devices {devices}: the deployment has {len(manifest.devices)} devices")
    if not 1 <= replicas <= manifest.replicas:
        raise BenchError(f"--replicas {replicas}: the deployment has {manifest.replicas} per server")
    concurrency = max(1, min(concurrency, devices))
    names = [d.device for d in manifest.devices[:devices]]
    async with contextlib.AsyncExitStack() as stack:
        broker = None
        if broker_url is None:
            broker = await stack.enter_async_context(broker_for(dep, backend))
            url = f"mqtt://{broker.host}:{broker.port}?v={mqtt or broker.mqtt_version}"
        else:
            url = broker_url
        running = broker.backend if broker is not None else manifest.broker.backend
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        fleets: list[FleetProcess] = []
        try:
            plan: list[tuple[str, str, int | None, tuple[str, ...]]] = [
                (nid, role.value, None, _replica_args(k, replicas, running))
                for role in (Role.TRUST_SERVER, Role.PAYMENT_SERVER)
                for k, nid in enumerate(manifest.server_ids(role)[:replicas], start=1)
            ]
            plan += [("chip", "chip", devices, ()), ("trust-module", "trust-module", devices, ())]
            last_server = plan[2 * replicas - 1][0]
            for name, roles, n, extra in plan:
                fleets.append(await _start_fleet(dep, name, roles, n, url, tg, extra))
                if name in (last_server, "chip", "trust-module"):  # in the launcher's order
                    for fleet in fleets:
                        await _wait_up(fleet, dep)
            result = await _measure(
                dep, manifest, names, url, concurrency, seconds, fleets, broker, crypto_us
            )
        finally:
            for fleet in reversed(fleets):
                await _stop_fleet(fleet)
        if run_baseline:
            hops = max(2, round(result["link_frames_per_payment"]))
            events = round(result["step_event_frames_per_payment"])  # the baseline's one-way publishes
            result.update(await _baseline(dep, manifest, names, url, concurrency, seconds, hops, events))
            raw = result["baseline_payments_per_second"]
            result["baseline_ratio"] = round(result["payments_per_second"] / raw, 3) if raw else 0.0
        result["broker"] = broker.backend if broker is not None else url
        result["mqtt"] = url.rsplit("v=", 1)[-1] if "v=" in url else "auto"
    return result


def _replica_args(replica: int, replicas: int, backend: str) -> tuple[str, ...]:
    if replicas == 1:
        return ()
    split = ("--partition",) if backend != "mosquitto" else ()  # no $share there (ops.launcher)
    return ("--replica", str(replica), "--replicas", str(replicas), *split)


async def _baseline(
    dep: Deployment,
    manifest: Manifest,
    names: list[str],
    url: str,
    concurrency: int,
    seconds: float,
    hops: int,
    events: int,
) -> dict[str, Any]:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    version = parse_qs(parts.query).get("v", ["5"])[0]
    mqtt = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311

    def login(nid: str) -> Login:
        creds = dep.load_broker_credentials(nid)
        return Login(creds.username, creds.password)

    responder = login(manifest.servers.get(Role.TRUST_SERVER.value, Role.TRUST_SERVER.value))
    lanes = [Lane(d, login(node_id(Role.TRUST_MODULE, d))) for d in names[:concurrency]]
    raw = await baseline(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        mqtt,
        responder,
        lanes,
        hops=hops,
        events=events,
        seconds=seconds,
    )
    return {
        "baseline_hops_per_payment": hops,
        "baseline_events_per_payment": events,
        "baseline_payments_per_second": round(raw["payments_per_second"], 1),
        "baseline_p50_ms": round(raw["p50_ms"], 2),
        "baseline_p99_ms": round(raw["p99_ms"], 2),
    }


async def _measure(
    dep: Deployment,
    manifest: Manifest,
    names: list[str],
    url: str,
    concurrency: int,
    seconds: float,
    fleets: list[FleetProcess],
    broker: Any,
    crypto_us: tuple[float, float],
) -> dict[str, Any]:
    clients = await _clients(dep, manifest, names, url)
    tasks = [asyncio.create_task(c.run(), name=f"bench:{c.id}") for c in clients]
    try:
        async with asyncio.timeout(UP_TIMEOUT_S):
            for client, task in zip(clients, tasks, strict=True):
                opened = asyncio.ensure_future(client.opened.wait())
                await asyncio.wait((opened, task), return_when=asyncio.FIRST_COMPLETED)
                opened.cancel()
                if not client.opened.is_set():
                    why = task.exception() if not task.cancelled() else None
                    raise BenchError(f"{client.id} could not open its chip: {why!r}")
        # warm-up: every device pays once, so each is known to pay and caches are as in service
        slots = asyncio.Semaphore(concurrency)

        async def warm(client: _BenchClient) -> None:
            async with slots:
                code, line = await client.pay_once("1.00", "shop-1")
            if code != 0:
                raise BenchError(f"{client.device} cannot pay: {line}")

        async with asyncio.TaskGroup() as warming:
            for client in clients:
                warming.create_task(warm(client))
        pids = {f.name: f.proc.pid for f in fleets}
        if broker is not None and broker.pid is not None:
            pids["broker"] = broker.pid
        pids["client"] = os.getpid()  # the clients live in this process (with the bench's own driving)
        meter = CpuMeter(pids, own_only=frozenset({"client"}))  # this process started the others
        before = Counter[str]()
        for fleet in fleets:
            before.update(await fleet.counters())
        for client in clients:
            before.update(client.counters)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        meter.start()
        made, elapsed = await _drive(clients, concurrency, seconds, latencies, errors)
        used = meter.stop()
        after = Counter[str]()
        for fleet in fleets:
            after.update(await fleet.counters())
        for client in clients:
            after.update(client.counters)
        rss = {f.name: rss_kib(f.proc.pid) for f in fleets}
    finally:
        for client in clients:
            client.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    result: dict[str, Any] = {
        "devices": len(names),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "payments": made,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "payments_per_second": round(made / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(1000 * _percentile(latencies, 0.50), 2),
        "p95_ms": round(1000 * _percentile(latencies, 0.95), 2),
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 2),
    }
    result.update(_message_stats(before, after, made))
    result["broker_messages_per_second"] = round(result["messages"] / elapsed, 1) if elapsed else 0.0
    per = max(made, 1)
    cpu = {name: round(1000 * seconds_used / per, 2) for name, seconds_used in used.items()}
    result["cpu_ms_per_payment_by_role"] = cpu
    result["cpu_ms_per_payment"] = round(sum(cpu.values()), 2)
    result["cpu_cores_busy"] = round(sum(used.values()) / elapsed, 2) if elapsed else 0.0
    sign_us, verify_us = crypto_us
    sent = sum(v for k, v in (after - before).items() if k.startswith("out."))
    received = sum(v for k, v in (after - before).items() if k.startswith("in."))
    result["crypto_floor_ms_per_payment"] = round((sent * sign_us + received * verify_us) / per / 1000, 2)
    device_fleets = [f for f in fleets if f.name in ("chip", "trust-module")]
    result["fleet_rss_kib_per_device"] = round(
        sum(rss[f.name] for f in device_fleets) / max(len(names), 1), 1
    )
    return result


def table(result: dict[str, Any]) -> str:
    """The result as the lines a person reads."""
    lines = [
        f"attested payments   {result['payments_per_second']:>9.1f} /s   "
        f"({result['payments']} in {result['seconds']} s, {result['devices']} devices, "
        f"{result['concurrency']} in flight, {result['failed']} failed)",
        f"latency             p50 {result['p50_ms']} ms   p95 {result['p95_ms']} ms   "
        f"p99 {result['p99_ms']} ms",
        f"messages/payment    {result['messages_per_payment']}   "
        f"(link frames {result['link_frames_per_payment']}, step events {result['step_events_per_payment']} "
        f"in {result['step_event_frames_per_payment']} frames)",
        f"broker              {result['broker_messages_per_second']} messages/s published",
        f"CPU/payment         {result['cpu_ms_per_payment']} ms, {result['cpu_cores_busy']} cores busy: "
        + ", ".join(f"{k} {v}" for k, v in result["cpu_ms_per_payment_by_role"].items()),
        f"crypto floor        {result['crypto_floor_ms_per_payment']} ms/payment (sign + verify each frame)",
        f"fleet memory        {result['fleet_rss_kib_per_device']} KiB RSS per device "
        "(chip + tm fleets, interpreters included)",
    ]
    if "baseline_payments_per_second" in result:
        lines.append(
            f"raw-MQTT baseline   {result['baseline_payments_per_second']:>9.1f} /s   "
            f"({result['baseline_hops_per_payment']} hops + {result['baseline_events_per_payment']} one-way, "
            f"p50 {result['baseline_p50_ms']} ms)   ratio {result['baseline_ratio']}"
        )
    return "\n".join(lines)


def compare(result: dict[str, Any], earlier: dict[str, Any]) -> str:
    """Each headline figure beside an earlier run's."""
    keys = (
        "payments_per_second",
        "baseline_payments_per_second",
        "baseline_ratio",
        "p50_ms",
        "p99_ms",
        "messages_per_payment",
        "cpu_ms_per_payment",
    )
    lines = ["compared with the earlier run:"]
    for key in keys:
        now, then = result.get(key), earlier.get(key)
        if isinstance(now, (int, float)) and isinstance(then, (int, float)) and then:
            lines.append(f"  {key:<30} {then:>10} -> {now:<10} ({(now - then) / then:+.0%})")
    return "\n".join(lines)


def save(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
