"""``trustpay provision --broker rabbitmq``: our logins and ACL as RabbitMQ definitions.

trustpay does not start RabbitMQ (broker.rabbitmq says why); these are the files an
operator loads into one, checked here by reading them as RabbitMQ would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest

from broker import BrokerError, make_broker
from broker.rabbitmq import password_hash, topic_regex
from nodes.assemble import broker_address
from nodes.deployment import Deployment
from ops.provision import provision


def key(topic: str) -> str:
    return topic.replace("/", ".").replace("+", "*")


def test_topic_regex_is_the_acl() -> None:
    chip = re.compile(topic_regex(["tp/v1/dev/dev-a/chip/ps", "tp/v1/dev/dev-a/chip/ev"]))
    assert chip.match(key("tp/v1/dev/dev-a/chip/ps"))
    assert not chip.match(key("tp/v1/dev/dev-b/chip/ps")) and not chip.match(key("tp/v1/dev/dev-a/chip/ps/x"))
    server = re.compile(topic_regex(["tp/v1/dev/+/+/ps"]))
    assert server.match(key("tp/v1/dev/+/+/ps")) and server.match(key("tp/v1/dev/dev-a/chip/ps"))
    assert not server.match(key("tp/v1/dev/dev-a/chip/ts"))
    monitor = re.compile(topic_regex(["tp/v1/#"]))
    assert monitor.match("tp.v1") and monitor.match(key("tp/v1/plat/ops/crl")) and not monitor.match("tp.v2")
    assert re.compile(topic_regex([])).match("anything") is None


def test_password_hash_is_rabbits_sha256() -> None:
    blob = base64.b64decode(password_hash("secret", salt=b"\x01\x02\x03\x04"))
    assert blob[:4] == b"\x01\x02\x03\x04" and blob[4:] == hashlib.sha256(b"\x01\x02\x03\x04secret").digest()


def test_provision_writes_definitions_and_nodes_take_its_url(tmp_path: Path) -> None:
    provision(tmp_path / "d", 2, backend="rabbitmq")
    dep = Deployment(tmp_path / "d")
    path = dep.broker_dir / "rabbitmq-definitions.json"
    assert path.stat().st_mode & 0o777 == 0o600
    defs = json.loads(path.read_text())
    users = {u["name"] for u in defs["users"]}
    assert {"dev-0001.chip", "dev-0002.tm", "payment-server", "monitor", "operator"} <= users
    topic = {t["user"]: t for t in defs["topic_permissions"]}
    chip = topic["dev-0001.chip"]
    assert re.match(chip["write"], "tp.v1.dev.dev-0001.chip.ps")
    assert not re.match(chip["write"], "tp.v1.dev.dev-0002.chip.ps")
    assert not re.match(chip["read"], "tp.v1.dev.dev-0002.ps.chip")
    creds = dep.load_broker_credentials("dev-0001.chip")
    stored = base64.b64decode(next(u for u in defs["users"] if u["name"] == "dev-0001.chip")["password_hash"])
    assert stored[4:] == hashlib.sha256(stored[:4] + creds.password.encode()).digest()
    # trustpay does not start it; the nodes reach it by URL, the monitor on the same listener
    with pytest.raises(BrokerError, match="does not start rabbitmq"):
        make_broker("rabbitmq", tmp_path / "b", 1883, (), None)  # type: ignore[arg-type]
    address = broker_address(dep, "monitor", "mqtt://127.0.0.1:1883")
    assert (address.port, address.mqtt_version) == (1883, "auto")
