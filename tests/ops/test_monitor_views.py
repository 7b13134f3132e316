"""The monitor's bounded queue and its outputs, without a broker (the e2e test has the real connection)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from nodes.bus import BrokerAddress
from ops.cli import main
from ops.monitor import recording
from ops.monitor.view import DisplayFilter, JsonLines, LiveView, PlainLines, describe
from ops.monitor_cmd import Reader, check_frames
from ops.provision import provision
from protocol.messages import StepEvent
from protocol.topics import CHANNEL_EVENTS, Role, channel_topic

from ..protocol.factory import SESSION, envelope, sign
from .test_monitor_model import ANCHORS, C7_TOPIC, NOW_MS, PKI, c7_done, event, monitor

NOWHERE = BrokerAddress("127.0.0.1", 9, "monitor", "unused", "5", None)


async def test_a_full_queue_drops_frames_without_waiting_counts_them_and_shows_the_count(
    tmp_path: Path,
) -> None:
    reader = Reader(NOWHERE, size=3)
    for i in range(5):
        reader.offer(recording.Arrival(NOW_MS + i, C7_TOPIC, False, c7_done()))  # never awaits
    assert (reader.queue.qsize(), reader.dropped) == (3, 2)
    out = io.StringIO()
    path = tmp_path / "run.jsonl"
    recorder = recording.Recorder(path, recording.Header(NOW_MS, ANCHORS))
    model = monitor()

    checking = asyncio.create_task(check_frames(reader, model, JsonLines(out, DisplayFilter()), recorder))
    await reader.queue.put(None)
    async with asyncio.timeout(10):
        await checking
    recorder.close()

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {"kind": "dropped", "count": 2}
    assert [line["verdict"] for line in lines[1:]] == ["ok", "ok", "ok"]
    assert model.summary()["dropped"] == 2
    _, records = recording.read(path)
    assert [type(r).__name__ for r in records] == ["Drop", "Arrival", "Arrival", "Arrival"]
    assert isinstance(records[0], recording.Drop) and records[0].count == 2


def test_filters_apply_to_display_only() -> None:
    model = monitor()
    topic, frame = event("C4", "trusted")
    shown = [model.observe(C7_TOPIC, c7_done(), NOW_MS), model.observe(topic, frame, NOW_MS + 1)]
    out = io.StringIO()
    lines = PlainLines(out, DisplayFilter(types=frozenset({"event"}), links=frozenset({"tm->ev"})))
    for obs in shown:
        lines.show(obs)
    assert out.getvalue() == describe(shown[1]) + "\n"
    assert "C4 trusted: C4 reason order=o-1" in out.getvalue()
    assert model.seq == 2 and sum(model.links.values()) == 2  # both were checked and counted
    assert not DisplayFilter(devices=frozenset({"d2"})).shows(shown[1])
    assert DisplayFilter(links=frozenset({"trust-module->ev"})).shows(shown[1])


def test_the_live_view_draws_devices_servers_rejects_and_the_latest_frames() -> None:
    model = monitor()
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = LiveView(model, DisplayFilter(), console)
    topic, frame = event("C4", "refused")
    view.show(model.observe(topic, frame, NOW_MS))
    view.show(model.observe(C7_TOPIC, b"\x93" * 80, NOW_MS + 1))
    view.show(model.note_dropped(4))
    view.finish(model.summary())
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    for text in (
        "d1",
        "C4 refused",
        "trust-server",
        "malformed",
        "dropped",
        "4 frames",
        "rejected frames by reason",
    ):
        assert text in drawn, text


def test_a_device_filter_keeps_a_platform_nodes_step_events_about_that_device() -> None:
    ts = PKI.node(Role.TRUST_SERVER)
    topic = channel_topic(Role.TRUST_SERVER, CHANNEL_EVENTS)
    body = StepEvent("d1", ts.name, "C", "C3", "ok", "appraised", SESSION, "")
    obs = monitor().observe(topic, sign(envelope(ts, "*", "event", body), topic, ts), NOW_MS)
    assert obs.verdict == "ok" and obs.device is None
    assert DisplayFilter(devices=frozenset({"d1"})).shows(obs)
    assert not DisplayFilter(devices=frozenset({"d2"})).shows(obs)


def test_a_monitor_that_never_reaches_the_broker_says_so_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(tmp_path / "d", 1, backend="amqtt")  # its broker port is free: nothing listens there

    code = main(["monitor", "--seconds", "0.5", "--json", "--deploy", str(tmp_path / "d")])

    out, err = capsys.readouterr()
    assert code == 1
    assert "never reached the broker" in err and "Connection refused" in err
    assert json.loads(out)["frames"] == 0  # the summary still comes
