"""``trustpay chaos fuzz``: the CI fuzz properties, run long, with a report of what they found.

The targets are the decoders of ``protocol`` (``ops.chaos.fuzz_decoders``) and
the handlers of every node on the in-memory bus (``ops.chaos.fuzz_nodes``). The
time is shared out among the targets in rounds of fresh seeds derived from
``--seed``, so a run is reproducible; failing examples are kept in an example
database (under the temporary directory unless ``--db`` says where) and tried
first by the next run. Exit 0 when no target found anything, 1 otherwise.

Needs hypothesis: ``pip install -e '.[fuzz]'`` (or the ``test`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ConfigError

from ..cli_common import add_examples, add_json_argument, print_json

if TYPE_CHECKING:  # hypothesis is loaded only when the command runs
    from .fuzz_nodes import NodeWorld
    from .fuzzing import Outcome, Target

HELP = "fuzz the decoders and every node's handlers for a while, and report what broke"
ROUND = 200  # inputs per target per round (the first rounds are smaller); each round has its own seed
FIRST_ROUND = 20  # so even a budget of seconds reaches every target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=1.0, help="time budget in minutes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; the same seed repeats a run")
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="DIR",
        help="example database (default: trustpay-fuzz-db in the temporary directory)",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="NAME",
        help="fuzz only this target (repeat for more); default: all",
    )
    parser.add_argument("--no-nodes", action="store_true", help="the decoders only (no node world)")
    add_json_argument(parser, "print one JSON object per target, then a summary")
    add_examples(
        parser,
        "trustpay chaos fuzz --minutes 30 --seed 7     # half an hour, reproducible",
        "trustpay chaos fuzz --minutes 2 --target envelope.open --json",
    )


def needs_deploy(args: argparse.Namespace) -> bool:
    return False  # it provisions its own deployment in a temporary directory


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("hypothesis") is None:
        raise ConfigError("trustpay chaos fuzz needs hypothesis: pip install -e '.[fuzz]' (or '.[test]')")
    from .fuzz_decoders import TARGETS
    from .fuzz_nodes import NodeWorld
    from .fuzzing import Outcome

    db = args.db or Path(tempfile.gettempdir()) / "trustpay-fuzz-db"
    deadline = time.monotonic() + args.minutes * 60
    checked: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="trustpay-fuzz-") as tmp:
        world = None if args.no_nodes else NodeWorld(Path(tmp))
        try:
            targets = chosen([*TARGETS, *(world.targets() if world else ())], args.target)
            totals = {t.name: Outcome(t.name) for t in targets}
            fuzz_rounds(targets, totals, deadline, args.seed, db)
            if world is not None:  # the nodes took all that: an honest payment still goes through
                totals["nodes.payment_after"] = payment_after(world)
                checked = dict(world.checked)
        finally:
            if world is not None:
                world.close()
    report(list(totals.values()), checked, args.json, db)
    return 1 if any(o.failed for o in totals.values()) else 0


def chosen(targets: list[Target], names: list[str] | None) -> list[Target]:
    if not names:
        return targets
    unknown = set(names) - {t.name for t in targets}
    if unknown:
        raise ConfigError(f"no target {sorted(unknown)}; choose from {[t.name for t in targets]}")
    return [t for t in targets if t.name in names]


def fuzz_rounds(
    targets: list[Target], totals: dict[str, Outcome], deadline: float, seed: int, db: Path
) -> None:
    """Every target once per round (one seed each) until the time is up; a target that broke rests."""
    from .fuzzing import run_target

    round_no = 0
    while True:  # bounded by the deadline: each round takes seconds
        for target in targets:
            total = totals[target.name]
            if total.failed:
                continue
            if time.monotonic() >= deadline and round_no > 0:
                return
            size = min(ROUND, FIRST_ROUND << round_no)
            got = run_target(target, size, seed=seed * 1_000_003 + round_no, database=db)
            total.tried += got.tried
            total.seconds += got.seconds
            total.error, total.example = got.error, got.example
        round_no += 1
        if time.monotonic() >= deadline or all(t.failed for t in totals.values()):
            return


def payment_after(world: NodeWorld) -> Outcome:
    from .fuzzing import Outcome

    outcome = Outcome("nodes.payment_after", tried=1)
    started = time.monotonic()
    try:
        world.assert_alive()
        code, result = world.pay()
        if code != 0:
            raise AssertionError(f"an honest payment after the fuzzing ended with exit {code}: {result}")
    except Exception as exc:  # reported, like any target's failure
        outcome.error = exc
    outcome.seconds = time.monotonic() - started
    return outcome


def report(outcomes: list[Outcome], checked: dict[str, int], as_json: bool, db: Path) -> None:
    tried = sum(o.tried for o in outcomes)
    failed = [o.target for o in outcomes if o.failed]
    if as_json:
        for outcome in outcomes:
            print_json({"kind": "target", **outcome.summary()})
        print_json(
            {"kind": "summary", "tried": tried, "failed": failed, "node_inputs": checked, "database": str(db)}
        )
        return
    for o in outcomes:
        print(f"{o.target:24} {o.tried:>8} inputs {o.seconds:7.1f} s  {'FAILED' if o.failed else 'held'}")
        if o.error is not None:
            found = f"{type(o.error).__name__}: {o.error}\n{o.example}"
            for line in found.splitlines():
                print(f"    {line}")
    if checked:
        print("node inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(checked.items())))
    print(f"{tried} inputs in all, {len(failed)} target(s) broke; failing examples are kept in {db}")
