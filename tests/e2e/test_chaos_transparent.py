"""A real deployment whose every node reaches the broker through the fault proxy, with no faults:
a payment goes through exactly as without it, so the proxy itself changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from broker import free_port
from nodes.deployment import Deployment
from ops.broker_cmd import broker_for
from ops.chaos.proxy import ChaosProxy
from ops.launcher import Launcher
from ops.provision import provision
from ops.watch import EventWatcher
from protocol.topics import MONITOR_PORT_OFFSET

from .conftest import BACKENDS, DEV1, DEVICES, E2E, OPENING, chip_of, client_of, tm_of

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_payment_through_the_proxy_without_faults(backend: str, tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    await asyncio.to_thread(provision, root, len(DEVICES), backend=backend)
    dep = Deployment(root)
    broker = await asyncio.to_thread(broker_for, dep, None)
    port = free_port()  # and the next one: the monitor's listener, forwarded as the broker's is
    async with contextlib.AsyncExitStack() as stack:
        await broker.start()
        stack.push_async_callback(broker.kill)
        stack.push_async_callback(broker.stop)
        proxy = await stack.enter_async_context(ChaosProxy(broker.host, broker.port, listen_port=port))
        await stack.enter_async_context(
            ChaosProxy(broker.host, broker.monitor_port, listen_port=port + MONITOR_PORT_OFFSET)
        )
        url = f"mqtt://127.0.0.1:{port}?v={broker.mqtt_version}"
        launcher = await stack.enter_async_context(Launcher(dep, broker_url=url, log_level="warning"))
        watcher = await stack.enter_async_context(EventWatcher(dep, launcher.broker_url))
        scn = E2E(dep, launcher, watcher, tmp=tmp_path, stack=stack)
        await launcher.wait_all_up()
        assert (await scn.wait_started(DEV1)).outcome == "done"

        run = await scn.pay(DEV1, "3.25", "shop-1")

        assert run.code == 0, (run.lines, run.stderr[-2000:])
        assert run.result["status"] == "confirmed"
        assert run.result["balance_after"] == OPENING - 325
        assert [p.amount for p in scn.stored_payments().values()] == [325]
        # every frame of it went through the proxy, untouched
        assert {
            chip_of(DEV1),
            tm_of(DEV1),
            client_of(DEV1),
            "trust-server",
            "payment-server",
        } <= proxy.clients
        assert proxy.publishes["to-broker"] > 0 and proxy.publishes["from-broker"] > 0
        assert not proxy.log.counts
        assert not launcher.unexpected_exits
