"""The topic tree: build/parse round trips, malformed topics, and broker ACLs."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import WrongTopic
from protocol.topics import (
    CHANNEL_EVENTS,
    CHANNEL_METRICS,
    CHANNEL_OPS,
    CHANNEL_STATUS,
    DEVICE_ROLES,
    LINKS,
    NODE_ROLES,
    SERVER_ROLES,
    ParsedTopic,
    Role,
    acl_for,
    channel_topic,
    check_device_id,
    inbound_filters,
    link_for,
    link_topic,
    node_id,
    operator_topic,
    parse_topic,
    role_from_name,
)

from .factory import exactly

DEVICES = ("d1", "d2", "A-b_9", "x" * 64)
CHANNELS = (CHANNEL_EVENTS, CHANNEL_STATUS, CHANNEL_METRICS, CHANNEL_OPS)
SHORTS = [r.short for r in Role] + [CHANNEL_EVENTS, CHANNEL_STATUS, "xx", ""]


def mqtt_match(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching: ``+`` one level, ``#`` the rest (including the parent)."""
    f, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            assert i == len(f) - 1, "# must be last"
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def test_matcher_itself():
    assert mqtt_match("a/+/c", "a/b/c")
    assert not mqtt_match("a/+/c", "a/b/d")
    assert not mqtt_match("a/+", "a/b/c")
    assert mqtt_match("a/#", "a/b/c") and mqtt_match("a/#", "a")
    assert not mqtt_match("a/b", "a/b/c")


def rebuild(p: ParsedTopic) -> str:
    """The topic the builders give for what ``parse_topic`` understood."""
    if p.src is Role.OPERATOR:
        assert p.dst is not None
        return operator_topic(p.dst, p.device)
    if p.dst is None:
        assert p.channel is not None
        return channel_topic(p.src, p.channel, p.device)
    return link_topic(p.src, p.dst, p.device)


def all_built_topics(devices=DEVICES) -> list[str]:
    out = set()
    for link in LINKS:
        on_device = link.src.on_device or link.dst.on_device
        for d in devices if on_device else (None,):
            out.add(link_topic(link.src, link.dst, d))
    for role in Role:
        if role is Role.OPERATOR:
            continue  # the operator publishes on .../ops/{role} only (operator_topic)
        for ch in CHANNELS:
            for d in devices if role.on_device else (None,):
                out.add(channel_topic(role, ch, d))
        if role in NODE_ROLES:
            for d in devices if role.on_device else (None,):
                out.add(operator_topic(role, d))
    return sorted(out)


# -- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("link", LINKS, ids=[f"{link.src.short}->{link.dst.short}" for link in LINKS])
def test_link_round_trip(link):
    on_device = link.src.on_device or link.dst.on_device
    for device in DEVICES if on_device else (None,):
        topic = link_topic(link.src, link.dst, device)
        assert parse_topic(topic) == ParsedTopic(device, link.src, link.dst, None)
        assert link_for(link.src, link.dst) is link
    if on_device:
        with exactly(WrongTopic):
            link_topic(link.src, link.dst)
        assert "/dev/d1/" in link_topic(link.src, link.dst, "d1")
    else:
        assert link_topic(link.src, link.dst).startswith("tp/v1/plat/")


def test_the_patent_links_exist():
    pairs = {(link.src, link.dst) for link in LINKS}
    assert (Role.TRUST_MODULE, Role.TRUST_SERVER) in pairs and (Role.CHIP, Role.PAYMENT_SERVER) in pairs
    assert (Role.CHIP, Role.TRUST_SERVER) not in pairs
    assert len(pairs) == len(LINKS) == 12
    with exactly(WrongTopic):
        link_for(Role.CLIENT, Role.PAYMENT_SERVER)
    with exactly(WrongTopic):
        link_topic(Role.CLIENT, Role.TRUST_SERVER, "d1")


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_channel_and_operator_round_trip(role):
    for ch in CHANNELS if role is not Role.OPERATOR else ():
        for device in ("d1", "d2") if role.on_device else (None,):
            topic = channel_topic(role, ch, device)
            assert parse_topic(topic) == ParsedTopic(device, role, None, ch)
    if role in NODE_ROLES:
        for device in ("d1",) if role.on_device else (None,):
            topic = operator_topic(role, device)
            assert parse_topic(topic) == ParsedTopic(device, Role.OPERATOR, role, CHANNEL_OPS)
    if role.on_device:
        with exactly(WrongTopic):
            channel_topic(role, CHANNEL_STATUS)
        with exactly(WrongTopic):
            operator_topic(role)


def test_unknown_channel():
    with exactly(WrongTopic):
        channel_topic(Role.TRUST_SERVER, "logs")


def test_parse_accepts_only_canonical_topics():
    """Every topic parse_topic accepts is exactly what the builders produce for its parsed meaning."""
    lenient = []
    for scope in (["dev", "d1"], ["plat"]):
        for src, dst in itertools.product(SHORTS, repeat=2):
            topic = "/".join(["tp", "v1", *scope, src, dst])
            try:
                parsed = parse_topic(topic)
            except WrongTopic:
                continue
            try:
                again = rebuild(parsed)
            except WrongTopic as exc:
                lenient.append(f"{topic} (no builder makes it: {exc})")
                continue
            if again != topic:
                lenient.append(f"{topic} (builder gives {again})")
    assert not lenient, "parse_topic accepts non-canonical topics:\n" + "\n".join(lenient)


def test_built_topics_are_distinct_and_parse():
    topics = all_built_topics()
    assert len(topics) == len(set(topics))
    for topic in topics:
        parse_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "tp",
        "tp/v1",
        "tp/v1/",
        "tp/v2/dev/d1/tm/ts",
        "xx/v1/dev/d1/tm/ts",
        "/tp/v1/dev/d1/tm/ts",
        "tp/v1/dev/d1/tm",
        "tp/v1/dev/d1/tm/ts/x",
        "tp/v1/dev/d1/tm/ts/",
        "tp/v1/plat/tm/ts",  # a device link in the platform scope
        "tp/v1/dev/d1/ts/ps",  # the platform link in a device scope
        "tp/v1/dev/d1/tm/tm",
        "tp/v1/dev/d1/chip/ts",
        "tp/v1/dev/d1/client/ps",
        "tp/v1/plat/ts/ts",
        "tp/v1/dev/d1/mon/tm",
        "tp/v1/dev/d1/tm/mon",
        "tp/v1/dev/d1/xx/ts",
        "tp/v1/dev/d1/tm/xx",
        "tp/v1/dev/d1/TM/ts",
        "tp/v1/dev//tm/ts",
        "tp/v1/dev/+/tm/ts",
        "tp/v1/dev/#/tm/ts",
        "tp/v1/dev/d 1/tm/ts",
        "tp/v1/dev/d.1/tm/ts",
        "tp/v1/dev/" + "x" * 65 + "/tm/ts",
        "tp/v1/plat/ps",
        "tp/v1/plat/x/ps/ts",
        "tp/v1/dev/d1/tm/logs",
    ],
)
def test_malformed_topics(topic):
    with exactly(WrongTopic):
        parse_topic(topic)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from([*SHORTS, "tp", "v1", "dev", "plat", "d1", "+", "#", "é"]), max_size=7))
def test_parse_only_raises_wrong_topic(parts):
    topic = "/".join(parts)
    with contextlib.suppress(WrongTopic):
        parse_topic(topic)


@settings(max_examples=200, deadline=None)
@given(topic=st.text(max_size=60))
def test_parse_random_text(topic):
    with contextlib.suppress(WrongTopic):
        parse_topic(topic)


@pytest.mark.parametrize("device", ["", "x" * 65, "a/b", "a+b", "a#", "a b", "a.b", "d1\x00"])
def test_bad_device_ids(device):
    with exactly(WrongTopic):
        check_device_id(device)


def test_node_ids_and_roles():
    assert node_id(Role.TRUST_MODULE, "d1") == "d1.tm"
    assert node_id(Role.TRUST_SERVER) == "trust-server"
    with exactly(WrongTopic):
        node_id(Role.CHIP)
    assert role_from_name("chip") is Role.CHIP
    with exactly(WrongTopic):
        role_from_name("tm")


# -- ACLs --------------------------------------------------------------------------------
UNIVERSE = all_built_topics(("d1", "d2"))


def writable(role: Role, device: str | None) -> list[str]:
    rules = [r.pattern for r in acl_for(role, device) if r.access == "write"]
    return [t for t in UNIVERSE if any(mqtt_match(p, t) for p in rules)]


def readable(role: Role, device: str | None) -> list[str]:
    rules = [r.pattern for r in acl_for(role, device) if r.access == "read"]
    return [t for t in UNIVERSE if any(mqtt_match(p, t) for p in rules)]


@pytest.mark.parametrize("role", DEVICE_ROLES, ids=[r.value for r in DEVICE_ROLES])
def test_device_identity_writes_only_its_own_device_and_direction(role):
    rules = acl_for(role, "d1")
    assert {r.access for r in rules} <= {"read", "write"}
    for rule in rules:
        assert "#" not in rule.pattern
        if rule.access == "write":
            assert "+" not in rule.pattern, rule
    can_write = writable(role, "d1")
    assert can_write
    for topic in can_write:
        p = parse_topic(topic)
        assert p.device == "d1" and p.src is role, topic
    # it can write every link it sends on, and its own channels
    for link in LINKS:
        if link.src is role:
            assert link_topic(link.src, link.dst, "d1") in can_write
    for ch in CHANNELS:
        assert channel_topic(role, ch, "d1") in can_write
    # it reads what is sent to it on its device only
    for topic in readable(role, "d1"):
        p = parse_topic(topic)
        assert p.device == "d1" and p.dst is role, topic
    for link in LINKS:
        if link.dst is role:
            assert link_topic(link.src, link.dst, "d1") in readable(role, "d1")


@pytest.mark.parametrize("role", DEVICE_ROLES, ids=[r.value for r in DEVICE_ROLES])
@pytest.mark.parametrize("device", [None, ""])
def test_device_identity_without_device_is_refused(role, device):
    """A device identity's ACL must never fall back to every device (fail closed)."""
    try:
        rules = acl_for(role, device)
    except WrongTopic:
        return
    wide = [r.pattern for r in rules if "+" in r.pattern or "#" in r.pattern]
    pytest.fail(f"acl_for({role.value}, {device!r}) grants every device: {wide}")


@pytest.mark.parametrize("role", SERVER_ROLES, ids=[r.value for r in SERVER_ROLES])
def test_server_identity_writes_only_as_itself(role):
    can_write = writable(role, None)
    assert can_write
    for topic in can_write:
        assert parse_topic(topic).src is role, topic
    for link in LINKS:
        if link.src is role:
            for d in ("d1", "d2") if link.dst.on_device else (None,):
                assert link_topic(link.src, link.dst, d) in can_write
        if link.dst is role:
            for d in ("d1", "d2") if link.src.on_device else (None,):
                assert link_topic(link.src, link.dst, d) in readable(role, None)
    for topic in readable(role, None):
        assert parse_topic(topic).dst is role, topic


def test_operator_and_monitor():
    for topic in writable(Role.OPERATOR, None):
        assert parse_topic(topic).src is Role.OPERATOR, topic
    assert writable(Role.MONITOR, None) == []
    assert readable(Role.MONITOR, None) == UNIVERSE


@pytest.mark.parametrize("role", NODE_ROLES, ids=[r.value for r in NODE_ROLES])
def test_inbound_filters_cover_exactly_what_is_sent_to_the_node(role):
    device = "d1" if role.on_device else None
    filters = inbound_filters(role, device)
    got = {t for t in UNIVERSE if any(mqtt_match(f, t) for f in filters)}
    want = {
        t
        for t in UNIVERSE
        if parse_topic(t).dst is role and (device is None or parse_topic(t).device == device)
    }
    assert got == want
    # and the broker lets the node read what it subscribes to
    assert got <= set(readable(role, device))
