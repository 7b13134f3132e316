"""What the nodes take from files is checked like what they take from frames: the issuer
certificate chains to the root, a stored platform certificate comes through the update key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nodes.bus import FakeBroker
from nodes.chip import Chip
from nodes.deployment import Deployment, canonical_json, write_file
from nodes.runtime import Node
from nodes.trust_module import TrustModule
from nodes.trust_server import TrustServer
from ops.release_cmd import make_release
from ops.rotate_cmd import rotate
from protocol.certs import ISSUER, PLATFORM, ROOT, CertBody, Certificate, issue
from protocol.errors import ConfigError
from protocol.keys import KeyPair
from protocol.measure import APP, measure
from protocol.messages import Empty
from protocol.records import PACKAGE_DOMAIN, RELEASE_DOMAIN, Package, Release, sign_record
from protocol.topics import Role, operator_topic

from .harness import make_node, provisioned, running
from .test_payment_flow import DEV, world

ATTACKER = KeyPair.generate()


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return provisioned(tmp_path)


def forged(dep: Deployment, role: str, issuer: Certificate, serial: int = 10_000) -> Certificate:
    """A certificate of ``role`` that names the right issuer but is signed by the attacker."""
    now_s = time.time_ns() // 1_000_000_000
    body = CertBody(
        serial,
        role,
        role,
        "",
        ATTACKER.sign_public,
        ATTACKER.box_public,
        now_s - 60,
        now_s + 86_400,
        issuer.subject,
        issuer.serial,
    )
    return issue(body, ATTACKER)


def plant_forged_issuer(dep: Deployment) -> None:
    """The attack: an issuer certificate of the attacker's own key over public/issuer.cert, every
    release replaced by a made-up one it signed, and a made-up app with a package it signed."""
    write_file(dep.public_cert_path("issuer"), forged(dep, ISSUER, dep.load_public(ROOT)).to_bytes())
    for held in dep.releases_dir.glob("*.release"):
        release = Release(APP, "wallet", "6.6.6", b"\x66" * 32, b"\x66" * 32, False, 1)
        write_file(held, sign_record(release, RELEASE_DOMAIN, ATTACKER).to_bytes())
    evil = dep.app_dir(DEV, "evil")
    evil.mkdir()
    code, static = b"def make_order(**kw):\n    return kw\n", canonical_json({"name": "evil", "version": "1"})
    for name, data in (("code.py", code), ("static.json", static), ("dynamic.json", b"{}\n")):
        write_file(evil / name, data)
    m = measure(APP, "evil", "1", code, static, b"")
    package = Package("evil", "1", m.code, m.static)
    write_file(dep.package_sig_path(DEV, "evil"), sign_record(package, PACKAGE_DOMAIN, ATTACKER).to_bytes())


async def test_a_forged_issuer_certificate_makes_no_release_and_no_package_acceptable(
    dep: Deployment,
) -> None:
    """Fails on main: each node loaded public/issuer.cert raw, so the trust-server and the trust
    module took the made-up releases as reference values and the chip installed the made-up app."""
    plant_forged_issuer(dep)
    broker = FakeBroker()
    ts = make_node(TrustServer, dep, "trust-server", broker, deployment=dep)
    with pytest.raises(ConfigError, match=r"issuer certificate .* is not one the root issued"):
        await ts.run()  # refuses to start before it serves anything
    tm = make_node(TrustModule, dep, f"{DEV}.tm", broker, deployment=dep)
    with pytest.raises(ConfigError, match="is not one the root issued"):
        await tm.prepare()
    assert len(tm.book) == 0
    chip = make_node(Chip, dep, f"{DEV}.chip", broker, deployment=dep)
    await chip.prepare()
    assert chip.data["apps"] == {}
    with pytest.raises(ConfigError, match="is not one the root issued"):
        make_release(dep, "app", "wallet", "1.0.0", None, withdraw=True)  # withdrawing reads the held one


def rogue_platform_state(dep: Deployment) -> Certificate:
    """The trust module's state file, with a newer platform certificate the update key never signed."""
    rogue = forged(dep, PLATFORM, dep.load_public("update"))
    state = {"measurements": {}, "platform_cert": rogue.to_bytes().hex(), "reports": [], "sessions": {},
             "releases": []}  # fmt: skip
    path = dep.state_dir(f"{DEV}.tm") / "trust.json"
    path.write_text(json.dumps(state))
    return rogue


async def test_a_stored_platform_certificate_not_signed_by_the_update_key_is_not_installed(
    dep: Deployment,
) -> None:
    """Fails on main: ``_load`` installed the stored certificate raw, so the terminal held the
    rogue platform key: C1 then refused the real platform and the device could not pay."""
    written_in = dep.load_public("platform")
    rogue_platform_state(dep)
    async with world(dep) as w:
        held = w.tm.certs.platform
        code, result = await w.client("pay", "1.00", "shop-1")
        steps = w.steps()
    assert held == written_in
    assert code == 0, result
    assert "C1:trusted" in steps
    state = json.loads((dep.state_dir(f"{DEV}.tm") / "trust.json").read_bytes())
    assert state["platform_cert"] == written_in.to_bytes().hex()  # the rogue one is gone for good


async def test_new_server_keys_after_a_rotation_keep_balance_queries_and_payments_working(
    dep: Deployment,
) -> None:
    """The chip seals balance queries to the payment-server's box key: after a rotation gave the
    server a new key pair, a chip still holding the old certificate would seal to a key nobody
    holds any more and wait for an answer that never comes."""
    async with world(dep) as w:
        code, result = await w.client("pay", "1.00", "shop-1")
        assert code == 0, result
        rotate(dep)
        operator = make_node(Node, dep, "operator", w.broker)
        async with running(operator):
            for role in (Role.TRUST_SERVER, Role.PAYMENT_SERVER):
                await operator.request(
                    operator_topic(role), "keys.reload", Empty(), recipient=role.value, expect="keys.reloaded"
                )
        balance_code, balance = await w.client("balance")
        pay_code, paid = await w.client("pay", "2.00", "shop-1")
    assert balance_code == 0 and balance["balance"] == 100_000 - 100, balance
    assert pay_code == 0, paid
