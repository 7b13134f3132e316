"""The trust-server (21) on the in-memory bus: C1, C2->C4, grants, releases, key reload, restart.

A plain ``Node`` stands in for the trust module ``dev-0001.tm`` (it measures the
device's files on disk and quotes like the real one) and another for the
payment-server, which records the grants it is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.deployment import Deployment, OfflineKeys, write_file
from nodes.runtime import Node, Settings, now_ms
from nodes.trust_db import REVOKED, trust_db_at
from nodes.trust_server import NONCE_TTL_MS, VERDICT_TTL_MS, TrustServer
from ops.rotate_cmd import rotate
from protocol.appraisal import POLICY
from protocol.envelope import Received
from protocol.errors import Refused
from protocol.keys import KeyPair
from protocol.measure import APP, CLIENT, LogEntry, MeasurementLog, make_quote, measure
from protocol.messages import (
    Body,
    Challenge,
    Empty,
    Evidence,
    Grant,
    NonceRequest,
    PlatformCheck,
    PlatformResult,
    ReleaseUpdate,
    VerdictMessage,
)
from protocol.records import (
    AFFIRMING,
    CONTRAINDICATED,
    RELEASE_DOMAIN,
    VERDICT_DOMAIN,
    WARNING,
    Release,
    Verdict,
    open_record,
    record_hash,
    sign_record,
)
from protocol.topics import Role, operator_topic
from tests.storage import provisioned_on

from .harness import make_node, running, step_events

DEV = "dev-0001"
TS = "trust-server"
PS = "payment-server"


@pytest.fixture
def dep(tmp_path: Path, db_url: str | None) -> Deployment:
    return provisioned_on(tmp_path, db_url)  # every test on SQLite and on PostgreSQL


@dataclass
class Platform:
    dep: Deployment
    broker: FakeBroker
    ts: TrustServer
    tm: Node
    grants: list[Grant]


def payment_server(dep: Deployment, broker: FakeBroker, grants: list[Grant]) -> Node:
    ps = make_node(Node, dep, PS, broker)

    async def on_grant(rx: Received) -> tuple[str, Body]:
        grants.append(rx.envelope.body)
        return "trust.granted", Empty()

    ps.route("trust.grant", on_grant)
    return ps


@asynccontextmanager
async def platform(
    dep: Deployment,
    *,
    with_ps: bool = True,
    ts_settings: Settings | None = None,
    broker: FakeBroker | None = None,
) -> AsyncIterator[Platform]:
    broker = broker or FakeBroker()
    extra = {"settings": ts_settings} if ts_settings else {}
    ts = make_node(TrustServer, dep, TS, broker, deployment=dep, **extra)
    tm = make_node(Node, dep, f"{DEV}.tm", broker)
    grants: list[Grant] = []
    nodes = [ts, tm] + ([payment_server(dep, broker, grants)] if with_ps else [])
    async with running(*nodes):
        yield Platform(dep, broker, ts, tm, grants)


# -- the trust module's side ------------------------------------------------------
def order_hash(n: int = 1) -> bytes:
    """Stands for an intent hash: the trust-server only binds it, never opens it."""
    return record_hash(f"order-{n}".encode())


def device_log(dep: Deployment, tamper: str = "") -> MeasurementLog:
    """Measure the client and every installed app from disk; ``tamper`` alters one component's code."""
    components = [(CLIENT, CLIENT, dep.read_client(DEV))]
    components += [(APP, f"app:{app}", dep.read_app(DEV, app)) for app in dep.installed_apps(DEV)]
    log = MeasurementLog()
    for kind, component, files in components:
        static = json.loads(files.static)
        code = files.code + (b"\n# patched\n" if component == tamper else b"")
        m = measure(kind, static["name"], static["version"], code, files.static, files.dynamic)
        log.append(LogEntry(m, dynamic_as_stored=True))
    return log


async def c1(tm: Node, serial: int, fingerprint: bytes) -> PlatformResult:
    answer = await tm.request(
        tm.link(Role.TRUST_SERVER),
        "c1.check",
        PlatformCheck(serial, fingerprint),
        recipient=TS,
        expect="c1.result",
    )
    result: PlatformResult = answer.envelope.body
    return result


async def challenge(p: Platform, oh: bytes) -> Challenge:
    tm = p.tm
    answer = await tm.request(
        tm.link(Role.TRUST_SERVER),
        "c2.nonce",
        NonceRequest(oh),
        recipient=TS,
        expect="c2.challenge",
        peer=p.dep.load_cert(TS),  # sealed: the intent hash is over guessable fields
    )
    ch: Challenge = answer.envelope.body
    return ch


async def evidence(
    tm: Node,
    nonce: bytes,
    log: MeasurementLog,
    quoted_nonce: bytes | None = None,
    app: str = "wallet",
    timeout_s: float | None = None,
    attempts: int | None = None,
) -> VerdictMessage:
    quote = make_quote(DEV, quoted_nonce or nonce, log, tm.keys, now_ms())
    answer = await tm.request(
        tm.link(Role.TRUST_SERVER),
        "c2.evidence",
        Evidence(nonce, quote.to_bytes(), log.entries, app),
        recipient=TS,
        expect="c4.verdict",
        peer=tm.peers[TS],
        timeout_s=timeout_s,
        attempts=attempts,
    )
    message: VerdictMessage = answer.envelope.body
    return message


async def attest(p: Platform, oh: bytes, tamper: str = "") -> tuple[Challenge, VerdictMessage, Verdict]:
    ch = await challenge(p, oh)
    message = await evidence(p.tm, ch.nonce, device_log(p.dep, tamper))
    ts_key = p.dep.load_cert(TS).body.sign_key
    verdict = open_record(Verdict, message.verdict, VERDICT_DOMAIN, ts_key, "verdict").body
    return ch, message, verdict


def statuses(verdict: Verdict) -> dict[str, str]:
    return {a.component: a.status for a in verdict.appraisals}


# -- C1 ------------------------------------------------------------------------------
async def test_c1_trusts_the_provisioned_platform_certificate_only(dep: Deployment) -> None:
    held = dep.load_public("platform")
    async with platform(dep) as p:
        good = await c1(p.tm, held.serial, held.fingerprint)
        bad = await c1(p.tm, held.serial, os.urandom(16))
    assert good.trusted and "current" in good.reason
    assert good.platform_cert == held.to_bytes()
    assert not bad.trusted and "never this platform's" in bad.reason
    assert bad.platform_cert == held.to_bytes()


# -- C2 -> C4 --------------------------------------------------------------------------
async def test_an_intact_terminal_gets_an_affirming_verdict_and_one_grant(dep: Deployment) -> None:
    oh = order_hash()
    async with platform(dep) as p:
        before = now_ms()
        ch, message, verdict = await attest(p, oh)
        row = await p.ts.db.device(DEV)
        history = await p.ts.db.attestations(DEV)
    assert len(ch.nonce) == 32 and before + NONCE_TTL_MS <= ch.expires_ms <= now_ms() + NONCE_TTL_MS
    assert verdict.status == AFFIRMING
    assert (verdict.verifier, verdict.device, verdict.policy) == (TS, DEV, POLICY)
    assert (verdict.nonce, verdict.intent_hash) == (ch.nonce, oh)
    assert verdict.expires_ms - verdict.issued_ms == VERDICT_TTL_MS
    assert statuses(verdict) == {"client": AFFIRMING, "app:transit": AFFIRMING, "app:wallet": AFFIRMING}
    assert message.payment_chain == (dep.load_cert(PS).to_bytes(), dep.load_public("platform").to_bytes())
    assert p.grants == [Grant(DEV, oh, message.verdict, verdict.expires_ms)]
    assert row is not None and row.last_status == AFFIRMING and row.consecutive_failures == 0
    assert row.last_attested_ms is not None and row.last_attested_ms >= before
    assert [(a.status, a.nonce, a.verdict) for a in history] == [(AFFIRMING, ch.nonce, message.verdict)]
    assert history[0].granted_ms is not None
    seen = [(e.step, e.outcome, e.device) for e in step_events(p.broker)]
    assert ("C3", "ok", DEV) in seen and ("C4", "trusted", DEV) in seen


async def test_a_tampered_client_is_contraindicated_and_not_granted(dep: Deployment) -> None:
    async with platform(dep) as p:
        _, _, verdict = await attest(p, order_hash(1), tamper=CLIENT)
        failed = await p.ts.db.device(DEV)
        _, _, again = await attest(p, order_hash(2))
        healed = await p.ts.db.device(DEV)
    assert verdict.status == CONTRAINDICATED
    assert statuses(verdict)["client"] == CONTRAINDICATED
    assert [g.intent_hash for g in p.grants] == [order_hash(2)]  # the tampered attempt was never granted
    assert failed is not None and failed.consecutive_failures == 1 and failed.last_status == CONTRAINDICATED
    assert again.status == AFFIRMING
    assert healed is not None and healed.consecutive_failures == 0


async def test_a_tampered_app_only_warns_and_is_granted(dep: Deployment) -> None:
    async with platform(dep) as p:
        _, message, verdict = await attest(p, order_hash(), tamper="app:transit")
    assert verdict.status == WARNING
    assert statuses(verdict) == {"client": AFFIRMING, "app:transit": CONTRAINDICATED, "app:wallet": AFFIRMING}
    assert [g.verdict for g in p.grants] == [message.verdict]


async def test_a_tampered_paying_app_is_contraindicated(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch = await challenge(p, order_hash())
        message = await evidence(p.tm, ch.nonce, device_log(dep, tamper="app:wallet"), app="wallet")
    verdict = open_record(Verdict, message.verdict, VERDICT_DOMAIN, dep.load_cert(TS).body.sign_key, "v").body
    assert verdict.status == CONTRAINDICATED and p.grants == []
    assert statuses(verdict)["app:wallet"] == CONTRAINDICATED


async def test_a_log_without_the_paying_app_is_contraindicated(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch = await challenge(p, order_hash())
        log = MeasurementLog()
        log.append(device_log(dep).entries[0])  # the client alone
        message = await evidence(p.tm, ch.nonce, log)
    verdict = open_record(Verdict, message.verdict, VERDICT_DOMAIN, dep.load_cert(TS).body.sign_key, "v").body
    assert verdict.status == CONTRAINDICATED and p.grants == []
    assert any("app:wallet: missing" in a.reason for a in verdict.appraisals)


async def test_a_revoked_device_is_contraindicated(dep: Deployment) -> None:
    async with platform(dep) as p:
        await p.ts.db.set_device_status(DEV, REVOKED)
        _, _, verdict = await attest(p, order_hash())
    assert verdict.status == CONTRAINDICATED and p.grants == []
    assert [a.reason for a in verdict.appraisals if a.component == "device"] == ["device revoked"]


# -- nonces ------------------------------------------------------------------------------
async def test_a_nonce_is_used_once(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch, _, _ = await attest(p, order_hash())
        with pytest.raises(Refused) as used:
            await evidence(p.tm, ch.nonce, device_log(dep))
        with pytest.raises(Refused) as unknown:
            await evidence(p.tm, os.urandom(32), device_log(dep))
    assert used.value.refusal_code == "nonce_used"
    assert unknown.value.refusal_code == "nonce_unknown"
    assert len(p.grants) == 1


async def test_concurrent_evidence_for_one_nonce_has_one_winner(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch = await challenge(p, order_hash())
        log = device_log(dep)
        results = await asyncio.gather(
            *(evidence(p.tm, ch.nonce, log) for _ in range(4)), return_exceptions=True
        )
        history = await p.ts.db.attestations(DEV)
    verdicts = [r for r in results if isinstance(r, VerdictMessage)]
    refused = [r.refusal_code for r in results if isinstance(r, Refused)]
    assert len(verdicts) == 1 and refused == ["nonce_used"] * 3
    assert len(history) == 1 and len(p.grants) == 1


async def test_an_expired_nonce_is_refused(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch = await challenge(p, order_hash())
        p.ts.clock = lambda: now_ms() + NONCE_TTL_MS + 1_000
        with pytest.raises(Refused) as expired:
            await evidence(p.tm, ch.nonce, device_log(dep))
    assert expired.value.refusal_code == "nonce_expired"
    assert "request a new challenge" in expired.value.refusal_reason
    assert p.grants == []


async def test_a_quote_over_another_nonce_is_refused_and_burns_the_nonce(dep: Deployment) -> None:
    async with platform(dep) as p:
        ch = await challenge(p, order_hash())
        with pytest.raises(Refused) as mismatch:
            await evidence(p.tm, ch.nonce, device_log(dep), quoted_nonce=os.urandom(32))
        with pytest.raises(Refused) as retry:
            await evidence(p.tm, ch.nonce, device_log(dep))
        row = await p.ts.db.device(DEV)
    assert mismatch.value.refusal_code == "measurement_mismatch"
    assert "another nonce" in mismatch.value.refusal_reason
    assert retry.value.refusal_code == "nonce_used"
    assert row is not None and row.last_status == "refused" and row.consecutive_failures == 1
    assert p.grants == []


async def test_used_nonces_stay_used_across_a_restart(dep: Deployment) -> None:
    broker, grants = FakeBroker(), list[Grant]()
    tm = make_node(Node, dep, f"{DEV}.tm", broker)
    async with running(tm, payment_server(dep, broker, grants)):
        first = make_node(TrustServer, dep, TS, broker, deployment=dep)
        async with running(first):  # leaving it waits for the node, and its database, to close
            ch, _, _ = await attest(Platform(dep, broker, first, tm, grants), order_hash())
        second = make_node(TrustServer, dep, TS, broker, deployment=dep)  # same database file
        async with running(second):
            with pytest.raises(Refused) as used:
                await evidence(tm, ch.nonce, device_log(dep))
            row = await second.db.device(DEV)
            _, _, verdict = await attest(Platform(dep, broker, second, tm, grants), order_hash(2))
    assert used.value.refusal_code == "nonce_used"
    assert row is not None and row.last_status == AFFIRMING and row.last_attested_ms is not None
    assert verdict.status == AFFIRMING
    assert len(grants) == 2


# -- the payment-server ---------------------------------------------------------------------
async def test_no_verdict_without_an_acknowledged_grant(dep: Deployment) -> None:
    quick = Settings(request_timeout_s=0.05, request_attempts=2)
    async with platform(dep, with_ps=False, ts_settings=quick) as p:
        ch = await challenge(p, order_hash())
        with pytest.raises(Refused) as refused:
            await evidence(p.tm, ch.nonce, device_log(dep), timeout_s=5, attempts=1)
        history = await p.ts.db.attestations(DEV)
    assert refused.value.refusal_code == "platform_unavailable"
    assert [(a.status, a.granted_ms) for a in history] == [(AFFIRMING, None)]


# -- operator ----------------------------------------------------------------------------------
async def test_a_withdrawn_client_release_makes_the_terminal_contraindicated(dep: Deployment) -> None:
    issuer = OfflineKeys.of(dep.root).load("issuer")
    m = device_log(dep).entries[0].measurement
    withdrawal = Release(CLIENT, m.name, m.version, m.code, m.static, True, now_ms())
    blob = sign_record(withdrawal, RELEASE_DOMAIN, issuer).to_bytes()
    forged = sign_record(withdrawal, RELEASE_DOMAIN, KeyPair.generate()).to_bytes()
    broker = FakeBroker()
    op = make_node(Node, dep, "operator", broker)
    async with platform(dep, broker=broker) as p, running(op):
        _, _, before = await attest(p, order_hash(1))
        with pytest.raises(Refused) as refused:
            await op.request(
                operator_topic(Role.TRUST_SERVER),
                "release.update",
                ReleaseUpdate(forged),
                recipient=TS,
                expect="release.ok",
            )
        await op.request(
            operator_topic(Role.TRUST_SERVER),
            "release.update",
            ReleaseUpdate(blob),
            recipient=TS,
            expect="release.ok",
        )
        _, _, after = await attest(p, order_hash(2))
    assert refused.value.refusal_code == "bad_signature"
    assert before.status == AFFIRMING
    assert after.status == CONTRAINDICATED
    assert [a.reason for a in after.appraisals if a.component == CLIENT] == [
        f"client: version {m.version} has been withdrawn"
    ]
    assert [g.intent_hash for g in p.grants] == [order_hash(1)]
    # the withdrawal is durable: a fresh look at the database still has it
    db = trust_db_at(dep.database("trust"))
    await db.open()
    try:
        assert any(r.withdrawn for r in await db.releases())
    finally:
        await db.close()


async def test_keys_reload_rotates_the_platform_and_c1_says_so(dep: Deployment) -> None:
    old = dep.load_public("platform")
    broker = FakeBroker()
    op = make_node(Node, dep, "operator", broker)
    async with platform(dep, broker=broker) as p, running(op):
        p.tm.certs.set_update(dep.load_public("update"))  # the chip hands it over in a real terminal
        new = rotate(dep)
        await op.request(
            operator_topic(Role.TRUST_SERVER), "keys.reload", Empty(), recipient=TS, expect="keys.reloaded"
        )
        superseded = await c1(p.tm, old.serial, old.fingerprint)
        current = await c1(p.tm, new.serial, new.fingerprint)
        signer = p.tm.peers[TS]
    assert superseded.trusted
    assert superseded.reason == f"rotated: accept serial {new.serial} through the update certificate"
    assert superseded.platform_cert == new.to_bytes() == current.platform_cert
    assert current.trusted and "current" in current.reason
    assert signer.to_bytes() == dep.load_cert(TS).to_bytes()  # answers are signed with the new key
    assert p.ts.payment_cert is not None and p.ts.payment_cert.to_bytes() == dep.load_cert(PS).to_bytes()


async def test_keys_reload_refuses_an_older_platform_certificate(dep: Deployment) -> None:
    broker = FakeBroker()
    op = make_node(Node, dep, "operator", broker)
    async with platform(dep, broker=broker) as p, running(op):
        held = p.ts.certs.platform
        original = dep.public_cert_path("platform").read_bytes()
        rotate(dep)
        await op.request(
            operator_topic(Role.TRUST_SERVER), "keys.reload", Empty(), recipient=TS, expect="keys.reloaded"
        )
        write_file(dep.public_cert_path("platform"), original)  # someone restores an old backup
        with pytest.raises(Refused) as refused:
            await op.request(
                operator_topic(Role.TRUST_SERVER),
                "keys.reload",
                Empty(),
                recipient=TS,
                expect="keys.reloaded",
            )
        still = p.ts.certs.platform
    assert refused.value.refusal_code == "cert_invalid" and "not newer" in refused.value.refusal_reason
    assert held is not None and still is not None and still.serial > held.serial
