"""docs/PROTOCOL.md stays true: its generated sections are current, and its test vectors verify.

The vectors are re-checked here without the protocol's own encoders: PyNaCl for
signatures and boxes, msgpack and hashlib for encodings and digests, the domain
tags and personalisation tags as the document states them. Only the last step,
opening the frames, uses ``protocol.envelope.Verifier``, as a receiver would.
"""

from __future__ import annotations

import hashlib
import re
import struct
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import nacl.public
import nacl.signing
import pytest

from ops import protocol_doc
from protocol.certs import Certificate, CertStore
from protocol.envelope import Verifier
from protocol.errors import BadSignature, WrongTopic
from protocol.messages import Evidence, PlatformCheck, PlatformResult
from protocol.replay import ReplayGuard

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


@cache
def doc_text() -> str:
    return DOC.read_text()


@cache
def vectors() -> dict[str, str]:
    """``name = value`` lines of the vectors block of the document."""
    section = protocol_doc.extract(doc_text())["vectors"]
    block = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    out = {}
    for line in block.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" = ", 1)
            assert name not in out, f"vector {name} given twice"
            out[name] = value
    return out


def hx(name: str) -> bytes:
    return bytes.fromhex(vectors()[name])


def num(name: str) -> int:
    return int(vectors()[name])


def _tag(literal: str) -> bytes:
    return literal.encode().decode("unicode_escape").encode("latin-1")


@cache
def domains() -> dict[str, bytes]:
    """Signature domain tags as the parameters section states them (constant name -> tag)."""
    section = protocol_doc.extract(doc_text())["parameters"]
    found = re.findall(r'`protocol\.\w+\.(\w+_DOMAIN)` \| `b"([^"]+)"`', section)
    return {name: _tag(value) for name, value in found}


@cache
def person_tags() -> set[bytes]:
    section = protocol_doc.extract(doc_text())["parameters"]
    return {_tag(v) for v in re.findall(r'`protocol\.\w+\.\w+` \| `b"(tp-[^"]+)"`', section)}


def blake(data: bytes, tag: bytes) -> bytes:
    assert tag in person_tags(), f"personalisation {tag!r} is not stated in the document"
    return hashlib.blake2b(data, digest_size=32, person=tag).digest()


def canon(value: Any) -> bytes:
    """Canonical msgpack, written independently: maps sorted by key, bin for bytes."""

    def sort(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: sort(v[k]) for k in sorted(v)}
        if isinstance(v, list):
            return [sort(x) for x in v]
        return v

    return bytes(msgpack.packb(sort(value), use_bin_type=True))


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    nacl.signing.VerifyKey(public).verify(message, signature)


# -- the document is current ---------------------------------------------------------


def test_generated_sections_are_current() -> None:
    held = protocol_doc.extract(doc_text())
    fresh = protocol_doc.sections()
    assert list(held) == list(protocol_doc.SECTIONS), "a generated section's markers are missing"
    stale = [name for name in fresh if held[name] != fresh[name]]
    assert not stale, f"docs/PROTOCOL.md is stale in {stale}: run python -m ops.protocol_doc --write"
    assert "\n\n".join(protocol_doc.block(n, held[n]) for n in held) == protocol_doc.render()


def test_write_restores_generated_sections_and_keeps_prose(tmp_path: Path) -> None:
    doc = tmp_path / "PROTOCOL.md"
    original = doc_text()
    damaged = original.replace("| `ping` |", "| `pyng` |", 1).replace("## 1. Roles", "## 1. Roles (edited)")
    doc.write_text(damaged)
    assert protocol_doc.main(["--check", "--doc", str(doc)]) == 1
    assert protocol_doc.main(["--write", "--doc", str(doc)]) == 0
    assert protocol_doc.main(["--check", "--doc", str(doc)]) == 0
    assert doc.read_text() == original.replace("## 1. Roles", "## 1. Roles (edited)")


def test_every_message_type_and_domain_is_documented() -> None:
    from protocol.messages import MESSAGE_TYPES

    text = doc_text()
    for name in MESSAGE_TYPES:
        assert f"| `{name}` |" in text, name
    assert set(domains()) >= {
        "FRAME_DOMAIN",
        "CERT_DOMAIN",
        "CRL_DOMAIN",
        "QUOTE_DOMAIN",
        "ORDER_DOMAIN",
        "RECEIPT_DOMAIN",
        "VERDICT_DOMAIN",
        "RELEASE_DOMAIN",
        "PACKAGE_DOMAIN",
    }


# -- the vectors, independently ---------------------------------------------------------

KEY_NAMES = ("root", "update", "platform", "trust-server", "tm", "chip")
CERT_NAMES = ("root", "update", "platform", "trust-server", "tm")
ISSUER_KEY = {"root": "root", "update": "update", "platform": "platform"}


def test_keys() -> None:
    for name in KEY_NAMES:
        signer = nacl.signing.SigningKey(hx(f"key.{name}.sign_seed"))
        assert bytes(signer.verify_key) == hx(f"key.{name}.sign_public"), name
        boxer = nacl.public.PrivateKey(hx(f"key.{name}.box_secret"))
        assert bytes(boxer.public_key) == hx(f"key.{name}.box_public"), name


@pytest.mark.parametrize("name", CERT_NAMES)
def test_certificate(name: str) -> None:
    body_bytes, signature = hx(f"cert.{name}.body"), hx(f"cert.{name}.signature")
    body = unpack(body_bytes)
    assert canon(body) == body_bytes, "certificate body is not canonical"
    assert body["sign_key"] == hx(f"key.{name}.sign_public")
    assert body["box_key"] == hx(f"key.{name}.box_public")
    issuer_public = hx(f"key.{ISSUER_KEY[body['issuer']]}.sign_public")
    verify(issuer_public, domains()["CERT_DOMAIN"] + body_bytes, signature)
    cert_bytes = hx(f"cert.{name}.bytes")
    assert canon({"body": body, "signature": signature}) == cert_bytes
    assert hashlib.blake2b(cert_bytes, digest_size=16).digest() == hx(f"cert.{name}.fingerprint")


def test_certificate_signature_fails_on_another_body() -> None:
    body = bytearray(hx("cert.tm.body"))
    body[-1] ^= 1
    with pytest.raises(nacl.exceptions.BadSignatureError):
        verify(hx("key.root.sign_public"), domains()["CERT_DOMAIN"] + bytes(body), hx("cert.tm.signature"))


def _entry_maps() -> list[dict[str, Any]]:
    maps = []
    for i in (0, 1):
        p = f"measure.{i}"
        maps.append(
            {
                "measurement": {
                    "kind": vectors()[f"{p}.kind"],
                    "name": vectors()[f"{p}.name"],
                    "version": vectors()[f"{p}.version"],
                    "code": hx(f"{p}.code"),
                    "static": hx(f"{p}.static"),
                    "dynamic": hx(f"{p}.dynamic"),
                },
                "dynamic_as_stored": True,
            }
        )
    return maps


def test_measurements_log_and_aggregate() -> None:
    aggregate = bytes(32)
    for i, entry in enumerate(_entry_maps()):
        p = f"measure.{i}"
        m = entry["measurement"]
        assert blake(hx(f"{p}.code_bytes"), b"tp-code") == m["code"]
        assert blake(hx(f"{p}.static_bytes"), b"tp-static") == m["static"]
        assert blake(hx(f"{p}.dynamic_bytes"), b"tp-dynamic") == m["dynamic"]
        combined = canon([m["kind"], m["name"], m["version"], m["code"], m["static"], m["dynamic"]])
        assert blake(combined, b"tp-measurement") == hx(f"{p}.digest")
        assert canon(entry) == hx(f"{p}.entry")
        assert blake(hx(f"{p}.entry"), b"tp-log-entry") == hx(f"{p}.entry_digest")
        aggregate = blake(aggregate + hx(f"{p}.entry_digest"), b"tp-extend")
        assert aggregate == hx(f"{p}.aggregate")
    assert blake(canon(_entry_maps()), b"tp-log") == hx("log.digest")


def test_quote() -> None:
    body_bytes = hx("quote.body")
    body = unpack(body_bytes)
    assert canon(body) == body_bytes
    assert body["aggregate"] == hx("measure.1.aggregate")
    assert body["log_digest"] == hx("log.digest")
    assert body["device"] == "dev-0001"
    verify(hx("key.tm.sign_public"), domains()["QUOTE_DOMAIN"] + body_bytes, hx("quote.signature"))
    assert canon({"body": body, "signature": hx("quote.signature")}) == hx("quote.bytes")


@pytest.mark.parametrize(
    ("frame", "signer"), [("frame1", "tm"), ("frame2", "trust-server"), ("frame3", "tm")]
)
def test_frame_signature(frame: str, signer: str) -> None:
    topic = vectors()[f"{frame}.topic"].encode()
    envelope = hx(f"{frame}.envelope")
    signed = domains()["FRAME_DOMAIN"] + struct.pack(">BH", 1, len(topic)) + topic + envelope
    assert signed == hx(f"{frame}.signed")
    verify(hx(f"key.{signer}.sign_public"), signed, hx(f"{frame}.signature"))
    assert hx(f"{frame}.frame") == envelope + hx(f"{frame}.signature")

    fields = unpack(envelope)
    assert len(fields) == 12 and fields[0] == 1
    assert len(fields[2]) == 16
    leaf = unpack(fields[10][0])
    assert leaf["body"]["sign_key"] == hx(f"key.{signer}.sign_public")
    assert leaf["body"]["subject"] == fields[3]


def test_frame_envelopes_carry_the_stated_certificates_and_bodies() -> None:
    f1, f2 = unpack(hx("frame1.envelope")), unpack(hx("frame2.envelope"))
    assert f1[1] == "c1.check" and f1[10] == [hx("cert.tm.bytes")] and f1[11] == hx("frame1.body")
    assert unpack(f1[11]) == {"serial": 3, "fingerprint": hx("cert.platform.fingerprint")}
    assert f2[1] == "c1.result" and f2[6] == f1[2]
    assert f2[10] == [hx("cert.trust-server.bytes"), hx("cert.platform.bytes")]
    assert f2[11] == hx("frame2.body")
    assert unpack(f2[11])["platform_cert"] == hx("cert.platform.bytes")


def test_sealed_body() -> None:
    plain, nonce, sealed = hx("frame3.plaintext"), hx("frame3.box_nonce"), hx("frame3.sealed")
    padded = hx("frame3.padded")
    # the padding, recomputed here: u32be length, the body, zeros to the smallest fixed size that fits
    size = min(n for n in (512, 2048, 8192, 16384) if n >= len(plain) + 4)
    assert padded == len(plain).to_bytes(4, "big") + plain + bytes(size - len(plain) - 4)
    tm_secret = nacl.public.PrivateKey(hx("key.tm.box_secret"))
    ts_secret = nacl.public.PrivateKey(hx("key.trust-server.box_secret"))
    sender_side = nacl.public.Box(tm_secret, nacl.public.PublicKey(hx("key.trust-server.box_public")))
    receiver_side = nacl.public.Box(ts_secret, nacl.public.PublicKey(hx("key.tm.box_public")))
    assert bytes(sender_side.encrypt(padded, nonce)) == sealed
    assert sealed[:24] == nonce and len(sealed) == size + 40
    assert receiver_side.decrypt(sealed) == padded
    assert unpack(hx("frame3.envelope"))[11] == sealed
    evidence = unpack(plain)
    assert canon(evidence) == plain
    assert evidence["nonce"] == unpack(hx("quote.body"))["nonce"]
    assert evidence["quote"] == hx("quote.bytes")
    assert evidence["log"] == _entry_maps()


def test_signed_order() -> None:
    body, signature = hx("order.body"), hx("order.signature")
    verify(hx("key.chip.sign_public"), domains()["ORDER_DOMAIN"] + body, signature)
    assert canon({"body": body, "sig": signature}) == hx("order.bytes")
    assert blake(body, b"tp-record") == hx("order.hash")
    assert canon(unpack(body)) == body


# -- and a receiver opens the frames at the stated times -------------------------------------


def _verifier(my_id: str, key: str, floor_ms: int) -> Verifier:
    from protocol.keys import KeyPair

    store = CertStore(
        Certificate.from_bytes(hx("cert.root.bytes")), Certificate.from_bytes(hx("cert.update.bytes"))
    )
    store.install_platform(Certificate.from_bytes(hx("cert.platform.bytes")))
    keys = KeyPair(hx(f"key.{key}.sign_seed"), hx(f"key.{key}.box_secret"))
    return Verifier(frozenset({my_id}), store, ReplayGuard(floor_ms), keys=keys)


def test_frames_open_with_the_verifier() -> None:
    floor = num("frame1.now_ms") - 60_000
    ts = _verifier("trust-server", "trust-server", floor)
    tm = _verifier("dev-0001.tm", "tm", floor)

    one = ts.open(hx("frame1.frame"), vectors()["frame1.topic"], num("frame1.now_ms"))
    assert one.envelope.body == PlatformCheck(3, hx("cert.platform.fingerprint"))
    assert one.sender_cert.subject == "dev-0001.tm"

    two = tm.open(hx("frame2.frame"), vectors()["frame2.topic"], num("frame2.now_ms"))
    assert isinstance(two.envelope.body, PlatformResult) and two.envelope.body.trusted
    assert two.envelope.reply_to == one.envelope.message_id

    three = ts.open(hx("frame3.frame"), vectors()["frame3.topic"], num("frame3.now_ms"))
    evidence = three.envelope.body
    assert isinstance(evidence, Evidence)
    assert evidence.quote == hx("quote.bytes") and len(evidence.log) == 2


def test_altered_or_moved_frames_do_not_open() -> None:
    floor = num("frame1.now_ms") - 60_000
    frame = bytearray(hx("frame1.frame"))
    frame[-1] ^= 1
    with pytest.raises(BadSignature):
        _verifier("trust-server", "trust-server", floor).open(
            bytes(frame), vectors()["frame1.topic"], num("frame1.now_ms")
        )
    with pytest.raises(WrongTopic):
        _verifier("trust-server", "trust-server", floor).open(
            hx("frame1.frame"), "tp/v1/dev/dev-0002/tm/ts", num("frame1.now_ms")
        )
