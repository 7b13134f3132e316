"""Fuzz targets for every decoder of ``protocol``: valid, mutated and random inputs.

The property of each: the decoder returns a checked result or raises a typed
``TrustpayError``, never another exception, never for long; what it accepts
from a mutated input decodes to exactly what was signed (a harmless re-encoding
at most), and a frame altered after signing, or signed with a wrong key, is
never accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from protocol.certs import CertBody, Certificate, RevocationBody, RevocationList, issue, sign_revocations
from protocol.codec import Value, pack, unpack
from protocol.envelope import (
    FRAME_DOMAIN,
    Envelope,
    Received,
    Verifier,
    envelope_array,
    sign_frame,
    signed_bytes,
)
from protocol.errors import Malformed
from protocol.measure import QUOTE_DOMAIN, LogEntry, Quote, QuoteBody, check_quote
from protocol.messages import MESSAGE_TYPES
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
    sign_record,
)
from protocol.replay import ReplayGuard
from protocol.schema import to_map
from protocol.seal import pad, seal, unpad, unseal
from protocol.topics import (
    CHANNEL_CRL,
    CHANNEL_OPS,
    CRL_TOPIC,
    NODE_ROLES,
    Role,
    channel_topic,
    link_topic,
    operator_topic,
)

from .fuzzing import Target, only_typed_errors
from .pki import NOW_MS, NOW_S, FuzzPki, Party, keypair
from .strategies import bodies, body_bytes, foreign_msgpack, mutated_bytes, record, values, variants

PKI = FuzzPki()
ATTACKER = keypair("attacker")  # certified for nothing


# -- codec -------------------------------------------------------------------------------------
def _check_codec(case: tuple[str, bytes, bytes]) -> None:
    value = only_typed_errors(lambda: unpack(case[2]))
    if value is not None:  # what unpack gives is a value pack encodes, and it comes back the same
        assert unpack(pack(value)) == value


CODEC = Target(
    "codec.unpack",
    variants(st.one_of(values.map(pack), foreign_msgpack)),
    _check_codec,
    "msgpack with limits",
)


# -- frames ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    type_name: str
    sender: Party
    receiver: Party | None  # None: a channel anyone may read
    topic: str


def routes() -> list[Route]:
    """Every way each message type may travel, on device d1 and the platform."""
    out = []
    operator = PKI.party(Role.OPERATOR)
    for name, spec in sorted(MESSAGE_TYPES.items()):
        for src, dst in sorted(spec.links):
            device = "d1" if dst.on_device or src.on_device else None
            topic = operator_topic(dst, device) if src is Role.OPERATOR else link_topic(src, dst, device)
            out.append(Route(name, PKI.party(src), PKI.party(dst), topic))
        for channel in sorted(spec.channels):
            if channel == CHANNEL_CRL:
                out.append(Route(name, operator, None, CRL_TOPIC))
                continue
            for role in NODE_ROLES:
                receiver = operator if channel == CHANNEL_OPS else None
                topic = channel_topic(role, channel, "d1" if role.on_device else None)
                out.append(Route(name, PKI.party(role), receiver, topic))
    return out


ROUTES = routes()


@dataclass(frozen=True)
class FrameCase:
    kind: str  # valid | resigned | tampered | forged | random
    route: Route
    frame: bytes
    body: Any = None  # what a valid frame carries


def _envelope(draw: st.DrawFn, route: Route, body: Any) -> Envelope:
    return Envelope(
        type=route.type_name,
        message_id=draw(st.binary(min_size=16, max_size=16)),
        sender=route.sender.name,
        recipient=route.receiver.name if route.receiver else "*",
        session=draw(st.binary(max_size=16)),
        reply_to=draw(st.binary(max_size=16)),
        ts_ms=NOW_MS,
        epoch=1,
        seq=draw(st.integers(0, 2**40)),
        chain=route.sender.chain,
        body=body,
    )


def _box(route: Route) -> bytes | None:
    return route.receiver.keys.box_public if route.receiver else None


@st.composite
def frame_cases(draw: st.DrawFn) -> FrameCase:
    route = draw(st.sampled_from(ROUTES))
    body = draw(bodies(route.type_name))
    env = _envelope(draw, route, body)
    frame = sign_frame(env, route.topic, route.sender.keys, _box(route))
    kind = draw(st.sampled_from(["valid", "resigned", "tampered", "forged", "random"]))
    if kind == "valid":
        return FrameCase(kind, route, frame, body)
    if kind == "tampered":
        return FrameCase(kind, route, draw(mutated_bytes(frame)))
    if kind == "random":
        return FrameCase(kind, route, draw(st.binary(max_size=600)))
    if kind == "forged":  # the sender's name and chain, another's key; or another device's own identity
        other = PKI.party(route.sender.role, "d2") if route.sender.device else None
        keys = draw(st.sampled_from([ATTACKER] + ([other.keys] if other else [])))
        if other is not None and keys is other.keys:
            env = Envelope(**{**env.__dict__, "sender": other.name, "chain": other.chain})
        return FrameCase(kind, route, sign_frame(env, route.topic, keys, _box(route)))
    # resigned: the legitimate key signs something malformed, so it gets past the signature
    spec = MESSAGE_TYPES[route.type_name]
    encoded = draw(body_bytes(spec.body))
    if spec.sealed and route.receiver is not None:
        encoded = seal(encoded, route.sender.keys, route.receiver.keys.box_public)
    fields: list[Value] = envelope_array(env, encoded)
    edit = draw(st.sampled_from(["body", "field", "swap", "type"]))
    if edit == "field":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(values)
    elif edit == "swap":
        a, b = draw(st.lists(st.integers(0, len(fields) - 1), min_size=2, max_size=2, unique=True))
        fields[a], fields[b] = fields[b], fields[a]
    elif edit == "type":
        fields[1] = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    try:
        data = pack(fields)
    except Malformed:
        assume(False)  # nested past what pack encodes: not a frame anyone can send
    signature = route.sender.keys.sign(FRAME_DOMAIN, signed_bytes(route.topic, data))
    return FrameCase("resigned", route, data + signature)


def _check_frame(case: FrameCase) -> None:
    receiver = case.route.receiver
    verifier = Verifier(
        frozenset({receiver.name}) if receiver else frozenset(),
        PKI.store(),
        ReplayGuard(NOW_MS - 60_000),
        keys=receiver.keys if receiver else None,
    )
    got: Received | None = only_typed_errors(lambda: verifier.open(case.frame, case.route.topic, NOW_MS))
    if case.kind == "valid":
        assert got is not None, "a valid frame was refused"
        assert got.envelope.body == case.body, "the body came out different"
    elif case.kind == "resigned":
        if got is not None:  # signed by its sender: accepted only as a well-formed message of its type
            assert isinstance(got.envelope.body, MESSAGE_TYPES[got.envelope.type].body)
    else:
        assert got is None, f"a {case.kind} frame was accepted"


FRAMES = Target("envelope.open", frame_cases(), _check_frame, "signed frames of every type on every route")


# -- certificates and revocation lists ----------------------------------------------------------
def _signed_cert(body: CertBody) -> bytes:
    return issue(body, PKI.root_keys).to_bytes()


_real_certs = st.sampled_from([PKI.root, PKI.update, PKI.platform, *(p.cert for p in PKI.parties.values())])
CERT_BYTES = st.one_of(_real_certs.map(Certificate.to_bytes), record(CertBody).map(_signed_cert))


def _check_cert(case: tuple[str, bytes, bytes]) -> None:
    kind, original, data = case
    cert = only_typed_errors(lambda: Certificate.from_bytes(data))
    if cert is None:
        return
    store = PKI.store()
    leaf = only_typed_errors(lambda: store.resolve([data], NOW_S))
    if leaf is not None and kind != "valid":  # a non-canonical spelling of the same certificate at most
        assert leaf == Certificate.from_bytes(original), "an altered certificate verified"
    server = PKI.party(Role.TRUST_SERVER).cert.to_bytes()
    only_typed_errors(lambda: PKI.store().resolve([server, data], NOW_S))  # as a chain's platform


CERTS = Target("certs.Certificate", variants(CERT_BYTES), _check_cert, "from_bytes, then a chain")

CRL_BYTES = record(RevocationBody).map(
    lambda b: sign_revocations(b.number, b.issued_at, b.serials, PKI.root_keys).to_bytes()
)


def _check_crl(case: tuple[str, bytes, bytes]) -> None:
    kind, original, data = case
    crl = only_typed_errors(lambda: RevocationList.from_bytes(data))
    if crl is None:
        return
    if only_typed_errors(lambda: PKI.store().set_revocations(crl, NOW_S)) is not None and kind != "valid":
        assert crl == RevocationList.from_bytes(original), "an altered revocation list was installed"


CRLS = Target("certs.RevocationList", variants(CRL_BYTES), _check_crl, "from_bytes, then installed")


# -- signed records ---------------------------------------------------------------------------------
RECORDS: dict[str, tuple[type, bytes]] = {
    "order": (Order, ORDER_DOMAIN),
    "receipt": (Receipt, RECEIPT_DOMAIN),
    "verdict": (Verdict, VERDICT_DOMAIN),
    "release": (Release, RELEASE_DOMAIN),
    "package": (Package, PACKAGE_DOMAIN),
}
SIGNER = PKI.party(Role.PAYMENT_SERVER).keys


def _record_cases() -> st.SearchStrategy[tuple[str, tuple[str, bytes, bytes]]]:
    def signed(what: str) -> st.SearchStrategy[bytes]:
        cls, domain = RECORDS[what]
        return record(cls).map(lambda body: sign_record(body, domain, SIGNER).to_bytes())

    return st.sampled_from(sorted(RECORDS)).flatmap(lambda w: st.tuples(st.just(w), variants(signed(w))))


def _check_record(case: tuple[str, tuple[str, bytes, bytes]]) -> None:
    what, (kind, original, data) = case
    cls, domain = RECORDS[what]
    only_typed_errors(lambda: peek_record(cls, data, what))
    opened = only_typed_errors(lambda: open_record(cls, data, domain, SIGNER.sign_public, what))
    if opened is not None and kind != "valid":
        assert opened.body == open_record(cls, original, domain, SIGNER.sign_public, what).body, (
            f"an altered {what} verified"
        )


RECORD_TARGET = Target(
    "records.open_record", _record_cases(), _check_record, "orders, receipts, verdicts ..."
)


# -- quotes ------------------------------------------------------------------------------------------
TM_KEYS = PKI.party(Role.TRUST_MODULE).keys


def _signed_quote(body: QuoteBody) -> bytes:
    return Quote(body, TM_KEYS.sign(QUOTE_DOMAIN, pack(to_map(body)))).to_bytes()


def _check_quote(case: tuple[tuple[str, bytes, bytes], tuple[LogEntry, ...]]) -> None:
    (_kind, _original, data), entries = case
    quote: Quote | None = only_typed_errors(lambda: Quote.from_bytes(data))
    if quote is not None:
        only_typed_errors(lambda: check_quote(quote, entries, TM_KEYS.sign_public, quote.body.nonce))


QUOTES = Target(
    "measure.Quote",
    st.tuples(
        variants(record(QuoteBody).map(_signed_quote)), st.lists(record(LogEntry), max_size=3).map(tuple)
    ),
    _check_quote,
    "from_bytes, then checked against a log",
)


# -- sealed bodies -----------------------------------------------------------------------------------
SEALER, OPENER = PKI.party(Role.CHIP).keys, PKI.party(Role.PAYMENT_SERVER).keys


def _sealed(plain: bytes) -> bytes:
    return seal(plain, SEALER, OPENER.box_public)


def _check_sealed(case: tuple[str, tuple[str, bytes, bytes]]) -> None:
    what, (kind, original, data) = case
    opened: Callable[[bytes], bytes] = (
        (lambda b: unseal(b, OPENER, SEALER.box_public)) if what == "unseal" else unpad
    )
    got = only_typed_errors(lambda: opened(data))
    if kind == "valid":
        assert got is not None, f"a valid input did not pass {what}"
        assert what == "unseal" or pad(got) == data, "unpad lost bytes"
    elif got is not None and what == "unseal":
        assert got == unseal(original, OPENER, SEALER.box_public), "an altered sealed body opened"


SEALED = Target(
    "seal.unseal",
    st.one_of(
        st.tuples(st.just("unseal"), variants(st.binary(max_size=700).map(_sealed))),
        st.tuples(st.just("unpad"), variants(st.binary(max_size=700).map(pad), max_random=2100)),
    ),
    _check_sealed,
    "NaCl box, then the padding",
)

TARGETS: tuple[Target, ...] = (CODEC, FRAMES, CERTS, CRLS, RECORD_TARGET, QUOTES, SEALED)
