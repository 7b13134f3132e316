"""Broker identities and the credential and ACL files both brokers read.

The topic rules come only from :func:`protocol.topics.acl_for`; this module
renders them for Mosquitto (``password_file`` + ``acl_file``) and for amqtt
(a password file + the per-user topic lists of its ACL plugin). Secrets are
hashed before they touch the disk and every secret file is owner-only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ConfigError, WrongTopic
from protocol.topics import (
    DEVICE_ROLES,
    SERVER_ROLES,
    AclRule,
    Role,
    acl_for,
    check_device_id,
    node_id,
    server_replica,
)

# amqtt's TopicTabooPlugin lets the user "admin" touch every topic; whether or
# not that plugin is loaded, such a name must never reach a broker of ours.
RESERVED_USERNAMES = frozenset({"admin"})

# Mosquitto's own default (mosquitto_passwd, sha512-pbkdf2). Our generated
# passwords carry 256 random bits, so key stretching would add nothing but
# connect latency; the hash only keeps the plaintext off the disk.
MOSQUITTO_PBKDF2_ITERATIONS = 101
_MOSQUITTO_SALT_BYTES = 12

# amqtt verifies Argon2 on its event loop at every CONNECT: pwdlib's defaults
# (64 MiB, t=3) block it ~100 ms per client. Random passwords need no such
# cost, so use cheap parameters (verification reads them from the hash).
_ARGON2_TIME_COST = 1
_ARGON2_MEMORY_KIB = 8 * 1024
_ARGON2_PARALLELISM = 1

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class BrokerIdentity:
    """One MQTT login: who it is (role, device) decides what it may touch."""

    username: str
    password: str = field(repr=False)
    role: Role
    device: str | None = None

    def __post_init__(self) -> None:
        _check_username(self.username)
        if not self.password or any(c in self.password for c in "\r\n\0"):
            raise ConfigError(f"identity {self.username!r}: password is empty or has a line break")
        if self.role.on_device:
            # acl_for() quietly widens a device role without a device to every
            # device ("+"): refuse that here instead of granting it.
            if self.device is None:
                raise ConfigError(f"identity {self.username!r}: a {self.role.value} needs a device")
            try:
                check_device_id(self.device)
            except WrongTopic as exc:
                raise ConfigError(f"identity {self.username!r}: {exc.reason}") from None
        elif self.device is not None:
            raise ConfigError(f"identity {self.username!r}: a {self.role.value} has no device")

    @classmethod
    def for_node(
        cls, role: Role, device: str | None = None, password: str | None = None, replica: int = 1
    ) -> BrokerIdentity:
        """The identity of a node, named by :func:`protocol.topics.node_id`.

        A server replica's login (``payment-server.2``) gets its role's rules, but for
        the status: it writes only its own (``acl_for``).
        """
        return cls(node_id(role, device, replica), password or new_password(), role, device)

    @property
    def acl(self) -> tuple[AclRule, ...]:
        replica = server_replica(self.username) if self.device is None else None
        number = replica[1] if replica is not None and replica[0] is self.role else 1
        return acl_for(self.role, self.device, number)


def new_password() -> str:
    return secrets.token_urlsafe(32)


def identities_for(
    devices: Iterable[str],
    platform_roles: Sequence[Role] = (*SERVER_ROLES, Role.MONITOR, Role.OPERATOR),
) -> tuple[BrokerIdentity, ...]:
    """Fresh random credentials for every role of each device plus the platform roles."""
    found = [BrokerIdentity.for_node(role, dev) for dev in devices for role in DEVICE_ROLES]
    found += [BrokerIdentity.for_node(role) for role in platform_roles]
    return check_unique(found)


def check_unique(identities: Iterable[BrokerIdentity]) -> tuple[BrokerIdentity, ...]:
    out = tuple(identities)
    seen: set[str] = set()
    for ident in out:
        if ident.username in seen:
            raise ConfigError(f"username {ident.username!r} is given twice")
        seen.add(ident.username)
    return out


def _check_username(name: str) -> None:
    if name in RESERVED_USERNAMES:
        raise ConfigError(f"username {name!r} is reserved by amqtt (it gets every topic)")
    # ':' splits the password files; whitespace splits acl_file lines; '+'/'#'
    # in a name would read as wildcards to any ACL pattern substitution.
    if not name or len(name) > 128 or any(c.isspace() or c in ":+#" for c in name):
        raise ConfigError(f"username {name!r} must be 1-128 chars without space, ':', '+' or '#'")
    if not name.isprintable():
        raise ConfigError(f"username {name!r} has unprintable characters")


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """A ``$7$`` entry (PBKDF2-HMAC-SHA512) as Mosquitto 2.0 writes and reads it."""
    salt = salt if salt is not None else secrets.token_bytes(_MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${MOSQUITTO_PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def amqtt_hash(password: str) -> str:
    """An Argon2id entry, the format amqtt 0.12.1's FileAuthPlugin verifies."""
    # Imported here: pwdlib comes with amqtt and only the amqtt backend needs it.
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = Argon2Hasher(
        time_cost=_ARGON2_TIME_COST,
        memory_cost=_ARGON2_MEMORY_KIB,
        parallelism=_ARGON2_PARALLELISM,
    )
    return hasher.hash(password)


def mosquitto_acl_text(identities: Iterable[BrokerIdentity]) -> str:
    lines = ["# Generated from protocol.topics.acl_for; rewritten at every broker start."]
    for ident in identities:
        lines += ["", f"user {ident.username}"]
        lines += [f"topic {rule.access} {rule.pattern}" for rule in ident.acl]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class MosquittoAuthFiles:
    password_file: Path
    acl_file: Path


def write_mosquitto_auth(
    directory: Path, identities: Iterable[BrokerIdentity], stem: str = "mosquitto"
) -> MosquittoAuthFiles:
    idents = check_unique(identities)
    pw = write_file(
        directory / f"{stem}.passwd",
        "".join(f"{i.username}:{mosquitto_hash(i.password)}\n" for i in idents),
        SECRET_MODE,
    )
    acl = write_file(directory / f"{stem}.acl", mosquitto_acl_text(idents), SECRET_MODE)
    return MosquittoAuthFiles(pw, acl)


@dataclass(frozen=True)
class AmqttAuth:
    """What amqtt needs: a password file and per-user topic lists per action."""

    password_file: Path
    publish: dict[str, list[str]]
    subscribe: dict[str, list[str]]
    receive: dict[str, list[str]]


def write_amqtt_auth(directory: Path, identities: Iterable[BrokerIdentity]) -> AmqttAuth:
    idents = check_unique(identities)
    pw = write_file(
        directory / "amqtt.passwd",
        "".join(f"{i.username}:{amqtt_hash(i.password)}\n" for i in idents),
        SECRET_MODE,
    )
    # Every user gets a key, even with an empty list: amqtt treats an empty
    # publish table as "publish filtering off", and a missing user as denied.
    writes = {i.username: [r.pattern for r in i.acl if r.access == "write"] for i in idents}
    reads = {i.username: [r.pattern for r in i.acl if r.access == "read"] for i in idents}
    return AmqttAuth(pw, writes, reads, {k: list(v) for k, v in reads.items()})


def write_file(path: Path, text: str, mode: int) -> Path:
    """Replace ``path`` atomically; the content is never readable beyond ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed/kept bits
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
