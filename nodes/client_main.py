"""The client install's entry point: what ``trustpay client`` runs once the install is checked.

The boot path (``ops.client_boot``) reads the whole install into memory,
checks its digests against the trust module's measurement and calls
:func:`main` from those bytes. Everything from here on is measured code; the
boot path's own project classes are never shared with it, so errors are
reported here, with the command line's exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from protocol.errors import ConfigError, TrustpayError
from protocol.topics import Role, node_id

from .assemble import assemble
from .client import Client
from .deployment import Deployment
from .runtime import Settings

CONNECT_TIMEOUT_S = 10.0  # a user waits for an answer, not for a broker that is not there
EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def main(args: argparse.Namespace, device: str, static: bytes) -> int:
    """Run the client for ``device`` with the parsed command line; its exit code.

    ``static`` is the static data the boot path checked, used instead of a
    second read that could see other bytes.
    """
    try:
        return asyncio.run(run_client(args, device, static))
    except ConfigError as exc:
        return _fail(exc, EXIT_CONFIG, args.json)
    except TrustpayError as exc:
        return _fail(exc, EXIT_ERROR, args.json)
    except KeyboardInterrupt:
        print("trustpay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def run_client(args: argparse.Namespace, device: str, static: bytes) -> int:
    dep = Deployment(args.deploy)
    nid = node_id(Role.CLIENT, device)
    parts = assemble(
        dep,
        nid,
        args.broker,
        console_level=args.log_level,
        # getattr: a boot path from before --clock-offset-ms passes no such option
        settings=Settings(
            connect_timeout_s=CONNECT_TIMEOUT_S, clock_offset_ms=getattr(args, "clock_offset_ms", 0)
        ),
    )
    words = [w for w in args.words if w != "--"]
    client = Client(
        parts.config,
        parts.bus,
        parts.logging.logger,
        deployment=dep,
        command=words,
        out=sys.stdout,
        as_json=args.json,
        interactive=not words and sys.stdin.isatty(),
        static=static,
    )
    parts.bus.will = client.will
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, client.stop)
    try:
        await client.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        parts.logging.close()
    return client.exit_code


def _fail(exc: TrustpayError, code: int, as_json: bool) -> int:
    """The client could not run (no broker, a broken install): nothing was asked of the chip."""
    print(f"trustpay: error: {exc.reason}", file=sys.stderr)
    if as_json:  # a program reading the JSON lines learns why too
        line = {"exit": code, "status": "error", "code": exc.code, "reason": exc.reason}
        print(json.dumps(line), flush=True)
    return code
