"""The whole MQTT topic tree, in one place.

Every topic names its scope, its sending role and its receiving end::

    tp/v1/dev/{device}/{src}/{dst}     links on or from one device
    tp/v1/plat/{src}/{dst}             the platform's internal link

``dst`` is a role short name for a link, or one of the channels ``ev`` (signed
step events), ``status`` (retained signed status), ``metrics`` (signed counters,
every few seconds) and ``ops`` (replies to the operator). A broker keeps one
retained message per topic, so each replica of a server keeps its status (and
its last will) on a topic of its own: replica 1, like a lone server, on
``tp/v1/plat/{short}/status``, replica ``k`` on ``tp/v1/plat/{short}/status/{k}``
(``status_topic``). The operator writes
to ``.../ops/{role}``, and publishes the root-signed revocation list, retained,
on ``tp/v1/plat/ops/crl``, which every login may read. Because the device id and
the sending role are in the topic, a broker ACL can confine each identity to
its own device and its own direction, and a receiver can check that the signer
of a frame is who the topic says sent it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from .errors import WrongTopic

PREFIX = "tp/v1"


class Role(StrEnum):
    TRUST_MODULE = "trust-module"
    CHIP = "chip"
    CLIENT = "client"
    TRUST_SERVER = "trust-server"
    PAYMENT_SERVER = "payment-server"
    OPERATOR = "operator"
    MONITOR = "monitor"

    @property
    def short(self) -> str:
        return _SHORT[self]

    @property
    def on_device(self) -> bool:
        return self in DEVICE_ROLES


_SHORT = {
    Role.TRUST_MODULE: "tm",
    Role.CHIP: "chip",
    Role.CLIENT: "client",
    Role.TRUST_SERVER: "ts",
    Role.PAYMENT_SERVER: "ps",
    Role.OPERATOR: "ops",
    Role.MONITOR: "mon",
}
_BY_SHORT = {v: k for k, v in _SHORT.items()}

DEVICE_ROLES = (Role.TRUST_MODULE, Role.CHIP, Role.CLIENT)
SERVER_ROLES = (Role.TRUST_SERVER, Role.PAYMENT_SERVER)
NODE_ROLES = DEVICE_ROLES + SERVER_ROLES

CHANNEL_EVENTS = "ev"
CHANNEL_STATUS = "status"
CHANNEL_OPS = "ops"
CHANNEL_METRICS = "metrics"
CHANNEL_CRL = "crl"
# what each node publishes on under its own name (the CRL is the operator's alone)
NODE_CHANNELS = (CHANNEL_EVENTS, CHANNEL_STATUS, CHANNEL_METRICS, CHANNEL_OPS)
CRL_TOPIC = f"{PREFIX}/plat/{CHANNEL_OPS}/{CHANNEL_CRL}"  # the operator's only broadcast
# every node's status: the devices', the servers' (replica 1) and their other replicas'
STATUS_FILTERS = (
    f"{PREFIX}/plat/+/{CHANNEL_STATUS}",
    f"{PREFIX}/plat/+/{CHANNEL_STATUS}/+",
    f"{PREFIX}/dev/+/+/{CHANNEL_STATUS}",
)


@dataclass(frozen=True)
class Link:
    """One direction of one link of the patent, with its purpose."""

    src: Role
    dst: Role
    name: str
    wireless: bool


LINKS: tuple[Link, ...] = (
    # claim 1: the two long-range wireless links
    Link(Role.TRUST_MODULE, Role.TRUST_SERVER, "trust module -> platform trust server", True),
    Link(Role.TRUST_SERVER, Role.TRUST_MODULE, "platform trust server -> trust module", True),
    Link(Role.CHIP, Role.PAYMENT_SERVER, "payment application -> application server", True),
    Link(Role.PAYMENT_SERVER, Role.CHIP, "application server -> payment application", True),
    # local links inside a device
    Link(Role.TRUST_MODULE, Role.CHIP, "trust module -> chip", False),
    Link(Role.CHIP, Role.TRUST_MODULE, "chip -> trust module", False),
    Link(Role.TRUST_MODULE, Role.CLIENT, "trust module -> client", False),
    Link(Role.CLIENT, Role.TRUST_MODULE, "client -> trust module", False),
    Link(Role.CLIENT, Role.CHIP, "client -> chip", False),
    Link(Role.CHIP, Role.CLIENT, "chip -> client", False),
    # the platform's internal link
    Link(Role.TRUST_SERVER, Role.PAYMENT_SERVER, "trust server -> payment server", False),
    Link(Role.PAYMENT_SERVER, Role.TRUST_SERVER, "payment server -> trust server", False),
)

_LINK_BY_PAIR = {(link.src, link.dst): link for link in LINKS}


def link_for(src: Role, dst: Role) -> Link:
    try:
        return _LINK_BY_PAIR[(src, dst)]
    except KeyError:
        raise WrongTopic(f"there is no link from {src.value} to {dst.value}") from None


def _scope(role: Role, device: str | None) -> str:
    if role.on_device or (role is Role.OPERATOR and device):
        if not device:
            raise WrongTopic(f"a {role.value} topic needs a device id")
        return f"{PREFIX}/dev/{device}"
    return f"{PREFIX}/plat"


def link_topic(src: Role, dst: Role, device: str | None = None) -> str:
    """The topic that carries frames from ``src`` to ``dst``.

    A link between a device and the platform lives in the device's scope, so
    ``device`` is needed whenever either end is on a device.
    """
    link_for(src, dst)
    on_device = src.on_device or dst.on_device
    if on_device:
        if not device:
            raise WrongTopic("a device link needs a device id")
        return f"{PREFIX}/dev/{device}/{src.short}/{dst.short}"
    return f"{PREFIX}/plat/{src.short}/{dst.short}"


def channel_topic(role: Role, channel: str, device: str | None = None) -> str:
    """Events, status, metrics or operator replies published by ``role``."""
    if channel not in NODE_CHANNELS:
        raise WrongTopic(f"unknown channel {channel!r}")
    return f"{_scope(role, device)}/{role.short}/{channel}"


def status_topic(role: Role, device: str | None = None, replica: int = 1) -> str:
    """Where one node keeps its retained, signed status, and the broker its last will.

    Replica ``k`` > 1 of a server has a topic of its own, so that its status never
    overwrites another replica's and its last will never says the role is gone.
    """
    base = channel_topic(role, CHANNEL_STATUS, device)
    if replica == 1:
        return base
    node_id(role, device, replica)  # only servers have replicas, numbered from 1
    if replica > MAX_REPLICA:
        raise WrongTopic(f"replica numbers end at {MAX_REPLICA}, not {replica}")
    return f"{base}/{replica}"


def node_status_topic(nid: str) -> str:
    """:func:`status_topic` of the node called ``nid`` (``trust-server.2``, ``dev-1.tm``)."""
    replica = server_replica(nid)
    if replica is not None:
        return status_topic(replica[0], None, replica[1])
    device, _, short = nid.rpartition(".")
    role = _BY_SHORT.get(short)
    if role is None or not role.on_device:
        raise WrongTopic(f"{nid!r} is not a node id")
    return status_topic(role, device)


def operator_topic(role: Role, device: str | None = None) -> str:
    """Where the operator (health checks, releases) writes to a node."""
    return f"{_scope(role, device)}/{CHANNEL_OPS}/{role.short}"


def check_device_id(device: str) -> str:
    if not device or len(device) > 64 or not all(c.isalnum() or c in "-_" for c in device):
        raise WrongTopic(f"device id {device!r} must be 1-64 letters, digits, '-' or '_'")
    return device


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic says about who sent a frame and who should get it."""

    device: str | None
    src: Role
    dst: Role | None  # None for a channel
    channel: str | None  # set for ev / status / metrics / ops
    replica: int = 1  # a server's status topic: whose it is (the signer must be that replica)


def parse_topic(topic: str) -> ParsedTopic:
    parts = topic.split("/")
    if parts[:2] != PREFIX.split("/"):
        raise WrongTopic(f"{topic!r} is not a trustpay topic")
    rest = parts[2:]
    device: str | None
    if len(rest) == 4 and rest[0] == "dev":
        device, src_s, dst_s = check_device_id(rest[1]), rest[2], rest[3]
    elif len(rest) == 3 and rest[0] == "plat":
        device, src_s, dst_s = None, rest[1], rest[2]
    elif len(rest) == 4 and rest[0] == "plat" and rest[2] == CHANNEL_STATUS:
        return _replica_status(topic, rest[1], rest[3])
    else:
        raise WrongTopic(f"{topic!r} has the wrong shape")
    src = _BY_SHORT.get(src_s)
    if src is None:
        raise WrongTopic(f"{topic!r}: unknown sender role {src_s!r}")
    if dst_s in NODE_CHANNELS and src is not Role.OPERATOR:
        if src.on_device != (device is not None):
            raise WrongTopic(f"{topic!r}: a {src.value} channel is not in this scope")
        return ParsedTopic(device, src, None, dst_s)
    if src is Role.OPERATOR and dst_s == CHANNEL_CRL and device is None:
        return ParsedTopic(None, src, None, CHANNEL_CRL)
    dst = _BY_SHORT.get(dst_s)
    if dst is None:
        raise WrongTopic(f"{topic!r}: unknown receiver {dst_s!r}")
    if src is Role.OPERATOR:
        if dst not in NODE_ROLES or dst.on_device != (device is not None):
            raise WrongTopic(f"{topic!r}: the operator reaches a {dst.value} in another scope")
        return ParsedTopic(device, src, dst, CHANNEL_OPS)
    link_for(src, dst)
    if (src.on_device or dst.on_device) != (device is not None):
        raise WrongTopic(f"{topic!r}: link and scope disagree")
    return ParsedTopic(device, src, dst, None)


def _replica_status(topic: str, src_s: str, number: str) -> ParsedTopic:
    """``tp/v1/plat/{short}/status/{k}``: replica k's status, k from 2 (replica 1 has no suffix)."""
    src = _BY_SHORT.get(src_s)
    if src not in SERVER_ROLES:
        raise WrongTopic(f"{topic!r}: only servers run replicas")
    if not _replica_number(number):
        raise WrongTopic(f"{topic!r}: replica {number!r} is not a number from 2 to {MAX_REPLICA}")
    return ParsedTopic(None, src, None, CHANNEL_STATUS, int(number))


def _replica_number(text: str) -> bool:
    """Whether ``text`` numbers a second or later replica: 2 to MAX_REPLICA, ASCII digits, no 0 first."""
    digits = text.isascii() and text.isdigit() and not text.startswith("0")
    return digits and 2 <= int(text) <= MAX_REPLICA


def status_signer(parsed: ParsedTopic) -> str | None:
    """The only node that may sign on a server's status topic (None: any node of the role may).

    A replica's login may write only its own status topic (``acl_for``), and the
    signature must agree: no replica can say another is online, or offline.
    """
    if parsed.channel != CHANNEL_STATUS or parsed.src not in SERVER_ROLES:
        return None
    return node_id(parsed.src, None, parsed.replica)


SHARE_PREFIX = "$share"
SHARE_DOMAIN = b"trustpay-share-group-v1"


def share_group(role: Role, box_secret: bytes) -> str:
    """The name of ``role``'s replica group, which only holders of the role's box key know.

    Mosquitto 2.0.11 grants any login a ``$share/{group}/...`` subscription and only
    then refuses it the messages (read ACL at delivery): a device joining a group named
    after the role would silently swallow its share of the servers' requests. A
    group named from the role's secret (the replicas share it) is one it cannot join.
    """
    digest = hashlib.blake2b(role.value.encode(), key=box_secret, digest_size=12, person=SHARE_DOMAIN[:16])
    return f"{role.short}-{digest.hexdigest()}"


def partition_of(key: str, count: int) -> int:
    """Which of ``count`` replicas (0-based) takes the frames keyed by ``key`` (a device id).

    For brokers without shared subscriptions (amqtt 0.12.1, NATS 2.9): a static,
    stable partition, the same in every process and every run.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"tp-partition-v1").digest()
    return int.from_bytes(digest, "big") % count


def shared_filter(group: str, topic_filter: str) -> str:
    """``topic_filter`` as a shared subscription of ``group``: each frame reaches one member."""
    return f"{SHARE_PREFIX}/{group}/{topic_filter}"


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """The inverse of ``shared_filter``: (group, filter); a plain filter -> (None, filter)."""
    if not topic_filter.startswith(SHARE_PREFIX + "/"):
        return None, topic_filter
    _, group, rest = topic_filter.split("/", 2)
    return group, rest


def inbound_filters(
    role: Role,
    device: str | None = None,
    shared_from: frozenset[Role] | None = None,
    group: str = "",
) -> tuple[str, ...]:
    """Topic filters a node of ``role`` subscribes to.

    Servers take every device with ``+``. Replicas of a server (``shared_from``
    given: the senders whose links carry requests to the role and nothing it
    waits for, ``protocol.messages.shared_senders``) take those links through a
    ``$share/{group}/`` subscription (``share_group``), so each request reaches one replica, and
    every other link, the operator's and the revocation list plainly: answers
    must reach the replica that asked, and every replica needs the operator's
    commands and the list.
    """
    if role.on_device:
        base = f"{PREFIX}/dev/{check_device_id(device or '')}"
        return (f"{base}/+/{role.short}", CRL_TOPIC)
    if shared_from is not None and not group:
        raise WrongTopic(f"shared subscriptions of {role.value} need its group name")
    if shared_from is None:
        return (f"{PREFIX}/dev/+/+/{role.short}", f"{PREFIX}/plat/+/{role.short}", CRL_TOPIC)
    filters = []
    for link in LINKS:
        if link.dst is not role:
            continue
        on_device = link.src.on_device
        plain = f"{PREFIX}/dev/+/{link.src.short}/{role.short}" if on_device else link_topic(link.src, role)
        filters.append(shared_filter(group, plain) if link.src in shared_from else plain)
    filters += [operator_topic(role), CRL_TOPIC]
    return tuple(filters)


@dataclass(frozen=True)
class AclRule:
    access: str  # "read" | "write"
    pattern: str


def acl_for(role: Role, device: str | None = None, replica: int = 1) -> tuple[AclRule, ...]:
    """The broker rules of one identity: its own device, its own direction.

    The replicas of a server share its rules but for the status: each writes only its own.
    """
    if role is Role.MONITOR:
        return (AclRule("read", f"{PREFIX}/#"),)
    if role is Role.OPERATOR:
        return (
            *(AclRule("write", f"{PREFIX}/dev/+/ops/{r.short}") for r in DEVICE_ROLES),
            AclRule("write", f"{PREFIX}/plat/ops/+"),  # the servers' operator topics and CRL_TOPIC
            AclRule("read", f"{PREFIX}/dev/+/+/ops"),
            AclRule("read", f"{PREFIX}/plat/+/ops"),
            AclRule("read", f"{PREFIX}/dev/+/+/status"),
            AclRule("read", f"{PREFIX}/plat/+/status"),
            AclRule("read", f"{PREFIX}/plat/+/status/+"),
            AclRule("read", f"{PREFIX}/dev/+/+/ev"),
            AclRule("read", f"{PREFIX}/plat/+/ev"),
            AclRule("read", CRL_TOPIC),
        )
    if role.on_device and not device:
        raise WrongTopic(f"a {role.value} identity needs its device id: it may reach only its own device")
    dev = check_device_id(device) if role.on_device and device else "+"
    writes = [link_topic(link.src, link.dst, dev) for link in LINKS if link.src is role]
    writes += [
        status_topic(role, device, replica) if ch == CHANNEL_STATUS else channel_topic(role, ch, dev)
        for ch in NODE_CHANNELS
    ]
    reads = [f"{PREFIX}/dev/{dev}/+/{role.short}"]
    if not role.on_device:
        reads.append(f"{PREFIX}/plat/+/{role.short}")
    reads.append(CRL_TOPIC)
    return tuple(AclRule("write", t) for t in writes) + tuple(AclRule("read", t) for t in reads)


# The monitor login is read-only and legitimately open several times at once (the
# launcher's supervision, `trustpay watch`, tests): its sessions get client ids of their
# own, "monitor:{purpose}", and connect to the broker's second listener (port + 1).
# Every other login has exactly one session, whose client id is its username.
CLIENT_ID_SEPARATOR = ":"  # never part of a username, so no login's ids overlap another's
MONITOR_PORT_OFFSET = 1


def client_id_allowed(username: str, client_id: str) -> bool:
    """Whether ``username`` may connect with ``client_id``: only its own, never another login's."""
    if client_id == username:
        return True
    prefix = username + CLIENT_ID_SEPARATOR
    return username == Role.MONITOR.value and client_id.startswith(prefix) and len(client_id) > len(prefix)


def role_from_name(name: str) -> Role:
    try:
        return Role(name)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise WrongTopic(f"unknown role {name!r}; choose one of {choices}") from None


REPLICA_SEPARATOR = "."  # trust-server.2: a server replica's id; never in a role name
MAX_REPLICA = 9999  # the largest replica number a node id or a topic may carry


def node_id(role: Role, device: str | None = None, replica: int = 1) -> str:
    """A node's identity: ``{device}.{short}`` on a device; on the platform the role name for the
    first replica (as with one server), then ``{role}.{k}`` for replica ``k``."""
    if role.on_device:
        return f"{check_device_id(device or '')}.{role.short}"
    if replica < 1:
        raise WrongTopic(f"replica numbers start at 1, not {replica}")
    if replica > 1 and role not in SERVER_ROLES:
        raise WrongTopic(f"only the servers run replicas, not the {role.value}")
    return role.value if replica == 1 else f"{role.value}{REPLICA_SEPARATOR}{replica}"


def replica_ids(role: Role, count: int) -> tuple[str, ...]:
    """The node ids of ``count`` replicas of a server role, the first one first."""
    return tuple(node_id(role, None, k) for k in range(1, count + 1))


def server_replica(nid: str) -> tuple[Role, int] | None:
    """``trust-server.2`` -> (trust-server, 2), ``trust-server`` -> (trust-server, 1); else None."""
    name, dot, number = nid.partition(REPLICA_SEPARATOR)
    try:
        role = Role(name)
    except ValueError:
        return None
    if role not in SERVER_ROLES:
        return None
    if not dot:
        return role, 1
    if not _replica_number(number):
        return None
    return role, int(number)
