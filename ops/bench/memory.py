"""``trustpay bench memory``: resident memory per device node in fleet mode.

A fleet (``ops.fleet.Fleet``) of the first N devices' chips and trust modules runs
in this process against the deployment's own broker (started here, in a process of
its own). Resident memory (``VmRSS`` from ``/proc/self/status``) is read once every
module a node needs is imported and again once every node is up (connected, a trust
module past its start-up checks): the difference over the nodes is what one more
node costs. ``trace`` > 0 also runs ``tracemalloc`` over the fleet's start and
reports its largest sources of Python objects still alive (file:line, KiB per
node); tracemalloc's own bookkeeping then inflates the RSS figures, so measure RSS
without it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodes.deployment import Deployment
from protocol.topics import Role

from .cpu import rss_kib

UP_TIMEOUT_S = 300.0
_ROOT = Path(__file__).resolve().parents[2]  # the checkout: file names in the report are relative to it


def _prepare(roles: Sequence[Role]) -> None:
    """Import what the nodes import, so that code is not counted as the nodes' memory."""
    from ops.roles import role_class

    for role in roles:
        role_class(role)


async def memory(dep: Deployment, devices: int, roles: Sequence[Role], trace: int = 0) -> dict[str, Any]:
    from ops.broker_cmd import broker_for
    from ops.fleet import Fleet, fleet_node_ids

    manifest = dep.load_manifest()
    ids = fleet_node_ids(manifest, devices, roles)
    _prepare(roles)
    async with broker_for(dep) as broker:
        url = f"mqtt://{broker.host}:{broker.port}?v={broker.mqtt_version}"
        fleet = Fleet(dep, ids, url, manifest=manifest)
        gc.collect()
        before = rss_kib(os.getpid())
        if trace:
            tracemalloc.start(trace)
        first = tracemalloc.take_snapshot() if trace else None
        running = asyncio.create_task(fleet.run())
        try:
            async with asyncio.timeout(UP_TIMEOUT_S):
                up = asyncio.create_task(fleet.up.wait())
                await asyncio.wait((up, running), return_when=asyncio.FIRST_COMPLETED)
                if not up.done():
                    up.cancel()
                    await running  # it ended before coming up: its error
                    raise RuntimeError("the fleet ended before it came up")
            gc.collect()
            after = rss_kib(os.getpid())
            top: list[dict[str, Any]] = []
            if first is not None:
                last = tracemalloc.take_snapshot()
                tracemalloc.stop()
                top = _top(last.compare_to(first, "traceback"), len(ids))
                total = sum(s.size_diff for s in last.compare_to(first, "filename"))
            failed = [m.node_id for m in fleet.members if m.failures]
        finally:
            fleet.stop()
            async with asyncio.timeout(UP_TIMEOUT_S):
                await running
    result: dict[str, Any] = {
        "devices": devices,
        "nodes": len(ids),
        "roles": [r.value for r in roles],
        "failed": failed,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_node": round((after - before) / len(ids), 1),
        "kib_per_device": round((after - before) / devices, 1),
        "traced": bool(trace),
    }
    if first is not None:
        result["python_kib_per_node"] = round(total / 1024 / len(ids), 1)
        result["top"] = top
    return result


def _top(stats: list[tracemalloc.StatisticDiff], nodes: int, count: int = 25) -> list[dict[str, Any]]:
    """The growth by the line of ours that caused it (the innermost frame outside libraries)."""
    by_line: dict[str, list[int]] = {}
    for stat in stats:
        frames = list(reversed(stat.traceback))  # innermost first (a Traceback is oldest first)
        ours = next((f for f in frames if not _library(f.filename)), frames[0])
        where = f"{_short(ours.filename)}:{ours.lineno}"
        if ours is not frames[0]:
            where += f" ({_short(frames[0].filename)}:{frames[0].lineno})"
        sizes = by_line.setdefault(where, [0, 0])
        sizes[0] += stat.size_diff
        sizes[1] += stat.count_diff
    ranked = sorted(by_line.items(), key=lambda item: -item[1][0])[:count]
    return [
        {
            "where": where,
            "kib_per_node": round(size / 1024 / nodes, 2),
            "objects_per_node": round(n / nodes, 1),
        }
        for where, (size, n) in ranked
    ]


def _library(filename: str) -> bool:
    return "/site-packages/" in filename or "/lib/python3." in filename or filename.startswith("<")


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in filename:
            return filename.split(marker, 1)[1]
    root = f"{_ROOT}/"
    return filename.removeprefix(root)
