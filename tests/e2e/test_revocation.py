"""Revocation while the deployment runs: `trustpay revoke` reaches every node within seconds, the
revoked device is refused with the reason, another device goes on paying."""

from __future__ import annotations

import time

import pytest

from .conftest import DEV1, DEV2, E2E, OPENING, chip_of, client_of, node_stopped_counters

pytestmark = pytest.mark.e2e

INSTALL_WITHIN_S = 10.0


async def revoke(e2e: E2E, *targets: str) -> None:
    await e2e.trustpay("revoke", *targets)


async def test_a_device_revoked_while_everything_runs_is_refused_and_another_still_pays(e2e: E2E) -> None:
    first = await e2e.pay(DEV1, "1.00", "shop-1")
    assert first.code == 0, (first.lines, first.stderr[-2000:])
    # every node that runs all the time: a client runs only for the length of its command
    nodes = set(e2e.dep.load_manifest().node_ids()) - {client_of(DEV1), client_of(DEV2)}
    mark = e2e.watcher.mark()
    started = time.monotonic()

    await revoke(e2e, DEV1)

    # every running node verified and installed the list it got from the retained topic
    installed = await e2e.wait_events(len(nodes), since=mark, step="CRL")
    took_s = time.monotonic() - started
    assert {e.node for e in installed} == nodes
    assert all("revocation list 1 installed" in e.reason for e in installed), installed
    assert took_s < INSTALL_WITHIN_S, f"the revocation took {took_s:.1f} s to reach every node"
    before = await e2e.balances()

    refused = await e2e.pay(DEV1, "2.00", "shop-1")

    assert refused.code != 0, refused.lines
    assert "revoked" in str(refused.result.get("reason")), (refused.lines, refused.stderr[-2000:])
    assert await e2e.balances() == before
    assert list(e2e.stored_payments()) == [first.result["order_id"]]

    other = await e2e.pay(DEV2, "3.00", "shop-2")

    assert other.code == 0, (other.lines, other.stderr[-2000:])
    after = await e2e.balances()
    assert after[f"{DEV2}:wallet"] == OPENING - 300 and after[f"{DEV1}:wallet"] == OPENING - 100
    await e2e.stop()
    # the running chip took the list live: it answered the revoked client with a typed refusal
    assert node_stopped_counters(e2e.dep, chip_of(DEV1))[-1].get("refused.revoked", 0) >= 1
