"""The chip's worker for untrusted payment-app code (C5): the measured bytes, nothing else.

Why a separate interpreter: the chip's process holds its private keys in
memory, and Python code in the same process can reach anything in it. A
worker started with ``exec`` (never ``fork``, which would copy those keys)
holds nothing secret. It gets the exact code bytes the trust module measured,
the static and dynamic data, and the call's arguments on stdin, and answers
one JSON object on stdout. ``nodes/app_runner.py`` locks it down (resource
limits; as root a chroot into an empty directory and the ``nobody`` user; in
every case an audit hook that refuses files, ``os``, sockets, subprocesses,
ctypes and unlisted imports). This side bounds it from outside: a wall-clock
limit after which the worker is killed and reaped, and a cap on its output.
Whatever goes wrong in the worker is a ``Refused("app_failed")``, never an
exception that would take the chip down.

Starting an interpreter costs tens of milliseconds, so one worker is started
ahead (warm) and waits for its single request; each payment takes it, and the
chip starts the next one once the payment is over. A worker is used once: nothing of one payment's app
survives into the next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import Refused

RUNNER = Path(__file__).with_name("app_runner.py")
WALL_S = 3.0  # an honest make_order takes well under a millisecond
MAX_OUTPUT = 64 * 1024
WORKER_NICE = 10


@dataclass(frozen=True)
class AppAnswer:
    """What the app returned: the order's fields and its next dynamic data (unchecked)."""

    order: dict[str, Any]
    dynamic: dict[str, Any]


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    workdir: Path


def app_request(code: bytes, static: bytes, dynamic: bytes, call: dict[str, Any]) -> bytes:
    """What a worker reads: the app's three files and the call, as ``nodes/app_runner.py`` expects."""
    return json.dumps(
        {
            "code": base64.b64encode(code).decode(),
            "static": base64.b64encode(static).decode(),
            "dynamic": base64.b64encode(dynamic).decode(),
            "call": call,
        }
    ).encode()


class Sandbox:
    def __init__(self, *, wall_s: float = WALL_S) -> None:
        self.wall_s = wall_s
        self._spare: asyncio.Task[_Worker] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def warm_up(self) -> None:
        """Start the next worker now, so the next payment does not wait for it.

        The chip calls this after a payment, not during one: starting an interpreter
        costs tens of milliseconds of CPU that the payment itself should not compete with.
        """
        if self._spare is None:
            self._spare = asyncio.create_task(_spawn(), name="sandbox:spare")

    async def close(self) -> None:
        await asyncio.gather(*self._ending, return_exceptions=True)
        spare, self._spare = self._spare, None
        if spare is None:
            return
        with contextlib.suppress(OSError):  # not cancelled: a half-started process would be orphaned
            await _end(await spare)

    async def make_order(self, code: bytes, static: bytes, dynamic: bytes, call: dict[str, Any]) -> AppAnswer:
        """Run ``make_order`` of ``code`` in a fresh worker; refuse, typed, whatever goes wrong."""
        request = app_request(code, static, dynamic, call)
        worker = await self._take()
        try:
            async with asyncio.timeout(self.wall_s):
                output = await _exchange(worker.proc, request)
        except TimeoutError as exc:
            raise Refused("app_failed", f"the payment app did not finish within {self.wall_s:g} s") from exc
        except (OSError, ValueError) as exc:  # a worker that died early breaks the pipe
            raise Refused("app_failed", f"the payment app's worker failed: {exc}") from exc
        finally:  # killed now; reaped and removed beside the rest of the payment
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            ending = asyncio.create_task(_end(worker), name="sandbox:end")
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)
        return _answer(output)

    async def _take(self) -> _Worker:
        spare, self._spare = self._spare, None
        try:
            worker = await (spare if spare is not None else _spawn())
            if worker.proc.returncode is not None:  # died while waiting: start a fresh one
                await _end(worker)
                worker = await _spawn()
        except OSError as exc:
            why = f"the chip cannot start a worker for the app: {exc}"
            raise Refused("sandbox_unavailable", why) from exc
        return worker


async def spawn_isolated(script: Path, *args: str, limit: int) -> _Worker:
    """``script`` in a fresh ``python -I -S`` by exec: empty environment, an empty working
    directory of its own, its own session, lowered priority. The app workers and the fork
    server both start this way, so neither holds anything of the chip's."""
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="trustpay-app-"))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(script),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},
            cwd=workdir,
            start_new_session=True,  # a Ctrl-C meant for the chip's terminal is not the worker's
            limit=limit,  # the most one answer may hold
        )
    except OSError:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
        raise
    # Lowered from here, at once: the interpreter's own start-up (tens of ms of CPU) runs while the
    # last payment's C6 and C7 are still under way and must not slow them down.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, proc.pid, WORKER_NICE)
    return _Worker(proc, workdir)


async def _spawn() -> _Worker:
    return await spawn_isolated(RUNNER, limit=MAX_OUTPUT)


async def _exchange(proc: asyncio.subprocess.Process, request: bytes) -> bytes:
    """Send the request; the answer is one line (JSON escapes newlines), read without waiting for exit."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(request)
    await proc.stdin.drain()
    proc.stdin.close()
    try:
        return await proc.stdout.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        raise ValueError(f"the app's answer is over {MAX_OUTPUT} bytes") from exc
    except asyncio.IncompleteReadError as exc:  # it ended without a whole answer: a crash or an exit
        return exc.partial


async def _end(worker: _Worker) -> None:
    """Kill the worker if it still runs, reap it, remove its directory."""
    if worker.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
    await worker.proc.wait()
    await asyncio.to_thread(shutil.rmtree, worker.workdir, True)


def _answer(output: bytes) -> AppAnswer:
    try:
        answer = json.loads(output)
    except (ValueError, RecursionError) as exc:  # nesting deep enough to exhaust the stack, too
        raise Refused("app_failed", "the payment app crashed or answered garbage") from exc
    if not isinstance(answer, dict):
        raise Refused("app_failed", "the payment app's answer is not a map")
    if "refused" in answer:  # the app's own no (ValueError): its reason is for the user
        raise Refused("invalid_order", str(answer["refused"])[:500])
    if "error" in answer:
        raise Refused("app_failed", f"the payment app failed: {str(answer['error'])[:500]}")
    order, dynamic = answer.get("order"), answer.get("dynamic")
    if not (isinstance(order, dict) and isinstance(dynamic, dict)):
        raise Refused("app_failed", "the payment app must return (order fields, next dynamic data) as maps")
    return AppAnswer(order, dynamic)
