"""``trustpay monitor --web`` in a real headless Chromium, against a live deployment on each broker.

The monitor runs as its own process (``--port 0``: it prints the address it
got); Debian's ``chromium`` opens the page through Playwright. The test makes a
payment and a tampered-app refusal and reads both flows from the *rendered*
page: the SVG arrows of the sequence diagram, their labels and their colours.
Every wait is a Playwright wait on a page condition, under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Locator, Page, async_playwright, expect

from ops.monitor.screenshot import CHROMIUM, CHROMIUM_ARGS
from ops.monitor.web import WebFeed, serve

from .conftest import DEV1, E2E, WAIT_S

pytestmark = pytest.mark.e2e

WAIT_MS = WAIT_S * 1000
RED = "rgb(200, 30, 30)"  # --bad in style.css

# a payment's messages after pay.start (C1..C7), as arrows: type, from lane, to lane
TM, TS, PS = "trust-module", "trust-server", "payment-server"
PAYMENT = [
    ("pay.start", "client", "chip"),
    ("attest.request", "chip", TM),
    ("c1.check", TM, TS),
    ("c1.result", TS, TM),
    ("c2.nonce", TM, TS),
    ("c2.challenge", TS, TM),
    ("c2.evidence", TM, TS),
    ("trust.grant", TS, PS),
    ("trust.granted", PS, TS),
    ("c4.verdict", TS, TM),
    ("attest.result", TM, "chip"),
    ("c5.journal", "chip", TM),
    ("journalled", TM, "chip"),
    ("pay.order", "chip", PS),
    ("pay.receipt", PS, "chip"),
    ("c6.done", "chip", TM),
    ("measured", TM, "chip"),
    ("pay.result", "chip", "client"),
    ("c7.done", "client", TM),
    ("measured", TM, "client"),
]

# what the page drew, read back from the DOM and the computed style of each arrow and note
ARROWS_JS = """fig => [...fig.querySelectorAll("g.msg")].map(g => ({
    type: g.dataset.type, src: g.dataset.src, dst: g.dataset.dst, verdict: g.dataset.verdict,
    label: g.querySelector("text").textContent, stroke: getComputedStyle(g.querySelector("line")).stroke}))"""
NOTES_JS = """fig => [...fig.querySelectorAll("g.event")].map(g => ({
    step: g.dataset.step, outcome: g.dataset.outcome,
    text: g.querySelector("text").textContent, fill: getComputedStyle(g.querySelector("text")).fill}))"""


@contextlib.asynccontextmanager
async def web_monitor(e2e: E2E) -> AsyncIterator[str]:
    """``trustpay monitor --web --port 0`` as its own process; the page's address it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.cli",
        "monitor",
        "--deploy",
        str(e2e.dep.root),
        "--broker",
        e2e.launcher.broker_url,
        "--web",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(WAIT_S):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("web monitor: http://127.0.0.1:"), (line, await proc.stderr.read())
        yield line.split(": ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(WAIT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def browser_page(url: str) -> AsyncIterator[Page]:
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(url)
            yield page
        finally:
            await browser.close()
    assert not errors, f"the page's script failed: {errors}"


def flows(page: Page, device: str) -> Locator:
    return page.locator(f'section.device[data-device="{device}"] figure.flow')


async def drawn(flow: Locator, script: str) -> list[dict[str, Any]]:
    return list(await flow.evaluate(script))


async def test_the_page_draws_a_payment_and_a_tampered_app_refusal(e2e: E2E) -> None:
    async with web_monitor(e2e) as url, browser_page(url) as page:
        await expect(page.locator("#link")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        # the retained statuses have arrived: the monitor is subscribed before anything is paid
        await expect(page.locator('#nodes li[data-node="payment-server"]')).to_have_text(
            "payment-server: online", timeout=WAIT_MS
        )

        run = await e2e.pay(DEV1, "2.50", "shop-1")

        assert run.code == 0, (run.lines, run.stderr[-2000:])
        order = run.result["order_id"]
        payment = flows(page, DEV1).filter(has_text=f"order {order}")
        await expect(payment.locator("figcaption")).to_contain_text("(ended)", timeout=WAIT_MS)
        drawn_arrows = [a for a in await drawn(payment, ARROWS_JS) if a["type"] in {t for t, _, _ in PAYMENT}]
        # a loaded machine may answer late and a request go again: the copy is drawn as a duplicate
        retries = [a for a in drawn_arrows if a["verdict"] != "ok"]
        assert all(a["verdict"] == "duplicate" for a in retries), retries
        arrows = [a for a in drawn_arrows if a["verdict"] == "ok"]
        assert sorted((a["type"], a["src"], a["dst"]) for a in arrows) == sorted(PAYMENT), arrows
        kinds = [a["type"] for a in arrows]
        assert (
            kinds.index("c1.check")
            < kinds.index("c4.verdict")
            < kinds.index("pay.order")
            < kinds.index("pay.receipt")
            < kinds.index("c7.done")
        )
        for arrow in arrows:
            assert arrow["verdict"] == "ok" and arrow["label"] == f"{arrow['type']} · ok", arrow
            assert arrow["stroke"] != RED, arrow
        notes = await drawn(payment, NOTES_JS)
        steps = {n["step"] for n in notes}
        assert {"C1", "C2", "C3", "C4", "C5", "C6", "C7", "B3"} <= steps, notes
        assert not [n for n in notes if n["fill"] == RED], notes
        device = page.locator(f'section.device[data-device="{DEV1}"]')
        await expect(device.locator(f'ul.payments li[data-order="{order}"]')).to_have_attribute(
            "data-outcome", "confirmed"
        )
        await expect(device.locator(".verdict")).to_have_attribute("data-outcome", "trusted")
        await expect(page.locator('#ledger tr[data-total="paid"] td.num')).to_have_text(
            "2.50", timeout=WAIT_MS
        )
        await expect(page.locator('#ledger tr[data-account="shop-1"] td.num')).to_have_text("2.50")

        transit = e2e.dep.app_dir(DEV1, "transit")
        (transit / "code.py").write_bytes((transit / "code.py").read_bytes() + b"\n# skim 1%\n")
        started = await e2e.restart_trust_module(DEV1)
        assert started.outcome == "done"
        run = await e2e.pay(DEV1, "3.00", "shop-2", "transit")

        assert run.code == 1 and run.result["code"] == "unknown_app", (run.lines, run.stderr[-2000:])
        refused = flows(page, DEV1).filter(has=page.locator('g.msg[data-type="refusal"]'))
        await expect(refused.locator("figcaption")).to_contain_text("(ended)", timeout=WAIT_MS)
        arrows = await drawn(refused, ARROWS_JS)
        refusal = [a for a in arrows if a["type"] == "refusal"]
        assert [(a["src"], a["dst"], a["stroke"]) for a in refusal] == [("chip", "client", RED)], arrows
        asked = [a for a in arrows if a["type"] == "pay.start"]
        assert [(a["src"], a["dst"], a["stroke"]) for a in asked] == [("client", "chip", asked[0]["stroke"])]
        assert asked[0]["stroke"] != RED
        b3 = [n for n in await drawn(refused, NOTES_JS) if n["step"] == "B3"]
        assert [(n["outcome"], n["text"], n["fill"]) for n in b3] == [
            ("failed", "B3 failed: pay: refused", RED)
        ]
        # why: the trust module deleted the tampered app at its restart (A3), drawn in red in that flow
        deleted = flows(page, DEV1).locator('g.event[data-step="A3"]')
        await expect(deleted).to_have_attribute("data-outcome", "deleted", timeout=WAIT_MS)
        assert "app:transit" in (await deleted.text_content() or "")
        fill = await deleted.locator("text").evaluate("t => getComputedStyle(t).fill")
        assert fill == RED
        # the payment's flow is still on the page below the newer ones
        await expect(payment.locator('g.msg[data-type="pay.receipt"]')).to_have_count(1)


def observation(seq: int, src: str, dst: str, type_: str, session: str, **fields: Any) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "kind": "frame", "seq": seq, "at_ms": 1_800_000_000_000 + seq, "topic": f"t/{seq}",
        "device": "dev-0009", "src": src, "dst": dst, "type": type_, "sender": None, "recipient": None,
        "session": session, "message_id": f"m{seq}", "reply_to": "", "verdict": "ok", "reason": "",
        "size": 100, "sealed": False, "retained": False, "event": None, "status": None,
    }  # fmt: skip
    obs.update(fields)
    return obs


async def test_flows_are_split_per_payment_and_wire_text_is_never_markup(tmp_path: Path) -> None:
    """Synthetic observations straight into the server's feed, read back from Chromium's rendering."""
    feed = WebFeed()
    b4 = {"device": "dev-0009", "node": "dev-0009.client", "flow": "B", "step": "B4", "outcome": "ok",
          "reason": "closed", "order_id": "", "session": ""}  # fmt: skip
    for obs in [
        observation(1, "client", "chip", "pay.start", "aa"),
        observation(2, TS, PS, "trust.grant", "aa", device=None),  # the platform's link names no device
        observation(3, "client", "chip", "pay.start", "bb"),  # a second payment in the same client run
        observation(4, "chip", "client", "pay.result", "aa", reply_to="m1"),  # the first one's late answer
        observation(5, "chip", "client", "pay.result", "bb", reply_to="m3"),
        observation(6, "client", "ev", "event", "", event=b4),
        # a forged frame: its claimed type and the reason quoting it are anyone's text
        observation(7, "chip", "client", '<img src=x onerror="window.pwned=1">', "", verdict="bad_signature",
                    reason="<b>signature does not verify</b>"),
    ]:  # fmt: skip
        feed.publish(obs)
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(feed, tmp_path / "no-ledger.sqlite", 0, ready.set_result))
    try:
        async with browser_page(await asyncio.wait_for(ready, WAIT_S)) as page:
            all_flows = flows(page, "dev-0009")
            await expect(all_flows).to_have_count(3, timeout=WAIT_MS)
            by_flow = {}
            for n in (1, 2, 3):
                arrows = await drawn(all_flows.and_(page.locator(f'[data-flow="{n}"]')), ARROWS_JS)
                by_flow[n] = [(a["type"], a["src"], a["dst"]) for a in arrows]
            assert by_flow[1] == [
                ("pay.start", "client", "chip"),
                ("trust.grant", TS, PS),
                ("pay.result", "chip", "client"),
            ]
            assert by_flow[2] == [("pay.start", "client", "chip"), ("pay.result", "chip", "client")]
            forged = await drawn(all_flows.and_(page.locator('[data-flow="3"]')), ARROWS_JS)
            assert [(a["label"], a["stroke"]) for a in forged] == [
                (
                    '<img src=x onerror="window.pwned=1"> · bad_signature: <b>signature does not verify</b>',
                    RED,
                )
            ]
            assert await page.locator("#devices img, #devices b, #rejects b").count() == 0
            assert await page.evaluate("window.pwned") is None
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
