"""``trustpay chaos fuzz`` itself (ops.chaos.fuzz), with a budget of seconds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from hypothesis import strategies as st

from ops.chaos import fuzz
from ops.chaos.fuzzing import Outcome, Target


def parse(*words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trustpay chaos fuzz")
    fuzz.add_arguments(parser)
    return parser.parse_intermixed_args(list(words))


def test_a_short_run_tries_every_target_and_reports_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--minutes", "0.01", "--seed", "3", "--json", "--db", str(tmp_path / "db"))
    assert fuzz.run(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    targets = {line["target"]: line for line in lines if line["kind"] == "target"}
    summary = lines[-1]
    assert {"codec.unpack", "envelope.open", "nodes.handlers", "nodes.payment_after"} <= set(targets)
    assert all(t["tried"] >= 1 and not t["failed"] for t in targets.values())
    assert summary["kind"] == "summary" and summary["failed"] == []
    assert summary["tried"] == sum(t["tried"] for t in targets.values())
    assert summary["node_inputs"]["valid.accepted"] > 0


def test_a_broken_target_is_reported_with_its_shrunk_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def check(n: int) -> None:
        assert n < 1000, "too big"

    target = Target("demo.broken", st.integers(), check)
    totals = {target.name: Outcome(target.name)}
    fuzz.fuzz_rounds([target], totals, deadline=0.0, seed=1, db=tmp_path / "db")
    fuzz.report(list(totals.values()), {}, as_json=False, db=tmp_path / "db")
    out = capsys.readouterr().out
    assert totals["demo.broken"].failed
    assert "FAILED" in out and "too big" in out and "value=1000" in out  # shrunk to the edge


def test_an_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    from protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="no target"):
        fuzz.run(parse("--no-nodes", "--target", "nonsense", "--db", str(tmp_path)))


def test_help_shows_examples_and_json() -> None:
    parser = argparse.ArgumentParser(prog="trustpay chaos fuzz")
    fuzz.add_arguments(parser)
    text = parser.format_help()
    assert "examples:\n  trustpay chaos fuzz --minutes" in text and "--json" in text
