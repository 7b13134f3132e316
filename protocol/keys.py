"""Key pairs and domain-separated Ed25519 signatures.

Every signature trustpay makes starts its signed bytes with a domain tag, so a
signature made for one purpose (a frame, a certificate, a quote, an order) can
never be passed off as one for another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import nacl.exceptions
import nacl.public
import nacl.signing

from .errors import BadSignature, Malformed

SIGNATURE_SIZE = 64
KEY_SIZE = 32


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 signing key and an X25519 box key, from their 32-byte secrets."""

    sign_seed: bytes = field(repr=False)
    box_secret: bytes = field(repr=False)
    _signer: nacl.signing.SigningKey = field(init=False, repr=False, compare=False)
    _boxer: nacl.public.PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.sign_seed) != KEY_SIZE or len(self.box_secret) != KEY_SIZE:
            raise Malformed("key secrets must be 32 bytes each")
        object.__setattr__(self, "_signer", nacl.signing.SigningKey(self.sign_seed))
        object.__setattr__(self, "_boxer", nacl.public.PrivateKey(self.box_secret))

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(bytes(nacl.signing.SigningKey.generate()), bytes(nacl.public.PrivateKey.generate()))

    @property
    def sign_public(self) -> bytes:
        return bytes(self._signer.verify_key)

    @property
    def box_public(self) -> bytes:
        return bytes(self._boxer.public_key)

    @property
    def box_private(self) -> nacl.public.PrivateKey:
        return self._boxer

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        return self._signer.sign(domain + payload).signature


@lru_cache(maxsize=65536)
def _verify_key(public: bytes) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(public)


def verify(public: bytes, domain: bytes, payload: bytes, signature: bytes) -> None:
    """Raise ``BadSignature`` unless ``signature`` is ``public``'s over domain+payload."""
    if len(signature) != SIGNATURE_SIZE or len(public) != KEY_SIZE:
        raise BadSignature("signature or key has the wrong length")
    try:
        _verify_key(public).verify(domain + payload, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise BadSignature("signature does not match the signer's key") from exc
