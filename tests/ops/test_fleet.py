"""Fleet mode: many nodes in one process, each still its own node, on a real broker.

A fleet of 20 devices (and both servers) runs in this test's loop; every device
pays with its own client; a node of the fleet that cannot start (its identity
held elsewhere) is reported and retried while the others come up and pay; and
``trustpay fleet`` as a process stops all its nodes on one SIGTERM and reports
its summed counters. No sleeps: every wait is on a node's event, a report or a
line of output, under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from typing import Any

import pytest

from nodes.assemble import assemble
from nodes.client import Client
from nodes.deployment import Deployment
from nodes.runtime import IdentityInUse, _claim
from ops.broker_cmd import broker_for
from ops.fleet import Fleet, fleet_node_ids
from ops.provision import provision
from protocol.seal import _box, _boxes
from protocol.topics import Role, node_id

pytestmark = pytest.mark.e2e

BACKEND = "mosquitto" if shutil.which("mosquitto") else "amqtt"
DEVICES = 20
WAIT_S = 60.0


class _Out:
    """Collects what a client prints (its --json lines)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines += [line for line in text.splitlines() if line.strip()]
        return len(text)

    def flush(self) -> None:
        pass


async def pay(dep: Deployment, device: str, url: str) -> dict[str, Any]:
    """``pay 1.00 shop-1`` from the device's own client node; its JSON result."""
    parts = assemble(dep, node_id(Role.CLIENT, device), url, console=None)
    out = _Out()
    client = Client(
        parts.config,
        parts.bus,
        parts.logging.logger,
        deployment=dep,
        command=["pay", "1.00", "shop-1"],
        out=out,  # type: ignore[arg-type]
        as_json=True,
    )
    parts.bus.will = client.will
    try:
        async with asyncio.timeout(WAIT_S):
            await client.run()
    finally:
        parts.logging.close()
    result: dict[str, Any] = json.loads(out.lines[-1])
    result["exit_code"] = client.exit_code
    return result


@pytest.fixture(scope="module")
def fleet_dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("fleet") / "d"
    provision(root, DEVICES, backend=BACKEND)
    return Deployment(root)


async def test_a_fleet_of_20_devices_pays_and_one_failing_node_takes_none_down(fleet_dep: Deployment) -> None:
    dep = fleet_dep
    manifest = dep.load_manifest()
    ids = fleet_node_ids(
        manifest, None, [Role.TRUST_SERVER, Role.PAYMENT_SERVER, Role.CHIP, Role.TRUST_MODULE]
    )
    assert len(ids) == 2 + 2 * DEVICES
    victim = node_id(Role.TRUST_MODULE, "dev-0003")
    held = _claim(dep.state_dir(victim), victim)  # another "process" runs that identity: it cannot start
    reports: list[dict[str, Any]] = []
    async with broker_for(dep, BACKEND) as broker:
        url = f"mqtt://{broker.host}:{broker.port}?v={broker.mqtt_version}"
        fleet = Fleet(dep, ids, url, manifest=manifest, report=reports.append)
        running = asyncio.create_task(fleet.run())
        try:
            async with asyncio.timeout(WAIT_S):
                await fleet.up.wait()
            up = next(r for r in reports if r["event"] == "up")
            assert up["failed"] == [victim] and up["nodes"] == len(ids) - 1
            failure = next(r for r in reports if r["event"] == "failed")
            assert failure["node"] == victim and IdentityInUse.code in failure["reason"]
            # each node is its own MQTT client and identity
            buses = {id(n.bus) for n in fleet.nodes}
            assert len(buses) == len(fleet.nodes) and len({n.id for n in fleet.nodes}) == len(fleet.nodes)

            # every other device pays, several at a time, each confirmed by its verified receipt
            others = [d.device for d in manifest.devices if d.device != "dev-0003"]
            results = await asyncio.gather(*(pay(dep, device, url) for device in others))
            assert [r["exit_code"] for r in results] == [0] * len(others)
            assert all(r["status"] == "confirmed" and r["receipt"]["amount"] == 100 for r in results)

            # the failed node is started again once its identity is free, and then pays too
            os.close(held)
            held = -1
            async with asyncio.timeout(WAIT_S):
                node = await fleet.wait_running(victim)
            assert node.id == victim
            again = await pay(dep, "dev-0003", url)
            assert again["exit_code"] == 0 and again["status"] == "confirmed"
            counters = fleet.counters()
            assert counters["in.pay.start"] == DEVICES and counters["out.pay.result"] == DEVICES
        finally:
            if held >= 0:
                os.close(held)
            fleet.stop()
            async with asyncio.timeout(WAIT_S):
                await running
    assert all(node.finished.is_set() for node in fleet.nodes)


async def test_fleet_process_stops_every_node_on_one_sigterm(fleet_dep: Deployment) -> None:
    dep = fleet_dep
    async with broker_for(dep, BACKEND) as broker:
        url = f"mqtt://{broker.host}:{broker.port}?v={broker.mqtt_version}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "fleet", "--deploy", str(dep.root), "--roles", "chip",
            "--devices", "5", "--broker", url, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(WAIT_S):
                up = json.loads(await proc.stdout.readline())
                assert up["event"] == "up" and up["nodes"] == 5 and up["failed"] == []
                proc.send_signal(signal.SIGUSR1)
                snapshot = json.loads(await proc.stdout.readline())
                assert snapshot["event"] == "counters" and snapshot["counters"]["out.status"] >= 5
                proc.send_signal(signal.SIGTERM)
                stopped = json.loads(await proc.stdout.readline())
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert stopped["event"] == "stopped" and stopped["nodes"] == 5
    # every chip said goodbye: one handler for the process stopped them all, not only the last one's
    assert stopped["counters"]["out.status"] >= 10
    for device in ("dev-0001", "dev-0005"):
        log = dep.log_path(node_id(Role.CHIP, device)).read_text()
        assert '"node.stopped"' in log


def test_seal_boxes_are_kept_per_own_key_so_a_fleet_does_not_thrash() -> None:
    from protocol.keys import KeyPair

    nodes = [KeyPair.generate() for _ in range(300)]
    peers = [KeyPair.generate().box_public for _ in range(20)]
    for mine in nodes:  # 6,000 pairs, more than one shared table of 4,096 held
        for peer in peers:
            _box(mine.box_secret, peer)
    first = _box(nodes[0].box_secret, peers[0])
    assert _box(nodes[0].box_secret, peers[0]) is first  # still cached after the whole cycle
    assert len(_boxes[nodes[0].box_secret]) == len(peers)


async def test_launcher_in_fleet_mode_runs_devices_as_two_processes_and_restarts_them(
    fleet_dep: Deployment,
) -> None:
    from ops.launcher import Launcher

    async with Launcher(fleet_dep, devices=3, up_timeout_s=WAIT_S, fleet=True) as up:
        await up.wait_all_up()
        chips = [up.processes[node_id(Role.CHIP, f"dev-000{i}")] for i in (1, 2, 3)]
        tms = [up.processes[node_id(Role.TRUST_MODULE, f"dev-000{i}")] for i in (1, 2, 3)]
        assert len({c.pid for c in chips}) == 1 and len({t.pid for t in tms}) == 1
        assert chips[0].pid not in {up.processes["trust-server"].pid, tms[0].pid}
        # the fleet process dies: each of its nodes is seen to die, not as a deliberate stop
        assert chips[0].pid is not None
        os.kill(chips[0].pid, signal.SIGKILL)
        for chip in chips:
            died = await up.wait_exit(chip.node_id)
            assert died.returncode == -signal.SIGKILL and not died.deliberate
        # restarting its nodes starts one new fleet, which all of them join
        again = [await up.restart(chip.node_id) for chip in chips]
        assert len({c.pid for c in again}) == 1 and again[0].pid != chips[0].pid
        assert all(c.is_up and c.incarnation == 2 for c in again)
