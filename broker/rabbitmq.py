"""RabbitMQ (3.10, MQTT plugin): the logins and topic permissions of a deployment.

RabbitMQ was measured against NATS as the clustered broker and not chosen (see
:mod:`broker.nats` and the README's cluster guide): trustpay does not start it.
What is here lets an operator who runs RabbitMQ anyway load our logins into it
(``rabbitmqctl import_definitions FILE``, written by ``trustpay provision
--broker rabbitmq``), and lets ``python -m broker.probe rabbitmq`` start one
node of its own to measure.

MQTT topics become routing keys on ``amq.topic`` (``/`` -> ``.``, ``+`` -> ``*``,
``#`` -> ``#``); a login's topic permissions are regular expressions over them,
built from :func:`protocol.topics.acl_for`: ``write`` for what it may publish,
``read`` for the filters it may subscribe to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from .identities import SECRET_MODE, BrokerIdentity, check_unique, write_file

VHOST = "/"
EXCHANGE = "amq.topic"


def _level(level: str) -> str:
    return "[^.]+" if level == "+" else re.escape(level)


def topic_regex(patterns: Iterable[str]) -> str:
    """One anchored regex for routing keys (and subscription keys) the MQTT filters cover."""
    alternatives = []
    for pattern in patterns:
        levels = pattern.split("/")
        if levels[-1] == "#":
            head = r"\.".join(_level(level) for level in levels[:-1])
            alternatives.append(rf"{head}(\..*)?")
        else:
            alternatives.append(r"\.".join(_level(level) for level in levels))
    return "^(" + "|".join(alternatives) + ")$" if alternatives else "^$"  # "^$": nothing


def password_hash(password: str, salt: bytes | None = None) -> str:
    """``rabbit_password_hashing_sha256``: base64(salt + SHA-256(salt + password)), 4-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(identities: Iterable[BrokerIdentity]) -> dict[str, object]:
    """What ``rabbitmqctl import_definitions`` reads: users, their queues, their topic permissions."""
    idents = check_unique(identities)
    return {
        "vhosts": [{"name": VHOST}],
        "users": [
            {
                "name": i.username,
                "password_hash": password_hash(i.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for i in idents
        ],
        # the MQTT plugin declares one queue per session and binds it to amq.topic
        "permissions": [
            {"user": i.username, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"}
            for i in idents
        ],
        "topic_permissions": [
            {
                "user": i.username,
                "vhost": VHOST,
                "exchange": EXCHANGE,
                "write": topic_regex(r.pattern for r in i.acl if r.access == "write"),
                "read": topic_regex(r.pattern for r in i.acl if r.access == "read"),
            }
            for i in idents
        ],
    }


def write_rabbitmq_definitions(directory: Path, identities: Iterable[BrokerIdentity]) -> Path:
    text = json.dumps(definitions(identities), indent=1) + "\n"
    return write_file(directory / "rabbitmq-definitions.json", text, SECRET_MODE)
