"""``trustpay monitor --web``: the monitor's observations as a live page in a browser.

One static page (``static/``: HTML, plain JS drawing SVG, CSS; no build step)
and one stream of server-sent events (``/events``). The monitor hands every
observation (a JSON-able dict: a checked frame, or a count of dropped frames) to
:meth:`WebFeed.publish`; the page builds the sequence diagrams itself, so the
server stays a small fan-out with no state of its own but a bounded history.

Bounded everywhere, so a browser never slows the monitor: the history is a ring,
``publish`` never waits, and each browser has a queue of its own; a browser that
lets its queue fill is cut off (its ``EventSource`` reconnects and starts again
from the history). The ledger totals come from the ledger database, opened
read-only at an interval in aiosqlite's own thread, off the event loop.

It listens on 127.0.0.1 only and answers only requests addressed to it by that
name (``Host`` header), so a web page elsewhere cannot read it through DNS
rebinding. It only ever answers GET: nothing in the page changes the system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from nodes.deployment import Deployment
from nodes.ledger import LedgerError, Snapshot, read_snapshot
from nodes.sql import DbUrl
from ops.monitor.model import Dropped, Json, Monitor, Observation
from ops.monitor.view import DisplayFilter, JsonLines, Output, PlainLines, all_of
from protocol.errors import ConfigError

HOST = "127.0.0.1"
PORT = 8470
HISTORY = 4000  # observations a newly opened page starts from (about a hundred payments' frames)
CLIENT_QUEUE = 1000  # observations one browser may fall behind before it is cut off
LEDGER_EVERY_S = 1.0
STATIC = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def check_host(host: str) -> str:
    """Only the loopback address 127.0.0.1: the page shows the deployment's traffic to whoever reaches it."""
    try:
        ok = ipaddress.ip_address(host) == ipaddress.ip_address(HOST)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"the web monitor serves on {HOST} only, not on {host!r}")
    return host


@dataclass(eq=False)  # each browser is itself (kept in a set)
class _Browser:
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    task: asyncio.Task[Any] | None = None


class WebFeed:
    """Fan-out of observations to every open page: never blocks, never grows without bound."""

    def __init__(self, history: int = HISTORY) -> None:
        self.history: deque[str] = deque(maxlen=history)
        self.ledger: str | None = None  # the last ledger summary, sent first to each new page
        self.browsers: set[_Browser] = set()
        self.cut_off = 0  # browsers dropped for falling behind

    def publish(self, observation: Mapping[str, Any]) -> None:
        data = json.dumps(observation, separators=(",", ":"))
        self.history.append(data)
        self._send(data)

    def publish_ledger(self, summary: Mapping[str, Any]) -> None:
        data = json.dumps({"kind": "ledger", **summary}, separators=(",", ":"))
        if data != self.ledger:
            self.ledger = data
            self._send(data)

    def _send(self, data: str) -> None:
        for browser in list(self.browsers):
            try:
                browser.queue.put_nowait(data)
            except asyncio.QueueFull:  # too slow: cut it off rather than wait for it or buffer more
                self.browsers.discard(browser)
                self.cut_off += 1
                if browser.task is not None:
                    browser.task.cancel()

    def join(self) -> tuple[_Browser, list[str]]:
        """A new page's queue and what it starts from; no await in between, so nothing falls in the gap."""
        browser = _Browser(task=asyncio.current_task())
        self.browsers.add(browser)
        start = list(self.history)
        if self.ledger is not None:
            start.append(self.ledger)
        return browser, start

    def leave(self, browser: _Browser) -> None:
        self.browsers.discard(browser)


def ledger_summary(snapshot: Snapshot) -> dict[str, Any]:
    """Totals in integer minor units, and each account's balance (the page formats them)."""
    confirmed = [p for p in snapshot.payments if p.status == "confirmed"]
    return {
        "accounts": [{"account": a.account, "kind": a.kind, "balance": a.balance} for a in snapshot.accounts],
        "currency": snapshot.accounts[0].currency if snapshot.accounts else "",
        "payers": sum(a.balance for a in snapshot.accounts if a.kind != "merchant"),
        "merchants": sum(a.balance for a in snapshot.accounts if a.kind == "merchant"),
        "total": sum(a.balance for a in snapshot.accounts),
        "payments": len(snapshot.payments),
        "confirmed": len(confirmed),
        "paid": sum(p.amount for p in confirmed),
    }


async def follow_ledger(feed: WebFeed, path: Path | DbUrl, every_s: float = LEDGER_EVERY_S) -> None:
    """Read the ledger read-only at an interval; an unreadable ledger is shown, not fatal."""
    while True:  # until cancelled with the server
        try:
            feed.publish_ledger(ledger_summary(await read_snapshot(path)))
        except LedgerError as exc:
            feed.publish_ledger({"error": exc.reason})
        await asyncio.sleep(every_s)


def _app(feed: WebFeed, pages: Mapping[str, tuple[bytes, str]], port: int) -> web.Application:
    @web.middleware
    async def only_addressed_to_us(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.host not in (f"{HOST}:{port}", f"localhost:{port}"):
            raise web.HTTPMisdirectedRequest(text=f"this monitor answers only to {HOST}:{port}\n")
        return await handler(request)

    async def page(request: web.Request) -> web.Response:
        body, content_type = pages[request.path]
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        browser, start = feed.join()
        try:
            await response.prepare(request)
            for data in start:
                await response.write(f"data: {data}\n\n".encode())
            while True:  # until the page goes away or falls behind (then this task is cancelled)
                data = await browser.queue.get()
                await response.write(f"data: {data}\n\n".encode())
        finally:
            feed.leave(browser)

    app = web.Application(middlewares=[only_addressed_to_us])
    for path in pages:
        app.router.add_get(path, page)
    app.router.add_get("/events", events)
    return app


def _read_pages() -> dict[str, tuple[bytes, str]]:
    return {
        path: ((STATIC / name).read_bytes(), CONTENT_TYPES[Path(name).suffix]) for path, name in PAGES.items()
    }


async def serve(
    feed: WebFeed,
    ledger_db: Path | DbUrl,
    port: int,
    on_ready: Callable[[str], None],
    host: str = HOST,
) -> None:
    """Serve the page until cancelled; ``on_ready`` gets its URL once it listens (port 0: any free one)."""
    check_host(host)
    pages = await asyncio.to_thread(_read_pages)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"the web monitor cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound = listener.getsockname()[1]
    runner = web.AppRunner(
        _app(feed, pages, bound), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.SockSite(runner, listener).start()
        on_ready(f"http://{host}:{bound}/")
        ledger = asyncio.create_task(follow_ledger(feed, ledger_db), name="web-ledger")
        try:
            await asyncio.Future()  # run until cancelled
        finally:
            ledger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ledger
    finally:
        await runner.cleanup()


def _one_event_each(obs: Json) -> list[Json]:
    """A frame carrying a batch of step events, as one observation per event.

    The page draws one note per observation, in the flow of that event's session;
    a batch (``events``) may hold steps of several sessions, each drawn where it belongs.
    """
    events = obs.get("events") or []
    if len(events) < 2:
        return [obs]
    return [{**obs, "event": event, "events": [event]} for event in events]


class WebOutput:
    """The monitor command's output with ``--web``: every observation goes to the pages.

    The terminal gets only the page's address and, at the end, the summary
    (``then``, a line or JSON output used for nothing else): a pipe nobody
    reads must not fill up and stall the monitor.
    """

    def __init__(self, feed: WebFeed, then: Output) -> None:
        self.feed, self.then = feed, then

    def show(self, item: Observation | Dropped) -> None:
        for one in _one_event_each(item.to_json()):
            self.feed.publish(one)

    def tick(self) -> None:
        pass

    def finish(self, summary: Json) -> None:
        self.then.finish(summary)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--web`` and ``--port`` for ``trustpay monitor``."""
    parser.add_argument("--web", action="store_true", help=f"serve a live page on {HOST} instead of the view")
    parser.add_argument(
        "--port", type=int, default=PORT, help=f"the page's port with --web (default {PORT}; 0: any free one)"
    )


def announce(url: str) -> None:
    print(f"web monitor: {url}", flush=True)  # the address a person opens (and a test reads)


@contextlib.asynccontextmanager
async def serving(ledger_db: Path | DbUrl, port: int) -> AsyncIterator[WebFeed]:
    """Serve the page while the block runs; the block publishes to the feed it gets."""
    feed = WebFeed()
    ready = asyncio.Event()

    def on_ready(url: str) -> None:
        announce(url)
        ready.set()

    server = asyncio.create_task(serve(feed, ledger_db, port, on_ready), name="monitor:web")
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()  # it could not listen: say why
        yield feed
    finally:
        waiter.cancel()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


LiveRun = Callable[[argparse.Namespace, Callable[[Monitor], Output]], Awaitable[None]]


async def run(args: argparse.Namespace, live: LiveRun) -> None:
    """``trustpay monitor --web``: the monitor's ``live`` run, shown on the page instead of the terminal."""
    ledger_db = Deployment(args.deploy).database("ledger")  # a SQLite file or PostgreSQL, as provisioned
    only = DisplayFilter(all_of(args.device), all_of(args.link), all_of(args.type))
    summary = JsonLines(sys.stdout, only) if args.json else PlainLines(sys.stdout, only)
    async with serving(ledger_db, args.port) as feed:
        await live(args, lambda _model: WebOutput(feed, summary))
