"""Build a node's configuration, bus and logging from a deployment directory.

This is where a deployment's files become the frozen, typed objects the
runtime works with; it is done once, at the entry point.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from protocol.certs import ROOT, Certificate, CertStore
from protocol.errors import CertificateInvalid, ConfigError
from protocol.topics import DEVICE_ROLES, MONITOR_PORT_OFFSET, SERVER_ROLES, Role

from .bus import BrokerAddress, MqttBus, WillFactory
from .deployment import Deployment, Manifest, parse_node_id
from .logs import NodeLogging
from .runtime import Anchors, Identity, NodeConfig, Settings, server_filters
from .tls import client_context, node_tls


def identity(dep: Deployment, node_id: str) -> Identity:
    role, device = parse_node_id(node_id)
    cert = dep.load_cert(node_id)
    if cert.subject != node_id or cert.role != role.value:
        raise ConfigError(f"{dep.node_cert_path(node_id)} is not {node_id}'s {role.value} certificate")
    chain: tuple[bytes, ...] = (cert.to_bytes(),)
    if cert.body.issuer != ROOT:  # servers: their certificate, then the platform's
        chain += (dep.load_public("platform").to_bytes(),)
    keys = dep.load_keys(node_id)
    # A rotation writes the key and the certificate one file at a time: never run on a mixed pair.
    if (keys.sign_public, keys.box_public) != (cert.body.sign_key, cert.body.box_key):
        raise ConfigError(
            f"{dep.node_key_path(node_id)} does not hold the key certified in {dep.node_cert_path(node_id)}: "
            "a key rotation was interrupted; run `trustpay rotate-platform` again"
        )
    return Identity(node_id, role, device, keys, cert, chain)


def reloaded_identity(
    dep: Deployment, node_id: str, held: CertStore, now_s: int
) -> tuple[Identity, Certificate]:
    """A server's identity and platform certificate afresh from the deployment, fully checked.

    The new platform certificate must come through the update certificate and
    be newer than the held one, and the server's chain must verify under it,
    so a half-rotated deployment leaves the server on its old identity.
    """
    ident = identity(dep, node_id)
    platform = dep.load_public("platform")
    if held.update is None:
        raise ConfigError(f"{node_id} holds no update certificate: cannot check a platform certificate")
    current = held.platform
    if (
        current is not None
        and platform.to_bytes() != current.to_bytes()
        and platform.serial <= current.serial
    ):
        raise CertificateInvalid(
            f"the deployment's platform certificate {platform.serial} is not newer than the one in use "
            f"({current.serial}): keys not reloaded"
        )
    probe = CertStore(held.root, held.update)
    probe.revoked = held.revoked
    probe.accept_platform(platform, now_s)
    probe.resolve(list(ident.chain), now_s, accept_rotation=False)
    return ident, platform


def anchors(dep: Deployment, role: Role, device: str | None) -> Anchors:
    """What a node trusts. The trust module gets its update certificate from the chip (claim 3)."""
    update = None
    if role is Role.CHIP and device is not None:
        update = dep.load_update_cert(device)
    elif role not in DEVICE_ROLES:
        update = dep.load_public("update")
    return Anchors(
        root=dep.load_public("root"),
        update=update,
        platform=dep.load_public("platform"),
        crl=dep.load_public("crl"),
    )


def node_config(dep: Deployment, node_id: str, settings: Settings | None = None) -> NodeConfig:
    ident = identity(dep, node_id)
    return NodeConfig(
        identity=ident,
        anchors=anchors(dep, ident.role, ident.device),
        state_dir=dep.state_dir(node_id),
        settings=settings or Settings(),
    )


def broker_address(
    dep: Deployment, node_id: str, url: str | None = None, manifest: Manifest | None = None
) -> BrokerAddress:
    """The manifest's broker, or ``url`` (mqtt[s]://host:port[,host:port...][?v=5|3.1.1]) when given.

    TLS (``mqtts``, or a manifest saying so) presents the login's own client certificate.
    Several members (a clustered broker, or a manifest on ``nats``): the node starts on
    one picked by its id, so the nodes spread over the members, and fails over to the
    others in turn (:class:`nodes.bus.MqttBus`); the monitor starts on the first.
    ``manifest``: the deployment's, when the caller holds it already (a fleet reads it once).
    """
    creds = dep.load_broker_credentials(node_id)
    manifest = manifest or dep.load_manifest()
    host, tls, backend = manifest.broker.host, manifest.broker.tls, manifest.broker.backend
    endpoints = [(host, manifest.broker.port)]
    if backend == "nats":  # a cluster: broker.nats.member_ports
        endpoints = [(host, manifest.broker.port + _NATS_PORTS_PER_MEMBER * i) for i in range(_NATS_MEMBERS)]
    version = "5" if backend == "mosquitto" else "3.1.1"
    if url:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp", "mqtts") or not parts.netloc:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://127.0.0.1:1883 or mqtts://...")
        endpoints = [_host_port(url, member) for member in parts.netloc.split(",")]
        tls = parts.scheme == "mqtts"
        version = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("v", "auto")
    role = parse_node_id(node_id)[0]
    if role is Role.MONITOR:
        # NATS, RabbitMQ (and so any cluster's URL): one MQTT listener, the monitor shares it
        if backend in ("mosquitto", "amqtt") and len(endpoints) == 1:
            endpoints = [(h, p + MONITOR_PORT_OFFSET) for h, p in endpoints]
    elif len(endpoints) > 1:
        first = zlib.crc32(node_id.encode()) % len(endpoints)
        endpoints = endpoints[first:] + endpoints[:first]
    context = client_context(node_tls(dep, node_id)) if tls else None
    (host, port), *others = endpoints
    return BrokerAddress(host, port, creds.username, creds.password, version, context, tuple(others))


_NATS_MEMBERS, _NATS_PORTS_PER_MEMBER = 3, 3  # broker.nats.CLUSTER_SIZE, PORTS_PER_MEMBER


def _host_port(url: str, member: str) -> tuple[str, int]:
    parts = urlsplit(f"mqtt://{member}")
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {member!r} is not host:port") from exc
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r}: {member!r} has no host")
    return parts.hostname, port


@dataclass
class Assembled:
    config: NodeConfig
    bus: MqttBus
    logging: NodeLogging


def assemble(
    dep: Deployment,
    node_id: str,
    broker_url: str | None = None,
    console: TextIO | None = sys.stderr,
    console_level: str = "info",
    will: WillFactory | None = None,
    settings: Settings | None = None,
    manifest: Manifest | None = None,
) -> Assembled:
    config = node_config(dep, node_id, settings)
    logging = NodeLogging(
        node_id,
        dep.log_path(node_id),
        console=console,
        console_level=console_level,
        role=config.identity.role.value,
        device=config.identity.device or "",
    )
    bus = MqttBus(broker_address(dep, node_id, broker_url, manifest), node_id, will=will, log=logging.logger)
    ident = config.identity
    if ident.role in SERVER_ROLES:
        bus.stale_filters = server_filters(ident.role, config.settings, ident.keys.box_secret)[1]
    return Assembled(config, bus, logging)
