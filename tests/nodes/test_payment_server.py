"""The payment-server on the in-memory bus, over a real provisioned deployment and a real ledger:
every test runs on SQLite and on PostgreSQL (``tests.storage.db_url``)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.deployment import Deployment
from nodes.ledger import LedgerConflict, PaymentRecord, ledger_at, read_snapshot
from nodes.payment_server import PaymentServer
from nodes.runtime import Node, Settings, now_ms, ping
from ops.rotate_cmd import rotate
from protocol.codec import unpack
from protocol.envelope import Envelope, Received
from protocol.errors import Refused
from protocol.keys import KeyPair
from protocol.messages import AccountInfo, AccountQuery, Grant, PayOrder
from protocol.records import (
    AFFIRMING,
    CONTRAINDICATED,
    ORDER_DOMAIN,
    RECEIPT_DOMAIN,
    VERDICT_DOMAIN,
    Appraisal,
    Order,
    Receipt,
    Verdict,
    intent_hash,
    intent_of,
    open_record,
    peek_record,
    record_hash,
    sign_record,
)
from protocol.topics import Role, parse_topic
from tests.storage import provisioned_on

from .harness import make_node, running, step_events

DEV, SHOP, PS = "dev-0001", "shop-1", "payment-server"
OPENING = 100_000
# generous: a payment is a few fsynced commits, and a retry would only blur what a test shows
SETTINGS = Settings(request_timeout_s=5.0, request_attempts=2)


@pytest.fixture
def dep(tmp_path: Path, db_url: str | None) -> Deployment:
    return provisioned_on(tmp_path, db_url)


def make_order(
    dep: Deployment,
    order_id: str,
    amount: int = 1_000,
    counter: int = 1,
    *,
    device: str = DEV,
    app: str = "wallet",
    payee: str = SHOP,
    currency: str = "EUR",
) -> bytes:
    order = Order(order_id, device, app, payee, amount, currency, counter, now_ms())
    return sign_record(order, ORDER_DOMAIN, dep.load_keys(f"{device}.chip")).to_bytes()


def hash_of(blob: bytes) -> bytes:
    return record_hash(unpack(blob)["body"])


def intent_of_blob(blob: bytes) -> bytes:
    """The intent hash a grant names for this order: what the user asked to pay."""
    return intent_hash(intent_of(peek_record(Order, blob, "order")))


def make_verdict(
    dep: Deployment,
    device: str,
    bound: bytes,
    *,
    status: str = "affirming",
    expires_ms: int | None = None,
    keys: KeyPair | None = None,
    tampered: tuple[str, ...] = (),
) -> bytes:
    expires = expires_ms if expires_ms is not None else now_ms() + 60_000
    appraisals = tuple(
        Appraisal(c, "1.0.0", CONTRAINDICATED if c in tampered else AFFIRMING, c)
        for c in ("client", "app:wallet", "app:transit")
    )
    verdict = Verdict(
        "trust-server", device, status, appraisals, b"\x00" * 16, bound, "test", now_ms(), expires
    )
    return sign_record(verdict, VERDICT_DOMAIN, keys or dep.load_keys("trust-server")).to_bytes()


@dataclass
class Clock:
    """The payment-server's clock: real time plus an offset a test moves forward."""

    offset_ms: int = 0

    def __call__(self) -> int:
        return now_ms() + self.offset_ms


@dataclass
class Platform:
    dep: Deployment
    broker: FakeBroker
    ps: PaymentServer
    ts: Node
    chips: dict[str, Node]
    clock: Clock

    async def grant(
        self, blob: bytes, *, device: str = DEV, expires_in_ms: int = 60_000, verdict: bytes | None = None
    ) -> None:
        bound = intent_of_blob(blob)
        expires = now_ms() + expires_in_ms
        verdict = verdict or make_verdict(self.dep, device, bound, expires_ms=expires)
        grant = Grant(device, bound, verdict, expires)
        await self.ts.request(
            self.ts.link(Role.PAYMENT_SERVER),
            "trust.grant",
            grant,
            recipient=PS,
            expect="trust.granted",
            peer=self.dep.load_cert(PS),
        )

    async def pay(self, blob: bytes, device: str = DEV) -> tuple[Receipt, bytes]:
        chip = self.chips[device]
        answer = await chip.request(
            chip.link(Role.PAYMENT_SERVER),
            "pay.order",
            PayOrder(blob),
            recipient=PS,
            expect="pay.receipt",
            peer=self.dep.load_cert(PS),
        )
        raw = answer.envelope.body.receipt
        # every receipt, refusals too, must verify with the payment-server's key
        receipt = open_record(Receipt, raw, RECEIPT_DOMAIN, self.dep.load_cert(PS).body.sign_key, "receipt")
        assert receipt.body.order_hash == hash_of(blob)
        return receipt.body, raw

    async def balances(self) -> dict[str, int]:
        return {a.account: a.balance for a in (await self.ps.ledger.snapshot()).accounts}


@asynccontextmanager
async def platform(dep: Deployment, devices: int = 1, **options: object) -> AsyncIterator[Platform]:
    broker = FakeBroker()
    clock = Clock()
    ps = make_node(PaymentServer, dep, PS, broker, SETTINGS, deployment=dep, clock=clock, **options)
    ts = make_node(Node, dep, "trust-server", broker, SETTINGS)
    chips = {
        f"dev-{i:04d}": make_node(Node, dep, f"dev-{i:04d}.chip", broker, SETTINGS)
        for i in range(1, devices + 1)
    }
    async with running(ps, ts, *chips.values()):
        yield Platform(dep, broker, ps, ts, chips, clock)


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# -- the happy path and idempotency ----------------------------------------------------


async def test_a_granted_order_moves_exactly_its_amount(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        blob = make_order(dep, "o-1", amount=1_234)
        await p.grant(blob)
        receipt, _ = await p.pay(blob)
        after = await p.balances()
        events = [e for e in step_events(p.broker) if e.step == "C5"]
    assert (receipt.status, receipt.code, receipt.order_id) == ("confirmed", "", "o-1")
    assert (receipt.payer, receipt.payee, receipt.amount) == (f"{DEV}:wallet", SHOP, 1_234)
    assert receipt.balance_after == OPENING - 1_234 == after[f"{DEV}:wallet"]
    assert moved(before, after) == {f"{DEV}:wallet": -1_234, SHOP: 1_234}
    assert sum(after.values()) == sum(before.values())
    assert [(e.outcome, e.order_id, e.device) for e in events] == [("ok", "o-1", DEV)]


async def test_an_order_sent_three_times_is_charged_once(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        blob = make_order(dep, "o-1", amount=500)
        await p.grant(blob)
        first = await p.pay(blob)
        again = await asyncio.gather(p.pay(blob), p.pay(blob))
        after = await p.balances()
    assert first[0].status == "confirmed"
    assert all(raw == first[1] for _, raw in again)  # the very same signed bytes
    assert moved(before, after) == {f"{DEV}:wallet": -500, SHOP: 500}


async def test_concurrent_copies_of_one_order_execute_once(dep: Deployment) -> None:
    async with platform(dep) as p:
        blob = make_order(dep, "o-1", amount=700)
        await p.grant(blob)
        answers = await asyncio.gather(*(p.pay(blob) for _ in range(5)))
        after = await p.balances()
    assert len({raw for _, raw in answers}) == 1
    assert after[f"{DEV}:wallet"] == OPENING - 700 and after[SHOP] == 700


# -- attestation gate --------------------------------------------------------------------


async def test_without_a_grant_nothing_moves_until_the_grant_arrives(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        blob = make_order(dep, "o-1", amount=900)
        refused, _ = await p.pay(blob)
        assert (refused.status, refused.code) == ("refused", "not_attested")
        assert "attest" in refused.reason
        assert await p.balances() == before
        await p.grant(blob)  # the attestation completes later: the same order now goes through
        receipt, _ = await p.pay(blob)
        after = await p.balances()
    assert receipt.status == "confirmed"
    assert moved(before, after) == {f"{DEV}:wallet": -900, SHOP: 900}


async def test_an_expired_grant_does_not_let_an_order_through(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        blob = make_order(dep, "o-1")
        await p.grant(blob, expires_in_ms=10_000)
        p.clock.offset_ms = 10_001
        receipt, _ = await p.pay(blob)
        assert await p.balances() == before
    assert (receipt.status, receipt.code) == ("refused", "not_attested")
    assert "expired" in receipt.reason


async def test_a_grant_that_arrives_expired_is_refused(dep: Deployment) -> None:
    async with platform(dep) as p:
        with pytest.raises(Refused) as info:
            await p.grant(make_order(dep, "o-1"), expires_in_ms=-1)
    assert info.value.refusal_code == "expired"


async def test_a_grant_for_another_order_does_not_count(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        await p.grant(make_order(dep, "o-1", amount=100))
        receipt, _ = await p.pay(make_order(dep, "o-2", amount=100))
        assert await p.balances() == before
    assert receipt.code == "not_attested"


async def test_a_grant_for_another_device_does_not_count(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url, devices=2)
    async with platform(dep, devices=2) as p:
        blob = make_order(dep, "o-1")
        await p.grant(blob, device="dev-0002")  # the verdict names dev-0002 too, so it is stored
        receipt, _ = await p.pay(blob)
    assert receipt.code == "not_attested"


async def test_a_grant_from_a_chip_is_rejected(dep: Deployment) -> None:
    async with platform(dep) as p:
        chip = p.chips[DEV]
        blob = make_order(dep, "o-1")
        topic = "tp/v1/plat/ts/ps"  # the trust-server's link, which a chip's certificate may not use
        grant = Grant(
            DEV, intent_of_blob(blob), make_verdict(dep, DEV, intent_of_blob(blob)), now_ms() + 60_000
        )
        await chip.bus.publish(topic, chip.frame(topic, "trust.grant", grant, PS, peer=p.dep.load_cert(PS)))
        await ping(p.ts, Role.PAYMENT_SERVER, PS)  # one reader, in order: the forged frame was handled
        assert p.ps.counters["rejected.wrong_role"] == 1
        receipt, _ = await p.pay(blob)
        # the handler checks the role too, should a frame ever get past the link check
        env = Envelope("trust.grant", b"\x00" * 16, f"{DEV}.chip", PS, b"", b"", now_ms(), 1, 1, (), grant)
        with pytest.raises(Refused) as info:
            await p.ps.trust_grant(Received(env, dep.load_cert(f"{DEV}.chip"), parse_topic(topic), b""))
    assert receipt.code == "not_attested"
    assert info.value.refusal_code == "not_trust_server"


async def test_a_verdict_signed_by_another_key_is_rejected(dep: Deployment) -> None:
    async with platform(dep) as p:
        blob = make_order(dep, "o-1")
        forged = make_verdict(dep, DEV, intent_of_blob(blob), keys=dep.load_keys(f"{DEV}.chip"))
        with pytest.raises(Refused) as info:
            await p.grant(blob, verdict=forged)
        receipt, _ = await p.pay(blob)
    assert info.value.refusal_code == "bad_signature"
    assert receipt.code == "not_attested"


async def test_a_contraindicated_verdict_grants_nothing(dep: Deployment) -> None:
    async with platform(dep) as p:
        blob = make_order(dep, "o-1")
        with pytest.raises(Refused) as info:
            await p.grant(
                blob, verdict=make_verdict(dep, DEV, intent_of_blob(blob), status="contraindicated")
            )
        receipt, _ = await p.pay(blob)
    assert info.value.refusal_code == "untrusted"
    assert receipt.code == "not_attested"


# -- business refusals -------------------------------------------------------------------


async def test_a_replayed_lower_counter_is_stale(dep: Deployment) -> None:
    async with platform(dep) as p:
        first = make_order(dep, "o-1", counter=5)
        old = make_order(dep, "o-2", counter=4)
        same = make_order(dep, "o-3", counter=5)
        for blob in (first, old, same):
            await p.grant(blob)
        assert (await p.pay(first))[0].status == "confirmed"
        before = await p.balances()
        answers = [(await p.pay(old))[0], (await p.pay(same))[0]]
        assert await p.balances() == before
    assert [r.code for r in answers] == ["stale_counter", "stale_counter"]


@pytest.mark.parametrize(
    ("amount", "payee", "currency", "code"),
    [
        (OPENING + 1, SHOP, "EUR", "insufficient_funds"),
        (100, "shop-9", "EUR", "unknown_payee"),
        (100, f"{DEV}:transit", "EUR", "unknown_payee"),  # a payer account is not a merchant
        (100, SHOP, "USD", "currency"),
        (0, SHOP, "EUR", "limit"),
    ],
)
async def test_refusals_are_signed_stored_and_move_nothing(
    dep: Deployment, amount: int, payee: str, currency: str, code: str
) -> None:
    async with platform(dep, payment_limit=10 * OPENING) as p:
        before = await p.balances()
        blob = make_order(dep, "o-1", amount=amount, payee=payee, currency=currency)
        await p.grant(blob)
        receipt, raw = await p.pay(blob)
        again = await p.pay(blob)  # a retry gets the stored refusal, not a second evaluation
        assert await p.balances() == before
    assert (receipt.status, receipt.code) == ("refused", code)
    assert receipt.reason
    assert again[1] == raw


async def test_the_server_limit_applies_whatever_the_chip_signs(dep: Deployment) -> None:
    async with platform(dep, payment_limit=2_000) as p:
        before = await p.balances()
        over = make_order(dep, "o-1", amount=2_001, counter=1)
        at = make_order(dep, "o-2", amount=2_000, counter=2)
        for blob in (over, at):
            await p.grant(blob)
        answers = [(await p.pay(over))[0], (await p.pay(at))[0]]
        after = await p.balances()
    assert [(r.status, r.code) for r in answers] == [("refused", "limit"), ("confirmed", "")]
    assert moved(before, after) == {f"{DEV}:wallet": -2_000, SHOP: 2_000}


async def test_an_order_signed_for_another_device_is_refused(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url, devices=2)
    async with platform(dep, devices=2) as p:
        order = Order("o-1", "dev-0002", "wallet", SHOP, 100, "EUR", 1, now_ms())
        blob = sign_record(order, ORDER_DOMAIN, dep.load_keys(f"{DEV}.chip")).to_bytes()
        with pytest.raises(Refused) as info:
            await p.pay(blob)
    assert info.value.refusal_code == "wrong_device"


async def test_order_ids_are_each_devices_own(tmp_path: Path, db_url: str | None) -> None:
    """Another device taking an order id first neither blocks this device's order nor reads it."""
    dep = provisioned_on(tmp_path, db_url, devices=2)
    async with platform(dep, devices=2) as p:
        theirs = make_order(dep, "o-1", amount=300, device="dev-0002")
        await p.grant(theirs, device="dev-0002")
        their_receipt, _ = await p.pay(theirs, device="dev-0002")
        ours = make_order(dep, "o-1", amount=700)
        await p.grant(ours)
        our_receipt, our_raw = await p.pay(ours)
        again, again_raw = await p.pay(ours)  # a repeat still gets our own original receipt
        their_again, _ = await p.pay(theirs, device="dev-0002")
        payments = sorted((x.device, x.order_id, x.amount) for x in (await p.ps.ledger.snapshot()).payments)
    # On a ledger keyed by order id alone, our order is refused "order_id_reused": their id blocks ours.
    assert their_receipt.status == "confirmed"
    assert (our_receipt.status, our_receipt.amount, our_receipt.device) == ("confirmed", 700, DEV)
    assert again_raw == our_raw and again.order_hash == hash_of(ours)
    assert their_again.order_hash == hash_of(theirs) and their_again.device == "dev-0002"
    assert payments == [(DEV, "o-1", 700), ("dev-0002", "o-1", 300)]


async def test_a_grant_covers_its_intent_not_another_payee_or_amount(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        await p.grant(make_order(dep, "o-1", amount=100))  # the user asked 1.00 to shop-1
        other_payee, _ = await p.pay(make_order(dep, "o-1", amount=100, payee="shop-2", counter=1))
        other_amount, _ = await p.pay(make_order(dep, "o-1", amount=40_000, counter=1))
        assert await p.balances() == before
        # the same intent, as a fresh order with its own counter and time, is what the grant is for
        paid, _ = await p.pay(make_order(dep, "o-1", amount=100, counter=2))
        after = await p.balances()
    # refused refusals are not stored (a grant may still come), so the same id pays afterwards
    assert (other_payee.code, other_amount.code) == ("not_attested", "not_attested")
    assert paid.status == "confirmed"
    assert after[f"{DEV}:wallet"] == before[f"{DEV}:wallet"] - 100


# -- durability and concurrency ----------------------------------------------------------


async def test_after_a_restart_a_retried_order_gets_its_original_receipt(dep: Deployment) -> None:
    blob = make_order(dep, "o-1", amount=4_000)
    async with platform(dep) as p:
        await p.grant(blob)
        receipt, raw = await p.pay(blob)
        paid = await p.balances()
    async with platform(dep) as p:  # a new PaymentServer on the same database: seeding must not reset it
        assert await p.balances() == paid
        _, again = await p.pay(blob)
        assert await p.balances() == paid
    assert receipt.status == "confirmed" and again == raw
    assert paid[f"{DEV}:wallet"] == OPENING - 4_000


async def test_a_retried_order_after_a_rotation_gets_its_receipt_under_the_new_key(dep: Deployment) -> None:
    """A chip that missed its receipt re-sends the order after a rotation gave the payment-server
    new keys: the receipt must verify under the certificate the server now presents."""
    blob = make_order(dep, "o-1", amount=4_000)
    async with platform(dep) as p:
        await p.grant(blob)
        receipt, raw = await p.pay(blob)
    rotate(dep)
    async with platform(dep) as p:
        again, again_raw = await p.pay(blob)  # verified with the new certificate's key inside pay()
        balance = (await p.balances())[f"{DEV}:wallet"]
    assert again == receipt and again_raw != raw
    assert balance == OPENING - 4_000


async def test_twenty_concurrent_payments_add_up_exactly(tmp_path: Path, db_url: str | None) -> None:
    dep = provisioned_on(tmp_path, db_url, devices=10)
    orders = [
        (
            f"dev-{d:04d}",
            app,
            make_order(
                dep,
                f"o-{d}-{app}",
                amount=100 * d + len(app),
                counter=1,
                device=f"dev-{d:04d}",
                app=app,
                payee=f"shop-{d % 3 + 1}",
            ),
        )
        for d in range(1, 11)
        for app in ("wallet", "transit")
    ]
    async with platform(dep, devices=10) as p:
        before = await p.balances()
        await asyncio.gather(*(p.grant(blob, device=device) for device, _, blob in orders))
        answers = await asyncio.gather(*(p.pay(blob, device) for device, _, blob in orders))
        after = await p.balances()
    assert all(r.status == "confirmed" for r, _ in answers)
    for device, app, _ in orders:
        paid = sum(r.amount for r, _ in answers if r.payer == f"{device}:{app}")
        assert after[f"{device}:{app}"] == before[f"{device}:{app}"] - paid
    merchants = sum(after[m] - before[m] for m in ("shop-1", "shop-2", "shop-3"))
    assert merchants == sum(r.amount for r, _ in answers)
    assert sum(after.values()) == sum(before.values())


async def test_concurrent_orders_of_one_app_never_overspend(dep: Deployment) -> None:
    # arriving out of order, some are stale; whatever is confirmed is exactly what moved
    blobs = [make_order(dep, f"o-{i}", amount=9_000, counter=i) for i in range(1, 21)]
    async with platform(dep) as p:
        before = await p.balances()
        await asyncio.gather(*(p.grant(blob) for blob in blobs))
        answers = await asyncio.gather(*(p.pay(blob) for blob in blobs))
        after = await p.balances()
    confirmed = [r for r, _ in answers if r.status == "confirmed"]
    assert confirmed and {r.code for r, _ in answers} <= {"", "stale_counter", "insufficient_funds"}
    assert before[f"{DEV}:wallet"] - after[f"{DEV}:wallet"] == sum(r.amount for r in confirmed)
    assert after[f"{DEV}:wallet"] >= 0 and sum(after.values()) == sum(before.values())


async def test_two_replicas_on_one_database_execute_each_order_once(dep: Deployment) -> None:
    chip = dep.load_cert(f"{DEV}.chip")
    blobs = [make_order(dep, f"o-{i}", amount=1_000, counter=i) for i in range(1, 6)]
    a = make_node(PaymentServer, dep, PS, FakeBroker(), SETTINGS, deployment=dep)
    b = make_node(PaymentServer, dep, PS, FakeBroker(), SETTINGS, deployment=dep)
    # one state dir is held by one process at a time (IdentityInUse): the replica gets its own
    b.config = dataclasses.replace(b.config, state_dir=b.config.state_dir.with_name("state-replica"))
    async with running(a), running(b):
        for blob in blobs:
            verdict = make_verdict(dep, DEV, intent_of_blob(blob))
            await a.ledger.store_grant(DEV, intent_of_blob(blob), verdict, now_ms() + 60_000)
        # every order reaches both replicas at once, as if a shared subscription delivered it twice;
        # one order after the other, as one chip's counter moves (out of order, later ones make it stale)
        answers = []
        for blob in blobs:
            answers += await asyncio.gather(a.settle(blob, chip), b.settle(blob, chip))
        after = {x.account: x.balance for x in (await a.ledger.snapshot()).accounts}
    for i in range(0, len(answers), 2):
        assert answers[i] == answers[i + 1]
    key = dep.load_cert(PS).body.sign_key
    statuses = [open_record(Receipt, raw, RECEIPT_DOMAIN, key, "receipt").body for raw in answers]
    # o-k always finds o-(k-1) executed: all go through, each once
    assert all(r.status == "confirmed" for r in statuses)
    assert after[f"{DEV}:wallet"] == OPENING - 5_000 and after[SHOP] == 5_000


# -- account.query -----------------------------------------------------------------------


async def test_account_query_shows_the_balance_and_latest_payments(dep: Deployment) -> None:
    async with platform(dep) as p:
        for i in (1, 2, 3):
            blob = make_order(dep, f"o-{i}", amount=100 * i, counter=i)
            await p.grant(blob)
            await p.pay(blob)
        chip, link = p.chips[DEV], p.chips[DEV].link(Role.PAYMENT_SERVER)
        answer = await chip.request(
            link,
            "account.query",
            AccountQuery("wallet", 2),
            recipient=PS,
            expect="account.info",
            peer=dep.load_cert(PS),
        )
        with pytest.raises(Refused) as info:
            await chip.request(
                link,
                "account.query",
                AccountQuery("casino", 5),
                recipient=PS,
                expect="account.info",
                peer=dep.load_cert(PS),
            )
    account: AccountInfo = answer.envelope.body
    assert (account.account, account.balance, account.currency) == (f"{DEV}:wallet", OPENING - 600, "EUR")
    assert [(line.order_id, line.amount, line.status) for line in account.payments] == [
        ("o-3", 300, "confirmed"),
        ("o-2", 200, "confirmed"),
    ]
    assert info.value.refusal_code == "unknown_app"


# -- the ledger layer itself -------------------------------------------------------------


async def test_a_failed_transaction_leaves_nothing_behind(dep: Deployment) -> None:
    ledger = ledger_at(dep.database("ledger"))
    await ledger.open()
    try:
        await ledger.seed(dep.load_manifest())
        with pytest.raises(RuntimeError):
            async with ledger.transaction() as tx:
                assert await tx.debit(f"{DEV}:wallet", 500) == OPENING - 500
                await tx.credit(SHOP, 500)
                raise RuntimeError("crash between the legs of a payment")
        record = PaymentRecord("o-1", DEV, "wallet", f"{DEV}:wallet", SHOP, 1, "EUR", 1, "confirmed", "", 1)
        async with ledger.transaction() as tx:
            await tx.insert_payment(record, b"h1", b"order", b"receipt")
        with pytest.raises(LedgerConflict):  # the same order id twice: the database says no
            async with ledger.transaction() as tx:
                await tx.debit(f"{DEV}:wallet", 1)
                await tx.insert_payment(record, b"h2", b"order", b"receipt")
        assert await ledger.account_view(DEV, "wallet", 5) is not None  # the connection is usable again
        await ledger.close()
        snapshot = await read_snapshot(dep.database("ledger"))
    finally:
        await ledger.close()
    balances = {a.account: a.balance for a in snapshot.accounts}
    assert balances[f"{DEV}:wallet"] == OPENING and balances[SHOP] == 0
    assert [p.order_id for p in snapshot.payments] == ["o-1"]


async def test_a_payer_balance_can_never_go_negative(dep: Deployment) -> None:
    ledger = ledger_at(dep.database("ledger"))
    await ledger.open()
    try:
        await ledger.seed(dep.load_manifest())
        await ledger.seed(dep.load_manifest())  # idempotent
        async with ledger.transaction() as tx:
            assert await tx.debit(f"{DEV}:wallet", OPENING + 1) is None
            assert await tx.debit(f"{DEV}:wallet", OPENING) == 0
    finally:
        await ledger.close()


async def test_a_verdict_that_warns_about_the_paying_app_pays_nothing(dep: Deployment) -> None:
    async with platform(dep) as p:
        before = await p.balances()
        wallet_order, transit_order = make_order(dep, "o-w"), make_order(dep, "o-t", app="transit")
        for blob in (wallet_order, transit_order):
            verdict = make_verdict(dep, DEV, intent_of_blob(blob), status="warning", tampered=("app:wallet",))
            await p.grant(blob, verdict=verdict)
        refused, _ = await p.pay(wallet_order)
        paid, _ = await p.pay(transit_order)
        after = await p.balances()
    assert (refused.status, refused.code) == ("refused", "untrusted_app")
    assert paid.status == "confirmed"  # the intact app keeps working
    assert moved(before, after) == {f"{DEV}:transit": -1_000, SHOP: 1_000}
