"""Point 5: a second process with an identity already in use stops at start; the first carries on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from .conftest import DEV1, E2E, OPENING, WAIT_S, chip_of

pytestmark = pytest.mark.e2e


async def test_a_second_chip_for_one_device_is_refused_and_the_running_one_still_pays(e2e: E2E) -> None:
    chip = chip_of(DEV1)
    running = e2e.launcher.processes[chip]
    assert running.pid is not None
    mark = e2e.watcher.mark()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "node", "chip",
        "--deploy", str(e2e.dep.root), "--device", DEV1, "--broker", e2e.launcher.broker_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S):
        _, err = await proc.communicate()

    assert proc.returncode == 1, err.decode()
    assert f"{chip} is already running in process {running.pid}" in err.decode()
    # it never reached the broker: no status of a second chip, no session taken over
    assert not e2e.events(mark, device=DEV1, step="A1")
    assert e2e.launcher.processes[chip].pid == running.pid and not e2e.launcher.unexpected_exits
    run = await e2e.pay(DEV1, "1.25", "shop-1")
    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert (await e2e.balances())[f"{DEV1}:wallet"] == OPENING - 125
