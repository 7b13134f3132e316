"""nodes.store: the staging writer of provisioning (new files only, never wider) and the record log."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nodes.store import RecordLog, create_unsynced
from protocol.errors import ConfigError


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


def test_a_record_log_keeps_the_last_records_across_restarts_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "receipts.log"
    log = RecordLog(path, keep=3)
    for i in range(20):
        log.add(f"ord-{i}", f"r{i}")()  # the blocking write, as a worker thread runs it
        assert len(path.read_bytes().splitlines()) < 2 * 3  # rewritten whole before it grows past that
    again = RecordLog(path, keep=3)
    again.load()
    assert list(again.records.items()) == [("ord-17", "r17"), ("ord-18", "r18"), ("ord-19", "r19")]


def test_a_torn_last_append_is_dropped_and_the_next_write_repairs_the_file(tmp_path: Path) -> None:
    path = tmp_path / "receipts.log"
    log = RecordLog(path, keep=10)
    log.add("ord-1", "r1")()
    with path.open("ab") as f:
        f.write(b'{"key":"ord-2","val')  # a crash in the middle of an append
    again = RecordLog(path, keep=10)
    again.load()
    assert list(again.records) == ["ord-1"]
    again.add("ord-3", "r3")()
    third = RecordLog(path, keep=10)
    third.load()
    assert list(third.records.items()) == [("ord-1", "r1"), ("ord-3", "r3")]


def test_a_record_log_damaged_before_its_last_line_is_refused_not_half_read(tmp_path: Path) -> None:
    path = tmp_path / "receipts.log"
    path.write_bytes(b'{"key":"ord-1","value":"r1"}\nnot json\n{"key":"ord-3","value":"r3"}\n')
    with pytest.raises(ConfigError, match="corrupt at line 2"):
        RecordLog(path, keep=10).load()
    path.write_bytes(b'{"key":"ord-1","value":7}\n')
    with pytest.raises(ConfigError, match="corrupt at line 1"):
        RecordLog(path, keep=10).load()
