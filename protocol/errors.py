"""The one exception hierarchy of trustpay.

Every rejection is its own type with a reason a person can act on. Each has a
stable ``code`` used in logs, counters and refusal messages on the wire.
Foreign errors (PyNaCl, msgpack, aiomqtt) are translated where they are caught,
with ``raise ... from exc``.
"""

from __future__ import annotations


class TrustpayError(Exception):
    """Base of every error trustpay raises on purpose."""

    code = "error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(TrustpayError):
    """A deployment, configuration file or command line is not usable."""

    code = "config"


class Rejected(TrustpayError):
    """A frame or document failed a check. ``alarm`` is False for normal noise."""

    code = "rejected"
    alarm = True


class Malformed(Rejected):
    code = "malformed"


class TooLarge(Malformed):
    code = "too_large"


class UnknownVersion(Rejected):
    code = "unknown_version"


class UnknownType(Rejected):
    code = "unknown_type"


class WrongTopic(Rejected):
    code = "wrong_topic"


class UnknownSender(Rejected):
    code = "unknown_sender"


class CertificateInvalid(Rejected):
    """The certificate chain does not lead to a trusted anchor."""

    code = "cert_invalid"


class CertificateExpired(CertificateInvalid):
    code = "cert_expired"


class CertificateRevoked(CertificateInvalid):
    code = "cert_revoked"


class WrongRole(CertificateInvalid):
    code = "wrong_role"


class BadSignature(Rejected):
    code = "bad_signature"


class NotForMe(Rejected):
    code = "not_for_me"


class Stale(Rejected):
    code = "stale"


class Replayed(Rejected):
    code = "replayed"


class Duplicate(Replayed):
    """An exact copy of a message already accepted (QoS 1 redelivery, a retry).

    Dropped quietly and counted; not an attack.
    """

    code = "duplicate"
    alarm = False

    def __init__(self, reason: str, message_id: bytes = b"") -> None:
        super().__init__(reason)
        self.message_id = message_id


class SealError(Rejected):
    """A sealed body could not be opened: wrong key or altered ciphertext."""

    code = "seal"


class MeasurementMismatch(Rejected):
    code = "measurement_mismatch"


class TransportError(TrustpayError):
    """The broker could not be reached, or a publish was not acknowledged."""

    code = "transport"


class RequestTimeout(TrustpayError):
    """No response arrived after every retry: the outcome is unknown.

    ``answers_refused`` counts frames that claimed to answer but failed
    verification: the peer (or someone) answered, and we could not trust it.
    """

    code = "timeout"

    def __init__(self, reason: str, answers_refused: int = 0) -> None:
        super().__init__(reason)
        self.answers_refused = answers_refused


class Refused(TrustpayError):
    """The peer answered a request with a signed, typed refusal."""

    code = "refused"

    def __init__(self, refusal_code: str, reason: str) -> None:
        super().__init__(f"{refusal_code}: {reason}")
        self.refusal_code = refusal_code
        self.refusal_reason = reason
