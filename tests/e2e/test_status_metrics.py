"""Every node's signed status and metrics, on real processes and a real broker.

``trustpay status`` runs as its own process (as an operator runs it): 0 while
every expected node is online, non-zero once a node killed with SIGKILL shows
"offline" through its last will, 0 again after the node is restarted. A server
started with ``--metrics-port`` serves its counters to Prometheus over HTTP on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodes.deployment import Deployment
from ops.launcher import Launcher
from ops.provision import provision
from ops.scenario import Scenario
from ops.watch import EventWatcher, public_verifier
from protocol.messages import Status
from protocol.topics import CHANNEL_STATUS, Role, channel_topic

from .conftest import DEV1, E2E, WAIT_S, chip_of, client_of, tm_of

pytestmark = pytest.mark.e2e
PS_STATUS = channel_topic(Role.PAYMENT_SERVER, CHANNEL_STATUS)


async def trustpay_status(dep: Deployment, broker_url: str) -> tuple[int, dict[str, Any]]:
    """``trustpay status --json`` as a process: its exit code and the rows by node id."""
    argv = ["-m", "ops.cli", "status", "--json", "--deploy", str(dep.root), "--broker", broker_url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(WAIT_S):
        out, err = await proc.communicate()
    assert out, err.decode()
    report = json.loads(out)
    assert isinstance(proc.returncode, int)
    return proc.returncode, {row["node"]: row for row in report["nodes"]}


async def test_a_node_killed_with_sigkill_shows_offline_through_its_last_will(e2e: E2E) -> None:
    dep, launcher = e2e.dep, e2e.launcher
    code, rows = await trustpay_status(dep, launcher.broker_url)
    expected = {"trust-server", "payment-server"} | {
        f(d) for d in ("dev-0001", "dev-0002") for f in (tm_of, chip_of)
    }
    assert code == 0, rows
    assert {n for n, r in rows.items() if r["required"]} == expected
    assert all(rows[n]["state"] == "online" for n in expected)
    assert {rows[n]["version"] for n in expected} == {importlib.metadata.version("trustpay")}
    # the client runs only while a user runs it: shown, not required
    assert rows[client_of(DEV1)]["required"] is False and rows[client_of(DEV1)]["state"] == "missing"
    killed_at = launcher.processes["payment-server"].started_ms

    verifier = public_verifier(dep)

    def last_will() -> Status | None:
        for frame in reversed(cap.on(PS_STATUS)):
            body = verifier.open(frame, PS_STATUS, time.time_ns() // 1_000_000).envelope.body
            if isinstance(body, Status) and body.state == "offline":
                return body
        return None

    async with e2e.capture(PS_STATUS) as cap:
        await cap.wait_until(lambda: bool(cap.on(PS_STATUS)))  # its retained "online": the capture is live
        gone = await launcher.kill("payment-server", signal.SIGKILL)
        await cap.wait_until(lambda: last_will() is not None)
    will = last_will()
    assert gone.how == "killed by SIGKILL"
    assert will is not None and will.will and will.started_ms >= killed_at  # the broker's, for this run

    code, rows = await trustpay_status(dep, launcher.broker_url)
    assert code != 0
    assert rows["payment-server"]["state"] == "lost"
    assert all(rows[n]["state"] == "online" for n in expected - {"payment-server"})

    await launcher.restart("payment-server")  # returns once its new "online" arrived
    code, rows = await trustpay_status(dep, launcher.broker_url)
    assert code == 0 and rows["payment-server"]["state"] == "online", rows


def free_port_pair() -> int:
    """A port P with P and P + 1 free on 127.0.0.1 now (for the two servers)."""
    for _ in range(50):  # bounded: free pairs are common
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second, contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return int(port)
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "shop-1" not in text  # counters only: never a payee
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_servers_serve_their_counters_to_prometheus(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    await asyncio.to_thread(provision, root, 1, backend="amqtt")
    dep = Deployment(root)
    port = free_port_pair()
    async with contextlib.AsyncExitStack() as stack:
        launcher = await stack.enter_async_context(
            Launcher(dep, backend="amqtt", log_level="warning", metrics_port=port)
        )
        watcher = await stack.enter_async_context(EventWatcher(dep, launcher.broker_url))
        scn = Scenario(dep, launcher, watcher)
        await launcher.wait_all_up()
        assert (await scn.wait_started(DEV1)).outcome == "done"
        paid = await scn.client(DEV1, "pay", "2.50", "shop-1")
        assert paid.code == 0, paid.stderr
        ts = await asyncio.to_thread(scrape, port)
        ps = await asyncio.to_thread(scrape, port + 1)
        assert not launcher.unexpected_exits

    def at(
        got: dict[tuple[str, frozenset[tuple[str, str]]], float], family: str, node: str, **labels: str
    ) -> float:
        return got[(family, frozenset({("node", node), ("role", node), *labels.items()}))]

    assert at(ts, "trustpay_flow_steps_total", "trust-server", flow="C", step="C4", outcome="trusted") == 1
    assert at(ts, "trustpay_frames_in_total", "trust-server", type="c2.evidence") == 1
    assert at(ts, "trustpay_step_latency_seconds_count", "trust-server", steps="C3>C4") == 1
    assert at(ps, "trustpay_frames_in_total", "payment-server", type="pay.order") == 1
    assert at(ps, "trustpay_flow_steps_total", "payment-server", flow="C", step="C5", outcome="ok") == 1
    assert at(ps, "trustpay_frames_out_total", "payment-server", type="status") >= 1
    assert ("process_cpu_seconds_total", frozenset()) in ps
