"""``trustpay bench``: what our protocol costs, measured side by side with raw MQTT.

* (no word, or ``load``): attested payments end to end from many devices with
  many in flight, per-role CPU, messages per payment, and in the same run the
  raw-MQTT baseline with the same hops (:mod:`ops.bench.load`).
* ``micro``: per-message CPU cost of encode, decode, sign, verify, seal, open
  (median of several batches, microseconds per message).
* ``rt``: request/response round trips on one broker, in one run: raw aiomqtt
  QoS 1 echo versus trustpay's signed, verified ping, and their ratio.
* ``memory``: resident memory per device node in fleet mode (:mod:`ops.bench.memory`).

Speed is reported, never asserted: absolute numbers drift, ratios travel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt

from broker import BACKENDS
from nodes.assemble import assemble
from nodes.deployment import Deployment
from nodes.runtime import Node, now_ms, ping
from protocol.certs import CertStore
from protocol.codec import pack, unpack
from protocol.envelope import Envelope, Verifier, new_id, sign_frame
from protocol.messages import Evidence, Ping, StepEvent
from protocol.replay import ReplayGuard
from protocol.topics import Role, link_topic

from ..cli_common import add_examples, add_json_argument, print_json
from .baseline import STOP

if TYPE_CHECKING:
    from ops.watch import Seen

HELP = "attested payments per second against a same-run raw-MQTT baseline; per-message costs; round trips"


def _median_us(fn: Callable[[], Any], n: int, batches: int = 7) -> float:
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - start) / n / 1000)
    return round(statistics.median(samples), 2)


def micro(dep: Deployment, n: int = 2000) -> dict[str, float]:
    """Per-message costs of a device -> trust-server frame (sealed evidence) and a plain ping."""
    device = dep.load_manifest().devices[0].device
    tm_id = f"{device}.tm"
    tm_keys, tm_cert = dep.load_keys(tm_id), dep.load_cert(tm_id)
    ts_keys, ts_cert = dep.load_keys("trust-server"), dep.load_cert("trust-server")
    topic = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, device)
    store = CertStore(dep.load_public("root"), dep.load_public("update"))
    store.install_platform(dep.load_public("platform"))
    results: dict[str, float] = {}
    for label, body, peer in (
        ("ping", Ping(b"\x01" * 16), None),
        ("sealed", Evidence(b"\x02" * 32, b"\x03" * 200, (), "wallet"), ts_cert.body.box_key),
    ):
        msg = "ping" if label == "ping" else "c2.evidence"
        env = Envelope(
            msg, new_id(), tm_id, "trust-server", b"s" * 16, b"", now_ms(), 1, 1, (tm_cert.to_bytes(),), body
        )
        frame = sign_frame(env, topic, tm_keys, peer)
        data = frame[:-64]
        verifier = Verifier(frozenset({"trust-server"}), store, None, keys=ts_keys)
        verifier.open(frame, topic, now_ms())  # warm the certificate cache, as a running node has it
        t = now_ms()
        results[f"{label}.frame_bytes"] = len(frame)
        results[f"{label}.encode_us"] = _median_us(lambda: pack([1, "x", b"", data]), n)  # noqa: B023
        results[f"{label}.decode_us"] = _median_us(lambda: unpack(data), n)  # noqa: B023
        results[f"{label}.sign_us"] = _median_us(lambda: sign_frame(env, topic, tm_keys, peer), n)  # noqa: B023
        results[f"{label}.verify_us"] = _median_us(lambda: verifier.open(frame, topic, t), n)  # noqa: B023
    guard_verifier = Verifier(frozenset({"trust-server"}), store, ReplayGuard(0), keys=ts_keys)
    frames = []
    for seq in range(n):
        env = Envelope(
            "ping",
            new_id(),
            tm_id,
            "trust-server",
            b"",
            b"",
            now_ms(),
            1,
            seq + 1,
            (tm_cert.to_bytes(),),
            Ping(b"\x01" * 16),
        )
        frames.append(sign_frame(env, topic, tm_keys))
    start = time.perf_counter_ns()
    for frame in frames:
        guard_verifier.open(frame, topic, now_ms())
    results["ping.verify_with_replay_guard_us"] = round((time.perf_counter_ns() - start) / n / 1000, 2)
    return results


async def _raw_rt(
    host: str, port: int, creds: list[tuple[str, str]], mqtt: aiomqtt.ProtocolVersion, rounds: int
) -> float:
    """Round trips per second of raw QoS 1 echo between two clients (same logins' topics)."""
    req, rsp = "tp/v1/dev/dev-0001/tm/ts", "tp/v1/dev/dev-0001/ts/tm"
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    (tm_user, tm_pw), (ts_user, ts_pw) = creds[0], creds[1]
    async with (
        aiomqtt.Client(
            host,
            port,
            username=tm_user,
            password=tm_pw,
            protocol=mqtt,
            socket_options=opts,
            identifier=tm_user,  # a login may use only its own client id
        ) as a,
        aiomqtt.Client(
            host,
            port,
            username=ts_user,
            password=ts_pw,
            protocol=mqtt,
            socket_options=opts,
            identifier=ts_user,
        ) as b,
    ):
        await a.subscribe(rsp, qos=1)
        await b.subscribe(req, qos=1)

        async def echo() -> None:
            # ends on the stop message, never by cancelling it while it waits in b.messages
            # (a cancelled reader stayed "cancelling" there for good in two runs of three)
            async for message in b.messages:
                if message.payload == STOP:
                    return
                await b.publish(rsp, message.payload, qos=1)

        echo_task = asyncio.create_task(echo())
        start = time.perf_counter()
        async with asyncio.timeout(120):
            for i in range(rounds):
                await a.publish(req, str(i).encode(), qos=1)
                await anext(aiter(a.messages))
        elapsed = time.perf_counter() - start
        await a.publish(req, STOP, qos=1)
        try:
            async with asyncio.timeout(10):
                await echo_task
        finally:
            if not echo_task.done():
                echo_task.cancel()
    return rounds / elapsed


async def _node_rt(dep: Deployment, rounds: int, broker_url: str | None) -> float:
    device = dep.load_manifest().devices[0].device
    nodes = []
    for nid in (f"{device}.tm", "trust-server"):
        parts = assemble(dep, nid, broker_url, console=None)
        node = Node(parts.config, parts.bus, parts.logging.logger)
        parts.bus.will = node.will
        nodes.append(node)
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        async with asyncio.timeout(30):
            for n in nodes:
                await n.connected.wait()
        start = time.perf_counter()
        async with asyncio.timeout(120):
            for _ in range(rounds):
                await ping(nodes[0], Role.TRUST_SERVER, "trust-server")
        return rounds / (time.perf_counter() - start)
    finally:
        for n in nodes:
            n.stop()
        await asyncio.gather(*tasks)


async def round_trips(dep: Deployment, rounds: int, backend: str) -> dict[str, Any]:
    from ops.broker_cmd import broker_for

    broker = broker_for(dep, backend)
    async with broker:
        version = aiomqtt.ProtocolVersion.V5 if broker.mqtt_version == "5" else aiomqtt.ProtocolVersion.V311
        device = dep.load_manifest().devices[0].device
        creds = []
        for nid in (f"{device}.tm", "trust-server"):
            c = dep.load_broker_credentials(nid)
            creds.append((c.username, c.password))
        url = f"mqtt://{broker.host}:{broker.port}?v={broker.mqtt_version}"
        raw = await _raw_rt(broker.host, broker.port, creds, version, rounds)
        ours = await _node_rt(dep, rounds, url)
    return {
        "backend": backend,
        "rounds": rounds,
        "raw_mqtt_rt_per_s": round(raw),
        "trustpay_rt_per_s": round(ours),
        "ratio": round(ours / raw, 2),
    }


def _spans(frames: list[Seen]) -> dict[str, int]:
    """Milliseconds between the first frames of the given types within one payment session."""
    first: dict[str, int] = {}
    for seen in frames:
        first.setdefault(seen.type, seen.ts_ms)
    return {
        "c1_to_receipt_ms": first["pay.receipt"] - first["c1.check"],
        "pay_start_to_result_ms": first["pay.result"] - first["pay.start"],
        "pay_start_to_c7_ms": max(s.ts_ms for s in frames) - first["pay.start"],
    }


async def payments(dep: Deployment, count: int, replicas: int = 1) -> dict[str, Any]:
    """Attested payments end to end: every node a process, each payment a real client process."""
    from ops.launcher import Launcher
    from ops.scenario import Scenario
    from ops.watch import EventWatcher

    device = dep.load_manifest().devices[0].device
    async with Launcher(dep, log_level="warning", replicas=replicas) as launcher:
        await launcher.wait_all_up()
        async with EventWatcher(dep, launcher.broker_url, every_frame=True) as watcher:
            scenario = Scenario(dep, launcher, watcher)
            await scenario.wait_started(device)
            for _ in range(count):
                run = await scenario.client(device, "pay", "1.00", "shop-1")
                if run.code != 0:
                    raise RuntimeError(f"payment failed: {run.result or run.stderr[-500:]}")
                session = bytes.fromhex(run.result["session"])

                def c7_done(event: StepEvent, session: bytes = session) -> bool:
                    return event.step == "C7" and event.session == session

                await watcher.wait_for(c7_done, 30)
    by_session: dict[bytes, list[Seen]] = {}
    events: dict[bytes, int] = {}
    for seen in watcher.seen:
        if seen.event is not None and seen.event.session:
            events[seen.event.session] = events.get(seen.event.session, 0) + 1
        elif seen.event is None and seen.status is None and seen.session:
            by_session.setdefault(seen.session, []).append(seen)
    sessions = [
        frames for frames in by_session.values() if {"c1.check", "pay.receipt"} <= {f.type for f in frames}
    ]
    spans = [_spans(frames) for frames in sessions]
    result: dict[str, Any] = {"payments": len(sessions)}
    for key in spans[0] if spans else ():
        values = sorted(s[key] for s in spans)
        result[f"{key}_p50"] = values[len(values) // 2]
        result[f"{key}_max"] = values[-1]
    result["link_frames_per_payment"] = (
        sorted(len(f) for f in sessions)[len(sessions) // 2] if sessions else 0
    )
    result["step_events_per_payment"] = sorted(events.values())[len(events) // 2] if events else 0
    result["frames_by_type"] = dict(sorted(Counter(f.type for f in sessions[0]).items())) if sessions else {}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        nargs="?",
        default="load",
        choices=["load", "micro", "rt", "pay", "memory"],
        help="load (default): attested payments from many devices against the raw-MQTT baseline; "
        "micro: per-message costs; rt: round trips vs raw MQTT; pay: one device's payments, frame by frame; "
        "memory: resident memory per device in fleet mode",
    )
    parser.add_argument("--devices", type=int, default=100, metavar="N", help="devices paying (load)")
    parser.add_argument(
        "--concurrency", type=int, default=50, metavar="C", help="payments in flight (load; at most N)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, metavar="S", help="measured window (load)")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="load: use this running broker (it must know the deployment's logins: give --reuse too)",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="load: run on this existing deployment instead of a fresh one (its first N devices pay)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="load: skip the raw-MQTT baseline")
    parser.add_argument(
        "--mqtt", choices=["5", "3.1.1"], help="load: the MQTT version of the nodes and the baseline"
    )
    parser.add_argument(
        "--save", type=Path, metavar="FILE", help="load: also write the result to FILE (JSON)"
    )
    parser.add_argument(
        "--compare", type=Path, metavar="FILE", help="load: show the result beside an earlier --save"
    )
    parser.add_argument("--payments", type=int, default=20, help="payments for `pay`")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="load, pay: N replicas of each server, each its own process (mosquitto)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--n", type=int, default=2000, help="messages per micro batch")
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="FRAMES",
        help="memory: also trace Python allocations (tracemalloc, FRAMES deep) and list the largest",
    )
    add_json_argument(parser, "the result as one JSON line (default: indented JSON)")
    add_examples(
        parser,
        "trustpay bench --devices 100 --concurrency 50 --seconds 10",
        "trustpay bench --json --save before.json && trustpay bench --compare before.json",
        "trustpay bench micro",
        "trustpay bench memory --devices 200            # KiB of RSS per device, chips and trust modules",
        "trustpay bench pay --payments 50 --backend amqtt --json",
        "trustpay bench --replicas 2 --backend mosquitto   # two trust-servers, two payment-servers",
    )


def needs_deploy(args: argparse.Namespace) -> bool:
    return False  # a fresh deployment unless --deploy is given


def run(args: argparse.Namespace) -> int:
    if args.what == "load":
        return _run_load(args)
    if args.what == "memory":
        return _run_memory(args)
    from broker import default_backend
    from ops.provision import provision

    with tempfile.TemporaryDirectory(prefix="trustpay-bench-") as tmp:
        backend = args.backend or default_backend()
        provision(Path(tmp) / "d", 1, backend=backend, replicas=args.replicas)
        dep = Deployment(Path(tmp) / "d")
        if args.what == "micro":
            result: dict[str, Any] = micro(dep, args.n)
        elif args.what == "pay":
            result = asyncio.run(payments(dep, args.payments, args.replicas))
        else:
            result = asyncio.run(round_trips(dep, args.rounds, backend))
    if args.json:
        print_json(result)
    else:
        print(json.dumps(result, indent=2))
    return 0


def _run_load(args: argparse.Namespace) -> int:
    from broker import default_backend
    from ops.provision import provision
    from protocol.errors import ConfigError

    from .load import compare, load, save, table

    if args.broker and not args.reuse:
        raise ConfigError("--broker needs --reuse: a fresh deployment's logins are unknown to that broker")
    earlier = json.loads(args.compare.read_text()) if args.compare else None
    with tempfile.TemporaryDirectory(prefix="trustpay-bench-") as tmp:
        if args.reuse:
            dep = Deployment(args.reuse.resolve())
        else:
            backend = args.backend or default_backend()
            provision(Path(tmp) / "d", args.devices, backend=backend, replicas=args.replicas)
            dep = Deployment(Path(tmp) / "d")
        costs = micro(dep, 500)
        result = asyncio.run(
            load(
                dep,
                devices=args.devices,
                concurrency=args.concurrency,
                seconds=args.seconds,
                broker_url=args.broker,
                backend=args.backend if not args.broker else None,
                crypto_us=(costs["ping.sign_us"], costs["ping.verify_us"]),
                run_baseline=not args.no_baseline,
                mqtt=args.mqtt,
                replicas=args.replicas,
            )
        )
    result["machine"] = _machine()
    result["command"] = "trustpay bench " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (
            ("devices", args.devices),
            ("concurrency", args.concurrency),
            ("seconds", args.seconds),
            ("replicas", args.replicas),
        )
    )
    result["replicas"] = args.replicas
    if args.save:
        save(result, args.save)
    if args.json:
        print_json(result)
    else:
        print(table(result))
    if earlier is not None:
        print(compare(result, earlier), file=sys.stderr if args.json else sys.stdout)
    return 0 if result["failed"] == 0 else 1


def _run_memory(args: argparse.Namespace) -> int:
    from broker import default_backend
    from ops.provision import provision
    from protocol.topics import Role

    from .memory import memory

    with tempfile.TemporaryDirectory(prefix="trustpay-bench-") as tmp:
        if args.reuse:
            dep = Deployment(args.reuse.resolve())
        else:
            provision(Path(tmp) / "d", args.devices, backend=args.backend or default_backend())
            dep = Deployment(Path(tmp) / "d")
        result = asyncio.run(memory(dep, args.devices, (Role.CHIP, Role.TRUST_MODULE), args.trace))
    result["machine"] = _machine()
    result["command"] = f"trustpay bench memory --devices {args.devices}" + (
        f" --trace {args.trace}" if args.trace else ""
    )
    if args.json:
        print_json(result)
    else:
        print(json.dumps(result, indent=2))
    return 0 if not result["failed"] else 1


def _machine() -> dict[str, Any]:
    import os
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
