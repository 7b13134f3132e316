"""Per-node structured logging: JSON lines to the node's file, readable lines to the console.

Each node gets its own structlog logger (not the process-wide configuration),
so a thousand nodes in one process each keep their own file and bound context.
Lines are handed to a writer thread, so logging never blocks the event loop
on disk.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _LineWriter:
    """One background thread appending lines to one file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._drain, args=(path,), name=f"log:{path.name}", daemon=True
        )
        self._thread.start()

    def write(self, line: str) -> None:
        self._queue.put(line)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _drain(self, path: Path) -> None:
        with path.open("a", encoding="utf-8") as f:
            while (line := self._queue.get()) is not None:
                f.write(line + "\n")
                if self._queue.empty():
                    f.flush()


class _Sink:
    def __init__(self, file: _LineWriter | None, console: TextIO | None, console_level: int) -> None:
        self.file = file
        self.console = console
        self.console_level = console_level
        self._pretty = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if self.file is not None:
            self.file.write(json.dumps(event, default=_jsonable, separators=(",", ":")))
        if self.console is not None and _LEVELS.get(event.get("level", "info"), 20) >= self.console_level:
            print(self._pretty(logger, method, dict(event)), file=self.console, flush=True)
        raise structlog.DropEvent


def _jsonable(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _timestamp(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["ts"] = round(time.time(), 6)
    return event


class NodeLogging:
    """Owns a node's log file writer; ``logger`` is bound to the node's identity."""

    def __init__(
        self,
        node_id: str,
        path: Path | None,
        console: TextIO | None = sys.stderr,
        console_level: str = "info",
        **context: Any,
    ) -> None:
        self._writer = _LineWriter(path) if path is not None else None
        sink = _Sink(self._writer, console, _LEVELS[console_level])
        self.logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
            None,
            processors=[structlog.processors.add_log_level, _timestamp, sink],
            wrapper_class=structlog.make_filtering_bound_logger(10),
        ).bind(node=node_id, **context)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
