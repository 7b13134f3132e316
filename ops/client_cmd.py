"""``trustpay client --deploy DIR --device ID COMMAND...``: the user's payment client (B1-B5).

Part of the client's boot path (:mod:`ops.client_boot`): standard library
only (with :mod:`ops.cli_common`, also on that path), it parses the command
line and hands over to the boot path, which runs the measured client install
or nothing.
"""

from __future__ import annotations

import argparse

from . import client_boot
from .cli_common import add_clock_offset_argument, add_deploy_argument, add_examples, add_json_argument

HELP = "open the payment client: pay AMOUNT PAYEE [APP] | balance | history | apps | status"
# The boot path reports its own errors: ops.cli must not import project code to catch them.
HANDLES_ERRORS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    parser.add_argument("--device", help="device id (default: the only device)")
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_json_argument(parser, "print one JSON object per report and result")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_clock_offset_argument(
        parser, "with `trustpay up --clock-offset DEVICE=MS` for its chip and trust module"
    )
    # "*", not REMAINDER: options after the command's words are still options ("--" passes "-x" on)
    parser.add_argument("words", nargs="*", help="one command; none opens a prompt")
    add_examples(
        parser,
        "trustpay client --deploy deploy --device dev-0001 pay 12.50 shop-1",
        "trustpay client --device dev-0001 pay 1.25 shop-1 wallet --json   # deploy from $TRUSTPAY_DEPLOY",
        "trustpay client balance                                         # the only device of ./deploy",
    )


def run(args: argparse.Namespace) -> int:
    return client_boot.boot(args)
