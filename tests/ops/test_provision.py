"""``trustpay provision``: the directory it writes, what verifies, what runs."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path
from types import ModuleType

import pytest

import nodes
from nodes.deployment import Deployment, Manifest, OfflineKeys, read_tree
from ops.cli import main
from ops.provision import provision
from protocol.certs import Certificate, CertStore, RevocationList
from protocol.errors import ConfigError
from protocol.measure import measure
from protocol.records import PACKAGE_DOMAIN, RELEASE_DOMAIN, Order, Package, Release, open_record
from protocol.topics import Role

NOW_MS = 1_700_000_000_000
NOW_S = NOW_MS // 1000


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Deployment, Manifest]:
    out = tmp_path_factory.mktemp("prov") / "deploy"
    manifest = provision(out, 2, now_ms=NOW_MS, backend="mosquitto", broker_port=18830)
    return Deployment(out), manifest


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"installed_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_shape(deployed: tuple[Deployment, Manifest]) -> None:
    dep, manifest = deployed
    data = json.loads(dep.manifest_path.read_text())
    assert data == manifest.to_json()
    assert set(data) == {
        "format", "created_ms", "currency", "exponent", "broker", "devices",
        "servers", "accounts", "merchants", "databases",
    }  # fmt: skip
    assert (data["format"], data["created_ms"], data["currency"], data["exponent"]) == (1, NOW_MS, "EUR", 2)
    assert data["broker"] == {"backend": "mosquitto", "host": "127.0.0.1", "port": 18830}
    assert data["devices"][0] == {
        "device": "dev-0001",
        "nodes": {"trust-module": "dev-0001.tm", "chip": "dev-0001.chip", "client": "dev-0001.client"},
        "apps": ["wallet", "transit"],
        "accounts": {"wallet": "dev-0001:wallet", "transit": "dev-0001:transit"},
    }
    assert [d["device"] for d in data["devices"]] == ["dev-0001", "dev-0002"]
    assert data["servers"] == {"trust-server": "trust-server", "payment-server": "payment-server"}
    assert data["accounts"][0] == {
        "account": "dev-0001:wallet", "kind": "payer", "currency": "EUR", "opening_balance": 100000,
    }  # fmt: skip
    assert len(data["accounts"]) == 4
    assert [m["account"] for m in data["merchants"]] == ["shop-1", "shop-2", "shop-3"]
    assert all(m["opening_balance"] == 0 and m["kind"] == "merchant" for m in data["merchants"])
    assert data["databases"] == {"trust": "platform/trust.sqlite", "ledger": "platform/ledger.sqlite"}
    assert dep.platform_dir.is_dir() and not any(dep.platform_dir.iterdir())


def test_secret_modes(deployed: tuple[Deployment, Manifest]) -> None:
    dep, manifest = deployed
    offline = OfflineKeys.of(dep.root).root
    secrets = list(offline.glob("*.key"))
    assert {p.stem for p in secrets} == {"root", "update", "platform", "issuer"}
    for nid in manifest.login_ids():
        secrets += [dep.node_key_path(nid), dep.broker_credentials_path(nid)]
        assert mode(dep.node_dir(nid)) == 0o700
        assert mode(dep.state_dir(nid)) == 0o700 and not any(dep.state_dir(nid).iterdir())
    assert all(mode(p) == 0o600 for p in secrets)
    for directory in (offline, dep.platform_dir, dep.broker_dir, dep.logs_dir):
        assert mode(directory) == 0o700
    assert mode(dep.broker_dir / "mosquitto.passwd") == 0o600


def test_certificates_chain_to_the_root(deployed: tuple[Deployment, Manifest]) -> None:
    dep, manifest = deployed
    public = {n: Certificate.from_bytes((dep.public_dir / f"{n}.cert").read_bytes()) for n in
              ("root", "update", "platform", "issuer")}  # fmt: skip
    store = CertStore(public["root"], public["update"])
    crl = RevocationList.from_bytes(dep.crl_path.read_bytes())
    store.set_revocations(crl, crl.body.issued_at)
    assert (crl.body.number, crl.body.serials) == (0, ())
    platform = public["platform"].to_bytes()
    serials = [public[n].serial for n in ("root", "update", "platform", "issuer")]
    for nid in manifest.login_ids():
        raw = dep.cert_path(nid).read_bytes()
        assert raw == dep.node_cert_path(nid).read_bytes()
        role = Role(Certificate.from_bytes(raw).role)
        chain = [raw, platform] if role in (Role.TRUST_SERVER, Role.PAYMENT_SERVER) else [raw]
        cert = store.resolve(chain, NOW_S)
        assert cert.subject == nid
        assert cert.body.not_before == NOW_S - 60 and cert.body.not_after == NOW_S + 365 * 86400
        device = nid.split(".")[0] if role.on_device else ""
        assert cert.body.device == device
        serials.append(cert.serial)
    assert serials == sorted(set(serials))
    chip_update = dep.update_cert_path("dev-0002").read_bytes()
    assert chip_update == public["update"].to_bytes()


def test_packages_and_releases_match_disk(deployed: tuple[Deployment, Manifest]) -> None:
    dep, manifest = deployed
    issuer = Certificate.from_bytes((dep.public_dir / "issuer.cert").read_bytes()).body.sign_key
    releases = {p.name: p.read_bytes() for p in dep.releases_dir.iterdir()}
    assert set(releases) == {
        "client-trustpay-client-1.0.0.release", "app-wallet-1.0.0.release", "app-transit-1.0.0.release",
    }  # fmt: skip
    client = dep.read_client("dev-0002")
    rel = open_record(Release, releases["client-trustpay-client-1.0.0.release"], RELEASE_DOMAIN, issuer, "r")
    m = measure("client", "trustpay-client", "1.0.0", client.code, client.static, client.dynamic)
    assert (rel.body.code, rel.body.static, rel.body.withdrawn) == (m.code, m.static, False)
    for device in manifest.devices:
        for app in device.apps:
            files = dep.read_app(device.device, app)
            m = measure("app", app, "1.0.0", files.code, files.static, files.dynamic)
            blob = dep.package_sig_path(device.device, app).read_bytes()
            pkg = open_record(Package, blob, PACKAGE_DOMAIN, issuer, "package").body
            assert pkg == Package(app, "1.0.0", m.code, m.static)
            rel = open_record(Release, releases[f"app-{app}-1.0.0.release"], RELEASE_DOMAIN, issuer, "r")
            assert (rel.body.kind, rel.body.name, rel.body.code, rel.body.static) == (
                "app",
                app,
                m.code,
                m.static,
            )


def test_static_and_dynamic_data(deployed: tuple[Deployment, Manifest]) -> None:
    dep, _ = deployed
    client = dep.client_dir("dev-0001")
    assert (client / "static.json").read_bytes() == (
        b'{"currency":"EUR","default_app":"wallet","exponent":2,"name":"trustpay-client","version":"1.0.0"}\n'
    )
    assert json.loads((client / "dynamic.json").read_bytes()) == {"attempts": 0, "last_order": ""}
    app = dep.app_dir("dev-0001", "transit")
    assert json.loads((app / "static.json").read_bytes()) == {
        "name": "transit", "version": "1.0.0", "currency": "EUR", "limit": 50000,
    }  # fmt: skip
    assert (app / "dynamic.json").read_bytes() == b'{"counter":0,"last_order":""}\n'


def test_installed_app_code_runs(deployed: tuple[Deployment, Manifest]) -> None:
    dep, _ = deployed
    app = dep.app_dir("dev-0001", "wallet")
    code = load_module(app / "code.py")
    static = json.loads((app / "static.json").read_bytes())
    dynamic = json.loads((app / "dynamic.json").read_bytes())
    kw = {"device": "dev-0001", "payee": "shop-1", "currency": "EUR", "order_id": "o-1", "now_ms": NOW_MS}
    fields, new_dynamic = code.make_order(static, dynamic, amount=1250, **kw)
    order = Order(**fields)
    assert (order.app, order.amount, order.counter, order.payee) == ("wallet", 1250, 1, "shop-1")
    assert new_dynamic == {"counter": 1, "last_order": "o-1"}
    assert dynamic == {"counter": 0, "last_order": ""}  # the input is left alone
    assert code.make_order(static, new_dynamic, amount=50000, **kw)[0]["counter"] == 2
    for amount in (50001, 0, -5, True):
        with pytest.raises(ValueError):
            code.make_order(static, dynamic, amount=amount, **kw)
    with pytest.raises(ValueError, match="EUR"):
        code.make_order(static, dynamic, amount=100, **{**kw, "currency": "USD"})


def test_the_client_install_is_the_projects_client_modules(deployed: tuple[Deployment, Manifest]) -> None:
    dep, _ = deployed
    project = Path(nodes.__file__).parent.parent
    for device in ("dev-0001", "dev-0002"):
        files = read_tree(dep.client_code_dir(device))
        expected = {"nodes/client.py", "nodes/client_main.py", "nodes/runtime.py", "protocol/measure.py"}
        assert expected <= set(files)
        assert {"nodes/__init__.py", "protocol/__init__.py"} <= set(files)
        # the servers' and the chip's code is no part of the client
        assert not {"nodes/trust_module.py", "nodes/chip.py", "nodes/ledger.py"} & set(files)
        assert not [p for p in files if not p.startswith(("nodes/", "protocol/")) or not p.endswith(".py")]
        for path, data in files.items():
            assert data == (project / path).read_bytes(), path


def test_installed_client_code_runs(deployed: tuple[Deployment, Manifest]) -> None:
    dep, _ = deployed
    client = load_module(dep.client_code_dir("dev-0002") / "nodes" / "client_text.py")
    assert client.parse_amount("12.50", 2) == 1250
    assert client.parse_amount("0.01", 2) == 1
    assert client.parse_amount(" 7 ", 2) == 700
    assert client.parse_amount("3.5", 2) == 350
    for bad, why in [
        ("1.234", "decimal places"), ("-1", "negative"), ("abc", "not an amount"), ("1e3", "not an amount"),
        ("0", "more than zero"), ("0.00", "more than zero"), ("", "not an amount"), ("1.", "not an amount"),
        ("NaN", "not an amount"), ("١٢", "not an amount"), ("9" * 20, "too large"), ("1.5", "no decimal"),
    ]:  # fmt: skip
        exponent = 0 if bad == "1.5" else 2
        with pytest.raises(ValueError, match=why):
            client.parse_amount(bad, exponent)
    assert client.format_amount(1250, "EUR", 2) == "12.50 EUR"
    assert client.format_amount(1, "EUR", 2) == "0.01 EUR"
    assert client.format_amount(-100, "JPY", 0) == "-100 JPY"
    dynamic = {"attempts": 0, "last_order": ""}
    after = client.record_payment(dynamic, "o-1")
    assert after == {"attempts": 1, "last_order": "o-1"}
    assert client.record_payment(after, "o-2") == {"attempts": 2, "last_order": "o-2"}


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--force"):
        provision(out, 1, backend="mosquitto")
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging directory left behind
    provision(out, 1, backend="mosquitto", force=True)
    assert (
        not (out / "precious.txt").exists()
        and Deployment(out).load_manifest().devices[0].device == "dev-0001"
    )


def test_empty_dir_is_used_and_options_are_checked(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    manifest = provision(out, 1, backend="amqtt", opening_balance=5)
    assert manifest.broker.backend == "amqtt" and 0 < manifest.broker.port < 65536
    assert {a.opening_balance for a in manifest.accounts} == {5}
    assert mode(Deployment(out).broker_dir / "amqtt.passwd") == 0o600
    for kwargs in ({"devices": 0}, {"devices": 1, "backend": "kafka"}, {"devices": 1, "opening_balance": -1}):
        with pytest.raises(ConfigError):
            provision(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_json_is_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert main(["provision", "--out", str(out), "--devices", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "manifest.json").read_text())
    assert len(printed["devices"]) == 2


def test_cli_summary_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert main(["provision", "--out", str(out), "--devices", "1", "--backend", "amqtt"]) == 0
    assert "amqtt on 127.0.0.1:" in capsys.readouterr().out
    assert main(["provision", "--out", str(out), "--devices", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trustpay: error: ") and "--force" in err
    assert main(["provision", "--out", str(tmp_path / "e"), "--devices", "1", "--broker-port", "70000"]) == 2
    assert "--broker-port" in capsys.readouterr().err
    assert main(["provision", "--devices", "1"]) == 2  # argparse: --out is required


# -- the offline keys live outside the running deployment --------------------------------
def test_no_offline_private_key_is_in_the_deployment(deployed: tuple[Deployment, Manifest]) -> None:
    """Every key file under the deployment is a node's own; the four offline keys are elsewhere.

    On main ``private/{root,update,platform,issuer}.key`` sat inside the deployment,
    so anything that reads the deployment (a node, a backup of it) held them.
    """
    dep, manifest = deployed
    offline = OfflineKeys.of(dep.root)
    offline_publics = {offline.load(n).sign_public for n in ("root", "update", "platform", "issuer")}
    node_keys = {dep.node_key_path(nid) for nid in manifest.login_ids()}
    for path in dep.root.rglob("*"):
        if path.is_file() and path.suffix == ".key":
            assert path in node_keys, f"{path} is not a node key"
            assert dep.load_keys(path.parent.name).sign_public not in offline_publics
    assert not offline.root.is_relative_to(dep.root)
    assert offline.root == dep.root.parent / "deploy.offline"


def test_offline_directory_is_chosen_and_guarded(tmp_path: Path) -> None:
    out, keys = tmp_path / "deploy", tmp_path / "vault" / "keys"
    provision(out, 1, now_ms=NOW_MS, backend="amqtt", broker_port=18831, offline=keys)
    assert {p.name for p in keys.iterdir()} == {"root.key", "update.key", "platform.key", "issuer.key"}
    assert not (tmp_path / "deploy.offline").exists()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        provision(tmp_path / "other", 1, backend="amqtt", broker_port=18831, offline=keys)
    with pytest.raises(ConfigError, match="outside the deployment"):
        provision(tmp_path / "d3", 1, backend="amqtt", broker_port=18831, offline=tmp_path / "d3" / "k")
    before = OfflineKeys(keys).load("root").sign_public
    provision(out, 1, backend="amqtt", broker_port=18831, offline=keys, force=True)
    assert OfflineKeys(keys).load("root").sign_public != before
    assert OfflineKeys(keys).load("root").sign_public == Deployment(out).load_public("root").body.sign_key
