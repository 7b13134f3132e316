"""Run one fuzz target under hypothesis and say what it found.

A ``Target`` is a strategy of inputs and a ``check`` that raises when the
property breaks; the property of every target here is the same at heart: the
only outcomes are a verified result or a typed ``TrustpayError``. CI runs each
target with a small derandomized budget; ``trustpay chaos fuzz`` runs them in
rounds of fresh seeds until its time is up, keeping failing examples in an
example database so the next run tries them first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as with_seed
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from protocol.errors import TrustpayError

SLOW_S = 5.0  # one input that takes longer than this is reported as a hang


@dataclass(frozen=True)
class Target:
    name: str
    inputs: st.SearchStrategy[Any]
    check: Callable[[Any], None]  # raises on a broken property
    what: str = ""


@dataclass
class Outcome:
    """What one target's run found: inputs tried, and the shrunk failing example if any."""

    target: str
    tried: int = 0
    seconds: float = 0.0
    error: BaseException | None = field(default=None, repr=False)
    example: str = ""  # the shrunk failing input, as hypothesis writes it

    @property
    def failed(self) -> bool:
        return self.error is not None

    def summary(self) -> dict[str, Any]:
        found = f"{type(self.error).__name__}: {self.error}" if self.error is not None else ""
        return {
            "target": self.target,
            "tried": self.tried,
            "seconds": round(self.seconds, 2),
            "failed": self.failed,
            "error": found,
            "example": self.example,
        }


def only_typed_errors(action: Callable[[], Any]) -> Any:
    """``action()``, or None if it raised a TrustpayError; anything else (or a hang) propagates."""
    started = time.monotonic()
    try:
        return action()
    except TrustpayError:
        return None
    finally:
        took = time.monotonic() - started
        if took > SLOW_S:
            raise AssertionError(f"one input took {took:.1f} s: a decoder must stay bounded")


def run_target(
    target: Target,
    max_examples: int,
    *,
    seed: int | None = None,
    database: Path | None = None,
    derandomize: bool = False,
) -> Outcome:
    """Run ``target`` for up to ``max_examples`` inputs; never raises for a broken property."""
    outcome = Outcome(target.name)

    def check(value: Any) -> None:
        outcome.tried += 1
        target.check(value)

    test = given(target.inputs)(check)
    test = settings(
        max_examples=max_examples,
        deadline=None,  # shared machines are slow at random; SLOW_S catches real hangs
        derandomize=derandomize,
        database=DirectoryBasedExampleDatabase(str(database)) if database is not None else None,
        suppress_health_check=list(HealthCheck),
        phases=tuple(Phase),
        print_blob=False,
        report_multiple_bugs=False,  # one failure, shrunk, is what the report shows
    )(test)
    if seed is not None and not derandomize:
        test = with_seed(seed)(test)
    started = time.monotonic()
    try:
        test()
    except Exception as exc:  # the property broke: keep the shrunk example hypothesis found
        outcome.error = exc
        outcome.example = "\n".join(getattr(exc, "__notes__", ()))
    outcome.seconds = time.monotonic() - started
    return outcome
