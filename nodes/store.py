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
            os.fchmod(fd, mode)  # the umask may have dropped bits we want
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
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

    async def save(self, value: dict[str, Any]) -> None:
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        async with self._lock:  # two saves never interleave their renames
            await asyncio.to_thread(write_atomic, self.path, data)
