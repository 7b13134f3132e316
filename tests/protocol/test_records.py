"""Signed records: orders, receipts, verdicts, releases and packages."""

from __future__ import annotations

import pytest

from protocol.certs import CERT_DOMAIN, CRL_DOMAIN
from protocol.codec import pack
from protocol.envelope import FRAME_DOMAIN
from protocol.errors import BadSignature, Malformed, Rejected
from protocol.keys import SIGNATURE_SIZE, verify
from protocol.measure import QUOTE_DOMAIN
from protocol.records import (
    ORDER_DOMAIN,
    PACKAGE_DOMAIN,
    RECEIPT_DOMAIN,
    RELEASE_DOMAIN,
    VERDICT_DOMAIN,
    Order,
    Package,
    Receipt,
    Release,
    Verdict,
    open_record,
    peek_record,
    record_hash,
    sign_record,
)
from protocol.schema import to_map

from .factory import exactly, example, keypair

CHIP = keypair("d1.chip")
PS = keypair("payment-server")
OTHER = keypair("attacker")

RECORDS = [
    (Order, ORDER_DOMAIN),
    (Receipt, RECEIPT_DOMAIN),
    (Verdict, VERDICT_DOMAIN),
    (Release, RELEASE_DOMAIN),
    (Package, PACKAGE_DOMAIN),
]
IDS = [cls.__name__ for cls, _ in RECORDS]
ALL_DOMAINS = [d for _, d in RECORDS] + [FRAME_DOMAIN, CERT_DOMAIN, CRL_DOMAIN, QUOTE_DOMAIN]


@pytest.mark.parametrize(("cls", "domain"), RECORDS, ids=IDS)
def test_sign_and_open(cls, domain):
    body = example(cls)
    signed = sign_record(body, domain, CHIP)
    blob = signed.to_bytes()
    opened = open_record(cls, blob, domain, CHIP.sign_public, cls.__name__)
    assert opened.body == body
    assert opened.data == signed.data == pack(to_map(body))
    assert opened.signature == signed.signature
    assert peek_record(cls, blob, "x") == body
    assert opened.to_bytes() == blob


def test_verdict_with_appraisals_round_trips():
    verdict = example(Verdict)
    assert verdict.appraisals  # the example carries a nested tuple of records
    blob = sign_record(verdict, VERDICT_DOMAIN, PS).to_bytes()
    assert open_record(Verdict, blob, VERDICT_DOMAIN, PS.sign_public, "verdict").body == verdict


@pytest.mark.parametrize(("cls", "domain"), RECORDS, ids=IDS)
def test_wrong_key(cls, domain):
    blob = sign_record(example(cls), domain, CHIP).to_bytes()
    for key in (OTHER.sign_public, PS.sign_public, b"k" * 32, b"short"):
        with exactly(BadSignature):
            open_record(cls, blob, domain, key, cls.__name__)


@pytest.mark.parametrize(("cls", "domain"), RECORDS, ids=IDS)
def test_altered_body_bytes(cls, domain):
    signed = sign_record(example(cls), domain, CHIP)
    other = sign_record(example(cls, salt="x"), domain, CHIP)
    assert other.data != signed.data
    forged = pack({"body": other.data, "sig": signed.signature})  # another body under this signature
    with exactly(BadSignature):
        open_record(cls, forged, domain, CHIP.sign_public, "x")


def test_every_bit_flip_of_a_record_is_rejected():
    blob = sign_record(example(Order), ORDER_DOMAIN, CHIP).to_bytes()
    for bit in range(len(blob) * 8):
        tampered = bytearray(blob)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(Rejected) as info:
            open_record(Order, bytes(tampered), ORDER_DOMAIN, CHIP.sign_public, "order")
        assert isinstance(info.value, (BadSignature, Malformed)), info.value
        if bit >= (len(blob) - SIGNATURE_SIZE) * 8:
            assert type(info.value) is BadSignature


@pytest.mark.parametrize(("cls", "domain"), RECORDS, ids=IDS)
def test_domain_separation(cls, domain):
    blob = sign_record(example(cls), domain, CHIP).to_bytes()
    for other_cls, other_domain in RECORDS:
        if other_domain != domain:
            with exactly(BadSignature):
                open_record(other_cls, blob, other_domain, CHIP.sign_public, "x")


def test_order_signature_is_not_a_receipt():
    blob = sign_record(example(Order), ORDER_DOMAIN, CHIP).to_bytes()
    with exactly(BadSignature):
        open_record(Receipt, blob, RECEIPT_DOMAIN, CHIP.sign_public, "receipt")
    with exactly(BadSignature):
        open_record(Order, blob, RECEIPT_DOMAIN, CHIP.sign_public, "receipt")


def test_all_signature_domains_are_distinct_and_prefix_free():
    assert len(set(ALL_DOMAINS)) == len(ALL_DOMAINS)
    for a in ALL_DOMAINS:
        assert a.endswith(b"\x00")
        for b in ALL_DOMAINS:
            if a != b:
                assert not b.startswith(a)
    payload = b"same payload"
    for a in ALL_DOMAINS:
        sig = CHIP.sign(a, payload)
        verify(CHIP.sign_public, a, payload, sig)
        for b in ALL_DOMAINS:
            if a != b:
                with exactly(BadSignature):
                    verify(CHIP.sign_public, b, payload, sig)


def test_right_signature_wrong_shape_is_malformed():
    blob = sign_record(example(Receipt), RECEIPT_DOMAIN, PS).to_bytes()
    with exactly(Malformed):
        open_record(Order, blob, RECEIPT_DOMAIN, PS.sign_public, "order")


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc0",
        pack([1, 2]),
        pack({"body": b"x"}),
        pack({"body": "x", "sig": b"s" * 64}),
        pack({"body": b"x", "sig": b"s" * 64, "extra": 1}),
    ],
)
def test_garbage_blobs_are_malformed(blob):
    with exactly(Malformed):
        open_record(Order, blob, ORDER_DOMAIN, CHIP.sign_public, "order")


def test_bad_signature_before_body_decoding():
    with exactly(BadSignature):
        open_record(Order, pack({"body": b"\xc1", "sig": b"s" * 64}), ORDER_DOMAIN, CHIP.sign_public, "o")


def test_record_hash():
    a = sign_record(example(Order), ORDER_DOMAIN, CHIP)
    b = sign_record(example(Order, salt="2"), ORDER_DOMAIN, CHIP)
    assert record_hash(a.data) == record_hash(a.data)
    assert record_hash(a.data) != record_hash(b.data)
    assert len(record_hash(a.data)) == 32
