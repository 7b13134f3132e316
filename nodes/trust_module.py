"""The terminal trust module (11): start-up integrity (A1-A5) and payment attestation (C1-C7).

It measures the client and every payment app from their bytes on disk (claim
2), keeps the current platform certificate and the released reference
measurements (claim 3), and stands between the chip and the platform: the chip
asks it to attest a payment, it runs C1-C4 with the trust-server, and after the
app paid it re-measures and stores (C6, C7).

Durable state (``state/trust.json``) is the module's protected storage: stored
measurements, the platform certificate, reports for the user, and a journal of
open payment sessions. Dynamic data may change only inside a session, to the
digest the chip and client announced before writing it (the client's with
``attest.request``, the app's with ``c5.journal`` once its verdict was trusted
and its order made); after a crash, the start-up checks accept either the
stored or the announced digest, so an interrupted payment neither bricks the
device nor lets a change made outside a session through.

At C2 it measures every component from disk and also compares its measurement
of the paying app with the digests of the buffer the chip read at
``pay.start`` and will run at C5: if the app changed in between, nothing is
quoted and the payment is refused (``app_changed``). So the bytes that run are
the bytes measured.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from protocol.appraisal import ReleaseBook, open_release
from protocol.certs import Certificate
from protocol.errors import ConfigError, Refused, RequestTimeout, TransportError, TrustpayError
from protocol.measure import APP, CLIENT, LogEntry, Measurement, MeasurementLog, make_quote, measure
from protocol.messages import (
    AttestRequest,
    AttestResult,
    Body,
    ChipState,
    DeleteApp,
    Empty,
    Evidence,
    JournalEntry,
    Measured,
    NonceRequest,
    PlatformCheck,
    Report,
    Reports,
    SessionDone,
    SetEnabled,
)
from protocol.records import AFFIRMING, VERDICT_DOMAIN, WARNING, Verdict, open_record
from protocol.replay import CLOCK_SKEW
from protocol.topics import Role, node_id

from .bus import Bus
from .deployment import SECRET_FILE_MODE, Deployment, canonical_json, load_json, write_file
from .runtime import Node, NodeConfig
from .store import JsonState

CHIP_WAIT_ATTEMPTS = 20  # x request timeout: how long start-up waits for the chip
UNTRUSTED, UNAVAILABLE = "untrusted", "attestation_unavailable"  # AttestResult.code when not trusted


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str
    measurement: Measurement


def component_of(kind: str, name: str) -> str:
    return CLIENT if kind == CLIENT else f"{APP}:{name}"


class TrustModule(Node):
    def __init__(
        self, config: NodeConfig, bus: Bus, log: structlog.typing.FilteringBoundLogger, deployment: Deployment
    ) -> None:
        super().__init__(config, bus, log)
        assert self.device is not None
        self.dep = deployment
        self.chip_id = node_id(Role.CHIP, self.device)
        self.client_id = node_id(Role.CLIENT, self.device)
        self.store = JsonState(self.config.state_dir / "trust.json")
        self.data: dict[str, Any] = {}
        self.book = ReleaseBook()
        self.apps: list[str] = []
        self.payment_enabled = False
        self.started = asyncio.Event()
        self._payment_lock = asyncio.Lock()
        self._told_boot_path: bytes | None = None  # what client.measured holds, once written by this run
        self.route("attest.request", self.attest)
        self.route("c5.journal", self.c5_journal)
        self.route("c6.done", self.c6_measure_app)
        self.route("c7.done", self.c7_measure_client)
        self.route("reports.get", self.reports)
        self.route("release.update", self.release_update)

    def state(self) -> str:
        if not self.started.is_set():
            return "starting"
        return "enabled" if self.payment_enabled else "disabled"

    # -- persistence ---------------------------------------------------------
    async def _load(self) -> None:
        self.data = self.store.load(
            {"measurements": {}, "platform_cert": "", "reports": [], "sessions": {}, "releases": []}
        )
        issuer = self.dep.load_issuer(self.certs, self.now_ms() // 1000)
        blobs = self.dep.load_releases() + [bytes.fromhex(h) for h in self.data["releases"]]
        for blob in blobs:
            self.book.add(open_release(blob, issuer))

    def _restore_platform(self) -> None:
        """Take back the platform certificate of an earlier rotation, through the update certificate.

        The state file is only as safe as the disk: a certificate stored there is
        held again only if the chip's update certificate signed it, exactly as
        when it was first accepted at C1. So it runs once the chip has handed
        over the update certificate (A2), before any payment.
        """
        stored = self.data["platform_cert"]
        if not stored or self.certs.platform is None or stored == self.certs.platform.to_bytes().hex():
            return
        try:
            held = Certificate.from_bytes(bytes.fromhex(stored))
            if held.serial > self.certs.platform.serial:
                self.certs.accept_platform(held, self.now_ms() // 1000)
                self.log.info("platform.restored", serial=held.serial)
                return
        except (TrustpayError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, TrustpayError) else str(exc)
            self.step("A", "A2", "failed", f"stored platform certificate refused: {reason}")
        # the written-in certificate stays; the next C1 takes a rotation through the update key again
        self.data["platform_cert"] = self.certs.platform.to_bytes().hex()

    async def _save(self) -> None:
        if self.certs.platform is not None:
            self.data["platform_cert"] = self.certs.platform.to_bytes().hex()
        await self.store.save(self.data)

    def _report(self, step: str, text: str) -> None:
        self.data["reports"].append({"at_ms": self.now_ms(), "step": step, "text": text, "delivered": False})

    # -- measuring -----------------------------------------------------------
    def _measure(self, component: str) -> Measurement | ConfigError | OSError:
        """Read ``component`` from disk and measure it; in a worker thread (no state touched)."""
        try:
            if component == CLIENT:
                files = self.dep.read_client(self.device or "")
            else:
                files = self.dep.read_app(self.device or "", component.split(":", 1)[1])
        except (ConfigError, OSError) as exc:
            return exc
        try:
            static = load_json(files.static, f"{component} static data")
            name, version = str(static["name"]), str(static["version"])
        except (ConfigError, KeyError):
            name, version = component.split(":", 1)[-1], "?"
        kind = CLIENT if component == CLIENT else APP
        return measure(kind, name, version, files.code, files.static, files.dynamic)

    def _measure_all(self, components: list[str]) -> list[Measurement | ConfigError | OSError]:
        return [self._measure(component) for component in components]

    def _allowed_dynamic(self, component: str) -> set[str]:
        allowed = set()
        stored = self.data["measurements"].get(component)
        if stored:
            allowed.add(stored["dynamic"])
        for session in self.data["sessions"].values():
            allowed.update(session["pending"].get(component, []))
        return allowed

    async def _check(self, component: str) -> Check:
        """Measure ``component`` and compare it with its release and its stored dynamic data."""
        return (await self._checks([component]))[0]

    async def _checks(self, components: list[str]) -> list[Check]:
        """:meth:`_check` for several components, read from disk in one worker-thread hop."""
        found = await asyncio.to_thread(self._measure_all, components)
        return [self._judge(component, m) for component, m in zip(components, found, strict=True)]

    def _judge(self, component: str, m: Measurement | ConfigError | OSError) -> Check:
        if not isinstance(m, Measurement):
            return Check(
                False, f"{component} cannot be read: {m}", measure(APP, component, "?", b"", b"", b"")
            )
        ok, reason = self.book.check(m)
        if ok:
            allowed = self._allowed_dynamic(component)
            if allowed and m.dynamic.hex() not in allowed:
                ok, reason = False, f"{component}: dynamic data changed outside a payment session"
            elif not allowed:
                reason += "; first measurement stored"
        return Check(ok, reason, m)

    async def _tell_boot_path(self, client: Check) -> None:
        """Leave the client digests just found good (or why none are) for ``trustpay client``'s boot path.

        The boot path runs the install only from bytes with these digests, so
        what the client executes is what was measured here (A1, C7).
        """
        m = client.measurement
        record = {"code": m.code.hex(), "static": m.static.hex()} if client.ok else {"refused": client.reason}
        text = canonical_json(record)
        if text == self._told_boot_path:  # every C7 finds the same client: no fsync per payment for it
            return
        path = self.dep.client_measured_path(self.device or "")
        await asyncio.to_thread(write_file, path, text, SECRET_FILE_MODE)
        self._told_boot_path = text

    def _store(self, m: Measurement) -> None:
        self.data["measurements"][m.component] = {
            "version": m.version,
            "code": m.code.hex(),
            "static": m.static.hex(),
            "dynamic": m.dynamic.hex(),
        }

    # -- A: start-up -----------------------------------------------------------
    async def prepare(self) -> None:
        await self._load()

    async def main(self) -> None:
        await self.start_up()

    async def start_up(self) -> None:
        """A1-A5: check the client, then every app in the chip."""
        client = await self._check(CLIENT)
        self.step("A", "A1", "ok" if client.ok else "failed", client.reason)
        await self._tell_boot_path(client)
        chip = await self._chip_info()
        if chip is None:
            self.payment_enabled = False
            self._report("A2", "The payment chip did not answer: payment functions are disabled.")
            await self._finish_start_up()
            return
        self.apps = [app.name for app in chip.apps]
        self._restore_platform()
        if not client.ok:
            await self._disable(f"the client failed its integrity check: {client.reason}")
            await self._finish_start_up()
            return
        self._store(client.measurement)
        self.payment_enabled = True  # until a check below disables it (A5)
        apps = list(self.apps)
        for i, app in enumerate(apps):
            check = await self._check(f"{APP}:{app}")
            if check.ok:
                self._store(check.measurement)
                self.step("A", "A2", "ok", check.reason, app=app)
            else:
                self.step("A", "A2", "failed", check.reason, app=app)
                await self._delete_app(app, check.reason)
            self.step(
                "A", "A4", "ok", "another application left" if i < len(apps) - 1 else "no application left"
            )
        self.data["sessions"] = {}  # every interrupted session is settled by the checks above
        if self.payment_enabled:
            await self._set_chip(True, "start-up checks passed")
        await self._finish_start_up()

    async def _finish_start_up(self) -> None:
        await self._save()
        self.started.set()
        self.step(
            "A",
            "A",
            "done" if self.payment_enabled else "disabled",
            "start-up complete" + ("" if self.payment_enabled else ": payment functions disabled"),
        )

    async def _chip_info(self) -> ChipState | None:
        try:
            answer = await self.request(
                self.link(Role.CHIP),
                "chip.info",
                Empty(),
                recipient=self.chip_id,
                expect="chip.state",
                attempts=CHIP_WAIT_ATTEMPTS,
            )
        except TrustpayError as exc:
            self.step("A", "A2", "failed", f"chip unreachable: {exc}")
            return None
        state: ChipState = answer.envelope.body
        try:
            self.certs.set_update(Certificate.from_bytes(state.update_cert))
        except TrustpayError as exc:
            self.step("A", "A2", "failed", f"the chip's update certificate is not valid: {exc}")
        return state

    async def _disable(self, reason: str) -> None:
        """A5: disable every payment function."""
        self.payment_enabled = False
        await self._set_chip(False, reason)
        self._report("A5", f"Payment functions are disabled: {reason}")
        self.step("A", "A5", "disabled", reason)

    async def _delete_app(self, app: str, reason: str) -> None:
        """A3: delete the application from the chip and tell the user."""
        try:
            await self.request(
                self.link(Role.CHIP),
                "app.delete",
                DeleteApp(app, reason),
                recipient=self.chip_id,
                expect="chip.state",
            )
        except TrustpayError as exc:
            self.step("A", "A3", "failed", f"could not delete {app}: {exc}", app=app)
            await self._disable(f"tampered app {app} could not be deleted")
            return
        self.apps.remove(app)
        self.data["measurements"].pop(f"{APP}:{app}", None)
        self._report("A3", f"Payment application '{app}' was deleted: {reason}")
        self.step("A", "A3", "deleted", reason, app=app)

    async def _set_chip(self, enabled: bool, reason: str) -> None:
        try:
            await self.request(
                self.link(Role.CHIP),
                "chip.enable",
                SetEnabled(enabled, reason),
                recipient=self.chip_id,
                expect="chip.state",
            )
        except TrustpayError as exc:
            self.log.warning("chip.enable_failed", enabled=enabled, reason=str(exc))

    # -- B: the client reads what happened -------------------------------------
    async def reports(self, rx: Any) -> tuple[str, Body]:
        await self.started.wait()
        items = tuple(
            Report(r["at_ms"], r["step"], r["text"]) for r in self.data["reports"] if not r["delivered"]
        )
        for r in self.data["reports"]:
            r["delivered"] = True
        if items:
            await self._save()
        return "reports", Reports(self.payment_enabled, items)

    # -- C: a payment ------------------------------------------------------------
    async def attest(self, rx: Any) -> tuple[str, Body]:
        """C1-C4 for the chip's payment, then C5 is the chip's."""
        req: AttestRequest = rx.envelope.body
        session: bytes = rx.envelope.session
        await self.started.wait()
        if not self.payment_enabled:
            raise Refused("disabled", "payment functions are disabled on this terminal (A5)")
        if req.app not in self.apps:
            raise Refused("unknown_app", f"application {req.app!r} is not installed")
        async with self._payment_lock:
            await self._open_session(session, req)
            result = await self._attest(session, req)
        return "attest.result", result

    async def _open_session(self, session: bytes, req: AttestRequest) -> None:
        """Journal the client's next dynamic digest before it is written; the app's comes at C5."""
        pending: dict[str, list[str]] = {}
        for component, new in ((f"{APP}:{req.app}", b""), (CLIENT, req.client_dyn_next)):
            stored = self.data["measurements"].get(component, {}).get("dynamic", "")
            pending[component] = [d for d in (stored, new.hex()) if d]
        self.data["sessions"][session.hex()] = {
            "app": req.app,
            "order": req.order_id,
            "pending": pending,
            "trusted": False,
            "opened_ms": self.now_ms(),
        }
        await self._save()

    async def c5_journal(self, rx: Any) -> tuple[str, Body]:
        """C5: the chip will write this app's next dynamic data; journal its digest first."""
        entry: JournalEntry = rx.envelope.body
        key = rx.envelope.session.hex()
        session = self.data["sessions"].get(key)
        if session is None or not session.get("trusted"):
            raise Refused("no_session", "no payment session with a trusted verdict has that id")
        if entry.app != session["app"]:
            raise Refused("wrong_app", f"the session is for {session['app']!r}, not {entry.app!r}")
        component = f"{APP}:{entry.app}"
        stored = self.data["measurements"].get(component, {}).get("dynamic", "")
        session["pending"][component] = [d for d in (stored, entry.dynamic.hex()) if d]
        await self._save()
        self.log.info("c5.journalled", app=entry.app, session=key)
        return "journalled", Empty()

    def _pass_clock_skew(self, step: str, exc: TrustpayError, session: bytes, order: str) -> None:
        """A trust-server's ``clock_skew`` refusal goes up to the chip as is: only the user can fix it."""
        if isinstance(exc, Refused) and exc.refusal_code == CLOCK_SKEW:
            self.step("C", step, "refused", exc.refusal_reason, session=session, order_id=order)
            raise exc

    def _untrusted(
        self, step: str, reason: str, session: bytes, order: str, code: str = UNTRUSTED
    ) -> AttestResult:
        self.step("C", step, "refused", reason, session=session, order_id=order)
        return AttestResult(False, f"{step}: {reason}", b"", (), code)

    def _unfinished(
        self, step: str, what: str, exc: TrustpayError, session: bytes, order: str
    ) -> AttestResult:
        """C1-C4 stopped by an error. Silence is not a verdict (``attestation_unavailable``); a
        refusal keeps its own code; answers that did not verify, or anything else, are untrusted."""
        self._pass_clock_skew(step, exc, session, order)
        silent = isinstance(exc, TransportError) or (
            isinstance(exc, RequestTimeout) and not exc.answers_refused
        )
        code = UNAVAILABLE if silent else exc.refusal_code if isinstance(exc, Refused) else UNTRUSTED
        return self._untrusted(step, f"{what}: {exc}", session, order, code)

    async def _attest(self, session: bytes, req: AttestRequest) -> AttestResult:
        order = req.order_id
        ts = Role.TRUST_SERVER.value
        # C1: the platform certificate, checked with the trust-server
        held = self.certs.platform
        assert held is not None
        try:
            answer = await self.request(
                self.link(Role.TRUST_SERVER),
                "c1.check",
                PlatformCheck(held.serial, held.fingerprint),
                recipient=ts,
                expect="c1.result",
                session=session,
            )
            c1 = answer.envelope.body
            if not c1.trusted:
                return self._untrusted("C1", c1.reason, session, order)
            presented = Certificate.from_bytes(c1.platform_cert)
            rotated = self.certs.accept_platform(presented, self.now_ms() // 1000)
        except TrustpayError as exc:
            return self._unfinished("C1", "platform certificate not verified", exc, session, order)
        if rotated or self.data["platform_cert"] != presented.to_bytes().hex():
            await self._save()
            self.step(
                "C",
                "C1",
                "trusted",
                f"platform certificate rotated to {presented.serial} "
                "(accepted through the update certificate)",
                session=session,
                order_id=order,
            )
        else:
            self.step(
                "C", "C1", "trusted", "platform certificate is current", session=session, order_id=order
            )
        # C2: a fresh nonce bound to this intent, then the signed quote and log
        try:
            answer = await self.request(
                self.link(Role.TRUST_SERVER),
                "c2.nonce",
                NonceRequest(req.intent_hash),
                recipient=ts,
                expect="c2.challenge",
                session=session,
                peer=self.peers.get(ts),
            )
            nonce = answer.envelope.body.nonce
        except TrustpayError as exc:
            return self._unfinished("C2", "attestation did not complete", exc, session, order)
        log = MeasurementLog()
        components = [CLIENT] + [f"{APP}:{a}" for a in self.apps]
        for component, check in zip(components, await self._checks(components), strict=True):
            if component == f"{APP}:{req.app}":
                await self._same_as_chip(check.measurement, req, session)
            stored = self.data["measurements"].get(component, {}).get("dynamic")
            log.append(LogEntry(check.measurement, stored == check.measurement.dynamic.hex()))
        quote = make_quote(self.device or "", nonce, log, self.keys, self.now_ms())
        self.step(
            "C", "C2", "ok", f"quote over {len(log.entries)} measurements", session=session, order_id=order
        )
        try:
            answer = await self.request(
                self.link(Role.TRUST_SERVER),
                "c2.evidence",
                Evidence(nonce, quote.to_bytes(), log.entries, req.app),
                recipient=ts,
                expect="c4.verdict",
                session=session,
                peer=self.peers.get(ts),
            )
        except TrustpayError as exc:
            return self._unfinished("C2", "attestation did not complete", exc, session, order)
        # C4: the verdict
        message = answer.envelope.body
        try:
            verdict = open_record(
                Verdict, message.verdict, VERDICT_DOMAIN, answer.sender_cert.body.sign_key, "verdict"
            ).body
        except TrustpayError as exc:
            return self._untrusted("C4", f"verdict does not verify: {exc}", session, order)
        if (verdict.nonce, verdict.intent_hash, verdict.device) != (nonce, req.intent_hash, self.device):
            return self._untrusted("C4", "verdict is for another nonce, payment or device", session, order)
        if verdict.status not in (AFFIRMING, WARNING):
            why = "; ".join(a.reason for a in verdict.appraisals if a.status != AFFIRMING)
            return self._untrusted("C4", f"platform found the terminal untrustworthy: {why}", session, order)
        # now C5 may journal the app's data. Not written yet: the flag is only read by this run
        # (a restart settles and forgets every open session), and C5's journal writes it with the digest
        self.data["sessions"][session.hex()]["trusted"] = True
        self.step("C", "C4", "trusted", f"verdict {verdict.status}", session=session, order_id=order)
        return AttestResult(True, verdict.status, message.verdict, message.payment_chain, "")

    async def _same_as_chip(self, m: Measurement, req: AttestRequest, session: bytes) -> None:
        """Refuse at C2 if the paying app on disk is not the buffer the chip will run."""
        if (m.code, m.static, m.dynamic) == (req.code, req.static, req.dynamic):
            return
        reason = (
            f"application {req.app!r} changed between the chip reading it and the trust module "
            "measuring it; nothing was paid"
        )
        self.data["sessions"].pop(session.hex(), None)
        await self._save()
        self.step("C", "C2", "refused", reason, session=session, order_id=req.order_id)
        raise Refused("app_changed", reason)

    async def c6_measure_app(self, rx: Any) -> tuple[str, Body]:
        """C6: the app has paid; measure it and store its new integrity."""
        done: SessionDone = rx.envelope.body
        session = self.data["sessions"].get(done.session.hex())
        if session is None:
            raise Refused("no_session", "no open payment session with that id")
        return "measured", await self._settle(f"{APP}:{session['app']}", done.session, "C6")

    async def c7_measure_client(self, rx: Any) -> tuple[str, Body]:
        """C7: the client has recorded the payment; measure and store it; the session ends."""
        done: SessionDone = rx.envelope.body
        if done.session.hex() not in self.data["sessions"]:
            raise Refused("no_session", "no open payment session with that id")
        measured = await self._settle(CLIENT, done.session, "C7", end=True)
        return "measured", measured

    async def _settle(self, component: str, session: bytes, step: str, end: bool = False) -> Measured:
        """Measure and store ``component``; with ``end`` the session closes in the same write."""
        check = await self._check(component)
        if component == CLIENT:
            await self._tell_boot_path(check)
        order = self.data["sessions"].get(session.hex(), {}).get("order", "")
        if check.ok:
            self._store(check.measurement)
            self.data["sessions"].get(session.hex(), {}).get("pending", {}).pop(component, None)
            if end:
                self.data["sessions"].pop(session.hex(), None)
            await self._save()  # one atomic write: the measurement stored and, at C7, the session closed
            self.step("C", step, "ok", f"{component} measured and stored", session=session, order_id=order)
        else:
            self.step("C", step, "failed", check.reason, session=session, order_id=order)
            if component == CLIENT:
                await self._disable(check.reason)
            else:
                await self._delete_app(component.split(":", 1)[1], check.reason)
            if end:
                self.data["sessions"].pop(session.hex(), None)
            await self._save()
        return Measured(component, check.ok, check.reason)

    # -- operator ----------------------------------------------------------------
    async def release_update(self, rx: Any) -> tuple[str, Body]:
        blob = rx.envelope.body.release
        issuer = await asyncio.to_thread(self.dep.load_issuer, self.certs, self.now_ms() // 1000)
        release = open_release(blob, issuer)
        self.book.add(release)
        self.data["releases"].append(blob.hex())
        await self._save()
        if release.kind == CLIENT and not release.withdrawn:
            client = await self._check(CLIENT)
            if client.ok:  # a client upgraded before its release may run from now on
                await self._tell_boot_path(client)
        self.log.info(
            "release.added",
            kind=release.kind,
            name=release.name,
            version=release.version,
            withdrawn=release.withdrawn,
        )
        return "release.ok", Empty()
