"""amqtt 0.12.1 as a child process, with the same interface as MosquittoBroker.

It needs no system package, so it is the fallback where ``mosquitto`` is not
installed. It runs ``python -m broker.amqtt_main`` with a generated JSON
config: two TCP listeners on 127.0.0.1 only (amqtt's default binds 0.0.0.0): the
port, and port + 1 for the monitor's sessions, as on Mosquitto;
``FileAuthPlugin`` with Argon2id hashes of the same credentials, and
:class:`broker.amqtt_acl.TopicAclPlugin` with the same ``acl_for`` patterns.

Limits compared to Mosquitto 2.0.11, with amqtt 0.12.1 on this machine.
[tested] = pinned by tests/integration/test_broker_*.py; [measured] = seen
in a one-off run; [source] = read in amqtt's code, not observable with our ACL.

* MQTT 3.1.1 only: an MQTT 5 CONNECT is dropped without a CONNACK, so an
  aiomqtt v5 client just hangs until its timeout. Connect with
  ``ProtocolVersion.V311`` (``mqtt_version`` says "3.1.1"). [tested]
* No persistence: sessions, subscriptions, queued QoS 1 messages and
  retained messages live in memory and are gone after any stop or crash. A
  persistent (clean_session=False) subscriber that reconnects after a
  restart has no subscription and gets nothing it missed [tested]; a
  retained message is gone too [measured]. amqtt's optional
  ``contrib.persistence.SessionDBPlugin`` needs SQLAlchemy + aiosqlite (not
  installed), writes from fire-and-forget tasks, and stores queued payloads
  with ``bytes.decode()``, which cannot hold binary (msgpack) frames [source].
* Offline queueing works within one run [tested], but a queued message may
  arrive with the RETAIN flag set [measured; racy, so not asserted], and
  the queue per session is unbounded (Mosquitto: ``max_queued_messages``)
  [source]. Sessions expire after ``session_expiry_interval`` (we set 1 d).
* Delivery uses the *subscription's* QoS, not min(publish, subscription): a
  QoS 0 publish reaches a QoS 1 subscriber as QoS 1, and is queued for it
  while offline (Mosquitto drops it) [measured].
* ``$share/group/filter``: refused (0x80) by our ACL plugin, since no pattern
  starts with ``$share`` [measured]; without the ACL it is accepted and
  delivers nothing (FIELD-NOTES). Servers cannot be load-balanced on it.
* ACL: publish, subscribe and delivery are each checked against the
  ``acl_for`` patterns; denied publishes are dropped (still acknowledged)
  and another device's traffic is never delivered [tested]. Differences from
  Mosquitto: a denied SUBSCRIBE gets 0x80 where Mosquitto grants it and
  filters at delivery [tested]; retained messages sent on SUBSCRIBE are
  checked against the subscription filter only, not per topic. amqtt 0.12.1
  itself sends a connecting client the retained messages of *every* filter
  anyone subscribed to, past the ACL, and races on that walk; ``amqtt_main``
  runs a subclass that delivers only for the session's own subscriptions
  [tested: tests/e2e/test_broker_isolation.py]. A ``+`` in a
  pattern accepts a ``#`` at the same, last filter level (none of our read
  patterns ends in ``+``, so nothing is widened today); ``a/#`` does not
  match ``a`` [source].
* Client ids: amqtt 0.12.1 lets any login use any client id, and deletes or
  takes over the session of a CONNECT's client id *before* it checks the
  password, so one login (or a wrong password) knocks another node off.
  ``amqtt_main`` refuses such a CONNECT (0x02 identifier rejected, 0x04 bad
  credentials) before any session is touched [tested:
  tests/integration/test_broker_limits.py, tests/e2e/test_session_takeover.py].
* Message size: no packet limit; ``amqtt_main`` drops (still acknowledges) a
  publish over ``MAX_FRAME`` after amqtt has read it whole [tested].
* No TLS here (amqtt has listener options for it, not wired up): ``--tls``
  deployments need Mosquitto.
* Password checks run Argon2 on the broker's event loop at every CONNECT
  (twice now: once before any session is touched, once by amqtt itself);
  we write cheap Argon2 parameters (our passwords are random, not stretched).
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
            # the monitor's sessions connect to the second listener, as on Mosquitto;
            # the client-id rule itself is enforced in amqtt_main for both
            "listeners": {
                "default": {"type": "tcp", "bind": f"{HOST}:{self.port}"},
                "monitor": {"type": "tcp", "bind": f"{HOST}:{self.monitor_port}"},
            },
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
