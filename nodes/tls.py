"""TLS to the broker: where a deployment keeps its certificates, and a client's SSL context.

``trustpay provision --tls`` (Mosquitto only) writes a deployment CA, a broker
server certificate for 127.0.0.1 and a client certificate per broker login whose
CN is the login. The broker requires a client certificate *and* the password, so
a remote broker never sees a password in clear and a stolen password alone is
not enough. Each node reads its key from its own directory.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError

from .deployment import Deployment


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the deployment CA's certificate (PEM), which signed every other
    cert: Path
    key: Path


def ca_path(dep: Deployment) -> Path:
    return dep.public_dir / "broker-ca.pem"


def node_tls(dep: Deployment, nid: str) -> TlsFiles:
    """The client certificate of the broker login ``nid`` (a node, the monitor, the operator)."""
    return TlsFiles(ca_path(dep), dep.node_dir(nid) / "tls.pem", dep.node_dir(nid) / "tls.key")


def broker_tls(dep: Deployment) -> TlsFiles:
    return TlsFiles(
        ca_path(dep), dep.broker_dir / "tls" / "server.pem", dep.broker_dir / "tls" / "server.key"
    )


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Verify the broker against the deployment CA (and its IP), and present our certificate."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the broker TLS files {files.cert} / {files.key} (CA {files.ca}): {exc}; "
            "was the deployment provisioned with --tls?"
        ) from exc
    return ctx
