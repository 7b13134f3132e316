"""The whole client is measured, and ``trustpay client`` runs only the measured bytes (issue 6, point 2).

Real processes on a real broker: the trust module measures the client install
at A1, ``trustpay client`` is its own process whose boot path checks the
install against that measurement before anything of it runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from nodes.deployment import canonical_json

from .conftest import DEV1, DEV2, E2E, WAIT_S, tm_of

pytestmark = pytest.mark.e2e

# Runs `trustpay client` as `python -m ops.cli` does, and at exit writes where every project
# module in the process came from.
ORIGINS_DRIVER = """
import atexit, json, runpy, sys

out = sys.argv.pop(1)

def dump():
    mods = {}
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in ("protocol", "nodes", "ops", "broker"):
            spec = getattr(module, "__spec__", None)
            mods[name] = {
                "origin": getattr(spec, "origin", None),
                "loader": type(getattr(module, "__loader__", None)).__name__,
            }
    with open(out, "w") as fh:
        json.dump(mods, fh)

atexit.register(dump)
runpy.run_module("ops.cli", run_name="__main__", alter_sys=True)
"""
# ops/__init__.py, ops/cli.py (run as __main__), ops/cli_common.py, ops/client_cmd.py, ops/client_boot.py
BOOT_PATH = {"ops", "ops.cli_common", "ops.client_cmd", "ops.client_boot"}


async def trustpay(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        out, err = await proc.communicate()
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


async def test_self_restoring_client_code_never_runs_and_nothing_is_paid(e2e: E2E) -> None:
    # Installed after A1 measured the release: once loaded, this code would write the released
    # bytes back over its own file (so that C2 and C7 measure the release) and make every amount
    # 400.00. On main the client exec'd its helper file and only C2 measured it, after the
    # rewrite: 400.00 was paid. Here its bytes are checked against A1's digests before they run.
    text = e2e.dep.client_code_dir(DEV1) / "nodes" / "client_text.py"
    released = text.read_bytes()
    attack = (
        released
        + (
            "\nimport pathlib as _pathlib\n"
            f"_pathlib.Path(__file__).write_bytes({released!r})\n"
            "def parse_amount(text, exponent):\n    return 40000\n"
        ).encode()
    )
    text.write_bytes(attack)
    before = await e2e.balances()
    mark = e2e.watcher.mark()

    run = await e2e.pay(DEV1, "1.25", "shop-1")

    assert run.code == 3, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "disabled"
    assert run.result["reason"] == "the client's code is not what the trust module measured"
    assert text.read_bytes() == attack  # it never ran: running, it would have restored the file
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}
    assert not [e for e in e2e.events(mark, device=DEV1) if e.step.startswith(("B", "C"))]

    text.write_bytes(released)  # the released bytes again: the same client pays

    run = await e2e.pay(DEV1, "1.25", "shop-1")

    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert (await e2e.balances())[f"{DEV1}:wallet"] == before[f"{DEV1}:wallet"] - 125


async def test_the_client_process_runs_only_its_boot_path_and_the_measured_install(
    e2e: E2E, tmp_path: Path
) -> None:
    driver, origins = tmp_path / "driver.py", tmp_path / "origins.json"
    driver.write_text(ORIGINS_DRIVER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(driver),
        str(origins),
        "client",
        "--deploy",
        str(e2e.dep.root),
        "--device",
        DEV2,
        "--broker",
        e2e.launcher.broker_url,
        "--json",
        "pay",
        "2.00",
        "shop-2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S * 3):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (out.decode(), err.decode()[-2000:])
    assert json.loads(out.decode().splitlines()[-1])["status"] == "confirmed"
    modules = json.loads(origins.read_text())

    outside = {name for name, m in modules.items() if m["loader"] != "InstallFinder"}
    assert outside == BOOT_PATH, outside  # no provisioning, launcher, demo, bench or broker module
    install = e2e.dep.client_code_dir(DEV2).resolve()
    served = {name: Path(m["origin"]) for name, m in modules.items() if name not in BOOT_PATH}
    assert {"nodes.client", "nodes.client_main", "nodes.runtime", "protocol.messages"} <= set(served)
    for name, origin in served.items():
        assert origin.resolve().is_relative_to(install), (name, origin)


async def test_a_released_whole_install_upgrade_is_trusted_live(e2e: E2E, tmp_path: Path) -> None:
    new = tmp_path / "client-1.1.0"
    shutil.copytree(e2e.dep.client_code_dir(DEV1), new / "code")
    loop = new / "code" / "nodes" / "client.py"  # the upgrade changes the command loop's module
    loop.write_bytes(loop.read_bytes() + b"\n# 1.1.0: clearer receipts\n")
    static = json.loads((e2e.dep.client_dir(DEV1) / "static.json").read_bytes())
    (new / "static.json").write_bytes(canonical_json({**static, "version": "1.1.0"}))
    # dev-0001 is upgraded while everything runs
    shutil.rmtree(e2e.dep.client_code_dir(DEV1))
    shutil.copytree(new / "code", e2e.dep.client_code_dir(DEV1))
    shutil.copy(new / "static.json", e2e.dep.client_dir(DEV1) / "static.json")

    refused = await e2e.pay(DEV1, "1.00", "shop-1")  # not released yet, so not measured as good

    assert refused.code == 3, (refused.lines, refused.stderr[-2000:])
    assert refused.result["reason"] == "the client's code is not what the trust module measured"

    code, out, err = await trustpay(
        "release",
        "--deploy",
        str(e2e.dep.root),
        "client",
        "trustpay-client",
        "1.1.0",
        str(new),
        "--broker",
        e2e.launcher.broker_url,
    )

    assert code == 0, (out, err)
    assert "released" in out
    mark = e2e.watcher.mark()
    upgraded, old = await asyncio.gather(e2e.pay(DEV1, "3.00", "shop-1"), e2e.pay(DEV2, "4.00", "shop-1"))
    assert upgraded.code == 0, (upgraded.lines, upgraded.stderr[-2000:])
    assert old.code == 0, (old.lines, old.stderr[-2000:])  # 1.0.0 is still released
    c7 = await e2e.wait_event(mark, device=DEV1, step="C7", node=tm_of(DEV1))
    assert c7.outcome == "ok" and c7.order_id == upgraded.result["order_id"]
    assert not e2e.events(mark, step="A5")
