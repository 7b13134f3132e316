"""The ``trustpay`` command line.

Each subcommand lives in its own module, which provides ``HELP: str``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is one
line in :data:`COMMANDS`. Modules are imported only when their command runs
(and for ``--help``), so one command's dependencies never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from protocol.errors import ConfigError, TrustpayError

PROG = "trustpay"
EXIT_ERROR, EXIT_CONFIG = 1, 2  # 2 is also what argparse uses for a bad command line

# subcommand name -> module implementing it
COMMANDS: dict[str, str] = {
    "provision": "ops.provision",
    "node": "ops.node_cmd",
    "client": "ops.client_cmd",
    "broker": "ops.broker_cmd",
    "up": "ops.up_cmd",
    "release": "ops.release_cmd",
    "rotate-platform": "ops.rotate_cmd",
    "revoke": "ops.revoke_cmd",
    "bench": "ops.bench",
    "ledger": "ops.ledger_cmd",
    "watch": "ops.watch",
    "demo": "ops.demo",
    "ping": "ops.ping_cmd",
}


class CommandModule(Protocol):
    HELP: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="attestation-gated mobile payments over MQTT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = cast(CommandModule, importlib.import_module(module_name))
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors; callers want a code
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    run = cast(Callable[[argparse.Namespace], int], args.run)
    try:
        return run(args)
    except ConfigError as exc:
        return _fail(exc, EXIT_CONFIG)
    except TrustpayError as exc:
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _fail(exc: TrustpayError, code: int) -> int:
    print(f"{PROG}: error: {exc.reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
