"""The ``trustpay`` command line.

Each subcommand lives in its own module, which provides ``HELP: str``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is one
line in :data:`COMMANDS`. Only the chosen command's module is imported (every
one only for the overview that ``trustpay --help`` prints), so one command's
dependencies never slow another, and ``trustpay client`` runs no project code
but its boot path (:mod:`ops.client_boot`): this module imports none at the top.
A module with ``HANDLES_ERRORS = True`` reports its own errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

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
    "status": "ops.status_cmd",
}


class CommandModule(Protocol):
    HELP: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser for command ``only`` (importing just its module), or for every command."""
    parser = argparse.ArgumentParser(prog=PROG, description="attestation-gated mobile payments over MQTT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = cast(CommandModule, importlib.import_module(module_name))
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run, handles_errors=getattr(module, "HANDLES_ERRORS", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # the command is the first word (the top level has no options but --help)
    parser = build_parser(words[0] if words and words[0] in COMMANDS else None)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse exits on --help and on usage errors; callers want a code
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    run = cast(Callable[[argparse.Namespace], int], args.run)
    if args.handles_errors:
        return run(args)
    from protocol.errors import ConfigError, TrustpayError  # only once a command that uses them is chosen

    try:
        return run(args)
    except ConfigError as exc:
        return _fail(exc.reason, EXIT_CONFIG)
    except TrustpayError as exc:
        return _fail(exc.reason, EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _fail(reason: str, code: int) -> int:
    print(f"{PROG}: error: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
