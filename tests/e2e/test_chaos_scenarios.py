"""Every shipped chaos scenario, briefly and with a fixed seed: every invariant must hold.

Each run is what ``trustpay chaos run SCENARIO --payments 4 --devices 2
--seed 1`` does: a fresh deployment, `trustpay up` behind the fault proxy, two
devices paying while the faults and the scenario's action play out, then the
invariants checked from the clients' records, the ledger and the logs. A run
that held its invariants but never hit anything would prove nothing, so each
test also checks that its chaos happened: faults were applied, and the
action said what it did (its own expectations are invariant 8).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest

from ops.chaos.actions import ACTIONS
from ops.chaos.run import RunOptions, run_scenario
from ops.chaos.scenarios import SCENARIOS
from tests.storage import drop_schemas, pg_url

pytestmark = pytest.mark.e2e


def needs(name: str) -> list[pytest.MarkDecorator]:
    backend = SCENARIOS[name].backend or "mosquitto"
    if backend == "mosquitto":
        missing = not shutil.which("mosquitto")
        reason = "the mosquitto binary is not installed"
        return [pytest.mark.mosquitto, pytest.mark.skipif(missing, reason=reason)]
    return []


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n), id=n) for n in SCENARIOS])
async def test_every_invariant_holds(name: str, tmp_path: Path) -> None:
    sc = SCENARIOS[name]
    # replicas are for PostgreSQL: such a scenario runs on a fresh schema prefix of the test database
    prefix = f"t{secrets.token_hex(6)}" if sc.replicas > 1 else None
    opts = RunOptions(sc, tmp_path / "run", seed=1, payments=4, devices=2, db=prefix and pg_url(prefix))
    try:
        report = await run_scenario(opts, ACTIONS)
    finally:
        if prefix is not None:
            await drop_schemas(prefix)

    assert report.held, report.text()
    if sc.rules:  # with seed 1 the draws hit the same frames each run (retries aside)
        assert sum(report.faults.values()) > 0, report.text()
    assert sum(report.payments.get(k, 0) for k in report.payments if k.startswith("confirmed")) >= 1
    if sc.action:
        assert report.notes, report.text()  # the action says what it did
    if sc.replicas > 1:  # the last replica of each role was killed, the others spared
        for role in ("payment-server", "trust-server"):
            assert any(n.startswith(f"{role}.{sc.replicas} SIGKILLed") for n in report.notes), report.text()
        assert any("on PostgreSQL" in n for n in report.notes), report.text()
