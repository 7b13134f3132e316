"""How the monitor shows what it sees: JSON lines, plain lines, or a rich view redrawn in place.

Every output takes the same three calls: ``show`` per observation (filtered
for display only; every frame was checked), ``tick`` now and then so a live
view can redraw, and ``finish`` with the run's summary.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .model import OK, Dropped, Json, Monitor, Observation

RECENT = 14  # frames listed under the live tables
REDRAW_S = 0.25


@dataclass(frozen=True)
class DisplayFilter:
    """Which observations to show; empty sets show everything."""

    devices: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    def shows(self, obs: Observation) -> bool:
        # a platform node's step event is about a device too (the topic names none)
        device = obs.device or (obs.event or {}).get("device")
        if self.devices and device not in self.devices:
            return False
        if self.links and obs.link not in self.links and f"{obs.src}->{obs.dst}" not in self.links:
            return False
        return not self.types or obs.type in self.types


class Output(Protocol):
    def show(self, item: Observation | Dropped) -> None: ...
    def tick(self) -> None: ...
    def finish(self, summary: Json) -> None: ...


class JsonLines:
    """One JSON object per observation, then the summary as the last line."""

    def __init__(self, out: TextIO, only: DisplayFilter) -> None:
        self.out, self.only = out, only

    def show(self, item: Observation | Dropped) -> None:
        if isinstance(item, Dropped) or self.only.shows(item):
            self.out.write(json.dumps(item.to_json(), sort_keys=True) + "\n")
            self.out.flush()

    def tick(self) -> None:
        pass

    def finish(self, summary: Json) -> None:
        self.out.write(json.dumps(summary, sort_keys=True) + "\n")
        self.out.flush()


def describe(obs: Observation) -> str:
    """One line for a person: verdict, link, type, who, and what the step or status says."""
    what = obs.reason if obs.verdict != OK else ""
    if obs.event is not None:
        what = "; ".join(_step_text(e) for e in obs.events or (obs.event,))
    elif obs.status is not None:
        what = f"{obs.status['node']} {obs.status['state']}"
    where = obs.device or "platform"
    return (
        f"#{obs.seq:<6} {obs.verdict:<13} {where:<10} {obs.link:<14} {obs.type or '?':<14} "
        f"{obs.sender or '?':<18} {what}"
    ).rstrip()


def _step_text(e: Json) -> str:
    order = f" order={e['order_id']}" if e["order_id"] else ""
    return f"{e['step']} {e['outcome']}: {e['reason']}{order}"


def summary_lines(summary: Json) -> list[str]:
    out = [f"frames {summary['frames']}, dropped {summary['dropped']}", "messages per link and type:"]
    for link, types in summary["links"].items():
        out += [f"  {link:<14} {msg_type:<16} {count}" for msg_type, count in types.items()]
    out.append("rejected frames by reason:" if summary["rejects"] else "rejected frames: none")
    out += [f"  {reason:<16} {count}" for reason, count in summary["rejects"].items()]
    if summary["latency_ms"]:
        out.append("step latencies (ms since the session's previous step):")
        out += [
            f"  {step:<4} p50 {lat['p50_ms']:>6}  p99 {lat['p99_ms']:>6}  n={lat['n']}"
            for step, lat in summary["latency_ms"].items()
        ]
    return out


class PlainLines:
    """One line per observation, for a pipe or a log file."""

    def __init__(self, out: TextIO, only: DisplayFilter) -> None:
        self.out, self.only = out, only

    def show(self, item: Observation | Dropped) -> None:
        if isinstance(item, Dropped):
            self.out.write(f"dropped {item.count} frames: the monitor fell behind\n")
        elif self.only.shows(item):
            self.out.write(describe(item) + "\n")
        self.out.flush()

    def tick(self) -> None:
        pass

    def finish(self, summary: Json) -> None:
        self.out.write("\n".join(summary_lines(summary)) + "\n")
        self.out.flush()


class LiveView:
    """Tables of devices, servers and rejects, and the latest frames, redrawn in place."""

    def __init__(self, model: Monitor, only: DisplayFilter, console: Console | None = None) -> None:
        self.model, self.only = model, only
        self.console = console or Console()
        self.recent: deque[Observation | Dropped] = deque(maxlen=RECENT)
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._drawn = 0.0
        self._live.start()

    def show(self, item: Observation | Dropped) -> None:
        if isinstance(item, Dropped) or self.only.shows(item):
            self.recent.append(item)
        self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._drawn >= REDRAW_S:
            self._drawn = now
            self._live.update(self.render(), refresh=True)

    def finish(self, summary: Json) -> None:
        self._live.update(self.render(), refresh=True)
        self._live.stop()
        self.console.print("\n".join(summary_lines(summary)), highlight=False)

    def render(self) -> RenderableType:
        m = self.model
        title = f"trustpay monitor: {m.seq} frames, {sum(m.rejects.values())} rejected, {m.dropped} dropped"
        return Group(
            Text(title, style="bold"), self._devices(), self._servers(), self._rejects(), self._frames()
        )

    def _devices(self) -> Table:
        table = Table(
            "device", "nodes", "A", "B", "C", "trust", "last payment", "step times (ms)", title="devices"
        )
        for name, row in sorted(self.model.devices.items()):
            if self.only.devices and name not in self.only.devices:
                continue
            flows = [
                _outcome(f"{f.step} {f.outcome}", f.outcome, f.reason) if f is not None else Text("-")
                for f in (row.flows.get(flow) for flow in "ABC")
            ]
            trust = _outcome(row.trust or "-", row.trust, row.trust_reason)
            payment = f"{row.last_order} {row.last_order_step} {row.last_order_outcome}".strip() or "-"
            steps = " ".join(f"{step}:{ms}" for step, ms in row.step_ms.items()) or "-"
            nodes = Text(" ").join(
                _outcome(node.rsplit(".", 1)[-1], "ok" if state == "online" else "failed", "")
                for node, state in sorted(row.nodes.items())
            )
            table.add_row(name, nodes, *flows, trust, payment, steps)
        return table

    def _servers(self) -> Table:
        table = Table("server", "status", "frames sent", "received", "rejected", title="servers")
        for name, row in sorted(self.model.servers.items()):
            status = _outcome(row.status or "unknown", "ok" if row.status == "online" else "failed", "")
            table.add_row(name, status, str(row.sent), str(row.received), str(row.rejected))
        return table

    def _rejects(self) -> Table:
        table = Table("reason", "frames", title="rejected frames")
        for reason, count in self.model.rejects.most_common():
            table.add_row(Text(reason, style="red"), str(count))
        return table

    def _frames(self) -> Table:
        table = Table("#", "verdict", "link", "type", "sender", "detail", title="latest frames")
        for item in self.recent:
            if isinstance(item, Dropped):
                table.add_row("", Text("dropped", style="red"), "", "", "", f"{item.count} frames")
                continue
            style = "green" if item.verdict == OK else "red"
            detail = describe(item).split(item.sender or "?", 1)[-1].strip()
            table.add_row(
                str(item.seq),
                Text(item.verdict, style=style),
                item.link,
                item.type or "?",
                item.sender or "?",
                detail,
            )
        return table


GOOD = frozenset({"ok", "done", "trusted", "confirmed", "online"})


def _outcome(text: str, outcome: str, reason: str) -> Text:
    style = "green" if outcome in GOOD else ("" if not outcome else "red")
    shown = Text(text, style=style)
    if reason and outcome not in GOOD:
        shown.append(f" ({reason})", style="dim")
    return shown


def all_of(values: Iterable[str] | None) -> frozenset[str]:
    return frozenset(values or ())
