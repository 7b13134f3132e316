"""The operator's offline commands: they work from a separate keys directory, and a platform
rotation leaves a leaked server key worthless."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodes.assemble import identity
from nodes.deployment import Deployment, OfflineKeys
from ops.provision import provision
from ops.release_cmd import make_release
from ops.revoke_cmd import make_revocations
from ops.rotate_cmd import rotate
from protocol.appraisal import open_release
from protocol.certs import CertStore
from protocol.envelope import Envelope, Verifier, new_id, sign_frame
from protocol.errors import BadSignature, CertificateInvalid, ConfigError
from protocol.keys import KeyPair
from protocol.messages import Ping
from protocol.replay import ReplayGuard
from protocol.topics import Role, link_topic

DEV = "dev-0001"
TS = "trust-server"


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    out = tmp_path / "deploy"
    provision(out, 1, backend="amqtt", broker_port=1, offline=tmp_path / "vault")
    return Deployment(out)


def test_release_rotate_and_revoke_use_the_separate_offline_directory(
    dep: Deployment, tmp_path: Path
) -> None:
    vault = OfflineKeys(tmp_path / "vault")
    with pytest.raises(ConfigError, match=r"offline keys directory .* missing"):
        rotate(dep)  # the default place beside the deployment holds nothing here
    platform = rotate(dep, vault)
    assert dep.load_public("platform") == platform
    assert vault.load("platform").sign_public == platform.body.sign_key
    crl = make_revocations(dep, [f"{DEV}.chip"], vault)
    assert crl.body.number == 1 and dep.load_public("crl") == crl
    new = tmp_path / "client-1.1"
    (new / "code" / "nodes").mkdir(parents=True)
    (new / "code" / "nodes" / "client_main.py").write_bytes(b"print('1.1')\n")
    (new / "static.json").write_bytes(b'{"name":"trustpay-client","version":"1.1.0"}\n')
    blob = make_release(dep, "client", "trustpay-client", "1.1.0", new, withdraw=False, offline=vault)
    certs = CertStore(dep.load_public("root"))
    assert open_release(blob, dep.load_issuer(certs, int(time.time()))).version == "1.1.0"
    with pytest.raises(ConfigError, match="not this deployment's root"):
        other = tmp_path / "other"
        provision(other, 1, backend="amqtt", broker_port=1)
        make_revocations(dep, [f"{DEV}.tm"], OfflineKeys.of(other))


def frame_from_ts(keys: KeyPair, chain: tuple[bytes, ...], topic: str) -> bytes:
    env = Envelope(
        "ping", new_id(), TS, f"{DEV}.tm", b"", b"", time.time_ns() // 1_000_000, 1, 1, chain, Ping(b"x")
    )
    return sign_frame(env, topic, keys)


def test_after_a_rotation_frames_signed_with_the_old_server_key_are_refused(
    dep: Deployment, tmp_path: Path
) -> None:
    """Fails on main: rotate-platform re-certified the servers' old keys, so a leaked server key
    signed frames that the new, public server certificate vouched for."""
    leaked, old_chain = dep.load_keys(TS), identity(dep, TS).chain
    rotate(dep, OfflineKeys(tmp_path / "vault"))
    current = identity(dep, TS)
    assert current.keys.sign_public != leaked.sign_public
    # a terminal that took the rotation at C1
    terminal = CertStore(dep.load_public("root"), dep.load_public("update"))
    terminal.accept_platform(dep.load_public("platform"), int(time.time()))
    receiver = Verifier(frozenset({f"{DEV}.tm"}), terminal, ReplayGuard(floor_ms=0))
    topic = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, DEV)
    now = time.time_ns() // 1_000_000
    with pytest.raises(BadSignature):  # the leaked key under the new certificate
        receiver.open(frame_from_ts(leaked, current.chain, topic), topic, now)
    with pytest.raises(CertificateInvalid):  # the leaked key under its own, superseded certificate
        receiver.open(frame_from_ts(leaked, old_chain, topic), topic, now)
    assert receiver.open(frame_from_ts(current.keys, current.chain, topic), topic, now).envelope.sender == TS
