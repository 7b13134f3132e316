"""The staging writer of provisioning (nodes.store.create_unsynced): new files only, never wider."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nodes.store import create_unsynced


def test_a_staged_secret_is_never_wider_than_its_mode_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        create_unsynced(tmp_path / "key", b"secret", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_a_staged_file_is_never_written_through_a_planted_symlink_or_over_a_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_unsynced(tmp_path / "link", b"key material", 0o600)
    with pytest.raises(FileExistsError):
        create_unsynced(victim, b"key material", 0o600)
    assert victim.read_bytes() == b"untouched"
