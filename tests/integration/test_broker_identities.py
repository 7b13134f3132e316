"""Identity validation and the files generated from protocol.topics.acl_for."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest

from broker.identities import (
    BrokerIdentity,
    amqtt_hash,
    identities_for,
    mosquitto_hash,
    write_amqtt_auth,
    write_mosquitto_auth,
)
from protocol.errors import ConfigError
from protocol.topics import Role, acl_for


def test_refuses_reserved_and_malformed_names() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        BrokerIdentity("admin", "pw", Role.MONITOR)
    for bad in ("", "a b", "a:b", "dev+", "dev#", "x\n"):
        with pytest.raises(ConfigError):
            BrokerIdentity(bad, "pw", Role.MONITOR)
    with pytest.raises(ConfigError):
        BrokerIdentity("m", "", Role.MONITOR)


def test_device_roles_need_a_device_and_platform_roles_have_none() -> None:
    # acl_for(Role.TRUST_MODULE) without a device would grant every device ("+")
    with pytest.raises(ConfigError, match="needs a device"):
        BrokerIdentity("tm", "pw", Role.TRUST_MODULE)
    with pytest.raises(ConfigError, match="has no device"):
        BrokerIdentity("ts", "pw", Role.TRUST_SERVER, "dev-a")
    with pytest.raises(ConfigError):
        BrokerIdentity("tm", "pw", Role.TRUST_MODULE, "dev/a")


def test_password_is_not_in_repr() -> None:
    ident = BrokerIdentity.for_node(Role.CHIP, "dev-a")
    assert ident.username == "dev-a.chip"
    assert ident.password not in repr(ident)


def test_duplicate_usernames_are_refused(tmp_path: Path) -> None:
    one = BrokerIdentity("monitor", "a", Role.MONITOR)
    two = BrokerIdentity("monitor", "b", Role.MONITOR)
    with pytest.raises(ConfigError, match="twice"):
        write_mosquitto_auth(tmp_path, [one, two])


def test_mosquitto_hash_is_pbkdf2_sha512() -> None:
    _, kind, rounds, salt, digest = mosquitto_hash("s3cret").split("$")
    assert kind == "7"
    want = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), int(rounds))
    assert base64.b64decode(digest) == want


def test_amqtt_hash_verifies_with_amqtts_hasher() -> None:
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hashed = amqtt_hash("s3cret")
    assert hashed.startswith("$argon2id$")
    assert PasswordHash((Argon2Hasher(),)).verify("s3cret", hashed)
    assert not PasswordHash((Argon2Hasher(),)).verify("s3cret!", hashed)


def test_acl_files_render_acl_for_exactly(tmp_path: Path) -> None:
    idents = identities_for(["dev-a"])
    mq = write_mosquitto_auth(tmp_path, idents)
    rules: dict[str, list[tuple[str, str]]] = {}
    user = ""
    for line in mq.acl_file.read_text().splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            rules[user] = []
        elif line.startswith("topic "):
            _, access, pattern = line.split()
            rules[user].append((access, pattern))
    am = write_amqtt_auth(tmp_path, idents)
    for ident in idents:
        want = [(r.access, r.pattern) for r in acl_for(ident.role, ident.device)]
        assert rules[ident.username] == want
        assert am.publish[ident.username] == [p for a, p in want if a == "write"]
        assert am.subscribe[ident.username] == [p for a, p in want if a == "read"]
        assert am.receive[ident.username] == am.subscribe[ident.username]
    for path in (mq.password_file, mq.acl_file, am.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
