"""One identity, one process: a second node with an identity in use fails at start; state files never race."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.runtime import IdentityInUse, Node, ping
from nodes.store import write_atomic
from protocol.topics import Role

from .harness import make_node, provisioned, running

TM = "dev-0001.tm"


@pytest.fixture
def dep(tmp_path: Path):
    return provisioned(tmp_path)


async def test_a_second_node_with_an_identity_in_use_fails_at_start_and_the_first_carries_on(dep) -> None:
    broker = FakeBroker()
    first = make_node(Node, dep, TM, broker)
    second = make_node(Node, dep, TM, broker)
    ts = make_node(Node, dep, "trust-server", broker)
    async with running(first, ts):
        epoch = first.epoch
        with pytest.raises(IdentityInUse) as info:
            await second.run()
        assert f"{TM} is already running in process {os.getpid()}" in info.value.reason
        assert info.value.code == "identity_in_use"
        assert not second.connected.is_set()
        # the first is undisturbed: same epoch on disk, still answering
        assert (first.config.state_dir / "epoch").read_text() == str(epoch)
        pong = await ping(ts, Role.TRUST_MODULE, TM, device="dev-0001")
        assert pong.node == TM
    # once the first has stopped, the identity is free again
    third = make_node(Node, dep, TM, broker)
    async with running(third):
        assert third.epoch == epoch + 1


def test_concurrent_atomic_writes_of_one_file_never_collide(tmp_path: Path) -> None:
    """Main wrote through one fixed '.tmp' name: two writers renamed each other's file away."""
    path = tmp_path / "epoch"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait()
        try:
            for i in range(100):
                write_atomic(path, f"{n}-{i}".encode())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert path.read_text().endswith("-99")
    assert [p.name for p in tmp_path.iterdir()] == ["epoch"]  # no temporary file left behind
