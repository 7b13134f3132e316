"""The MQTT broker under trustpay, as a managed child process.

Three backends with one interface: ``mosquitto`` (the real one: MQTT 5,
persistence, ``$share``), ``amqtt`` (pure Python fallback; see
:mod:`broker.embedded` for what it lacks) and ``nats`` (a cluster of NATS
servers through their MQTT 3.1.1 gateway, for more than one machine; see
:mod:`broker.nats`). Both listen on 127.0.0.1 only,
refuse anonymous clients and enforce :func:`protocol.topics.acl_for`.
"""

from __future__ import annotations

import secrets
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import aiomqtt

from ._base import HOST, BrokerError, ClientTls, ServerTls
from .embedded import AmqttBroker
from .identities import BrokerIdentity, identities_for
from .mosquitto import MosquittoBroker
from .nats import CLUSTER_SIZE, PORTS_PER_MEMBER, NatsCluster, NatsMember

BACKENDS = ("mosquitto", "amqtt", "nats")
# provisioned for (its logins and permissions, broker.rabbitmq) but not started by trustpay
PROVISION_ONLY = ("rabbitmq",)

__all__ = [
    "BACKENDS",
    "CLUSTER_SIZE",
    "HOST",
    "PORTS_PER_MEMBER",
    "PROVISION_ONLY",
    "AmqttBroker",
    "Broker",
    "BrokerError",
    "BrokerIdentity",
    "ClientTls",
    "MosquittoBroker",
    "NatsCluster",
    "NatsMember",
    "ServerTls",
    "default_backend",
    "free_port",
    "free_ports",
    "identities_for",
    "make_broker",
]


@runtime_checkable
class Broker(Protocol):
    """What the node runtime and the tests rely on, whatever the backend."""

    host: str
    port: int
    data_dir: Path
    wrap_argv: Callable[[list[str]], list[str]]  # applied to the argv at start()

    @property
    def backend(self) -> str: ...  # "mosquitto" | "amqtt" | "nats"

    @property
    def mqtt_version(self) -> str: ...  # "5" | "3.1.1": pick aiomqtt's ProtocolVersion by it

    @property
    def url(self) -> str: ...

    @property
    def monitor_port(self) -> int: ...

    @property
    def is_running(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def log_tail(self, lines: int = ...) -> str: ...

    def client(self, identity: BrokerIdentity, **kwargs: object) -> aiomqtt.Client: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def kill(self) -> None: ...

    async def restart(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def default_backend() -> str:
    return "mosquitto" if shutil.which("mosquitto") else "amqtt"


def free_port() -> int:
    """A port free on 127.0.0.1 right now, below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the same range as the
    local ports of outgoing connections, so by the time a broker starts, one of
    our own MQTT clients may hold it. Ports are drawn at random below that range.
    A broker listens on this port and the next (the monitor's listener): both are free.
    """
    return free_ports(2)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 now (see :func:`free_port`)."""
    low = _ephemeral_floor()
    for _ in range(200):  # bounded; each try is up to ``count`` binds
        port = secrets.randbelow(low - _LOWEST - count) + _LOWEST
        if all(_bindable(p) for p in range(port, port + count)):
            return port
    raise BrokerError(f"no {count} free ports found on {HOST} between {_LOWEST} and {low}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _ephemeral_floor() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return max(low, _LOWEST + 1000)


_LOWEST = 20000


def make_broker(
    backend: str,
    data_dir: Path,
    port: int | None,
    identities: Sequence[BrokerIdentity],
    health_identity: BrokerIdentity,
    *,
    tls: ServerTls | None = None,
    client_tls: ClientTls | None = None,
) -> Broker:
    """A stopped broker; ``port=None`` picks a free one. Start it, or use ``async with``.

    ``tls`` (Mosquitto only): mqtts with a client certificate required on every listener.
    ``nats``: a cluster of ``CLUSTER_SIZE`` members whose first listens on ``port``.
    """
    if backend == "nats":
        if tls is not None:
            raise BrokerError("the NATS cluster runs without TLS here: use mosquitto for mqtts")
        first = free_ports(CLUSTER_SIZE * PORTS_PER_MEMBER) if port is None else port
        return NatsCluster(data_dir, first, identities, health_identity)
    chosen = free_port() if port is None else port
    if backend == "mosquitto":
        return MosquittoBroker(data_dir, chosen, identities, health_identity, tls=tls, client_tls=client_tls)
    if backend == "amqtt":
        if tls is not None:
            raise BrokerError("the embedded amqtt broker runs without TLS here: use mosquitto for mqtts")
        return AmqttBroker(data_dir, chosen, identities, health_identity)
    if backend in PROVISION_ONLY:
        raise BrokerError(
            f"trustpay does not start {backend}: load the deployment's broker/rabbitmq-definitions.json "
            "into it (rabbitmqctl import_definitions), enable its MQTT plugin, "
            "then give its URL: trustpay up --broker mqtt://127.0.0.1:PORT"
        )
    raise BrokerError(f"unknown broker backend {backend!r}; choose one of {', '.join(BACKENDS)}")
