"""The interim reply log file: two replicas (two connections) on one file, the contract of nodes.replies."""

from __future__ import annotations

from pathlib import Path

from nodes.replies import ANSWERED, BUSY, NEW
from nodes.reply_file import FileReplies

MID = b"\1" * 16


async def test_one_replica_gets_a_request_the_other_waits_then_finds_the_answer(tmp_path: Path) -> None:
    a, b = (
        FileReplies(tmp_path / "r.sqlite", lease_ms=1_000),
        FileReplies(tmp_path / "r.sqlite", lease_ms=1_000),
    )
    try:
        assert (await a.claim("dev-0001.chip", MID, "ps", 100)).state == NEW
        assert (await b.claim("dev-0001.chip", MID, "ps.2", 200)).state == BUSY
        # another sender's request with the same id is its own
        assert (await b.claim("dev-0002.chip", MID, "ps.2", 200)).state == NEW
        await a.answer("dev-0001.chip", MID, "tp/v1/dev/dev-0001/ps/chip", b"frame", 300)
        claim = await b.claim("dev-0001.chip", MID, "ps.2", 400)
        assert (claim.state, claim.topic, claim.frame) == (ANSWERED, "tp/v1/dev/dev-0001/ps/chip", b"frame")
    finally:
        a.close()
        b.close()


async def test_a_claim_whose_holder_died_is_taken_over_after_the_lease(tmp_path: Path) -> None:
    a, b = (
        FileReplies(tmp_path / "r.sqlite", lease_ms=1_000),
        FileReplies(tmp_path / "r.sqlite", lease_ms=1_000),
    )
    try:
        assert (await a.claim("c", MID, "ps", 0)).state == NEW
        assert (await b.claim("c", MID, "ps.2", 999)).state == BUSY
        assert (await b.claim("c", MID, "ps.2", 1_000)).state == NEW
        assert (await a.claim("c", MID, "ps", 1_500)).state == BUSY  # now the other one holds it
        assert await a.prune(1_000, 10) == 0 and await a.prune(1_001, 10) == 1
        assert (await a.claim("c", MID, "ps", 1_600)).state == NEW  # pruned: forgotten
    finally:
        a.close()
        b.close()
