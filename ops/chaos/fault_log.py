"""What the fault proxy did: every fault applied, counted, kept, logged as a JSON line, announced."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodes.logs import NodeLogging

RECENT = 1000  # applied faults kept in memory


@dataclass(frozen=True)
class AppliedFault:
    """One fault applied, with the frame it hit."""

    kind: str
    direction: str
    client_id: str
    topic: str
    size: int  # payload bytes, before the fault
    qos: int
    packet_id: int | None
    detail: str = ""


@dataclass
class FaultLog:
    """Every fault applied: counted by kind, kept (the last :data:`RECENT`), logged, and announced."""

    path: Path | None = None
    on_fault: Callable[[AppliedFault], None] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)  # the other events, by name
    recent: deque[AppliedFault] = field(default_factory=lambda: deque(maxlen=RECENT))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _logging: NodeLogging | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            self._logging = NodeLogging("chaos-proxy", self.path, console=None)

    def record(self, fault: AppliedFault) -> None:
        self.counts[fault.kind] += 1
        self.recent.append(fault)
        if self._logging is not None:
            self._logging.logger.info("fault", **asdict(fault))
        if self.on_fault is not None:
            self.on_fault(fault)
        self._changed.set()

    def note(self, event: str, **fields: Any) -> None:
        """Something that is not a fault (a connection, a reload, an unreadable stream)."""
        self.notes[event] += 1
        if self._logging is not None:
            self._logging.logger.info(event, **fields)
        self._changed.set()

    async def wait_for(self, kind: str, count: int = 1, timeout_s: float = 10.0) -> None:
        """Until ``count`` faults of ``kind`` (or notes of that name) were applied."""
        async with asyncio.timeout(timeout_s):
            while self.counts[kind] + self.notes[kind] < count:  # each turn waits for news; bounded
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        if self._logging is not None:
            self._logging.close()
