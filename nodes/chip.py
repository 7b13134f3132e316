"""The mobile payment chip (100), a secure element hosting the payment apps (12).

It installs apps only from packages the issuer signed, deletes them when the
trust module says so (A3), refuses every payment function while disabled (A5)
or closed (B4), keeps each app's transaction counter, and runs the payment
itself. On ``pay.start`` it reads the app's files once into a buffer, binds
the user's intent (device, order id, app, payee, amount, currency) by hash and
asks the trust module to attest the terminal for that intent, sending the
buffer's digests (C1-C4); no app code has run yet. Only after a trusted
verdict does it run the app's code from that buffer, the very bytes the trust
module measured, in a sandboxed worker (``nodes/app_forks.py``) to make the
order (C5). An order that is not exactly the intent is refused
(``order_mismatch``); otherwise the trust module journals the app's next
dynamic digest, the chip writes it, signs the order and seals it for the
payment-server, whose certificate it checks is a payment-server's, and checks
the signed receipt. It holds the update certificate (claim 3), so it accepts a
rotated platform certificate only when the update key signed it.

An order whose receipt never came is kept and re-sent (same bytes, so the
payment-server answers with the original receipt) when the client next opens
the chip: no payment is lost, none is made twice.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
from collections import defaultdict
from typing import Any

import structlog

from protocol.certs import Certificate
from protocol.errors import ConfigError, Refused, RequestTimeout, TrustpayError, WrongRole
from protocol.measure import dynamic_digest, measure
from protocol.messages import (
    AccountInfo,
    AccountQuery,
    AppInfo,
    AttestRequest,
    AttestResult,
    Body,
    ChipState,
    DeleteApp,
    JournalEntry,
    PayOrder,
    PayReceipt,
    PayResult,
    PayStart,
    SessionDone,
    SetEnabled,
)
from protocol.records import (
    ORDER_DOMAIN,
    PACKAGE_DOMAIN,
    RECEIPT_DOMAIN,
    Intent,
    Order,
    Package,
    Receipt,
    Signed,
    intent_hash,
    intent_of,
    open_record,
    record_hash,
    sign_record,
)
from protocol.schema import from_map
from protocol.topics import Role, node_id

from .app_forks import ForkSandbox
from .bus import Bus
from .deployment import ComponentFiles, Deployment, canonical_json, load_json
from .runtime import Node, NodeConfig
from .sandbox import Sandbox
from .store import JsonState, RecordLog, write_atomic

PS = Role.PAYMENT_SERVER.value
RECEIPTS_KEPT = 100
MAX_RESENDS = 5
ATTEST_PATIENCE = 4  # an attestation spans several platform round trips: wait this many request lifetimes


class Chip(Node):
    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        deployment: Deployment,
        sandbox: ForkSandbox | Sandbox | None = None,
    ) -> None:
        """``sandbox``: shared by a fleet's chips (``ops.fleet``), which closes it; else the chip's own."""
        super().__init__(config, bus, log)
        assert self.device is not None
        self.dep = deployment
        self.tm_id = node_id(Role.TRUST_MODULE, self.device)
        self.store = JsonState(self.config.state_dir / "chip.json")
        # settled orders' receipts, for a client asking again: appended, not rewritten each payment
        self.receipts = RecordLog(self.config.state_dir / "receipts.log", RECEIPTS_KEPT)
        self.data: dict[str, Any] = {}
        self.is_open = False
        self.payment_server: Certificate | None = None
        self._app_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._owns_sandbox = sandbox is None
        # payment apps run in a fresh child of a fork server each (``nodes.app_forks``)
        self.sandbox: ForkSandbox | Sandbox = sandbox or ForkSandbox()
        self.route("chip.info", self.info)
        self.route("chip.enable", self.set_enabled)
        self.route("app.delete", self.delete_app)
        self.route("chip.open", self.open_chip)
        self.route("chip.close", self.close_chip)
        self.route("pay.start", self.pay)
        self.route("account.query", self.account)

    def state(self) -> str:
        return "enabled" if self.data.get("enabled") else "disabled"

    # -- start-up ---------------------------------------------------------------
    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self._owns_sandbox:
                await self.sandbox.close()

    async def main(self) -> None:
        # Once running, so the worker it starts is always closed by ``run`` (never by a bare prepare).
        self.sandbox.warm_up()

    async def prepare(self) -> None:
        self.data = self.store.load(
            {
                "enabled": False,
                "reason": "not yet checked by the trust module",
                "apps": {},
                "pending": {},
            }
        )
        self.receipts.load()
        if "receipts" in self.data:  # kept in chip.json by earlier versions: moved to the log once
            for order_id, blob in self.data.pop("receipts").items():
                self.receipts.add(str(order_id), str(blob))
            await self.store.save(
                self.data, first=functools.partial(write_atomic, self.receipts.path, self.receipts.snapshot())
            )
        if not self.data["apps"]:
            await self._install_from_packages()
        await self._refresh_payment_server()
        self.log.info("chip.ready", apps=sorted(self.data["apps"]), enabled=self.data["enabled"])

    def _payment_server_chain(self) -> list[bytes]:
        return [self.dep.load_cert(PS).to_bytes(), self.dep.load_public("platform").to_bytes()]

    async def _refresh_payment_server(self) -> None:
        """The payment-server's certificate as the deployment has it now, checked like a frame's chain."""
        try:
            chain = await asyncio.to_thread(self._payment_server_chain)
            self.payment_server = self.certs.resolve(chain, self.now_ms() // 1000)
        except TrustpayError as exc:
            self.log.warning("chip.no_payment_server_cert", reason=str(exc))

    async def _install_from_packages(self) -> None:
        """Install every app on disk whose package the issuer signed and whose bytes match it."""
        try:
            issuer = self.dep.load_issuer(self.certs, self.now_ms() // 1000)
        except ConfigError as exc:  # a forged issuer would vouch for any package: install none
            self.log.warning("app.install_refused", app="*", reason=exc.reason)
            return
        for app in await asyncio.to_thread(self.dep.installed_apps, self.device or ""):
            try:
                blob = await asyncio.to_thread(self.dep.package_sig_path(self.device or "", app).read_bytes)
                package = open_record(Package, blob, PACKAGE_DOMAIN, issuer.body.sign_key, "package").body
                files = await asyncio.to_thread(self.dep.read_app, self.device or "", app)
                m = measure("app", app, package.version, files.code, files.static, files.dynamic)
                if (package.name, package.code, package.static) != (app, m.code, m.static):
                    raise Refused("package_mismatch", f"{app}'s files are not what the issuer signed")
            except (TrustpayError, OSError) as exc:
                self.log.warning("app.install_refused", app=app, reason=str(exc))
                continue
            self.data["apps"][app] = {"version": package.version, "installed_ms": self.now_ms()}
            self.log.info("app.installed", app=app, version=package.version)
        await self.store.save(self.data)

    async def _chip_state(self) -> ChipState:
        apps = []
        for name in sorted(self.data["apps"]):
            try:
                dynamic = load_json(
                    (await asyncio.to_thread(self.dep.read_app, self.device or "", name)).dynamic,
                    f"{name} dynamic data",
                )
                counter = int(dynamic.get("counter", 0))
            except (ConfigError, ValueError):
                counter = -1
            apps.append(AppInfo(name, self.data["apps"][name]["version"], counter))
        update = self.certs.update
        return ChipState(
            bool(self.data["enabled"]),
            self.is_open,
            tuple(apps),
            update.to_bytes() if update else b"",
            self.data["reason"],
        )

    # -- the trust module's commands (A) ------------------------------------------
    async def info(self, rx: Any) -> tuple[str, Body]:
        return "chip.state", await self._chip_state()

    async def set_enabled(self, rx: Any) -> tuple[str, Body]:
        cmd: SetEnabled = rx.envelope.body
        self.data["enabled"], self.data["reason"] = cmd.enabled, cmd.reason
        await self.store.save(self.data)
        self.log.info("chip.enabled" if cmd.enabled else "chip.disabled", reason=cmd.reason)
        return "chip.state", await self._chip_state()

    async def delete_app(self, rx: Any) -> tuple[str, Body]:
        """A3: the trust module found this app tampered with."""
        cmd: DeleteApp = rx.envelope.body
        if cmd.app in self.data["apps"]:
            async with self._app_locks[cmd.app]:
                del self.data["apps"][cmd.app]
                await self.store.save(self.data)
                await asyncio.to_thread(shutil.rmtree, self.dep.app_dir(self.device or "", cmd.app), True)
            self.log.warning("app.deleted", app=cmd.app, reason=cmd.reason)
        return "chip.state", await self._chip_state()

    # -- the client's commands (B) --------------------------------------------------
    async def open_chip(self, rx: Any) -> tuple[str, Body]:
        """B1: the client opens the chip; refused while payment functions are disabled."""
        if not self.data["enabled"]:
            raise Refused("disabled", self.data["reason"])  # the code says disabled; the reason says why
        self.is_open = True
        if self.data["pending"]:
            self.spawn(self._resend_pending(), name="resend-pending")
        return "chip.state", await self._chip_state()

    async def close_chip(self, rx: Any) -> tuple[str, Body]:
        """B4: payment functions stay disabled until the client opens the chip again."""
        self.is_open = False
        return "chip.state", await self._chip_state()

    def _check_usable(self, app: str) -> None:
        if not self.data["enabled"]:
            raise Refused("disabled", self.data["reason"])  # the code says disabled; the reason says why
        if not self.is_open:
            raise Refused("closed", "the client has not opened the chip (B1)")
        if app not in self.data["apps"]:
            raise Refused("unknown_app", f"no payment application {app!r} in this chip")

    # -- C: one payment ----------------------------------------------------------------
    async def pay(self, rx: Any) -> tuple[str, Body]:
        req: PayStart = rx.envelope.body
        session: bytes = rx.envelope.session
        earlier = await self._earlier_answer(req.order_id)
        if earlier is not None:
            return "pay.result", earlier
        self._check_usable(req.app)
        async with self._app_locks[req.app]:
            result = await self._pay(req, session)
        # C6 outside the app's lock: the trust module may delete the app (A3) if it fails
        if result.session and result.code != "untrusted":
            await self._c6(session)
        self.sandbox.warm_up()  # the next payment's worker, started off this payment's path
        return "pay.result", result

    async def _earlier_answer(self, order_id: str) -> PayResult | None:
        """The answer to an order this chip already sent, for a client asking again.

        A client whose answer was lost asks again under the same message id; a
        chip that restarted meanwhile no longer knows that id, so without this
        it would refuse ("closed") an order it may already have paid. A held
        order is sent again (the payment-server answers a repeat with its first
        receipt); a settled one is answered from its stored receipt.
        """
        entry = self.data["pending"].get(order_id)
        if entry is not None:
            blob, session = bytes.fromhex(entry["order"]), bytes.fromhex(entry["session"])
            order = open_record(Order, blob, ORDER_DOMAIN, self.keys.sign_public, "order")
            status = await self._send_order(order_id, blob, record_hash(order.data), session)
            blob = bytes.fromhex(self.receipts.records.get(order_id, ""))
            return PayResult(*status, order_id, blob, session)
        stored = self.receipts.records.get(order_id)
        if stored is None or self.payment_server is None:
            return None
        blob = bytes.fromhex(stored)
        try:
            key = self.payment_server.body.sign_key
            receipt = open_record(Receipt, blob, RECEIPT_DOMAIN, key, "receipt").body
        except TrustpayError:  # signed by keys rotated away since: the order runs its normal course
            return None
        reason = receipt.reason or "payment confirmed"
        return PayResult(receipt.status, receipt.code, reason, order_id, blob, b"")

    async def _c6(self, session: bytes) -> None:
        """C6: the trust module measures the app's new state and stores it."""
        try:
            await self.request(
                self.link(Role.TRUST_MODULE),
                "c6.done",
                SessionDone(session),
                recipient=self.tm_id,
                expect="measured",
                session=session,
            )
        except TrustpayError as exc:
            self.log.warning("c6.not_confirmed", reason=str(exc))

    async def _pay(self, req: PayStart, session: bytes) -> PayResult:
        """C1-C5 for one pay.start: attest the intent, then run exactly the measured app bytes."""
        # read once: this buffer is what the trust module's measurement must match and what runs
        files = await asyncio.to_thread(self.dep.read_app, self.device or "", req.app)
        buffer = measure("app", req.app, "", files.code, files.static, files.dynamic)  # its three digests
        intent = Intent(self.device or "", req.order_id, req.app, req.payee, req.amount, req.currency)
        bound = intent_hash(intent)
        attest = AttestRequest(
            req.app, req.order_id, bound, buffer.code, buffer.static, buffer.dynamic, req.client_dyn_next
        )
        try:
            answer = await self.request(
                self.link(Role.TRUST_MODULE),
                "attest.request",
                attest,
                recipient=self.tm_id,
                expect="attest.result",
                session=session,
                peer=await self._tm_cert(),
                timeout_s=self.settings.request_timeout_s * self.settings.request_attempts * ATTEST_PATIENCE,
                attempts=1,
            )
        except Refused as exc:
            return PayResult("refused", exc.refusal_code, exc.refusal_reason, req.order_id, b"", b"")
        except RequestTimeout as exc:
            return PayResult("refused", "attestation_unavailable", str(exc), req.order_id, b"", b"")
        result: AttestResult = answer.envelope.body
        if not result.trusted:
            return PayResult("refused", result.code or "untrusted", result.reason, req.order_id, b"", session)
        try:
            payment_server = self.certs.resolve(list(result.payment_chain), self.now_ms() // 1000)
            if payment_server.role != PS:
                raise WrongRole(f"the payment chain ends in a {payment_server.role}, not the {PS}")
        except TrustpayError as exc:
            return PayResult("refused", "platform_untrusted", str(exc), req.order_id, b"", session)
        self.payment_server = payment_server
        # C5: the app runs now, from the very bytes the trust module measured, in a worker
        try:
            order, next_bytes = await self._run_app(req, intent, files)
        except Refused as exc:
            self.step("C", "C5", "refused", exc.refusal_code, session=session, order_id=req.order_id)
            return PayResult("refused", exc.refusal_code, exc.refusal_reason, req.order_id, b"", session)
        try:  # the trust module journals the new digest before it is written (crash-safe, see there)
            await self.request(
                self.link(Role.TRUST_MODULE),
                "c5.journal",
                JournalEntry(req.app, dynamic_digest(next_bytes)),
                recipient=self.tm_id,
                expect="journalled",
                session=session,
                peer=await self._tm_cert(),
            )
        except (Refused, RequestTimeout) as exc:
            reason = exc.refusal_reason if isinstance(exc, Refused) else str(exc)
            return PayResult("refused", "not_journalled", reason, req.order_id, b"", session)
        # the counter moves before the order leaves, so it is never reused
        path = self.dep.app_dir(self.device or "", req.app) / "dynamic.json"
        self.data["pending"][req.order_id] = {"order": order.to_bytes().hex(), "session": session.hex()}
        try:  # the counter, then the order held: one worker-thread hop
            await self.store.save(self.data, first=functools.partial(write_atomic, path, next_bytes, 0o644))
        except BaseException:
            self.data["pending"].pop(req.order_id, None)  # not held: never sent, not even when asked again
            raise
        status = await self._send_order(req.order_id, order.to_bytes(), record_hash(order.data), session)
        receipt = bytes.fromhex(self.receipts.records.get(req.order_id, ""))
        return PayResult(*status, req.order_id, receipt, session)

    async def _run_app(
        self, req: PayStart, intent: Intent, files: ComponentFiles
    ) -> tuple[Signed[Order], bytes]:
        """The app's order and next dynamic data, refused unless the order is exactly the intent."""
        answer = await self.sandbox.make_order(
            files.code,
            files.static,
            files.dynamic,
            {
                "device": intent.device,
                "payee": intent.payee,
                "amount": intent.amount,
                "currency": intent.currency,
                "order_id": intent.order_id,
                "now_ms": self.now_ms(),
            },
        )
        try:
            order = from_map(Order, answer.order, "the app's order")
            next_bytes = canonical_json(answer.dynamic)
            if intent_of(order) == intent:
                return sign_record(order, ORDER_DOMAIN, self.keys), next_bytes
        except (TrustpayError, ValueError, TypeError, RecursionError) as exc:  # fields, sizes, nesting
            raise Refused("app_failed", f"{req.app} returned a malformed order: {exc}") from exc
        # the app tried to pay something other than what the user asked: nothing leaves the chip
        raise Refused(
            "order_mismatch",
            f"{req.app} made an order that differs from the payment asked for; nothing was paid",
        )

    async def _tm_cert(self) -> Certificate:
        """The trust module's certificate: sealed requests are boxed for its key.

        One read from the deployment is checked like a frame's chain (root-issued, this
        device's trust module), so a planted file cannot make the chip seal to another key.
        """
        held = self.peers.get(self.tm_id)
        if held is not None:
            return held
        cert = self.certs.resolve(
            [(await asyncio.to_thread(self.dep.load_cert, self.tm_id)).to_bytes()], self.now_ms() // 1000
        )
        if (cert.subject, cert.role) != (self.tm_id, Role.TRUST_MODULE.value):
            raise WrongRole(
                f"{self.dep.node_cert_path(self.tm_id)} is not {self.tm_id}'s trust-module certificate"
            )
        self.peers[self.tm_id] = cert
        return cert

    async def _send_order(
        self, order_id: str, blob: bytes, order_hash: bytes, session: bytes
    ) -> tuple[str, str, str]:
        """Send the sealed order and check the receipt: (status, code, reason)."""
        assert self.payment_server is not None
        try:
            answer = await self.request(
                self.link(Role.PAYMENT_SERVER),
                "pay.order",
                PayOrder(blob),
                recipient=PS,
                expect="pay.receipt",
                session=session,
                peer=self.payment_server,
            )
            receipt_blob = (
                answer.envelope.body.receipt if isinstance(answer.envelope.body, PayReceipt) else b""
            )
            receipt = open_record(
                Receipt, receipt_blob, RECEIPT_DOMAIN, answer.sender_cert.body.sign_key, "receipt"
            ).body
        except RequestTimeout as exc:
            self.step(
                "C",
                "C5",
                "unknown",
                f"no receipt yet; the order will be re-sent: {exc}",
                session=session,
                order_id=order_id,
            )
            return "unknown", "no_receipt", "no receipt from the payment server yet; it will be re-sent"
        except Refused as exc:  # a definitive, signed answer: the order will never execute
            self.step("C", "C5", "refused", exc.refusal_code, session=session, order_id=order_id)
            await self._settled(order_id, b"")
            return "refused", exc.refusal_code, exc.refusal_reason
        except TrustpayError as exc:  # a receipt that does not verify: keep the order, try again later
            self.step("C", "C5", "failed", f"bad receipt: {exc.code}", session=session, order_id=order_id)
            await self._count_attempt(order_id)
            return "unknown", "bad_receipt", f"the receipt does not verify: {exc}"
        if receipt.order_hash != order_hash or receipt.order_id != order_id:
            self.step("C", "C5", "failed", "receipt is for another order", session=session, order_id=order_id)
            await self._count_attempt(order_id)
            return "unknown", "bad_receipt", "the receipt does not match the order"
        await self._settled(order_id, receipt_blob)
        # step events cross the bus in the clear: the code only, never amounts or payees
        outcome = "ok" if receipt.status == "confirmed" else "refused"
        self.step("C", "C5", outcome, receipt.code or "payment confirmed", session=session, order_id=order_id)
        return receipt.status, receipt.code, receipt.reason or "payment confirmed"

    async def _settled(self, order_id: str, receipt: bytes) -> None:
        """The order is no longer held; its receipt is durable before that is (one thread hop)."""
        self.data["pending"].pop(order_id, None)
        write_receipt = self.receipts.add(order_id, receipt.hex()) if receipt else None
        await self.store.save(self.data, first=write_receipt)

    async def _count_attempt(self, order_id: str) -> None:
        """A pending order whose receipts keep failing is given up after a few tries, loudly."""
        entry = self.data["pending"].get(order_id)
        if entry is None:
            return
        entry["attempts"] = entry.get("attempts", 0) + 1
        if entry["attempts"] >= MAX_RESENDS:
            self.data["pending"].pop(order_id)
            self.data.setdefault("abandoned", {})[order_id] = entry
            self.log.error(
                "order.abandoned",
                order=order_id,
                attempts=entry["attempts"],
                reason="no verifiable receipt; reconcile with the payment-server's ledger",
            )
        await self.store.save(self.data)

    async def _resend_pending(self) -> None:
        for order_id, entry in list(self.data["pending"].items()):
            blob = bytes.fromhex(entry["order"])
            order = open_record(Order, blob, ORDER_DOMAIN, self.keys.sign_public, "order")
            await self._send_order(order_id, blob, record_hash(order.data), bytes.fromhex(entry["session"]))

    # -- account queries ------------------------------------------------------------------
    async def account(self, rx: Any) -> tuple[str, Body]:
        query: AccountQuery = rx.envelope.body
        self._check_usable(query.app)
        # a platform rotation gives the payment-server new keys: seal to the current box key
        await self._refresh_payment_server()
        if self.payment_server is None:
            raise Refused("platform_untrusted", "no verified payment-server certificate")
        answer = await self.request(
            self.link(Role.PAYMENT_SERVER),
            "account.query",
            query,
            recipient=PS,
            expect="account.info",
            peer=self.payment_server,
            session=rx.envelope.session,
        )
        info: AccountInfo = answer.envelope.body
        return "account.info", info
