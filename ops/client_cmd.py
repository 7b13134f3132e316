"""``trustpay client --deploy DIR --device ID COMMAND...``: the user's payment client (B1-B5).

Part of the client's boot path (:mod:`ops.client_boot`): standard library
only, it parses the command line and hands over to the boot path, which runs
the measured client install or nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import client_boot

HELP = "open the payment client: pay AMOUNT PAYEE [APP] | balance | history | apps | status"
# The boot path reports its own errors: ops.cli must not import project code to catch them.
HANDLES_ERRORS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy", type=Path, required=True, help="deployment directory")
    parser.add_argument("--device", help="device id (default: the only device)")
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("words", nargs=argparse.REMAINDER, help="one command; none opens a prompt")


def run(args: argparse.Namespace) -> int:
    return client_boot.boot(args)
