"""Keep a launched deployment running: a node that dies is reported and started again.

``trustpay up`` runs a :class:`Supervisor` over its :class:`ops.launcher.Launcher`
once every node came up. Each node has a keeper task; when its node dies
(the launcher has already reported which node, how, and its last log lines)
the keeper waits a :class:`Backoff` delay, starts a new incarnation and waits
for its signed "online". The other nodes are left alone. A node that keeps
crashing costs one attempt per delay, each reported, the delays doubling from
0.5 s to 30 s: never a tight loop.

The policy follows systemd's ``Restart=`` and Docker's ``--restart``:

* ``always`` (``trustpay up``'s default): every death the launcher did not
  cause. Our nodes are services that never finish on their own, so even a clean
  exit (a node SIGTERMed by hand exits 0) leaves the payment system without a
  server or a device: nobody wants that kept.
* ``on-failure``: a non-zero exit code or a signal; a clean exit is reported and
  left down, the rest keeps running.
* ``never``: the first death ends the run (what ``trustpay up`` did before).

Start-up is not supervised: a node that does not come up the first time has a
reason retrying does not fix (a bad key, a missing file), and ``up`` says it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .launcher import Launcher, LaunchError, NodeExit, NodeProcess

_MAX_DOUBLINGS = 32  # far past any cap; keeps 2 ** n a small float


class Restart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"

    def wants(self, died: NodeExit) -> bool:
        """Whether this death calls for a new incarnation."""
        if self is Restart.ALWAYS:
            return True
        return self is Restart.ON_FAILURE and died.returncode != 0


@dataclass
class Backoff:
    """The delays before one node's restarts, with the clock and the randomness passed in.

    ``first_s`` doubling up to ``cap_s``, each shortened by up to ``jitter`` at
    random so that nodes that died together (a broker restart) do not come back
    in lockstep; back to ``first_s`` once an incarnation stayed up
    ``reset_after_s``. An attempt that never came up does not reset anything.
    """

    first_s: float = 0.5
    cap_s: float = 30.0
    reset_after_s: float = 60.0
    jitter: float = 0.25
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random  # uniform in [0, 1)
    failures: int = 0  # restarts since an incarnation last stayed up
    _up_since: float | None = field(default=None, repr=False)

    def came_up(self) -> None:
        """The node is up (first start, or an attempt whose "online" arrived)."""
        self._up_since = self.clock()

    def next_delay(self) -> float:
        """The node died: how long to wait before starting it again."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and self.clock() - up_since >= self.reset_after_s:
            self.failures = 0
        base = min(self.cap_s, self.first_s * 2.0 ** min(self.failures, _MAX_DOUBLINGS))
        self.failures += 1
        return base * (1.0 - self.jitter * self.rand())


# what the supervisor did, for the person watching: (text, whether it is bad news, event fields)
Notify = Callable[[str, bool, dict[str, Any]], None]


class Supervisor:
    """Restarts ``launcher``'s nodes by ``policy``; see the module docstring."""

    def __init__(
        self,
        launcher: Launcher,
        policy: Restart,
        notify: Notify,
        *,
        start_timeout_s: float | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.launcher = launcher
        self.policy = policy
        self.notify = notify
        self.start_timeout_s = start_timeout_s or launcher.up_timeout_s
        self.new_backoff = backoff
        self.restarts = 0  # incarnations started by the supervisor

    async def run(self) -> str:
        """Supervise until something ends the deployment, and say what: the first death under
        ``never``, or the broker lost. Otherwise it runs until cancelled (the operator's stop)."""
        async with asyncio.TaskGroup() as tg:
            pending: set[asyncio.Task[str | None]] = {
                tg.create_task(self._keep(nid), name=f"supervise:{nid}") for nid in self.launcher.processes
            }
            pending.add(tg.create_task(self.launcher.wait_broker_lost(), name="supervise:broker"))
            try:
                while pending:  # one turn per finished task; the broker's never finishes with None
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if (failure := task.result()) is not None:
                            return failure
            finally:
                for task in pending:
                    task.cancel()
        raise AssertionError("unreachable: the broker watch returns a failure")

    async def _keep(self, node_id: str) -> str | None:
        """Watch one node; a failure that ends the deployment, or None when it is left down."""
        backoff = self.new_backoff()
        backoff.came_up()
        node = self.launcher.processes[node_id]
        while True:  # one turn per death of this node; ends with the operator's stop (cancellation)
            await node.exited.wait()
            died = node.exit
            assert died is not None
            if died.deliberate:
                return None  # whoever told the launcher to stop it decides what comes next
            if not self.policy.wants(died):
                if self.policy is Restart.NEVER:
                    return died.describe()
                text = f"left  {node_id} down: it exited cleanly (--restart {self.policy})"
                self.notify(text, True, {"event": "left_down", "node": node_id, "how": died.how})
                return None
            node = await self._bring_back(node_id, backoff)

    async def _bring_back(self, node_id: str, backoff: Backoff) -> NodeProcess:
        while True:  # one turn per attempt, each after a longer delay; ends once one came up
            delay = backoff.next_delay()
            text = f"restart {node_id} in {delay:.1f} s (attempt {backoff.failures})"
            attempt = {"node": node_id, "delay_s": round(delay, 3), "attempt": backoff.failures}
            self.notify(text, False, {"event": "restarting", **attempt})
            await asyncio.sleep(delay)  # the backoff itself, not synchronisation
            self.restarts += 1
            try:
                node = await self.launcher.restart(node_id, self.start_timeout_s)
            except LaunchError as exc:  # it died again (already reported) or never said "online"
                self.notify(
                    f"{node_id} did not come back: {exc.reason}",
                    True,
                    {"event": "restart_failed", "node": node_id, "reason": exc.reason},
                )
                await self.launcher.stop_node(node_id)
                continue
            backoff.came_up()
            return node
