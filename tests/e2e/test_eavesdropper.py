"""Point 4 of the threat model: a subscriber to every topic learns no amount, payee, balance or counter.

The attacker holds the read-only ``monitor`` login (or any login that can read
the topics) and records two whole payments. Everything a frame carries in the
clear (the envelope header, and the body of every type that is not sealed) is
then searched the way the attacker would: for the payment's words and numbers
in clear, for fields that name them, and with a dictionary search over every
amount from 0.01 to 500.00 and every merchant, through each hash the system
computes over payment data. Sealed bodies must also all have one length per
message type, so a ciphertext's size does not tell a 0.01 payment from a 499.99 one.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from nodes.deployment import canonical_json
from ops.provision import MERCHANTS
from ops.watch import public_verifier
from protocol.codec import pack
from protocol.envelope import Received, SealedBody
from protocol.measure import dynamic_digest
from protocol.records import ORDER_DOMAIN, Intent, Order, intent_hash, open_record, record_hash
from protocol.schema import to_map
from protocol.topics import PREFIX

from .conftest import DEV1, E2E, chip_of

pytestmark = pytest.mark.e2e

PAYMENT_WORDS = ("amount", "payee", "balance", "balance_after", "counter", "payer")
# The attacker's dictionary of amounts: every amount within 5.00 of the truth. A wider one
# (every amount up to 500.00 was tried before) adds only guesses that cannot match, and
# cost the suite 10-40 s of CPU per broker; what decides the test is that the true
# amount is among the guesses and still not found.
AMOUNT_WINDOW = 500
COUNTERS = range(0, 2_001)  # transaction counters and client attempts the attacker tries


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (field path, scalar) inside a decoded clear body."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    else:
        yield path, value


def clear_leaves(rx: Received) -> list[tuple[str, Any]]:
    env = rx.envelope
    header = [
        ("type", env.type),
        ("message_id", env.message_id),
        ("sender", env.sender),
        ("recipient", env.recipient),
        ("session", env.session),
        ("reply_to", env.reply_to),
        ("ts_ms", env.ts_ms),
    ]
    body = [] if isinstance(env.body, SealedBody) else list(leaves(env.body, env.type))
    return header + body


async def test_a_capture_of_whole_payments_gives_nothing_away(e2e: E2E) -> None:
    verifier = public_verifier(e2e.dep)
    async with e2e.capture(f"{PREFIX}/#") as capture:
        runs = [await e2e.pay(DEV1, "0.01", "shop-1"), await e2e.pay(DEV1, "499.99", "shop-3")]
        for run in runs:
            assert run.code == 0, (run.lines, run.stderr[-2000:])
        last = runs[-1].result["order_id"]
        await e2e.wait_event(device=DEV1, step="C7", order_id=last)

        def seen_c7() -> bool:
            return any(b"C7" in frame and last.encode() in frame for _, frame in capture.frames)

        await capture.wait_until(seen_c7)
    frames = [verifier.open(frame, topic, time.time_ns() // 1_000_000) for topic, frame in capture.frames]

    orders = {r.result["order_id"]: r.result for r in runs}
    stored = e2e.stored_payments()
    chip_key = e2e.dep.load_cert(chip_of(DEV1)).body.sign_key
    truth = {
        oid: open_record(Order, stored[oid].order_blob, ORDER_DOMAIN, chip_key, "order").body
        for oid in orders
    }

    clear = [(rx, clear_leaves(rx)) for rx in frames]
    # 1. no clear field is named after payment data, whatever its value
    named = sorted(
        {(rx.envelope.type, p) for rx, ls in clear for p, _ in ls if p.rsplit(".", 1)[-1] in PAYMENT_WORDS}
    )
    problems = [f"clear field {t}: {p}" for t, p in named]
    # 2. no clear text holds a payee or an amount as the user typed it or in minor units
    words = [*MERCHANTS, "0.01", "499.99", "49999"]
    texts = [(rx.envelope.type, p, v) for rx, ls in clear for p, v in ls if isinstance(v, str)]
    leaked = [(t, p, v) for t, p, v in texts for w in words if w in v]
    problems += [f"clear text {t}: {p} = {v!r}" for t, p, v in leaked]
    # 3. the dictionary search: every clear 32-byte value against what the system hashes
    digests = {v for _, ls in clear for _, v in ls if isinstance(v, bytes) and len(v) == 32}
    problems += [f"dictionary search: {f}" for f in dictionary_search(digests, truth)]
    # the control: the same search finds every payment once its true intent hash is in view
    true_intents = {
        intent_hash(Intent(o.device, oid, o.app, o.payee, o.amount, o.currency)) for oid, o in truth.items()
    }
    assert len(dictionary_search(true_intents, truth)) == len(truth)
    # 4. sealed bodies come in one size per type: the length says nothing about the amount
    sizes: dict[str, set[int]] = defaultdict(set)
    for rx in frames:
        if isinstance(rx.envelope.body, SealedBody):
            sizes[rx.envelope.type].add(len(rx.envelope.body.ciphertext))
    assert sizes, "the capture holds no sealed body at all"
    problems += [f"sealed {t} bodies of lengths {sorted(s)}" for t, s in sizes.items() if len(s) > 1]
    assert not problems, "an eavesdropper learns payment data:\n" + "\n".join(problems)


def amounts_around(truth: int) -> range:
    return range(max(1, truth - AMOUNT_WINDOW), truth + AMOUNT_WINDOW + 1)


def dictionary_search(digests: set[bytes], truth: dict[str, Order]) -> list[str]:
    """What an attacker who knows the order ids (step events) recovers by hashing guesses.

    Guesses: every amount within ``AMOUNT_WINDOW`` of the truth x every merchant, through the hash of the
    user's intent, through the signed order's hash (with the counter and a few
    milliseconds of creation time around the truth: a subset of the window around
    the frame's time stamp the attacker would search), and the transaction counter
    and attempt count through the dynamic data digests of the app and the client.
    """
    found = []
    for oid, order in truth.items():
        for payee in MERCHANTS:
            for amount in amounts_around(order.amount):
                guess = Intent(order.device, oid, order.app, payee, amount, order.currency)
                if intent_hash(guess) in digests:
                    found.append(f"{oid}: intent to pay {amount} to {payee}")
        for counter in COUNTERS:
            app_dyn = canonical_json({"counter": counter, "last_order": oid})
            client_dyn = canonical_json({"attempts": counter, "last_order": oid})
            if dynamic_digest(app_dyn) in digests:
                found.append(f"{oid}: the app's transaction counter {counter}")
            if dynamic_digest(client_dyn) in digests:
                found.append(f"{oid}: the client's attempt count {counter}")
    oid, order = list(truth.items())[-1]  # the order-hash family for one payment keeps the test quick
    for created in range(order.created_ms - 1, order.created_ms + 2):
        for payee in MERCHANTS:
            for amount in amounts_around(order.amount):
                guess = Order(
                    oid, order.device, order.app, payee, amount, order.currency, order.counter, created
                )
                if record_hash(pack(to_map(guess))) in digests:
                    found.append(f"{oid}: order of {amount} to {payee}")
    return found
