"""Reference values (client trust reports) and the appraisal policy, shared by verifiers.

The trust module (A1/A2, C6/C7) and the trust-server (C3) appraise the same
way: a component is intact when its code and static data match a released,
not withdrawn, version and its dynamic data is what the trust module stored.
"""

from __future__ import annotations

from .certs import ISSUER, Certificate
from .errors import CertificateInvalid
from .measure import CLIENT, LogEntry, Measurement
from .records import AFFIRMING, CONTRAINDICATED, RELEASE_DOMAIN, WARNING, Appraisal, Release, open_record

POLICY = "trustpay-payment-v1"


def open_release(blob: bytes, issuer: Certificate) -> Release:
    """Verify a signed release record with the issuer's certificate."""
    if issuer.role != ISSUER:
        raise CertificateInvalid("releases must be checked against the issuer certificate")
    return open_record(Release, blob, RELEASE_DOMAIN, issuer.body.sign_key, "release").body


class ReleaseBook:
    """The released versions; a later record for the same version (a withdrawal) wins."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, str, str], Release] = {}

    def add(self, release: Release) -> None:
        key = (release.kind, release.name, release.version)
        held = self._by_version.get(key)
        if held is None or release.issued_ms >= held.issued_ms:
            self._by_version[key] = release

    def match(self, m: Measurement) -> Release | None:
        """The release whose code and static digests ``m`` has, withdrawn or not."""
        for release in self._by_version.values():
            if (release.kind, release.name, release.code, release.static) == (
                m.kind,
                m.name,
                m.code,
                m.static,
            ):
                return release
        return None

    def check(self, m: Measurement) -> tuple[bool, str]:
        """(intact?, reason) for the code and static parts of ``m``."""
        release = self.match(m)
        if release is None:
            return False, f"{m.component}: code or static data match no released version"
        if release.withdrawn:
            return False, f"{m.component}: version {release.version} has been withdrawn"
        return True, f"{m.component}: release {release.version}"

    def __len__(self) -> int:
        return len(self._by_version)


def appraise_entry(entry: LogEntry, book: ReleaseBook) -> Appraisal:
    m = entry.measurement
    ok, reason = book.check(m)
    release = book.match(m)
    version = release.version if release else m.version
    if not ok:
        return Appraisal(m.component, version, CONTRAINDICATED, reason)
    if not entry.dynamic_as_stored:
        return Appraisal(
            m.component, version, CONTRAINDICATED, f"{m.component}: dynamic data changed outside a payment"
        )
    return Appraisal(m.component, version, AFFIRMING, reason)


def overall(appraisals: tuple[Appraisal, ...], paying_app: str) -> str:
    """Affirming when everything is; contraindicated when the client or the paying app is not.

    Another app being off only warns: the trust module deletes it (A3) and the
    intact apps keep working, as the patent wants.
    """
    needed = {CLIENT, f"app:{paying_app}"}
    present = {a.component for a in appraisals}
    if not needed <= present:
        return CONTRAINDICATED
    if any(a.status != AFFIRMING for a in appraisals if a.component in needed):
        return CONTRAINDICATED
    if any(a.status != AFFIRMING for a in appraisals):
        return WARNING
    return AFFIRMING
