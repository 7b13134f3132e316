"""Start, stop, kill and restart a real broker; persistence across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import sys
from pathlib import Path

import aiomqtt
import pytest

from broker import (
    AmqttBroker,
    Broker,
    BrokerError,
    MosquittoBroker,
    default_backend,
    free_port,
    make_broker,
)
from protocol.topics import Role, link_topic

from .broker_harness import (
    BACKENDS,
    HAVE_MOSQUITTO,
    WAIT_S,
    Cast,
    granted,
    next_message,
    persistent_client,
    refused,
    running_broker,
    until_marker,
)

DOWN = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "dev-a")


def listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp{,6}."""
    found = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(addr)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def cast() -> Cast:
    return Cast()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_listens_on_loopback_only_and_exposes_its_address(
    backend: str, tmp_path: Path, cast: Cast
) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        assert broker.backend == backend
        assert broker.host == "127.0.0.1"
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert broker.mqtt_version == ("5" if backend == "mosquitto" else "3.1.1")
        assert listening_addresses(broker.port) == ["0100007F"]  # 127.0.0.1, IPv4 only


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stop_kill_and_restart_leave_no_process(backend: str, tmp_path: Path, cast: Cast) -> None:
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        first = broker.pid
        assert first is not None and broker.is_running
        await broker.stop()
        assert not broker.is_running and broker.pid is None
        assert not pid_alive(first)
        await broker.stop()  # idempotent

        await broker.start()
        second = broker.pid
        assert second is not None
        await broker.kill()
        assert not broker.is_running and not pid_alive(second)

        port = broker.port
        await broker.start()  # same port right after SIGKILL
        third = broker.pid
        await broker.restart()
        assert broker.port == port and broker.is_running and broker.pid != third
        assert third is not None and not pid_alive(third)
        assert not await refused(broker, cast["dev-a.tm"])
        last = broker.pid
    assert last is not None and not pid_alive(last)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_async_with_starts_and_stops(backend: str, tmp_path: Path, cast: Cast) -> None:
    broker = make_broker(backend, tmp_path / "b", None, cast.all, cast.monitor)
    async with broker as running:
        assert running is broker and broker.is_running
        pid = broker.pid
    assert not broker.is_running
    assert pid is not None and not pid_alive(pid)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_offline_session_gets_queued_messages(backend: str, tmp_path: Path, cast: Cast) -> None:
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        async with persistent_client(broker, cast["dev-a.tm"]) as tm:
            assert granted(await tm.subscribe(DOWN, qos=1))
        async with broker.client(cast["trust-server"]) as ts:
            await ts.publish(DOWN, b"while-away", qos=1)
        async with persistent_client(broker, cast["dev-a.tm"]) as tm:
            msg = await next_message(tm)
    assert (msg.topic.value, msg.payload, msg.qos) == (DOWN, b"while-away", 1)
    if backend == "mosquitto":
        # amqtt may flag a queued message as retained (documented in broker.embedded)
        assert not msg.retain


@pytest.mark.parametrize("backend", BACKENDS)
async def test_queued_message_across_restart(backend: str, tmp_path: Path, cast: Cast) -> None:
    """(f) Mosquitto keeps a persistent session's QoS 1 backlog over a restart; amqtt loses it."""
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        async with persistent_client(broker, cast["dev-a.tm"]) as tm:
            assert granted(await tm.subscribe(DOWN, qos=1))
        async with broker.client(cast["trust-server"]) as ts:
            await ts.publish(DOWN, b"before-restart", qos=1)

        await broker.restart()

        async with persistent_client(broker, cast["dev-a.tm"]) as tm:
            if backend == "mosquitto":
                msg = await next_message(tm)
                assert (msg.topic.value, msg.payload) == (DOWN, b"before-restart")
            else:
                # The session is gone: subscribe again, then a marker proves that
                # nothing from before the restart was waiting for us.
                assert granted(await tm.subscribe(DOWN, qos=1))
                async with broker.client(cast["trust-server"]) as ts:
                    await ts.publish(DOWN, b"marker", qos=1)
                got = await until_marker(tm, b"marker")
                assert [m.payload for m in got] == [b"marker"]


async def test_amqtt_speaks_mqtt_311_only(tmp_path: Path, cast: Cast) -> None:
    async with running_broker("amqtt", tmp_path / "b", cast) as broker:
        # amqtt drops an MQTT 5 CONNECT without a CONNACK: the client only times out
        with pytest.raises((aiomqtt.MqttError, TimeoutError)):
            async with asyncio.timeout(1):
                async with broker.client(cast.monitor, protocol=aiomqtt.ProtocolVersion.V5):
                    pass
        assert not await refused(broker, cast.monitor)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_port_in_use_is_a_clear_error(backend: str, tmp_path: Path, cast: Cast) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = make_broker(backend, tmp_path / "b", port, cast.all, cast.monitor)
        with pytest.raises(BrokerError, match="already in use"):
            await broker.start()
        assert not broker.is_running


@pytest.mark.parametrize("backend", BACKENDS)
async def test_failed_start_reports_the_log_and_leaves_nothing(
    backend: str, tmp_path: Path, cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(backend, tmp_path / "b", None, cast.all, cast.monitor)
    prepare = broker._prepare  # type: ignore[attr-defined]

    def broken() -> list[str]:
        argv: list[str] = prepare()
        cfg = broker.config_file  # type: ignore[attr-defined]
        if backend == "mosquitto":
            cfg.write_text(cfg.read_text() + "no_such_option_xyz 1\n")
        else:
            cfg.write_text(cfg.read_text().replace('"plugins"', '"no_such_option_xyz"', 1))
        return argv

    monkeypatch.setattr(broker, "_prepare", broken)
    with pytest.raises(BrokerError, match="exited with status") as info:
        await broker.start()
    assert "no_such_option_xyz" in str(info.value)
    assert not broker.is_running


@pytest.mark.parametrize("backend", BACKENDS)
async def test_secret_files_are_owner_only(backend: str, tmp_path: Path, cast: Cast) -> None:
    async with running_broker(backend, tmp_path / "b", cast) as broker:
        data = broker.data_dir
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        secrets = list(data.glob("*.passwd"))
        assert secrets
        for path in [*secrets, *data.glob("*.acl")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for ident in cast.all:  # hashed, never the plaintext
            assert all(ident.password not in p.read_text() for p in secrets)


async def test_amqtt_broker_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """The amqtt child watches its parent, so a crashed test run leaves no broker."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from broker import AmqttBroker, free_port, identities_for\n"
        "async def main():\n"
        "    ids = identities_for(['dev-a'])\n"
        "    mon = next(i for i in ids if i.username == 'monitor')\n"
        "    b = AmqttBroker(Path(sys.argv[1]), free_port(), ids, mon)\n"
        "    await b.start()\n"
        "    print(b.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path / "b"), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(WAIT_S * 2):
            line = await parent.stdout.readline()  # type: ignore[union-attr]
        child = int(line)
        pidfd = os.pidfd_open(child)
    finally:
        parent.kill()
        await parent.wait()
    # pidfd becomes readable when the child exits, reaped or not: no polling here
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(WAIT_S):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_amqtt_stops_cleanly_while_its_clients_publish(tmp_path: Path, cast: Cast) -> None:
    """Packets arriving as amqtt cancels their sender's reader must not stall its shutdown.

    Both directions flood QoS 1 publishes while the broker is told to stop. Without the
    re-cancelling reader stop in broker.amqtt_main, every run of this (6 of 6) waited out
    the stop timeout and was SIGKILLed: "Broker closed" was never logged.
    """
    broker = AmqttBroker(tmp_path / "b", free_port(), cast.all, cast.monitor, stop_timeout=WAIT_S * 2)
    up = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "dev-a")
    flowing = {DOWN: asyncio.Event(), up: asyncio.Event()}

    async def flood(client: aiomqtt.Client, topic: str) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            for sent in range(1, 1_000_000):  # ends when the broker goes (or after a million)
                await client.publish(topic, b"x" * 50, qos=1)
                if sent == 100:
                    flowing[topic].set()

    async def drain(client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for _ in client.messages:
                pass

    await broker.start()
    try:
        async with broker.client(cast["dev-a.tm"]) as tm, broker.client(cast["trust-server"]) as ts:
            assert granted(await tm.subscribe(DOWN, qos=1)) and granted(await ts.subscribe(up, qos=1))
            tasks = [
                asyncio.create_task(work) for work in (flood(tm, up), flood(ts, DOWN), drain(tm), drain(ts))
            ]
            async with asyncio.timeout(WAIT_S):
                for going in flowing.values():
                    await going.wait()
            async with asyncio.timeout(WAIT_S):  # well under the stop timeout
                await broker.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await broker.kill()
    assert "Broker closed" in broker.log_file.read_text()


def test_make_broker_and_defaults(tmp_path: Path, cast: Cast) -> None:
    assert default_backend() == ("mosquitto" if HAVE_MOSQUITTO else "amqtt")
    port = free_port()
    assert 0 < port < 65536
    mq = make_broker("mosquitto", tmp_path, port, cast.all, cast.monitor)
    am = make_broker("amqtt", tmp_path, None, cast.all, cast.monitor)
    assert isinstance(mq, MosquittoBroker) and mq.port == port
    assert isinstance(am, AmqttBroker) and am.port > 0
    assert isinstance(mq, Broker) and isinstance(am, Broker)
    assert not mq.is_running and not am.is_running
    with pytest.raises(BrokerError, match="unknown broker backend"):
        make_broker("hivemq", tmp_path, None, cast.all, cast.monitor)
