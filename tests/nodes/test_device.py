"""One device's three nodes (A and B flows) on the in-memory bus, from a real deployment."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.client import EXIT_DISABLED, Client
from nodes.deployment import Deployment
from nodes.trust_module import TrustModule

from .harness import make_node, provisioned, running, step_events

DEV = "dev-0001"


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


def device_nodes(dep: Deployment, broker: FakeBroker) -> tuple[TrustModule, Chip]:
    tm = make_node(TrustModule, dep, f"{DEV}.tm", broker, deployment=dep)
    chip = make_node(Chip, dep, f"{DEV}.chip", broker, deployment=dep)
    return tm, chip


async def started(tm: TrustModule) -> None:
    async with asyncio.timeout(10):
        await tm.started.wait()


def steps(broker: FakeBroker) -> list[tuple[str, str]]:
    return [(e.step, e.outcome) for e in step_events(broker)]


async def test_clean_start_checks_client_and_every_app(dep: Deployment) -> None:
    broker = FakeBroker()
    tm, chip = device_nodes(dep, broker)
    async with running(chip, tm):
        await started(tm)
        assert tm.payment_enabled
        assert chip.data["enabled"] is True
    seen = steps(broker)
    assert ("A1", "ok") in seen
    assert seen.count(("A2", "ok")) == 2
    assert ("A", "done") in seen
    stored = json.loads((dep.state_dir(f"{DEV}.tm") / "trust.json").read_text())["measurements"]
    assert set(stored) == {"client", "app:transit", "app:wallet"}


async def first_start(dep: Deployment) -> None:
    """Install the apps and store the first measurements, as a device's first boot does."""
    tm, chip = device_nodes(dep, FakeBroker())
    async with running(chip, tm):
        await started(tm)


async def test_app_whose_files_do_not_match_its_package_is_not_installed(dep: Deployment) -> None:
    code = dep.app_dir(DEV, "transit") / "code.py"
    code.write_bytes(code.read_bytes() + b"\n# steal money\n")
    tm, chip = device_nodes(dep, FakeBroker())
    async with running(chip, tm):
        await started(tm)
        assert sorted(chip.data["apps"]) == ["wallet"]
        assert [a.name for a in (await chip._chip_state()).apps] == ["wallet"]
    assert dep.app_dir(DEV, "transit").exists()  # refused, not installed: nothing to delete


async def test_tampered_app_is_deleted_and_reported(dep: Deployment) -> None:
    await first_start(dep)
    code = dep.app_dir(DEV, "transit") / "code.py"
    code.write_bytes(code.read_bytes() + b"\n# steal money\n")
    broker = FakeBroker()
    tm, chip = device_nodes(dep, broker)
    async with running(chip, tm):
        await started(tm)
        assert tm.payment_enabled
        assert sorted(chip.data["apps"]) == ["wallet"]
    assert not dep.app_dir(DEV, "transit").exists()
    seen = steps(broker)
    assert ("A3", "deleted") in seen and ("A2", "failed") in seen and ("A2", "ok") in seen
    reports = json.loads((dep.state_dir(f"{DEV}.tm") / "trust.json").read_text())["reports"]
    assert any("transit" in r["text"] and r["step"] == "A3" for r in reports)


async def test_app_dynamic_data_changed_between_starts_is_caught(dep: Deployment) -> None:
    await first_start(dep)
    dyn = dep.app_dir(DEV, "wallet") / "dynamic.json"
    dyn.write_bytes(b'{"counter":0,"last_order":"forged"}\n')
    broker = FakeBroker()
    tm, chip = device_nodes(dep, broker)
    async with running(chip, tm):
        await started(tm)
        assert sorted(chip.data["apps"]) == ["transit"]
    assert ("A3", "deleted") in steps(broker)


async def test_tampered_client_disables_payment_and_client_reports_it(dep: Deployment) -> None:
    await first_start(dep)
    static = dep.client_dir(DEV) / "static.json"
    static.write_bytes(static.read_bytes().replace(b"EUR", b"USD"))
    broker = FakeBroker()
    tm, chip = device_nodes(dep, broker)
    async with running(chip, tm):
        await started(tm)
        assert not tm.payment_enabled
        assert chip.data["enabled"] is False
        out = io.StringIO()
        client = make_node(Client, dep, f"{DEV}.client", broker, deployment=dep, command=["balance"], out=out)
        async with asyncio.timeout(10):
            await client.run()
    assert client.exit_code == EXIT_DISABLED
    text = out.getvalue()
    assert "Payment functions are disabled" in text
    assert "[trust module, A5]" in text
    seen = steps(broker)
    assert ("A5", "disabled") in seen and ("B5", "disabled") in seen
