"""The chip keeps settled orders' receipts in an append-only log, not in chip.json rewritten each payment."""

from __future__ import annotations

import json
from pathlib import Path

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.store import RecordLog

from .harness import make_node, provisioned, running

CHIP = "dev-0001.chip"


async def test_receipts_an_earlier_version_kept_in_chip_json_move_to_the_log_once(tmp_path: Path) -> None:
    dep = provisioned(tmp_path)
    state = dep.state_dir(CHIP)
    state.mkdir(parents=True, exist_ok=True)
    old = {
        "enabled": False,
        "reason": "r",
        "apps": {},
        "pending": {},
        "receipts": {"ord-1": "aa", "ord-2": "bb"},
    }
    (state / "chip.json").write_text(json.dumps(old))
    chip = make_node(Chip, dep, CHIP, FakeBroker(), deployment=dep)
    async with running(chip):
        assert list(chip.receipts.records.items()) == [("ord-1", "aa"), ("ord-2", "bb")]
    assert "receipts" not in json.loads((state / "chip.json").read_bytes())
    log = RecordLog(state / "receipts.log", 100)
    log.load()
    assert list(log.records.items()) == [("ord-1", "aa"), ("ord-2", "bb")]
