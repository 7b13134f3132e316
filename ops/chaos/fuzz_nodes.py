"""Fuzz every node's handlers: the four servers and device nodes on the in-memory bus.

A ``NodeWorld`` provisions a deployment with one device in a directory it is
given and runs the trust-server, payment-server, chip and trust module on a
``FakeBroker``, in an event loop of its own (hypothesis calls the check, which
drives the loop until the input has been dealt with). Each input is a frame on
a link into one of them, from that link's legitimate sender, signed with its
key and stamped with its own clock (epoch, sequence), so it reaches the handler:
a valid body, a body with a field dropped, added, retyped or swapped, or a
header field changed; or, from the same sender, a frame altered after signing,
signed with a wrong key, or random bytes.

The property: the node never crashes; a frame it accepted that asks for
something is answered (its response, or a typed refusal); a frame it refused
is counted under its code; nothing altered or forged is accepted; and an honest
payment still goes through afterwards (``NodeWorld.pay``).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from nodes.assemble import identity, node_config
from nodes.bus import FakeBroker, FakeBus
from nodes.chip import Chip
from nodes.client import Client
from nodes.deployment import Deployment
from nodes.logs import NodeLogging
from nodes.payment_server import PaymentServer
from nodes.runtime import Identity, Node, Settings, _next_epoch, now_ms
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from protocol.certs import CertStore
from protocol.codec import Value, pack, unpack
from protocol.envelope import FRAME_DOMAIN, Envelope, Verifier, envelope_array, new_id, peek, signed_bytes
from protocol.errors import Malformed
from protocol.messages import MESSAGE_TYPES, Refusal
from protocol.schema import from_map, to_map
from protocol.seal import seal
from protocol.topics import CRL_TOPIC, Role, link_topic, node_id, operator_topic

from .fuzzing import Target
from .pki import keypair
from .strategies import bodies, body_bytes, values

DEVICE = "dev-0001"
RUNNING = (Role.TRUST_SERVER, Role.PAYMENT_SERVER, Role.CHIP, Role.TRUST_MODULE)
FAST = Settings(request_timeout_s=0.5, request_attempts=3, metrics_interval_s=3600)
STAMP_FIELDS = (7, 8, 9)  # ts_ms, epoch, seq in the envelope array
ANSWER_S = 15.0  # an accepted request is answered within this, or the check fails
CODE = re.compile(r"^[a-z][a-z0-9_.]*$")  # what a typed refusal code looks like
# Commands a legitimate sender may give that rightly stop payments: fuzzed malformed, never valid.
SAFE_BODY: dict[str, Callable[[Any], bool]] = {
    "chip.enable": lambda body: body is None or body.enabled,
    "app.delete": lambda body: body is None or body.app not in ("wallet", "transit"),
}


@dataclass(frozen=True)
class Inbound:
    """One link into a running node and the message types allowed on it."""

    src: Role
    dst: Role
    topic: str
    types: tuple[str, ...]

    @property
    def sender(self) -> str:
        return node_id(self.src, DEVICE) if self.src is not Role.OPERATOR else "operator"

    @property
    def receiver(self) -> str:
        return node_id(self.dst, DEVICE)


def inbound_links() -> list[Inbound]:
    types: dict[tuple[Role, Role], list[str]] = {}
    for name, spec in sorted(MESSAGE_TYPES.items()):
        for src, dst in spec.links:
            if dst in RUNNING:
                types.setdefault((src, dst), []).append(name)
    out = []
    for (src, dst), names in sorted(types.items()):
        device = DEVICE if src.on_device or dst.on_device else None
        topic = operator_topic(dst, device) if src is Role.OPERATOR else link_topic(src, dst, device)
        out.append(Inbound(src, dst, topic, tuple(names)))
    # the operator's retained revocation list reaches every node; never one the root signed here
    out += [Inbound(Role.OPERATOR, dst, CRL_TOPIC, ("crl",)) for dst in RUNNING]
    return out


@dataclass(frozen=True)
class NodeCase:
    link: Inbound
    type_name: str
    kind: str  # valid | resigned | tampered | forged | random
    body: Any = None
    encoded: bytes = b""  # resigned: the body bytes sent
    edit: tuple[int, Value] | None = None  # resigned: an envelope field replaced
    mutation: tuple[str, int, bytes] = ("", 0, b"")  # tampered: what is done to the signed frame, where
    reply_to: bytes = b""


@st.composite
def node_cases(draw: st.DrawFn, links: list[Inbound]) -> NodeCase:
    link = draw(st.sampled_from(links))
    name = draw(st.sampled_from(link.types))
    kind = draw(st.sampled_from(["valid", "resigned", "tampered", "forged", "random"]))
    body = draw(bodies(name))
    if kind == "valid" and name in SAFE_BODY:
        assume(SAFE_BODY[name](body))
    reply_to = draw(st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)))
    case = NodeCase(link, name, kind, body, reply_to=reply_to)
    if kind == "resigned":
        edit = None
        if draw(st.booleans()):
            edit = (draw(st.integers(0, 10)), draw(values))
            # A sender's own key may move its clock (epoch, sequence) far ahead, and its later
            # frames are then replays to every receiver until they restart: the sender's own
            # doing, like a chip.enable(False). Retyped stamps are fuzzed; moved ones are not.
            assume(
                not (edit[0] in STAMP_FIELDS and isinstance(edit[1], int) and not isinstance(edit[1], bool))
            )
        encoded = draw(body_bytes(MESSAGE_TYPES[name].body))
        if name in SAFE_BODY:  # a well-formed command among the malformed ones: the same rule
            assume(SAFE_BODY[name](_decoded(name, encoded)))
        return replace(case, encoded=encoded, edit=edit)
    if kind in ("tampered", "random", "forged"):
        how = draw(st.sampled_from(["flip", "cut", "extend", "edit"]))
        return replace(
            case, mutation=(how, draw(st.integers(0, 2**16)), draw(st.binary(min_size=1, max_size=600)))
        )
    return case


def _decoded(type_name: str, encoded: bytes) -> Any:
    """The body ``encoded`` stands for if it is a well-formed one, else None."""
    try:
        return from_map(MESSAGE_TYPES[type_name].body, unpack(encoded))
    except Malformed:
        return None


def _mutate(frame: bytes, how: str, at: int, data: bytes) -> bytes:
    at %= len(frame)
    if how == "flip":
        out = bytearray(frame)
        out[at] ^= 1 << (data[0] % 8)
        return bytes(out)
    if how == "cut":
        return frame[:at]
    if how == "extend":
        return frame + data[:32]
    return frame[:at] + data[:8] + frame[at + len(data[:8]) :]


@dataclass
class _Sender:
    """A legitimate sender's identity and clock; a running node stamps with its own."""

    ident: Identity
    node: Node | None = None
    epoch: int = 0
    seq: int = 0

    def envelope(self, type_name: str, body: Any, recipient: str, reply_to: bytes) -> Envelope:
        if self.node is not None:
            return self.node._envelope(type_name, body, recipient, b"fuzz", reply_to, new_id())
        self.seq += 1
        return Envelope(
            type_name,
            new_id(),
            self.ident.node_id,
            recipient,
            b"fuzz",
            reply_to,
            now_ms(),
            self.epoch,
            self.seq,
            self.ident.chain,
            body,
        )


@dataclass
class _Waiting:
    message_id: bytes
    responder: str
    answer: asyncio.Event = field(default_factory=asyncio.Event)
    frames: list[tuple[str, bytes]] = field(default_factory=list)


class NodeWorld:
    """The four long-running nodes on one in-memory broker, driven from synchronous checks."""

    def __init__(self, tmp: Path, settings: Settings = FAST) -> None:
        from ops.provision import provision  # provisioning is ops' business; only the world needs it

        provision(tmp / "deploy", 1, broker_port=1, backend="amqtt")
        self.dep = Deployment(tmp / "deploy")
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.broker = FakeBroker()
        self._waiting: _Waiting | None = None  # the answer the current input is waiting for
        self.broker.tap = self._tap
        self.links = inbound_links()
        self.nodes: dict[str, Node] = {}
        for role, cls in zip(RUNNING, (TrustServer, PaymentServer, Chip, TrustModule), strict=True):
            nid = node_id(role, DEVICE)
            self.nodes[nid] = self._make(cls, nid)
        self.tasks = [self.loop.create_task(n.run(), name=f"fuzz:{n.id}") for n in self.nodes.values()]
        self.loop.run_until_complete(self._started())
        self.senders = {link.sender: self._sender(link.sender) for link in self.links}
        # wrong signers: a key certified for nothing, and every other legitimate sender
        self.impostors = [None, *(s.ident for s in self.senders.values())]
        self.attacker = keypair("attacker")
        self.checked: Counter[str] = Counter()  # inputs per kind and outcome, for the report

    def _make(self, cls: Any, nid: str, **extra: Any) -> Any:
        logging = NodeLogging(nid, self.dep.log_path(nid), console=None)
        bus = FakeBus(self.broker, nid)
        node = cls(
            node_config(self.dep, nid, self.settings), bus, logging.logger, deployment=self.dep, **extra
        )
        bus.will = node.will
        return node

    async def _started(self) -> None:
        async with asyncio.timeout(30):
            for node in self.nodes.values():
                await node.connected.wait()
            tm = self.nodes[node_id(Role.TRUST_MODULE, DEVICE)]
            assert isinstance(tm, TrustModule)
            await tm.started.wait()

    def _sender(self, nid: str) -> _Sender:
        running = self.nodes.get(nid)
        if running is not None:
            return _Sender(running.config.identity, running)
        # not running here (client, operator): an epoch of its own, persisted, as a node would take
        return _Sender(identity(self.dep, nid), epoch=_next_epoch(self.dep.state_dir(nid)))

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        try:
            self.loop.run_until_complete(asyncio.wait_for(asyncio.gather(*self.tasks), 30))
        finally:
            self.loop.close()

    def targets(self) -> tuple[Target, ...]:
        return (Target("nodes.handlers", node_cases(self.links), self.check, "every link into every node"),)

    # -- one input ------------------------------------------------------------------------
    def check(self, case: NodeCase) -> None:
        self.loop.run_until_complete(self._deliver(case))

    def _frame(self, case: NodeCase) -> tuple[bytes, bytes]:
        """The frame for ``case`` and its message id."""
        sender = self.senders[case.link.sender]
        receiver = self.nodes[case.link.receiver].config.identity
        env = sender.envelope(case.type_name, case.body, case.link.receiver, case.reply_to)
        spec = MESSAGE_TYPES[case.type_name]
        box = receiver.cert.body.box_key
        keys = sender.ident.keys
        if case.kind == "forged":  # the attacker under the sender's name, or another sender as itself
            others = [i for i in self.impostors if i is None or i.node_id != sender.ident.node_id]
            impostor = others[case.mutation[1] % len(others)]
            keys = self.attacker if impostor is None else impostor.keys
            if impostor is not None:
                env = replace(env, sender=impostor.node_id, chain=impostor.chain)
        if case.kind == "resigned":
            encoded = seal(case.encoded, keys, box) if spec.sealed else case.encoded
            fields: list[Value] = envelope_array(env, encoded)
            if case.edit is not None:
                fields[case.edit[0]] = case.edit[1]
            try:
                data = pack(fields)
            except Malformed:
                data = pack(envelope_array(env, encoded))  # nested past what pack encodes: send it unedited
        else:
            body = pack(to_map(case.body))
            data = pack(envelope_array(env, seal(body, keys, box) if spec.sealed else body))
        frame = signed = data + keys.sign(FRAME_DOMAIN, signed_bytes(case.link.topic, data))
        if case.kind == "tampered":
            frame = _mutate(signed, *case.mutation)
            if frame == signed:
                frame = signed[:-1]  # an edit that changed nothing: cut the signature instead
        elif case.kind == "random":
            frame = case.mutation[2]
        return frame, env.message_id

    def _tap(self, topic: str, payload: bytes) -> list[bytes]:
        waiting = self._waiting
        if waiting is not None:
            header = peek(payload)
            if (
                header is not None
                and header.reply_to == waiting.message_id
                and header.sender == waiting.responder
            ):
                waiting.frames.append((topic, payload))
                waiting.answer.set()
        return [payload]

    async def _deliver(self, case: NodeCase) -> None:
        node = self.nodes[case.link.receiver]
        before = Counter(node.counters)
        frame, message_id = self._frame(case)
        waiting = self._waiting = _Waiting(message_id, node.id)
        try:
            self.broker.publish(case.link.topic, frame, retain=False)
            await self.broker.drained()
            accepted = node.counters["accepted"] > before["accepted"]
            channel = "crl." if case.link.topic == CRL_TOPIC else ""
            self.checked[f"{channel}{case.kind}.{'accepted' if accepted else 'refused'}"] += 1
            if accepted:
                self.checked[f"accepted.{case.type_name}"] += 1
            if case.kind in ("tampered", "forged", "random"):
                assert not accepted, f"{node.id} accepted a {case.kind} frame"
            if case.kind == "valid" and case.link.topic != CRL_TOPIC:  # a CRL must be the root's too
                assert accepted, f"{node.id} refused a valid {case.type_name} from {case.link.sender}"
            if not accepted:
                counted = [k for k in node.counters if k.startswith("rejected.") or k == "duplicate"]
                assert any(node.counters[k] > before[k] for k in counted), (
                    f"{node.id} refused without counting"
                )
            elif not case.reply_to and case.type_name != "error":
                try:
                    async with asyncio.timeout(ANSWER_S):
                        await waiting.answer.wait()
                except TimeoutError:
                    raise AssertionError(f"{node.id} never answered a {case.type_name}") from None
                self._check_answer(case, *waiting.frames[0])
        finally:
            self._waiting = None
        self.assert_alive()

    def _check_answer(self, case: NodeCase, topic: str, frame: bytes) -> None:
        """The answer verifies for the sender, and a refusal names a typed code."""
        sender = self.senders[case.link.sender].ident
        store = CertStore(self.dep.load_public("root"), self.dep.load_public("update"))
        store.install_platform(self.dep.load_public("platform"))
        answer = Verifier(frozenset({sender.node_id}), store, None, keys=sender.keys).open(
            frame, topic, now_ms()
        )
        if answer.envelope.type in ("error", "refusal"):
            refusal: Refusal = answer.envelope.body
            assert CODE.match(refusal.code), f"refusal code {refusal.code!r} is not a typed code"
            self.checked[f"refused.{refusal.code}"] += 1

    def assert_alive(self) -> None:
        for node in self.nodes.values():
            crashes = node.counters["handler_crash"] + node.counters["task_error.internal"]
            assert crashes == 0, f"{node.id} crashed in a handler: {dict(node.counters)}"
        for task in self.tasks:
            assert not task.done(), (
                f"{task.get_name()} stopped: {task.exception() if not task.cancelled() else ''}"
            )

    # -- afterwards ---------------------------------------------------------------------------
    def pay(self, amount: str = "1.00", payee: str = "shop-1") -> tuple[int, dict[str, Any]]:
        """An honest payment from the device's client: exit code and its last JSON line."""
        out = io.StringIO()
        client = self._make(
            Client, node_id(Role.CLIENT, DEVICE), command=["pay", amount, payee], out=out, as_json=True
        )
        self.loop.run_until_complete(asyncio.wait_for(client.run(), 30))
        lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
        return client.exit_code, lines[-1] if lines else {}

    def balances(self) -> dict[str, int]:
        ps = self.nodes["payment-server"]
        assert isinstance(ps, PaymentServer)
        snapshot = self.loop.run_until_complete(ps.ledger.snapshot())
        return {a.account: a.balance for a in snapshot.accounts}
