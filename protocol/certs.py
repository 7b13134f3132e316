"""Certificates, chains up to the deployment root, the update certificate, revocation.

The hierarchy (claim 3)::

    root ──┬── update ── platform ──┬── trust-server
           │                        └── payment-server
           ├── trust-module, chip, client  (per device)
           ├── issuer  (signs payment-app packages)
           └── monitor, operator

The **update certificate** is the only key that may sign a platform trust
certificate, so the platform can rotate its key and terminals, which keep the
current platform key, accept the new one only through it. A newer platform
certificate supersedes the older ones: server certificates issued by a
superseded platform key stop verifying.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from .codec import pack, unpack
from .errors import (
    BadSignature,
    CertificateExpired,
    CertificateInvalid,
    CertificateRevoked,
    Malformed,
    WrongRole,
)
from .keys import KeyPair, verify
from .schema import from_map, to_map

CERT_DOMAIN = b"trustpay-cert-v1\x00"
CRL_DOMAIN = b"trustpay-crl-v1\x00"
# How far in the future a revocation list may claim to be issued: a list from
# the future was signed with a wrong clock or prepared in advance to be
# replayed later; either way it is not the current one.
CRL_SKEW_S = 60

ROOT, UPDATE, PLATFORM, ISSUER = "root", "update", "platform", "issuer"

# Which role may issue a certificate of which role.
ISSUER_ROLE: dict[str, str] = {
    UPDATE: ROOT,
    PLATFORM: UPDATE,
    ISSUER: ROOT,
    "trust-server": PLATFORM,
    "payment-server": PLATFORM,
    "trust-module": ROOT,
    "chip": ROOT,
    "client": ROOT,
    "monitor": ROOT,
    "operator": ROOT,
}


@dataclass(frozen=True)
class CertBody:
    serial: int
    subject: str
    role: str
    device: str
    sign_key: bytes
    box_key: bytes
    not_before: int
    not_after: int
    issuer: str
    issuer_serial: int


@dataclass(frozen=True)
class Certificate:
    body: CertBody
    signature: bytes

    @property
    def serial(self) -> int:
        return self.body.serial

    @property
    def subject(self) -> str:
        return self.body.subject

    @property
    def role(self) -> str:
        return self.body.role

    def to_bytes(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:  # frozen, so encoded once (a node re-sends its chain in every frame)
        return pack(to_map(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        cert = from_map(cls, unpack(data), "certificate")
        if len(cert.body.sign_key) != 32 or len(cert.body.box_key) != 32:
            raise Malformed("certificate keys must be 32 bytes")
        return cert

    @cached_property
    def fingerprint(self) -> bytes:
        return hashlib.blake2b(self.to_bytes(), digest_size=16).digest()

    def valid_at(self, now_s: int) -> bool:
        return self.body.not_before <= now_s <= self.body.not_after


def issue(body: CertBody, issuer_keys: KeyPair) -> Certificate:
    return Certificate(body, issuer_keys.sign(CERT_DOMAIN, pack(to_map(body))))


def check_signature(cert: Certificate, issuer: Certificate) -> None:
    try:
        verify(issuer.body.sign_key, CERT_DOMAIN, pack(to_map(cert.body)), cert.signature)
    except BadSignature as exc:
        raise CertificateInvalid(f"{cert.subject}'s certificate is not signed by its issuer") from exc


@dataclass(frozen=True)
class RevocationBody:
    number: int
    issued_at: int
    serials: tuple[int, ...]


@dataclass(frozen=True)
class RevocationList:
    body: RevocationBody
    signature: bytes

    def to_bytes(self) -> bytes:
        return pack(to_map(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        return from_map(cls, unpack(data), "revocation list")


def sign_revocations(number: int, issued_at: int, serials: tuple[int, ...], root: KeyPair) -> RevocationList:
    body = RevocationBody(number, issued_at, tuple(sorted(set(serials))))
    return RevocationList(body, root.sign(CRL_DOMAIN, pack(to_map(body))))


class CertStore:
    """What one party trusts: the root, the update certificate, the current platform.

    ``resolve`` validates a sender's chain (as carried in a frame) and caches the
    result by the certificate bytes, so a chain is checked once, not per frame.
    """

    def __init__(self, root: Certificate, update: Certificate | None = None) -> None:
        if root.role != ROOT or root.body.issuer != root.subject:
            raise CertificateInvalid("the trust anchor is not a self-issued root certificate")
        check_signature(root, root)
        self.root = root
        self.update: Certificate | None = None
        self.platform: Certificate | None = None
        self.revoked: frozenset[int] = frozenset()
        self.crl_number = -1
        self._valid: dict[bytes, Certificate] = {}
        if update is not None:
            self.set_update(update)

    # -- anchors -----------------------------------------------------------
    def set_update(self, update: Certificate) -> None:
        self._check_issued_by(update, self.root, UPDATE)
        self.update = update

    def install_platform(self, cert: Certificate) -> None:
        """Hold ``cert`` as the platform certificate because it was written in (claim 3).

        Like the root, a written-in certificate is trusted by configuration: at
        provisioning, or from the holder's own protected storage. Every later
        platform certificate must come through ``accept_platform``.
        """
        if cert.role != PLATFORM:
            raise WrongRole(f"expected a platform certificate, got {cert.role}")
        self.platform = cert
        self._valid.clear()

    def accept_platform(self, cert: Certificate, now_s: int) -> bool:
        """Accept ``cert`` as the platform certificate if the update key signed it.

        Returns True when it replaced an older platform certificate (a rotation).
        A platform certificate older than the current one is refused.
        """
        if self.platform is not None and cert.to_bytes() == self.platform.to_bytes():
            return False
        if self.update is None:
            raise CertificateInvalid("no update certificate: cannot accept a platform certificate")
        self._check_time(self.update, now_s)
        self._check_revoked(self.update)
        self._check_issued_by(cert, self.update, PLATFORM)
        self._check_time(cert, now_s)
        self._check_revoked(cert)
        if self.platform is not None and cert.serial <= self.platform.serial:
            raise CertificateInvalid(
                f"platform certificate {cert.serial} is not newer than {self.platform.serial}"
            )
        rotated = self.platform is not None
        self.platform = cert
        self._valid.clear()  # server certificates of the old platform key no longer count
        return rotated

    def set_revocations(self, crl: RevocationList, now_s: int, skew_s: int = CRL_SKEW_S) -> bool:
        """Hold ``crl`` if the root signed it and it is the newest seen; True if it changed anything.

        The same list again (a retained copy, a restart) changes nothing; an
        older number, or another list under the held number, is refused, so a
        replayed list can never lift a revocation.
        """
        try:
            verify(self.root.body.sign_key, CRL_DOMAIN, pack(to_map(crl.body)), crl.signature)
        except BadSignature as exc:
            raise CertificateInvalid("revocation list is not signed by the root") from exc
        if crl.body.issued_at > now_s + skew_s:
            raise CertificateInvalid(
                f"revocation list {crl.body.number} is issued at {crl.body.issued_at}, "
                f"in the future of {now_s}: check the clock of the machine that issued it"
            )
        if crl.body.number < self.crl_number:
            raise CertificateInvalid(
                f"revocation list {crl.body.number} is older than the held {self.crl_number}"
            )
        if crl.body.number == self.crl_number:
            if frozenset(crl.body.serials) != self.revoked:
                raise CertificateInvalid(f"a different revocation list {crl.body.number} is already held")
            return False
        self.crl_number = crl.body.number
        self.revoked = frozenset(crl.body.serials)
        self._valid.clear()
        return True

    def check_root_issued(self, cert: Certificate, role: str, now_s: int) -> Certificate:
        """``cert`` if it is a current, unrevoked ``role`` certificate the root issued.

        For certificates that are not sent in frames but read from files, such as
        the issuer's: a copy on disk is only a claim until it chains to the root.
        """
        if ISSUER_ROLE.get(role) != ROOT:
            raise WrongRole(f"a {role} certificate is not issued by the root")
        self._check_issued_by(cert, self.root, role)
        self._check_time(cert, now_s)
        self._check_revoked(cert)
        return cert

    def is_revoked(self, cert: Certificate) -> bool:
        return cert.serial in self.revoked

    # -- validation --------------------------------------------------------
    def resolve(
        self, chain: list[bytes], now_s: int, accept_rotation: bool = True, *, allow_revoked: bool = False
    ) -> Certificate:
        """Validate a chain (leaf first) and return the leaf certificate.

        Device chains are one certificate (issued by the root); server chains
        are the server's certificate then the platform certificate. With
        ``allow_revoked`` a revoked leaf is returned anyway (never a revoked
        issuer): the frame verifier then checks the signature before it says
        "revoked", so only the key holder can be told its certificate is.
        """
        leaf = self._resolve_chain(chain, now_s, accept_rotation)
        if not allow_revoked:
            self._check_revoked(leaf)
        return leaf

    def _resolve_chain(self, chain: list[bytes], now_s: int, accept_rotation: bool) -> Certificate:
        if not chain:
            raise CertificateInvalid("no certificate chain in the frame")
        leaf_bytes = chain[0]
        cached = self._valid.get(leaf_bytes)
        if cached is not None:
            self._check_time(cached, now_s)
            if ISSUER_ROLE.get(cached.role) == PLATFORM and self.platform is not None:
                self._check_time(self.platform, now_s)
            return cached
        leaf = Certificate.from_bytes(leaf_bytes)
        issuer_role = ISSUER_ROLE.get(leaf.role)
        if issuer_role is None:
            raise WrongRole(f"certificate role {leaf.role!r} may not sign frames")
        if issuer_role == ROOT:
            issuer = self.root
        elif issuer_role == PLATFORM:
            if len(chain) < 2:
                raise CertificateInvalid("server chain lacks the platform certificate")
            platform = Certificate.from_bytes(chain[1])
            if self.platform is None or platform.to_bytes() != self.platform.to_bytes():
                if not accept_rotation:
                    raise CertificateInvalid("frame signed under a platform key we do not hold")
                self.accept_platform(platform, now_s)
            assert self.platform is not None
            issuer = self.platform
            self._check_time(issuer, now_s)
            self._check_revoked(issuer)
        else:
            raise WrongRole(f"a {leaf.role} certificate cannot sign frames")
        self._check_issued_by(leaf, issuer, leaf.role)
        self._check_time(leaf, now_s)
        if len(self._valid) > 100_000:
            self._valid.clear()
        self._valid[leaf_bytes] = leaf
        return leaf

    def _check_issued_by(self, cert: Certificate, issuer: Certificate, role: str) -> None:
        if cert.role != role:
            raise WrongRole(f"expected a {role} certificate, got {cert.role}")
        if ISSUER_ROLE.get(role) != issuer.role or cert.body.issuer != issuer.subject:
            raise CertificateInvalid(f"{cert.subject}'s certificate names the wrong issuer")
        if cert.body.issuer_serial != issuer.serial:
            raise CertificateInvalid(
                f"{cert.subject}'s certificate was issued by {issuer.role} key "
                f"{cert.body.issuer_serial}, not the current {issuer.serial}"
            )
        check_signature(cert, issuer)

    def _check_time(self, cert: Certificate, now_s: int) -> None:
        if not cert.valid_at(now_s):
            raise CertificateExpired(
                f"{cert.subject}'s certificate is valid {cert.body.not_before}..{cert.body.not_after}"
                f", not at {now_s}"
            )

    def _check_revoked(self, cert: Certificate) -> None:
        if cert.serial in self.revoked:
            raise CertificateRevoked(f"{cert.subject}'s certificate {cert.serial} is revoked")
