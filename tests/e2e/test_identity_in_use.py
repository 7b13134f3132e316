"""Point 5: a second process with an identity already in use stops at start; the first carries on."""

from __future__ import annotations

import asyncio
import os
import pty
import sys

import pytest

from .conftest import DEV1, E2E, OPENING, WAIT_S, chip_of, client_of

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


async def test_a_second_client_session_for_one_device_is_refused_while_the_first_carries_on(e2e: E2E) -> None:
    """The issue's livelock: two `trustpay client` sessions of one device kicked each other off."""
    client = client_of(DEV1)
    mark = e2e.watcher.mark()
    terminal, tty = pty.openpty()  # the first session is interactive: it needs a terminal
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "client",
        "--deploy", str(e2e.dep.root), "--device", DEV1, "--broker", e2e.launcher.broker_url,
        stdin=tty,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(tty)
    try:
        opened = await e2e.wait_event(mark, node=client, step="B1")
        assert opened.outcome == "ok"

        second = await e2e.client(DEV1, "balance")

        assert second.code == 1, (second.lines, second.stderr[-2000:])
        assert f"{client} is already running in process {first.pid}" in second.stderr
        os.write(terminal, b"pay 1.25 shop-1\nquit\n")
        async with asyncio.timeout(WAIT_S):
            out, err = await first.communicate()
    finally:
        os.close(terminal)
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert first.returncode == 0, (out.decode()[-2000:], err.decode()[-2000:])
    assert "Paid 1.25" in out.decode()
    assert (await e2e.balances())[f"{DEV1}:wallet"] == OPENING - 125
    closed = await e2e.wait_event(mark, node=client, step="B4")
    assert closed.outcome == "ok"
