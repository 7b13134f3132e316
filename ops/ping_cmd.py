"""``trustpay ping``: signed health checks, from the operator's login to running nodes."""

from __future__ import annotations

import argparse
import asyncio
import time

from nodes.deployment import Deployment, parse_node_id
from nodes.runtime import Settings
from protocol.messages import Pong

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .operator import health, operator_node

HELP = "ping nodes with signed, verified messages (default: every server and device node)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "one JSON object per node and line")
    add_examples(
        parser,
        "trustpay ping --deploy deploy",
        "trustpay ping trust-server dev-0001.tm --json   # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
    )
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    parser.add_argument("nodes", nargs="*", help="node ids, e.g. trust-server dev-0001.tm (default: all)")


async def ping_all(
    dep: Deployment,
    node_ids: list[str],
    broker_url: str | None,
    settings: Settings | None = None,
    as_json: bool = False,
) -> dict[str, Pong | str]:
    """Each node's signed pong, or why there was none; pings run concurrently."""

    async def one(nid: str) -> tuple[Pong | str, float]:
        role, device = parse_node_id(nid)
        start = time.perf_counter()
        answer = await health(op, role, nid, device)
        return answer, (time.perf_counter() - start) * 1000

    async with operator_node(dep, broker_url, settings) as op:
        answers = await asyncio.gather(*(one(nid) for nid in node_ids))
    for nid, (answer, ms) in zip(node_ids, answers, strict=True):
        if as_json:
            if isinstance(answer, Pong):
                pong = {"state": answer.state, "uptime_ms": answer.uptime_ms, "ms": round(ms, 1)}
                print_json({"node": nid, "ok": True, **pong})
            else:
                print_json({"node": nid, "ok": False, "error": answer})
        elif isinstance(answer, Pong):
            print(f"{nid:<20} {answer.state:<9} up {answer.uptime_ms / 1000:.1f} s   {ms:.1f} ms")
        else:
            print(f"{nid:<20} no answer: {answer}")
    return {nid: answer for nid, (answer, _) in zip(node_ids, answers, strict=True)}


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    node_ids = args.nodes or [nid for nid in dep.load_manifest().node_ids() if not nid.endswith(".client")]
    answers = asyncio.run(ping_all(dep, node_ids, args.broker, as_json=args.json))
    return 0 if all(isinstance(a, Pong) for a in answers.values()) else 1
