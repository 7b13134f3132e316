"""The web monitor's server on a real socket: loopback only, read-only, history then live, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nodes.deployment import Deployment
from nodes.ledger import PaymentRecord, ledger_at
from ops.monitor.model import Json
from ops.monitor.web import CLIENT_QUEUE, WebFeed, WebOutput, check_host, serve
from ops.provision import provision
from protocol.errors import ConfigError

WAIT_S = 10.0


def frame(seq: int, type_: str = "pay.start") -> dict[str, Any]:
    return {"kind": "frame", "seq": seq, "type": type_, "verdict": "ok", "device": "dev-0001"}


@contextlib.asynccontextmanager
async def serving(feed: WebFeed, ledger_db: Path) -> AsyncIterator[str]:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(feed, ledger_db, 0, ready.set_result))
    try:
        async with asyncio.timeout(WAIT_S):
            yield await ready
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_data(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next server-sent event's data (each is one ``data:`` line and a blank line)."""
    async with asyncio.timeout(WAIT_S):
        while True:  # bounded by the timeout; skips the blank separator lines
            line = (await response.content.readline()).decode()
            if line.startswith("data: "):
                return dict(json.loads(line[len("data: ") :]))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "192.168.1.10", "localhost", ""])
def test_only_127_0_0_1_is_served(host: str) -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 only"):
        check_host(host)
    assert check_host("127.0.0.1") == "127.0.0.1"


async def test_serve_refuses_another_host_before_listening(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 only"):
        await serve(WebFeed(), tmp_path / "ledger.sqlite", 0, print, host="0.0.0.0")


async def test_page_is_served_and_nothing_can_be_written(tmp_path: Path) -> None:
    async with serving(WebFeed(), tmp_path / "none.sqlite") as url, aiohttp.ClientSession() as http:
        assert url.startswith("http://127.0.0.1:")
        async with http.get(url) as page:
            assert page.status == 200 and page.content_type == "text/html"
            assert '<script src="/app.js"' in await page.text()
        async with http.get(url + "app.js") as script:
            assert script.status == 200 and "EventSource" in await script.text()
        async with http.post(url + "events", data=b"x") as post:
            assert post.status == 405
        async with http.get(url + "../web.py") as escape:
            assert escape.status == 404


async def test_a_request_for_another_host_name_is_refused(tmp_path: Path) -> None:
    # DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example
    async with serving(WebFeed(), tmp_path / "none.sqlite") as url, aiohttp.ClientSession() as http:
        port = url.rsplit(":", 1)[1].rstrip("/")
        async with http.get(url, headers={"Host": f"evil.example:{port}"}) as rebound:
            assert rebound.status == 421
            assert "answers only to 127.0.0.1" in await rebound.text()
        async with http.get(url + "events", headers={"Host": f"localhost:{port}"}) as local:
            assert local.status == 200


async def test_a_page_gets_the_history_then_live_observations_and_the_ledger(tmp_path: Path) -> None:
    feed = WebFeed(history=3)
    for seq in range(5):
        feed.publish(frame(seq))
    async with (
        serving(feed, tmp_path / "none.sqlite") as url,
        aiohttp.ClientSession() as http,
        http.get(url + "events") as stream,
    ):
        assert stream.headers["Content-Type"] == "text/event-stream"
        history = [await next_data(stream) for _ in range(3)]
        # the ring keeps the last three; then the ledger, which does not exist yet: shown, not fatal
        assert [o["seq"] for o in history] == [2, 3, 4]
        ledger = await next_data(stream)
        assert ledger["kind"] == "ledger" and "payment-server" in ledger["error"]
        feed.publish({"kind": "dropped", "count": 7})
        assert await next_data(stream) == {"kind": "dropped", "count": 7}


async def test_a_browser_that_falls_behind_is_cut_off_and_publishing_never_waits() -> None:
    feed = WebFeed()

    async def stalled_page() -> None:
        feed.join()  # joins, then never reads its queue
        await asyncio.Future()

    page = asyncio.create_task(stalled_page())
    await asyncio.sleep(0)  # let it join (one turn of the loop, not a wait for time)
    assert len(feed.browsers) == 1
    for seq in range(CLIENT_QUEUE + 1):  # without the cut-off, the last put raises QueueFull here
        feed.publish(frame(seq))
    assert feed.browsers == set() and feed.cut_off == 1
    with pytest.raises(asyncio.CancelledError):
        await page
    feed.publish(frame(CLIENT_QUEUE + 1))  # nobody left to send to: still fine
    assert len(feed.history) == CLIENT_QUEUE + 2


async def test_ledger_totals_come_from_the_real_ledger(tmp_path: Path) -> None:
    await asyncio.to_thread(provision, tmp_path / "deploy", 1, broker_port=1, backend="amqtt")
    dep = Deployment(tmp_path / "deploy")
    ledger = ledger_at(dep.ledger_db)
    await ledger.open()
    try:
        await ledger.seed(dep.load_manifest())
        async with ledger.transaction() as tx:
            await tx.debit("dev-0001:wallet", 1_250)
            await tx.credit("shop-1", 1_250)
            paid = PaymentRecord(
                "o-1", "dev-0001", "wallet", "dev-0001:wallet", "shop-1", 1_250, "EUR", 1, "confirmed", "", 1
            )
            await tx.insert_payment(paid, b"h", b"order", b"receipt")
        feed = WebFeed()
        async with (
            serving(feed, dep.ledger_db) as url,
            aiohttp.ClientSession() as http,
            http.get(url + "events") as stream,
        ):
            summary = await next_data(stream)
    finally:
        await ledger.close()
    assert summary["kind"] == "ledger" and summary["currency"] == "EUR"
    assert summary["merchants"] == 1_250 and summary["paid"] == 1_250
    assert summary["confirmed"] == summary["payments"] == 1
    assert summary["total"] == summary["payers"] + summary["merchants"] == 200_000
    balances = {a["account"]: a["balance"] for a in summary["accounts"]}
    assert balances["dev-0001:wallet"] == 100_000 - 1_250


class _Quiet:
    def show(self, item: object) -> None: ...

    def tick(self) -> None: ...

    def finish(self, summary: Json) -> None: ...


class _Item:
    def __init__(self, obs: Json) -> None:
        self.obs = obs

    def to_json(self) -> Json:
        return self.obs


def test_a_frame_of_batched_step_events_reaches_the_page_as_one_observation_per_event() -> None:
    # the page draws one note per observation, in its event's session: a batch drawn as its
    # last event alone lost the others (an A3 refusal batched behind A2 never showed)
    feed = WebFeed()
    a2 = {"step": "A2", "session": "s1", "outcome": "done"}
    a3 = {"step": "A3", "session": "s2", "outcome": "refused"}
    out = WebOutput(feed, _Quiet())
    out.show(_Item({"type": "events", "event": a3, "events": [a2, a3], "size": 900}))
    out.show(_Item({"type": "event", "event": a2, "events": [], "size": 400}))
    shown = [(o["type"], o["event"]["step"], o["size"]) for o in map(json.loads, feed.history)]
    assert shown == [("events", "A2", 900), ("events", "A3", 900), ("event", "A2", 400)]
