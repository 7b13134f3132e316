"""``trustpay demo``: the whole system, as processes on a real broker, scene by scene.

In a fresh temporary deployment of two devices it starts the broker, both
servers and each device's chip and trust module (every node its own process),
then plays the patent's stories with real clients, showing each signed step
event as the platform and devices publish it:

1. a trusted payment (A at start-up, then B and C1-C7);
2. a tampered payment app, deleted at start-up (A3), while the other app still pays;
3. a tampered client: payment disabled (A5) and the client refused (B5);
4. an untrusted verdict: data changed outside a payment, refused at C4;
5. the ledger, checked to the minor unit.

Exit status 0 only if every scene came out as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.deployment import Deployment
from protocol.messages import StepEvent

from .cli_common import add_examples, add_json_argument, print_json
from .launcher import Launcher
from .ledger_cmd import to_json, to_text
from .provision import provision
from .scenario import ClientRun, Scenario
from .watch import EventWatcher, Seen

HELP = "run every role as a process and show a trusted payment, tampering caught, and the ledger"
DEV1, DEV2 = "dev-0001", "dev-0002"
OPENING = 100_000


@dataclass
class Demo(Scenario):
    out: Any = sys.stdout
    failures: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def expect(self, ok: bool, what: str) -> None:
        self.say(f"  {'ok ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    async def pay(self, device: str, *words: str) -> ClientRun:
        """Run a client, showing its command line and what it printed."""
        self.say(f"\n  $ trustpay client --device {device} {' '.join(words)}")
        run = await self.client(device, *words)
        for line in run.lines:
            self.say(
                f"    [report] {line['report']}" if "report" in line else f"    {line.get('message', '')}"
            )
        if run.code not in (0, 1, 3, 4):
            self.say(run.stderr[-2000:])
        return run

    async def restart(self, device: str) -> StepEvent:
        self.say(f"\n  restarting {device}'s trust module: the start-up checks run again")
        return await self.restart_trust_module(device)


def tamper(path: Path, what: bytes) -> None:
    path.write_bytes(path.read_bytes() + what)


async def scene_trusted_payment(d: Demo) -> None:
    d.say("\n== 1. A trusted payment: B1 opens the chip, C1-C4 attest, C5 pays, C6/C7 re-measure")
    run = await d.pay(DEV1, "pay", "12.50", "shop-1")
    confirmed = run.code == 0 and run.result.get("status") == "confirmed"
    d.expect(confirmed, "payment confirmed with a verified receipt")
    steps = {e.step for e in d.watcher.events if e.device == DEV1}
    d.expect({"C1", "C2", "C3", "C4", "C5", "C6", "C7"} <= steps, "every step C1..C7 was published, signed")


async def scene_tampered_app(d: Demo) -> None:
    d.say("\n== 2. Malware patches the 'transit' app in dev-0001's chip")
    tamper(d.dep.app_dir(DEV1, "transit") / "code.py", b"\n# skim 1% of every payment\n")
    done = await d.restart(DEV1)
    deleted = any(e.step == "A3" and e.outcome == "deleted" and e.device == DEV1 for e in d.watcher.events)
    d.expect(deleted and done.outcome == "done", "A3: the tampered app was deleted; start-up complete")
    run = await d.pay(DEV1, "pay", "3.00", "shop-2", "transit")
    d.expect(run.code == 1 and run.result.get("code") == "unknown_app", "the deleted app cannot pay")
    d.expect(any("transit" in r for r in run.reports), "the user is told the app was deleted")
    run = await d.pay(DEV1, "pay", "5.00", "shop-2", "wallet")
    d.expect(run.code == 0 and run.result.get("status") == "confirmed", "the intact app still pays")


async def scene_tampered_client(d: Demo) -> None:
    d.say("\n== 3. Malware patches dev-0002's payment client (its command loop)")
    tamper(d.dep.client_code_dir(DEV2) / "nodes" / "client.py", b"\n# show the user a fake payee\n")
    done = await d.restart(DEV2)
    d.expect(done.outcome == "disabled", "A1 failed, A5: every payment function disabled")
    run = await d.pay(DEV2, "pay", "1.00", "shop-1")
    disabled = run.code == 3 and run.result.get("status") == "disabled"
    d.expect(disabled, "B5: the client reports payment disabled")


async def scene_untrusted_verdict(d: Demo) -> None:
    d.say("\n== 4. Malware rewinds the wallet's transaction counter on dev-0001, outside any payment")
    path = d.dep.app_dir(DEV1, "wallet") / "dynamic.json"
    path.write_bytes(b'{"counter":0,"last_order":""}\n')
    run = await d.pay(DEV1, "pay", "7.00", "shop-3")
    refused = any(e.step == "C4" and e.outcome == "refused" and e.device == DEV1 for e in d.watcher.events)
    d.expect(
        run.code == 1 and run.result.get("code") == "untrusted" and refused,
        "C4: the platform's verdict is contraindicated; the app ends without paying",
    )


async def scene_ledger(d: Demo) -> None:
    d.say("\n== 5. The ledger, as the payment-server's database holds it")
    snapshot = await d.ledger()
    exponent = (await asyncio.to_thread(d.dep.load_manifest)).exponent
    for line in to_text(snapshot, exponent, d.dep.database("ledger")).splitlines():
        d.say(f"    {line}")
    ledger = to_json(snapshot)
    balances = {a["account"]: a["balance"] for a in ledger["accounts"]}
    expected = {
        f"{DEV1}:wallet": OPENING - 1250 - 500,
        "shop-1": 1250,
        "shop-2": 500,
        "shop-3": 0,
        f"{DEV2}:wallet": OPENING,
    }
    d.expect(
        all(balances.get(k) == v for k, v in expected.items()), "balances moved by exactly the amounts paid"
    )
    confirmed = [p for p in ledger["payments"] if p["status"] == "confirmed"]
    d.expect(len(confirmed) == 2, "exactly two payments executed, each once")


SCENES: tuple[Callable[[Demo], Any], ...] = (
    scene_trusted_payment,
    scene_tampered_app,
    scene_tampered_client,
    scene_untrusted_verdict,
    scene_ledger,
)


async def play(workdir: Path, backend: str | None, out: Any = sys.stdout) -> int:
    provision(workdir / "deploy", 2, backend=backend)
    dep = Deployment(workdir / "deploy")
    manifest = dep.load_manifest()
    print(f"trustpay demo: deployment {dep.root} ({manifest.broker.backend} broker, 2 devices)", file=out)

    def show(seen: Seen) -> None:
        if seen.event is not None:
            e = seen.event
            print(
                f"      {e.device or 'platform':<9} {e.step:<3} {e.outcome:<9} {seen.sender:<15} {e.reason}",
                file=out,
                flush=True,
            )

    launcher = Launcher(dep, log_level="warning")
    async with launcher, EventWatcher(dep, launcher.broker_url, on_seen=show) as watcher:
        print(
            "\n== 0. Start-up: broker, trust-server, payment-server, chips, trust modules (A1-A4)",
            file=out,
        )
        took = await launcher.wait_all_up()
        demo = Demo(dep, launcher, watcher, out)
        for device in (DEV1, DEV2):
            await demo.wait_started(device)
        print(f"  all {len(launcher.processes)} nodes up in {took:.1f} s", file=out)
        for scene in SCENES:
            await scene(demo)
        if watcher.rejected:
            demo.expect(False, f"every frame the monitor saw verified (rejected: {dict(watcher.rejected)})")
    print("", file=out)
    if demo.failures:
        print(
            f"demo FAILED: {len(demo.failures)} expectation(s) not met: {'; '.join(demo.failures)}", file=out
        )
        return 1
    print("demo passed: every step came out as expected", file=out)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=["mosquitto", "amqtt"], help="default: Mosquitto where installed"
    )
    parser.add_argument(
        "--keep", type=Path, help="build the deployment here and keep it, instead of a temp dir"
    )
    add_json_argument(parser, 'the story on stderr; on stdout {"passed": ..., "exit": ...} as JSON')
    add_examples(parser, "trustpay demo", "trustpay demo --backend amqtt --keep /tmp/tp-demo --json")


def run(args: argparse.Namespace) -> int:
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout carries only the result
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        code = asyncio.run(play(args.keep, args.backend, out))
    else:
        with tempfile.TemporaryDirectory(prefix="trustpay-demo-") as tmp:
            code = asyncio.run(play(Path(tmp), args.backend, out))
    if args.json:
        print_json({"passed": code == 0, "exit": code, "deployment": str(args.keep) if args.keep else None})
    return code
