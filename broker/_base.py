"""Lifecycle shared by both backends: one broker = one child process.

Both brokers run out of process so a test can stop, SIGKILL and restart them
exactly like a deployed broker, and so a broker bug cannot stall the caller's
event loop.

Cleanup: ``stop()``/``kill()`` reap the child; pids not yet reaped are
SIGKILLed at interpreter exit. If the parent is SIGKILLed, an amqtt child
notices and exits by itself; a Mosquitto child keeps running unless ``wrap_argv``
puts it behind a parent-death guard (``trustpay up`` does). Start and stop
a broker from the same event loop (asyncio ties the child to it).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import secrets
import signal
import socket
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from protocol.errors import TrustpayError
from protocol.topics import CLIENT_ID_SEPARATOR, MONITOR_PORT_OFFSET, Role

from .identities import BrokerIdentity, check_unique

HOST = "127.0.0.1"
_POLL_S = 0.05
_LOG_TAIL_LINES = 40

# pids of brokers we started and have not reaped; killed at interpreter exit
# so that a test run that dies between start() and stop() leaves no broker.
_LIVE: set[int] = set()
_atexit_registered = False


@dataclass(frozen=True)
class ServerTls:
    """The broker's TLS files (PEM): it requires a client certificate signed by ``ca_file``."""

    ca_file: Path
    cert_file: Path
    key_file: Path


ClientTls = Callable[[BrokerIdentity], ssl.SSLContext]  # a login's client certificate, as a context


class BrokerError(TrustpayError):
    """A broker could not be started, or failed while it ran."""

    code = "broker"


def _kill_leftovers() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _LIVE.clear()


def _track(pid: int) -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_kill_leftovers)
        _atexit_registered = True
    _LIVE.add(pid)


def check_ports_free(*ports: int) -> None:
    for port in ports:
        check_port_free(port)


def check_port_free(port: int) -> None:
    """Fail early and clearly if something already listens on our port.

    Without this the health probe could succeed against *another* broker
    (e.g. a system Mosquitto) while ours dies on "address in use".
    SO_REUSEADDR matches what the brokers set, so TIME_WAIT does not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerError(f"port {HOST}:{port} is already in use") from None
            raise


def tail(paths: Sequence[Path], lines: int = _LOG_TAIL_LINES) -> str:
    out = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        last = text.splitlines()[-lines:]
        out.append(f"--- last {len(last)} lines of {path} ---\n" + "\n".join(last))
    return "\n".join(out) or "(no broker output)"


class SubprocessBroker(ABC):
    """A broker bound to 127.0.0.1:``port`` whose files all live in ``data_dir``."""

    backend: ClassVar[str]
    mqtt_version: ClassVar[str]
    host: str = HOST

    def __init__(
        self,
        data_dir: Path,
        port: int,
        identities: Sequence[BrokerIdentity],
        health_identity: BrokerIdentity,
        *,
        start_timeout: float = 15.0,
        stop_timeout: float = 10.0,
        tls: ServerTls | None = None,
        client_tls: ClientTls | None = None,
    ) -> None:
        if not 0 < port < 65535:  # and port + 1 for the monitor's listener
            raise BrokerError(f"port {port} out of range")
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.health_identity = health_identity
        self.identities = _with_health(identities, health_identity)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        if tls is not None and client_tls is None:
            raise BrokerError("a TLS broker needs the clients' certificates for its own health probe")
        self.tls = tls
        self.client_tls = client_tls
        # the argv as started: a launcher may wrap it (ops.parent_death.guarded)
        self.wrap_argv: Callable[[list[str]], list[str]] = list
        self._proc: asyncio.subprocess.Process | None = None
        self._stdio: IO[bytes] | None = None

    # -- what a backend provides -------------------------------------------

    @abstractmethod
    def _prepare(self) -> list[str]:
        """Write config and auth files into data_dir; return the argv to run."""

    @property
    @abstractmethod
    def log_file(self) -> Path:
        """The broker's own log file."""

    def _child_env(self) -> dict[str, str] | None:
        return None

    # -- public state --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def monitor_port(self) -> int:
        """The second listener, for the monitor login's sessions only (see protocol.topics)."""
        return self.port + MONITOR_PORT_OFFSET

    def port_for(self, identity: BrokerIdentity) -> int:
        return self.monitor_port if identity.role is Role.MONITOR else self.port

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc else None

    @property
    def stdio_file(self) -> Path:
        """stdout+stderr of the process: startup errors land here, not in the log."""
        return self.data_dir / f"{self.backend}.stdio"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return tail([self.stdio_file, self.log_file], lines)

    def client(self, identity: BrokerIdentity, **kwargs: object) -> aiomqtt.Client:
        """An aiomqtt client for ``identity`` with this broker's protocol version.

        Its client id is the login's own (the username; for the monitor, a fresh
        ``monitor:...``) unless ``identifier`` is given.
        """
        proto = (
            aiomqtt.ProtocolVersion.V5 if self.mqtt_version == "5" else aiomqtt.ProtocolVersion.V311
        )
        own_id = identity.username
        if identity.role is Role.MONITOR:
            own_id += f"{CLIENT_ID_SEPARATOR}{secrets.token_hex(6)}"
        opts: dict[str, object] = {
            "hostname": self.host,
            "port": self.port_for(identity),
            "identifier": own_id,
            "username": identity.username,
            "password": identity.password,
            "protocol": proto,
            # paho leaves Nagle on: 40+ ms per QoS 1 round trip (FIELD-NOTES).
            "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        }
        if self.client_tls is not None:
            opts["tls_context"] = self.client_tls(identity)
        opts.update(kwargs)
        return aiomqtt.Client(**opts)  # type: ignore[arg-type]

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self.is_running:
            raise BrokerError(f"{self.backend} broker on port {self.port} is already running")
        if self._proc is not None:  # it died on its own: drop what is left of it
            self._forget(self._proc)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = self.wrap_argv(self._prepare())
        check_ports_free(self.port, self.monitor_port)
        self._stdio = self.stdio_file.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._stdio,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._child_env(),
            )
        except BaseException:
            self._close_stdio()
            raise
        _track(self._proc.pid)
        try:
            await self._wait_healthy()
        except BaseException:
            await self.kill()
            raise

    async def stop(self) -> None:
        """SIGTERM (the broker saves its state), then SIGKILL after ``stop_timeout``."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(self.stop_timeout):
                        await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        except BaseException:
            # cancelled mid-stop: never leave the process behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        finally:
            self._forget(proc)

    async def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved beyond the last autosave."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        finally:
            self._forget(proc)

    async def restart(self) -> None:
        """Graceful stop, then start on the same port with the same data dir."""
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
        await self.stop()

    # -- internals -------------------------------------------------------------

    def _forget(self, proc: asyncio.subprocess.Process) -> None:
        _LIVE.discard(proc.pid)
        if self._proc is proc:
            self._proc = None
        self._close_stdio()

    def _close_stdio(self) -> None:
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None

    async def _wait_healthy(self) -> None:
        """Poll with a real, authenticated MQTT CONNECT until it succeeds."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        last: BaseException | None = None
        try:
            while True:
                if exited.done():
                    raise BrokerError(
                        f"{self.backend} exited with status {self._proc.returncode} while "
                        f"starting on port {self.port}\n{self.log_tail()}"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BrokerError(
                        f"{self.backend} on port {self.port} not healthy after "
                        f"{self.start_timeout:.0f} s (last error: {last!r})\n{self.log_tail()}"
                    )
                try:
                    async with asyncio.timeout(min(remaining, 5.0)):
                        await self._probe()
                    return
                except MqttConnectError as exc:
                    # The broker is up and answered: a refusal will not go away.
                    raise BrokerError(
                        f"{self.backend} refused the health identity "
                        f"{self.health_identity.username!r}: {exc}\n{self.log_tail()}"
                    ) from exc
                except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                    last = exc
                # not a sleep for ordering: a poll interval that ends early if the child dies
                await asyncio.wait([exited], timeout=_POLL_S)
        finally:
            if not exited.done():
                exited.cancel()

    async def _probe(self) -> None:
        async with self.client(self.health_identity):
            pass


def _with_health(
    identities: Sequence[BrokerIdentity], health: BrokerIdentity
) -> tuple[BrokerIdentity, ...]:
    """The identities, plus the health identity unless it is already among them."""
    for ident in identities:
        if ident.username == health.username:
            if ident != health:
                raise BrokerError(
                    f"health identity {health.username!r} differs from the listed one"
                )
            return check_unique(identities)
    return check_unique([*identities, health])
