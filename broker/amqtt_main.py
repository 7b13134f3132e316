"""Run one amqtt 0.12.1 broker from a JSON config: ``python -m broker.amqtt_main``.

Started by :class:`broker.embedded.AmqttBroker`. SIGTERM/SIGINT shut it down
cleanly; it also exits when its parent process is gone, so a crashed test run
does not leave a broker holding the port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

_PARENT_POLL_S = 1.0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Polled, not signalled: Linux's PDEATHSIG would need a preexec hook in
    # the parent, which is unsafe with the threads aiomqtt starts.
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_POLL_S)
    logging.getLogger(__name__).warning("parent %d is gone: shutting down", parent)
    stop.set()


def confined_broker(config: dict[str, Any]) -> Any:
    """An amqtt 0.12.1 broker with its retained-message delivery at CONNECT fixed.

    At every CONNECT amqtt walks *every* topic filter anyone has subscribed to
    and sends the connecting client every matching retained message, without
    asking the ACL, and awaits inside that walk, so a concurrent SUBSCRIBE
    changes the dict under it ("dictionary changed size during iteration") and
    the connecting client's session stalls. Here a session receives retained
    messages only for filters it subscribed to itself (which the ACL approved),
    and delivery runs as its own task, so the walk never yields.
    """
    from amqtt.broker import Broker  # heavy import, only in the broker process
    from amqtt.session import Session

    class ConfinedBroker(Broker):  # type: ignore[misc]
        def __init__(self, cfg: dict[str, Any]) -> None:
            super().__init__(cfg)
            self._retained_tasks: set[asyncio.Task[None]] = set()

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            subscribers = self._subscriptions.get(subscription[0], ())
            if not any(s.client_id == session.client_id for s, _ in subscribers):
                return
            deliver = super()._publish_retained_messages_for_subscription(subscription, session)
            task = asyncio.create_task(deliver)
            self._retained_tasks.add(task)
            task.add_done_callback(self._retained_tasks.discard)

    return ConfinedBroker(config)


async def serve(config: dict[str, Any], parent: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = confined_broker(config)
    await broker.start()
    watcher = asyncio.create_task(_watch_parent(parent, stop)) if parent else None
    try:
        await stop.wait()
    finally:
        if watcher:
            watcher.cancel()
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m broker.amqtt_main")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log,
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    # amqtt's session state machine logs every transition at INFO: noise.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = json.loads(args.config.read_text(encoding="utf-8"))
    asyncio.run(serve(config, args.parent))


if __name__ == "__main__":
    main()
