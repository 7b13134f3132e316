"""`trustpay attack` against one running deployment: every attack defended, and the toolkit can tell.

One deployment per backend plays every attack in turn as dev-0001's client
(its key, chain and broker login from the deployment directory), then the
control (a genuine frame, which must come out NOT DEFENDED, so the verdicts
are not fixed in advance), then pays from both devices. The fixture fails the
test if any node exited meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from ops.attack.attacks import ATTACKS, DEFAULT_ORDER, Context, play
from ops.attack.session import Attacker, Observer
from ops.attack.verdict import DEFENDED, NOT_DEFENDED, NOT_DELIVERED
from ops.operator import operator_node

from .conftest import DEV1, DEV2, E2E, WAIT_S, client_of, tm_of

pytestmark = pytest.mark.e2e


async def test_every_attack_is_defended_the_control_is_not_and_payments_still_go_through(e2e: E2E) -> None:
    url = e2e.launcher.broker_url
    before = await e2e.balances()
    attacker = await asyncio.to_thread(Attacker, e2e.dep, client_of(DEV1), url)
    async with Observer(e2e.dep, url) as observer, operator_node(e2e.dep, url) as op:
        ctx = Context(e2e.dep, attacker, observer, op, tm_of(DEV1), DEV2, url, count=100)
        paid = await e2e.pay(DEV1, "2.50", "shop-1")  # live frames for replay and alter to capture
        assert paid.code == 0, (paid.lines, paid.stderr[-2000:])
        reports = {name: await play(ctx, name, ATTACKS[name]) for name in DEFAULT_ORDER}
        control = await play(ctx, "control", ATTACKS["control"])

    for report in reports.values():
        assert report.verdict == DEFENDED, report.text()
    # the control is a genuine ping: answered, so NOT DEFENDED; were silence the rule, it would pass
    assert control.verdict == NOT_DEFENDED, control.text()
    assert control.frames[0].accepted and control.frames[0].answers == ("pong (ok)",), control.text()

    forged = {f.sent.label: f for f in reports["forge"].frames}
    assert len(forged) == 5 and not any(f.answers for f in forged.values())
    for label, frame in forged.items():
        expected = NOT_DELIVERED if "on its topic" in label else "bad_signature"  # the broker's ACL, or ours
        assert frame.monitor in (expected, "wrong_role", "unknown_sender"), (label, frame.monitor)
    replayed = reports["replay"].frames
    assert replayed[0].monitor in ("replayed", "duplicate") and not replayed[0].accepted
    assert all("a copy of an earlier answer" in a for f in replayed for a in f.answers)
    assert {f.monitor for f in replayed[1:]} <= {"wrong_topic", NOT_DELIVERED}
    alter = reports["alter"]
    ours = [f for f in alter.frames if "made-up key" in f.sent.label or "signature kept" in f.sent.label]
    theirs = [f for f in alter.frames if "the attacker's own key" in f.sent.label]  # the chip's frames
    assert len(ours) == 2 and all(f.monitor == "bad_signature" for f in ours), alter.text()
    # on the chip's link the broker drops it (not the client's to write); on the client's, the
    # chip's message type or role does not belong there
    assert len(theirs) == 2 and theirs[0].monitor == NOT_DELIVERED, alter.text()
    assert theirs[1].monitor in ("wrong_topic", "wrong_role"), alter.text()
    assert reports["flood"].load["answered"] >= 100 and all(
        f.monitor == "stale" for f in reports["flood"].frames
    )
    assert len(reports["garbage"].frames) >= 20
    assert all(f.monitor != "ok" for f in reports["garbage"].frames + reports["oversize"].frames)
    assert reports["malware"].ledger["before"] == reports["malware"].ledger["after"]

    # the deployment still pays, from the attacked device and from the other one
    for device, payee in ((DEV1, "shop-2"), (DEV2, "shop-1")):
        run = await e2e.pay(device, "1.00", payee)
        assert run.code == 0, (device, run.lines, run.stderr[-2000:])
    after = await e2e.balances()
    assert after[f"{DEV1}:wallet"] == before[f"{DEV1}:wallet"] - 350
    assert sum(after.values()) == sum(before.values())


async def test_the_attack_command_prints_one_verdict_per_attack(e2e: E2E) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "ops.cli", "attack", "forge", "control", "--json"),
        *("--deploy", str(e2e.dep.root), "--broker", e2e.launcher.broker_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S * 2):
        out, err = await proc.communicate()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["attack"], r["verdict"]) for r in lines] == [("forge", DEFENDED), ("control", NOT_DEFENDED)], (
        err
    )
    assert proc.returncode == 1  # not every attack defended: the control got through, as it must
