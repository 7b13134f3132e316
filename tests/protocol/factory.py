"""A small deterministic PKI and frame builder for the protocol tests.

Every key pair comes from a fixed label (``keypair("root")`` is the same on
every run), every certificate from fixed serials and a fixed clock, so a
failing example reproduces exactly. Nothing here does I/O. The test modules
import it as ``from .factory import ...`` (``tests`` is a package).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import pytest

from protocol.certs import CertBody, Certificate, CertStore, issue
from protocol.codec import pack
from protocol.envelope import FRAME_DOMAIN, Envelope, Verifier, envelope_array, sign_frame, signed_bytes
from protocol.keys import KeyPair
from protocol.measure import LogEntry, MeasurementLog, make_quote, measure
from protocol.messages import MESSAGE_TYPES, Evidence
from protocol.replay import ReplayGuard
from protocol.topics import (
    CHANNEL_CRL,
    CHANNEL_OPS,
    CRL_TOPIC,
    Role,
    channel_topic,
    link_topic,
    node_id,
    operator_topic,
)

NOW_S = 1_700_000_000
NOW_MS = NOW_S * 1000
DAY = 86_400
NOT_BEFORE = NOW_S - DAY
NOT_AFTER = NOW_S + 365 * DAY
SESSION = bytes(range(16))

DEVICE_ROLES = (Role.TRUST_MODULE, Role.CHIP, Role.CLIENT)
SERVER_ROLES = (Role.TRUST_SERVER, Role.PAYMENT_SERVER)


def keypair(label: str) -> KeyPair:
    """A key pair fixed by ``label``: the same label always gives the same keys."""
    sign = hashlib.blake2b(label.encode(), digest_size=32, person=b"tp-test-sign").digest()
    box = hashlib.blake2b(label.encode(), digest_size=32, person=b"tp-test-box").digest()
    return KeyPair(sign, box)


_ids = itertools.count(1)


def make_id() -> bytes:
    """A fresh 16-byte message id (deterministic sequence within a run)."""
    return next(_ids).to_bytes(16, "big")


@dataclass(frozen=True)
class Identity:
    """One party: its node name, role, device, keys, certificate and frame chain."""

    name: str
    role: str
    device: str
    keys: KeyPair
    cert: Certificate
    chain: tuple[bytes, ...]

    @property
    def box_public(self) -> bytes:
        return self.cert.body.box_key


@dataclass
class Pki:
    """root -> update -> platform -> {trust-server, payment-server}; root -> per-device nodes."""

    devices: tuple[str, ...] = ("d1", "d2")
    now_s: int = NOW_S
    _serials: itertools.count = field(default_factory=lambda: itertools.count(100), repr=False)

    def __post_init__(self) -> None:
        self.root_keys = keypair("root")
        self.root = issue(self._body(1, "root", "root", "", self.root_keys, "root", 1), self.root_keys)
        self.update_keys = keypair("update")
        self.update = self.issue_cert("update", "update", "", self.update_keys, self.root, self.root_keys, 2)
        self.platform_keys = keypair("platform-3")
        self.platform = self.issue_cert(
            "platform", "platform", "", self.platform_keys, self.update, self.update_keys, 3
        )
        self.ids: dict[tuple[str, str], Identity] = {}
        for role in SERVER_ROLES:
            self.ids[(role.value, "")] = self.server(role)
        for device in self.devices:
            for role in DEVICE_ROLES:
                self.ids[(role.value, device)] = self.device_node(role, device)
        for role in (Role.OPERATOR, Role.MONITOR):
            name = role.value
            keys = keypair(name)
            cert = self.issue_cert(name, name, "", keys, self.root, self.root_keys)
            self.ids[(name, "")] = Identity(name, name, "", keys, cert, (cert.to_bytes(),))

    # -- certificates ----------------------------------------------------------
    def _body(
        self,
        serial: int,
        subject: str,
        role: str,
        device: str,
        keys: KeyPair,
        issuer: str,
        issuer_serial: int,
        not_before: int = NOT_BEFORE,
        not_after: int = NOT_AFTER,
    ) -> CertBody:
        return CertBody(
            serial,
            subject,
            role,
            device,
            keys.sign_public,
            keys.box_public,
            not_before,
            not_after,
            issuer,
            issuer_serial,
        )

    def next_serial(self) -> int:
        return next(self._serials)

    def issue_cert(
        self,
        subject: str,
        role: str,
        device: str,
        keys: KeyPair,
        issuer: Certificate,
        issuer_keys: KeyPair,
        serial: int | None = None,
        *,
        not_before: int = NOT_BEFORE,
        not_after: int = NOT_AFTER,
        issuer_name: str | None = None,
        issuer_serial: int | None = None,
    ) -> Certificate:
        """Issue a certificate; ``issuer_name``/``issuer_serial`` override what the body claims."""
        body = self._body(
            self.next_serial() if serial is None else serial,
            subject,
            role,
            device,
            keys,
            issuer.subject if issuer_name is None else issuer_name,
            issuer.serial if issuer_serial is None else issuer_serial,
            not_before,
            not_after,
        )
        return issue(body, issuer_keys)

    def server(
        self,
        role: Role,
        platform: Certificate | None = None,
        platform_keys: KeyPair | None = None,
        label: str = "",
        **kw: object,
    ) -> Identity:
        """A server identity issued by ``platform`` (the current one by default)."""
        platform = platform or self.platform
        platform_keys = platform_keys or self.platform_keys
        name = node_id(role)
        keys = keypair(label or f"{name}@{platform.serial}")
        cert = self.issue_cert(name, role.value, "", keys, platform, platform_keys, **kw)  # type: ignore[arg-type]
        return Identity(name, role.value, "", keys, cert, (cert.to_bytes(), platform.to_bytes()))

    def device_node(self, role: Role, device: str, label: str = "", **kw: object) -> Identity:
        """A device node (trust module, chip, client) issued by the root."""
        name = node_id(role, device)
        keys = keypair(label or name)
        cert = self.issue_cert(name, role.value, device, keys, self.root, self.root_keys, **kw)  # type: ignore[arg-type]
        return Identity(name, role.value, device, keys, cert, (cert.to_bytes(),))

    def rotate(self, label: str = "platform-next") -> tuple[Certificate, KeyPair]:
        """A newer platform certificate (higher serial) signed by the update key."""
        keys = keypair(label)
        cert = self.issue_cert("platform", "platform", "", keys, self.update, self.update_keys)
        return cert, keys

    # -- lookups ---------------------------------------------------------------
    def node(self, role: Role | str, device: str = "d1") -> Identity:
        role = Role(role)
        return self.ids[(role.value, device if role.on_device else "")]

    def store(self, *, update: bool = True, platform: bool = True) -> CertStore:
        st = CertStore(self.root, self.update if update else None)
        if platform and update:
            st.accept_platform(self.platform, self.now_s)
        return st


# -- frames ----------------------------------------------------------------------
def envelope(
    sender: Identity,
    recipient: Identity | str,
    type_: str,
    body: object,
    *,
    ts_ms: int = NOW_MS,
    epoch: int = 1,
    seq: int | None = None,
    message_id: bytes | None = None,
    session: bytes = SESSION,
    reply_to: bytes = b"",
    chain: tuple[bytes, ...] | None = None,
    version: int = 1,
) -> Envelope:
    mid = make_id() if message_id is None else message_id
    return Envelope(
        type=type_,
        message_id=mid,
        sender=sender.name,
        recipient=recipient if isinstance(recipient, str) else recipient.name,
        session=session,
        reply_to=reply_to,
        ts_ms=ts_ms,
        epoch=epoch,
        seq=int.from_bytes(mid[-8:], "big") if seq is None else seq,
        chain=sender.chain if chain is None else chain,
        body=body,
        version=version,
    )


def sign(env: Envelope, topic: str, sender: Identity, peer: Identity | None = None) -> bytes:
    """Sign ``env`` for ``topic``; a sealed type is boxed for ``peer``."""
    return sign_frame(env, topic, sender.keys, peer.box_public if peer is not None else None)


def raw_frame(fields: list[object], topic: str, keys: KeyPair, version: int = 1) -> bytes:
    """Sign an arbitrary envelope array (to build frames ``sign_frame`` refuses to make)."""
    data = pack(fields)
    return data + keys.sign(FRAME_DOMAIN, signed_bytes(topic, data, version))


def envelope_fields(env: Envelope, body: bytes) -> list[object]:
    """The envelope array of ``env`` with ``body`` as the (already encoded) body bytes."""
    return list(envelope_array(env, body))


def topic_between(src: Identity, dst: Identity) -> str:
    device = src.device or dst.device or None
    return link_topic(Role(src.role), Role(dst.role), device)


def verifier(
    pki: Pki,
    receiver: Identity | None,
    *,
    guard: ReplayGuard | None = None,
    floor_ms: int = NOW_MS - 60_000,
    replay: bool = True,
    keys: KeyPair | bool | None = True,
    store: CertStore | None = None,
) -> Verifier:
    """A Verifier for ``receiver`` (None: a monitor accepting any recipient, no keys)."""
    if guard is None and replay:
        guard = ReplayGuard(floor_ms)
    if keys is True:
        keys = receiver.keys if receiver is not None else None
    elif keys is False:
        keys = None
    my_ids = frozenset({receiver.name}) if receiver is not None else frozenset()
    return Verifier(my_ids, pki.store() if store is None else store, guard, keys=keys)


# -- sample bodies for every message type -------------------------------------------
def sample_log(device: str = "d1") -> MeasurementLog:
    log = MeasurementLog()
    log.append(LogEntry(measure("client", "client", "1.0", b"code", b"static", b"dyn"), True))
    log.append(LogEntry(measure("app", "wallet", "2.1", b"app-code", b"app-static", b"app-dyn"), True))
    return log


def sample_evidence(tm: Identity, nonce: bytes = b"n" * 16) -> Evidence:
    log = sample_log(tm.device)
    quote = make_quote(tm.device, nonce, log, tm.keys, NOW_MS)
    return Evidence(nonce, quote.to_bytes(), log.entries, "wallet")


def example(cls: type, *, text: str | None = None, blob: bytes | None = None, salt: str = "") -> object:
    """A value for every field of the record ``cls``, derived from the field names.

    Built from the type hints, so it follows changes to the message bodies.
    ``text``/``blob`` override every str/bytes field (to make big bodies).
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kwargs[f.name] = _example_value(hints[f.name], f.name + salt, text, blob)
    return cls(**kwargs)


def _example_value(hint: object, name: str, text: str | None, blob: bytes | None) -> object:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return (_example_value(typing.get_args(hint)[0], name + "0", text, blob),)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _example_value(inner[0], name, text, blob)
    if dataclasses.is_dataclass(hint):
        return example(hint, text=text, blob=blob, salt=name)  # type: ignore[arg-type]
    if hint is bool:
        return True
    if hint is int:
        return len(name) * 1000 + 7
    if hint is str:
        return f"{name}-text" if text is None else text
    if hint is bytes:
        return f"{name}-bytes".encode() if blob is None else blob
    raise TypeError(f"no example for {hint!r}")


def sample_bodies(pki: Pki) -> dict[str, object]:
    """A body for every registered message type (real evidence for c2.evidence when it fits)."""
    bodies = {name: example(spec.body) for name, spec in MESSAGE_TYPES.items()}
    with contextlib.suppress(TypeError):  # Evidence changed shape: the generic example still covers it
        bodies["c2.evidence"] = sample_evidence(pki.node(Role.TRUST_MODULE))
    return bodies


@dataclass(frozen=True)
class Route:
    """Where one message type can travel: sender, receiver (None: any) and topic."""

    sender: Identity
    receiver: Identity | None
    topic: str


def routes_for(pki: Pki, spec_links: frozenset, spec_channels: frozenset) -> list[Route]:
    """Every concrete route on device d1 (and the platform) a message type may take."""
    out: list[Route] = []
    for src, dst in sorted(spec_links):
        sender = pki.node(src)
        receiver = pki.node(dst)
        if src is Role.OPERATOR:
            topic = operator_topic(dst, "d1" if dst.on_device else None)
        else:
            topic = topic_between(sender, receiver)
        out.append(Route(sender, receiver, topic))
    for channel in sorted(spec_channels):
        if channel == CHANNEL_CRL:  # the operator's one broadcast, read by every node
            out.append(Route(pki.node(Role.OPERATOR), None, CRL_TOPIC))
            continue
        for role in (Role.TRUST_MODULE, Role.TRUST_SERVER):
            sender = pki.node(role)
            out.append(Route(sender, None, channel_topic(role, channel, sender.device or None)))
    return out


def with_ops_recipient(route: Route, pki: Pki) -> Route:
    """Replies on the ops channel go to the operator."""
    if route.topic.endswith("/" + CHANNEL_OPS):
        return replace(route, receiver=pki.node(Role.OPERATOR))
    return route


@contextmanager
def exactly(exc_type: type[BaseException]) -> Iterator[pytest.ExceptionInfo]:
    """``pytest.raises`` that refuses subclasses too (a Duplicate is not the Replayed we want)."""
    with pytest.raises(exc_type) as info:
        yield info
    assert type(info.value) is exc_type, f"expected exactly {exc_type.__name__}, got {info.value!r}"
