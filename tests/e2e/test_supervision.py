"""``trustpay up`` as a supervisor, with real processes on a real broker.

A node that dies is reported and started again while the others keep running;
a node that keeps failing is reported at every attempt with growing delays;
``up`` SIGKILLed takes every process it started with it (the broker too).
No sleeps: every wait is on an output line, a callback or a pidfd, under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodes.deployment import Deployment
from ops import up_process
from ops.launcher import Launcher, NodeExit, NodeProcess
from ops.provision import provision
from ops.supervise import Backoff, Restart, Supervisor
from ops.up_process import UpRun, alive, children_of, survivors

pytestmark = pytest.mark.e2e

# Mosquitto where installed: a broker that, unlike ours on amqtt, never notices its parent is gone
BACKEND = "mosquitto" if shutil.which("mosquitto") else "amqtt"
NODES = {"trust-server", "payment-server", "dev-0001.chip", "dev-0001.tm"}
WAIT_S = 60.0


def deploy(tmp_path: Path) -> Deployment:
    provision(tmp_path / "d", 1, backend=BACKEND)
    return Deployment(tmp_path / "d")


@contextlib.asynccontextmanager
async def running_up(dep: Deployment, tmp_path: Path, *extra: str) -> AsyncIterator[UpRun]:
    async with up_process.running_up(dep, tmp_path / "up.stderr", *extra) as run:
        yield run


async def test_a_trust_server_killed_twice_comes_back_the_others_keep_their_pids_and_a_payment_goes_through(
    tmp_path: Path,
) -> None:
    dep = deploy(tmp_path)
    async with running_up(dep, tmp_path) as up:
        broker = (await up.until(event="broker"))["pid"]
        first = up.node_pids()
        assert set(first) == NODES
        mark = len(up.events)

        for attempt, sig, how in (
            (1, signal.SIGTERM, "exit code 0"),
            (2, signal.SIGKILL, "killed by SIGKILL"),
        ):
            since = len(up.events)
            old = up.node_pids()["trust-server"]
            os.kill(old, sig)
            died = await up.until(since, event="died", node="trust-server")
            assert (died["pid"], died["how"]) == (old, how)
            restarting = await up.until(since, event="restarting", node="trust-server")
            assert restarting["attempt"] == attempt  # died again soon after: a longer delay than the first
            back = await up.until(since, event="up", node="trust-server")
            assert back["pid"] != old and alive(back["pid"])

        # reported with which node, how it ended and the last lines of its log
        report = up.stderr.read_text()
        assert report.count("DIED  trust-server") == 2 and "node.stopped" in report
        assert f"--- log of trust-server: {dep.log_path('trust-server')}" in report

        pay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "client", "--deploy", str(dep.root), "--device", "dev-0001",
            "--json", "pay", "1.00", "shop-1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT_S):
            out, err = await pay.communicate()
        result = json.loads(out.decode().splitlines()[-1])
        assert pay.returncode == 0 and result["status"] == "confirmed", (out, err[-2000:])

        # nobody else was touched: same pids, still running, still the children of `up`
        again = up.node_pids(mark)
        assert set(again) == {"trust-server"}
        others = {nid: pid for nid, pid in first.items() if nid != "trust-server"}
        assert children_of(up.proc.pid) == {broker, again["trust-server"], *others.values()}
        assert not [e for e in up.events if e["event"] == "died" and e["node"] != "trust-server"]

        up.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await up.proc.wait() == 0
        stopped = await up.until(event="stopped")
        assert stopped["exit"] == 0 and stopped["nodes"] == 4
    assert not any(alive(pid) for pid in {broker, again["trust-server"], *others.values()})


async def test_up_sigkilled_leaves_no_process_it_started(tmp_path: Path) -> None:
    dep = deploy(tmp_path)
    async with running_up(dep, tmp_path) as up:
        broker = (await up.until(event="broker"))["pid"]
        started = children_of(up.proc.pid)
        assert started == {broker, *up.node_pids().values()} and len(started) == 5  # nothing else
        pidfds = {pid: os.pidfd_open(pid) for pid in started}  # held now: pids cannot be reused
        try:
            up.proc.kill()
            await up.proc.wait()
            # without the parent-death guard every node stays (reconnecting forever) and so does Mosquitto
            assert await survivors(pidfds, 15.0) == set()
        finally:
            for fd in pidfds.values():
                os.close(fd)


@dataclass
class Seen:
    """What the launcher and the supervisor reported, and a way to wait for the next report."""

    notices: list[dict[str, Any]] = field(default_factory=list)
    ups: list[NodeProcess] = field(default_factory=list)
    exits: list[NodeExit] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self, text: str, bad: bool, fields: dict[str, Any]) -> None:
        self.notices.append({"text": text, "bad": bad, **fields})
        self.changed.set()

    def up(self, node: NodeProcess) -> None:
        self.ups.append(node)
        self.changed.set()

    def exit(self, died: NodeExit) -> None:
        self.exits.append(died)
        self.changed.set()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [n for n in self.notices if n["event"] == event]

    async def until(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # each turn waits for a new report; bounded by the timeout
                self.changed.clear()
                await self.changed.wait()


async def test_a_node_that_keeps_failing_is_reported_at_every_attempt_with_growing_delays(
    tmp_path: Path,
) -> None:
    dep = deploy(tmp_path)
    seen = Seen()
    quick = lambda: Backoff(first_s=0.05, cap_s=0.2, rand=lambda: 0.0)  # noqa: E731
    async with Launcher(dep, up_timeout_s=WAIT_S, on_up=seen.up, on_exit=seen.exit) as launcher:
        await launcher.wait_all_up()
        before = {nid: p.pid for nid, p in launcher.processes.items()}
        first_ups = len(seen.ups)
        supervisor = Supervisor(launcher, Restart.ALWAYS, seen.notify, backoff=quick)
        async with asyncio.TaskGroup() as tg:
            supervising = tg.create_task(supervisor.run())
            key = dep.node_key_path("trust-server")
            key.chmod(0o644)  # every new trust-server refuses to start with a key others can read
            assert before["trust-server"] is not None
            os.kill(before["trust-server"], signal.SIGKILL)
            await seen.until(lambda: len(seen.of("restart_failed")) >= 4)

            key.chmod(0o600)  # fixed: the next attempt comes up
            await seen.until(lambda: any(u.node_id == "trust-server" for u in seen.ups[first_ups:]))
            supervising.cancel()

        delays = [n["delay_s"] for n in seen.of("restarting")]
        assert delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2][: len(delays[:5])] and len(delays) >= 5
        assert [n["attempt"] for n in seen.of("restarting")] == list(range(1, len(delays) + 1))
        # each failed attempt was its own process, reported with the reason from its own output
        failed = [e for e in seen.exits if e.node_id == "trust-server"][1:]
        assert len(failed) >= 4 and len({e.pid for e in failed}) == len(failed)
        assert all("readable by others" in e.tail for e in failed)
        assert all(n["bad"] and n["node"] == "trust-server" for n in seen.of("restart_failed"))
        # the others never noticed
        assert all(launcher.processes[nid].pid == pid for nid, pid in before.items() if nid != "trust-server")
        assert all(p.is_up for p in launcher.processes.values())
        assert supervisor.restarts == len(delays)


async def test_on_failure_leaves_a_clean_exit_down_and_restarts_a_crash(tmp_path: Path) -> None:
    dep = deploy(tmp_path)
    seen = Seen()
    async with Launcher(dep, up_timeout_s=WAIT_S, on_up=seen.up, on_exit=seen.exit) as launcher:
        await launcher.wait_all_up()
        first_ups = len(seen.ups)
        before = {nid: p.pid for nid, p in launcher.processes.items()}
        supervisor = Supervisor(launcher, Restart.ON_FAILURE, seen.notify)
        async with asyncio.TaskGroup() as tg:
            supervising = tg.create_task(supervisor.run())
            ts, ps = before["trust-server"], before["payment-server"]
            assert ts is not None and ps is not None
            os.kill(ts, signal.SIGTERM)  # a clean exit (code 0): reported, left down
            await seen.until(lambda: bool(seen.of("left_down")))
            os.kill(ps, signal.SIGKILL)  # a crash: started again
            await seen.until(lambda: any(u.node_id == "payment-server" for u in seen.ups[first_ups:]))
            supervising.cancel()
        assert [n["node"] for n in seen.of("left_down")] == ["trust-server"]
        assert seen.of("left_down")[0]["how"] == "exit code 0" and seen.of("left_down")[0]["bad"]
        assert [n["node"] for n in seen.of("restarting")] == ["payment-server"]
        assert not launcher.processes["trust-server"].running
        assert launcher.processes["payment-server"].is_up and launcher.processes["payment-server"].pid != ps
        assert all(launcher.processes[n].pid == before[n] for n in ("dev-0001.chip", "dev-0001.tm"))
