"""Generate the reference sections of ``docs/PROTOCOL.md`` from the code, so they cannot drift.

Each section sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``
in the document; everything outside the markers is hand-written and left alone.

    python -m ops.protocol_doc            print the generated sections
    python -m ops.protocol_doc --write    rewrite them in docs/PROTOCOL.md
    python -m ops.protocol_doc --check    exit 1 if docs/PROTOCOL.md is stale

The tables come from ``protocol.topics``, ``protocol.messages``, ``protocol.errors``
and the records' dataclasses; who sends and handles what comes from the role code
in ``nodes/`` (read with ``ast``, never imported for that); the test vectors are
computed with the protocol's own functions from fixed keys and fixed times, and
re-verified independently by ``tests/protocol/test_protocol_doc.py``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nacl.public

from protocol import certs, codec, envelope, errors, keys, measure, messages, records, replay, seal, topics
from protocol.certs import CertBody, Certificate, CertStore, issue
from protocol.codec import pack
from protocol.envelope import FRAME_DOMAIN, Envelope, Verifier, sign_frame, signed_bytes
from protocol.keys import KeyPair
from protocol.measure import LogEntry, MeasurementLog, entry_digest, log_digest, make_quote
from protocol.messages import Evidence, PlatformCheck, PlatformResult
from protocol.replay import ReplayGuard
from protocol.schema import to_map
from protocol.topics import LINKS, Role

ROOT_DIR = Path(__file__).resolve().parent.parent
DOC = ROOT_DIR / "docs" / "PROTOCOL.md"
NODES_DIR = ROOT_DIR / "nodes"
OPS_DIR = ROOT_DIR / "ops"
PROTOCOL_DIR = ROOT_DIR / "protocol"
SECTIONS = ("parameters", "topics", "messages", "records", "errors", "refusals", "vectors")
DEVICE = "{device}"
_PROBE = "DEVICEPROBE"  # a valid device id, replaced by {device} in the tables

ROLE_OF_MODULE = {
    "trust_module": Role.TRUST_MODULE.value,
    "chip": Role.CHIP.value,
    "client": Role.CLIENT.value,
    "trust_server": Role.TRUST_SERVER.value,
    "payment_server": Role.PAYMENT_SERVER.value,
    "runtime": "every node",
}


def start_marker(name: str) -> str:
    return f"<!-- generated:{name} -->"


def end_marker(name: str) -> str:
    return f"<!-- /generated:{name} -->"


def _table(head: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text: object) -> str:
    return f"`{text}`"


def _device_pattern(topic: str) -> str:
    return topic.replace(_PROBE, DEVICE)


def _bytes_literal(value: bytes) -> str:
    text = value.decode("ascii", "backslashreplace").replace("\x00", "\\x00")
    return f'`b"{text}"` ({len(value)} bytes)'


# -- parameters --------------------------------------------------------------------


def _defaults(func: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _personalisations() -> list[tuple[str, str, bytes]]:
    """Every BLAKE2b personalisation tag in protocol/, with the function that uses it."""
    found: list[tuple[str, str, bytes]] = []
    for module in ("measure", "records"):
        path = PROTOCOL_DIR / f"{module}.py"
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, bytes)
                    and node.value.startswith(b"tp-")
                ):
                    found.append((module, func.name, node.value))
    return found


def _domains() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for module in (envelope, certs, measure, records):
        for name, value in vars(module).items():
            if name.endswith("_DOMAIN") and isinstance(value, bytes) and name not in dict(out):
                out.append((f"{module.__name__}.{name}", value))
    return out


def render_parameters() -> str:
    from nodes import bus, chip, client, payment_server, runtime, trust_module, trust_server

    limits = codec.DEFAULT_LIMITS
    guard = _defaults(ReplayGuard.__init__)
    settings = runtime.Settings()
    mqtt = {f.name: f.default for f in dataclasses.fields(bus.MqttBus)}
    rows: list[tuple[str, object, str]] = [
        ("protocol.envelope.VERSION", envelope.VERSION, "envelope field 0 and the u8 in the signed bytes"),
        ("protocol.envelope.MAX_FRAME", envelope.MAX_FRAME, "bytes, envelope and signature together"),
        ("protocol.envelope.FIELDS", envelope.FIELDS, "elements of the envelope array"),
        ("protocol.envelope.ID_SIZE", envelope.ID_SIZE, "bytes of a message id"),
        ("protocol.keys.SIGNATURE_SIZE", keys.SIGNATURE_SIZE, "bytes of an Ed25519 signature"),
        ("protocol.keys.KEY_SIZE", keys.KEY_SIZE, "bytes of every public key and secret"),
        ("protocol.measure.DIGEST_SIZE", measure.DIGEST_SIZE, "bytes of every measurement digest"),
    ]
    rows += [
        (f"codec.Limits.{f.name}", getattr(limits, f.name), "decode limit")
        for f in dataclasses.fields(limits)
    ]
    rows += [
        ("codec integers", f"{codec.MIN_INT} .. {codec.MAX_INT}", "signed 64-bit; floats and ext refused"),
        ("ReplayGuard skew_ms", guard["skew_ms"], "how far behind the receiver's clock a stamp may be"),
        ("ReplayGuard ahead_ms", guard["ahead_ms"], "how far ahead of the receiver's clock a stamp may be"),
        ("ReplayGuard max_ids", guard["max_ids"], "remembered message ids per sender"),
        ("protocol.replay.WINDOW_BITS", replay.WINDOW_BITS, "sequence window per sender and epoch"),
        ("Settings.request_timeout_s", settings.request_timeout_s, "seconds per request attempt"),
        ("Settings.request_attempts", settings.request_attempts, "attempts, all with the same message id"),
        ("Settings.response_cache", settings.response_cache, "responses kept to answer duplicates"),
        ("Settings.max_handlers", settings.max_handlers, "requests handled at once per node"),
        (
            "MqttBus.ack_timeout_s",
            mqtt["ack_timeout_s"],
            "seconds for the broker to acknowledge a publish, else the connection is dropped",
        ),
        (
            "MqttBus.publish_timeout_s",
            mqtt["publish_timeout_s"],
            "seconds a publish waits for a connection to be up",
        ),
        (
            "MqttBus.backoff_initial_s .. backoff_max_s",
            f"{mqtt['backoff_initial_s']} .. {mqtt['backoff_max_s']}",
            "reconnection delay, doubling",
        ),
        (
            "trust_module.CHIP_WAIT_ATTEMPTS",
            trust_module.CHIP_WAIT_ATTEMPTS,
            "chip.info attempts at start-up",
        ),
        (
            "chip.ATTEST_PATIENCE",
            chip.ATTEST_PATIENCE,
            "attest.request: one attempt of timeout x attempts x this",
        ),
        ("client.PAY_PATIENCE", client.PAY_PATIENCE, "pay.start: one attempt of timeout x attempts x this"),
        (
            "chip.MAX_RESENDS",
            chip.MAX_RESENDS,
            "answers to a pending order that are no valid receipt for it, before it is abandoned",
        ),
        ("trust_server.NONCE_SIZE", trust_server.NONCE_SIZE, "bytes of a C2 nonce"),
        ("trust_server.NONCE_TTL_MS", trust_server.NONCE_TTL_MS, "a nonce's lifetime; single use"),
        ("trust_server.VERDICT_TTL_MS", trust_server.VERDICT_TTL_MS, "a verdict's and its grant's lifetime"),
        (
            "payment_server.DEFAULT_PAYMENT_LIMIT",
            payment_server.DEFAULT_PAYMENT_LIMIT,
            "minor units per payment",
        ),
        ("protocol.appraisal.POLICY", _policy(), "the policy named in every verdict"),
    ]
    out = ["Numbers", "", _table(("name", "value", "meaning"), ((_code(a), _code(b), c) for a, b, c in rows))]
    out += ["", "Signature domains (every signed message starts with its tag, NUL included)", ""]
    out.append(_table(("constant", "tag"), ((_code(n), _bytes_literal(v)) for n, v in _domains())))
    out += ["", "BLAKE2b personalisation tags (`person=`, zero-padded to 16 bytes)", ""]
    out.append(
        _table(
            ("used in", "tag"),
            ((_code(f"protocol.{m}.{f}"), _bytes_literal(t)) for m, f, t in _personalisations()),
        )
    )
    return "\n".join(out)


def _policy() -> str:
    from protocol.appraisal import POLICY

    return POLICY


# -- topics --------------------------------------------------------------------------


_REPLICA_PROBE = 7  # a replica number that appears nowhere else in a topic or node id


def _replica_pattern(text: str) -> str:
    return text.replace(f"/{_REPLICA_PROBE}", "/{k}").replace(f".{_REPLICA_PROBE}", ".{k}")


def _channel_topic(role: Role, channel: str) -> str:
    return _device_pattern(topics.channel_topic(role, channel, _PROBE if role.on_device else None))


def render_topics() -> str:
    out = ["Links (one topic per direction; `{device}` is the device id)", ""]
    rows: list[tuple[str, ...]] = []
    for link in LINKS:
        device = _PROBE if (link.src.on_device or link.dst.on_device) else None
        topic = _device_pattern(topics.link_topic(link.src, link.dst, device))
        rows.append(
            (
                f"{link.src.value} -> {link.dst.value}",
                _code(topic),
                "wireless (claim 1)" if link.wireless else "local",
                link.name,
            )
        )
    out.append(_table(("direction", "topic", "kind", "patent link"), rows))
    out += ["", "Channels (published by a role, read by the operator and monitors)", ""]
    rows = []
    for channel in topics.NODE_CHANNELS:
        types_ = sorted(s.name for s in messages.MESSAGE_TYPES.values() if channel in s.channels)
        device_topic = _channel_topic(Role.TRUST_MODULE, channel).replace("/tm/", "/{role}/")
        server_topic = _channel_topic(Role.TRUST_SERVER, channel).replace("/ts/", "/{role}/")
        rows.append(
            (_code(channel), _code(device_topic), _code(server_topic), ", ".join(_code(t) for t in types_))
        )
    out.append(_table(("channel", "device role", "server role", "message types"), rows))
    replica_status = _replica_pattern(topics.status_topic(Role.TRUST_SERVER, None, _REPLICA_PROBE))
    out += [
        "",
        "A broker retains one message per topic: replica k > 1 of a server keeps its status (and its "
        f"last will) on {_code(replica_status.replace('/ts/', '/{role}/'))} (`status_topic`), signed by "
        "that replica only; replica 1, like a lone server, on the role's.",
    ]
    out += ["", "Operator topics (the operator writes; the node answers on its `ops` channel)", ""]
    rows = []
    for role in topics.NODE_ROLES:
        topic = _device_pattern(topics.operator_topic(role, _PROBE if role.on_device else None))
        allowed = sorted(s.name for s in messages.MESSAGE_TYPES.values() if (Role.OPERATOR, role) in s.links)
        rows.append((role.value, _code(topic), ", ".join(_code(t) for t in allowed)))
    out.append(_table(("node", "topic", "message types"), rows))
    crl_types = sorted(s.name for s in messages.MESSAGE_TYPES.values() if topics.CHANNEL_CRL in s.channels)
    out += [
        "",
        f"Revocation list: the operator publishes it, retained, on {_code(topics.CRL_TOPIC)} "
        f"({', '.join(_code(t) for t in crl_types)}); every login may read it and every node subscribes.",
    ]
    out += ["", "Role short names in topics: " + ", ".join(f"{_code(r.short)} = {r.value}" for r in Role)]
    out += [
        "",
        "Subscriptions and broker ACL of each identity (`protocol.topics.inbound_filters`, `acl_for`)",
        "",
    ]
    rows = []
    for role in Role:
        device = _PROBE if role.on_device else None
        subs = ", ".join(_code(_device_pattern(f)) for f in topics.inbound_filters(role, device))
        acl = topics.acl_for(role, device)
        writes = ", ".join(_code(_device_pattern(r.pattern)) for r in acl if r.access == "write") or "none"
        reads = ", ".join(_code(_device_pattern(r.pattern)) for r in acl if r.access == "read")
        rows.append((role.value, _code(_device_pattern(topics.node_id(role, device))), subs, writes, reads))
    for role in topics.SERVER_ROLES:  # replica k > 1: the role's rules but for its own status topic
        acl = topics.acl_for(role, None, _REPLICA_PROBE)
        writes = ", ".join(_code(_replica_pattern(r.pattern)) for r in acl if r.access == "write")
        reads = ", ".join(_code(r.pattern) for r in acl if r.access == "read")
        nid = _replica_pattern(topics.node_id(role, None, _REPLICA_PROBE))
        rows.append((f"{role.value} replica k > 1", _code(nid), "as its role (2.1)", writes, reads))
    out.append(_table(("role", "node id", "subscribes", "may write", "may read"), rows))
    return "\n".join(out)


# -- message bodies --------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_type_name(args[0])} or nil"
    if origin is tuple:
        return f"array of {_type_name(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return f"map {typing.cast(type, hint).__name__}"
    return {int: "int", str: "str", bytes: "bin", bool: "bool"}[hint]


def _nested(hint: Any) -> list[type]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType, tuple):
        return [c for a in typing.get_args(hint) if a is not Ellipsis for c in _nested(a)]
    return [typing.cast(type, hint)] if dataclasses.is_dataclass(hint) else []


def _field_comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _doc_line(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _describe_record(cls: type, seen: set[type]) -> list[str]:
    """The record's fields as a list, followed by every nested record not yet described."""
    if cls in seen:
        return []
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    fields = dataclasses.fields(cls)
    head = f"- **{cls.__name__}**"
    doc = _doc_line(cls)
    if doc:
        head += f": {doc}"
    if not fields:
        head += " (the empty map, `80`)"
    lines = [head]
    nested: list[type] = []
    for f in fields:
        text = f"  - {_code(f.name)}: {_type_name(hints[f.name])}"
        if f.name in comments:
            text += f" ({comments[f.name]})"
        lines.append(text)
        nested += _nested(hints[f.name])
    for inner in nested:
        lines += _describe_record(inner, seen)
    return lines


def _links_text(spec: messages.MessageSpec) -> str:
    parts = []
    links = set(spec.links)
    if links >= messages.ALL_LINKS:
        parts.append("every link")
        links -= messages.ALL_LINKS
    if links >= messages.FROM_OPERATOR:
        parts.append("operator -> every node")
        links -= messages.FROM_OPERATOR
    order = {r: i for i, r in enumerate(Role)}
    for src, dst in sorted(links, key=lambda p: (order[p[0]], order[p[1]])):
        parts.append(f"{src.short} -> {dst.short}")
    parts += [f"channel {_code(c)}" for c in sorted(spec.channels)]
    return "; ".join(parts)


@dataclasses.dataclass
class RoleUse:
    handlers: dict[str, list[str]]  # type -> roles with a route for it
    requests: list[tuple[str, str, str]]  # (role, type, expected response)


def _str_arg(call: ast.Call, index: int, keyword: str = "") -> str | None:
    node: ast.expr | None = None
    if len(call.args) > index:
        node = call.args[index]
    for kw in call.keywords:
        if kw.arg == keyword:
            node = kw.value
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _calls(tree: ast.AST, name: str) -> Iterable[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == name:
                yield node


def role_use() -> RoleUse:
    """Which role handles which type and which requests the role code makes (read with ``ast``).

    The operator's commands are ``command(node, role, nid, TYPE, body, EXPECT)`` calls in ``ops/``.
    """
    handlers: dict[str, list[str]] = {}
    requests: list[tuple[str, str, str]] = []
    for module, role in ROLE_OF_MODULE.items():
        path = NODES_DIR / f"{module}.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "route"):
            msg_type = _str_arg(call, 0)
            if msg_type:
                handlers.setdefault(msg_type, []).append(role)
        for call in _calls(tree, "request"):
            msg_type, expect = _str_arg(call, 1), _str_arg(call, -1, "expect")
            if msg_type and expect and (role, msg_type, expect) not in requests:
                requests.append((role, msg_type, expect))
    for path in sorted(OPS_DIR.glob("*.py")):
        for call in _calls(ast.parse(path.read_text()), "command"):
            msg_type, expect = _str_arg(call, 3), _str_arg(call, 5)
            row = (Role.OPERATOR.value, msg_type or "", expect or "")
            if msg_type and expect and row not in requests:
                requests.append(row)
    return RoleUse(handlers, requests)


def render_messages() -> str:
    use = role_use()
    rows = []
    for name, spec in messages.MESSAGE_TYPES.items():
        answers = sorted({t for _, t, e in use.requests if e == name})
        if name == "error":
            answers = ["any request of an unsealed type"]
        elif name == "refusal":
            answers = ["any request of a sealed type"]
        role = ", ".join(use.handlers.get(name, []))
        if answers:
            role = (
                (role + "; " if role else "")
                + "answers "
                + ", ".join(a if a.startswith("any request") else _code(a) for a in answers)
            )
        rows.append(
            (_code(name), spec.body.__name__, "**sealed**" if spec.sealed else "", _links_text(spec), role)
        )
    out = [
        "Every message type (`protocol.messages.MESSAGE_TYPES`). Links use the short names "
        "(`tm`, `chip`, `client`, `ts`, `ps`, `ops`); a frame of that type on any other topic is "
        "`wrong_topic`. *Handled by* lists the roles with a handler (from `route(...)` in `nodes/`); "
        "*answers* the requests this type is the expected response to.",
        "",
        _table(("type", "body", "sealed", "may travel on", "handled by / answers"), rows),
        "",
        "Requests the role code makes (`Node.request(...)` calls in `nodes/`, the operator's "
        "`command(...)` calls in `ops/`), with the response it "
        "expects; any request may instead be refused: with `error`, or with the sealed `refusal` when "
        "the request's type is sealed.",
        "",
        _table(
            ("sender", "request", "expected response"),
            ((role, _code(t), _code(e)) for role, t, e in use.requests),
        ),
        "",
        "Bodies: a msgpack map of exactly these fields (keys sorted, none missing, none extra); "
        "`bin` is msgpack bin, `str` UTF-8 str, `map X` the nested record's map, `array of X` an array.",
        "",
    ]
    seen: set[type] = set()
    for spec in messages.MESSAGE_TYPES.values():
        out += _describe_record(spec.body, seen)
    return "\n".join(out)


# -- signed records ----------------------------------------------------------------------

RECORDS: tuple[tuple[type, str, str, str], ...] = (
    (certs.CertBody, "CERT_DOMAIN", "the issuer named by `ISSUER_ROLE`", "`Certificate` `{body, signature}`"),
    (certs.RevocationBody, "CRL_DOMAIN", "root", "`RevocationList` `{body, signature}`"),
    (measure.QuoteBody, "QUOTE_DOMAIN", "the device's trust module", "`Quote` `{body, signature}`"),
    (records.Order, "ORDER_DOMAIN", "the chip", "signed record `{body, sig}`"),
    (records.Receipt, "RECEIPT_DOMAIN", "payment-server", "signed record `{body, sig}`"),
    (records.Verdict, "VERDICT_DOMAIN", "trust-server", "signed record `{body, sig}`"),
    (records.Release, "RELEASE_DOMAIN", "issuer", "signed record `{body, sig}`"),
    (records.Package, "PACKAGE_DOMAIN", "issuer", "signed record `{body, sig}`"),
)


def _domain_value(name: str) -> bytes:
    for module in (envelope, certs, measure, records):
        if hasattr(module, name):
            value: bytes = getattr(module, name)
            return value
    raise KeyError(name)


def render_records() -> str:
    rows = [
        (f"**{cls.__name__}**", _bytes_literal(_domain_value(domain)), signer, wrapper)
        for cls, domain, signer, wrapper in RECORDS
    ]
    out = [
        "Everything signed outside a frame. The signature is Ed25519 over `tag || body bytes`, "
        "the body bytes being the canonical msgpack map of the record. Certificates, revocation lists "
        "and quotes are the map `{body: map, signature: bin}`; the other records are "
        "`{body: bin, sig: bin}` whose `body` holds the exact signed bytes (`protocol.records.Signed`).",
        "",
        _table(("record", "tag", "signed by", "carried as"), rows),
        "",
        "Certificate issuers (`protocol.certs.ISSUER_ROLE`): "
        + ", ".join(f"{_code(role)} by {_code(issuer)}" for role, issuer in certs.ISSUER_ROLE.items())
        + "; the root certificate is self-issued.",
        "",
    ]
    seen: set[type] = set()
    for cls, *_ in RECORDS:
        out += _describe_record(cls, seen)
    out += _describe_record(measure.LogEntry, seen)
    return "\n".join(out)


# -- rejections and refusals ----------------------------------------------------------------

MEANINGS = {
    "Malformed": "not canonical-decodable, a field of the wrong type, a missing or unknown field",
    "TooLarge": "over a size limit (frame, string, bin, array or map)",
    "UnknownVersion": "envelope version other than ours",
    "UnknownType": "message type not in the registry",
    "WrongTopic": "the topic is not a trustpay topic, or this type / device does not belong on it",
    "UnknownSender": "no certificate chain, or the chain certifies someone else than `sender`",
    "CertificateExpired": "a certificate of the chain is outside its validity at the receiver's clock",
    "CertificateRevoked": "a certificate's serial is on the revocation list",
    "WrongRole": "the certificate's role may not send on this topic, or is not the role expected",
    "BadSignature": "an Ed25519 signature does not verify",
    "NotForMe": "the envelope's recipient is not this node",
    "Stale": "the send time is outside the skew window or before the receiver started",
    "Replayed": "an old epoch, a sequence number seen or below the window, an id of another sender",
    "MeasurementMismatch": "a quote or log does not match (nonce, log digest, aggregate, device)",
}


def _doc_first(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def render_errors() -> str:
    rows = []
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.Rejected) and c.__module__ == errors.__name__
    ]
    for cls in classes:
        meaning = _doc_first(cls) or MEANINGS.get(cls.__name__)
        if not meaning:
            raise SystemExit(f"protocol.errors.{cls.__name__} has no docstring: add one or a MEANINGS entry")
        parent = cls.__mro__[1].__name__
        rows.append(
            (_code(cls.code), cls.__name__, parent, "yes" if cls.alarm else "no (normal noise)", meaning)
        )
    return "\n".join(
        [
            "Typed rejections (`protocol.errors.Rejected` and its subclasses). A receiver drops a "
            "rejected frame and counts it as `rejected.CODE`; a handler that raises one refuses the "
            "request with the code (`error`, or `refusal` for a sealed request type).",
            "",
            _table(("code", "class", "subclass of", "alarm", "meaning"), rows),
        ]
    )


EXTRA_SOURCES = {"trust_server": ("trust_db",), "payment_server": ("ledger",), "chip": ("sandbox",)}


class _CodeFinder(ast.NodeVisitor):
    """Error codes in one module: ``Refused("code", ...)``, ``_refuse(rx, "code", ...)``, ``code = "..."``."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.where = module
        self.found: list[tuple[str, str]] = []  # (code, where)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.where = self.where, f"{self.module}.{node.name}"
        self.generic_visit(node)
        self.where = outer

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "code" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                self.found.append((stmt.value.value, f"class {self.module}.{node.name}"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        code = (
            _str_arg(node, 0) if called == "Refused" else _str_arg(node, 1) if called == "_refuse" else None
        )
        if code:
            self.found.append((code, self.where))
        self.generic_visit(node)


def refusal_codes() -> list[tuple[str, str, str]]:
    """Codes the role code can put in a refusal body: (code, role, where), read with ``ast``."""
    found: dict[tuple[str, str], list[str]] = {}
    for module, role in ROLE_OF_MODULE.items():
        for name in (module, *EXTRA_SOURCES.get(module, ())):
            path = NODES_DIR / f"{name}.py"
            if not path.exists():
                continue
            finder = _CodeFinder(name)
            finder.visit(ast.parse(path.read_text()))
            for code, where in finder.found:
                places = found.setdefault((code, role), [])
                if where not in places:
                    places.append(where)
    return sorted((code, role, ", ".join(_code(w) for w in where)) for (code, role), where in found.items())


def render_refusals() -> str:
    rows = [(_code(code), role, where) for code, role, where in refusal_codes()]
    return "\n".join(
        [
            "Codes the role code itself can put in a refusal, `error` or `refusal` (`Refused(...)` calls, "
            "the runtime's own "
            "refusals and error classes in `nodes/`, found with `ast`); any code of the rejection table "
            "above can appear as well, when a handler's own check raises it. A code raised outside a handler "
            "(for example at install time) never reaches the wire.",
            "",
            _table(("code", "raised by", "where"), rows),
        ]
    )


# -- test vectors --------------------------------------------------------------------------

V_DEVICE = "dev-0001"
V_NOT_BEFORE = 1_704_067_200  # 2024-01-01T00:00:00Z
V_NOT_AFTER = 2_019_686_400  # 2034-01-01T00:00:00Z
V_TS_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
V_SESSION = bytes(range(0x50, 0x60))
V_QUOTE_NONCE = bytes(range(0x60, 0x80))
V_BOX_NONCE = bytes(range(0x40, 0x58))
V_KEYS = {  # name -> first byte of the sign seed, first byte of the box secret (then counting up)
    "root": (0x00, 0x20),
    "update": (0x40, 0x60),
    "platform": (0x80, 0xA0),
    "trust-server": (0xC0, 0xE0),
    "tm": (0x10, 0x30),
    "chip": (0x90, 0xB0),
}
V_COMPONENTS = (
    (
        "client",
        "client",
        "1.0.0",
        b"print('client')\n",
        b'{"name":"client","version":"1.0.0"}\n',
        b'{"payments":[]}\n',
    ),
    (
        "app",
        "wallet",
        "1.0.0",
        b"def make_order(): ...\n",
        b'{"name":"wallet","version":"1.0.0"}\n',
        b'{"counter":0}\n',
    ),
)


def _seed(first: int) -> bytes:
    return bytes((first + i) % 256 for i in range(32))


def vector_keys() -> dict[str, KeyPair]:
    return {name: KeyPair(_seed(s), _seed(b)) for name, (s, b) in V_KEYS.items()}


@dataclasses.dataclass(frozen=True)
class Vectors:
    keys: dict[str, KeyPair]
    certs: dict[str, Certificate]
    lines: list[str]


def _cert(
    serial: int,
    subject: str,
    role: str,
    device: str,
    kp: KeyPair,
    issuer: str,
    issuer_serial: int,
    issuer_keys: KeyPair,
) -> Certificate:
    body = CertBody(
        serial,
        subject,
        role,
        device,
        kp.sign_public,
        kp.box_public,
        V_NOT_BEFORE,
        V_NOT_AFTER,
        issuer,
        issuer_serial,
    )
    return issue(body, issuer_keys)


def vector_certs(kp: dict[str, KeyPair]) -> dict[str, Certificate]:
    tm = topics.node_id(Role.TRUST_MODULE, V_DEVICE)
    return {
        "root": _cert(1, "root", certs.ROOT, "", kp["root"], "root", 1, kp["root"]),
        "update": _cert(2, "update", certs.UPDATE, "", kp["update"], "root", 1, kp["root"]),
        "platform": _cert(3, "platform", certs.PLATFORM, "", kp["platform"], "update", 2, kp["update"]),
        "trust-server": _cert(
            10, "trust-server", Role.TRUST_SERVER.value, "", kp["trust-server"], "platform", 3, kp["platform"]
        ),
        "tm": _cert(20, tm, Role.TRUST_MODULE.value, V_DEVICE, kp["tm"], "root", 1, kp["root"]),
    }


def _frame_lines(prefix: str, topic: str, data: bytes, kp: KeyPair) -> list[str]:
    to_sign = FRAME_DOMAIN + signed_bytes(topic, data)
    signature = kp.sign(FRAME_DOMAIN, signed_bytes(topic, data))
    return [
        f"{prefix}.topic = {topic}",
        f"{prefix}.envelope = {data.hex()}",
        f"{prefix}.signed = {to_sign.hex()}",
        f"{prefix}.signature = {signature.hex()}",
        f"{prefix}.frame = {(data + signature).hex()}",
    ]


def build_vectors() -> Vectors:
    kp = vector_keys()
    cs = vector_certs(kp)
    tm_id, ts_id = topics.node_id(Role.TRUST_MODULE, V_DEVICE), topics.node_id(Role.TRUST_SERVER)
    lines = ["# keys: Ed25519 seed and X25519 secret -> public keys"]
    for name, pair in kp.items():
        lines += [
            f"key.{name}.sign_seed = {pair.sign_seed.hex()}",
            f"key.{name}.sign_public = {pair.sign_public.hex()}",
            f"key.{name}.box_secret = {pair.box_secret.hex()}",
            f"key.{name}.box_public = {pair.box_public.hex()}",
        ]
    lines += [
        "",
        f"# certificates, valid {V_NOT_BEFORE}..{V_NOT_AFTER} (seconds); signature over CERT_DOMAIN || body",
    ]
    for name, cert in cs.items():
        lines += [
            f"cert.{name}.body = {pack(to_map(cert.body)).hex()}",
            f"cert.{name}.signature = {cert.signature.hex()}",
            f"cert.{name}.bytes = {cert.to_bytes().hex()}",
            f"cert.{name}.fingerprint = {cert.fingerprint.hex()}",
        ]

    # measurements (claim 2), the log and its aggregate
    lines += ["", "# measurements: part digests, combined digest, log entries, aggregate, log digest"]
    log = MeasurementLog()
    for i, (kind, name, version, code, static, dynamic) in enumerate(V_COMPONENTS):
        m = measure.measure(kind, name, version, code, static, dynamic)
        entry = LogEntry(m, True)
        log.append(entry)
        p = f"measure.{i}"
        lines += [
            f"{p}.kind = {kind}",
            f"{p}.name = {name}",
            f"{p}.version = {version}",
            f"{p}.code_bytes = {code.hex()}",
            f"{p}.static_bytes = {static.hex()}",
            f"{p}.dynamic_bytes = {dynamic.hex()}",
            f"{p}.code = {m.code.hex()}",
            f"{p}.static = {m.static.hex()}",
            f"{p}.dynamic = {m.dynamic.hex()}",
            f"{p}.digest = {m.digest.hex()}",
            f"{p}.entry = {pack(to_map(entry)).hex()}",
            f"{p}.entry_digest = {entry_digest(entry).hex()}",
            f"{p}.aggregate = {log.aggregate.hex()}",
        ]
    lines.append(f"log.digest = {log_digest(log.entries).hex()}")

    quote = make_quote(V_DEVICE, V_QUOTE_NONCE, log, kp["tm"], V_TS_MS + 200)
    lines += [
        "",
        "# quote by the trust module: signature over QUOTE_DOMAIN || body",
        f"quote.body = {pack(to_map(quote.body)).hex()}",
        f"quote.signature = {quote.signature.hex()}",
        f"quote.bytes = {quote.to_bytes().hex()}",
    ]

    # frame 1: c1.check, trust module -> trust-server (a device chain of one certificate)
    topic1 = topics.link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, V_DEVICE)
    env1 = Envelope(
        type="c1.check",
        message_id=bytes(range(0x10, 0x20)),
        sender=tm_id,
        recipient=ts_id,
        session=V_SESSION,
        reply_to=b"",
        ts_ms=V_TS_MS,
        epoch=7,
        seq=42,
        chain=(cs["tm"].to_bytes(),),
        body=PlatformCheck(cs["platform"].serial, cs["platform"].fingerprint),
    )
    frame1 = sign_frame(env1, topic1, kp["tm"])
    data1 = envelope.encode_envelope(env1, kp["tm"])
    assert frame1 == data1 + kp["tm"].sign(FRAME_DOMAIN, signed_bytes(topic1, data1))
    lines += [
        "",
        "# frame 1: c1.check, dev-0001.tm -> trust-server; opened by the trust-server at ts_ms + 250",
    ]
    lines += [f"frame1.now_ms = {V_TS_MS + 250}", f"frame1.body = {pack(to_map(env1.body)).hex()}"]
    lines += _frame_lines("frame1", topic1, data1, kp["tm"])

    # frame 2: the answer, c1.result, trust-server -> trust module (a server chain: server, platform)
    topic2 = topics.link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, V_DEVICE)
    env2 = Envelope(
        type="c1.result",
        message_id=bytes(range(0x20, 0x30)),
        sender=ts_id,
        recipient=tm_id,
        session=V_SESSION,
        reply_to=env1.message_id,
        ts_ms=V_TS_MS + 100,
        epoch=3,
        seq=9,
        chain=(cs["trust-server"].to_bytes(), cs["platform"].to_bytes()),
        body=PlatformResult(True, "platform certificate 3 is current", cs["platform"].to_bytes()),
    )
    data2 = envelope.encode_envelope(env2, kp["trust-server"])
    lines += [
        "",
        "# frame 2: c1.result, trust-server -> dev-0001.tm; opened by the trust module at ts_ms + 350",
    ]
    lines += [f"frame2.now_ms = {V_TS_MS + 350}", f"frame2.body = {pack(to_map(env2.body)).hex()}"]
    lines += _frame_lines("frame2", topic2, data2, kp["trust-server"])

    # frame 3: c2.evidence, sealed for the trust-server's box key with a fixed nonce
    evidence = Evidence(V_QUOTE_NONCE, quote.to_bytes(), log.entries, "wallet")
    plain = pack(to_map(evidence))
    padded = seal.pad(plain)
    box = nacl.public.Box(kp["tm"].box_private, nacl.public.PublicKey(cs["trust-server"].body.box_key))
    sealed = bytes(box.encrypt(padded, V_BOX_NONCE))
    env3 = Envelope(
        type="c2.evidence",
        message_id=bytes(range(0x30, 0x40)),
        sender=tm_id,
        recipient=ts_id,
        session=V_SESSION,
        reply_to=b"",
        ts_ms=V_TS_MS + 300,
        epoch=7,
        seq=44,
        chain=(cs["tm"].to_bytes(),),
        body=evidence,
    )
    data3 = pack(
        [
            env3.version,
            env3.type,
            env3.message_id,
            env3.sender,
            env3.recipient,
            env3.session,
            env3.reply_to,
            env3.ts_ms,
            env3.epoch,
            env3.seq,
            list(env3.chain),
            sealed,
        ]
    )
    lines += [
        "",
        "# frame 3: c2.evidence, sealed: NaCl Box(tm box secret, trust-server box public), FIXED nonce",
        "# for this vector only (real frames use a random nonce); opened by the trust-server at",
        "# ts_ms + 400, after frame 1. The box holds the body padded: u32be length || body || zeros,",
        f"# to the smallest of {', '.join(map(str, seal.PAD_SIZES))} bytes that fits",
        f"frame3.now_ms = {V_TS_MS + 400}",
        f"frame3.plaintext = {plain.hex()}",
        f"frame3.padded = {padded.hex()}",
        f"frame3.box_nonce = {V_BOX_NONCE.hex()}",
        f"frame3.sealed = {sealed.hex()}",
    ]
    topic3 = topic1
    lines += _frame_lines("frame3", topic3, data3, kp["tm"])

    # a signed record: an order made by a chip
    order = records.sign_record(
        records.Order("ord-0001", V_DEVICE, "wallet", "shop-1", 1250, "EUR", 1, V_TS_MS),
        records.ORDER_DOMAIN,
        kp["chip"],
    )
    lines += [
        "",
        "# signed record: an order signed by the chip key; record hash = BLAKE2b-256(body, person tp-record)",
        f"order.body = {order.data.hex()}",
        f"order.signature = {order.signature.hex()}",
        f"order.bytes = {order.to_bytes().hex()}",
        f"order.hash = {records.record_hash(order.data).hex()}",
    ]
    _self_check(
        cs,
        kp,
        [
            (frame1, topic1, V_TS_MS + 250, "ts"),
            (
                data2 + kp["trust-server"].sign(FRAME_DOMAIN, signed_bytes(topic2, data2)),
                topic2,
                V_TS_MS + 350,
                "tm",
            ),
            (data3 + kp["tm"].sign(FRAME_DOMAIN, signed_bytes(topic3, data3)), topic3, V_TS_MS + 400, "ts"),
        ],
    )
    return Vectors(kp, cs, lines)


def _self_check(
    cs: dict[str, Certificate], kp: dict[str, KeyPair], frames: list[tuple[bytes, str, int, str]]
) -> None:
    """Refuse to publish vectors that our own Verifier does not open."""
    ts_id, tm_id = topics.node_id(Role.TRUST_SERVER), topics.node_id(Role.TRUST_MODULE, V_DEVICE)
    verifiers = {}
    for who, my_id, my_keys in (("ts", ts_id, kp["trust-server"]), ("tm", tm_id, kp["tm"])):
        store = CertStore(cs["root"], cs["update"])
        store.install_platform(cs["platform"])
        verifiers[who] = Verifier(frozenset({my_id}), store, ReplayGuard(V_TS_MS - 60_000), keys=my_keys)
    for frame, topic, now_ms, who in frames:
        verifiers[who].open(frame, topic, now_ms)


def render_vectors() -> str:
    v = build_vectors()
    return "\n".join(
        [
            "Computed by `ops/protocol_doc.py` with the code itself; re-verified independently (PyNaCl, "
            "msgpack, hashlib) by `tests/protocol/test_protocol_doc.py`. Bytes are hex; `*.signed` is the "
            "complete message Ed25519 signs: `FRAME_DOMAIN || u8 version || u16be len(topic) || topic || "
            "envelope`. Certificates, frames and quotes all chain: frame 1 carries `cert.tm.bytes`, frame 2 "
            "`cert.trust-server.bytes` then `cert.platform.bytes`, frame 3 seals an `Evidence` body made of "
            "`quote.bytes` and the two measurement log entries.",
            "",
            "```text",
            *v.lines,
            "```",
        ]
    )


# -- document ------------------------------------------------------------------------------

RENDERERS: dict[str, Callable[[], str]] = {
    "parameters": render_parameters,
    "topics": render_topics,
    "messages": render_messages,
    "records": render_records,
    "errors": render_errors,
    "refusals": render_refusals,
    "vectors": render_vectors,
}


def sections() -> dict[str, str]:
    return {name: RENDERERS[name]() for name in SECTIONS}


def block(name: str, text: str) -> str:
    return f"{start_marker(name)}\n{text}\n{end_marker(name)}"


def render() -> str:
    """Every generated section, in document order, each between its markers."""
    return "\n\n".join(block(name, text) for name, text in sections().items())


def extract(doc: str) -> dict[str, str]:
    """The generated sections as they stand in ``doc`` (name -> text between the markers)."""
    found = {}
    for name in SECTIONS:
        pattern = re.escape(start_marker(name)) + r"\n(.*?)\n" + re.escape(end_marker(name))
        m = re.search(pattern, doc, re.S)
        if m:
            found[name] = m.group(1)
    return found


def update(doc: str, fresh: dict[str, str]) -> str:
    for name, text in fresh.items():
        pattern = re.escape(start_marker(name)) + r"\n.*?" + re.escape(end_marker(name))
        if not re.search(pattern, doc, re.S):
            raise SystemExit(f"{DOC}: no {start_marker(name)} ... {end_marker(name)} markers")
        m = re.search(pattern, doc, re.S)
        assert m is not None
        doc = doc[: m.start()] + block(name, text) + doc[m.end() :]
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.protocol_doc", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated sections of the document")
    mode.add_argument("--check", action="store_true", help="exit 1 if the document's sections are stale")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the document (default {DOC})")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(render())
        return 0
    doc = args.doc.read_text()
    fresh = sections()
    if args.check:
        held = extract(doc)
        stale = [name for name in SECTIONS if held.get(name) != fresh[name]]
        if stale:
            print(
                f"{args.doc}: stale generated sections: {', '.join(stale)}; "
                "run python -m ops.protocol_doc --write"
            )
            return 1
        print(f"{args.doc}: generated sections are current")
        return 0
    new = update(doc, fresh)
    if new != doc:
        args.doc.write_text(new)
        print(f"{args.doc}: generated sections rewritten")
    else:
        print(f"{args.doc}: already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
