"""``provision --tls``: a CA, a broker certificate for 127.0.0.1, a client certificate per login."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes.deployment import Deployment, OfflineKeys
from nodes.tls import broker_tls, ca_path, client_context, node_tls
from ops.provision import provision
from ops.tls_material import ca_key_path
from protocol.errors import ConfigError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_tls_material_is_issued_per_login_and_kept_private(tmp_path: Path) -> None:
    manifest = provision(tmp_path / "d", 1, backend="mosquitto", tls=True)
    dep = Deployment(tmp_path / "d")
    assert dep.load_manifest().broker.tls and manifest.broker.tls
    ca = load(ca_path(dep))
    server = load(broker_tls(dep).cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for login in manifest.login_ids():
        files = node_tls(dep, login)
        cert = load(files.cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == login
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        assert client_context(files) is not None  # loads: key and certificate belong together
    ca_key = ca_key_path(OfflineKeys.of(dep.root))  # with the offline keys, outside the deployment
    assert not ca_key.is_relative_to(dep.root.absolute())
    for secret in (broker_tls(dep).key, ca_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_tls_needs_mosquitto_and_is_off_by_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls needs the mosquitto backend"):
        provision(tmp_path / "a", 1, backend="amqtt", tls=True)
    plain = provision(tmp_path / "p", 1, backend="amqtt")
    assert not plain.broker.tls
    assert "tls" not in (tmp_path / "p" / "manifest.json").read_text()
