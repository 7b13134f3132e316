"""Run one amqtt 0.12.1 broker from a JSON config: ``python -m broker.amqtt_main``.

Started by :class:`broker.embedded.AmqttBroker`. SIGTERM/SIGINT shut it down
cleanly; it also exits when its parent process is gone, so a crashed test run
does not leave a broker holding the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from protocol.envelope import MAX_FRAME
from protocol.topics import client_id_allowed

_PARENT_POLL_S = 1.0
_READER_CANCELS = 20  # rounds of cancelling a client's reader at shutdown before leaving it to amqtt
_READER_GRACE_S = 0.1  # how long each round waits for the reader to say it stopped


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Polled, not signalled: Linux's PDEATHSIG would need a preexec hook in
    # the parent, which is unsafe with the threads aiomqtt starts.
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_POLL_S)
    logging.getLogger(__name__).warning("parent %d is gone: shutting down", parent)
    stop.set()


def confined_broker(config: dict[str, Any]) -> Any:
    """An amqtt 0.12.1 broker with four of its flaws fixed.

    * Retained messages at CONNECT: amqtt walks *every* topic filter anyone has
      subscribed to and sends the connecting client every matching retained
      message, without asking the ACL, and awaits inside that walk, so a
      concurrent SUBSCRIBE changes the dict under it ("dictionary changed size
      during iteration") and the connecting client's session stalls. Here a
      session receives retained messages only for filters it subscribed to itself
      (which the ACL approved), and delivery runs as its own task.
    * Session takeover: amqtt deletes or takes over the session of the CONNECT's
      client id *before* it looks at the password, and lets any login use any
      client id, so one login (even a wrong password) knocks another node off.
      Here a CONNECT is refused before anything happens to a session unless its
      client id is the login's own and its password checks out.
    * Message size: a publish larger than the codec's largest frame is dropped
      (still acknowledged), never delivered. amqtt reads the whole packet first
      (up to MQTT's 256 MB): no listener option bounds that.
    * Shutdown: amqtt cancels each client's reader once and waits for it without
      a bound. On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that
      lands as the read it wraps completes (CPython gh-86296), so a packet arriving
      as the broker stops (a client's PUBACK racing its disconnect) leaves the
      reader reading and the shutdown waiting until its parent SIGKILLs it: a
      broker restart stalled every client for the whole stop timeout. Here the
      reader is cancelled again until it has stopped.
    """
    import amqtt.broker as amqtt_broker  # heavy imports, only in the broker process
    from amqtt.broker import Broker
    from amqtt.errors import MQTTError
    from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, IDENTIFIER_REJECTED, ConnackPacket
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    log = logging.getLogger(__name__)

    class OwnClientIdHandler(BrokerProtocolHandler):  # type: ignore[misc]
        @classmethod
        async def init_from_connect(
            cls, reader: Any, writer: Any, plugins_manager: Any, loop: Any = None
        ) -> Any:
            handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop)
            user, client_id = session.username, session.client_id or ""
            if not user or not client_id_allowed(user, client_id):
                code, why = IDENTIFIER_REJECTED, f"{user!r} may not use client id {client_id!r}"
            elif not await _authenticated(plugins_manager, session):
                code, why = BAD_USERNAME_PASSWORD, f"bad credentials for {session.username!r}"
            else:
                return handler, session
            log.warning("CONNECT refused before any session was touched: %s", why)
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(why)

        async def stop(self) -> None:
            reader = self._reader_task
            if reader is not None and reader is not asyncio.current_task():
                for _ in range(_READER_CANCELS):  # bounded; one round is enough unless a read raced it
                    if reader.done() or self._reader_stopped.is_set():
                        break
                    reader.cancel()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_READER_GRACE_S):
                            await self._reader_stopped.wait()
            await super().stop()

    # Broker._initialize_client_session reads CONNECT through this module-level
    # name; replacing it here (in the broker's own process) is the only hook that
    # runs before amqtt touches the existing session.
    amqtt_broker.BrokerProtocolHandler = OwnClientIdHandler

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

        async def _handle_message_delivery(
            self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
        ) -> bool:
            message = wait_deliver.result()
            data = getattr(message, "data", None)
            if data is not None and len(data) > MAX_FRAME:
                log.warning(
                    "%s published %d bytes to %s, over the %d-byte frame limit: dropped",
                    client_session.client_id, len(data), message.topic, MAX_FRAME,
                )  # fmt: skip
                return True  # the connection stays; the message goes nowhere
            return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    return ConfinedBroker(config)


async def _authenticated(plugins_manager: Any, session: Any) -> bool:
    """The broker's own rule: every authentication plugin that answers says yes."""
    answers = await plugins_manager.map_plugin_auth(session=session)
    results = [r for r in (answers or {}).values() if r is not None]
    return bool(results) and all(results)


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
