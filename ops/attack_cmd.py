"""``trustpay attack``: play an attacker against a running deployment and report what held.

The attacker uses what a compromised device gives away: a node's key,
certificate chain and broker login from the deployment directory (by default
the first device's client, whose process runs only while its user pays). The
read-only monitor login watches every frame meanwhile, the operator pings the
target afterwards, and the ledger is read before and after; each attack ends
with "defended" or "NOT DEFENDED" and the evidence (docs/SECURITY.md says which
defence each one meets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from nodes.deployment import Deployment, parse_node_id
from protocol.errors import ConfigError
from protocol.topics import Role, node_id

from .attack.attacks import ATTACKS, DEFAULT_ORDER, Context, captured, load_recording, play
from .attack.frames import ALTERABLE
from .attack.session import Attacker, Observer
from .attack.verdict import DEFENDED, Report
from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .operator import operator_node

HELP = "attack a running deployment as a compromised device and report what the target did"
NEEDS_CAPTURE = ("replay", "alter")
MAX_COUNT = 50_000  # over 20000 fills a receiver's id table for the attacker (protocol.replay)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "one JSON object per attack")
    add_examples(
        parser,
        "trustpay attack                           # every attack but the control, as dev-0001.client",
        "trustpay attack forge garbage --json      # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
        "trustpay attack flood --count 2000 --rate 500 --target dev-0001.chip",
        "trustpay attack replay --record run.jsonl # a frame from `trustpay monitor --record`",
        "trustpay attack control                   # a genuine frame: must say NOT DEFENDED",
    )
    parser.add_argument(
        "attacks",
        nargs="*",
        metavar="ATTACK",
        help=f"any of {', '.join(ATTACKS)} (default: all but control)",
    )
    parser.add_argument(
        "--as", dest="attacker", help="the compromised node (default: the first device's client)"
    )
    parser.add_argument("--target", help="the node attacked: the attacker device's tm (default) or chip")
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    parser.add_argument(
        "--count",
        type=int,
        default=200,
        help=f"frames per flood wave (at most {MAX_COUNT}; over 20000 fills the target's id table)",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="flood frames per second")
    parser.add_argument(
        "--field",
        dest="alter_field",
        default="session",
        choices=(*ALTERABLE, "all"),
        help="what alter changes",
    )
    parser.add_argument("--record", type=Path, help="take the frame to replay or alter from this recording")
    parser.add_argument(
        "--capture-seconds",
        type=float,
        default=60.0,
        help="how long replay and alter wait for a live frame from the attacker's node (pay meanwhile)",
    )


def _context_args(args: argparse.Namespace, dep: Deployment) -> tuple[str, str, str | None]:
    devices = dep.load_manifest().devices
    names = [d.device for d in devices]
    attacker = args.attacker or node_id(Role.CLIENT, names[0])
    role, device = parse_node_id(attacker)
    if not role.on_device or device is None:
        raise ConfigError(f"--as {attacker}: the attacker is a device's node (e.g. {names[0]}.client)")
    target = args.target or node_id(Role.TRUST_MODULE, device)
    if target not in (node_id(Role.TRUST_MODULE, device), node_id(Role.CHIP, device)) or target == attacker:
        raise ConfigError(f"--target {target}: choose {device}.tm or {device}.chip, another node than --as")
    others = [d for d in names if d != device]
    return attacker, target, others[0] if others else None


async def run_attacks(args: argparse.Namespace) -> list[Report]:
    dep = Deployment(args.deploy)
    names = args.attacks or list(DEFAULT_ORDER)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"no attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    if not 1 <= args.count <= MAX_COUNT or args.rate <= 0:
        raise ConfigError(f"--count must be 1..{MAX_COUNT} and --rate above 0")
    attacker_id, target, other = await asyncio.to_thread(_context_args, args, dep)
    attacker = await asyncio.to_thread(Attacker, dep, attacker_id, args.broker)
    recorded = await asyncio.to_thread(load_recording, args.record) if args.record else []
    reports = []
    async with Observer(dep, args.broker) as observer, operator_node(dep, args.broker) as op:
        ctx = Context(
            dep,
            attacker,
            observer,
            op,
            target,
            other,
            args.broker,
            args.count,
            args.rate,
            args.alter_field,
            recorded,
        )
        if any(n in NEEDS_CAPTURE for n in names) and not recorded and not observer.captured:
            wait = args.capture_seconds
            print(f"waiting up to {wait:g} s for a frame from {attacker_id}: pay from its device", flush=True)
            await captured(ctx, wait)
            ctx.capture = None  # once the payment is over, the best frame of it is chosen
        # the node must not be running (a device's client, between its user's commands): its
        # connection would be knocked off by ours, and the ledger would move under the attacks
        await attacker.fresh_epoch(args.capture_seconds if attacker.role is Role.CLIENT else 0.0)
        if any(n in NEEDS_CAPTURE for n in names):
            await captured(ctx, args.capture_seconds)
        for name in names:
            report = await play(ctx, name, ATTACKS[name])
            reports.append(report)
            if args.json:
                print_json(report.to_json())
            else:
                print(report.text(), flush=True)
    return reports


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        reports = asyncio.run(run_attacks(args))
        return 0 if all(r.verdict == DEFENDED for r in reports) else 1
    return 130
