"""``trustpay status`` without a broker: which retained frames it believes, and what it makes of them.

Frames are signed for real (the deployment's keys, or a forger's); the live
command against a running deployment is tested in ``tests/e2e/test_status_metrics.py``.
"""

from __future__ import annotations

import time

import pytest

from nodes.deployment import Deployment
from ops.cli import main
from ops.provision import provision
from ops.status_cmd import (
    EXIT_NOT_ONLINE,
    NodeStatus,
    all_online,
    expected,
    judge,
    optional_replica,
    render,
)
from ops.watch import public_verifier
from protocol.envelope import Envelope, new_id, sign_frame
from protocol.keys import KeyPair
from protocol.messages import Status, StepEvent
from protocol.topics import CHANNEL_STATUS, Role, channel_topic

PS = "payment-server"
PS_TOPIC = channel_topic(Role.PAYMENT_SERVER, CHANNEL_STATUS)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("status") / "deploy"
    provision(root, 2, broker_port=1, backend="amqtt")
    return Deployment(root)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def frame(dep: Deployment, body: object, keys: KeyPair | None = None, sender: str = PS) -> bytes:
    """A frame on the payment-server's status topic, signed with ``sender``'s keys unless ``keys``."""
    chain = (dep.load_cert(sender).to_bytes(), dep.load_public("platform").to_bytes())
    msg_type = "status" if isinstance(body, Status) else "event"
    env = Envelope(msg_type, new_id(), sender, "*", b"", b"", now_ms(), 1, 1, chain, body)
    return sign_frame(env, PS_TOPIC, keys or dep.load_keys(sender))


def status(state: str, will: bool = False, node: str = PS) -> Status:
    return Status(node, Role.PAYMENT_SERVER.value, state, now_ms() - 5000, "9.9.9", now_ms() - 60_000, will)


def test_every_server_chip_and_trust_module_is_expected_and_clients_are_optional(dep: Deployment) -> None:
    rows = expected(dep.load_manifest())
    required = {node for node, _role, needed, _topic in rows if needed}
    optional = {node for node, _role, needed, _topic in rows if not needed}
    assert required == {"trust-server", PS, "dev-0001.chip", "dev-0001.tm", "dev-0002.chip", "dev-0002.tm"}
    assert optional == {"dev-0001.client", "dev-0002.client"}
    assert ("dev-0002.tm", Role.TRUST_MODULE, True, "tp/v1/dev/dev-0002/tm/status") in rows


def test_every_replica_is_shown_from_its_own_topic_and_a_crashed_one_fails_the_check(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("replicas") / "deploy"
    provision(root, 1, broker_port=1, backend="amqtt", replicas=2)
    rep = Deployment(root)
    rows = expected(rep.load_manifest())
    servers = [(node, topic) for node, role, _needed, topic in rows if role is Role.PAYMENT_SERVER]
    assert servers == [(PS, PS_TOPIC), (f"{PS}.2", f"{PS_TOPIC}/2")]
    verifier = public_verifier(rep)

    def row(sender: str, topic: str, body: Status | None) -> NodeStatus:
        chain = (rep.load_cert(sender).to_bytes(), rep.load_public("platform").to_bytes())
        data = None
        if body is not None:
            env = Envelope("status", new_id(), sender, "*", b"", b"", now_ms(), 1, 1, chain, body)
            data = sign_frame(env, topic, rep.load_keys(sender))
        node = dict(servers)
        nid = next(n for n, t in node.items() if t == topic)
        return optional_replica(judge(nid, Role.PAYMENT_SERVER, True, topic, data, verifier))

    ps2, topic2 = f"{PS}.2", f"{PS_TOPIC}/2"
    assert row(ps2, topic2, status("online", node=ps2)).state == "online"
    # a replica killed (its last will) stays required: the check fails although replica 1 serves
    lost = row(ps2, topic2, status("offline", will=True, node=ps2))
    assert (lost.state, lost.required) == ("lost", True)
    assert not all_online([row(PS, PS_TOPIC, status("online")), lost])
    # one `up --replicas 1` did not start, or that was stopped on purpose, is not required
    assert not row(ps2, topic2, None).required
    assert not row(ps2, topic2, status("offline", node=ps2)).required
    # replica 1 is required whatever it says
    assert row(PS, PS_TOPIC, None).required
    # replica 2 cannot speak for replica 1 on its topic, even with its own genuine key
    spoof = row(ps2, PS_TOPIC, status("online", node=ps2))
    assert (spoof.state, spoof.required) == ("unverified", True) and spoof.problem.startswith("wrong_topic")


def test_judge_believes_only_a_signed_status_of_the_node_itself(dep: Deployment) -> None:
    verifier = public_verifier(dep)

    def judged(data: bytes | None) -> NodeStatus:
        return judge(PS, Role.PAYMENT_SERVER, True, PS_TOPIC, data, verifier)

    online = judged(frame(dep, status("online")))
    assert (online.state, online.version) == ("online", "9.9.9")
    assert judged(frame(dep, status("offline"))).state == "offline"
    assert judged(frame(dep, status("offline", will=True))).state == "lost"
    assert judged(None).state == "missing"
    # a forger's "online" (right certificate chain, wrong key) is not believed
    forged = judged(frame(dep, status("online"), keys=KeyPair.generate()))
    assert forged.state == "unverified" and forged.problem.startswith("bad_signature")
    # a genuine frame that is not this node's status is not its status either
    event = StepEvent("", PS, "C", "C5", "ok", "", b"", "")
    assert judged(frame(dep, event)).state == "unverified"
    impostor = judged(frame(dep, status("online", node="trust-server")))
    assert impostor.state == "unverified" and "status topic" in impostor.problem


def test_exit_zero_needs_every_required_node_online() -> None:
    up = NodeStatus("trust-server", "trust-server", True, "online", "0.1.0", 1, 1)
    client = NodeStatus("dev-0001.client", "client", False, "missing")
    lost = NodeStatus(PS, PS, True, "lost", "0.1.0", 1, 1)
    assert all_online([up, client])
    assert not all_online([up, client, lost])
    text = render([up, client, lost], now_ms())
    assert "connection lost (its last will" in text and "not online: payment-server" in text
    assert "not running (optional" in text


def test_an_unreachable_broker_is_an_error_that_says_so(
    dep: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    # port 1 on loopback: nothing listens there
    code = main(
        ["status", "--deploy", str(dep.root), "--broker", "mqtt://127.0.0.1:1?v=3.1.1", "--timeout", "3"]
    )
    err = capsys.readouterr().err
    assert code == EXIT_NOT_ONLINE and "cannot read node status from the broker at 127.0.0.1:2" in err
