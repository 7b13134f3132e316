"""End-to-end confidentiality of bodies with NaCl Box (Curve25519/XSalsa20-Poly1305).

Bodies that carry payment data are sealed between the two ends of a link (the
payment app in the chip and the payment-server, the client and the chip, the
trust module and the trust-server for evidence), so a subscriber to every topic
learns no account, amount or payee. The box key of each end is in its
certificate. Building a ``Box`` costs about ten times sealing with one, so
boxes are cached: per own key, then per peer. One shared least-recently-used
table of pairs would thrash in a fleet (thousands of nodes in one process, each
with a few peers, cycled through in turn: every lookup a miss); per own key,
each node keeps its few boxes, and a server its devices' (up to ``MAX_PEERS``).

A box hides the bytes but not their number, and an amount of 5 packs shorter
than one of 50,000. So each plaintext is length-prefixed and padded with zeros
to the smallest of a few fixed sizes (``PAD_SIZES``) before it is boxed: every
sealed body of a kind has one length whatever its amount, payee or counter.
A body over the largest size is padded to a whole number of ``PAD_STEP``.
"""

from __future__ import annotations

import struct

import nacl.exceptions
import nacl.public

from .errors import SealError
from .keys import KeyPair

PAD_SIZES = (512, 2048, 8192, 16384)  # plaintext sizes, length prefix included; an order fits the first
PAD_STEP = 4096
_PREFIX = struct.Struct(">I")


def padded_size(length: int) -> int:
    """The padded plaintext size for a body of ``length`` bytes."""
    needed = length + _PREFIX.size
    for size in PAD_SIZES:
        if needed <= size:
            return size
    return -(-needed // PAD_STEP) * PAD_STEP


def pad(body: bytes) -> bytes:
    return _PREFIX.pack(len(body)) + body + bytes(padded_size(len(body)) - len(body) - _PREFIX.size)


def unpad(padded: bytes) -> bytes:
    if len(padded) < _PREFIX.size:
        raise SealError("sealed body is too short to hold its length")
    (length,) = _PREFIX.unpack_from(padded)
    if length > len(padded) - _PREFIX.size or len(padded) != padded_size(length):
        raise SealError("sealed body's padding does not match its length")
    return padded[_PREFIX.size : _PREFIX.size + length]


MAX_KEYS = 65_536  # own keys with boxes cached (one per node of the process)
MAX_PEERS = 16_384  # peers per own key (a server's devices); past it, the oldest goes first
_boxes: dict[bytes, dict[bytes, nacl.public.Box]] = {}


def _box(secret: bytes, peer_public: bytes) -> nacl.public.Box:
    mine = _boxes.get(secret)
    if mine is None:
        if len(_boxes) >= MAX_KEYS:
            del _boxes[next(iter(_boxes))]
        mine = _boxes[secret] = {}
    box = mine.get(peer_public)
    if box is None:
        if len(mine) >= MAX_PEERS:
            del mine[next(iter(mine))]
        box = mine[peer_public] = nacl.public.Box(
            nacl.public.PrivateKey(secret), nacl.public.PublicKey(peer_public)
        )
    return box


def seal(plaintext: bytes, mine: KeyPair, peer_box_public: bytes) -> bytes:
    """Pad, encrypt and authenticate ``plaintext`` for the holder of ``peer_box_public``."""
    return bytes(_box(mine.box_secret, peer_box_public).encrypt(pad(plaintext)))


def unseal(sealed: bytes, mine: KeyPair, peer_box_public: bytes) -> bytes:
    try:
        padded = bytes(_box(mine.box_secret, peer_box_public).decrypt(sealed))
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise SealError("sealed body does not open with our key and the sender's") from exc
    return unpad(padded)
