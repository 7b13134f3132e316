"""Every decoder of protocol/ under valid, mutated and random inputs (ops.chaos.fuzz_decoders).

The only outcomes are a checked result or a typed TrustpayError; nothing altered
or forged is accepted. CI runs each target derandomized with a modest budget;
``trustpay chaos fuzz`` runs the same targets for as long as it is given.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.chaos.fuzz_decoders import FRAMES, ROUTES, TARGETS, FrameCase, _check_frame
from ops.chaos.fuzzing import Target, only_typed_errors, run_target
from ops.chaos.strategies import record
from protocol.errors import Malformed
from protocol.messages import MESSAGE_TYPES
from protocol.schema import from_map, to_map

CI_EXAMPLES = 150


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_decoder_gives_a_result_or_a_typed_error(target: Target) -> None:
    outcome = run_target(target, CI_EXAMPLES, derandomize=True)
    if outcome.error is not None:
        raise outcome.error  # with hypothesis's shrunk example in its notes
    assert outcome.tried >= CI_EXAMPLES // 2  # the strategy really produced inputs


def test_every_message_type_travels_some_route() -> None:
    """A new message type is fuzzed with no change: its body strategy comes from its type hints."""
    assert {r.type_name for r in ROUTES} == set(MESSAGE_TYPES)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(data=st.data())
def test_body_strategies_build_what_the_schema_reads_back(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    body = data.draw(record(MESSAGE_TYPES[name].body))
    assert from_map(type(body), to_map(body)) == body


class _Boom(Exception):
    pass


def test_an_untyped_exception_is_a_failure_and_a_typed_one_is_not() -> None:
    """The property the targets share, shown on a decoder that breaks it (so it can fail)."""
    assert only_typed_errors(lambda: (_ for _ in ()).throw(Malformed("typed"))) is None

    def broken(_: object) -> None:
        only_typed_errors(lambda: (_ for _ in ()).throw(_Boom("a bug")))

    outcome = run_target(Target("broken", st.integers(), broken), 20, derandomize=True)
    assert isinstance(outcome.error, _Boom) and outcome.tried >= 1
    assert "broken" in outcome.example or "check(" in outcome.example  # the shrunk input is reported


def test_an_accepted_forgery_breaks_the_frame_property() -> None:
    """The frame check really looks: a valid frame passed off as a forged one must fail it."""
    case = _first_valid()
    with pytest.raises(AssertionError, match="forged frame was accepted"):
        _check_frame(dataclasses.replace(case, kind="forged"))


def _first_valid() -> FrameCase:
    found: list[FrameCase] = []

    @settings(max_examples=50, derandomize=True, database=None)
    @given(FRAMES.inputs)
    def collect(case: FrameCase) -> None:
        if case.kind == "valid" and not found:
            found.append(case)

    collect()
    assert found
    return found[0]
