"""Sealed bodies: padded to a few fixed sizes, so a ciphertext's length says nothing about amounts."""

from __future__ import annotations

import pytest

from protocol.codec import pack
from protocol.errors import SealError
from protocol.measure import dynamic_digest
from protocol.messages import MESSAGE_TYPES, AttestRequest, JournalEntry, PayOrder, PayStart
from protocol.records import ORDER_DOMAIN, Intent, Order, intent_hash, intent_of, record_hash, sign_record
from protocol.schema import to_map
from protocol.seal import PAD_SIZES, pad, padded_size, seal, unpad, unseal

from .factory import exactly, keypair

CHIP, PS = keypair("d1.chip"), keypair("payment-server")


def sealed_len(body: object) -> int:
    return len(seal(pack(to_map(body)), CHIP, PS.box_public))


def order_blob(amount: int, payee: str, counter: int) -> bytes:
    order = Order("ord-" + "a" * 32, "dev-0001", "wallet", payee, amount, "EUR", counter, 1_700_000_000_000)
    return sign_record(order, ORDER_DOMAIN, CHIP).to_bytes()


@pytest.mark.parametrize("length", [0, 1, 507, 508, 509, 2044, 2045, 8188, 16380, 16381, 20000])
def test_pad_round_trips_to_a_fixed_size(length: int) -> None:
    body = bytes(range(256)) * (length // 256) + bytes(length % 256)
    padded = pad(body)
    assert len(padded) == padded_size(length)
    assert len(padded) in PAD_SIZES or (length + 4 > PAD_SIZES[-1] and len(padded) % 4096 == 0)
    assert len(padded) >= length + 4
    assert unpad(padded) == body


def test_the_boundaries_are_exact() -> None:
    assert [padded_size(n) for n in (508, 509, 2044, 2045)] == [512, 2048, 2048, 8192]


def test_an_order_seals_to_one_length_whatever_its_amount_payee_or_counter() -> None:
    # unpadded, an amount of 1 packs in one byte and 40,000 in three: the box would tell them apart
    lengths = {
        sealed_len(PayOrder(order_blob(amount, payee, counter)))
        for amount in (1, 99, 255, 40_000, 50_000, 2**31)
        for payee in ("shop-1", "shop-22", "a-merchant-with-a-long-name")
        for counter in (0, 1, 300, 70_000)
    }
    assert len(lengths) == 1


def test_pay_start_and_attest_request_seal_to_one_length() -> None:
    starts = {
        sealed_len(PayStart("ord-" + "b" * 32, "wallet", amount, "EUR", payee, bytes(32)))
        for amount in (1, 1_000_000)
        for payee in ("shop-1", "shop-333")
    }
    attests = {
        sealed_len(
            AttestRequest("wallet", "ord-x", bytes([n]) * 32, bytes(32), bytes(32), bytes(32), bytes(32))
        )
        for n in (0, 255)
    }
    journals = {sealed_len(JournalEntry("wallet", dynamic_digest(b'{"counter":%d}' % n))) for n in (1, 99999)}
    assert len(starts) == len(attests) == len(journals) == 1


@pytest.mark.parametrize(
    ("name", "padded"),
    [
        ("too short", b"\x00\x00"),
        ("length beyond the body", (600).to_bytes(4, "big") + bytes(508)),
        ("not the fixed size", (3).to_bytes(4, "big") + b"abc" + bytes(10)),
        ("padded too far", (3).to_bytes(4, "big") + b"abc" + bytes(2041)),
    ],
)
def test_bad_padding_is_refused(name: str, padded: bytes) -> None:
    with exactly(SealError):
        unpad(padded)


def test_a_sealed_body_with_bad_padding_does_not_open() -> None:
    from protocol.seal import _box

    sealed = bytes(_box(CHIP.box_secret, PS.box_public).encrypt(b"\x00\x00\x00\x05hello"))
    with exactly(SealError):
        unseal(sealed, PS, CHIP.box_public)


def test_every_message_that_names_an_amount_payee_counter_or_intent_is_sealed() -> None:
    must = {"pay.start", "pay.result", "attest.request", "c2.nonce", "chip.state", "c5.journal", "pay.order"}
    must |= {"pay.receipt", "c2.evidence", "c4.verdict", "trust.grant", "account.query", "account.info"}
    assert {name for name in must if not MESSAGE_TYPES[name].sealed} == set()


def test_the_intent_hash_covers_every_field_and_is_domain_separated() -> None:
    intent = Intent("dev-0001", "ord-1", "wallet", "shop-1", 125, "EUR")
    order = Order("ord-1", "dev-0001", "wallet", "shop-1", 125, "EUR", 7, 1)
    assert intent_of(order) == intent
    changed = [
        Intent("dev-0002", "ord-1", "wallet", "shop-1", 125, "EUR"),
        Intent("dev-0001", "ord-2", "wallet", "shop-1", 125, "EUR"),
        Intent("dev-0001", "ord-1", "transit", "shop-1", 125, "EUR"),
        Intent("dev-0001", "ord-1", "wallet", "shop-2", 125, "EUR"),
        Intent("dev-0001", "ord-1", "wallet", "shop-1", 126, "EUR"),
        Intent("dev-0001", "ord-1", "wallet", "shop-1", 125, "USD"),
    ]
    hashes = {intent_hash(i) for i in [intent, *changed]}
    assert len(hashes) == 7 and all(len(h) == 32 for h in hashes)
    assert intent_hash(intent) != record_hash(pack(to_map(intent)))
