"""The platform trust server (21): the verifier of the payment flow C1-C4.

- C1 ``c1.check``: is the platform certificate the terminal holds ours? The
  current one, or one we held before a rotation (the terminal then takes the
  new one through its update certificate), or unknown.
- C2 ``c2.nonce``: a fresh 32-byte nonce, bound to the device and the order
  hash, valid 30 s, single use.
- C3/C4 ``c2.evidence``: consume the nonce, check the quote, appraise every
  measurement against the released reference values, sign a ``Verdict``; when
  it lets the terminal pay, tell the payment-server (``trust.grant``) before
  answering, so the payment-server never meets a verdict it does not know.

Payment policy ``trustpay-payment-v1`` (``protocol.appraisal.overall``), for
the app the evidence names as the one about to pay:

- contraindicated when the device is revoked, or the client or the paying app
  is missing from the log or not affirming;
- affirming when the client and every app affirm;
- warning when the client and the paying app affirm and another app does not
  (the trust module deletes that one, A3; the intact apps keep working).

A warning is granted. The payment-server checks the same policy again for the
order's own app (``overall(verdict.appraisals, order.app)``).

All state that matters lives in :class:`nodes.trust_db.TrustDb`; what is held
in memory (own keys, the payment-server's certificate) comes from the
deployment and is reloaded by the operator's ``keys.reload``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from protocol.appraisal import POLICY, ReleaseBook, appraise_entry, open_release, overall
from protocol.certs import Certificate, CertStore, RevocationList
from protocol.envelope import Received
from protocol.errors import (
    ConfigError,
    Malformed,
    MeasurementMismatch,
    Refused,
    Rejected,
    RequestTimeout,
    TransportError,
    TrustpayError,
    WrongRole,
)
from protocol.measure import CLIENT, LogEntry, Quote, check_quote
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
    VERDICT_DOMAIN,
    WARNING,
    Appraisal,
    Verdict,
    sign_record,
)
from protocol.topics import DEVICE_ROLES, Role, node_id

from .assemble import reloaded_identity
from .bus import Bus
from .deployment import Deployment, Manifest
from .rate_limit import RateLimiter
from .replies import Replies
from .runtime import Node, NodeConfig, now_ms
from .trust_db import ACTIVE, REVOKED, DeviceRow, DeviceUnknown, NonceRow, TrustDb, trust_db_at

NONCE_SIZE = 32
INTENT_HASH_SIZE = 32  # protocol.records.intent_hash
NONCE_TTL_MS = 30_000
VERDICT_TTL_MS = 60_000
REFUSED = "refused"  # last_status of a device whose evidence did not even verify
# A payment takes one nonce; one device paying back to back measured ~25/s over a
# short run (FIELD-NOTES), so a burst of 30 then 10/s never slows an honest device much.
NONCE_BURST = 30
NONCE_PER_S = 10.0
PRUNE_EVERY_S = 10.0
PRUNE_BATCH = 1_000  # rows per round: each round is one short transaction
PAYMENT_SERVER = node_id(Role.PAYMENT_SERVER)


class PlatformUnavailable(TrustpayError):
    """The payment-server did not acknowledge the grant, so no verdict is handed out."""

    code = "platform_unavailable"


class GrantRefused(TrustpayError):
    code = "grant_refused"


def payment_status(
    appraisals: tuple[Appraisal, ...], revoked: bool, app: str
) -> tuple[str, tuple[Appraisal, ...]]:
    """The overall status under the module's policy, and appraisals explaining a policy-level refusal.

    The explanations travel in the verdict because the trust module shows the
    reasons of the non-affirming appraisals to the user.
    """
    extra: list[Appraisal] = []
    if revoked:
        extra.append(Appraisal("device", "", CONTRAINDICATED, "device revoked"))
    present = {a.component for a in appraisals}
    for component in (CLIENT, f"app:{app}"):
        if component not in present:
            extra.append(
                Appraisal(component, "", CONTRAINDICATED, f"{component}: missing from the measurement log")
            )
    if extra:
        return CONTRAINDICATED, tuple(extra)
    return overall(appraisals, app), ()


def _summary(status: str, appraisals: tuple[Appraisal, ...]) -> str:
    if status == AFFIRMING:
        return f"all {len(appraisals)} measurements match their releases"
    return "; ".join(a.reason for a in appraisals if a.status != AFFIRMING)


def _device_serials(dep: Deployment, manifest: Manifest) -> dict[str, frozenset[int]]:
    """The certificate serials of each device's nodes, to find a device in a revocation list."""
    return {
        d.device: frozenset(dep.load_public_cert(d.node(role)).serial for role in DEVICE_ROLES)
        for d in manifest.devices
    }


class TrustServer(Node):
    def __init__(
        self,
        config: NodeConfig,
        bus: Bus,
        log: structlog.typing.FilteringBoundLogger,
        deployment: Deployment,
        *,
        db: TrustDb | None = None,
        clock: Callable[[], int] = now_ms,
        nonce_limit: RateLimiter | None = None,
        db_url: str | None = None,
        replies: Replies | None = None,
    ) -> None:
        super().__init__(config, bus, log, replies=replies)
        self.dep = deployment
        self.db = db or trust_db_at(deployment.database("trust", db_url))  # db_url: `trustpay node --db`
        self.clock = clock  # for nonce and verdict lifetimes; tests move it instead of sleeping
        # a device flooding c2.nonce would fill the nonce table and the server's CPU
        self.nonce_limit = nonce_limit or RateLimiter(NONCE_BURST, NONCE_PER_S)
        self.payment_cert: Certificate | None = None
        self.device_serials: dict[str, frozenset[int]] = {}
        self.route("c1.check", self.c1_check)
        self.route("c2.nonce", self.c2_nonce)
        self.route("c2.evidence", self.c2_evidence)
        self.route("release.update", self.release_update)
        self.route("keys.reload", self.keys_reload)

    # -- life cycle --------------------------------------------------------------
    async def run(self) -> None:
        await self.db.open()
        try:
            if self.replies is None and self.replicated:  # the replicas' reply log: in their database
                self.replies = self.db.replies
            await self._seed()
            await super().run()
        finally:
            await self.db.close()

    async def main(self) -> None:
        self.every(PRUNE_EVERY_S, self.prune, "prune")

    async def prune(self) -> int:
        """One bounded round of forgetting: expired unanswered nonces, idle rate-limit buckets."""
        now = self.clock()
        pruned = await self.db.prune_nonces(now, PRUNE_BATCH)
        self.nonce_limit.forget_idle(now)
        if pruned:
            self.log.info("trust_db.pruned", nonces=pruned)
        return pruned

    async def _seed(self) -> None:
        """Bring the database up to the deployment: devices, releases, CRL, platform certificate."""
        now = self.clock()
        manifest = await asyncio.to_thread(self.dep.load_manifest)
        self.device_serials = await asyncio.to_thread(_device_serials, self.dep, manifest)
        blobs = await asyncio.to_thread(self.dep.load_releases)
        # the newest list first: the issuer certificate itself may be revoked
        await self._sync_crl(await asyncio.to_thread(self.dep.load_public, "crl"), now)
        issuer = await asyncio.to_thread(self.dep.load_issuer, self.certs, now // 1000)
        releases = []
        for blob in blobs:
            try:
                releases.append((open_release(blob, issuer), blob))
            except Rejected as exc:
                raise ConfigError(
                    f"a release record in {self.dep.releases_dir} does not verify ({exc.reason}): "
                    "remove it or re-sign it with the issuer key"
                ) from exc
        devices = [(d.device, d.node(Role.TRUST_MODULE)) for d in manifest.devices]
        await self.db.seed(devices, releases, now)
        await self._mark_revoked_devices()
        platform = self._platform()
        await self.db.note_platform(platform.fingerprint, platform.serial, platform.to_bytes(), now)
        self.payment_cert = await asyncio.to_thread(self.dep.load_cert, PAYMENT_SERVER)
        pruned = await self.db.prune_nonces(now)
        self.log.info("trust_db.ready", devices=len(devices), releases=len(releases), pruned_nonces=pruned)

    async def _sync_crl(self, crl: RevocationList, now: int) -> None:
        """Keep the newest CRL of the deployment's and the database's, in both and in the cert store."""
        held = await self.db.crl()
        if held is None or crl.body.number > held[0]:
            await self.db.store_crl(crl.body.number, crl.to_bytes(), now)
        else:
            crl = RevocationList.from_bytes(held[1])
        if crl.body.number > self.certs.crl_number:
            self.certs.set_revocations(crl, now // 1000)

    async def revocations_changed(self, crl: RevocationList) -> None:
        """A newer list arrived on the bus: keep it across restarts and mark the devices it revokes."""
        await self._sync_crl(crl, self.clock())
        await self._mark_revoked_devices()

    def _device_revoked(self, device: str) -> bool:
        return bool(self.device_serials.get(device, frozenset()) & self.certs.revoked)

    async def _mark_revoked_devices(self) -> None:
        """A device with any of its certificates revoked is revoked as a whole (C3 says so).

        One way only: a later list that lifts the revocation does not bring the
        device back; the operator re-registers it.
        """
        for device in sorted(self.device_serials):
            row = await self.db.device(device)
            if row is not None and row.status == ACTIVE and self._device_revoked(device):
                await self.db.set_device_status(device, REVOKED)
                self.log.warning("device.revoked", device=device, crl=self.certs.crl_number)

    def _platform(self) -> Certificate:
        if self.certs.platform is None:
            raise ConfigError("the trust-server holds no platform certificate: check public/platform.cert")
        return self.certs.platform

    # -- helpers -------------------------------------------------------------------
    def _device_of(self, rx: Received) -> str:
        device = rx.sender_cert.body.device
        if not device:
            raise WrongRole(f"{rx.envelope.sender} is not a device's trust module")
        return device

    async def _registered(self, rx: Received, device: str) -> DeviceRow:
        row = await self.db.device(device)
        if row is None:
            raise DeviceUnknown(
                f"device {device} is not registered with the trust-server: add it to the deployment manifest"
            )
        if row.tm_node != rx.envelope.sender:
            raise DeviceUnknown(f"{rx.envelope.sender} is not the registered trust module of {device}")
        return row

    @staticmethod
    def _from_operator(rx: Received) -> None:
        # The message table already confines these types to the operator's link; checked again
        # here because a change there must not silently open key reloads to anyone.
        if rx.topic.src is not Role.OPERATOR:
            raise WrongRole(f"{rx.envelope.type} is accepted from the operator only")

    # -- C1 ------------------------------------------------------------------------
    async def c1_check(self, rx: Received) -> tuple[str, Body]:
        check: PlatformCheck = rx.envelope.body
        device = self._device_of(rx)
        current = self._platform()
        trusted, reason = await self._judge_platform(check, current)
        self.step(
            "C", "C1", "trusted" if trusted else "refused", reason, session=rx.envelope.session, device=device
        )
        return "c1.result", PlatformResult(trusted, reason, current.to_bytes())

    async def _judge_platform(self, check: PlatformCheck, current: Certificate) -> tuple[bool, str]:
        if check.fingerprint == current.fingerprint:
            return True, f"platform certificate {current.serial} is current"
        # The serial the terminal claims is only a hint; the fingerprint says which certificate it is.
        known = await self.db.platform_serial(check.fingerprint)
        if known is None:
            return False, (
                f"the terminal's platform certificate (serial {check.serial}) was never this "
                "platform's: restore the terminal's written-in platform certificate"
            )
        if known < current.serial:
            return True, f"rotated: accept serial {current.serial} through the update certificate"
        return False, (
            f"the terminal holds platform certificate {known}, newer than the server's "
            f"{current.serial}: the operator must reload the trust-server's keys"
        )

    # -- C2 ------------------------------------------------------------------------
    async def c2_nonce(self, rx: Received) -> tuple[str, Body]:
        req: NonceRequest = rx.envelope.body
        device = self._device_of(rx)
        if len(req.intent_hash) != INTENT_HASH_SIZE:
            raise Malformed(f"intent hash must be {INTENT_HASH_SIZE} bytes, got {len(req.intent_hash)}")
        await self._registered(rx, device)
        wait_ms = self.nonce_limit.take(device, self.clock())
        if wait_ms:
            raise Refused(
                "rate_limited",
                f"{device} asked for nonces faster than {NONCE_PER_S:g}/s; retry in {wait_ms} ms",
            )
        nonce, now = os.urandom(NONCE_SIZE), self.clock()
        await self.db.issue_nonce(nonce, device, req.intent_hash, now, now + NONCE_TTL_MS)
        self.step(
            "C",
            "C2",
            "ok",
            f"nonce issued, valid {NONCE_TTL_MS // 1000} s",
            session=rx.envelope.session,
            device=device,
        )
        return "c2.challenge", Challenge(nonce, now + NONCE_TTL_MS)

    # -- C3 / C4 -------------------------------------------------------------------
    async def c2_evidence(self, rx: Received) -> tuple[str, Body]:
        ev: Evidence = rx.envelope.body
        session = rx.envelope.session
        device = self._device_of(rx)
        row = await self._registered(rx, device)
        # Consumed first, whatever follows: one nonce gets one try, a bad quote included.
        nonce = await self.db.consume_nonce(ev.nonce, device, self.clock())
        try:
            self._check_evidence(ev, rx.sender_cert, device)
        except Rejected as exc:
            await self.db.record_attestation(nonce, REFUSED, exc.reason, b"", self.clock(), passed=False)
            self.step(
                "C", "C3", "refused", f"evidence rejected: {exc.reason}", session=session, device=device
            )
            raise
        book = ReleaseBook()
        for release in await self.db.releases():
            book.add(release)
        appraisals = tuple(appraise_entry(entry, book) for entry in ev.log)
        revoked = row.status != ACTIVE or self._device_revoked(device)
        status, extra = payment_status(appraisals, revoked=revoked, app=ev.app)
        appraisals += extra
        reason = _summary(status, appraisals)
        now = self.clock()
        verdict = Verdict(
            self.id,
            device,
            status,
            appraisals,
            nonce.nonce,
            nonce.intent_hash,
            POLICY,
            now,
            now + VERDICT_TTL_MS,
        )
        blob = sign_record(verdict, VERDICT_DOMAIN, self.keys).to_bytes()
        passed = status in (AFFIRMING, WARNING)
        attestation = await self.db.record_attestation(nonce, status, reason, blob, now, passed)
        self.step("C", "C3", "ok" if passed else "failed", reason, session=session, device=device)
        if passed:
            await self._grant(nonce, blob, verdict.expires_ms, session)
            await self.db.mark_granted(attestation, self.clock())
        self.step(
            "C", "C4", "trusted" if passed else "refused", f"verdict {status}", session=session, device=device
        )
        chain = (self._payment_cert().to_bytes(), self._platform().to_bytes())
        return "c4.verdict", VerdictMessage(blob, chain)

    @staticmethod
    def _check_evidence(ev: Evidence, sender: Certificate, device: str) -> None:
        quote = Quote.from_bytes(ev.quote)
        if quote.body.device != device:
            raise MeasurementMismatch(f"the quote is for device {quote.body.device!r}, not {device}")
        log: tuple[LogEntry, ...] = ev.log
        check_quote(quote, log, sender.body.sign_key, ev.nonce)

    async def _grant(self, nonce: NonceRow, verdict: bytes, expires_ms: int, session: bytes) -> None:
        grant = Grant(nonce.device, nonce.intent_hash, verdict, expires_ms)
        try:
            await self.request(
                self.link(Role.PAYMENT_SERVER),
                "trust.grant",
                grant,
                recipient=PAYMENT_SERVER,
                expect="trust.granted",
                session=session,
                peer=self._payment_cert(),
            )
        except Refused as exc:
            self.step(
                "C", "C4", "failed", f"grant refused: {exc.reason}", session=session, device=nonce.device
            )
            raise GrantRefused(
                f"the payment-server refused the grant ({exc.reason}); the order cannot be paid"
            ) from exc
        except (RequestTimeout, TransportError) as exc:
            self.step(
                "C",
                "C4",
                "failed",
                f"grant not acknowledged: {exc.reason}",
                session=session,
                device=nonce.device,
            )
            raise PlatformUnavailable(
                f"the payment-server did not acknowledge the grant ({exc.reason}); "
                "try the payment again later"
            ) from exc

    def _payment_cert(self) -> Certificate:
        if self.payment_cert is None:
            raise ConfigError("the payment-server certificate is not loaded yet")
        return self.payment_cert

    # -- operator ----------------------------------------------------------------------
    async def release_update(self, rx: Received) -> tuple[str, Body]:
        self._from_operator(rx)
        update: ReleaseUpdate = rx.envelope.body
        issuer = await asyncio.to_thread(self.dep.load_issuer, self.certs, self.clock() // 1000)
        release = open_release(update.release, issuer)
        added = await self.db.add_release(release, update.release)
        self.log.info(
            "release.added",
            kind=release.kind,
            name=release.name,
            version=release.version,
            withdrawn=release.withdrawn,
            new=added,
        )
        return "release.ok", Empty()

    async def keys_reload(self, rx: Received) -> tuple[str, Body]:
        self._from_operator(rx)
        await self.reload_identity()
        return "keys.reloaded", Empty()

    async def reload_identity(self) -> Certificate:
        """Take this node's keys, certificate and platform certificate afresh from the deployment.

        Everything is validated before anything is switched, so a half-rotated
        deployment leaves the server running on its old, consistent identity.
        Returns the platform certificate now in use.
        """
        ident, platform = await asyncio.to_thread(
            reloaded_identity, self.dep, self.id, self.certs, self.clock() // 1000
        )
        payment = await asyncio.to_thread(self.dep.load_cert, PAYMENT_SERVER)
        probe = CertStore(self.certs.root, self.certs.update)
        probe.accept_platform(platform, self.clock() // 1000)
        probe.resolve([payment.to_bytes(), platform.to_bytes()], self.clock() // 1000, accept_rotation=False)
        # Remembered before it is used, so C1 can later call it superseded rather than unknown.
        await self.db.note_platform(platform.fingerprint, platform.serial, platform.to_bytes(), self.clock())
        self.replace_identity(ident, platform)
        self.payment_cert = payment
        self.log.info("keys.reloaded", platform_serial=platform.serial, cert_serial=ident.cert.serial)
        return platform
