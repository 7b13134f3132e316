"""amqtt 0.12.1 as a child process, with the same interface as MosquittoBroker.

It needs no system package, so it is the fallback where ``mosquitto`` is not
installed. It runs ``python -m broker.amqtt_main`` with a generated JSON
config: one TCP listener on 127.0.0.1 only (amqtt's default binds 0.0.0.0),
``FileAuthPlugin`` with Argon2id hashes of the same credentials, and
:class:`broker.amqtt_acl.TopicAclPlugin` with the same ``acl_for`` patterns.

Limits compared to Mosquitto 2.0.11, measured with amqtt 0.12.1 here
(tests/integration/test_broker_*.py pin the ones marked [tested]):

* MQTT 3.1.1 only: it refuses MQTT 5 connections, so no session expiry or
  reason codes on the wire; ``mqtt_version`` is "3.1.1". [tested]
* No persistence: sessions, subscriptions, queued QoS 1 messages and
  retained messages live in memory and are gone after a stop or a crash. A
  persistent (clean_session=False) subscriber reconnecting after a restart
  gets session_present=0 and nothing it missed. [tested] amqtt's optional
  ``contrib.persistence.SessionDBPlugin`` needs SQLAlchemy and aiosqlite (not
  installed) and stores queued payloads with ``bytes.decode()``, which cannot
  hold binary (msgpack) frames.
* Messages queued for an offline session are delivered with the RETAIN flag
  set, although they were not retained messages. [tested]
* A message is delivered at the *subscription's* QoS, not min(publish,
  subscription): a QoS 0 publish reaches a QoS 1 subscriber as QoS 1 (and is
  queued for it while offline).
* ``$share/group/filter`` subscriptions are accepted but deliver nothing
  (FIELD-NOTES), so servers cannot be load-balanced on it.
* ACL precision: publish, subscribe and delivery are all checked against the
  ``acl_for`` patterns, so denied publishes are dropped and another device's
  traffic is never delivered [tested]. Differences: a denied SUBSCRIBE gets
  0x80 while Mosquitto grants it and filters at delivery; retained messages
  sent on SUBSCRIBE are checked only against the subscription filter, not
  the receive table; amqtt's matcher lets a ``+`` in a pattern accept a
  ``#`` in a filter at the same, last level (none of our read patterns ends
  in ``+``, so this widens nothing today); ``a/#`` does not match ``a``.
* No queue limit per session (Mosquitto: ``max_queued_messages``) and no
  expiry unless ``session_expiry_interval`` is set (we set it to 1 day).
* Password checks run Argon2 on the broker's event loop at every CONNECT;
  we write cheap Argon2 parameters (random passwords need no stretching).
* About half Mosquitto's throughput (FIELD-NOTES).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ._base import HOST, SubprocessBroker
from .identities import PUBLIC_MODE, BrokerIdentity, write_amqtt_auth, write_file

# The package dir that holds broker/, so the child imports this very code.
_IMPORT_ROOT = str(Path(__file__).resolve().parent.parent)


class AmqttBroker(SubprocessBroker):
    backend: ClassVar[str] = "amqtt"
    mqtt_version: ClassVar[str] = "3.1.1"

    def __init__(
        self,
        data_dir: Path,
        port: int,
        identities: Sequence[BrokerIdentity],
        health_identity: BrokerIdentity,
        *,
        python: str | None = None,
        session_expiry_interval: int = 86_400,
        debug_log: bool = False,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            data_dir,
            port,
            identities,
            health_identity,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
        )
        self.python = python or sys.executable
        self.session_expiry_interval = session_expiry_interval
        self.debug_log = debug_log

    @property
    def config_file(self) -> Path:
        return self.data_dir / "amqtt.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "amqtt.log"

    def config(self) -> dict[str, Any]:
        auth = write_amqtt_auth(self.data_dir, self.identities)
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self.port}"}},
            "session_expiry_interval": self.session_expiry_interval,
            # An explicit plugin list replaces amqtt's defaults, which include
            # anonymous access and $SYS publishing.
            "plugins": {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(auth.password_file),
                },
                "broker.amqtt_acl.TopicAclPlugin": {
                    "publish_acl": auth.publish,
                    "subscribe_acl": auth.subscribe,
                    "receive_acl": auth.receive,
                },
            },
        }

    def _prepare(self) -> list[str]:
        write_file(self.config_file, json.dumps(self.config(), indent=2) + "\n", PUBLIC_MODE)
        argv = [self.python, "-m", "broker.amqtt_main", "--config", str(self.config_file)]
        argv += ["--log", str(self.log_file), "--parent", str(os.getpid())]
        return [*argv, "--debug"] if self.debug_log else argv

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _IMPORT_ROOT + (os.pathsep + path if path else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env
