"""What every ``trustpay`` command's command line has in common.

``--deploy DIR`` (else ``$TRUSTPAY_DEPLOY``, else ``./deploy``), ``--json``
for machine output, and examples under ``--help``. A command module calls
these from its ``add_arguments``; :mod:`ops.cli` parses options wherever they
stand and fills in the deployment directory before the command runs.

Part of the client's boot path (:mod:`ops.client_boot`, docs/SECURITY.md):
standard library only, and it reads nothing but the environment variable and
whether ``./deploy`` is a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEPLOY_ENV = "TRUSTPAY_DEPLOY"
DEFAULT_DEPLOY = Path("deploy")


def add_deploy_argument(parser: argparse.ArgumentParser) -> None:
    """``--deploy DIR``; left None here, filled in by :func:`resolve_deploy` once parsed."""
    parser.add_argument(
        "--deploy",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"deployment directory (default: ${DEPLOY_ENV}, else ./{DEFAULT_DEPLOY})",
    )


def add_json_argument(parser: argparse.ArgumentParser, what: str = "print JSON for other tools") -> None:
    parser.add_argument("--json", action="store_true", help=what)


def add_clock_offset_argument(parser: argparse.ArgumentParser, effect: str) -> None:
    """``--clock-offset-ms``: run as a device whose clock is wrong (``effect``: what it changes)."""
    parser.add_argument(
        "--clock-offset-ms",
        type=int,
        default=0,
        metavar="MS",
        help=f"run with the clock MS milliseconds off (negative: behind), to test a device whose clock is "
        f"wrong: {effect}",
    )


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """``--replica K``, ``--replicas N``, ``--partition``: which server replica a process runs, and how."""
    parser.add_argument(
        "--replica",
        type=int,
        default=1,
        metavar="K",
        help="servers: replica K of the role (1: the role's name)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="servers: N replicas of each role run at once (they share its requests through $share)",
    )
    parser.add_argument(
        "--partition",
        action="store_true",
        help="servers with --replicas: split the devices between the replicas instead of $share "
        "(brokers without shared subscriptions: amqtt, NATS)",
    )


def add_examples(parser: argparse.ArgumentParser, *lines: str) -> None:
    """Show ``lines`` (command lines, each with an optional ``# why``) under ``--help``."""
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' lines as written


def resolve_deploy(given: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The deployment directory: ``given``, else ``$TRUSTPAY_DEPLOY``, else ``./deploy``.

    Raises ValueError naming every place looked at when none is there. A set
    variable that names nothing is an error, never a quiet fall back to
    ./deploy: a revocation or release must not land in another deployment.
    """
    if given is not None:
        return given  # the command says what it finds there
    named = environ.get(DEPLOY_ENV)
    if named:
        if not Path(named).is_dir():
            raise ValueError(f"${DEPLOY_ENV} is {named!r}, which is not a directory; give --deploy DIR")
        return Path(named)
    if DEFAULT_DEPLOY.is_dir():
        return DEFAULT_DEPLOY
    raise ValueError(
        f"no deployment directory: give --deploy DIR, or set ${DEPLOY_ENV}, "
        f"or run where ./{DEFAULT_DEPLOY} exists (not in {Path.cwd()})"
    )


def print_json(data: Mapping[str, Any]) -> None:
    """One JSON object on one line (a stream prints one per line)."""
    print(json.dumps(data, default=str), file=sys.stdout, flush=True)
