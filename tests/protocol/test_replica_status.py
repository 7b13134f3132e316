"""Each server replica's status on its own topic: its retained status and last will are its own."""

from __future__ import annotations

import pytest

from protocol.errors import WrongRole, WrongTopic
from protocol.messages import Status
from protocol.topics import (
    CHANNEL_STATUS,
    STATUS_FILTERS,
    Role,
    acl_for,
    channel_topic,
    node_status_topic,
    parse_topic,
    status_signer,
    status_topic,
)

from .factory import NOW_MS, Identity, Pki, envelope, exactly, keypair, sign, verifier

PS, TS = Role.PAYMENT_SERVER, Role.TRUST_SERVER
PKI = Pki()


def replica(role: Role, k: int) -> Identity:
    name = f"{role.value}.{k}"
    keys = keypair(name)
    cert = PKI.issue_cert(name, role.value, "", keys, PKI.platform, PKI.platform_keys)
    return Identity(name, role.value, "", keys, cert, (cert.to_bytes(), PKI.platform.to_bytes()))


def status_frame(sender: Identity, topic: str) -> bytes:
    body = Status(sender.name, sender.role, "offline", NOW_MS, "1.0", NOW_MS - 1000, True)
    return sign(envelope(sender, "*", "status", body), topic, sender)


def test_replica_k_has_a_topic_of_its_own_and_replica_1_the_roles() -> None:
    assert status_topic(PS) == channel_topic(PS, CHANNEL_STATUS) == "tp/v1/plat/ps/status"
    assert status_topic(PS, None, 2) == "tp/v1/plat/ps/status/2"
    assert node_status_topic("payment-server.2") == "tp/v1/plat/ps/status/2"
    assert node_status_topic("trust-server") == "tp/v1/plat/ts/status"
    assert node_status_topic("dev-1.tm") == "tp/v1/dev/dev-1/tm/status"
    parsed = parse_topic("tp/v1/plat/ts/status/12")
    assert (parsed.src, parsed.channel, parsed.replica, parsed.dst) == (TS, CHANNEL_STATUS, 12, None)
    assert status_signer(parsed) == "trust-server.12"
    assert status_signer(parse_topic("tp/v1/plat/ts/status")) == "trust-server"
    assert status_signer(parse_topic("tp/v1/dev/d1/tm/status")) is None  # the device is checked already


@pytest.mark.parametrize(
    "topic",
    [
        "tp/v1/plat/ps/status/1",  # replica 1 has no suffix: one topic per node, never two
        "tp/v1/plat/ps/status/02",
        "tp/v1/plat/ps/status/\u00b2",  # a digit to str.isdigit, not to int()
        "tp/v1/plat/ps/status/10000",
        "tp/v1/plat/ps/status/+",
        "tp/v1/plat/tm/status/2",  # only servers run replicas
        "tp/v1/plat/ops/status/2",
        "tp/v1/plat/ps/ev/2",  # only the status is per replica
        "tp/v1/plat/ps/metrics/2",
    ],
)
def test_no_other_replica_status_topic_parses(topic: str) -> None:
    with pytest.raises(WrongTopic):
        parse_topic(topic)


def test_each_replica_login_writes_only_its_own_status() -> None:
    def writes(k: int) -> set[str]:
        return {r.pattern for r in acl_for(PS, None, k) if r.access == "write"}

    assert "tp/v1/plat/ps/status" in writes(1) and "tp/v1/plat/ps/status/2" not in writes(1)
    assert "tp/v1/plat/ps/status/2" in writes(2) and "tp/v1/plat/ps/status" not in writes(2)
    assert writes(2) - {"tp/v1/plat/ps/status/2"} == writes(1) - {"tp/v1/plat/ps/status"}
    assert not any("#" in w or w.endswith("/+") for w in writes(2))
    operator_reads = {r.pattern for r in acl_for(Role.OPERATOR) if r.access == "read"}
    assert set(STATUS_FILTERS) <= operator_reads  # `trustpay status` and the launcher read all three


def test_a_replica_cannot_sign_another_replicas_status() -> None:
    ps1, ps2, ps3 = PKI.node(PS), replica(PS, 2), replica(PS, 3)
    v = verifier(PKI, None, replay=False)
    for sender, k in ((ps1, 1), (ps2, 2), (ps3, 3)):
        topic = status_topic(PS, None, k)
        assert v.open(status_frame(sender, topic), topic, NOW_MS).envelope.sender == sender.name
    # replica 2 calling replica 1 (or 3) lost, or the lone server speaking for replica 2
    for sender, k in ((ps2, 1), (ps2, 3), (ps1, 2)):
        topic = status_topic(PS, None, k)
        with exactly(WrongTopic):
            v.open(status_frame(sender, topic), topic, NOW_MS)


def test_another_roles_replica_cannot_sign_there_either() -> None:
    ts2 = replica(TS, 2)
    topic = status_topic(PS, None, 2)
    with exactly(WrongRole):
        verifier(PKI, None, replay=False).open(status_frame(ts2, topic), topic, NOW_MS)
