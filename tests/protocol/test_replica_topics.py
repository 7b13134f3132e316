"""Server replicas in the topic tree: their ids, the links they share, their group and their ACL."""

from __future__ import annotations

import pytest

from protocol.errors import WrongTopic
from protocol.messages import GENERIC_TYPES, MESSAGE_TYPES, SERVER_ANSWERS, shared_senders
from protocol.topics import (
    CRL_TOPIC,
    SERVER_ROLES,
    Role,
    client_id_allowed,
    inbound_filters,
    node_id,
    replica_ids,
    server_replica,
    share_group,
)

TS, PS, TM, CHIP = Role.TRUST_SERVER, Role.PAYMENT_SERVER, Role.TRUST_MODULE, Role.CHIP


def test_the_first_replica_keeps_the_role_name_and_the_others_are_numbered() -> None:
    assert replica_ids(PS, 3) == ("payment-server", "payment-server.2", "payment-server.3")
    for role in SERVER_ROLES:
        for k, nid in enumerate(replica_ids(role, 4), start=1):
            assert server_replica(nid) == (role, k)


@pytest.mark.parametrize(
    "nid",
    ["payment-server.1", "payment-server.02", "payment-server.x", "payment-server.", "chip.2", "monitor.2"],
)
def test_anything_else_is_no_replica_id(nid: str) -> None:
    assert server_replica(nid) is None


def test_only_servers_have_replicas() -> None:
    with pytest.raises(WrongTopic):
        node_id(Role.MONITOR, None, 2)
    with pytest.raises(WrongTopic):
        node_id(PS, None, 0)
    assert node_id(CHIP, "dev-0001", 1) == "dev-0001.chip"


def test_every_type_on_a_server_link_is_a_request_or_an_answer_of_the_table() -> None:
    # shared_senders reads SERVER_ANSWERS: a type missing there would make a link look shared or not
    declared = SERVER_ANSWERS.keys() | set(SERVER_ANSWERS.values())
    for spec in MESSAGE_TYPES.values():
        if spec.name in GENERIC_TYPES:
            continue
        for src, dst in spec.links:
            if Role.OPERATOR not in (src, dst) and {src, dst} & set(SERVER_ROLES):
                assert spec.name in declared, (spec.name, src, dst)


def test_requests_are_shared_answers_reach_every_replica() -> None:
    # the trust-server asks the payment-server: the link back carries answers, so it is not shared
    assert shared_senders(TS) == {TM}
    assert shared_senders(PS) == {CHIP, TS}
    group = share_group(TS, b"k" * 32)
    assert inbound_filters(TS, None, shared_senders(TS), group) == (
        f"$share/{group}/tp/v1/dev/+/tm/ts",
        "tp/v1/plat/ps/ts",
        "tp/v1/plat/ops/ts",
        CRL_TOPIC,
    )
    filters = inbound_filters(PS, None, shared_senders(PS), share_group(PS, b"k" * 32))
    assert [f for f in filters if not f.startswith("$share/")] == ["tp/v1/plat/ops/ps", CRL_TOPIC]
    with pytest.raises(WrongTopic):
        inbound_filters(PS, None, shared_senders(PS))  # no group name: refused, never "$share//..."


def test_the_group_name_needs_the_roles_secret() -> None:
    # a device that could name the group could join it and swallow its share of the requests
    a, b = share_group(PS, b"a" * 32), share_group(PS, b"b" * 32)
    assert a != b and share_group(TS, b"a" * 32) != a
    assert a == share_group(PS, b"a" * 32)  # every replica of the role computes the same
    assert PS.value not in a and not set(a) & set("/+#")


def test_a_replica_may_use_only_its_own_client_id() -> None:
    assert client_id_allowed("payment-server.2", "payment-server.2")
    assert not client_id_allowed("payment-server.2", "payment-server")
    assert not client_id_allowed("payment-server", "payment-server.2")
