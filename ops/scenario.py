"""A running deployment driven from outside, as its users drive it: the demo's and the end-to-end tests' base.

It holds the launcher (every node a process), a watcher (every step event,
verified), and runs clients as their own processes, the way a phone's owner
opens the payment app.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

from nodes.deployment import Deployment
from nodes.ledger import Snapshot, read_snapshot
from protocol.messages import StepEvent
from protocol.topics import Role, node_id

from .launcher import Launcher
from .watch import EventWatcher

CLIENT_TIMEOUT_S = 90.0


@dataclass
class ClientRun:
    code: int
    lines: list[dict[str, Any]]  # every JSON line the client printed: reports, then the result
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        return self.lines[-1] if self.lines else {}

    @property
    def reports(self) -> list[str]:
        return [line["report"] for line in self.lines if "report" in line]


async def run_client(dep: Deployment, device: str, broker_url: str | None, *words: str) -> ClientRun:
    """``trustpay client --json`` as its own process, the way a phone's owner opens the app.

    Raises TimeoutError (the process killed and reaped) when it takes over ``CLIENT_TIMEOUT_S``.
    """
    broker = ("--broker", broker_url) if broker_url else ()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.cli",
        "client",
        "--deploy",
        str(dep.root),
        "--device",
        device,
        *broker,
        "--json",
        *words,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    return ClientRun(proc.returncode if proc.returncode is not None else -1, lines, stderr.decode())


@dataclass
class Scenario:
    dep: Deployment
    launcher: Launcher
    watcher: EventWatcher

    async def client(self, device: str, *words: str) -> ClientRun:
        """``trustpay client --json`` as its own process; its exit code and output."""
        return await run_client(self.dep, device, self.launcher.broker_url, *words)

    async def wait_started(self, device: str, since: int = 0) -> StepEvent:
        """The end of a device's start-up checks (A): "done", or "disabled" after A5."""
        return await self.watcher.wait_for(lambda e: e.step == "A" and e.device == device, 60, since=since)

    async def restart_trust_module(self, device: str) -> StepEvent:
        """Stop a device's trust module and start it again: the start-up checks run again."""
        mark = self.watcher.mark()
        await self.launcher.restart(node_id(Role.TRUST_MODULE, device))  # a clean stop, then a fresh start
        return await self.wait_started(device, since=mark)

    async def ledger(self) -> Snapshot:
        return await read_snapshot(self.dep.database("ledger"))  # SQLite file or PostgreSQL, as provisioned

    async def balances(self) -> dict[str, int]:
        return {a.account: a.balance for a in (await self.ledger()).accounts}
