"""The launcher and ``trustpay up``: a whole deployment as real processes on a real broker.

Nothing here sleeps to synchronise: every wait is on a signed status, a process
exit or an output line, under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from nodes.deployment import Deployment
from ops.broker_cmd import broker_for
from ops.launcher import Launcher, LaunchError
from ops.provision import provision
from protocol.envelope import Envelope, new_id, sign_frame
from protocol.errors import ConfigError
from protocol.keys import KeyPair
from protocol.messages import Status
from protocol.topics import CHANNEL_STATUS, Role, channel_topic

pytestmark = pytest.mark.e2e

HAVE_MOSQUITTO = shutil.which("mosquitto") is not None
needs_mosquitto = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed"),
]
NODES = {"trust-server", "payment-server", "dev-0001.chip", "dev-0001.tm"}
UP_S = 60.0
PID = re.compile(r"\(pid (\d+)")


def deploy(tmp_path: Path, backend: str) -> Deployment:
    provision(tmp_path / "d", 1, backend=backend)
    return Deployment(tmp_path / "d")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def status_frame(dep: Deployment, keys: KeyPair, state: str, at_ms: int) -> tuple[str, bytes]:
    """A status of the trust server signed with ``keys`` (its own, or a forger's)."""
    topic = channel_topic(Role.TRUST_SERVER, CHANNEL_STATUS)
    chain = (dep.load_cert("trust-server").to_bytes(), dep.load_public("platform").to_bytes())
    env = Envelope(
        "status", new_id(), "trust-server", "*", b"", b"", at_ms, 1, 1, chain,
        Status("trust-server", "trust-server", state, at_ms, "0.1.0", at_ms, False),
    )  # fmt: skip
    return topic, sign_frame(env, topic, keys)


async def test_amqtt_all_up_sigkill_detected_restart_and_clean_exit(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    pids: set[int] = set()
    async with Launcher(dep, up_timeout_s=UP_S) as up:
        assert up.broker is not None and up.broker.backend == "amqtt"
        broker_pid = up.broker.pid
        assert broker_pid is not None
        took = await up.wait_all_up()
        assert set(up.processes) == NODES and 0 < took < UP_S
        assert all(p.is_up and p.pid is not None and not gone(p.pid) for p in up.processes.values())
        pids |= {p.pid for p in up.processes.values() if p.pid}

        # a crash nobody asked for is detected and reported with its log tail
        victim = up.processes["payment-server"]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        died = await up.wait_exit("payment-server")
        assert died.returncode == -signal.SIGKILL and not died.deliberate
        assert up.unexpected_exits == [died]
        assert "killed by SIGKILL" in died.describe() and "payment-server.log" in died.tail
        async with asyncio.timeout(5):
            assert (await up.wait_failure()).startswith("payment-server")
        with pytest.raises(LaunchError, match="payment-server"):
            await up.wait_all_up(timeout_s=5)

        # restart() brings it back: a new process whose own signed "online" arrived
        again = await up.restart("payment-server")
        assert again.is_up and again.incarnation == 2 and again.pid not in pids
        assert again.pid is not None
        pids.add(again.pid)
        await up.wait_all_up(timeout_s=5)
    assert all(gone(pid) for pid in pids)
    assert gone(broker_pid) and not up.broker.is_running
    assert all(p.exit is not None and p.exit.deliberate for p in up.processes.values())


@pytest.mark.parametrize("backend", [pytest.param("mosquitto", marks=needs_mosquitto)])
async def test_mosquitto_kill_restart_and_status_verification(tmp_path: Path, backend: str) -> None:
    dep = deploy(tmp_path, backend)
    pids: set[int] = set()
    async with Launcher(dep, devices=1, up_timeout_s=UP_S) as up:
        assert up.broker is not None and up.broker.mqtt_version == "5"
        await up.wait_all_up()
        pids |= {p.pid for p in up.processes.values() if p.pid}

        # a deliberate kill is reported too, but is not a failure
        killed = await up.kill("dev-0001.tm", signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL and killed.deliberate
        assert up.unexpected_exits == []
        back = await up.restart("dev-0001.tm")
        assert back.pid is not None and back.is_up
        pids.add(back.pid)

        # restarting a running node stops it (SIGTERM: a clean exit), then starts it again
        old = up.processes["trust-server"]
        new = await up.restart("trust-server")
        assert old.exit is not None and old.exit.returncode == 0 and old.exit.deliberate
        assert new.pid is not None and new.pid != old.pid and new.is_up
        pids.add(new.pid)

        # status frames are verified: junk and forgeries are counted, never believed;
        # a genuine status from before the process started is stale
        topic, forged = status_frame(dep, KeyPair.generate(), "online", new.started_ms + 1)
        up._on_status(topic, b"junk")
        up._on_status(topic, forged)
        topic, old_news = status_frame(dep, dep.load_keys("trust-server"), "online", new.started_ms - 1)
        up._on_status(topic, old_news)
        assert sum(up.rejected.values()) == 2 and up.stale >= 1
        assert up.unexpected_exits == []
    assert all(gone(pid) for pid in pids)


async def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    with pytest.raises(ConfigError, match="this deployment has 1 devices"):
        async with Launcher(dep, devices=2):
            pass
    with pytest.raises(ConfigError, match="--backend"):
        Launcher(dep, broker_url="mqtt://127.0.0.1:1", backend="amqtt")


async def test_an_error_or_a_cancellation_in_the_block_still_stops_everything(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    pids: set[int] = set()
    with pytest.raises(RuntimeError, match="the caller failed"):  # as it was raised, not in a group
        async with Launcher(dep) as up:
            await up.wait_all_up()
            pids |= {p.pid for p in up.processes.values() if p.pid}
            assert up.broker is not None and up.broker.pid is not None
            pids.add(up.broker.pid)
            raise RuntimeError("the caller failed")
    assert len(pids) == 5 and all(gone(pid) for pid in pids)

    pids.clear()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline, Launcher(dep) as up:
            await up.wait_all_up()
            pids |= {p.pid for p in up.processes.values() if p.pid}
            deadline.reschedule(asyncio.get_running_loop().time())  # cancels the block right now
            await asyncio.Event().wait()
    assert len(pids) == 4 and all(gone(pid) for pid in pids)
    assert up.broker is not None and not up.broker.is_running


async def test_an_already_running_broker_is_used_and_left_running(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    broker = broker_for(dep)
    async with broker:
        # no ?v= in the URL: the monitor and the nodes find out that amqtt speaks only 3.1.1
        async with Launcher(dep, broker_url=broker.url) as up:
            assert up.broker is None
            await up.wait_all_up()
            pids = {p.pid for p in up.processes.values() if p.pid}
        assert len(pids) == 4 and all(gone(pid) for pid in pids)
        assert broker.is_running


async def run_up(dep: Deployment, *extra: str, new_session: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "up", "--deploy", str(dep.root), *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=new_session,
    )  # fmt: skip


async def lines_until(proc: asyncio.subprocess.Process, marker: str, wait: float = UP_S) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(wait):
        while line := (await proc.stdout.readline()).decode():  # ends at EOF: `up` exited
            seen.append(line)
            if marker in line:
                return seen
    raise AssertionError(f"`up` ended before {marker!r}: {seen}")


async def finish(proc: asyncio.subprocess.Process, wait: float = 30.0) -> tuple[int, str, str]:
    async with asyncio.timeout(wait):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def printed_pids(lines: list[str]) -> set[int]:
    return {int(m.group(1)) for line in lines if (m := PID.search(line))}


@pytest.fixture
def up_backend() -> str:
    return "mosquitto" if HAVE_MOSQUITTO else "amqtt"


async def test_up_command_sigterm_exits_0_and_leaves_nothing(tmp_path: Path, up_backend: str) -> None:
    dep = deploy(tmp_path, up_backend)
    proc = await run_up(dep)
    try:
        seen = await lines_until(proc, "all 4 nodes up")
        pids = printed_pids(seen)
        assert len(pids) == 5  # the broker and the four nodes
        assert all(f"up    {nid}" in "".join(seen) for nid in NODES)
        proc.send_signal(signal.SIGTERM)
        code, out, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, err
    assert "stopped 4 nodes and the broker" in out
    assert all(gone(pid) for pid in pids)


async def test_up_command_terminal_ctrl_c_reaches_everyone_and_leaves_nothing(
    tmp_path: Path, up_backend: str
) -> None:
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group (broker and nodes too)."""
    dep = deploy(tmp_path, up_backend)
    proc = await run_up(dep, new_session=True)  # its own group, standing in for the terminal's
    try:
        seen = await lines_until(proc, "all 4 nodes up")
        os.killpg(proc.pid, signal.SIGINT)
        code, _, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, err
    assert all(gone(pid) for pid in printed_pids(seen))


async def test_up_restart_never_reports_a_dead_node_and_stops_everything(
    tmp_path: Path, up_backend: str
) -> None:
    """What ``up`` did before it supervised; without ``--restart never`` the node is started again."""
    dep = deploy(tmp_path, up_backend)
    proc = await run_up(dep, "--restart", "never")
    try:
        seen = await lines_until(proc, "all 4 nodes up")
        ps = next(line for line in seen if "payment-server" in line)
        os.kill(int(PID.search(ps).group(1)), signal.SIGKILL)  # type: ignore[union-attr]
        code, _, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 1
    assert "DIED  payment-server" in err and "killed by SIGKILL" in err and "payment-server.log" in err
    assert "trustpay up: payment-server" in err and "stopping everything" in err
    assert "restart payment-server in" not in err
    assert all(gone(pid) for pid in printed_pids(seen))


async def test_up_command_names_a_node_that_never_comes_up(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    dep.node_key_path("dev-0001.chip").chmod(0o644)  # the node refuses a key others can read
    proc = await run_up(dep)
    code, out, err = await finish(proc, UP_S)
    assert code == 1
    assert "not up: dev-0001.chip, dev-0001.tm" in err
    assert "dev-0001.tm: never started" in err and "readable by others" in err
    assert all(gone(pid) for pid in printed_pids(out.splitlines()))
