"""Reading a provisioned deployment back: typed loaders and actionable errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from nodes.assemble import identity
from nodes.deployment import (
    Deployment,
    Manifest,
    OfflineKeys,
    canonical_json,
    keys_to_bytes,
    load_json,
    parse_node_id,
    write_secret,
)
from ops.broker_cmd import broker_identities
from ops.provision import provision
from protocol.certs import RevocationList
from protocol.errors import ConfigError
from protocol.keys import KeyPair
from protocol.records import RELEASE_DOMAIN, Release, open_record
from protocol.topics import Role, node_id


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("dep") / "deploy"
    return out, provision(out, 2, backend="mosquitto")


@pytest.fixture
def dep(source: tuple[Path, Manifest], tmp_path: Path) -> Deployment:
    """A private copy, so a test may break files without disturbing the others."""
    copy = tmp_path / "copy"
    shutil.copytree(source[0], copy)
    shutil.copytree(OfflineKeys.of(source[0]).root, OfflineKeys.of(copy).root)
    return Deployment(copy)


def test_manifest_round_trips(dep: Deployment, source: tuple[Path, Manifest]) -> None:
    manifest = dep.load_manifest()
    assert manifest == source[1]
    assert Manifest.from_json(json.loads(manifest.to_text())) == manifest
    assert manifest.device("dev-0002").node(Role.CHIP) == "dev-0002.chip"
    assert manifest.node_ids()[:2] == ("trust-server", "payment-server")
    assert len(manifest.login_ids()) == 2 + 3 * 2 + 2
    with pytest.raises(ConfigError, match="dev-0009"):
        manifest.device("dev-0009")


def test_missing_or_bad_manifest(tmp_path: Path, dep: Deployment) -> None:
    with pytest.raises(ConfigError, match=r"not a trustpay deployment.*trustpay provision --out"):
        Deployment(tmp_path / "nowhere").load_manifest()
    data = json.loads(dep.manifest_path.read_text())
    data["broker"]["port"] = "1883"
    dep.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'port' must be a int"):
        dep.load_manifest()
    dep.manifest_path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid manifest"):
        dep.load_manifest()


def test_keys_match_certificates(dep: Deployment) -> None:
    for nid in dep.load_manifest().login_ids():
        keys, cert = dep.load_keys(nid), dep.load_cert(nid)
        assert (keys.sign_public, keys.box_public) == (cert.body.sign_key, cert.body.box_key)
    for name in ("root", "update", "platform", "issuer"):
        assert OfflineKeys.of(dep.root).load(name).sign_public == dep.load_public(name).body.sign_key
    assert dep.load_update_cert("dev-0001") == dep.load_public("update")
    assert isinstance(dep.load_public("crl"), RevocationList)
    with pytest.raises(ConfigError, match="no public item"):
        dep.load_public("chip")  # type: ignore[call-overload]


def test_key_file_problems_are_config_errors(dep: Deployment) -> None:
    key = dep.node_key_path("dev-0001.tm")
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        dep.load_keys("dev-0001.tm")
    write_secret(key, b"\x93garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        dep.load_keys("dev-0001.tm")
    key.unlink()
    with pytest.raises(ConfigError, match="missing"):
        dep.load_keys("dev-0001.tm")
    dep.node_cert_path("trust-server").write_bytes(b"\xc1")
    with pytest.raises(ConfigError, match="corrupt"):
        dep.load_cert("trust-server")


def test_broker_credentials(dep: Deployment) -> None:
    login = dep.load_broker_credentials("dev-0002.client")
    assert login.username == "dev-0002.client" and len(login.password) >= 32
    idents = broker_identities(dep, dep.load_manifest())
    assert next(i for i in idents if i.username == "dev-0002.client").role is Role.CLIENT
    assert {i.username for i in idents} == set(dep.load_manifest().login_ids())
    assert {i.role for i in idents} == set(Role)
    passwd = (dep.broker_dir / "mosquitto.passwd").read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {i.username for i in idents}
    path = dep.broker_credentials_path("monitor")
    write_secret(path, json.dumps({"username": "operator", "password": "x"}).encode())
    with pytest.raises(ConfigError, match="not 'monitor'"):
        dep.load_broker_credentials("monitor")


def test_components_and_releases(dep: Deployment) -> None:
    files = dep.read_app("dev-0001", "wallet")
    assert load_json(files.static, "static")["limit"] == 50000
    assert files.code.startswith(b'"""A payment application')
    assert load_json(dep.read_client("dev-0001").dynamic, "dynamic") == {
        "attempts": 0, "last_order": "",
    }  # fmt: skip
    assert dep.installed_apps("dev-0001") == ["transit", "wallet"]
    shutil.rmtree(dep.app_dir("dev-0001", "transit"))  # what the trust module does in A3
    assert dep.installed_apps("dev-0001") == ["wallet"]
    with pytest.raises(ConfigError, match="missing"):
        dep.read_app("dev-0001", "transit")
    with pytest.raises(ConfigError):
        dep.app_dir("dev-0001", "../x")
    issuer = dep.load_public("issuer").body.sign_key
    names = [
        open_record(Release, b, RELEASE_DOMAIN, issuer, "release").body.name for b in dep.load_releases()
    ]
    assert names == ["transit", "wallet", "trustpay-client"]


def test_paths(dep: Deployment) -> None:
    root = dep.root
    assert dep.trust_db == root / "platform/trust.sqlite" and dep.ledger_db == root / "platform/ledger.sqlite"
    assert dep.log_path("dev-0001.tm") == root / "logs/dev-0001.tm.log"
    assert dep.state_dir("payment-server") == root / "nodes/payment-server/state"
    assert dep.client_dir("dev-0001") == root / "devices/dev-0001/client"
    assert dep.app_dir("dev-0001", "wallet") == root / "devices/dev-0001/chip/apps/wallet"
    assert dep.update_cert_path("dev-0001") == root / "nodes/dev-0001.chip/update.cert"
    assert dep.release_path("app", "wallet", "1.0.0") == root / "releases/app-wallet-1.0.0.release"


def test_parse_node_id() -> None:
    for role in Role:
        device = "dev-0001" if role.on_device else None
        assert parse_node_id(node_id(role, device)) == (role, device)
    for bad in ("dev-0001.ts", "chip", "nobody", "bad id.tm"):
        with pytest.raises(ConfigError):
            parse_node_id(bad)


def test_file_helpers(tmp_path: Path) -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}\n'.encode()
    old = os.umask(0)
    try:
        path = write_secret(tmp_path / "s", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_json(b"[1]", "static data")


def test_a_node_never_runs_on_a_key_its_certificate_does_not_name(dep: Deployment) -> None:
    """A rotation interrupted between the key and the certificate must stop the server, not sign
    frames every receiver refuses (or, worse, pair an old leaked key with the new certificate)."""
    identity(dep, "trust-server")  # the provisioned pair is consistent
    write_secret(dep.node_key_path("trust-server"), keys_to_bytes(KeyPair.generate()))
    with pytest.raises(ConfigError, match="rotation was interrupted"):
        identity(dep, "trust-server")
