"""Replicas in the operator's tools: provisioning, the launcher's checks, rotation, revocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.identities import BrokerIdentity
from nodes.deployment import Deployment, Manifest
from ops.launcher import Launcher
from ops.provision import provision
from ops.revoke_cmd import make_revocations
from ops.rotate_cmd import rotate
from protocol.certs import CertStore
from protocol.errors import ConfigError
from protocol.topics import Role, acl_for

SERVERS = ("trust-server", "trust-server.2", "payment-server", "payment-server.2")


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    provision(tmp_path / "deploy", 1, broker_port=1, backend="mosquitto", replicas=2)
    return Deployment(tmp_path / "deploy")


def test_each_replica_has_its_own_signing_key_certificate_and_login_and_shares_the_box_key(
    dep: Deployment,
) -> None:
    manifest = dep.load_manifest()
    assert manifest.replicas == 2 and manifest.node_ids()[:4] == SERVERS
    certs = {nid: dep.load_cert(nid) for nid in SERVERS}
    assert len({c.serial for c in certs.values()}) == 4
    assert len({c.body.sign_key for c in certs.values()}) == 4
    for role in ("trust-server", "payment-server"):
        first, second = certs[role], certs[f"{role}.2"]
        assert (second.role, second.subject) == (role, f"{role}.2")
        assert first.body.box_key == second.body.box_key
    assert certs["trust-server"].body.box_key != certs["payment-server"].body.box_key
    assert dep.load_broker_credentials("payment-server.2").username == "payment-server.2"
    acl = (dep.broker_dir / "mosquitto.acl").read_text().split("\n\n")
    rules = {block.splitlines()[0]: block.splitlines()[1:] for block in acl if block.startswith("user ")}
    for role, short in (("payment-server", "ps"), ("trust-server", "ts")):
        # the role's rules, but each replica writes only its own status (its retained status and will)
        own, first = f"topic write tp/v1/plat/{short}/status/2", f"topic write tp/v1/plat/{short}/status"
        replica, lone = rules[f"user {role}.2"], rules[f"user {role}"]
        assert own in replica and first not in replica and first in lone and own not in lone
        assert [r for r in replica if r != own] == [r for r in lone if r != first]


def test_a_manifest_without_replicas_has_one_and_a_bad_count_is_refused(dep: Deployment) -> None:
    data = json.loads(dep.manifest_path.read_text())
    assert data["replicas"] == 2
    del data["replicas"]
    assert Manifest.from_json(data).node_ids()[:2] == ("trust-server", "payment-server")
    with pytest.raises(ValueError, match="replicas"):
        Manifest.from_json({**data, "replicas": 0})
    with pytest.raises(ConfigError, match="--replicas"):
        provision(dep.root.with_name("other"), 1, broker_port=1, backend="mosquitto", replicas=0)


async def test_the_launcher_refuses_more_replicas_than_provisioned(dep: Deployment) -> None:
    with pytest.raises(ConfigError, match="identities per server"):
        async with Launcher(dep, replicas=3):
            pass


def test_a_rotation_gives_every_replica_a_new_key_and_the_replicas_one_new_box_key(dep: Deployment) -> None:
    before = {nid: dep.load_cert(nid) for nid in SERVERS}
    platform = rotate(dep)
    after = {nid: dep.load_cert(nid) for nid in SERVERS}
    store = CertStore(dep.load_public("root"), dep.load_public("update"))
    store.accept_platform(platform, platform.body.not_before + 60)
    for nid in SERVERS:
        assert after[nid].body.sign_key != before[nid].body.sign_key
        assert after[nid].body.issuer_serial == platform.serial
        keys = dep.load_keys(nid)
        assert (keys.sign_public, keys.box_public) == (after[nid].body.sign_key, after[nid].body.box_key)
        store.resolve([after[nid].to_bytes(), platform.to_bytes()], platform.body.not_before + 60)
    for role in ("trust-server", "payment-server"):
        assert after[role].body.box_key == after[f"{role}.2"].body.box_key != before[role].body.box_key


def test_one_replica_is_revoked_alone(dep: Deployment) -> None:
    crl = make_revocations(dep, ["payment-server.2"])
    assert set(crl.body.serials) == {dep.load_public_cert("payment-server.2").serial}


def test_a_replica_login_has_its_roles_rules_and_its_own_status() -> None:
    first, second = (
        BrokerIdentity.for_node(Role.PAYMENT_SERVER),
        BrokerIdentity.for_node(Role.PAYMENT_SERVER, replica=2),
    )
    assert (first.username, second.username) == ("payment-server", "payment-server.2")
    assert first.acl == acl_for(Role.PAYMENT_SERVER)
    assert second.acl == acl_for(Role.PAYMENT_SERVER, None, 2) != first.acl
    # a login named like another role's replica gets no replica's topic of that role
    odd = BrokerIdentity("trust-server.2", "pw", Role.PAYMENT_SERVER)
    assert odd.acl == first.acl
