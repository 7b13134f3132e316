"""Make ``docs/monitor-web.png``: the web monitor's page after a refusal and a payment.

``python -m ops.monitor.screenshot [OUT.png]`` provisions a throw-away
deployment, starts it, runs ``trustpay monitor --web`` as a person would, has
dev-0001 refused with a tampered app and then pay, and photographs the page
in Debian's headless ``chromium`` (Playwright, from the ``test`` extra). Not
part of the command line: a tool for the README's picture.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright, expect

from nodes.deployment import Deployment
from ops.launcher import Launcher
from ops.provision import provision
from ops.scenario import Scenario
from ops.watch import EventWatcher

OUT = Path("docs/monitor-web.png")
DEVICE = "dev-0001"
CHROMIUM = "/usr/bin/chromium"  # Debian's, which ./ops/test installs: never `playwright install`
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000


async def shoot(root: Path, out: Path) -> None:
    backend = "mosquitto" if shutil.which("mosquitto") else "amqtt"
    await asyncio.to_thread(provision, root, 2, backend=backend)
    dep = Deployment(root)
    async with (
        Launcher(dep, backend=backend, log_level="warning") as launcher,
        EventWatcher(dep, launcher.broker_url) as watcher,
    ):
        await launcher.wait_all_up()
        scenario = Scenario(dep, launcher, watcher)
        for device in ("dev-0001", "dev-0002"):
            await scenario.wait_started(device)
        monitor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "monitor", "--deploy", str(root),
            "--broker", launcher.broker_url, "--web", "--port", "0",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert monitor.stdout is not None
        try:
            url = (await monitor.stdout.readline()).decode().split(": ", 1)[1].strip()
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = await browser.new_page(viewport={"width": 1400, "height": 1250})
                await page.goto(url)
                await expect(page.locator("#nodes li").first).to_be_visible(timeout=WAIT_MS)
                await scenario.client("dev-0002", "pay", "4.20", "shop-2")
                transit = dep.app_dir(DEVICE, "transit")
                (transit / "code.py").write_bytes((transit / "code.py").read_bytes() + b"\n# skim\n")
                await scenario.restart_trust_module(DEVICE)
                await scenario.client(DEVICE, "pay", "3.00", "shop-2", "transit")
                paid = await scenario.client(DEVICE, "pay", "12.50", "shop-1")
                flow = page.locator("figure.flow", has_text=f"order {paid.result['order_id']}")
                await expect(flow.locator("figcaption")).to_contain_text("(ended)", timeout=WAIT_MS)
                await expect(page.locator('#ledger tr[data-total="paid"] td.num')).to_have_text(
                    "16.70", timeout=WAIT_MS
                )
                await page.screenshot(path=str(out))
                await browser.close()
        finally:
            monitor.terminate()
            await monitor.wait()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(shoot(Path(tmp) / "deploy", out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
