"""The chip's payment-app workers from fork servers (``nodes/app_zygote.py``): a fresh child per payment.

The same contract as :class:`nodes.sandbox.Sandbox` (``make_order``, ``warm_up``,
``close``; whatever goes wrong is a typed ``Refused``), the same containment
(``app_runner``'s limits, chroot and ``nobody`` as root, its audit hook), but
no interpreter start per payment: a fork server, itself started by ``exec``
and holding nothing secret, forks one child per payment, which runs the app
once and is killed and reaped. That cut the chip's CPU per payment (its app
workers included) from about 35 ms to a few (``trustpay bench``).

A server answers one request at a time; a few are kept (``MAX_SERVERS``), so
a slow app holds up only its own server. A server that breaks the channel's
rules (an early end, a short or oversized frame, no answer within the wall
limit and a margin) is killed and reaped, and the next payment starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import Refused

from .sandbox import MAX_OUTPUT, WALL_S, AppAnswer, _answer, app_request, spawn_isolated

SERVER = Path(__file__).with_name("app_zygote.py")
MAX_SERVERS = 4
_HEADER = struct.Struct(">I")
_MARGIN_S = 2.0  # the server enforces the wall limit; this side only catches a server that hangs


@dataclass
class _Server:
    proc: asyncio.subprocess.Process
    workdir: Path


class ForkSandbox:
    def __init__(self, *, wall_s: float = WALL_S, max_servers: int = MAX_SERVERS) -> None:
        self.wall_s = wall_s
        self.max_servers = max_servers
        self._idle: list[_Server] = []
        self._count = 0  # servers alive or starting
        self._freed = asyncio.Condition()
        self._starting: asyncio.Task[None] | None = None
        self._closed = False

    def warm_up(self) -> None:
        """Start a server now if there is none, so the first payment does not wait for it."""
        if self._count == 0 and self._starting is None and not self._closed:
            self._starting = asyncio.create_task(self._start_spare(), name="sandbox:spare")

    async def _start_spare(self) -> None:
        try:
            self._count += 1
            try:
                server = await _spawn(self.wall_s)
            except OSError:
                self._count -= 1
                return
            await self._give_back(server)
        finally:
            self._starting = None

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        idle, self._idle = self._idle, []
        for server in idle:
            await _end(server)

    async def make_order(self, code: bytes, static: bytes, dynamic: bytes, call: dict[str, Any]) -> AppAnswer:
        """Run ``make_order`` of ``code`` in a fresh child; refuse, typed, whatever goes wrong."""
        request = app_request(code, static, dynamic, call)
        server = await self._take()
        healthy = False
        try:
            async with asyncio.timeout(self.wall_s + _MARGIN_S):
                status, output = await _exchange(server.proc, request)
            healthy = True
        except TimeoutError as exc:
            raise Refused("app_failed", f"the payment app did not finish within {self.wall_s:g} s") from exc
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            raise Refused("app_failed", f"the payment app's worker failed: {exc}") from exc
        finally:
            if healthy:
                await self._give_back(server)
            else:
                self._count -= 1
                await _end(server)
                async with self._freed:
                    self._freed.notify()
        if status == b"T":
            raise Refused("app_failed", f"the payment app did not finish within {self.wall_s:g} s")
        if len(output) > MAX_OUTPUT:
            why = f"the payment app's worker failed: its answer is over {MAX_OUTPUT} bytes"
            raise Refused("app_failed", why)
        return _answer(output)

    async def _give_back(self, server: _Server) -> None:
        if self._closed:
            self._count -= 1
            await _end(server)
            return
        self._idle.append(server)
        async with self._freed:
            self._freed.notify()

    async def _take(self) -> _Server:
        for _ in range(1_000_000):  # each turn takes, starts, or waits for a server to come free
            while self._idle:
                server = self._idle.pop()
                if server.proc.returncode is None:
                    return server
                self._count -= 1
                await _end(server)
            if self._count < self.max_servers:
                self._count += 1
                try:
                    return await _spawn(self.wall_s)
                except OSError as exc:
                    self._count -= 1
                    why = f"the chip cannot start a worker for the app: {exc}"
                    raise Refused("sandbox_unavailable", why) from exc
            async with self._freed:
                await self._freed.wait()
        raise Refused("sandbox_unavailable", "no app worker came free")


async def _spawn(wall_s: float) -> _Server:
    worker = await spawn_isolated(SERVER, repr(wall_s), limit=MAX_OUTPUT + 64)
    return _Server(worker.proc, worker.workdir)


async def _exchange(proc: asyncio.subprocess.Process, request: bytes) -> tuple[bytes, bytes]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(_HEADER.pack(len(request)) + request)
    await proc.stdin.drain()
    head = await proc.stdout.readexactly(1 + _HEADER.size)
    status, (size,) = head[:1], _HEADER.unpack(head[1:])
    if status not in (b"A", b"T") or size > MAX_OUTPUT + 1:
        raise ValueError("the app worker's server broke the channel")
    return status, await proc.stdout.readexactly(size)


async def _end(server: _Server) -> None:
    """Kill the server if it still runs, reap it, remove its directory."""
    if server.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.kill()
    await server.proc.wait()
    await asyncio.to_thread(shutil.rmtree, server.workdir, True)
