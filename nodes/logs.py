"""Per-node structured logging: JSON lines to the node's file, readable lines to the console.

Each node gets its own structlog logger (not the process-wide configuration),
so a thousand nodes in one process each keep their own file and bound context.
Lines are handed to a writer thread, so logging never blocks the event loop
on disk.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Writer:
    """One background thread per process, appending lines to every node's file.

    One thread, not one per node, so a fleet of thousands of nodes in one
    process costs one thread and one open file per node. Lines gather in a
    deque and the thread wakes once per batch (at most every ``BATCH_S``), not
    once per line: waking a thread for every line cost a futex call and a GIL
    hand-over each, 5-10 % of a node's CPU under load (py-spy --gil).
    """

    BATCH_S = 0.01  # a line is in its file (flushed) at most about this long after it was logged
    _lock = threading.Lock()
    _instance: _Writer | None = None

    def __init__(self) -> None:
        self._lines: collections.deque[tuple[Path, str | None, threading.Event | None]] = collections.deque()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # a close() is waiting: write now, gather no batch
        self._files: dict[Path, BinaryIO] = {}
        threading.Thread(target=self._drain, name="trustpay-log-writer", daemon=True).start()

    @classmethod
    def shared(cls) -> _Writer:
        with cls._lock:  # created on first use, never at import
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def write(self, path: Path, line: str) -> None:
        self._lines.append((path, line, None))  # deque.append is atomic: no lock taken per line
        if not self._wake.is_set():
            self._wake.set()

    def close(self, path: Path) -> None:
        """Return once every line written to ``path`` so far is on disk and the file is closed."""
        done = threading.Event()
        self._lines.append((path, None, done))
        self._hurry.set()  # a fleet closes thousands of nodes' files one after another
        self._wake.set()
        done.wait(timeout=5)

    def _drain(self) -> None:
        while True:
            self._wake.wait()
            self._hurry.wait(self.BATCH_S)  # let a batch gather (one wake-up for it), unless hurried
            # cleared before the batch is taken: a line or close added after this sets them again
            self._hurry.clear()
            self._wake.clear()
            self._write_batch()

    def _write_batch(self) -> None:
        batch: dict[Path, list[str]] = {}
        for _ in range(len(self._lines)):  # the lines queued now; later ones wake the next batch
            path, line, done = self._lines.popleft()
            if line is not None:
                batch.setdefault(path, []).append(line)
                continue
            lines = batch.pop(path, None)  # a close: its file gets its lines first
            if lines:
                self._append(path, lines)
            f = self._files.pop(path, None)
            if f is not None:
                f.close()
            if done is not None:
                done.set()
        for path, lines in batch.items():
            self._append(path, lines)

    def _append(self, path: Path, lines: list[str]) -> None:
        """One write of the batch's lines for ``path``: visible to readers at once.

        Unbuffered: a buffered file held an 8 KiB buffer per node, most of a fleet
        node's log cost, for lines that are written a batch at a time anyway.
        """
        f = self._files.get(path)
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[path] = path.open("ab", buffering=0)
        rest = memoryview(("\n".join(lines) + "\n").encode())
        while rest:  # a raw write may take less than all of it; each turn takes at least a byte
            written = f.write(rest)
            if not written:
                raise OSError(f"could not append to {path}")
            rest = rest[written:]


class _LineWriter:
    """One node's log file, written by the shared writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _Writer.shared()

    def write(self, line: str) -> None:
        self._writer.write(self.path, line)

    def close(self) -> None:
        self._writer.close(self.path)


class _Sink:
    def __init__(self, file: _LineWriter | None, console: TextIO | None, console_level: int) -> None:
        self.file = file
        self.console = console
        self.console_level = console_level

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if self.file is not None:
            self.file.write(json.dumps(event, default=_jsonable, separators=(",", ":")))
        if self.console is not None and _LEVELS.get(event.get("level", "info"), 20) >= self.console_level:
            readable = {k: v for k, v in event.items() if k not in ("ts", "node", "role", "device")}
            line = _console_renderer()(logger, method, readable)
            print(f"{event.get('node', ''):<16} {line}", file=self.console, flush=True)
        raise structlog.DropEvent


@functools.cache
def _console_renderer() -> structlog.dev.ConsoleRenderer:
    """One for the process, made at the first console line: it holds no state of a node's
    (a renderer per node was ~2 KiB of each fleet node's memory)."""
    return structlog.dev.ConsoleRenderer(colors=False)


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
