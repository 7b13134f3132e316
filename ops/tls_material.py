"""X.509 material for the broker's TLS: a deployment CA, the broker's server certificate, one client
certificate per broker login (CN = the login). ECDSA P-256, SHA-256; PEM on disk.

Written by ``trustpay provision --tls``; read by the broker (``broker.ServerTls``)
and by each node (``nodes.tls``).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes.deployment import Deployment, OfflineKeys, make_private_dir, write_file, write_secret
from nodes.tls import broker_tls, ca_path, node_tls

BROKER_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustpay deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now_s: int, days: int
) -> x509.CertificateBuilder:
    start = datetime.datetime.fromtimestamp(now_s - 300, datetime.UTC)  # a little clock skew
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )


def make_ca(now_s: int, days: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("trustpay broker CA", _name("trustpay broker CA"), key, now_s, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(ca: Issued, subject: str, now_s: int, days: int, *, server: bool) -> Issued:
    """A leaf: the broker (``server``, valid for 127.0.0.1) or one login's client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, ca.cert.subject, key, now_s, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(BROKER_HOST))])
        builder = builder.add_extension(san, critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def ca_key_path(offline: OfflineKeys) -> Path:
    """Needed only to issue more certificates: kept with the offline keys, which no node reads."""
    return offline.root / "broker-ca.key"


def write_tls(dep: Deployment, offline: OfflineKeys, logins: Iterable[str], now_s: int, days: int) -> None:
    """The CA, the broker's certificate and every login's, each key owner-only in its owner's dir."""
    ca = make_ca(now_s, days)
    write_file(ca_path(dep), ca.cert_pem)
    write_secret(ca_key_path(offline), ca.key_pem)
    server = issue(ca, BROKER_HOST, now_s, days, server=True)
    files = broker_tls(dep)
    make_private_dir(files.cert.parent)
    write_file(files.cert, server.cert_pem)
    write_secret(files.key, server.key_pem)
    for login in logins:
        client = issue(ca, login, now_s, days, server=False)
        files = node_tls(dep, login)
        write_file(files.cert, client.cert_pem)
        write_secret(files.key, client.key_pem)
