"""Small durable state files: atomic, fsynced writes off the event loop.

A node's own state (the trust module's stored measurements, the chip's app
registry) is a JSON document replaced atomically (write temp, fsync, rename),
so a crash leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old or the new file, never a mix.

    The temporary file has a unique name (two writers never share one: a fixed
    name raced between processes), is never readable beyond ``mode``, and is
    removed if the write fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_all(fd, data, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def create_unsynced(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create the new file ``path`` with ``data``, never readable beyond ``mode``; no fsync.

    Only for a tree built in a staging directory that nothing reads until the
    whole tree is made durable at once (:func:`sync_tree`) and renamed into
    place: a crash before that leaves the staging directory, never a half file
    where a reader looks. ``O_EXCL`` refuses a file that is already there.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data, mode)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, mode: int) -> None:
    os.fchmod(fd, mode)  # the umask may have dropped bits we want
    view = memoryview(data)
    while view:  # os.write may write less than asked
        view = view[os.write(fd, view) :]


def sync_tree() -> None:
    """Make every file written so far durable: one ``sync`` instead of one fsync per file.

    sync(2) flushes every filesystem (Python has no syncfs); for a tree of
    thousands of small files that is one journal commit against thousands.
    """
    os.sync()


def sync_dir(path: Path) -> None:
    """fsync a directory, so a rename or a new entry in it survives a crash."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class JsonState:
    """One JSON document on disk; ``save`` runs the write in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def load(self, default: dict[str, Any]) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return default
        except ValueError as exc:
            raise ConfigError(f"state file {self.path} is corrupt: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"state file {self.path} is not a JSON object")
        return data

    async def save(self, value: dict[str, Any], first: Callable[[], None] | None = None) -> None:
        """Write ``value``; ``first`` (a blocking write of another file) runs before it, in the
        same worker-thread hop: one thread round trip per payment step, not one per file."""
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        async with self._lock:  # two saves never interleave their renames
            await asyncio.to_thread(self._write, data, first)

    def _write(self, data: bytes, first: Callable[[], None] | None) -> None:
        if first is not None:
            first()
        write_atomic(self.path, data)


class RecordLog:
    """Small records by key, the last ``keep`` of them, in a file that grows by appends.

    One line per record (``{"key": ..., "value": ...}``), appended and fsynced:
    a record costs its own bytes, not a rewrite of all the others. A crash in an
    append leaves at most a torn last line, which ``load`` skips (the caller makes
    a record durable before acting on it, so nothing relied on it). Once the file
    holds ``2 * keep`` lines it is rewritten atomically with the kept records.
    Writes are blocking: callers run them in a worker thread (``JsonState.save``'s
    ``first``), in the order they were made.
    """

    def __init__(self, path: Path, keep: int) -> None:
        self.path, self.keep = path, keep
        self.records: OrderedDict[str, str] = OrderedDict()  # oldest first
        self._lines = 0

    def load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        whole = lines.pop() == b""  # the file ends with a complete line
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
                key, value = record["key"], record["value"]
                if not (isinstance(key, str) and isinstance(value, str)):
                    raise ValueError("key and value must be strings")
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"record file {self.path} is corrupt at line {i + 1}: {exc}") from exc
            self._remember(key, value)
        # a torn last append (never acted on) is dropped: the next add rewrites the file whole
        self._lines = len(lines) if whole else 2 * self.keep

    def add(self, key: str, value: str) -> Callable[[], None]:
        """Hold the record now; return the blocking write that makes it durable."""
        self._remember(key, value)
        self._lines += 1
        if self._lines < 2 * self.keep:
            line = _record_line(key, value)
            return functools.partial(_append, self.path, line)
        self._lines = len(self.records)
        return functools.partial(write_atomic, self.path, self.snapshot())

    def snapshot(self) -> bytes:
        """The whole file as it is to be rewritten: every kept record, oldest first."""
        return b"".join(_record_line(k, v) for k, v in self.records.items())

    def _remember(self, key: str, value: str) -> None:
        self.records.pop(key, None)
        self.records[key] = value
        while len(self.records) > self.keep:
            self.records.popitem(last=False)


def _record_line(key: str, value: str) -> bytes:
    return json.dumps({"key": key, "value": value}, separators=(",", ":")).encode() + b"\n"


def _append(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_all(fd, line, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
