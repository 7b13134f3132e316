"""The ``trustpay`` command line.

Each subcommand lives in its own module, which provides ``HELP: str``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is one
line in :data:`COMMANDS`. Only the chosen command's module is imported (every
one only for the overview that ``trustpay --help`` prints), so one command's
dependencies never slow another, and ``trustpay client`` runs no project code
but its boot path (:mod:`ops.client_boot`): this module imports no project code
at the top but :mod:`ops.cli_common` (standard library only, part of that path).
A module with ``HANDLES_ERRORS = True`` reports its own errors. Options work
anywhere on the line; the conventions every command follows (``--deploy``,
``--json``, examples under ``--help``) are in :mod:`ops.cli_common`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from .cli_common import resolve_deploy

PROG = "trustpay"
EXIT_ERROR, EXIT_CONFIG = 1, 2  # 2 is also what argparse uses for a bad command line

# subcommand name -> module implementing it
COMMANDS: dict[str, str] = {
    "provision": "ops.provision",
    "node": "ops.node_cmd",
    "client": "ops.client_cmd",
    "broker": "ops.broker_cmd",
    "up": "ops.up_cmd",
    "fleet": "ops.fleet",
    "release": "ops.release_cmd",
    "rotate-platform": "ops.rotate_cmd",
    "revoke": "ops.revoke_cmd",
    "bench": "ops.bench",
    "ledger": "ops.ledger_cmd",
    "watch": "ops.watch",
    "monitor": "ops.monitor_cmd",
    "demo": "ops.demo",
    "ping": "ops.ping_cmd",
    "status": "ops.status_cmd",
    # two words: argparse cannot parse options intermixed across subparsers, so an action is a command
    "chaos proxy": "ops.chaos_cmd",
    "chaos fuzz": "ops.chaos.fuzz",
    "chaos run": "ops.chaos_run_cmd",
    "attack": "ops.attack_cmd",
}


class CommandModule(Protocol):
    HELP: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of command ``name``, importing just its module."""
    module = cast(CommandModule, importlib.import_module(COMMANDS[name]))
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=module.HELP)
    module.add_arguments(parser)
    parser.set_defaults(
        run=module.run,
        handles_errors=getattr(module, "HANDLES_ERRORS", False),
        needs_deploy=getattr(module, "needs_deploy", lambda args: True),
    )
    return parser


def overview_parser() -> argparse.ArgumentParser:
    """``trustpay --help``: every command and what it does (each module imported for its HELP)."""
    parser = argparse.ArgumentParser(prog=PROG, description="attestation-gated mobile payments over MQTT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        sub.add_parser(name, help=cast(CommandModule, importlib.import_module(module_name)).HELP)
    parser.epilog = f"`{PROG} COMMAND --help` shows a command's options and examples"
    return parser


def parse(words: Sequence[str]) -> argparse.Namespace:
    """The command line, options anywhere (``--`` before a word that starts with a dash).

    The command is the first word (the top level has no options but --help);
    its own parser reads the rest intermixed, so ``pay 1.25 shop-1 --json``
    means what it says. Raises SystemExit as argparse does.
    """
    name = " ".join(words[:2]) if " ".join(words[:2]) in COMMANDS else (words[0] if words else "")
    if name not in COMMANDS:
        overview_parser().parse_args(list(words[:1]))  # --help, or a usage error naming the commands
        raise SystemExit(EXIT_CONFIG)  # not reached: argparse has said what is wrong
    parser = command_parser(name)
    args = parser.parse_intermixed_args(words[len(name.split()) :])
    args.command = name
    if "deploy" in vars(args) and (args.deploy is not None or args.needs_deploy(args)):
        try:
            args.deploy = resolve_deploy(args.deploy)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
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
