"""The mobile payment client (13): the user-facing program, flows B1-B5.

B1 opens the chip (refused: B5 reports that payment is disabled and the client
closes); B2 takes the user's commands, from the command line or a terminal;
B3 runs each; closing is B4, which leaves payment functions disabled until the
next start. This module and every project module it imports are the client
*install* (``devices/{device}/client/code/``): the trust module measures all of
it, and ``trustpay client`` runs it only from bytes whose digests match that
measurement (``ops.client_boot``, entry point :mod:`nodes.client_main`).

A payment is reported from its signed receipt, never from what was asked: the
receipt must name this order, this device and the amount, currency and payee the
user typed. Exit status: 0 only when the command did what was asked (a payment
confirmed by such a receipt); 1 refused (nothing was paid); 2 bad command; 3
payment functions disabled; 4 outcome unknown or not what was asked (a missing,
forged or different receipt: money may have moved, so the user must look at
the account's history), always with the reason.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from protocol.errors import CertificateInvalid, Refused, RequestTimeout, TrustpayError
from protocol.measure import dynamic_digest
from protocol.messages import (
    AccountInfo,
    AccountQuery,
    ChipState,
    Empty,
    PayResult,
    PayStart,
    Reports,
    SessionDone,
)
from protocol.records import RECEIPT_DOMAIN, Receipt, open_record
from protocol.topics import Role, node_id

from .bus import Bus
from .client_text import format_amount, parse_amount, record_payment
from .deployment import Deployment, canonical_json, load_json
from .runtime import Node, NodeConfig
from .store import write_atomic

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_DISABLED, EXIT_UNKNOWN = 0, 1, 2, 3, 4
PAY_PATIENCE = 8  # a payment spans attestation and settlement: this many request lifetimes
USAGE = "commands: pay AMOUNT PAYEE [APP] | balance [APP] | history [APP] | apps | status | quit"


@dataclass
class Outcome:
    code: int
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class Client(Node):
    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        deployment: Deployment,
        command: list[str] | None = None,
        out: TextIO = sys.stdout,
        as_json: bool = False,
        interactive: bool = False,
        static: bytes | None = None,
    ) -> None:
        """``static``: the client's static data as the boot path checked it (else read once, at B1)."""
        super().__init__(config, bus, log)
        assert self.device is not None
        self.dep = deployment
        self.command = command or []
        self.out = out
        self.as_json = as_json
        self.interactive = interactive
        self.chip_id = node_id(Role.CHIP, self.device)
        self.tm_id = node_id(Role.TRUST_MODULE, self.device)
        self.exit_code = EXIT_UNKNOWN
        self.chip_state: ChipState | None = None
        self._static_bytes = static
        self.static: dict[str, Any] = {}

    # -- the session: B1 .. B5 -------------------------------------------------------
    async def main(self) -> None:
        try:
            self.exit_code = await self.session()
        finally:
            self.stop()

    async def session(self) -> int:
        if self._static_bytes is None:
            self._static_bytes = await asyncio.to_thread(
                self.dep.read_client_data, self.device or "", "static"
            )
        self.static = load_json(self._static_bytes, "client static data")
        await self._show_reports()
        try:  # B1
            answer = await self.request(
                self.link(Role.CHIP), "chip.open", Empty(), recipient=self.chip_id, expect="chip.state"
            )
        except (Refused, RequestTimeout, CertificateInvalid) as exc:  # B5
            reason = (
                exc.refusal_reason
                if isinstance(exc, Refused)
                else exc.reason  # the chip answered under a certificate we refuse (a revoked device)
                if isinstance(exc, CertificateInvalid)
                else f"the payment chip does not answer: {exc}"
            )
            self.step("B", "B5", "disabled", reason)
            self._emit(
                Outcome(
                    EXIT_DISABLED,
                    f"Payment functions are disabled: {reason}",
                    {"status": "disabled", "reason": reason},
                )
            )
            return EXIT_DISABLED
        self.chip_state = answer.envelope.body
        self.step("B", "B1", "ok", "payment chip opened")
        code = EXIT_OK
        try:
            if self.command:
                code = await self.execute(self.command)
            elif self.interactive:
                code = await self._interactive()
            else:
                self._emit(Outcome(EXIT_USAGE, USAGE))
                code = EXIT_USAGE
        finally:  # B4
            try:
                await self.request(
                    self.link(Role.CHIP), "chip.close", Empty(), recipient=self.chip_id, expect="chip.state"
                )
                self.step("B", "B4", "ok", "client closed; payment functions disabled until the next start")
            except TrustpayError as exc:
                self.step("B", "B4", "failed", f"could not close the chip: {exc}")
        return code

    async def _interactive(self) -> int:
        print(USAGE, file=self.out, flush=True)
        code = EXIT_OK
        for _ in range(10_000):  # B2: a bounded session of user commands
            try:
                line = await asyncio.to_thread(input, "trustpay> ")
            except EOFError:
                break
            words = shlex.split(line)
            if not words:
                continue
            if words[0] in ("quit", "exit"):
                break
            code = await self.execute(words)
        return code

    async def execute(self, words: list[str]) -> int:
        """B3: run one user command."""
        verb, args = words[0], words[1:]
        try:
            if verb == "pay" and len(args) in (2, 3):
                outcome = await self.pay(args[0], args[1], args[2] if len(args) == 3 else None)
            elif verb in ("balance", "history") and len(args) <= 1:
                outcome = await self.account(verb, args[0] if args else None)
            elif verb == "apps" and not args:
                outcome = self.apps(await self._refresh())
            elif verb == "status" and not args:
                outcome = self.status(await self._refresh())
            else:
                outcome = Outcome(EXIT_USAGE, f"unknown command {' '.join(words)!r}; {USAGE}")
        except Refused as exc:
            outcome = Outcome(
                EXIT_REFUSED,
                f"Refused ({exc.refusal_code}): {exc.refusal_reason}",
                {"status": "refused", "code": exc.refusal_code, "reason": exc.refusal_reason},
            )
        except RequestTimeout as exc:
            outcome = Outcome(EXIT_UNKNOWN, f"No answer: {exc}", {"status": "unknown", "reason": str(exc)})
        # the event crosses the bus in the clear: what was done and how it ended, no amounts
        status = outcome.data.get("status", "done" if outcome.code == EXIT_OK else "failed")
        self.step("B", "B3", "ok" if outcome.code == EXIT_OK else "failed", f"{verb}: {status}")
        self._emit(outcome)
        return outcome.code

    # -- commands ---------------------------------------------------------------------
    @property
    def _exponent(self) -> int:
        return int(self.static["exponent"])

    def _money(self, minor: int, currency: str) -> str:
        return format_amount(minor, currency, self._exponent)

    async def pay(self, amount_text: str, payee: str, app: str | None) -> Outcome:
        try:
            amount = parse_amount(amount_text, self._exponent)
        except ValueError as exc:
            return Outcome(EXIT_USAGE, str(exc), {"status": "invalid", "reason": str(exc)})
        app = app or str(self.static["default_app"])
        order_id = f"ord-{uuid.uuid4().hex}"
        dynamic = await asyncio.to_thread(self.dep.read_client_data, self.device or "", "dynamic")
        next_dynamic = canonical_json(record_payment(load_json(dynamic, "client dynamic data"), order_id))
        currency = str(self.static["currency"])
        start = PayStart(order_id, app, amount, currency, payee, dynamic_digest(next_dynamic))
        answer = await self.request(
            self.link(Role.CHIP),
            "pay.start",
            start,
            recipient=self.chip_id,
            expect="pay.result",
            session=uuid.uuid4().bytes,
            peer=self._chip_cert(),
            # asked again under the same id while no answer comes: the chip answers a repeat from its
            # cache, or (restarted meanwhile) from the order it holds; never a second payment
            timeout_s=self.settings.request_timeout_s * self.settings.request_attempts,
            attempts=PAY_PATIENCE,
        )
        result: PayResult = answer.envelope.body
        if result.session:  # the trust module journalled this digest: record the attempt, then C7
            await self._record(result.session, next_dynamic)
        asked = f"{self._money(amount, currency)} to {payee}"
        data = {
            "status": result.status,
            "code": result.code,
            "reason": result.reason,
            "order_id": order_id,
            "amount": amount,
            "currency": currency,
            "payee": payee,
            "app": app,
            "session": result.session.hex(),
        }
        if result.status != "confirmed":
            exit_code = EXIT_UNKNOWN if result.status == "unknown" else EXIT_REFUSED
            return Outcome(
                exit_code, f"Payment of {asked} {result.status} ({result.code}): {result.reason}", data
            )
        receipt = await asyncio.to_thread(self._open_receipt, result.receipt)  # reads the deployment
        if receipt is None:
            why = "the receipt does not verify"
            return Outcome(
                EXIT_UNKNOWN,
                f"Payment of {asked}: outcome unknown, {why}; check the history",
                {**data, "status": "unknown", "reason": why},
            )
        wrong = self._receipt_mismatch(receipt, start)
        if wrong:
            said = f"{self._money(receipt.amount, receipt.currency)} to {receipt.payee}"
            why = (
                f"the payment server's receipt says {said} (order {receipt.order_id}); it differs in {wrong}"
            )
            return Outcome(
                EXIT_UNKNOWN,
                f"NOT the payment you asked for ({asked}): {why}. Check the history.",
                {**data, "status": "mismatch", "reason": why, "receipt": _receipt_data(receipt)},
            )
        paid = f"{self._money(receipt.amount, receipt.currency)} to {receipt.payee}"
        balance = self._money(receipt.balance_after, receipt.currency)
        return Outcome(
            EXIT_OK,
            f"Paid {paid} with {app} (order {receipt.order_id}); balance {balance}",
            {**data, "balance_after": receipt.balance_after, "receipt": _receipt_data(receipt)},
        )

    async def _record(self, session: bytes, next_dynamic: bytes) -> None:
        """Write the payment's record (the digest the trust module journalled), then C7."""
        path = self.dep.client_dir(self.device or "") / "dynamic.json"
        await asyncio.to_thread(write_atomic, path, next_dynamic, 0o644)
        try:
            await self.request(
                self.link(Role.TRUST_MODULE),
                "c7.done",
                SessionDone(session),
                recipient=self.tm_id,
                expect="measured",
                session=session,
            )
        except TrustpayError as exc:
            self.log.warning("c7.not_confirmed", reason=str(exc))

    def _chip_cert(self) -> Any:
        return self.peers.get(self.chip_id) or self.dep.load_cert(self.chip_id)

    def _open_receipt(self, blob: bytes) -> Receipt | None:
        """In a worker thread: the deployment's files are read afresh (a rotation or a new replica)."""
        # each replica of the payment-server signs with its own key: the receipt is good if one made it
        try:
            servers = self.dep.load_manifest().server_ids(Role.PAYMENT_SERVER)
        except TrustpayError as exc:
            self.log.warning("receipt.invalid", reason=str(exc))
            return None
        reasons = []
        for nid in servers:
            try:
                server = self.dep.load_cert(nid)
                return open_record(Receipt, blob, RECEIPT_DOMAIN, server.body.sign_key, "receipt").body
            except TrustpayError as exc:
                reasons.append(str(exc))
        self.log.warning("receipt.invalid", reason="; ".join(reasons))
        return None

    def _receipt_mismatch(self, receipt: Receipt, asked: PayStart) -> str:
        """The fields where the signed receipt differs from what the user asked ("" if none)."""
        names = ("order", "device", "status", "amount", "currency", "payee")
        asked_for = (asked.order_id, self.device, "confirmed", asked.amount, asked.currency, asked.payee)
        got = (
            receipt.order_id,
            receipt.device,
            receipt.status,
            receipt.amount,
            receipt.currency,
            receipt.payee,
        )
        return ", ".join(name for name, a, g in zip(names, asked_for, got, strict=True) if a != g)

    async def account(self, what: str, app: str | None) -> Outcome:
        app = app or str(self.static["default_app"])
        answer = await self.request(
            self.link(Role.CHIP),
            "account.query",
            AccountQuery(app, 20),
            recipient=self.chip_id,
            expect="account.info",
            peer=self._chip_cert(),
        )
        info: AccountInfo = answer.envelope.body
        balance = self._money(info.balance, info.currency)
        data: dict[str, Any] = {"account": info.account, "balance": info.balance, "currency": info.currency}
        if what == "balance":
            return Outcome(EXIT_OK, f"{info.account}: {balance}", data)
        lines = [
            f"{p.order_id}  {p.status:<9} {self._money(p.amount, p.currency):>14}  {p.payee}"
            for p in info.payments
        ]
        data["payments"] = [p.__dict__ for p in info.payments]
        return Outcome(EXIT_OK, "\n".join([f"{info.account}: {balance}", *lines]), data)

    async def _refresh(self) -> ChipState:
        """The chip's state now (counters move with every payment): opening an open chip is harmless."""
        answer = await self.request(
            self.link(Role.CHIP), "chip.open", Empty(), recipient=self.chip_id, expect="chip.state"
        )
        self.chip_state = answer.envelope.body
        return self.chip_state

    def apps(self, state: ChipState) -> Outcome:
        apps = state.apps
        data = {"apps": [{"name": a.name, "version": a.version, "counter": a.counter} for a in apps]}
        text = (
            "\n".join(f"{a.name} {a.version} (transactions: {a.counter})" for a in apps) or "no payment apps"
        )
        return Outcome(EXIT_OK, text, data)

    def status(self, state: ChipState) -> Outcome:
        word = "enabled" if state.enabled else "disabled"
        data = {"device": self.device, "enabled": state.enabled, "apps": [a.name for a in state.apps]}
        return Outcome(EXIT_OK, f"device {self.device}: payment functions {word}", data)

    # -- output -------------------------------------------------------------------------
    async def _show_reports(self) -> None:
        """Every report the trust module left for the user (deleted apps, disabled payment)."""
        try:
            answer = await self.request(
                self.link(Role.TRUST_MODULE), "reports.get", Empty(), recipient=self.tm_id, expect="reports"
            )
        except TrustpayError as exc:
            self.log.warning("reports.unavailable", reason=str(exc))
            return
        reports: Reports = answer.envelope.body
        for report in reports.items:
            if self.as_json:
                print(
                    json.dumps({"report": report.text, "step": report.step, "at_ms": report.at_ms}),
                    file=self.out,
                    flush=True,
                )
            else:
                print(f"[trust module, {report.step}] {report.text}", file=self.out, flush=True)

    def _emit(self, outcome: Outcome) -> None:
        if self.as_json:
            print(
                json.dumps({"exit": outcome.code, "message": outcome.text, **outcome.data}),
                file=self.out,
                flush=True,
            )
        else:
            print(outcome.text, file=self.out, flush=True)


def _receipt_data(receipt: Receipt) -> dict[str, Any]:
    return {
        "order_id": receipt.order_id,
        "amount": receipt.amount,
        "currency": receipt.currency,
        "payee": receipt.payee,
        "payer": receipt.payer,
        "balance_after": receipt.balance_after,
    }
