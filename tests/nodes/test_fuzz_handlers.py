"""Every node's handlers under fuzzed frames from each link's legitimate sender (ops.chaos.fuzz_nodes).

The generalisation of test_hostile_input.py: valid bodies, malformed bodies and
headers signed with the sender's own key (so they reach the handlers), and frames
altered after signing, signed with a wrong key, or random. No node crashes; an
accepted request is answered (its response or a typed refusal); a refused frame
is counted; nothing forged is accepted; and an honest payment goes through after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.chip import Chip
from nodes.runtime import Node
from ops.chaos.fuzz_nodes import NodeCase, NodeWorld
from ops.chaos.fuzzing import run_target
from protocol.messages import Empty
from protocol.topics import Role

CI_EXAMPLES = 200


@pytest.fixture
def world(tmp_path: Path) -> Iterator[NodeWorld]:
    world = NodeWorld(tmp_path)
    try:
        yield world
    finally:
        world.close()


def test_fuzzed_frames_on_every_link_crash_nothing_and_an_honest_payment_follows(world: NodeWorld) -> None:
    before = world.balances()
    outcome = run_target(world.targets()[0], CI_EXAMPLES, derandomize=True)
    if outcome.error is not None:
        raise outcome.error  # with the shrunk frame case in its notes
    assert outcome.tried >= CI_EXAMPLES // 2
    code, result = world.pay("2.00")
    after = world.balances()
    assert code == 0, result
    assert after["dev-0001:wallet"] == before["dev-0001:wallet"] - 200
    assert sum(after.values()) == sum(before.values()) and min(after.values()) >= 0
    kinds = {k.split(".")[0] for k in world.checked}
    assert {"valid", "resigned", "tampered", "forged", "random", "crl"} <= kinds  # every kind was tried
    assert world.checked["valid.refused"] == 0  # (a CRL the root did not sign is counted as crl.*)
    assert world.checked["resigned.accepted"] > 0 and world.checked["resigned.refused"] > 0
    receivers = {link.receiver for link in world.links}
    assert receivers == set(world.nodes)  # every running node has links fuzzed


def test_a_handler_that_crashes_breaks_the_property(world: NodeWorld) -> None:
    """The check sees a crash: a chip whose chip.info handler has a bug fails it (so the test can fail)."""
    chip = world.nodes["dev-0001.chip"]
    assert isinstance(chip, Chip)

    async def buggy(_: object) -> None:
        raise KeyError("a bug")

    chip.route("chip.info", buggy)
    link = next(lk for lk in world.links if lk.src is Role.TRUST_MODULE and lk.dst is Role.CHIP)
    with pytest.raises(AssertionError, match="crashed in a handler"):
        world.check(NodeCase(link, "chip.info", "valid", Empty()))


def test_a_request_left_unanswered_breaks_the_property(
    world: NodeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accepted request must be answered: a node that stays silent fails the check."""
    monkeypatch.setattr("ops.chaos.fuzz_nodes.ANSWER_S", 0.5)
    tm: Node = world.nodes["dev-0001.tm"]

    async def silent(_: object) -> None:
        return None  # neither a response nor a refusal

    tm.route("reports.get", silent)
    link = next(lk for lk in world.links if lk.src is Role.CLIENT and lk.dst is Role.TRUST_MODULE)
    with pytest.raises(AssertionError, match="never answered"):
        world.check(NodeCase(link, "reports.get", "valid", Empty()))
