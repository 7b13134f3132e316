"""``trustpay chaos run SCENARIO``: a deployment behind the fault proxy, payments, and the invariants checked.

See :mod:`ops.chaos.run` for what a run does and :mod:`ops.chaos.scenarios`
for the scenarios. Exit status: 0 when every invariant held, 1 when one broke
(the report says which, with its evidence), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from .chaos.actions import ACTIONS
from .chaos.run import RunOptions, run_scenario
from .chaos.scenarios import SCENARIOS, scenario
from .cli_common import add_examples, add_json_argument, print_json

HELP = "run a chaos scenario on a fresh deployment and check the invariants (lossy-radio, kill-up ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_examples(
        parser,
        "trustpay chaos run lossy-radio",
        "trustpay chaos run kill-servers --payments 200 --devices 5 --seed 7 --dir ./chaos-runs/kill",
        "trustpay chaos run kill-replica --db 'postgresql://postgres@127.0.0.1:5432/test?trustpay_schema=chaos1'",
        "trustpay chaos run --list",
    )
    add_json_argument(parser, "the report as one JSON object")
    parser.add_argument("scenario", nargs="?", help="one of: " + ", ".join(SCENARIOS))
    parser.add_argument("--list", action="store_true", help="list the scenarios and what each does")
    parser.add_argument("--seed", type=int, default=0, help="seed of amounts, payees and faults (default 0)")
    parser.add_argument("--payments", type=int, default=12, help="payments in all (default 12)")
    parser.add_argument("--devices", type=int, default=3, help="devices paying in parallel (default 3)")
    parser.add_argument(
        "--backend", choices=("mosquitto", "amqtt"), help="broker (default: the scenario's, else mosquitto)"
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the servers' database, postgresql://... (default: SQLite files in the run's deployment); "
        "a scenario with replicas (kill-replica) is meant for it",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="where the deployment, its logs and report.json go (default: a temporary directory, "
        "kept only when an invariant broke)",
    )


def run(args: argparse.Namespace) -> int:
    if args.list or not args.scenario:
        for sc in SCENARIOS.values():
            print(f"{sc.name:<22} {sc.summary}")
        return 0 if args.list else 2
    if args.payments < 1 or args.devices < 1:
        raise SystemExit("trustpay chaos run: --payments and --devices must be at least 1")
    sc = scenario(args.scenario)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix=f"trustpay-chaos-{sc.name}-"))
    opts = RunOptions(sc, run_dir, args.seed, args.payments, args.devices, args.backend, args.db)
    report = asyncio.run(run_scenario(opts, ACTIONS))
    if args.json:
        print_json(report.as_json())
    else:
        print(report.text())
    if report.held and args.dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if not args.json:
            print(f"  (removed {run_dir}: give --dir to keep a run)")
    return 0 if report.held else 1
