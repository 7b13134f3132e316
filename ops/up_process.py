"""``trustpay up --json`` as a child process, read event by event; and what /proc says about processes.

The chaos runner starts its deployments this way (the way an operator does, so
the supervisor restarts what a scenario kills), and the supervision tests use it
to kill ``up`` itself and prove that nothing it started survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.deployment import Deployment

WAIT_S = 60.0


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone (a zombie counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]  # after the command name, which may hold anything
    return None if state == "Z" else (state, int(ppid))


def alive(pid: int) -> bool:
    return proc_stat(pid) is not None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children_of(parent: int) -> set[int]:
    pids = (int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    return {pid for pid in pids if (st := proc_stat(pid)) is not None and st[1] == parent}


async def survivors(pidfds: dict[int, int], timeout_s: float) -> set[int]:
    """Wait until every process behind ``pidfds`` exited (or the timeout); those still alive."""
    loop = asyncio.get_running_loop()
    ended: dict[int, asyncio.Future[None]] = {pid: loop.create_future() for pid in pidfds}

    def mark_ended(future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    for pid, fd in pidfds.items():  # a pidfd turns readable when its process exits, child or not
        loop.add_reader(fd, mark_ended, ended[pid])
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*ended.values())
    except TimeoutError:
        pass
    finally:
        for fd in pidfds.values():
            loop.remove_reader(fd)
    return {pid for pid in pidfds if alive(pid)}


class UpEnded(Exception):
    """``up`` closed its output before the awaited event; ``stderr`` is what it said."""


@dataclass
class UpRun:
    """``trustpay up --json`` as a process; its events as they were printed."""

    proc: asyncio.subprocess.Process
    stderr: Path
    root: str  # the deployment's directory: every process `up` starts names it on its command line
    events: list[dict[str, Any]] = field(default_factory=list)
    started: set[int] = field(default_factory=set)  # its children once all was up
    _reading: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def until(self, since: int = 0, timeout_s: float = WAIT_S, **match: Any) -> dict[str, Any]:
        """The first event from position ``since`` whose fields equal ``match``, read as it comes.

        Several waiters may wait at once: one reads, the others find its lines in ``events``.
        """
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:  # each turn reads one more line; bounded by the timeout and by EOF
                for event in self.events[since:]:
                    if all(event.get(k) == v for k, v in match.items()):
                        return event
                since = len(self.events)
                async with self._reading:
                    if len(self.events) > since:
                        continue  # another waiter read a line meanwhile
                    line = await self.proc.stdout.readline()
                if not line:
                    raise UpEnded(f"`up` ended before {match}: {self.stderr.read_text()[-3000:]}")
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))

    def node_pids(self, since: int = 0) -> dict[str, int]:
        return {e["node"]: e["pid"] for e in self.events[since:] if e["event"] == "up"}

    def deaths(self, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[since:] if e["event"] == "died"]

    async def close(self) -> None:
        """Kill it if it still runs, and anything it started that is still there (a failed run)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pid in self.started | set(self.node_pids().values()):
            if alive(pid) and self.root in _cmdline(pid):  # still ours: a pid can be reused
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def stop(self, timeout_s: float = WAIT_S) -> int:
        """SIGTERM, as an operator stops it: every node says "offline" and flushes its log."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


async def start_up(dep: Deployment, stderr: Path, *extra: str) -> UpRun:
    """``trustpay up`` on ``dep``, returned once every node is up (closed again if it never gets there)."""
    with stderr.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "up", "--deploy", str(dep.root), "--json", *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err_file,
        )  # fmt: skip
    run = UpRun(proc, stderr, str(dep.root))
    try:
        await run.until(event="all_up")
    except BaseException:
        await run.close()
        raise
    run.started = children_of(proc.pid)
    return run


@contextlib.asynccontextmanager
async def running_up(dep: Deployment, stderr: Path, *extra: str) -> AsyncIterator[UpRun]:
    """``trustpay up`` on ``dep`` until every node is up; killed (with whatever it started) at the end."""
    run = await start_up(dep, stderr, *extra)
    try:
        yield run
    finally:
        await run.close()
