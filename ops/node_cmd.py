"""``trustpay node ROLE --deploy DIR``: run one node of a deployment as this process.

Not the client: it runs only through ``trustpay client``, whose boot path
checks the install against the trust module's measurement before running it.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from nodes.deployment import Deployment
from nodes.runtime import Settings
from nodes.sql import from_command_line
from protocol.errors import ConfigError
from protocol.topics import NODE_ROLES, SERVER_ROLES, Role, role_from_name

from .cli_common import (
    add_clock_offset_argument,
    add_deploy_argument,
    add_examples,
    add_json_argument,
    add_replica_arguments,
    print_json,
)
from .roles import resolve_node_id, run_node

HELP = "run one node (trust-module, chip, client, trust-server, payment-server) until stopped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=[r.value for r in NODE_ROLES])
    add_deploy_argument(parser)
    add_json_argument(parser, "when the node stops, print which node stopped as JSON (logs stay on stderr)")
    add_examples(
        parser,
        "trustpay node trust-server --deploy deploy",
        "trustpay node chip --device dev-0002 --json   # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
    )
    parser.add_argument("--device", help="device id, for device roles (default: the only device)")
    parser.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883 (default: the manifest's)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="console log level (the JSON log file gets everything)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="servers: also serve the node's counters to Prometheus on 127.0.0.1:P/metrics",
    )
    add_replica_arguments(parser)
    add_clock_offset_argument(parser, "the node stamps and checks every frame with it")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="servers: the role's database, e.g. postgresql://postgres@127.0.0.1:5432/trustpay "
        "(default: the manifest's, see `trustpay provision --db`)",
    )


def run(args: argparse.Namespace) -> int:
    role = role_from_name(args.role)
    if role is Role.CLIENT:
        raise ConfigError(
            "the client runs only from its measured install: use `trustpay client --deploy DIR [--device ID]`"
        )
    if args.metrics_port is not None and role not in SERVER_ROLES:
        raise ConfigError(f"--metrics-port is for the servers; a {role.value} reports on its metrics channel")
    if (args.replica, args.replicas) != (1, 1) and role not in SERVER_ROLES:
        raise ConfigError(f"--replica and --replicas are for the servers; a {role.value} runs once")
    if not 1 <= args.replica <= args.replicas:
        raise ConfigError(f"--replica {args.replica} must be between 1 and --replicas {args.replicas}")
    extra: dict[str, Any] = {}  # to the role class: PaymentServer and TrustServer take db_url
    if args.db is not None:
        if role not in SERVER_ROLES:
            raise ConfigError(f"--db is for the servers; a {role.value} keeps no database")
        extra["db_url"] = from_command_line(args.db)
    dep = Deployment(args.deploy)
    nid = resolve_node_id(dep, role, args.device, args.replica)
    settings = Settings(
        clock_offset_ms=args.clock_offset_ms, replicas=args.replicas, shared=not args.partition
    )
    asyncio.run(
        run_node(
            dep,
            nid,
            args.broker,
            console_level=args.log_level,
            settings=settings,
            metrics_port=args.metrics_port,
            **extra,
        )
    )
    if args.json:
        print_json({"node": nid, "stopped": True})
    return 0
