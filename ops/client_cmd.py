"""``trustpay client --deploy DIR --device ID COMMAND...``: the user's payment client (B1-B5)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from nodes.client import USAGE, Client
from nodes.deployment import Deployment
from nodes.runtime import Settings
from protocol.topics import Role

from .roles import resolve_node_id, run_node

CONNECT_TIMEOUT_S = 10.0  # a user waits for an answer, not for a broker that is not there

HELP = "open the payment client: pay AMOUNT PAYEE [APP] | balance | history | apps | status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy", type=Path, required=True, help="deployment directory")
    parser.add_argument("--device", help="device id (default: the only device)")
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("words", nargs=argparse.REMAINDER, help=USAGE)


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    nid = resolve_node_id(dep, Role.CLIENT, args.device)
    words = [w for w in args.words if w != "--"]
    node = asyncio.run(
        run_node(
            dep,
            nid,
            args.broker,
            console_level=args.log_level,
            settings=Settings(connect_timeout_s=CONNECT_TIMEOUT_S),
            command=words,
            out=sys.stdout,
            as_json=args.json,
            interactive=not words and sys.stdin.isatty(),
        )
    )
    assert isinstance(node, Client)
    return node.exit_code
