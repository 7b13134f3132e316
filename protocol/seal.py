"""End-to-end confidentiality of bodies with NaCl Box (Curve25519/XSalsa20-Poly1305).

Bodies that carry payment data are sealed between the two ends of a link (the
payment app in the chip and the payment-server, the client and the chip, the
trust module and the trust-server for evidence), so a subscriber to every topic
learns no account, amount or payee. The box key of each end is in its
certificate. Building a ``Box`` costs about ten times sealing with one, so
boxes are cached per key pair.
"""

from __future__ import annotations

from functools import lru_cache

import nacl.exceptions
import nacl.public

from .errors import SealError
from .keys import KeyPair


@lru_cache(maxsize=4096)
def _box(secret: bytes, peer_public: bytes) -> nacl.public.Box:
    return nacl.public.Box(nacl.public.PrivateKey(secret), nacl.public.PublicKey(peer_public))


def seal(plaintext: bytes, mine: KeyPair, peer_box_public: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the holder of ``peer_box_public``."""
    return bytes(_box(mine.box_secret, peer_box_public).encrypt(plaintext))


def unseal(sealed: bytes, mine: KeyPair, peer_box_public: bytes) -> bytes:
    try:
        return bytes(_box(mine.box_secret, peer_box_public).decrypt(sealed))
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise SealError("sealed body does not open with our key and the sender's") from exc
