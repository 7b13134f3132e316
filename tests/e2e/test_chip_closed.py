"""B4: once the client closed, the chip refuses every payment function until it is opened again."""

from __future__ import annotations

import uuid

import pytest

from protocol.errors import Refused
from protocol.measure import dynamic_digest
from protocol.messages import AccountQuery, PayStart
from protocol.topics import Role

from .conftest import DEV1, E2E, chip_of, client_of

pytestmark = pytest.mark.e2e


async def test_closed_chip_refuses_payment_from_the_clients_own_identity(e2e: E2E) -> None:
    mark = e2e.watcher.mark()
    run = await e2e.client(DEV1, "balance")
    assert run.code == 0, (run.lines, run.stderr[-2000:])
    b4 = await e2e.wait_event(mark, device=DEV1, step="B4", node=client_of(DEV1))
    assert b4.outcome == "ok"
    before = await e2e.balances()
    chip = e2e.dep.load_cert(chip_of(DEV1))

    # the client's own keys and certificate, but no chip.open first (B1 skipped)
    async with e2e.impersonate(client_of(DEV1)) as impostor:
        start = PayStart(f"ord-{uuid.uuid4().hex}", "wallet", 100, "EUR", "shop-1", dynamic_digest(b"{}\n"))
        with pytest.raises(Refused) as refused:
            await impostor.request(
                impostor.link(Role.CHIP),
                "pay.start",
                start,
                recipient=chip_of(DEV1),
                expect="pay.result",
                session=uuid.uuid4().bytes,
                peer=chip,
            )
        assert refused.value.refusal_code == "closed"
        with pytest.raises(Refused) as refused:
            await impostor.request(
                impostor.link(Role.CHIP),
                "account.query",
                AccountQuery("wallet", 5),
                recipient=chip_of(DEV1),
                expect="account.info",
                peer=chip,
            )
        assert refused.value.refusal_code == "closed"

    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}
    assert not [e for e in e2e.events(mark, device=DEV1) if e.step.startswith("C")]
