"""``trustpay chaos proxy``: the fault proxy on the links (``trustpay chaos fuzz`` is :mod:`ops.chaos.fuzz`).

``trustpay chaos proxy`` listens on 127.0.0.1:``--listen`` and forwards every
connection to the broker (``--upstream``, else the deployment's), applying the
faults of ``--profile FILE`` (TOML, :mod:`ops.chaos.faults`) and ``--fault``
flags to PUBLISH packets (:mod:`ops.chaos.proxy`). Nodes reach it through
their ``--broker`` URL (``trustpay up --broker mqtt://127.0.0.1:PORT``).

The deployment's monitor listener (the broker's port + 1) is forwarded too,
from ``--listen`` + 1 and without faults, so the launcher and ``trustpay
monitor`` keep watching the real traffic: the monitor is an observer, not a
radio link. SIGHUP reads the profile again (rules held by the old profile are
released); a profile that does not read leaves the running rules in place.
Every fault applied goes to ``--log FILE`` (default ``DEPLOY/logs/chaos-proxy.log``
when there is a deployment) as a JSON line and to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from nodes.deployment import Deployment
from protocol.errors import ConfigError, TrustpayError
from protocol.topics import MONITOR_PORT_OFFSET

from .chaos.fault_log import AppliedFault, FaultLog
from .chaos.faults import Profile, Rule, load_profile, rule_from_flag
from .chaos.proxy import ChaosProxy
from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json

HELP = "chaos on the links: an MQTT proxy that drops, delays, duplicates, reorders, corrupts ... packets"
LOG_NAME = "chaos-proxy.log"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_examples(
        parser,
        "trustpay chaos proxy --listen 1893 --deploy ./deploy --profile lossy.toml --seed 7",
        "trustpay chaos proxy --listen 1893 --upstream mqtt://127.0.0.1:1883 "
        "--fault 'drop probability=0.2 direction=to-broker' --json",
        "trustpay up --deploy ./deploy --broker mqtt://127.0.0.1:1893  # the nodes, through the proxy",
        "kill -HUP $PROXY_PID  # read the profile again while it runs",
    )
    add_deploy_argument(parser)
    add_json_argument(parser, "one JSON object per line: listening, each fault, reloaded, stopped")
    parser.add_argument("--listen", type=int, required=True, metavar="PORT", help="port on 127.0.0.1")
    parser.add_argument(
        "--upstream", metavar="URL", help="the broker, mqtt://HOST:PORT (default: the deployment's)"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="fault rules in TOML (re-read on SIGHUP)"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="a rule as 'KIND key=value ...', e.g. 'delay delay_ms=50,300 topics=tp/v1/dev/+/chip/ps' "
        "(repeatable; after the profile's rules)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of every random choice (default: the profile's, else 0)"
    )
    parser.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help=f"JSON lines of every fault (default: DEPLOY/logs/{LOG_NAME})",
    )
    parser.add_argument(
        "--no-monitor-listener", action="store_true", help="do not forward the monitor listener (port + 1)"
    )
    parser.add_argument("--seconds", type=float, help="stop after this long (default: at SIGINT or SIGTERM)")


def needs_deploy(args: argparse.Namespace) -> bool:
    return args.upstream is None  # the deployment names the broker


def run(args: argparse.Namespace) -> int:
    rules = [rule_from_flag(spec) for spec in args.fault]
    dep = Deployment(args.deploy) if args.deploy is not None else None
    host, port = upstream_of(args.upstream, dep)
    log_path = args.log or (dep.root / "logs" / LOG_NAME if dep is not None else None)
    return asyncio.run(serve(args, host, port, rules, log_path))


def upstream_of(url: str | None, dep: Deployment | None) -> tuple[str, int]:
    if url is None:
        if dep is None:
            raise ConfigError(
                "give --upstream mqtt://HOST:PORT or a deployment whose broker to stand in front of"
            )
        broker = dep.load_manifest().broker
        if broker.tls:
            raise ConfigError("the deployment's broker speaks TLS; the proxy reads plain MQTT only")
        return broker.host, broker.port
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ConfigError(
            f"--upstream {url!r} must look like mqtt://127.0.0.1:1883 (no TLS: the proxy reads packets)"
        )
    return parts.hostname, parts.port or 1883


async def serve(
    args: argparse.Namespace, host: str, port: int, flag_rules: list[Rule], log_path: Path | None
) -> int:
    profile = await _profile(args.profile, flag_rules)
    seed = args.seed if args.seed is not None else (profile.seed or 0)
    if log_path is not None:
        await asyncio.to_thread(log_path.parent.mkdir, parents=True, exist_ok=True)
    log = FaultLog(log_path, on_fault=lambda fault: _show_fault(fault, args.json))
    proxies = [ChaosProxy(host, port, profile, seed=seed, listen_port=args.listen, log=log)]
    if not args.no_monitor_listener:
        monitor_port = args.listen + MONITOR_PORT_OFFSET
        proxies.append(ChaosProxy(host, port + MONITOR_PORT_OFFSET, listen_port=monitor_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(args, flag_rules, proxies[0]), name="chaos:reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        async with contextlib.AsyncExitStack() as stack:
            for proxy in proxies:
                await stack.enter_async_context(proxy)
            _say(
                args.json,
                f"chaos proxy on 127.0.0.1:{args.listen} -> {host}:{port}, "
                f"{len(profile.rules)} rules, seed {seed}",
                kind="listening",
                port=args.listen,
                upstream=f"{host}:{port}",
                monitor_port=None if args.no_monitor_listener else args.listen + MONITOR_PORT_OFFSET,
                rules=len(profile.rules),
                seed=seed,
            )
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.seconds):
                    await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(log.close)  # waits for the log writer thread
    faults = dict(log.counts)
    _say(args.json, f"stopped; faults applied: {faults or 'none'}", kind="stopped", faults=faults)
    return 0


async def _profile(path: Path | None, flag_rules: list[Rule]) -> Profile:
    base = await asyncio.to_thread(load_profile, path) if path is not None else Profile()
    return Profile((*base.rules, *flag_rules), base.seed, base.source)


async def _reload(args: argparse.Namespace, flag_rules: list[Rule], proxy: ChaosProxy) -> None:
    if args.profile is None:
        _say(args.json, "SIGHUP: no --profile to read again", kind="reload_skipped")
        return
    try:
        profile = await _profile(args.profile, flag_rules)
    except TrustpayError as exc:
        _say(
            args.json,
            f"SIGHUP: {exc.reason}; the running rules stay",
            kind="reload_failed",
            reason=exc.reason,
        )
        return
    proxy.set_profile(profile)
    _say(
        args.json,
        f"reloaded {args.profile}: {len(profile.rules)} rules",
        kind="reloaded",
        rules=len(profile.rules),
    )


def _show_fault(fault: AppliedFault, as_json: bool) -> None:
    if as_json:
        data = asdict(fault)
        data["fault"] = data.pop("kind")  # "kind" says what the line is, as on every other line
        print_json({"kind": "fault", **data})
        return
    pid = "-" if fault.packet_id is None else fault.packet_id
    print(
        f"{fault.kind:<10} {fault.direction:<11} {fault.client_id:<24} {fault.topic}  "
        f"{fault.size} B qos {fault.qos} id {pid}  {fault.detail}",
        flush=True,
    )


def _say(as_json: bool, text: str, **fields: object) -> None:
    if as_json:
        print_json(fields)
    else:
        print(text, file=sys.stdout, flush=True)
