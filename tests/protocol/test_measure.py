"""Measurements (claim 2), the measurement log and quotes."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import measure as m
from protocol.errors import BadSignature, MeasurementMismatch
from protocol.measure import (
    ZERO,
    LogEntry,
    MeasurementLog,
    Quote,
    check_quote,
    extend,
    install_image,
    log_digest,
    make_quote,
    measure,
    replay_log,
)

from .factory import NOW_MS, exactly, keypair

TM_KEYS = keypair("d1.tm")
NONCE = b"n" * 16
PARTS = ("code", "static", "dynamic")
BASE = {"code": b"code-v1", "static": b"static-v1", "dynamic": b"dyn-v1"}


def make(**parts: bytes) -> m.Measurement:
    p = {**BASE, **parts}
    return measure("app", "wallet", "1.0", p["code"], p["static"], p["dynamic"])


@pytest.mark.parametrize("part", PARTS)
@settings(max_examples=40, deadline=None)
@given(new=st.binary(max_size=64))
def test_one_part_changes_exactly_its_digest(part, new):
    if new == BASE[part]:
        return
    a, b = make(), make(**{part: new})
    for other in PARTS:
        assert (getattr(a, other) != getattr(b, other)) == (other == part), other
    assert a.digest != b.digest


def test_part_digests_are_domain_separated():
    same = measure("client", "client", "1", b"x", b"x", b"x")
    assert len({same.code, same.static, same.dynamic}) == 3
    swapped = measure("client", "client", "1", b"b", b"a", b"c")
    assert swapped.digest != measure("client", "client", "1", b"a", b"b", b"c").digest


def test_identity_fields_change_the_combined_digest():
    base = make()
    for change in ({"kind": "client"}, {"name": "other"}, {"version": "1.1"}):
        assert dataclasses.replace(base, **change).digest != base.digest


def test_digest_sizes_and_determinism():
    a, b = make(), make()
    assert a == b and a.digest == b.digest
    assert all(len(getattr(a, p)) == m.DIGEST_SIZE for p in PARTS)
    assert len(a.digest) == m.DIGEST_SIZE
    if hasattr(m, "dynamic_digest"):
        assert m.dynamic_digest(BASE["dynamic"]) == a.dynamic


def test_component_names():
    assert measure("client", "client", "1", b"", b"", b"").component == "client"
    assert make().component == "app:wallet"


# -- the log -----------------------------------------------------------------------------
def entries(n: int = 3) -> list[LogEntry]:
    return [LogEntry(make(dynamic=f"d{i}".encode()), i % 2 == 0) for i in range(n)]


def test_log_aggregate_replays():
    log = MeasurementLog()
    assert log.aggregate == ZERO and replay_log(()) == ZERO
    running = ZERO
    for e in entries(4):
        log.append(e)
        running = extend(running, m.entry_digest(e))
        assert log.aggregate == running == replay_log(log.entries)
    assert len(log.entries) == 4


def test_aggregate_depends_on_order_and_every_field():
    es = entries(3)
    base = replay_log(es)
    assert replay_log([es[1], es[0], es[2]]) != base
    assert replay_log(es[:2]) != base
    assert replay_log([*es, es[0]]) != base
    flipped = dataclasses.replace(es[1], dynamic_as_stored=not es[1].dynamic_as_stored)
    assert replay_log([es[0], flipped, es[2]]) != base
    assert log_digest([es[0], flipped, es[2]]) != log_digest(es)


def test_entries_are_read_only_snapshot():
    log = MeasurementLog()
    log.append(entries(1)[0])
    snap = log.entries
    log.append(entries(2)[1])
    assert len(snap) == 1


# -- quotes ------------------------------------------------------------------------------
def quoted(n: int = 3) -> tuple[Quote, tuple[LogEntry, ...]]:
    log = MeasurementLog()
    for e in entries(n):
        log.append(e)
    return make_quote("d1", NONCE, log, TM_KEYS, NOW_MS), log.entries


def test_quote_verifies_and_round_trips():
    q, es = quoted()
    check_quote(q, es, TM_KEYS.sign_public, NONCE)
    q2 = Quote.from_bytes(q.to_bytes())
    assert q2 == q
    check_quote(q2, es, TM_KEYS.sign_public, NONCE)


def test_quote_wrong_nonce():
    q, es = quoted()
    with exactly(MeasurementMismatch):
        check_quote(q, es, TM_KEYS.sign_public, b"m" * 16)


@pytest.mark.parametrize("how", ["drop", "reorder", "append", "flag", "dynamic", "empty"])
def test_quote_altered_log(how):
    q, es = quoted()
    es = list(es)
    if how == "drop":
        es.pop()
    elif how == "reorder":
        es.reverse()
    elif how == "append":
        es.append(es[0])
    elif how == "flag":
        es[0] = dataclasses.replace(es[0], dynamic_as_stored=not es[0].dynamic_as_stored)
    elif how == "dynamic":
        es[1] = LogEntry(make(dynamic=b"tampered"), es[1].dynamic_as_stored)
    else:
        es = []
    with exactly(MeasurementMismatch):
        check_quote(q, tuple(es), TM_KEYS.sign_public, NONCE)


def test_quote_log_extended_after_quoting():
    log = MeasurementLog()
    for e in entries(2):
        log.append(e)
    q = make_quote("d1", NONCE, log, TM_KEYS, NOW_MS)
    log.append(entries(3)[2])
    with exactly(MeasurementMismatch):
        check_quote(q, log.entries, TM_KEYS.sign_public, NONCE)


def test_quote_wrong_key():
    q, es = quoted()
    with exactly(BadSignature):
        check_quote(q, es, keypair("d2.tm").sign_public, NONCE)
    other = make_quote("d1", NONCE, _log(es), keypair("attacker"), NOW_MS)
    with exactly(BadSignature):
        check_quote(other, es, TM_KEYS.sign_public, NONCE)


@pytest.mark.parametrize(
    "change",
    [{"nonce": b"m" * 16}, {"aggregate": ZERO}, {"device": "d2"}, {"at_ms": 1}, {"log_digest": ZERO}],
)
def test_quote_body_altered_after_signing(change):
    q, es = quoted()
    forged = dataclasses.replace(q, body=dataclasses.replace(q.body, **change))
    with exactly(BadSignature):
        check_quote(forged, es, TM_KEYS.sign_public, forged.body.nonce)


def test_quote_signature_checked_before_nonce():
    q, es = quoted()
    forged = dataclasses.replace(q, signature=bytes(64))
    with exactly(BadSignature):
        check_quote(forged, es, TM_KEYS.sign_public, b"other")


def _log(es) -> MeasurementLog:
    log = MeasurementLog()
    for e in es:
        log.append(e)
    return log


def test_install_image_is_sorted_length_prefixed_paths_and_contents() -> None:
    image = install_image({"nodes/x.py": b"X = 1\n", "a.py": b""})
    assert image == (
        b"trustpay-install-v1\x00"
        + (4).to_bytes(8, "big") + b"a.py" + (0).to_bytes(8, "big")
        + (10).to_bytes(8, "big") + b"nodes/x.py" + (6).to_bytes(8, "big") + b"X = 1\n"
    )  # fmt: skip
    assert install_image({"nodes/x.py": b"X = 1\n", "a.py": b""}) == install_image(
        {"a.py": b"", "nodes/x.py": b"X = 1\n"}
    )  # the order the files were read in does not matter
