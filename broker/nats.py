"""NATS Server (2.9) as the clustered broker: its MQTT 3.1.1 gateway over JetStream.

One :class:`NatsMember` is one ``nats-server`` process; :class:`NatsCluster` is
several of them joined by cluster routes on loopback, with the same
:class:`broker.Broker` interface as Mosquitto and amqtt. Everything a member
needs (config, logins, JetStream store, log) is written to its own data dir.

Why NATS and not RabbitMQ 3.10 (measured here; the README's cluster guide has
the figures): NATS keeps MQTT sessions, their unacknowledged QoS 1 messages and
the retained messages in JetStream streams replicated on every member, so a
node whose member dies resumes its clean_session=False session on another
member and a retained status or revocation list published on one member is
read on any other. RabbitMQ 3.10 keeps retained messages node-local (and sends
none for wildcard filters, which is how the launcher and the operator read
statuses), keeps a session's queue on the node it was made on, and takes ~9 s
to boot a member here against ~1 s.

Port layout of a member whose MQTT port is ``p``: ``p`` MQTT (every login, the
monitor's sessions too: NATS has one MQTT listener per member, so a cluster has
no separate monitor port), ``p + 1`` cluster routes, ``p + 2`` HTTP monitoring
(``/connz``: which client is connected where). The NATS protocol port is picked
by the kernel, and no login may use it (``allowed_connection_types``).

What NATS 2.9.10 does with our rules (seen here with aiomqtt):

* Topics map to subjects (``/`` -> ``.``, ``+`` -> ``*``, ``#`` -> ``>`` plus
  its parent), and each login gets publish and subscribe permissions from
  :func:`protocol.topics.acl_for`. A denied SUBSCRIBE gets a failure return
  code (0x80); a denied PUBLISH is acknowledged and dropped (as on Mosquitto).
* A QoS 1 subscriber is fed through a JetStream consumer whose delivery
  subject is ``$MQTT.sub.<random>``: every login needs subscribe permission on
  ``$MQTT.sub.>``. An MQTT client cannot subscribe to ``$MQTT/sub/#`` itself
  (refused), so this does not open other logins' deliveries.
* Client ids are not tied to logins: any login may connect with another's id
  and take its session over. Mosquitto forces the id to the username, amqtt
  (with ``amqtt_main``) refuses it; NATS has no such rule. A deployment on NATS
  trusts its logins not to do this (the frames are still signed end to end).
* Passwords are in the member's config in clear (owner-only file): the bcrypt
  form NATS also reads needs a bcrypt library this project does not depend on.
* ``$share`` subscriptions are accepted and deliver nothing (FIELD-NOTES).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import aiomqtt

from ._base import HOST, BrokerError, SubprocessBroker, check_port_free, tail
from .identities import PUBLIC_MODE, SECRET_MODE, BrokerIdentity, check_unique, write_file

CLUSTER_SIZE = 3  # members of a deployment's cluster: JetStream needs 3 to survive losing one
PORTS_PER_MEMBER = 3  # MQTT, cluster routes, HTTP monitoring (module docstring)
ROUTE_OFFSET, HTTP_OFFSET = 1, 2
CLUSTER_NAME = "trustpay"
QOS1_SUBJECTS = "$MQTT.sub.>"  # where JetStream delivers a QoS 1 subscription (module docstring)


def member_ports(port: int, size: int) -> tuple[int, ...]:
    """The MQTT port of each member of a cluster whose first member listens on ``port``."""
    return tuple(port + PORTS_PER_MEMBER * i for i in range(size))


def subjects(topic_filter: str) -> tuple[str, ...]:
    """The NATS subjects an MQTT topic filter covers (``a/#`` is ``a`` and ``a.>``)."""
    levels = topic_filter.split("/")
    if any(not level or "." in level or " " in level for level in levels):
        raise BrokerError(f"topic filter {topic_filter!r} has a level NATS cannot map")
    mapped = ["*" if level == "+" else level for level in levels]
    if mapped[-1] == "#":
        if "#" in mapped[:-1]:
            raise BrokerError(f"topic filter {topic_filter!r}: '#' only at the end")
        parent = ".".join(mapped[:-1])
        return (parent, f"{parent}.>") if parent else (">",)
    if "#" in mapped:
        raise BrokerError(f"topic filter {topic_filter!r}: '#' only at the end")
    return (".".join(mapped),)


def permissions(identity: BrokerIdentity) -> dict[str, dict[str, list[str]]]:
    """One login's NATS permissions: :func:`protocol.topics.acl_for` as subjects."""
    publish: list[str] = []
    subscribe: list[str] = [QOS1_SUBJECTS]
    for rule in identity.acl:
        target = publish if rule.access == "write" else subscribe
        target += [s for s in subjects(rule.pattern) if s not in target]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def auth_text(identities: Iterable[BrokerIdentity]) -> str:
    """The ``authorization`` block every member includes: each login, MQTT only, its permissions."""
    users = [
        {
            "user": ident.username,
            "password": ident.password,
            "permissions": permissions(ident),
            "allowed_connection_types": ["MQTT"],
        }
        for ident in check_unique(identities)
    ]
    # NATS reads JSON; its own config syntax would take an unquoted $word as a variable
    return (
        "# Generated from protocol.topics.acl_for by broker.nats.\n"
        + json.dumps({"authorization": {"users": users}}, indent=1)[1:-1].strip()
        + "\n"
    )


def write_nats_auth(directory: Path, identities: Iterable[BrokerIdentity]) -> Path:
    return write_file(directory / "nats-users.conf", auth_text(identities), SECRET_MODE)


class NatsMember(SubprocessBroker):
    """One ``nats-server``: alone (``routes`` empty) or a member of a cluster."""

    backend: ClassVar[str] = "nats"
    mqtt_version: ClassVar[str] = "3.1.1"

    def __init__(
        self,
        data_dir: Path,
        port: int,
        identities: Sequence[BrokerIdentity],
        health_identity: BrokerIdentity,
        *,
        name: str = "tp-0",
        routes: Sequence[int] = (),
        replicas: int = 1,
        executable: str | None = None,
        ack_wait_s: int = 5,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            data_dir,
            port,
            identities,
            health_identity,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
        )
        self.name = name
        self.routes = tuple(routes)
        self.replicas = replicas
        self.ack_wait_s = ack_wait_s
        self.executable = executable or shutil.which("nats-server") or "nats-server"

    @property
    def monitor_port(self) -> int:
        return self.port  # one MQTT listener per member (module docstring)

    @property
    def route_port(self) -> int:
        return self.port + ROUTE_OFFSET

    @property
    def http_port(self) -> int:
        return self.port + HTTP_OFFSET

    @property
    def config_file(self) -> Path:
        return self.data_dir / "nats.conf"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats.log"

    def config_text(self, users_file: Path) -> str:
        quote = json.dumps
        lines = [
            "# Generated by broker.nats; rewritten at every start.",
            f"server_name: {quote(self.name)}",
            f"host: {quote(HOST)}",
            "port: -1",  # the NATS protocol itself: a port of the kernel's, and no login may use it
            f"http: {quote(f'{HOST}:{self.http_port}')}",
            f"log_file: {quote(str(self.log_file))}",
            "logtime: true",
            # JetStream holds the MQTT sessions, unacknowledged QoS 1 messages and retained messages
            "jetstream {",
            f"  store_dir: {quote(str(self.data_dir / 'jetstream'))}",
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
            "mqtt {",
            f"  listen: {quote(f'{HOST}:{self.port}')}",
            # every member keeps a copy of the sessions and retained messages (up to 3)
            f"  stream_replicas: {self.replicas}",
            # a QoS 1 message a dead member delivered but nobody acknowledged comes again after this
            f'  ack_wait: "{self.ack_wait_s}s"',
            "}",
            f"include {quote(users_file.name)}",
        ]
        if self.routes:
            routes = ", ".join(quote(f"nats-route://{HOST}:{p}") for p in self.routes)
            lines += [
                "cluster {",
                f"  name: {quote(CLUSTER_NAME)}",
                f"  listen: {quote(f'{HOST}:{self.route_port}')}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> list[str]:
        for port in (self.route_port, self.http_port):
            check_port_free(port)
        users = write_nats_auth(self.data_dir, self.identities)
        write_file(self.config_file, self.config_text(users), PUBLIC_MODE)
        return [self.executable, "-c", str(self.config_file)]


class NatsCluster:
    """``size`` NATS members on loopback, one data dir each, with one broker's interface.

    Member ``i`` listens for MQTT on ``port + 3 i`` (:func:`member_ports`). ``url``
    names every member (``mqtt://127.0.0.1:P0,127.0.0.1:P1,...``): a node given it
    connects to one and fails over to the next (:mod:`nodes.bus`).
    """

    backend: ClassVar[str] = "nats"
    mqtt_version: ClassVar[str] = "3.1.1"
    host: str = HOST

    def __init__(
        self,
        data_dir: Path,
        port: int,
        identities: Sequence[BrokerIdentity],
        health_identity: BrokerIdentity,
        *,
        size: int = CLUSTER_SIZE,
        start_timeout: float = 30.0,
    ) -> None:
        if not 1 <= size <= 9:
            raise BrokerError(f"a cluster has 1 to 9 members, not {size}")
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        ports = member_ports(port, size)
        self.members = [
            NatsMember(
                self.data_dir / f"member-{i}",
                p,
                identities,
                health_identity,
                name=f"tp-{i}",
                routes=tuple(q + ROUTE_OFFSET for q in ports if q != p) if size > 1 else (),
                replicas=min(size, 3),
                start_timeout=start_timeout,
            )
            for i, p in enumerate(ports)
        ]
        self._wrap: Callable[[list[str]], list[str]] = list

    @property
    def wrap_argv(self) -> Callable[[list[str]], list[str]]:
        return self._wrap

    @wrap_argv.setter
    def wrap_argv(self, wrap: Callable[[list[str]], list[str]]) -> None:
        self._wrap = wrap
        for member in self.members:
            member.wrap_argv = wrap

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(m.url for m in self.members)

    @property
    def url(self) -> str:
        return "mqtt://" + ",".join(f"{m.host}:{m.port}" for m in self.members)

    @property
    def monitor_port(self) -> int:
        return self.port

    @property
    def is_running(self) -> bool:
        """Whether any member runs (the cluster serves while a majority does)."""
        return any(m.is_running for m in self.members)

    @property
    def pid(self) -> int | None:
        return next((m.pid for m in self.members if m.pid is not None), None)

    def log_tail(self, lines: int = 40) -> str:
        return tail([p for m in self.members for p in (m.stdio_file, m.log_file)], lines)

    def client(self, identity: BrokerIdentity, **kwargs: object) -> aiomqtt.Client:
        """A client of the first member (see :meth:`broker._base.SubprocessBroker.client`)."""
        return self.members[0].client(identity, **kwargs)

    def member_client(self, index: int, identity: BrokerIdentity, **kwargs: object) -> aiomqtt.Client:
        return self.members[index].client(identity, **kwargs)

    async def placement(self) -> dict[str, int]:
        """Which member each MQTT client id is connected to now (each live member's ``/connz``)."""
        found: dict[str, int] = {}
        for index, member in enumerate(self.members):
            if member.is_running:
                for client_id in await asyncio.to_thread(_mqtt_clients, member.http_port):
                    found[client_id] = index
        return found

    async def start(self) -> None:
        """Start every member at once: JetStream needs a majority before any is healthy."""
        try:
            async with asyncio.TaskGroup() as tg:
                for member in self.members:
                    tg.create_task(member.start(), name=f"start {member.name}")
        except BaseException as exc:
            await self.kill()
            errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
            first = next((e for e in errors if isinstance(e, BrokerError)), None)
            if first is not None:
                raise BrokerError(f"NATS cluster on port {self.port} did not start: {first}") from exc
            raise

    async def start_member(self, index: int) -> None:
        """Start one member again (after :meth:`kill_member`): it rejoins and catches up."""
        await self.members[index].start()

    async def kill_member(self, index: int) -> None:
        """SIGKILL one member, as a crash."""
        await self.members[index].kill()

    async def stop(self) -> None:
        """SIGTERM every member at once (one by one, the last would wait for a quorum)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for member in self.members:
                    tg.create_task(member.stop(), name=f"stop {member.name}")
        finally:
            await self.kill()

    async def kill(self) -> None:
        for member in self.members:
            await member.kill()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            await self.kill()


def _mqtt_clients(http_port: int) -> list[str]:
    """The client ids of the MQTT connections a member lists on its monitoring port."""
    url = f"http://{HOST}:{http_port}/connz?limit=100000"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # our own member, on loopback
            data = json.load(response)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot read {url}: {exc}") from exc
    return [str(c["mqtt_client"]) for c in data.get("connections", ()) if c.get("mqtt_client")]
