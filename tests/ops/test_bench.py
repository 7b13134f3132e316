"""``trustpay bench``'s machinery on a tiny run: it measures what it says, never how fast.

Speed is never asserted (the figures depend on the machine): only that every
payment counted was confirmed, that the counts come from the nodes' own
counters, and that the JSON has the keys other tools read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nodes.deployment import Deployment
from ops.bench.load import compare, load, save, table
from ops.provision import provision

pytestmark = pytest.mark.e2e

BACKEND = "mosquitto" if shutil.which("mosquitto") else "amqtt"
KEYS = (
    "payments_per_second",
    "baseline_payments_per_second",
    "baseline_ratio",
    "p50_ms",
    "p99_ms",
    "messages_per_payment",
    "cpu_ms_per_payment",
)


async def test_a_small_load_run_counts_confirmed_payments_and_their_messages(tmp_path: Path) -> None:
    provision(tmp_path / "d", 3, backend=BACKEND)
    dep = Deployment(tmp_path / "d")
    result = await load(
        dep,
        devices=3,
        concurrency=2,
        seconds=1.0,
        broker_url=None,
        backend=BACKEND,
        crypto_us=(30.0, 70.0),
    )
    assert all(isinstance(result[key], (int, float)) for key in KEYS)
    assert result["payments"] > 0 and result["failed"] == 0 and result["errors"] == {}
    # every payment is C1..C7 with its answers: at least the patent's link frames, and signed step events
    assert result["link_frames_per_payment"] >= 16 and result["step_events_per_payment"] >= 8
    assert set(result["cpu_ms_per_payment_by_role"]) >= {
        "trust-server", "payment-server", "chip", "trust-module", "client"
    }  # fmt: skip
    assert result["baseline_hops_per_payment"] == round(result["link_frames_per_payment"])
    assert result["baseline_payments_per_second"] > 0
    # the ledger agrees: warm-up (one per device) plus the measured payments, each exactly once
    from nodes.ledger import read_snapshot

    snapshot = await read_snapshot(dep.ledger_db)
    confirmed = [p for p in snapshot.payments if p.status == "confirmed"]
    assert len(confirmed) >= 3 + result["payments"]
    assert len({p.order_id for p in confirmed}) == len(confirmed)

    saved = tmp_path / "run.json"
    save(result, saved)
    assert json.loads(saved.read_text())["payments"] == result["payments"]
    assert "attested payments" in table(result) and "ratio" in table(result)
    assert "payments_per_second" in compare(result, {**result, "payments_per_second": 1.0})


async def test_the_memory_measure_counts_every_node_of_the_fleet_and_names_where_python_memory_went(
    tmp_path: Path,
) -> None:
    """Two devices' chips and trust modules up in this process, one KiB figure per node and per
    device, and the traced growth attributed to lines of ours (no size asserted: machine-bound)."""
    from ops.bench.memory import memory
    from protocol.topics import Role

    provision(tmp_path / "d", 2, backend=BACKEND)
    result = await memory(Deployment(tmp_path / "d"), 2, (Role.CHIP, Role.TRUST_MODULE), trace=8)
    assert result["nodes"] == 4 and result["failed"] == []
    assert result["rss_after_kib"] > 0 and result["kib_per_device"] == pytest.approx(
        2 * result["kib_per_node"], abs=0.2
    )
    assert result["python_kib_per_node"] > 0
    assert any(entry["where"].startswith(("nodes/", "protocol/", "ops/")) for entry in result["top"])
