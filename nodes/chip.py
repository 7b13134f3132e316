"""The mobile payment chip (100), a secure element hosting the payment apps (12).

It installs apps only from packages the issuer signed, deletes them when the
trust module says so (A3), refuses every payment function while disabled (A5)
or closed (B4), keeps each app's transaction counter, and runs the payment
itself (C5): the app's installed code makes the order, the chip signs it,
asks the trust module to attest the terminal for exactly that order (C1-C4),
seals the order for the payment-server and checks the signed receipt. It
holds the update certificate (claim 3), so it accepts a rotated platform
certificate only when the update key signed it.

An order whose receipt never came is kept and re-sent (same bytes, so the
payment-server answers with the original receipt) when the client next opens
the chip: no payment is lost, none is made twice.
"""

from __future__ import annotations

import asyncio
import shutil
import types
from collections import defaultdict
from typing import Any

import structlog

from protocol.certs import Certificate
from protocol.errors import ConfigError, Refused, RequestTimeout, TrustpayError
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
    Order,
    Package,
    Receipt,
    open_record,
    record_hash,
    sign_record,
)
from protocol.topics import Role, node_id

from .bus import Bus
from .deployment import Deployment, canonical_json, load_json
from .runtime import Node, NodeConfig, now_ms
from .store import JsonState, write_atomic

PS = Role.PAYMENT_SERVER.value
RECEIPTS_KEPT = 100
MAX_RESENDS = 5
ATTEST_PATIENCE = 4  # an attestation spans several platform round trips: wait this many request lifetimes


class Chip(Node):
    def __init__(
        self, config: NodeConfig, bus: Bus, log: structlog.typing.FilteringBoundLogger, deployment: Deployment
    ) -> None:
        super().__init__(config, bus, log)
        assert self.device is not None
        self.dep = deployment
        self.tm_id = node_id(Role.TRUST_MODULE, self.device)
        self.store = JsonState(self.config.state_dir / "chip.json")
        self.data: dict[str, Any] = {}
        self.is_open = False
        self.payment_server: Certificate | None = None
        self._app_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
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
    async def prepare(self) -> None:
        self.data = self.store.load(
            {
                "enabled": False,
                "reason": "not yet checked by the trust module",
                "apps": {},
                "pending": {},
                "receipts": {},
            }
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
            self.payment_server = self.certs.resolve(chain, now_ms() // 1000)
        except TrustpayError as exc:
            self.log.warning("chip.no_payment_server_cert", reason=str(exc))

    async def _install_from_packages(self) -> None:
        """Install every app on disk whose package the issuer signed and whose bytes match it."""
        try:
            issuer = self.dep.load_issuer(self.certs, now_ms() // 1000)
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
            self.data["apps"][app] = {"version": package.version, "installed_ms": now_ms()}
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
        self._check_usable(req.app)
        async with self._app_locks[req.app]:
            result = await self._pay(req, session)
        # C6 outside the app's lock: the trust module may delete the app (A3) if it fails
        if result.session and result.code != "untrusted":
            await self._c6(session)
        return "pay.result", result

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

    def _load_app(self, app: str, code: bytes) -> types.ModuleType:
        """Run the app's installed code, the very bytes the trust module measures."""
        module = types.ModuleType(f"trustpay_app_{app}")
        exec(
            compile(code, str(self.dep.app_dir(self.device or "", app) / "code.py"), "exec"), module.__dict__
        )
        return module

    async def _pay(self, req: PayStart, session: bytes) -> PayResult:
        files = await asyncio.to_thread(self.dep.read_app, self.device or "", req.app)
        try:
            app = self._load_app(req.app, files.code)
            fields, next_dynamic = app.make_order(
                load_json(files.static, "static data"),
                load_json(files.dynamic, "dynamic data"),
                device=self.device,
                payee=req.payee,
                amount=req.amount,
                currency=req.currency,
                order_id=req.order_id,
                now_ms=now_ms(),
            )
            order = sign_record(Order(**fields), ORDER_DOMAIN, self.keys)
        except (ValueError, TypeError, KeyError, ConfigError) as exc:
            raise Refused("invalid_order", str(exc)) from exc
        except Exception as exc:  # the app's code is not ours to trust: any failure is a refusal
            raise Refused("app_failed", f"{req.app} failed to make the order: {exc!r}") from exc
        order_hash = record_hash(order.data)
        next_bytes = canonical_json(next_dynamic)
        attest = AttestRequest(
            req.app, req.order_id, order_hash, dynamic_digest(next_bytes), req.client_dyn_next
        )
        try:
            answer = await self.request(
                self.link(Role.TRUST_MODULE),
                "attest.request",
                attest,
                recipient=self.tm_id,
                expect="attest.result",
                session=session,
                timeout_s=self.settings.request_timeout_s * self.settings.request_attempts * ATTEST_PATIENCE,
                attempts=1,
            )
        except Refused as exc:
            return PayResult("refused", exc.refusal_code, exc.refusal_reason, req.order_id, b"", b"")
        except RequestTimeout as exc:
            return PayResult("refused", "attestation_unavailable", str(exc), req.order_id, b"", b"")
        result: AttestResult = answer.envelope.body
        if not result.trusted:
            return PayResult("refused", "untrusted", result.reason, req.order_id, b"", session)
        try:
            payment_server = self.certs.resolve(list(result.payment_chain), now_ms() // 1000)
        except TrustpayError as exc:
            return PayResult("refused", "platform_untrusted", str(exc), req.order_id, b"", session)
        self.payment_server = payment_server
        # C5: the counter moves before the order leaves, so it is never reused
        path = self.dep.app_dir(self.device or "", req.app) / "dynamic.json"
        await asyncio.to_thread(write_atomic, path, next_bytes, 0o644)
        self.data["pending"][req.order_id] = {"order": order.to_bytes().hex(), "session": session.hex()}
        await self.store.save(self.data)
        status = await self._send_order(req.order_id, order.to_bytes(), order_hash, session)
        receipt = bytes.fromhex(self.data["receipts"].get(req.order_id, ""))
        return PayResult(*status, req.order_id, receipt, session)

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
        self.data["pending"].pop(order_id, None)
        if receipt:
            self.data["receipts"][order_id] = receipt.hex()
            while len(self.data["receipts"]) > RECEIPTS_KEPT:
                self.data["receipts"].pop(next(iter(self.data["receipts"])))
        await self.store.save(self.data)

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
