"""Small durable state files: atomic, fsynced writes off the event loop.

A node's own state (the trust module's stored measurements, the chip's app
registry) is a JSON document replaced atomically (write temp, fsync, rename),
so a crash leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
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

    async def save(self, value: dict[str, Any], first: tuple[Path, bytes, int] | None = None) -> None:
        """Write ``value``; ``first`` (path, bytes, mode) is written atomically before it, in the same
        worker-thread hop (one thread round trip per payment step, not one per file)."""
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        async with self._lock:  # two saves never interleave their renames
            await asyncio.to_thread(self._write, data, first)

    def _write(self, data: bytes, first: tuple[Path, bytes, int] | None) -> None:
        if first is not None:
            write_atomic(*first)
        write_atomic(self.path, data)
