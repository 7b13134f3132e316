"""The chip runs exactly the measured app bytes, bounded, and pays only what the user asked (C2, C5).

Every hostile app here is a *released* version (the issuer signed it), so it
passes A2 and C4: what stops it is the chip's C5 (the sandboxed worker and the
intent check) or the trust module's C2 check that what it measured is what the
chip read. The chip, trust module, trust-server and payment-server are real
nodes on the in-memory bus; a bare node with the client's identity sends
``pay.start`` so each test sees the chip's ``PayResult`` itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.deployment import Deployment, OfflineKeys
from nodes.payment_server import PaymentServer
from nodes.runtime import Node
from nodes.trust_db import NonceRow
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from ops.release_cmd import make_release
from protocol.codec import unpack
from protocol.errors import Refused
from protocol.measure import APP, dynamic_digest, measure
from protocol.messages import Empty, JournalEntry, PayResult, PayStart
from protocol.records import PACKAGE_DOMAIN, Package, sign_record
from protocol.topics import Role

from .harness import make_node, provisioned, running, step_events

DEV, PAYER = "dev-0001", "dev-0001:wallet"
CHIP, TM, CLIENT = f"{DEV}.chip", f"{DEV}.tm", f"{DEV}.client"

# One hostile app; what it does depends on the amount asked, so one release covers every case.
HOSTILE = """
from __future__ import annotations

KEY = {key!r}


def _os():
    for cls in ().__class__.__base__.__subclasses__():  # the classic escape from restricted builtins
        if cls.__name__ == "_wrap_close":
            return cls.__init__.__globals__
    raise RuntimeError("os is out of reach")


def make_order(static, dynamic, *, device, payee, amount, currency, order_id, now_ms):
    counter = int(dynamic.get("counter", 0)) + 1
    order = dict(order_id=order_id, device=device, app=static["name"], payee=payee, amount=amount,
                 currency=currency, counter=counter, created_ms=now_ms)
    next_dynamic = {{**dynamic, "counter": counter, "last_order": order_id}}
    if amount == 111:  # steal the chip's private key into the app's own data, then pay as asked
        tried = []
        for read in (lambda: open(KEY, "rb").read(), lambda: _os()["read"](_os()["open"](KEY, 0), 4096)):
            try:
                next_dynamic["loot"] = read().hex()
                break
            except Exception as exc:
                tried.append(repr(exc))
        else:
            raise RuntimeError("; ".join(tried))
    elif amount == 222:
        while True:
            pass
    elif amount == 333:
        raise RuntimeError("the app crashed")
    elif amount == 444:
        _os()["_exit"](3)
    elif amount == 555:  # the user asked 5.55 to shop-1; the app pays 400.00 to shop-2
        order = {{**order, "payee": "shop-2", "amount": 40_000}}
    return order, next_dynamic
"""


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


def release_app(dep: Deployment, tmp: Path, app: str, code: bytes) -> None:
    """Install ``code`` as ``app`` 1.0.0 on DEV, released and packaged by the issuer (before start-up)."""
    app_dir = dep.app_dir(DEV, app)
    (app_dir / "code.py").write_bytes(code)
    build = tmp / f"build-{app}"
    build.mkdir()
    (build / "code.py").write_bytes(code)
    (build / "static.json").write_bytes((app_dir / "static.json").read_bytes())
    make_release(dep, "app", app, "1.0.0", build, withdraw=False)
    m = measure(APP, app, "1.0.0", code, (app_dir / "static.json").read_bytes(), b"")
    package = Package(app, "1.0.0", m.code, m.static)
    signed = sign_record(package, PACKAGE_DOMAIN, OfflineKeys.of(dep.root).load("issuer"))
    (app_dir / "package.sig").write_bytes(signed.to_bytes())


@dataclass
class Device:
    dep: Deployment
    broker: FakeBroker
    chip: Chip
    tm: TrustModule
    ps: PaymentServer
    ts: TrustServer
    client: Node

    async def pay(self, amount: int, payee: str = "shop-1", app: str = "wallet") -> PayResult:
        start = PayStart(f"ord-{uuid.uuid4().hex}", app, amount, "EUR", payee, dynamic_digest(b"{}\n"))
        answer = await self.client.request(
            self.client.link(Role.CHIP),
            "pay.start",
            start,
            recipient=CHIP,
            expect="pay.result",
            session=uuid.uuid4().bytes,
            peer=self.dep.load_cert(CHIP),
            timeout_s=30,
            attempts=1,
        )
        result: PayResult = answer.envelope.body
        return result

    async def balances(self) -> dict[str, int]:
        return {a.account: a.balance for a in (await self.ps.ledger.snapshot()).accounts}

    def dynamic(self, app: str = "wallet") -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.dep.app_dir(DEV, app) / "dynamic.json").read_bytes())
        return loaded


@asynccontextmanager
async def device(dep: Deployment) -> AsyncIterator[Device]:
    broker = FakeBroker()
    ts = make_node(TrustServer, dep, "trust-server", broker, deployment=dep)
    ps = make_node(PaymentServer, dep, "payment-server", broker, deployment=dep)
    chip = make_node(Chip, dep, CHIP, broker, deployment=dep)
    chip.sandbox.wall_s = 1.0  # a hung app is cut off after this (its CPU limit would at 2 s)
    tm = make_node(TrustModule, dep, TM, broker, deployment=dep)
    client = make_node(Node, dep, CLIENT, broker)
    async with running(ts, ps, chip, tm, client, timeout_s=20):
        async with asyncio.timeout(10):
            await tm.started.wait()
        await client.request(
            client.link(Role.CHIP), "chip.open", Empty(), recipient=CHIP, expect="chip.state", session=b""
        )
        yield Device(dep, broker, chip, tm, ps, ts, client)


def hostile(dep: Deployment, tmp_path: Path) -> None:
    release_app(dep, tmp_path, "wallet", HOSTILE.format(key=str(dep.node_key_path(CHIP).absolute())).encode())


async def test_an_app_that_reads_the_chip_key_gets_nothing_and_is_refused(
    dep: Deployment, tmp_path: Path
) -> None:
    hostile(dep, tmp_path)
    key = dep.node_key_path(CHIP).read_bytes()
    async with device(dep) as d:
        before = await d.balances()
        result = await d.pay(111)
        after = await d.balances()
        dynamic = d.dynamic()
    # Without the worker (the app exec'd inside the chip), both reads succeed: the key lands in
    # dynamic.json and the payment goes through.
    assert (result.status, result.code) == ("refused", "app_failed"), result
    assert "may not do 'open'" in result.reason and "'open' is not defined" in result.reason
    assert after == before
    assert "loot" not in dynamic and dynamic["counter"] == 0
    log = dep.log_path(CHIP).read_bytes()
    for secret in (key, key.hex().encode()):
        assert secret not in log and secret not in result.reason.encode()


async def test_an_app_that_hangs_is_cut_off_and_the_next_payment_goes_through(
    dep: Deployment, tmp_path: Path
) -> None:
    hostile(dep, tmp_path)
    async with device(dep) as d:
        before = await d.balances()
        hung = await d.pay(222)
        paid = await d.pay(100)
        after = await d.balances()
    assert (hung.status, hung.code) == ("refused", "app_failed"), hung
    assert "did not finish within 1 s" in hung.reason
    assert paid.status == "confirmed", paid
    assert after[PAYER] == before[PAYER] - 100


@pytest.mark.parametrize(("amount", "why"), [(333, "RuntimeError: the app crashed"), (444, "crashed")])
async def test_an_app_that_raises_or_exits_is_refused_and_the_chip_carries_on(
    dep: Deployment, tmp_path: Path, amount: int, why: str
) -> None:
    hostile(dep, tmp_path)
    async with device(dep) as d:
        before = await d.balances()
        failed = await d.pay(amount)
        paid = await d.pay(100)
        after = await d.balances()
    assert (failed.status, failed.code) == ("refused", "app_failed"), failed
    assert why in failed.reason
    assert paid.status == "confirmed", paid
    assert after[PAYER] == before[PAYER] - 100


async def test_an_order_other_than_the_users_is_refused_and_nothing_changes(
    dep: Deployment, tmp_path: Path
) -> None:
    hostile(dep, tmp_path)
    async with device(dep) as d:
        before = await d.balances()
        dynamic_before = d.dynamic()
        result = await d.pay(555, "shop-1")
        after = await d.balances()
        orders = [t for t, _ in d.broker.matching(f"tp/v1/dev/{DEV}/chip/ps")]
        c5 = [e for e in step_events(d.broker) if e.step == "C5"]
        dynamic_after = d.dynamic()
        snapshot = await d.ps.ledger.snapshot()
    # Without the chip's check the app's dynamic data is written and its order leaves the chip
    # signed (the payment-server would then find no grant for it: the grant names the intent).
    assert (result.status, result.code) == ("refused", "order_mismatch"), result
    assert orders == []  # no order left the chip
    assert [e.outcome for e in c5] == ["refused"] and c5[0].reason == "order_mismatch"
    assert after == before and snapshot.payments == ()
    assert dynamic_after == dynamic_before


async def test_an_app_changed_after_the_chip_read_it_is_refused_at_c2(
    dep: Deployment, tmp_path: Path
) -> None:
    released = (dep.app_dir(DEV, "wallet") / "code.py").read_bytes()
    swapped = released + b"\n_honest = make_order\n\n\ndef make_order(static, dynamic, **kw):\n"
    swapped += (
        b'    order, nxt = _honest(static, dynamic, **kw)\n    return order, {**nxt, "hostile": True}\n'
    )
    async with device(dep) as d:
        code_py = dep.app_dir(DEV, "wallet") / "code.py"
        code_py.write_bytes(swapped)  # what the chip reads into its buffer

        def put_back(topic: str, frame: bytes) -> list[bytes]:
            # the attacker restores the released bytes once the chip has read the app, before C2
            if topic.endswith("/chip/tm") and unpack(frame[:-64])[1] == "attest.request":
                code_py.write_bytes(released)
            return [frame]

        d.broker.tap = put_back
        before = await d.balances()
        result = await d.pay(100)
        d.broker.tap = None
        after = await d.balances()
        c2 = [e for e in step_events(d.broker) if e.step == "C2" and e.node == TM]
        dynamic = d.dynamic()
    # Without the C2 comparison the trust module measures the released file, the verdict
    # affirms, and the chip runs its swapped buffer: the payment goes through, "hostile" written.
    assert (result.status, result.code) == ("refused", "app_changed"), result
    assert "changed between the chip reading it and the trust module measuring it" in result.reason
    assert [e.outcome for e in c2] == ["refused"]
    assert after == before
    assert "hostile" not in dynamic


class NamesItself(TrustServer):
    """Grants as usual, then names itself as the payment-server in the chain it hands the device.

    That chain verifies (a real certificate of this platform) but its leaf is a trust-server's.
    """

    async def _grant(self, nonce: NonceRow, verdict: bytes, expires_ms: int, session: bytes) -> None:
        await super()._grant(nonce, verdict, expires_ms, session)
        self.payment_cert = self.dep.load_cert("trust-server")


async def test_a_payment_chain_that_does_not_end_in_the_payment_server_is_refused(
    dep: Deployment,
) -> None:
    async with device(dep) as d:
        before = await d.balances()
        d.ts.__class__ = NamesItself
        result = await d.pay(100)
        orders = d.broker.matching(f"tp/v1/dev/{DEV}/chip/ps")
        after = await d.balances()
    # Without the role check the chip accepts the chain and seals the order for the trust-server.
    assert (result.status, result.code) == ("refused", "platform_untrusted"), result
    assert "trust-server" in result.reason
    assert orders == []
    assert after == before


async def test_a_payment_cut_off_after_c5_leaves_the_app_trusted_at_the_next_start(dep: Deployment) -> None:
    async with device(dep) as d:

        def lose_c6(topic: str, frame: bytes) -> list[bytes]:  # the device dies before C6 reaches tm
            return [] if topic.endswith("/chip/tm") and unpack(frame[:-64])[1] == "c6.done" else [frame]

        d.broker.tap = lose_c6
        paid = await d.pay(100)
        d.broker.tap = None
        d.tm.stop()
        async with asyncio.timeout(10):  # the device is off: its trust module let go of its identity
            await d.tm.finished.wait()
        written = d.dynamic()
        mark = len(step_events(d.broker))
        again = make_node(TrustModule, dep, TM, d.broker, deployment=dep)
        async with running(again):
            async with asyncio.timeout(10):
                await again.started.wait()
            apps = list(again.apps)
        after = [f"{e.step}:{e.outcome}" for e in step_events(d.broker)[mark:] if e.node == TM]
    # Without c5.journal the new dynamic digest was never announced: A2 finds the counter changed
    # outside a session and deletes the app.
    assert paid.status == "confirmed", paid
    assert written["counter"] == 1
    assert sorted(apps) == ["transit", "wallet"]
    assert "A3:deleted" not in after and "A2:ok" in after


async def test_the_journal_takes_a_digest_only_for_a_session_with_a_trusted_verdict(dep: Deployment) -> None:
    async with device(dep) as d:
        # changed outside a session: the attestation of the next payment ends untrusted (C4)
        (dep.app_dir(DEV, "wallet") / "dynamic.json").write_bytes(b'{"counter":5,"last_order":""}\n')
        refused = await d.pay(100)
        wanted = dynamic_digest(b'{"counter":6,"last_order":""}\n')
        outcomes = []
        for session in (refused.session, uuid.uuid4().bytes):  # untrusted, and never attested
            try:
                await d.chip.request(
                    d.chip.link(Role.TRUST_MODULE),
                    "c5.journal",
                    JournalEntry("wallet", wanted),
                    recipient=TM,
                    expect="journalled",
                    session=session,
                    peer=dep.load_cert(TM),
                )
                outcomes.append("journalled")
            except Refused as exc:
                outcomes.append(exc.refusal_code)
        journalled = {h for s in d.tm.data["sessions"].values() for h in s["pending"].get("app:wallet", [])}
    # Without the check, the digest joins the untrusted session's journal and A2 would later
    # accept it: a change made outside an attested payment, let through.
    assert (refused.code, outcomes) == ("untrusted", ["no_session", "no_session"]), refused
    assert wanted.hex() not in journalled
