"""Releases while everything runs: an upgraded client is refused until its version is released,
then trusted without a restart; a withdrawn version is refused from then on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nodes.deployment import Deployment, canonical_json
from nodes.runtime import Node
from ops.release_cmd import make_release
from protocol.measure import measure
from protocol.messages import ReleaseUpdate
from protocol.topics import Role, operator_topic

from .harness import make_node, provisioned, running
from .test_payment_flow import DEV, World, world


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


async def publish_release(w: World, blob: bytes) -> None:
    operator = make_node(Node, w.dep, "operator", w.broker)
    async with running(operator):
        for role, nid, device in (
            (Role.TRUST_SERVER, "trust-server", None),
            (Role.TRUST_MODULE, f"{DEV}.tm", DEV),
        ):
            await operator.request(
                operator_topic(role, device),
                "release.update",
                ReleaseUpdate(blob),
                recipient=nid,
                expect="release.ok",
            )


def build_client(dep: Deployment, to: Path) -> None:
    """Version 1.1.0 of the whole client install, built in ``to`` (code/ and static.json)."""
    client = dep.client_dir(DEV)
    shutil.copytree(dep.client_code_dir(DEV), to / "code")
    text = to / "code" / "nodes" / "client_text.py"
    text.write_bytes(text.read_bytes() + b"\n# 1.1.0: clearer amount errors\n")
    static = json.loads((client / "static.json").read_bytes())
    (to / "static.json").write_bytes(canonical_json({**static, "version": "1.1.0"}))


def install_client(dep: Deployment, new: Path) -> None:
    shutil.rmtree(dep.client_code_dir(DEV))
    shutil.copytree(new / "code", dep.client_code_dir(DEV))
    (dep.client_dir(DEV) / "static.json").write_bytes((new / "static.json").read_bytes())


async def test_a_released_upgrade_stays_trusted_without_any_restart(dep: Deployment, tmp_path: Path) -> None:
    new = tmp_path / "client-1.1.0"
    async with world(dep) as w:
        build_client(dep, new)
        blob = make_release(dep, "client", "trustpay-client", "1.1.0", new, withdraw=False)
        await publish_release(w, blob)
        install_client(dep, new)
        code, result = await w.client("pay", "2.00", "shop-1")
        balance = (await w.balances())[f"{DEV}:wallet"]
    assert code == 0, result
    assert balance == 100_000 - 200
    # C7 measured the upgraded install and left its digests for the client's boot path
    files = dep.read_client(DEV)
    m = measure("client", "trustpay-client", "1.1.0", files.code, files.static, files.dynamic)
    assert json.loads(dep.client_measured_path(DEV).read_bytes()) == {
        "code": m.code.hex(),
        "static": m.static.hex(),
    }


async def test_an_unreleased_upgrade_is_refused_and_disables_payment(dep: Deployment, tmp_path: Path) -> None:
    new = tmp_path / "client-1.1.0"
    async with world(dep) as w:
        build_client(dep, new)
        install_client(dep, new)  # never released: to the platform this is a tampered client
        code, result = await w.client("pay", "1.00", "shop-1")
        balance = (await w.balances())[f"{DEV}:wallet"]
        steps = w.steps()
        enabled = w.tm.payment_enabled
    assert code == 1 and result["code"] == "untrusted"
    assert "match no released version" in str(result["reason"])
    assert balance == 100_000
    assert "C4:refused" in steps and "A5:disabled" in steps and not enabled  # C7 found it too


async def test_a_withdrawn_version_is_refused_from_then_on(dep: Deployment) -> None:
    async with world(dep) as w:
        code, _ = await w.client("pay", "1.00", "shop-1")
        assert code == 0
        blob = make_release(dep, "client", "trustpay-client", "1.0.0", None, withdraw=True)
        await publish_release(w, blob)
        code, result = await w.client("pay", "1.00", "shop-1")
        balance = (await w.balances())[f"{DEV}:wallet"]
        steps = w.steps()
    assert code == 1 and result["code"] == "untrusted"
    assert "withdrawn" in str(result["reason"])
    assert balance == 100_000 - 100
    assert "C4:refused" in steps
