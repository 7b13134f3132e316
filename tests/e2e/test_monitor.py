"""`trustpay monitor` on a live deployment: a payment all ok, four tampered frames named, replay equal.

The monitor runs as its own process (``trustpay monitor --json --record``), the
way an operator runs it; the test publishes the tampered frames directly on
the broker with the client's login (its process has exited after paying, so
nobody's session is taken over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from protocol.codec import unpack
from protocol.envelope import new_id, peek, sign_frame
from protocol.keys import KeyPair
from protocol.messages import SessionDone
from protocol.schema import from_map
from protocol.topics import Role, link_topic

from .conftest import DEV1, E2E, WAIT_S, client_of

pytestmark = pytest.mark.e2e

Obs = dict[str, Any]


@dataclass
class MonitorRun:
    """A ``trustpay monitor --json`` process and every line it printed so far."""

    proc: asyncio.subprocess.Process
    lines: list[Obs] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def frames(self) -> list[Obs]:
        return [o for o in self.lines if o["kind"] == "frame"]

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:  # ends when the process closes its output
            self.lines.append(json.loads(line))
            self.changed.set()

    async def wait_for(self, predicate: Callable[[Obs], bool]) -> Obs:
        async with asyncio.timeout(WAIT_S):
            while True:  # each turn waits for a new line; bounded by the timeout
                found = [o for o in self.frames if predicate(o)]
                if found:
                    return found[0]
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def monitor(e2e: E2E, *extra: str) -> AsyncIterator[MonitorRun]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "ops.cli", "monitor", "--deploy", str(e2e.dep.root), "--broker", e2e.launcher.broker_url),
        *("--json", *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = MonitorRun(proc)
    reader = asyncio.create_task(run.read())
    try:
        # the retained statuses arrive right after the subscription: from here on it sees everything
        await run.wait_for(lambda o: o["type"] == "status" and o["retained"])
        yield run
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT_S):
            await reader
            await proc.wait()


async def test_monitor_passes_a_payment_flags_tampered_frames_and_replays_the_same(
    e2e: E2E, tmp_path: Path
) -> None:
    recorded = tmp_path / "run.jsonl"
    c7_topic = link_topic(Role.CLIENT, Role.TRUST_MODULE, DEV1)
    async with monitor(e2e, "--record", str(recorded)) as mon, e2e.capture(c7_topic) as capture:
        first = await e2e.pay(DEV1, "2.50", "shop-2")  # a client process of its own: a new boot epoch
        assert first.code == 0, (first.lines, first.stderr[-2000:])
        run = await e2e.pay(DEV1, "1.25", "shop-1")
        assert run.code == 0, (run.lines, run.stderr[-2000:])
        order = run.result["order_id"]
        c7 = await mon.wait_for(
            lambda o: (o["event"] or {}).get("step") == "C7" and o["event"]["order_id"] == order
        )
        session = c7["event"]["session"]
        await mon.wait_for(
            lambda o: o["type"] == "measured" and o["dst"] == "client" and o["session"] == session
        )
        paid = [o for o in mon.frames if o["session"] == session]
        before = list(mon.frames)

        # a real c7.done of this payment, as it crossed the client -> trust module link
        await capture.wait_until(lambda: [_type(f) for f in capture.on(c7_topic)].count("c7.done") >= 2)
        original = [f for f in capture.on(c7_topic) if _type(f) == "c7.done"][-1]  # the second payment's
        header = peek(original)
        assert header is not None
        # the same message under a new id, with the client's certificate chain, signed by another key
        body = from_map(SessionDone, unpack(header.body), "c7.done")
        forged_env = dataclasses.replace(header, message_id=new_id(), body=body)
        forged = sign_frame(forged_env, c7_topic, KeyPair.generate())
        altered = bytearray(original)
        altered[original.index(header.session)] ^= 0x01
        misplaced_on = link_topic(Role.CLIENT, Role.CHIP, DEV1)
        async with e2e.raw_client(client_of(DEV1)) as client:
            await client.publish(c7_topic, forged, qos=1)
            await client.publish(c7_topic, bytes(altered), qos=1)
            await client.publish(c7_topic, original, qos=1)
            await client.publish(misplaced_on, original, qos=1)

        mid = header.message_id.hex()
        forged_seen = await mon.wait_for(lambda o: o["message_id"] == forged_env.message_id.hex())
        altered_seen = await mon.wait_for(lambda o: o["session"] != session and o["message_id"] == mid)
        replayed_seen = await mon.wait_for(lambda o: o["topic"] == c7_topic and o["verdict"] == "replayed")
        misplaced_seen = await mon.wait_for(lambda o: o["topic"] == misplaced_on and o["message_id"] == mid)
        # the trust module took the copy for a retry and re-sent its cached answer: honest, a duplicate
        re_answer = await mon.wait_for(lambda o: o["reply_to"] == mid and o["verdict"] != "ok")

    # every frame of the payment, and every frame of both payments before the tampering, passed
    assert len(paid) >= 18 and {o["verdict"] for o in before} == {"ok"}, [
        o for o in before if o["verdict"] != "ok"
    ]
    assert {"pay.start", "attest.request", "c2.evidence", "pay.order", "pay.receipt", "c7.done"} <= {
        o["type"] for o in paid
    }
    assert (forged_seen["verdict"], forged_seen["sender"]) == ("bad_signature", client_of(DEV1))
    assert altered_seen["verdict"] == "bad_signature"
    assert replayed_seen["message_id"] == mid and "exact copy" in replayed_seen["reason"]
    assert misplaced_seen["verdict"] == "wrong_topic" and f"signed for {c7_topic}" in misplaced_seen["reason"]
    assert (re_answer["verdict"], re_answer["type"]) == ("duplicate", "measured")
    summary = mon.lines[-1]
    assert summary["kind"] == "summary" and mon.proc.returncode == 0
    assert summary["rejects"] == {"bad_signature": 2, "duplicate": 1, "replayed": 1, "wrong_topic": 1}

    # the recording, replayed offline, tells the same story line for line
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "ops.cli", "monitor", "--replay", str(recorded), "--json"),
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert [json.loads(line) for line in out.splitlines()] == mon.lines


def _type(frame: bytes) -> str:
    header = peek(frame)
    return header.type if header is not None else ""
