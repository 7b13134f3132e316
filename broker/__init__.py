"""The MQTT broker under trustpay, as a managed child process.

Two backends with one interface: ``mosquitto`` (the real one: MQTT 5,
persistence, ``$share``) and ``amqtt`` (pure Python fallback; see
:mod:`broker.embedded` for what it lacks). Both listen on 127.0.0.1 only,
refuse anonymous clients and enforce :func:`protocol.topics.acl_for`.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import aiomqtt

from ._base import HOST, BrokerError
from .embedded import AmqttBroker
from .identities import BrokerIdentity, identities_for
from .mosquitto import MosquittoBroker

BACKENDS = ("mosquitto", "amqtt")

__all__ = [
    "BACKENDS",
    "HOST",
    "AmqttBroker",
    "Broker",
    "BrokerError",
    "BrokerIdentity",
    "MosquittoBroker",
    "default_backend",
    "free_port",
    "identities_for",
    "make_broker",
]


@runtime_checkable
class Broker(Protocol):
    """What the node runtime and the tests rely on, whatever the backend."""

    host: str
    port: int
    data_dir: Path

    @property
    def backend(self) -> str: ...  # "mosquitto" | "amqtt"

    @property
    def mqtt_version(self) -> str: ...  # "5" | "3.1.1": pick aiomqtt's ProtocolVersion by it

    @property
    def url(self) -> str: ...

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
    """A port free on 127.0.0.1 right now (the kernel picks it; racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def make_broker(
    backend: str,
    data_dir: Path,
    port: int | None,
    identities: Sequence[BrokerIdentity],
    health_identity: BrokerIdentity,
) -> Broker:
    """A stopped broker; ``port=None`` picks a free one. Start it, or use ``async with``."""
    chosen = free_port() if port is None else port
    if backend == "mosquitto":
        return MosquittoBroker(data_dir, chosen, identities, health_identity)
    if backend == "amqtt":
        return AmqttBroker(data_dir, chosen, identities, health_identity)
    raise BrokerError(f"unknown broker backend {backend!r}; choose one of {', '.join(BACKENDS)}")
