"""Revocation while the nodes run: a list published on the bus reaches every node at once, and a
revoked device is refused with a typed reason, by the platform at C3 and at C5 as well."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.deployment import Deployment
from nodes.payment_server import PaymentServer
from nodes.runtime import Node
from nodes.trust_db import REVOKED, trust_db_at
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from ops.revoke_cmd import make_revocations, target_nodes
from protocol.certs import RevocationList
from protocol.errors import ConfigError
from protocol.messages import RevocationUpdate
from protocol.topics import CRL_TOPIC

from .harness import make_node, provisioned, running
from .test_payment_flow import DEV, PAYER, World, world

CHIP_ID = f"{DEV}.chip"


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


async def publish(w: World, crl: RevocationList) -> None:
    """What ``trustpay revoke`` does on the bus: the operator publishes the list, retained."""
    operator = make_node(Node, w.dep, "operator", w.broker)
    async with running(operator):
        await operator.send(CRL_TOPIC, "crl", RevocationUpdate(crl.to_bytes()), retain=True)
    await w.broker.drained()  # every node has verified and installed it (synchronously, on arrival)


def test_targets_name_devices_and_nodes(dep: Deployment) -> None:
    manifest = dep.load_manifest()
    assert target_nodes(manifest, [DEV]) == [f"{DEV}.tm", CHIP_ID, f"{DEV}.client"]
    assert target_nodes(manifest, [CHIP_ID, DEV]) == [CHIP_ID, f"{DEV}.tm", f"{DEV}.client"]
    with pytest.raises(ConfigError, match="neither a device nor a node"):
        target_nodes(manifest, ["dev-0099"])
    with pytest.raises(ConfigError, match="cannot revoke itself"):
        target_nodes(manifest, ["operator"])


async def test_a_published_list_is_installed_by_every_running_node_and_never_rolled_back(
    dep: Deployment,
) -> None:
    chip_serial = dep.load_public_cert(CHIP_ID).serial
    async with world(dep) as w:
        nodes = [w.tm, w.chip, w.ps]
        first = make_revocations(dep, [CHIP_ID])
        await publish(w, first)
        installed = [(n.certs.crl_number, chip_serial in n.certs.revoked) for n in nodes]
        newer = make_revocations(dep, [])  # number 2: `revoke` only adds to the held list
        older = RevocationList.from_bytes(first.to_bytes())
        await publish(w, newer)
        await publish(w, older)  # a replayed older list
        after = [(n.certs.crl_number, chip_serial in n.certs.revoked) for n in nodes]
        refused_old = w.tm.counters["rejected.cert_invalid"]
    assert installed == [(1, True)] * 3
    assert after == [(2, True)] * 3
    assert refused_old == 1


async def test_a_revoked_device_is_told_so_at_once_and_pays_nothing(dep: Deployment) -> None:
    async with world(dep) as w:
        code, result = await w.client("pay", "1.00", "shop-1")
        assert code == 0, result
        await publish(w, make_revocations(dep, target_nodes(dep.load_manifest(), [DEV])))
        before = await w.balances()
        code, result = await w.client("pay", "1.00", "shop-1")
        after = await w.balances()
    # the chip refuses the revoked client's first request with a signed, typed answer, not a timeout
    assert code != 0
    assert "revoked" in str(result["reason"]), result
    assert after == before


@asynccontextmanager
async def split_world(dep: Deployment, knows: str, revoked: str = CHIP_ID) -> AsyncIterator[World]:
    """Every node of the payment, where only ``knows`` ("ts" or "ps") holds ``revoked``'s revocation.

    As when the list was published while the device was offline: the device's
    own nodes must not be what stops a revoked device; the platform must.
    """
    broker = FakeBroker()
    held = dep.crl_path.read_bytes()
    make_revocations(dep, [revoked])
    ts = make_node(TrustServer, dep, "trust-server", broker, deployment=dep) if knows == "ts" else None
    ps = make_node(PaymentServer, dep, "payment-server", broker, deployment=dep) if knows == "ps" else None
    dep.crl_path.write_bytes(held)  # every other node, the client included, has the older list
    ts = ts or make_node(TrustServer, dep, "trust-server", broker, deployment=dep)
    ps = ps or make_node(PaymentServer, dep, "payment-server", broker, deployment=dep)
    chip = make_node(Chip, dep, CHIP_ID, broker, deployment=dep)
    tm = make_node(TrustModule, dep, f"{DEV}.tm", broker, deployment=dep)
    async with running(ts, ps, chip, tm, timeout_s=20):
        async with asyncio.timeout(10):
            await tm.started.wait()
        yield World(dep, broker, tm, chip, ps)


async def device_status(dep: Deployment) -> str:
    db = trust_db_at(dep.trust_db)
    await db.open()
    try:
        row = await db.device(DEV)
    finally:
        await db.close()
    assert row is not None
    return row.status


async def test_c3_contraindicates_a_device_whose_chip_is_revoked(dep: Deployment) -> None:
    """Fails on main: the trust-server judged revocation by its database flag only, which no
    revocation list ever set, so the verdict affirmed and the payment went through."""
    async with split_world(dep, knows="ts") as w:
        code, result = await w.client("pay", "1.00", "shop-1")
        balance = (await w.balances())[PAYER]
        steps = w.steps()
    assert code == 1 and result["code"] == "untrusted", result
    assert "device revoked" in str(result["reason"])
    assert balance == 100_000
    assert "C3:failed" in steps and "C5:ok" not in steps
    assert await device_status(dep) == REVOKED  # kept across restarts, for audits


async def test_the_trust_server_answers_a_revoked_trust_module_with_the_reason(dep: Deployment) -> None:
    """Fails on main: the trust-server dropped every frame of the revoked trust module unanswered,
    so the payment failed only after the retries ran out, as "no answer to c1.check"."""
    async with split_world(dep, knows="ts", revoked=f"{DEV}.tm") as w:
        code, result = await w.client("pay", "1.00", "shop-1")
        balance = (await w.balances())[PAYER]
    assert code == 1 and result["code"] == "revoked", result  # the trust-server's own code, passed up
    assert f"{DEV}.tm's certificate" in str(result["reason"]) and "revoked" in str(result["reason"])
    assert "no answer" not in str(result["reason"])
    assert balance == 100_000


async def test_c5_refuses_an_order_from_a_revoked_chip_with_a_typed_reason(dep: Deployment) -> None:
    """Fails on main: the payment-server dropped the revoked chip's order unanswered, so the chip
    waited out its retries and reported an unknown outcome instead of a refusal."""
    async with split_world(dep, knows="ps") as w:
        code, result = await w.client("pay", "1.00", "shop-1")
        balance = (await w.balances())[PAYER]
        refused = w.ps.counters["refused.revoked"]
    assert code == 1, result
    assert (result["status"], result["code"]) == ("refused", "revoked"), result
    assert f"{CHIP_ID}'s certificate" in str(result["reason"]) and "revoked" in str(result["reason"])
    assert balance == 100_000
    assert refused >= 1
