"""The recording format of ``trustpay monitor --record``: JSON lines, frames in base64.

The first line names the format and carries what a replay needs to reach the
same verdicts without the deployment: the start time (the replay guard's
floor) and the public trust anchors the run started with. Every later line is
one frame as it arrived (topic, retain flag, arrival time, raw bytes) or a
count of frames the monitor dropped. A truncated last line (the monitor was
killed mid-write) is ignored; anything else unreadable is a ``ConfigError``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from protocol.certs import Certificate, RevocationList
from protocol.errors import ConfigError, Rejected

from .model import Anchors

FORMAT = "trustpay-monitor-recording"
VERSION = 1


@dataclass(frozen=True)
class Header:
    started_ms: int
    anchors: Anchors


@dataclass(frozen=True)
class Arrival:
    """One frame as it reached the monitor."""

    at_ms: int
    topic: str
    retained: bool
    frame: bytes


@dataclass(frozen=True)
class Drop:
    at_ms: int
    count: int


Record = Arrival | Drop


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def header_line(header: Header) -> str:
    a = header.anchors
    anchors = {
        "root": _b64(a.root.to_bytes()),
        "update": _b64(a.update.to_bytes()),
        "platform": _b64(a.platform.to_bytes()),
        "crl": _b64(a.crl.to_bytes()),
    }
    data = {"format": FORMAT, "version": VERSION, "started_ms": header.started_ms, "anchors": anchors}
    return json.dumps(data, sort_keys=True) + "\n"


def record_line(record: Record) -> str:
    if isinstance(record, Drop):
        return json.dumps({"at_ms": record.at_ms, "dropped": record.count}) + "\n"
    data = {
        "at_ms": record.at_ms,
        "topic": record.topic,
        "retain": record.retained,
        "frame": _b64(record.frame),
    }
    return json.dumps(data) + "\n"


class Recorder:
    """Appends records to a file; blocking, so the monitor calls it from a worker thread."""

    def __init__(self, path: Path, header: Header) -> None:
        self.path = path
        try:
            self._file: IO[str] = path.open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the recording {path}: {exc.strerror}") from exc
        self._file.write(header_line(header))

    def write(self, lines: list[str]) -> None:
        self._file.writelines(lines)
        self._file.flush()  # a killed monitor keeps everything up to its last batch

    def close(self) -> None:
        self._file.close()


def read(path: Path) -> tuple[Header, list[Record]]:
    """The header and every record of a recording."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the recording {path}: {exc.strerror}") from exc
    if not lines:
        raise ConfigError(f"{path} is empty: not a monitor recording")
    header = _parse_header(path, lines[0])
    return header, list(_records(path, lines[1:]))


def _parse_header(path: Path, line: str) -> Header:
    try:
        data = json.loads(line)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ConfigError(f"{path} is not a version {VERSION} monitor recording")
        a = data["anchors"]
        anchors = Anchors(
            root=Certificate.from_bytes(base64.b64decode(a["root"], validate=True)),
            update=Certificate.from_bytes(base64.b64decode(a["update"], validate=True)),
            platform=Certificate.from_bytes(base64.b64decode(a["platform"], validate=True)),
            crl=RevocationList.from_bytes(base64.b64decode(a["crl"], validate=True)),
        )
        return Header(int(data["started_ms"]), anchors)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, Rejected) as exc:
        raise ConfigError(f"{path}: the recording's first line is not a valid header ({exc})") from exc


def _records(path: Path, lines: list[str]) -> Iterator[Record]:
    for number, line in enumerate(lines, start=2):
        try:
            data: dict[str, Any] = json.loads(line)
            if "dropped" in data:
                yield Drop(int(data["at_ms"]), int(data["dropped"]))
                continue
            frame = base64.b64decode(data["frame"], validate=True)
            yield Arrival(int(data["at_ms"]), str(data["topic"]), bool(data["retain"]), frame)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            if number == len(lines) + 1:
                return  # the last line was cut short when the monitor stopped
            raise ConfigError(f"{path}:{number}: not a recorded frame ({exc})") from exc
