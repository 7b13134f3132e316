"""Each attack: send, let the target react, look at what it did, judge.

:func:`play` wraps every attack the same way: the ledger and the observer's
position before, the attack's frames, then a signed ping from the operator to
the target (is it still there, did it restart, and everything sent before has
been taken), the frames' outcomes, the step events, the ledger after, the
verdict. The attacks themselves only send and add checks of their own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from nodes.deployment import Deployment
from nodes.runtime import Node
from ops import scenario
from ops.monitor import recording
from ops.monitor.recording import Arrival
from protocol.envelope import peek, sign_frame
from protocol.errors import ConfigError
from protocol.keys import KeyPair
from protocol.topics import Role, link_topic, node_id, parse_topic

from .frames import (
    ALTERABLE,
    OVERSIZE_BYTES,
    altered,
    forged_ping,
    garbage,
    now_ms,
    oversize,
    with_chain,
)
from .session import Attacker, Observer, ledger_summary, target_alive
from .verdict import Report, Sent, outcomes

FUTURE_MS = 4_000  # inside the nodes' 5 s allowance: such frames are the sender's own business
FAR_FUTURE_MS = 60_000  # outside it: refused as stale


@dataclass
class Context:
    dep: Deployment
    attacker: Attacker
    observer: Observer
    operator: Node
    target: str  # a node the attacker's login can write to
    other_device: str | None  # another device, for "claims another device" and "on its topic"
    broker_url: str | None
    count: int = 200
    rate: float = 1000.0  # frames per second in a flood
    alter_field: str = "session"  # what ``alter`` changes
    recorded: list[tuple[str, bytes]] = field(default_factory=list)  # frames from a --record file
    capture: tuple[str, bytes] | None = None  # the frame replay and alter use (see ``captured``)
    seed: int = 8

    @property
    def target_role(self) -> Role:
        return Role.TRUST_MODULE if self.target.endswith(".tm") else Role.CHIP

    def link(self, device: str | None = None) -> str:
        return link_topic(self.attacker.role, self.target_role, device or self.attacker.device)


Attack = Callable[[Context, Report], Awaitable[list[Sent]]]


async def play(ctx: Context, name: str, attack: Attack) -> Report:
    report = Report(name, ctx.attacker.node_id, ctx.target)
    started = time.monotonic()
    mark = ctx.observer.mark()
    before = await ledger_summary(ctx.dep)
    sent = await attack(ctx, report)
    report.target_after = await target_alive(ctx.operator, ctx.observer, report.target, mark)
    seen = ctx.observer.seen[mark:]
    judged = outcomes(sent, seen)
    report.frames = [o for o in judged if o.sent.probe]
    load = [o for o in judged if not o.sent.probe]
    if load:
        report.load = {
            "frames": len(load),
            "answered": sum(o.accepted for o in load),
            **report.load,
        }
    report.events = ctx.observer.events(ctx.attacker.device, mark)
    after = await ledger_summary(ctx.dep)
    report.ledger = {"before": before, "after": after, "as_expected": before == after}
    report.seconds = round(time.monotonic() - started, 2)
    report.judge()
    return report


# -- forge -------------------------------------------------------------------------
async def forge(ctx: Context, report: Report) -> list[Sent]:
    a = ctx.attacker
    ident, topic = a.identity, ctx.link()
    sibling = node_id(Role.CHIP if ctx.target_role is Role.TRUST_MODULE else Role.TRUST_MODULE, a.device)
    stranger = KeyPair.generate()
    frames = [
        (
            "own key, claims to be " + sibling,
            topic,
            ctx.target,
            forged_ping(ident, topic, ctx.target, sibling),
        ),
        (
            "made-up key, claims to be " + a.node_id,
            topic,
            ctx.target,
            forged_ping(ident, topic, ctx.target, a.node_id, stranger),
        ),
    ]
    sibling_chain = (ctx.dep.load_public_cert(sibling).to_bytes(),)
    env, _ = forged_ping(ident, topic, ctx.target, sibling, stranger)
    env = with_chain(env, sibling_chain)
    frames.append(
        (
            f"made-up key, {sibling}'s own certificate",
            topic,
            ctx.target,
            (env, sign_frame(env, topic, stranger)),
        )
    )
    if ctx.other_device:
        other = node_id(a.role, ctx.other_device)
        other_target = node_id(ctx.target_role, ctx.other_device)
        other_topic = ctx.link(ctx.other_device)
        frames += [
            (
                f"own key, claims to be {other}, on its topic",
                other_topic,
                other_target,
                forged_ping(ident, other_topic, other_target, other),
            ),
            (
                f"own key, claims to be {other}, on our topic",
                topic,
                ctx.target,
                forged_ping(ident, topic, ctx.target, other),
            ),
        ]
    async with a.connect() as client:
        return [
            await a.publish(client, label, target, t, frame, env.message_id)
            for label, t, target, (env, frame) in frames
        ]


# -- replay and alter: a captured frame --------------------------------------------
async def captured(ctx: Context, wait_s: float = 60.0) -> tuple[str, bytes]:
    """The latest frame the attacker's own node sent to the target (a request if there is one).

    Taken from the --record file, else from what the observer saw; waits (bounded)
    for one if there is none yet: run a payment from the device meanwhile.
    """
    writable = {link_topic(ctx.attacker.role, r, ctx.attacker.device) for r in (Role.TRUST_MODULE, Role.CHIP)}

    def usable(topic: str, frame: bytes) -> bool:
        # a request of the protocol's on a link the attacker may write to (not the toolkit's own pings)
        header = peek(frame)
        return topic in writable and header is not None and not header.reply_to and header.type != "ping"

    if ctx.capture is None:
        for source in (ctx.recorded, ctx.observer.captured):
            found = [(t, f) for t, f in source if usable(t, f)]
            # one of a payment's session if there is one: its steps show whether it ran again
            found = [(t, f) for t, f in found if (h := peek(f)) is not None and h.session] or found
            if found:
                ctx.capture = found[-1]
                break
    if ctx.capture is None:
        try:
            await ctx.observer.wait_for(
                lambda s: bool(ctx.observer.captured) and usable(*ctx.observer.captured[-1]),
                timeout_s=wait_s,
            )
        except TimeoutError:
            raise ConfigError(
                f"no frame from {ctx.attacker.node_id} to replay or alter within {wait_s:g} s: pay from "
                f"its device meanwhile, or give --record FILE (a `trustpay monitor --record` file)"
            ) from None
        ctx.capture = ctx.observer.captured[-1]
    return ctx.capture


def receiver(topic: str) -> str:
    """The node a link topic leads to (a header's recipient may be "*")."""
    parsed = parse_topic(topic)
    assert parsed.dst is not None, topic
    return node_id(parsed.dst, parsed.device)


async def replay(ctx: Context, report: Report) -> list[Sent]:
    a = ctx.attacker
    topic, frame = await captured(ctx)
    header = peek(frame)
    assert header is not None
    report.target = receiver(topic)
    others = [r for r in (Role.TRUST_MODULE, Role.CHIP) if link_topic(a.role, r, a.device) != topic]
    places = [("again, later, on its own topic", topic, report.target)]
    places += [
        (f"on the {a.role.short}->{r.short} link", t, receiver(t))
        for r in others
        for t in [link_topic(a.role, r, a.device)]
    ]
    if ctx.other_device and a.device:
        moved = topic.replace(f"/dev/{a.device}/", f"/dev/{ctx.other_device}/")
        places.append((f"on {ctx.other_device}'s topic", moved, receiver(moved)))
    mark = ctx.observer.mark()
    async with a.connect() as client:
        sent = [
            await a.publish(client, f"captured {header.type} {label}", target, t, frame, header.message_id)
            for label, t, target in places
        ]
    await target_alive(ctx.operator, ctx.observer, report.target, mark)  # everything taken by now
    again = [
        e for e in ctx.observer.events(None, mark) if header.session and e["session"] == header.session.hex()
    ]
    session = header.session.hex()[:12]
    report.check(not again, f"no step of session {session}.. ran again: {again or 'none'}")
    return sent


async def alter(ctx: Context, report: Report) -> list[Sent]:
    """One field changed in captured frames, each re-signed with a key that is not its sender's.

    The attacker's own frame (captured) is re-signed with a made-up key (its own
    key would be the right one); another node's frame to the target (the chip's
    to the trust module, say), if one was seen, with the attacker's own key, on
    the link it was taken from and on the attacker's own link to the target.
    """
    a = ctx.attacker
    topic, frame = await captured(ctx)
    report.target = receiver(topic)
    fields = ALTERABLE if ctx.alter_field == "all" else (ctx.alter_field,)
    plan = [(topic, frame, topic, KeyPair.generate(), "a made-up key")]
    theirs = [
        (t, f)
        for t, f in ctx.observer.captured
        if (p := parse_topic(t)).device == a.device
        and p.src.on_device
        and p.src is not a.role
        and p.dst is ctx.target_role
        and (h := peek(f)) is not None
        and h.type != "ping"
    ]
    if theirs:
        taken_from, frame_of_other = theirs[-1]
        for published_on in (taken_from, topic):
            plan.append((taken_from, frame_of_other, published_on, a.identity.keys, "the attacker's own key"))
    async with a.connect() as client:
        sent = []
        for source_topic, original, published_on, keys, whose in plan:
            header = peek(original)
            assert header is not None
            where = "" if published_on == source_topic else f", moved to {published_on}"
            for name in fields:
                env, forged = altered(original, published_on, name, keys)
                label = f"{header.sender}'s {header.type} with {name} changed, re-signed with {whose}{where}"
                sent.append(
                    await a.publish(
                        client, label, receiver(published_on), published_on, forged, env.message_id
                    )
                )
        header = peek(frame)
        assert header is not None
        flipped = bytearray(frame)
        at = frame.index(header.message_id)
        flipped[at] ^= 1
        label = f"{header.sender}'s {header.type} with one bit of its id flipped, signature kept"
        flipped_id = bytes(flipped[at : at + len(header.message_id)])
        sent.append(await a.publish(client, label, report.target, topic, bytes(flipped), flipped_id))
    return sent


# -- takeover ----------------------------------------------------------------------
async def takeover(ctx: Context, report: Report) -> list[Sent]:
    """Connect with the target's client id (and the payment-server's): the target must stay on."""
    for victim in dict.fromkeys((ctx.target, Role.PAYMENT_SERVER.value)):
        mark = ctx.observer.mark()
        try:
            async with ctx.attacker.connect(client_id=victim):
                # while we hold the connection: does the victim still answer?
                during = await target_alive(ctx.operator, ctx.observer, victim, mark)
                connected = "the broker accepted the connection (under the login's own id, if it renames)"
        except aiomqtt.MqttError as exc:
            connected, during = f"the broker refused the connection: {exc}", {"answers_ping": None}
        after = await target_alive(ctx.operator, ctx.observer, victim, mark)
        stayed = bool(after["answers_ping"]) and not after["went_offline"] and not after["restarted"]
        report.check(
            stayed and during["answers_ping"] is not False,
            f"client id {victim!r}: {connected}; {victim} while connected: {during}; after: {after}",
        )
    return []


# -- flood ---------------------------------------------------------------------------
async def flood(ctx: Context, report: Report) -> list[Sent]:
    """``count`` genuine pings at ``rate``, as many stamped 4 s ahead, and some 60 s ahead.

    The genuine ones are the compromised node's to send (the target may answer
    them); what must hold is that the target stays up and answers everyone else,
    and that the far-future ones are refused.
    """
    a = ctx.attacker
    await a.fresh_epoch()
    topic, interval = ctx.link(), 1.0 / ctx.rate
    sent: list[Sent] = []
    started = asyncio.get_running_loop().time()
    mark = ctx.observer.mark()
    async with a.connect() as client:
        for ahead, n, probe in (
            (0, ctx.count, False),
            (FUTURE_MS, ctx.count, False),
            (FAR_FUTURE_MS, 20, True),
        ):
            for i in range(n):
                env, frame = a.identity.ping(topic, ctx.target, now_ms() + ahead)
                label = f"ping stamped {ahead // 1000} s ahead" if ahead else "ping"
                sent.append(await a.publish(client, label, ctx.target, topic, frame, env.message_id, probe))
                await asyncio.sleep(interval if i % 10 == 9 else 0)  # pacing in bursts of 10
            if ahead == FUTURE_MS:  # while the target remembers them all: does it take others' frames?
                other = await target_alive(ctx.operator, ctx.observer, ctx.target, mark)
                report.check(
                    bool(other["answers_ping"]),
                    f"another sender (the operator) accepted with {ctx.count} frames stamped 4 s ahead "
                    f"remembered: {other['ping']}",
                )
    took = asyncio.get_running_loop().time() - started
    report.load = {"rate_per_s": round(len(sent) / took), "seconds": round(took, 2)}
    return sent


# -- oversize and garbage ----------------------------------------------------------
async def publish_each(ctx: Context, frames: list[tuple[str, bytes, bytes]], qos: int = 1) -> list[Sent]:
    """Publish each (label, frame, message id), reconnecting when the broker cuts the connection."""
    a, topic, sent = ctx.attacker, ctx.link(), []
    pending = list(frames)
    for _ in range(len(frames) + 1):  # bounded: each turn publishes at least one frame or ends
        if not pending:
            break
        try:
            async with a.connect() as client:
                while pending:
                    label, frame, mid = pending[0]
                    result = await a.publish(client, label, ctx.target, topic, frame, mid, qos=qos)
                    sent.append(result)
                    pending.pop(0)
                    if not result.published.startswith("published"):
                        break  # the connection is gone: a new one for the next frame
        except aiomqtt.MqttError as exc:
            label, frame, mid = pending.pop(0)
            sent.append(Sent(label, topic, ctx.target, "", len(frame), mid.hex(), f"connection cut: {exc}"))
    return sent


async def oversize_attack(ctx: Context, report: Report) -> list[Sent]:
    # QoS 0: a broker that drops an oversize publish acknowledges nothing (Mosquitto cuts the
    # connection), so waiting for an acknowledgement would only wait; what arrived is the monitor's to say
    return await publish_each(ctx, [(f"{n} bytes", oversize(n), b"") for n in OVERSIZE_BYTES], qos=0)


async def garbage_attack(ctx: Context, report: Report) -> list[Sent]:
    env, genuine = ctx.attacker.identity.ping(ctx.link(), ctx.target)
    shapes = [
        (label, frame, env.message_id if "signed frame" in label else b"")
        for label, frame in garbage(random.Random(ctx.seed), genuine)
    ]
    return await publish_each(ctx, shapes)


# -- the toolkit's own check -------------------------------------------------------
async def control(ctx: Context, report: Report) -> list[Sent]:
    """A genuine ping, signed as the rules say: the target answers, so this reports NOT DEFENDED.

    It is the yardstick: if it ever said "defended", silence would not mean refusal.
    """
    a = ctx.attacker
    await a.fresh_epoch()
    env, frame = a.identity.ping(ctx.link(), ctx.target)
    async with a.connect() as client:
        return [await a.publish(client, "a genuine ping", ctx.target, ctx.link(), frame, env.message_id)]


# -- malware -------------------------------------------------------------------------
MALWARE = """
_RELEASED = {released!r}
with open({path!r}, 'wb') as _f:
    _f.write(_RELEASED)
_honest = make_order


def make_order(static, dynamic, **kw):
    kw['payee'], kw['amount'] = {payee!r}, 40_000
    return _honest(static, dynamic, **kw)
"""


async def malware(ctx: Context, report: Report) -> list[Sent]:
    """A payment app that, once loaded, writes its released bytes back and pays someone else 400.00.

    Installed in the device's chip files (the attacker's to write), then the
    user pays 1.25 with it; the chip must refuse (the app measured is not the
    release) and no money may move. The released bytes are put back afterwards.
    """
    device = ctx.attacker.device
    assert device is not None
    report.target = node_id(Role.CHIP, device)
    apps = await asyncio.to_thread(ctx.dep.installed_apps, device)
    merchants = [acc for acc in (await ledger_summary(ctx.dep))["balances"] if ":" not in acc]
    if not apps or len(merchants) < 2:
        report.check(False, f"{device} has no app to infect or the ledger fewer than two merchants")
        return []
    app, payee, thief = apps[0], merchants[0], merchants[-1]
    code_py = ctx.dep.app_dir(device, app) / "code.py"
    released = await asyncio.to_thread(code_py.read_bytes)
    payload = MALWARE.format(released=released, path=str(code_py.absolute()), payee=thief)
    tampered = released + payload.encode()
    await asyncio.to_thread(code_py.write_bytes, tampered)
    mark = ctx.observer.mark()
    try:
        code, result = await run_client(ctx, device, "pay", "1.25", payee, app)
        still = await asyncio.to_thread(code_py.read_bytes)
    finally:
        await asyncio.to_thread(code_py.write_bytes, released)
    report.check(
        code != 0 and result.get("status") != "confirmed",
        f"the user's payment with the infected {app}: exit {code}, {result}",
    )
    report.check(
        still == tampered, "none of the app's code ran before it was measured: it could not restore itself"
    )
    ran = [e for e in ctx.observer.events(device, mark) if e["step"] == "C5" and e["outcome"] == "ok"]
    report.check(not ran, f"no payment step C5 ran for the infected app: {ran or 'none'}")
    return []


async def run_client(ctx: Context, device: str, *words: str) -> tuple[int, dict[str, object]]:
    """``trustpay client --json`` as the device's user runs it: exit code and last JSON line."""
    try:
        run = await scenario.run_client(ctx.dep, device, ctx.broker_url, *words)
    except TimeoutError:
        return -1, {"status": "client timed out"}
    return run.code, run.result


ATTACKS: dict[str, Attack] = {
    "forge": forge,
    "replay": replay,
    "alter": alter,
    "takeover": takeover,
    "flood": flood,
    "oversize": oversize_attack,
    "garbage": garbage_attack,
    "malware": malware,
    "control": control,
}
DEFAULT_ORDER = ("forge", "replay", "alter", "takeover", "flood", "oversize", "garbage", "malware")


def load_recording(path: Path) -> list[tuple[str, bytes]]:
    """Frames of a ``trustpay monitor --record`` file, for replay and alter."""
    _, records = recording.read(path)
    return [(r.topic, r.frame) for r in records if isinstance(r, Arrival) and not r.retained]
