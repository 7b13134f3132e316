"""``trustpay monitor``: every frame on every link, checked by the monitor itself, shown live.

It connects with the read-only ``monitor`` login, subscribes to the whole
tree and checks each frame with the deployment's public certificates
(:mod:`ops.monitor.model`). One reader task takes frames off the connection
into a bounded queue; when the queue is full a frame is dropped and counted,
never waited for, so a monitor that falls behind never slows the nodes (the
broker keeps delivering to them whatever we do). ``--replay`` shows a
``--record`` file again, offline, with the same verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from nodes.assemble import broker_address
from nodes.bus import BrokerAddress
from nodes.deployment import Deployment
from ops.monitor import recording, web
from ops.monitor.model import Monitor
from ops.monitor.recording import Arrival, Drop, Recorder
from ops.monitor.view import DisplayFilter, JsonLines, LiveView, Output, PlainLines, all_of
from ops.watch import monitor_client, public_anchors
from protocol.errors import TransportError
from protocol.topics import PREFIX

from .cli_common import add_deploy_argument, add_examples, add_json_argument
from .prometheus import CountersCollector, Exporter, MetricsCollector, serve

HELP = "every frame on every link, checked by the monitor itself: live view, JSON, record and replay"
QUEUE = 10_000  # frames waiting to be checked before the reader starts dropping
RECORD_BATCH = 256
CONNECT_ATTEMPTS = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_examples(
        parser,
        "trustpay monitor --deploy ./deploy",
        "trustpay monitor --device dev-0001 --link chip->ps --json --record run.jsonl",
        "trustpay monitor --replay run.jsonl --json",
        "trustpay monitor --web --port 8470      # a live page on http://127.0.0.1:8470/",
    )
    add_deploy_argument(parser)
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    parser.add_argument("--device", action="append", metavar="ID", help="show only this device (repeatable)")
    parser.add_argument("--link", action="append", metavar="NAME", help="show only this link, e.g. chip->tm")
    parser.add_argument("--type", action="append", metavar="T", help="show only this message type")
    add_json_argument(parser, "one JSON object per frame, then the summary")
    parser.add_argument("--record", type=Path, metavar="FILE", help="keep every raw frame in FILE")
    parser.add_argument("--replay", type=Path, metavar="FILE", help="show a recording again, offline")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: at Ctrl-C)")
    parser.add_argument("--queue", type=int, default=QUEUE, help=f"frames kept waiting (default {QUEUE})")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics on 127.0.0.1:P: every node's counters as published, and the monitor's",
    )
    web.add_arguments(parser)


def needs_deploy(args: argparse.Namespace) -> bool:
    """A recording carries its own trust anchors: replaying one needs no deployment."""
    return args.replay is None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _output(args: argparse.Namespace, model: Monitor) -> Output:
    only = DisplayFilter(all_of(args.device), all_of(args.link), all_of(args.type))
    if args.json:
        return JsonLines(sys.stdout, only)
    if sys.stdout.isatty():
        return LiveView(model, only)
    return PlainLines(sys.stdout, only)


def run(args: argparse.Namespace) -> int:
    try:
        if args.replay is not None:
            return replay(args)
        asyncio.run(web.run(args, live) if args.web else live(args))
    except BrokenPipeError:  # `trustpay monitor ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def replay(args: argparse.Namespace) -> int:
    header, records = recording.read(args.replay)
    model = Monitor(header.anchors, header.started_ms)
    out = _output(args, model)
    for record in records:
        if isinstance(record, Drop):
            out.show(model.note_dropped(record.count))
        else:
            out.show(model.observe(record.topic, record.frame, record.at_ms, record.retained))
    out.finish(model.summary())
    return 0


class Reader:
    """Takes frames off the connection into a bounded queue; a full queue drops and counts."""

    def __init__(self, address: BrokerAddress, size: int) -> None:
        self.address = address
        self.queue: asyncio.Queue[Arrival | None] = asyncio.Queue(maxsize=size)
        self.dropped = 0
        self.failure: TransportError | None = None
        self.subscribed = False
        self.error = ""  # the last connection error

    async def run(self) -> None:
        """Read until cancelled; if the broker stays unreachable, note why and return."""
        a = self.address
        versions = ("5", "3.1.1") if a.mqtt_version == "auto" else (a.mqtt_version,)
        for attempt in range(CONNECT_ATTEMPTS):  # bounded: rides over a broker restart, then gives up
            try:
                async with monitor_client(a, versions[attempt % len(versions)], "monitor") as client:
                    await client.subscribe(f"{PREFIX}/#", qos=1)
                    self.subscribed = True
                    async for message in client.messages:
                        payload = message.payload
                        frame = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
                        self.offer(Arrival(now_ms(), str(message.topic), bool(message.retain), frame))
            except aiomqtt.MqttError as exc:
                if not self.error:  # say so once; the view shows nothing until the connection stands
                    print(f"trustpay monitor: {a.host}:{a.port}: {exc}; retrying", file=sys.stderr)
                self.error = str(exc)
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # reconnect backoff
        self.failure = TransportError(
            f"the monitor cannot reach the broker at {a.host}:{a.port}: {self.error}"
        )

    def offer(self, arrival: Arrival) -> None:
        """Queue ``arrival`` without ever waiting: if the checker is behind, drop it and count it."""
        try:
            self.queue.put_nowait(arrival)
        except asyncio.QueueFull:
            self.dropped += 1


async def check_frames(reader: Reader, model: Monitor, out: Output, recorder: Recorder | None) -> None:
    """Check and show each queued frame until the reader's end mark (None)."""
    reported = 0
    batch: list[str] = []
    while True:  # ends at the end mark the run puts on the queue
        try:
            async with asyncio.timeout(1.0):  # redraw now and then even when nothing arrives
                arrival = await reader.queue.get()
        except TimeoutError:
            out.tick()
            continue
        if reader.dropped > reported:
            drop = Drop(now_ms(), reader.dropped - reported)
            reported = reader.dropped
            out.show(model.note_dropped(drop.count))
            batch.append(recording.record_line(drop))
        if arrival is not None:
            out.show(model.observe(arrival.topic, arrival.frame, arrival.at_ms, arrival.retained))
            batch.append(recording.record_line(arrival))
        if recorder is not None and (arrival is None or reader.queue.empty() or len(batch) >= RECORD_BATCH):
            lines, batch = batch, []  # the write yields to the loop: frames arriving meanwhile go to the next
            await asyncio.to_thread(recorder.write, lines)
        elif recorder is None:
            batch.clear()
        if arrival is None:
            return
        await asyncio.sleep(0)  # let the reader run: a backlog then shows up as counted drops here


async def serve_metrics(model: Monitor, port: int) -> Exporter:
    """Prometheus on 127.0.0.1: the nodes' signed counters as the monitor received them, and its own.

    The exporter's thread reads the model: each source takes a copy in one C-level call
    (``dict``/``list`` of a dict), which the GIL keeps whole while the loop goes on writing.
    """
    return await serve(
        port,
        MetricsCollector(lambda: list(model.node_metrics.values())),
        CountersCollector(
            "trustpay_monitor_rejected",
            "frames the monitor refused, by reason",
            lambda: dict(model.rejects),
            "code",
        ),
        CountersCollector(
            "trustpay_monitor_frames",
            "frames the monitor checked, and those it dropped when it fell behind",
            lambda: {"checked": model.seq, "dropped": model.dropped},
        ),
    )


async def live(args: argparse.Namespace, make_output: Callable[[Monitor], Output] | None = None) -> None:
    """Check every frame until SIGINT, SIGTERM or ``args.seconds``; ``make_output`` shows them."""
    dep = Deployment(args.deploy)
    anchors = await asyncio.to_thread(public_anchors, dep)
    address = await asyncio.to_thread(broker_address, dep, "monitor", args.broker)
    started = now_ms()
    model = Monitor(anchors, started)
    recorder = None
    if args.record is not None:
        recorder = await asyncio.to_thread(Recorder, args.record, recording.Header(started, anchors))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reader = Reader(address, args.queue)
    out = make_output(model) if make_output is not None else _output(args, model)
    exporter = await serve_metrics(model, args.metrics_port) if args.metrics_port is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            reading = tg.create_task(reader.run(), name="monitor:read")
            checking = tg.create_task(check_frames(reader, model, out, recorder), name="monitor:check")
            stopped = tg.create_task(stop.wait(), name="monitor:stop")
            await asyncio.wait({reading, stopped}, timeout=args.seconds, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            for _ in range(10):  # a cancel can be swallowed inside the MQTT client's read: ask again
                reading.cancel()
                await asyncio.wait({reading}, timeout=0.5)
                if reading.done():
                    break
            await reader.queue.put(None)  # the checker finishes what was read, then stops
            await checking
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if exporter is not None:
            await exporter.close()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
        out.finish(model.summary())
    if reader.failure is not None:
        raise reader.failure
    if not reader.subscribed:
        a = reader.address
        raise TransportError(f"the monitor never reached the broker at {a.host}:{a.port}: {reader.error}")
