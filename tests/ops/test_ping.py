"""`trustpay ping`: signed health checks of running node processes, from the operator's login."""

from __future__ import annotations

import signal
from pathlib import Path

from nodes.deployment import Deployment
from nodes.runtime import Settings
from ops.launcher import Launcher
from ops.ping_cmd import ping_all
from ops.provision import provision
from protocol.messages import Pong

FAST = Settings(request_timeout_s=0.5, request_attempts=2)


async def test_every_running_node_answers_a_signed_ping_and_a_dead_one_does_not(tmp_path: Path) -> None:
    provision(tmp_path / "d", 1, backend="amqtt")
    dep = Deployment(tmp_path / "d")
    nodes = ["trust-server", "payment-server", "dev-0001.chip", "dev-0001.tm"]
    async with Launcher(dep, log_level="warning") as launcher:
        await launcher.wait_all_up()
        answers = await ping_all(dep, nodes, launcher.broker_url, FAST)
        await launcher.kill("payment-server", signal.SIGKILL)
        after_kill = await ping_all(dep, ["payment-server", "trust-server"], launcher.broker_url, FAST)
    assert all(isinstance(answers[n], Pong) for n in nodes), answers
    assert {n: a.node for n, a in answers.items() if isinstance(a, Pong)} == {n: n for n in nodes}
    assert isinstance(after_kill["trust-server"], Pong)
    assert "no answer to ping from payment-server after 2 attempts" in str(after_kill["payment-server"])
