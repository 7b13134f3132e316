"""The shared log writer: every line, in order, in its node's file once the node's logging closes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.logs import NodeLogging, _Writer


def test_every_line_of_every_node_reaches_its_file_in_order_by_close(tmp_path: Path) -> None:
    nodes = [NodeLogging(f"dev-000{i}.tm", tmp_path / f"n{i}.log", console=None) for i in (1, 2)]
    for n in range(500):  # more than one batch: the writer drains while lines keep coming
        for i, node in enumerate(nodes):
            node.logger.info("step.C7", n=n, i=i)
    for node in nodes:
        node.close()
    for i in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / f"n{i + 1}.log").read_text().splitlines()]
        assert [(line["n"], line["i"], line["node"]) for line in lines] == [
            (n, i, f"dev-000{i + 1}.tm") for n in range(500)
        ]


def test_a_file_closed_and_written_again_is_appended_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tm.log"
    for run in range(2):  # a node restarted in the same process reopens its file
        node = NodeLogging("dev-0001.tm", path, console=None)
        node.logger.warning("run", run=run)
        node.close()
    assert [json.loads(line)["run"] for line in path.read_text().splitlines()] == [0, 1]


def test_close_writes_at_once_instead_of_waiting_for_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with a batch interval longer than close()'s own 5 s limit, only a hurried writer
    # can have the lines in the files when close() returns (a fleet closes thousands)
    writer = _Writer.shared()
    monkeypatch.setattr(_Writer, "BATCH_S", 30.0)
    try:
        for i in range(3):
            node = NodeLogging(f"dev-000{i}.tm", tmp_path / f"n{i}.log", console=None)
            node.logger.info("stopping", i=i)
            node.close()
            assert json.loads((tmp_path / f"n{i}.log").read_text())["i"] == i
    finally:
        monkeypatch.undo()
        writer._hurry.set()  # out of any long wait taken meanwhile
