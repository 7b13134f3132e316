"""``trustpay up --deploy DIR``: run a whole deployment as processes until Ctrl-C or SIGTERM.

Broker (unless ``--broker``), the two servers, then each device's chip and
trust module, every node its own process (:class:`ops.launcher.Launcher`), or
with more than ``FLEET_FROM`` devices (``--fleet``) every chip in one process and
every trust module in another (:mod:`ops.fleet`);
clients are started by users with ``trustpay client``. A node counts as up when
its signed "online" status arrives.

Once all are up, a node that dies is reported (which node, its exit code or
signal, its last log lines) and started again after a backoff delay while the
others keep running (``--restart``, see :mod:`ops.supervise`); ``--restart
never`` stops everything at the first death instead. If this command is
SIGKILLed, the kernel kills every process it started (:mod:`ops.parent_death`).

Exit status: 0 when everything came up and was stopped on request; 1 when a
node did not come up in time, the status monitor lost the broker, or (with
``--restart never``) a node died; 130 when a signal arrived before all nodes
were up. Every exit path stops the nodes (devices first, then servers) and then
the broker this command started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import signal
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from broker import BACKENDS
from nodes.deployment import Deployment

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .launcher import Launcher, LaunchError, NodeExit, NodeProcess
from .supervise import Restart, Supervisor

HELP = "run the broker, the servers and each device's chip and trust module as processes"
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
FLEET_FROM = 8  # more devices than this run as fleets unless --fleet off
T = TypeVar("T")
# --json for this run, read by say() from the launcher's callbacks too
AS_JSON: contextvars.ContextVar[bool] = contextvars.ContextVar("up_as_json", default=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "one JSON object per event (up, down, died, restarting, stopped...)")
    add_examples(
        parser,
        "trustpay up --deploy deploy",
        "trustpay up --devices 1 --json            # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
        "trustpay up --broker mqtt://127.0.0.1:1883  # nodes only, on a broker already running",
        "trustpay up --restart never               # the first node that dies stops everything",
        "trustpay up --clock-offset dev-0002=-40000  # dev-0002's clock 40 s slow: it is refused clock_skew",
        "trustpay up --replicas 2                  # two trust-servers and two payment-servers",
        "trustpay up --replicas 2 --db postgresql://postgres@127.0.0.1:5432/trustpay",
    )
    parser.add_argument("--devices", type=int, metavar="N", help="run the first N devices (default: all)")
    parser.add_argument("--broker", help="use this running broker (mqtt://host:port[?v=5|3.1.1]); start none")
    parser.add_argument("--backend", choices=BACKENDS, help="broker to start (default: the manifest's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for everything to come up")
    parser.add_argument(
        "--restart",
        type=Restart,
        choices=list(Restart),
        default=Restart.ALWAYS,
        help="when a node dies after start-up: always start it again (default; a node is never meant "
        "to exit), on-failure (not after a clean exit), never (stop everything)",
    )
    parser.add_argument(
        "--fleet",
        choices=["auto", "on", "off"],
        default="auto",
        help="run the device nodes as two fleets (every chip in one process, every trust module in another; "
        "each node still its own MQTT client and identity): auto (default) when more than "
        f"{FLEET_FROM} devices run, on, off (a process per node)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics on 127.0.0.1: the trust-server on P, the payment-server on P+1 "
        "(with replicas: each server on the next port, trust-servers first)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="run N replicas of the trust-server and of the payment-server (provisioned with "
        "--replicas N or more); they share the role's database and its reply log",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the servers' database for this run (postgresql://...; default: the manifest's, "
        "see `trustpay provision --db`)",
    )
    parser.add_argument(
        "--clock-offset",
        type=clock_offset,
        action="append",
        default=[],
        metavar="DEVICE=MS",
        help="run DEVICE's chip and trust module with their clock MS milliseconds off (negative: behind), "
        "to test a device whose clock is wrong; repeatable. Run its client with the same "
        "--clock-offset-ms",
    )


def clock_offset(text: str) -> tuple[str, int]:
    """``DEVICE=MS`` of ``--clock-offset``."""
    device, sep, ms = text.partition("=")
    try:
        if not sep or not device:
            raise ValueError(text)
        return device, int(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not DEVICE=MS, e.g. dev-0001=-40000") from None


def run(args: argparse.Namespace) -> int:
    AS_JSON.set(args.json)
    return asyncio.run(_up(args))


async def _up(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # ours, so the stopping order is ours too
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _run(args, stop, received)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(args: argparse.Namespace, stop: asyncio.Event, received: list[str]) -> int:
    all_up = asyncio.Event()  # before it, a failure report with the log tails follows anyway
    dep = Deployment(args.deploy.resolve())
    fleet = args.fleet == "on"
    if args.fleet == "auto":
        count = args.devices if args.devices is not None else len(dep.load_manifest().devices)
        fleet = count > FLEET_FROM and not args.clock_offset  # an offset is one device's nodes' own
    launcher = Launcher(
        dep,
        args.devices,
        args.broker,
        args.backend,
        up_timeout_s=args.timeout,
        metrics_port=args.metrics_port,
        clock_offsets=dict(args.clock_offset),
        on_up=_print_up,
        on_exit=lambda ex: _print_exit(ex, all_up),
        fleet=fleet,
        replicas=args.replicas,
        db=args.db,
    )
    code = 0
    async with launcher as up:
        if up.broker is not None:
            b = up.broker
            say(f"broker  {b.backend} at {b.url}  (pid {b.pid})", event="broker", url=b.url, pid=b.pid)
        else:
            say(
                f"broker  {up.broker_url}  (already running; not started here)",
                event="broker",
                url=up.broker_url,
            )
        say(
            f"starting {len(up.processes)} nodes (Ctrl-C stops them)",
            event="starting",
            nodes=len(up.processes),
        )
        for nid in up.servers:
            port = up.metrics_port_of(nid)
            if port is not None:
                say(
                    f"metrics {nid} at http://127.0.0.1:{port}/metrics",
                    event="metrics",
                    role=up.processes[nid].role.value,
                    node=nid,
                    url=f"http://127.0.0.1:{port}/metrics",
                )
        outcome = await _unless(stop, _outcome(up.wait_all_up()))
        if outcome is None:
            say(
                f"{received[0]} before all nodes were up: stopping",
                err=True,
                event="stopping",
                reason=received[0],
            )
            code = EXIT_INTERRUPTED
        elif isinstance(outcome, LaunchError):
            say(f"trustpay up: {outcome.reason}: stopping", err=True, event="failed", reason=outcome.reason)
            say(outcome.report, err=True)
            code = EXIT_FAILED
        else:
            n = len(up.processes)
            say(f"all {n} nodes up in {outcome:.1f} s{_noise(up)}", event="all_up", nodes=n, seconds=outcome)
            all_up.set()
            supervisor = Supervisor(up, args.restart, lambda text, bad, ev: say(text, err=bad, **ev))
            failure = await _unless(stop, supervisor.run())
            if failure is None:
                say(
                    f"{received[0]}: stopping devices, then servers, then the broker",
                    event="stopping",
                    reason=received[0],
                )
            else:
                first = failure.splitlines()[0]
                say(f"trustpay up: {first}: stopping everything", err=True, event="failed", reason=first)
                code = EXIT_FAILED
    n = len(launcher.processes)
    text = f"stopped {n} nodes" + (" and the broker" if launcher.broker else "")
    say(text, event="stopped", nodes=n, broker=launcher.broker is not None, exit=code)
    return code


async def _outcome(waiting: Awaitable[float]) -> float | LaunchError:
    try:
        return await waiting
    except LaunchError as exc:
        return exc


async def _unless(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if ``stop`` is set first (``work`` is then cancelled)."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(_as_coro(work))
        stopper = tg.create_task(stop.wait())
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        stopper.cancel()
    return None if task.cancelled() else task.result()


async def _as_coro(work: Awaitable[T]) -> T:
    return await work


def _noise(up: Launcher) -> str:
    rejected = sum(up.rejected.values())
    return f"; ignored {rejected} unverifiable status frames {dict(up.rejected)}" if rejected else ""


def _print_up(node: NodeProcess) -> None:
    after = node.up_after_s or 0
    say(
        f"up    {node.node_id:<16} (pid {node.pid}, {after:.1f} s)",
        event="up",
        node=node.node_id,
        pid=node.pid,
        seconds=after,
    )


def _print_exit(ex: NodeExit, all_up: asyncio.Event) -> None:
    if ex.deliberate:
        say(
            f"down  {ex.node_id:<16} (pid {ex.pid}, {ex.how})",
            event="down",
            node=ex.node_id,
            pid=ex.pid,
            how=ex.how,
        )
    else:
        text = f"DIED  {ex.describe() if all_up.is_set() else ex.describe().splitlines()[0]}"
        say(text, err=True, event="died", node=ex.node_id, pid=ex.pid, how=ex.how)


def say(text: str, err: bool = False, **event: Any) -> None:
    """A line for the person watching; with --json, ``event`` as a JSON line and the text on stderr."""
    if AS_JSON.get():
        if event:
            print_json(event)
        err = True  # stdout carries only JSON
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
