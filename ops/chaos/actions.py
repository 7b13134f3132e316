"""What a scenario does besides faulting the links, while the payments run.

Each action waits for some of the payments to end, so it lands mid-run, does
its harm, and records what it expects to see (``run.expect``) beside the
invariants. Each one ends by itself within bounded waits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from ops.attack.session import Attacker, Observer, target_alive
from ops.attack.verdict import Sent, outcomes
from ops.operator import operator_node
from ops.up_process import children_of, survivors
from protocol.envelope import peek
from protocol.topics import Role, link_topic, node_id

from .invariants import Check
from .run import Action, ChaosRun

UP_WAIT_S = 60.0
SKEW_MS = -40_000


def _a_third(run: ChaosRun) -> int:
    return max(1, run.opts.payments // 3)


async def restart_broker(run: ChaosRun) -> None:
    """Stop the broker and start it again on the same port while payments run."""
    await run.wait_paid(_a_third(run))
    began = time.monotonic()
    await run.broker.restart()
    run.note(f"broker {run.broker.backend} restarted in {time.monotonic() - began:.1f} s")


async def kill_servers(run: ChaosRun) -> None:
    """SIGKILL the payment-server, later the trust-server; `up` must bring each back.

    With replicas, the last replica of each role is killed while the others serve:
    they must stay up, untouched, and carry the payments meanwhile (the invariants).
    """
    for share, role in ((1, Role.PAYMENT_SERVER), (2, Role.TRUST_SERVER)):
        await run.wait_paid(share * _a_third(run))
        assert run.up is not None
        *others, nid = run.servers(role)
        spared = {other: run.current_pid(other) for other in others}
        pid = run.current_pid(nid)
        since = len(run.up.events)
        run.killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        back = await run.up.until(since, UP_WAIT_S, event="up", node=nid)
        run.expect(back["pid"] != pid, f"{nid} killed (pid {pid}), `up` started it again (pid {back['pid']})")
        if spared:
            now = {other: run.current_pid(other) for other in spared}
            run.expect(now == spared, f"the other replicas {sorted(spared)} ran on meanwhile: pids {now}")
        run.note(f"{nid} SIGKILLed (pid {pid}); back as pid {back['pid']}")


async def kill_up(run: ChaosRun) -> None:
    """SIGKILL `trustpay up`: nothing it started may survive it. Then start it again."""
    await run.wait_paid(_a_third(run))
    up = run.up
    assert up is not None
    started = children_of(up.proc.pid)
    pidfds = {pid: os.pidfd_open(pid) for pid in started}  # held: these pids cannot be reused now
    try:
        run.killed.update(started)
        up.proc.kill()
        await up.proc.wait()
        left = await survivors(pidfds, 15.0)
    finally:
        for fd in pidfds.values():
            os.close(fd)
    run.expect(
        not left and len(started) >= 2 * run.replicas + 2 * len(run.devices),
        f"`up` SIGKILLed: {len(started)} processes it started, {len(left)} still running {sorted(left)}",
    )
    await run.start_up()
    run.note(f"`up` SIGKILLed with {len(started)} children, none survived; started again")


def _skewed(run: ChaosRun) -> str:
    return run.devices[-1]


def _prepare_skew(run: ChaosRun) -> None:
    device = _skewed(run)
    run.up_extra += ("--clock-offset", f"{device}={SKEW_MS}")
    run.client_extra[device] = (f"--clock-offset-ms={SKEW_MS}",)
    run.note(f"{device}'s clock runs {SKEW_MS / 1000:+.0f} s off")


async def skew_clock(run: ChaosRun) -> None:
    """A device whose clock is 40 s off: each of its payments is refused, quickly and clearly."""
    await run.wait_paid(run.opts.payments)
    device = _skewed(run)
    mine = [a for a in run.attempts if a.device == device]
    run.expect(
        bool(mine) and all(a.status == "refused" and a.code == "clock_skew" for a in mine),
        f"{device} (clock {SKEW_MS / 1000:+.0f} s): "
        f"{[f'{a.status} {a.code}' for a in mine]}, each expected refused clock_skew",
    )


skew_clock.prepare = _prepare_skew  # type: ignore[attr-defined]


async def tamper_app(run: ChaosRun) -> None:
    """Overwrite the last device's payment apps mid-run: from then on it must not pay."""
    await run.wait_paid(_a_third(run))
    device = run.devices[-1]
    apps = await asyncio.to_thread(run.dep.installed_apps, device)
    tampered_at = time.monotonic()
    paid_before = sum(1 for a in run.attempts if a.device == device)
    for app in apps:
        code = run.dep.app_dir(device, app) / "code.py"
        await asyncio.to_thread(_append, code, b"\n# changed behind the trust module's back\n")
    run.note(f"{device}'s apps {', '.join(apps)} tampered with after {paid_before} of its payments")
    await run.pay(device, 125, "shop-1")  # at least one payment after it, whatever the schedule
    await run.wait_paid(run.opts.payments)
    later = [a for a in run.attempts if a.device == device and a.started_s > tampered_at]
    run.expect(
        bool(later) and all(a.status != "confirmed" for a in later),
        f"{device}'s payments started after the tampering: {[f'{a.status} {a.code}' for a in later]}, "
        "none may be confirmed",
    )


def _append(path: os.PathLike[str], data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def replay_orders(run: ChaosRun) -> None:
    """An attacker holding the last device's chip login replays captured payment orders."""
    device = run.devices[-1]
    chip = node_id(Role.CHIP, device)
    own = link_topic(Role.CHIP, Role.PAYMENT_SERVER, device)
    async with Observer(run.dep, run.proxy_url) as observer:
        await run.wait_paid(_a_third(run) * 2)
        orders = [
            (topic, frame)
            for topic, frame in observer.captured
            if (h := peek(frame)) is not None and h.type == "pay.order"
        ]
        if not orders:
            run.expect(False, "no payment order crossed the radio to capture")
            return
        # replayed verbatim: the attacker signs nothing, so needs no boot epoch of its own
        attacker = Attacker(run.dep, chip, run.proxy_url)
        mark = observer.mark()
        sent: list[Sent] = []
        async with attacker.connect() as client:
            for topic, frame in orders:
                header = peek(frame)
                assert header is not None
                where = "again on its own link" if topic == own else f"from {topic} on {own}"
                sent.append(
                    await attacker.publish(
                        client, f"pay.order {where}", Role.PAYMENT_SERVER.value, own, frame, header.message_id
                    )
                )
        async with operator_node(run.dep, run.proxy_url) as op:
            await target_alive(op, observer, Role.PAYMENT_SERVER.value, mark)
        for outcome in outcomes(sent, observer.seen[mark:]):
            run.attacks.append(
                Check(
                    not outcome.accepted,
                    f"replayed {outcome.sent.label}: seen as {outcome.monitor}, "
                    f"answers {list(outcome.answers) or 'none'}",
                )
            )
        run.note(f"an attacker with {chip}'s login replayed {len(sent)} captured payment orders")


ACTIONS: dict[str, Action] = {
    "restart_broker": restart_broker,
    "kill_servers": kill_servers,
    "kill_up": kill_up,
    "skew_clock": skew_clock,
    "tamper_app": tamper_app,
    "replay_orders": replay_orders,
}
