"""``trustpay chaos run`` on the command line: the scenarios it lists, and a clear error for a wrong one."""

from __future__ import annotations

import pytest

from ops.chaos.actions import ACTIONS
from ops.chaos.scenarios import SCENARIOS
from ops.cli import main


def test_list_names_every_scenario_with_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "run", "--list"]) == 0
    out = capsys.readouterr().out
    for sc in SCENARIOS.values():
        assert f"{sc.name}" in out and sc.summary[:40] in out


def test_an_unknown_scenario_is_a_usage_error_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "run", "lossy-radios"]) == 2
    err = capsys.readouterr().err
    assert "no scenario 'lossy-radios'" in err and "lossy-radio" in err


def test_every_scenario_action_exists_and_every_scenario_does_something() -> None:
    for sc in SCENARIOS.values():
        assert sc.rules or sc.action, sc.name
        assert not sc.action or sc.action in ACTIONS, sc.name
