"""One identity, one process: a second node with an identity in use fails at start; state files never race."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.runtime import IdentityInUse, Node, _next_epoch, ping
from nodes.store import write_atomic
from protocol.replay import ReplayGuard
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
        assert third.epoch > epoch


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


def test_a_lost_or_restored_epoch_file_still_gives_a_newer_epoch(tmp_path: Path) -> None:
    """Receivers refuse an epoch older than one they saw: a node whose epoch file went back
    (restored from a backup, or lost) must not come back under an old epoch."""
    first = _next_epoch(tmp_path, now_s=1_000)
    second = _next_epoch(tmp_path, now_s=1_000)
    assert (first, second) == (1_000, 1_001)  # two starts in one second still differ
    (tmp_path / "epoch").write_text("3")  # an old backup
    assert _next_epoch(tmp_path, now_s=1_005) > second
    (tmp_path / "epoch").unlink()  # lost
    assert _next_epoch(tmp_path, now_s=1_006) > second
    guard = ReplayGuard(floor_ms=0)
    guard.check("ts", b"a" * 16, 1_000_000, second, 5, 1_000_000)
    guard.check("ts", b"b" * 16, 1_006_000, _next_epoch(tmp_path, now_s=1_007), 1, 1_006_000)
