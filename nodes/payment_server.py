"""The payment application server (22): issuer and ledger of the payment apps.

It executes a chip's signed order (C5) only if the trust-server has just found
that terminal trustworthy for exactly that payment: C1-C4 end in a
``trust.grant`` naming the hash of the user's intent (device, order id, app,
payee, amount, currency), and the server recomputes that hash from the signed
order, so an order for another payee or amount finds no grant. It answers
with a signed receipt. Everything a payment changes (balances, the grant, the
app's counter, the stored order and receipt) is written in one database
transaction, and (device, order id) is a key of the payments table, so each
order executes at most once however often it arrives: a repeat gets the
original receipt's exact bytes, also after a restart or from another replica.
Order ids are the device's own: another device's ids neither block nor reveal
them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from protocol.appraisal import overall
from protocol.certs import Certificate
from protocol.envelope import Received
from protocol.errors import Refused
from protocol.messages import (
    AccountInfo,
    AccountQuery,
    Body,
    Empty,
    Grant,
    PaymentLine,
    PayOrder,
    PayReceipt,
)
from protocol.records import (
    AFFIRMING,
    ORDER_DOMAIN,
    RECEIPT_DOMAIN,
    VERDICT_DOMAIN,
    WARNING,
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
from protocol.topics import Role

from .assemble import reloaded_identity
from .bus import Bus
from .deployment import Deployment
from .ledger import CONFIRMED, MERCHANT, REFUSED, LedgerConflict, LedgerTx, PaymentRecord, ledger_at
from .replies import Replies
from .runtime import Node, NodeConfig, now_ms

DEFAULT_PAYMENT_LIMIT = 50_000  # minor units per payment, enforced here whatever the chip allows
MAX_ACCOUNT_LINES = 100
CONFLICT_ATTEMPTS = 3  # a conflict means another replica wrote first; the retry then sees its result
MAX_ORDER_ID = 128
PRUNE_EVERY_S = 10.0
PRUNE_BATCH = 1_000  # grants per round: each round is one short transaction
INT64 = 2**63  # SQLite integers are signed 64-bit; larger numbers in an order are malformed


@dataclass(frozen=True)
class Outcome:
    receipt: Receipt
    blob: bytes
    repeated: bool  # an order already executed: the stored receipt, nothing done now


class PaymentServer(Node):
    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        deployment: Deployment,
        *,
        payment_limit: int = DEFAULT_PAYMENT_LIMIT,
        clock: Callable[[], int] = now_ms,
        db_url: str | None = None,
        replies: Replies | None = None,
    ) -> None:
        super().__init__(config, bus, log, replies=replies)
        self.dep = deployment
        self.payment_limit = payment_limit
        self.clock = clock  # wall-clock ms for grant expiry; injectable so tests need no sleeps
        self.ledger = ledger_at(deployment.database("ledger", db_url))  # db_url: `trustpay node --db`
        self.route("trust.grant", self.trust_grant)
        self.route("pay.order", self.pay_order)
        self.route("account.query", self.account_query)
        self.route("keys.reload", self.keys_reload)

    async def run(self) -> None:
        manifest = await asyncio.to_thread(self.dep.load_manifest)
        await self.ledger.open()
        try:
            if self.replies is None and self.replicated:  # the replicas' reply log: in their ledger
                self.replies = self.ledger.replies
            await self.ledger.seed(manifest)
            await super().run()
        finally:
            await self.ledger.close()

    async def main(self) -> None:
        self.every(PRUNE_EVERY_S, self.prune, "prune")

    async def prune(self) -> int:
        """One bounded round: grants that expired unused (an attested order never paid)."""
        pruned = await self.ledger.prune_grants(self.clock(), PRUNE_BATCH)
        if pruned:
            self.log.info("ledger.pruned", grants=pruned)
        return pruned

    # -- the operator: a platform key rotation ----------------------------------
    async def keys_reload(self, rx: Received) -> tuple[str, Body]:
        if rx.topic.src is not Role.OPERATOR:  # the message table says so too; keys deserve both
            raise Refused("not_operator", "keys are reloaded on the operator's command only")
        ident, platform = await asyncio.to_thread(
            reloaded_identity, self.dep, self.id, self.certs, self.clock() // 1000
        )
        self.replace_identity(ident, platform)
        self.log.info("keys.reloaded", platform_serial=platform.serial, cert_serial=ident.cert.serial)
        return "keys.reloaded", Empty()

    # -- grants from the trust-server (end of C4) --------------------------------
    async def trust_grant(self, rx: Received) -> tuple[str, Body]:
        grant: Grant = rx.envelope.body
        sender = rx.sender_cert
        if sender.role != Role.TRUST_SERVER.value:
            raise Refused(
                "not_trust_server",
                f"{sender.subject} is a {sender.role}; only the trust-server grants payments",
            )
        verdict = open_record(Verdict, grant.verdict, VERDICT_DOMAIN, sender.body.sign_key, "verdict").body
        if (verdict.device, verdict.intent_hash) != (grant.device, grant.intent_hash):
            raise Refused(
                "grant_mismatch", "the verdict is for another device or payment than the grant names"
            )
        if verdict.status not in (AFFIRMING, WARNING):
            raise Refused("untrusted", f"the verdict is {verdict.status}: this terminal may not pay")
        expires_ms = min(grant.expires_ms, verdict.expires_ms)
        if expires_ms <= self.clock():
            raise Refused("expired", "the grant or its verdict has expired; attest the terminal again")
        await self.ledger.store_grant(grant.device, grant.intent_hash, grant.verdict, expires_ms)
        self.log.info(
            "grant.stored",
            device=grant.device,
            intent_hash=grant.intent_hash.hex(),
            status=verdict.status,
            expires_ms=expires_ms,
        )
        return "trust.granted", Empty()

    # -- C5: the payment itself ------------------------------------------------------
    async def pay_order(self, rx: Received) -> tuple[str, Body]:
        body: PayOrder = rx.envelope.body
        blob = await self.settle(body.order, rx.sender_cert, rx.envelope.session)
        return "pay.receipt", PayReceipt(blob)

    async def settle(self, order_blob: bytes, chip: Certificate, session: bytes = b"") -> bytes:
        """Execute (or recall) the order signed by ``chip``; return the signed receipt bytes."""
        if chip.role != Role.CHIP.value:
            raise Refused("not_chip", f"{chip.subject} is a {chip.role}; only a payment chip signs orders")
        signed = open_record(Order, order_blob, ORDER_DOMAIN, chip.body.sign_key, "order")
        order = signed.body
        if order.device != chip.body.device:
            raise Refused(
                "wrong_device",
                f"the order is for device {order.device!r} but was signed by "
                f"the chip of {chip.body.device!r}",
            )
        if not 0 < len(order.order_id) <= MAX_ORDER_ID:
            raise Refused("bad_order", f"an order id must be 1-{MAX_ORDER_ID} characters")
        if not (-INT64 < order.amount < INT64 and 0 <= order.counter < INT64):
            raise Refused("bad_order", "the order's amount or counter is out of range")
        outcome = await self._execute(order, record_hash(signed.data), order_blob)
        self._report(outcome, order, session)  # only after the commit: never report what rolled back
        return outcome.blob

    async def _execute(self, order: Order, order_hash: bytes, blob: bytes) -> Outcome:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                async with self.ledger.transaction() as tx:
                    return await self._decide(tx, order, order_hash, blob)
            except LedgerConflict:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                self.counters["ledger_conflict"] += 1
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _decide(self, tx: LedgerTx, order: Order, order_hash: bytes, blob: bytes) -> Outcome:
        stored = await tx.payment(order.device, order.order_id)
        if stored is not None:
            if stored.order_hash != order_hash:
                raise Refused(
                    "order_id_reused",
                    f"order id {order.order_id!r} was already used for another "
                    "order; make a new order with a new id",
                )
            # our own receipt from our own database, signed again with our current key: the very
            # same bytes (Ed25519 is deterministic) unless a platform rotation gave us a new key,
            # which the chip checks the receipt against
            receipt = peek_record(Receipt, stored.receipt, "stored receipt")
            resigned = sign_record(receipt, RECEIPT_DOMAIN, self.keys).to_bytes()
            return Outcome(receipt, resigned, repeated=True)
        now = self.clock()
        intent = intent_hash(intent_of(order))  # the grant names what the user asked, the order must be it
        grant = await tx.grant(order.device, intent)
        if grant is None or grant.used_ms is not None:
            # not stored: the grant may still arrive, and then the same order must go through
            why = "the platform has not attested this terminal for this order; attest (C1-C4), then resend it"
            return self._refusal(order, order_hash, "not_attested", why, "", 0, now)
        if grant.expires_ms <= now:
            why = "the attestation for this order has expired; attest the terminal again, then resend it"
            return self._refusal(order, order_hash, "not_attested", why, "", 0, now)
        verdict = peek_record(Verdict, grant.verdict, "granted verdict")  # verified when stored
        payer_name = await tx.app_account(order.device, order.app) or ""
        payer = await tx.account(payer_name) if payer_name else None
        payee = await tx.account(order.payee)
        last = await tx.last_counter(order.device, order.app)
        balance = payer.balance if payer else 0
        refusal: tuple[str, str] | None = None
        if overall(verdict.appraisals, order.app) not in (AFFIRMING, WARNING):
            refusal = ("untrusted_app", f"the platform did not find application {order.app!r} intact")
        elif last is not None and order.counter <= last:
            refusal = (
                "stale_counter",
                f"counter {order.counter} is not above the last executed {last}: "
                "an old order replayed, or the app's counter went back",
            )
        elif payer is None:
            refusal = ("unknown_app", f"application {order.app!r} of {order.device} has no account here")
        elif payee is None or payee.kind != MERCHANT:
            refusal = ("unknown_payee", f"{order.payee!r} is not a merchant account; check the payee")
        elif order.currency != payer.currency or order.currency != payee.currency:
            refusal = (
                "currency",
                f"the order is in {order.currency} but the accounts are in "
                f"{payer.currency} and {payee.currency}",
            )
        elif not 0 < order.amount <= self.payment_limit:
            refusal = (
                "limit",
                f"an amount must be 1 to {self.payment_limit} minor units, not {order.amount}",
            )
        elif payer.balance < order.amount:
            refusal = ("insufficient_funds", f"the balance {payer.balance} does not cover {order.amount}")
        if refusal is None:
            assert payer is not None and payee is not None
            new_balance = await tx.debit(payer.account, order.amount)
            # each write is conditional: if it says no, another writer raced us; roll back and retry
            if new_balance is None:
                raise LedgerConflict(f"{payer.account} changed during the payment")
            await tx.credit(payee.account, order.amount)
            if not await tx.advance_counter(order.device, order.app, order.counter):
                raise LedgerConflict(f"the counter of {order.device}:{order.app} moved during the payment")
            outcome = self._receipt(
                order, order_hash, CONFIRMED, "", "payment executed", payer_name, new_balance, now
            )
        else:
            outcome = self._refusal(order, order_hash, *refusal, payer_name, balance, now)
        if not await tx.use_grant(intent, now):
            raise LedgerConflict("the grant was used by a concurrent payment")
        r = outcome.receipt
        record = PaymentRecord(
            order.order_id,
            order.device,
            order.app,
            payer_name,
            order.payee,
            order.amount,
            order.currency,
            order.counter,
            r.status,
            r.code,
            now,
        )
        await tx.insert_payment(record, order_hash, blob, outcome.blob)
        return outcome

    def _refusal(
        self, order: Order, order_hash: bytes, code: str, reason: str, payer: str, balance: int, now: int
    ) -> Outcome:
        return self._receipt(order, order_hash, REFUSED, code, reason, payer, balance, now)

    def _receipt(
        self,
        order: Order,
        order_hash: bytes,
        status: str,
        code: str,
        reason: str,
        payer: str,
        balance: int,
        now: int,
    ) -> Outcome:
        receipt = Receipt(
            order.order_id,
            order_hash,
            order.device,
            status,
            code,
            reason,
            payer,
            order.payee,
            order.amount,
            order.currency,
            balance,
            now,
        )
        return Outcome(receipt, sign_record(receipt, RECEIPT_DOMAIN, self.keys).to_bytes(), repeated=False)

    def _report(self, outcome: Outcome, order: Order, session: bytes) -> None:
        """Log the payment in full locally; its step event, which anyone on the bus sees, says no amounts."""
        r = outcome.receipt
        fields = dict(device=order.device, order=order.order_id, amount=order.amount, payee=order.payee)
        if outcome.repeated:
            self.log.info("payment.repeated", status=r.status, code=r.code, **fields)
            reason = f"order already {r.status}: the original receipt was sent again"
        elif r.status == CONFIRMED:
            self.log.info("payment.settled", payer=r.payer, balance_after=r.balance_after, **fields)
            reason = "payment confirmed"
        else:
            self.log.info("payment.refused", code=r.code, reason=r.reason, **fields)
            reason = f"refused: {r.code}"  # the code only: reasons name amounts and balances
        word = "ok" if r.status == CONFIRMED else "refused"
        self.step("C", "C5", word, reason, session=session, order_id=order.order_id, device=order.device)

    # -- account.query ------------------------------------------------------------
    async def account_query(self, rx: Received) -> tuple[str, Body]:
        query: AccountQuery = rx.envelope.body
        device = rx.sender_cert.body.device
        limit = max(0, min(query.limit, MAX_ACCOUNT_LINES))
        view = await self.ledger.account_view(device, query.app, limit)
        if view is None:
            raise Refused("unknown_app", f"application {query.app!r} of {device} has no account here")
        account, payments = view
        lines = tuple(
            PaymentLine(p.order_id, p.payee, p.amount, p.currency, p.status, p.created_ms) for p in payments
        )
        return "account.info", AccountInfo(account.account, account.balance, account.currency, lines)
