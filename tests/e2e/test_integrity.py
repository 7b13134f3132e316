"""Tampering caught: a patched app deleted (A3), a patched client disabled (A5/B5), untrusted (C4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .conftest import DEV1, DEV2, E2E, tm_of

pytestmark = pytest.mark.e2e


def append(path: Path, data: bytes) -> None:
    path.write_bytes(path.read_bytes() + data)


async def test_tampered_app_is_deleted_at_start_up_and_the_other_app_still_pays(e2e: E2E) -> None:
    transit = e2e.dep.app_dir(DEV1, "transit")
    append(transit / "code.py", b"\n# skim 1% of every payment\n")
    mark = e2e.watcher.mark()

    done = await e2e.restart_trust_module(DEV1)

    assert done.outcome == "done"
    deleted = e2e.events(mark, device=DEV1, step="A3", node=tm_of(DEV1))
    assert [e.outcome for e in deleted] == ["deleted"], deleted
    assert not transit.exists()
    assert e2e.dep.installed_apps(DEV1) == ["wallet"]
    a2 = {e.outcome for e in e2e.events(mark, device=DEV1, step="A2")}
    assert a2 == {"ok", "failed"}  # wallet passed, transit failed
    before = await e2e.balances()

    run = await e2e.pay(DEV1, "3.00", "shop-2", "transit")

    assert run.code == 1, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "refused" and run.result["code"] == "unknown_app"
    assert any("transit" in report and "deleted" in report for report in run.reports), run.reports
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}

    run = await e2e.pay(DEV1, "5.00", "shop-2", "wallet")

    assert run.code == 0, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "confirmed"
    assert run.reports == []  # the report was delivered once
    after = await e2e.balances()
    assert after[f"{DEV1}:wallet"] == before[f"{DEV1}:wallet"] - 500
    assert after["shop-2"] == before["shop-2"] + 500
    assert after[f"{DEV1}:transit"] == before[f"{DEV1}:transit"]
    assert sum(after.values()) == sum(before.values())
    assert [p.order_id for p in e2e.stored_payments().values()] == [run.result["order_id"]]
    await e2e.wait_event(mark, device=DEV1, step="C7", order_id=run.result["order_id"], outcome="ok")


async def test_tampered_client_disables_payment_and_the_client_is_refused(e2e: E2E) -> None:
    # dev-0001's command loop (the installed nodes/client.py), dev-0002's client static data: both fail A1
    loop = e2e.dep.client_code_dir(DEV1) / "nodes" / "client.py"
    honest = b"outcome = await self.pay(args[0], args[1], args[2] if len(args) == 3 else None)"
    assert honest in loop.read_bytes()
    loop.write_bytes(loop.read_bytes().replace(honest, b'outcome = await self.pay("400.00", "shop-3", None)'))
    static = e2e.dep.client_dir(DEV2) / "static.json"
    static.write_bytes(static.read_bytes().replace(b'"default_app":"wallet"', b'"default_app":"transit"'))
    assert b'"transit"' in static.read_bytes()
    before = await e2e.balances()
    mark = e2e.watcher.mark()

    started = await asyncio.gather(*(e2e.restart_trust_module(d) for d in (DEV1, DEV2)))

    for device, done in zip((DEV1, DEV2), started, strict=True):
        assert done.outcome == "disabled", done
        a1 = e2e.events(mark, device=device, step="A1")
        assert [e.outcome for e in a1] == ["failed"], a1
        a5 = e2e.events(mark, device=device, step="A5")
        assert [e.outcome for e in a5] == ["disabled"], a5

    runs = await asyncio.gather(e2e.pay(DEV1, "1.00", "shop-1"), e2e.pay(DEV2, "2.00", "shop-1"))

    for device, run in zip((DEV1, DEV2), runs, strict=True):
        # B5 before anything of the install ran: its boot path refused the bytes the trust module refused
        assert run.code == 3, (run.lines, run.stderr[-2000:])  # EXIT_DISABLED
        assert run.result["status"] == "disabled"
        assert run.result["message"].startswith(
            "Payment functions are disabled: the client failed its integrity"
        )
        assert "match" in run.result["reason"], run.result  # the trust module's own reason
        assert not e2e.events(mark, device=device, step="B1")
        assert not [e for e in e2e.events(mark, device=device) if e.step.startswith("C")]
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}


async def test_withdrawn_client_release_gets_an_untrusted_verdict(e2e: E2E) -> None:
    before = await e2e.balances()
    out = await e2e.trustpay("release", "client", "trustpay-client", "1.0.0", "--withdraw")
    assert "withdrawn" in out
    mark = e2e.watcher.mark()

    run = await e2e.pay(DEV1, "4.00", "shop-3")

    assert run.code == 1, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "refused" and run.result["code"] == "untrusted"
    c4 = await e2e.wait_event(mark, device=DEV1, step="C4", node=tm_of(DEV1))
    assert c4.outcome == "refused" and c4.order_id == run.result["order_id"]
    ts_c4 = await e2e.wait_event(mark, device=DEV1, step="C4", node="trust-server")
    assert ts_c4.outcome == "refused"
    assert not e2e.events(mark, device=DEV1, step="C5")
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}


async def test_dynamic_data_changed_outside_a_session_gets_an_untrusted_verdict(e2e: E2E) -> None:
    # a first payment moves the wallet's counter to 1; malware then rewinds it to 0
    first = await e2e.pay(DEV1, "1.00", "shop-1")
    assert first.code == 0, (first.lines, first.stderr[-2000:])
    (e2e.dep.app_dir(DEV1, "wallet") / "dynamic.json").write_bytes(b'{"counter":0,"last_order":""}\n')
    before = await e2e.balances()
    mark = e2e.watcher.mark()

    run = await e2e.pay(DEV1, "7.00", "shop-3")

    assert run.code == 1, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "refused" and run.result["code"] == "untrusted"
    assert "dynamic data changed outside" in run.result["reason"]
    c4 = await e2e.wait_event(mark, device=DEV1, step="C4", node=tm_of(DEV1))
    assert c4.outcome == "refused" and c4.order_id == run.result["order_id"]
    assert not e2e.events(mark, device=DEV1, step="C5")
    assert await e2e.balances() == before
    assert list(e2e.stored_payments()) == [first.result["order_id"]]
