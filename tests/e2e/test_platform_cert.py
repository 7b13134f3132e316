"""C1: the platform certificate, checked at every payment: a rollback refused, a rotation accepted."""

from __future__ import annotations

import json
import time

import pytest

from nodes.deployment import Deployment, OfflineKeys
from protocol.certs import PLATFORM, CertBody, Certificate, issue
from protocol.keys import KeyPair

from .conftest import DEV1, E2E, OPENING, tm_of

pytestmark = pytest.mark.e2e


def newer_platform_cert(dep: Deployment) -> Certificate:
    """A platform certificate the update key signed, newer than every certificate in the deployment.

    Issued the way ``ops.rotate_cmd.rotate`` issues one, but written nowhere: the
    platform's servers keep presenting the older one.
    """
    old = dep.load_public("platform")
    update_cert, update_keys = dep.load_public("update"), OfflineKeys.of(dep.root).load("update")
    held = [*dep.certs_dir.glob("*.cert"), *dep.public_dir.glob("*.cert")]
    serial = 1 + max(Certificate.from_bytes(p.read_bytes()).serial for p in held)
    keys = KeyPair.generate()
    now_s = time.time_ns() // 1_000_000_000
    body = CertBody(
        serial,
        PLATFORM,
        PLATFORM,
        "",
        keys.sign_public,
        keys.box_public,
        now_s - 60,
        old.body.not_after,
        update_cert.subject,
        update_cert.serial,
    )
    return issue(body, update_keys)


def held_platform(dep: Deployment, device: str) -> Certificate:
    state = json.loads((dep.state_dir(tm_of(device)) / "trust.json").read_bytes())
    return Certificate.from_bytes(bytes.fromhex(state["platform_cert"]))


async def test_platform_certificate_older_than_the_terminals_is_refused_at_c1(e2e: E2E) -> None:
    """PROTOCOL.md C1: a terminal holding a newer platform certificate than the servers present.

    Every frame of the trust-server is then dropped by the terminal's frame verifier
    (``CertStore.resolve`` -> ``accept_platform``: "platform certificate 3 is not newer
    than N"), so ``c1.result`` never reaches ``TrustModule._attest``. Only a verified
    frame may end a request (a forged header must not end one), so the trust module
    waits out its retry budget; its refusal then says what the refused answers were
    refused for, instead of only blaming the network.
    """
    tm = tm_of(DEV1)
    state_path = e2e.dep.state_dir(tm) / "trust.json"
    newer = newer_platform_cert(e2e.dep)
    assert newer.serial > e2e.dep.load_public("platform").serial

    await e2e.launcher.kill(tm, 15)  # a clean stop: the state file is complete
    state = json.loads(state_path.read_bytes())
    assert Certificate.from_bytes(bytes.fromhex(state["platform_cert"])).serial < newer.serial
    state["platform_cert"] = newer.to_bytes().hex()
    state_path.write_text(json.dumps(state))
    mark = e2e.watcher.mark()
    await e2e.launcher.restart(tm)
    started = await e2e.wait_started(DEV1, since=mark)
    assert started.outcome == "done"
    before = await e2e.balances()

    run = await e2e.pay(DEV1, "2.00", "shop-1")

    assert run.code == 1, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "refused" and run.result["code"] == "untrusted"
    order_id = run.result["order_id"]
    c1 = await e2e.wait_event(mark, device=DEV1, step="C1", node=tm, order_id=order_id)
    assert c1.outcome == "refused", c1
    # the session ended at C1: no nonce, no quote, no verdict, no payment
    session = e2e.events(mark, session=c1.session)
    assert {e.step for e in session} <= {"C1", "C7"}, session
    assert not e2e.events(mark, device=DEV1, step="C2")
    assert not e2e.events(mark, device=DEV1, step="C5")
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}
    assert held_platform(e2e.dep, DEV1).serial == newer.serial  # the terminal never rolls back
    platform_said = [e.reason for e in e2e.events(mark, device=DEV1, step="C1", node="trust-server")]
    assert "is not newer than" in c1.reason, (
        f"the terminal's C1 refusal ({c1.reason!r}) does not name the certificate problem; "
        f"the trust-server had answered: {platform_said}"
    )


async def test_platform_key_rotation_while_devices_run(e2e: E2E) -> None:
    old = e2e.dep.load_public("platform")
    assert held_platform(e2e.dep, DEV1).to_bytes() == old.to_bytes()
    await e2e.trustpay("rotate-platform")
    new = e2e.dep.load_public("platform")
    assert new.serial > old.serial
    mark = e2e.watcher.mark()

    first = await e2e.pay(DEV1, "3.00", "shop-2")

    assert first.code == 0, (first.lines, first.stderr[-2000:])
    assert first.result["status"] == "confirmed"
    c1 = await e2e.wait_event(
        mark, device=DEV1, step="C1", node=tm_of(DEV1), order_id=first.result["order_id"]
    )
    assert c1.outcome == "trusted"
    assert "rotated" in c1.reason and "update certificate" in c1.reason, c1.reason
    assert held_platform(e2e.dep, DEV1).to_bytes() == new.to_bytes()
    mark = e2e.watcher.mark()

    second = await e2e.pay(DEV1, "4.00", "shop-2")

    assert second.code == 0, (second.lines, second.stderr[-2000:])
    c1 = await e2e.wait_event(
        mark, device=DEV1, step="C1", node=tm_of(DEV1), order_id=second.result["order_id"]
    )
    assert c1.outcome == "trusted" and "current" in c1.reason, c1.reason
    balances = await e2e.balances()
    assert balances[f"{DEV1}:wallet"] == OPENING - 700
    assert balances["shop-2"] == 700
    stored = e2e.stored_payments()
    assert {p.order_id: p.status for p in stored.values()} == {
        first.result["order_id"]: "confirmed",
        second.result["order_id"]: "confirmed",
    }
