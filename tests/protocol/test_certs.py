"""Certificates: chains, validity, revocation, roles, and platform rotation through the update key."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.certs import (
    CRL_SKEW_S,
    CertBody,
    Certificate,
    CertStore,
    RevocationList,
    check_signature,
    issue,
    sign_revocations,
)
from protocol.errors import (
    CertificateExpired,
    CertificateInvalid,
    CertificateRevoked,
    Malformed,
    WrongRole,
)
from protocol.messages import MESSAGE_TYPES
from protocol.topics import Role, link_topic

from .factory import NOW_MS, NOW_S, Pki, envelope, exactly, example, keypair, sign, verifier

PKI = Pki()
TM = PKI.node(Role.TRUST_MODULE)
CHIP = PKI.node(Role.CHIP)
TS = PKI.node(Role.TRUST_SERVER)
PS = PKI.node(Role.PAYMENT_SERVER)
ATTACKER = keypair("attacker")


def resolve(store: CertStore, chain, now_s: int = NOW_S, **kw) -> Certificate:
    return store.resolve(list(chain), now_s, **kw)


# -- chains ------------------------------------------------------------------------------
def test_valid_chains_resolve_to_their_leaf():
    store = PKI.store()
    for ident in (TM, CHIP, PKI.node(Role.CLIENT), TS, PS, PKI.node(Role.OPERATOR), PKI.node(Role.MONITOR)):
        assert resolve(store, ident.chain) == ident.cert
    assert resolve(store, PKI.node(Role.CHIP, "d2").chain).body.device == "d2"


def test_server_chain_learns_the_platform_on_first_use():
    store = PKI.store(platform=False)
    assert store.platform is None
    assert resolve(store, TS.chain) == TS.cert
    assert store.platform == PKI.platform


def test_empty_and_short_chains():
    store = PKI.store()
    with exactly(CertificateInvalid):
        resolve(store, [])
    with exactly(CertificateInvalid):
        resolve(store, TS.chain[:1])


def test_certificate_bytes_round_trip_and_key_lengths():
    assert Certificate.from_bytes(TS.cert.to_bytes()) == TS.cert
    bad = dataclasses.replace(TS.cert, body=dataclasses.replace(TS.cert.body, sign_key=b"k" * 31))
    with exactly(Malformed):
        Certificate.from_bytes(bad.to_bytes())
    with exactly(Malformed):
        Certificate.from_bytes(b"\x91\xc0")
    assert TS.cert.fingerprint != PS.cert.fingerprint and len(TS.cert.fingerprint) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "d2.tm"},
        {"device": "d2"},
        {"role": "chip"},
        {"not_after": NOW_S + 10**9},
        {"serial": 999},
        {"sign_key": keypair("x").sign_public},
    ],
)
def test_altered_certificate_body_is_invalid(change):
    forged = dataclasses.replace(TM.cert, body=dataclasses.replace(TM.cert.body, **change))
    with pytest.raises(CertificateInvalid):
        resolve(PKI.store(), [forged.to_bytes()])
    with exactly(CertificateInvalid):
        check_signature(forged, PKI.root)


def test_device_cert_claiming_issuer_platform():
    # names the platform as issuer, signed by the platform key: devices are the root's
    cert = PKI.issue_cert("d1.tm", "trust-module", "d1", TM.keys, PKI.platform, PKI.platform_keys)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes()])
    # names the platform as issuer but is signed by the root
    cert = PKI.issue_cert(
        "d1.tm", "trust-module", "d1", TM.keys, PKI.root, PKI.root_keys, issuer_name="platform"
    )
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes()])


def test_device_cert_signed_by_attacker_or_naming_wrong_root_serial():
    cert = PKI.issue_cert("d1.tm", "trust-module", "d1", TM.keys, PKI.root, ATTACKER)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes()])
    cert = PKI.issue_cert("d1.tm", "trust-module", "d1", TM.keys, PKI.root, PKI.root_keys, issuer_serial=7)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes()])


def test_server_cert_signed_by_root_instead_of_platform():
    cert = PKI.issue_cert("trust-server", "trust-server", "", TS.keys, PKI.platform, PKI.root_keys)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes(), PKI.platform.to_bytes()])
    cert = PKI.issue_cert("trust-server", "trust-server", "", TS.keys, PKI.root, PKI.root_keys)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes(), PKI.platform.to_bytes()])
    cert = PKI.issue_cert("trust-server", "trust-server", "", TS.keys, PKI.update, PKI.update_keys)
    with exactly(CertificateInvalid):
        resolve(PKI.store(), [cert.to_bytes(), PKI.platform.to_bytes()])


@pytest.mark.parametrize("role", ["root", "platform", "nobody", ""])
def test_roles_that_cannot_sign_frames(role):
    cert = PKI.issue_cert("x", role, "", keypair("x"), PKI.root, PKI.root_keys)
    with exactly(WrongRole):
        resolve(PKI.store(), [cert.to_bytes()])


def test_chip_cert_on_a_trust_module_topic():
    topic = link_topic(Role.TRUST_MODULE, Role.TRUST_SERVER, "d1")
    env = envelope(CHIP, TS, "ping", example(MESSAGE_TYPES["ping"].body))
    with exactly(WrongRole):
        verifier(PKI, TS).open(sign(env, topic, CHIP), topic, NOW_MS)


def test_update_cert_cannot_sign_frames_on_any_link():
    upd = PKI.issue_cert("update", "update", "", PKI.update_keys, PKI.root, PKI.root_keys, 2)
    assert upd.to_bytes() == PKI.update.to_bytes()
    from .factory import Identity

    ident = Identity("update", "update", "", PKI.update_keys, upd, (upd.to_bytes(),))
    topic = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "d1")
    env = envelope(ident, TM, "ping", example(MESSAGE_TYPES["ping"].body))
    with pytest.raises(CertificateInvalid):  # WrongRole is a CertificateInvalid
        verifier(PKI, TM).open(sign(env, topic, ident), topic, NOW_MS)


# -- anchors ---------------------------------------------------------------------------
def test_store_needs_a_self_signed_root():
    with exactly(CertificateInvalid):
        CertStore(PKI.update)
    forged_root = dataclasses.replace(PKI.root, signature=bytes(64))
    with exactly(CertificateInvalid):
        CertStore(forged_root)
    other_root = issue(dataclasses.replace(PKI.root.body, sign_key=ATTACKER.sign_public), PKI.root_keys)
    with exactly(CertificateInvalid):
        CertStore(other_root)


def test_set_update_checks_its_issuer():
    store = CertStore(PKI.root)
    with exactly(WrongRole):
        store.set_update(PKI.platform)
    fake = PKI.issue_cert("update", "update", "", ATTACKER, PKI.root, ATTACKER)
    with exactly(CertificateInvalid):
        store.set_update(fake)
    assert store.update is None
    store.set_update(PKI.update)
    assert store.update == PKI.update


# -- validity in time ------------------------------------------------------------------
def test_not_yet_valid_and_expired():
    store = PKI.store()
    early = PKI.device_node(Role.TRUST_MODULE, "d1", not_before=NOW_S + 10)
    late = PKI.device_node(Role.TRUST_MODULE, "d1", not_after=NOW_S - 1)
    with exactly(CertificateExpired):
        resolve(store, early.chain)
    with exactly(CertificateExpired):
        resolve(store, late.chain)
    assert resolve(store, early.chain, NOW_S + 10) == early.cert
    assert resolve(store, late.chain, NOW_S - 1) == late.cert


def test_cached_certificate_still_expires():
    store = PKI.store()
    short = PKI.device_node(Role.TRUST_MODULE, "d1", not_after=NOW_S + 60)
    assert resolve(store, short.chain) == short.cert
    with exactly(CertificateExpired):
        resolve(store, short.chain, NOW_S + 61)


def test_server_cert_expiry():
    ts = PKI.server(Role.TRUST_SERVER, label="short-ts", not_after=NOW_S + 5)
    store = PKI.store()
    assert resolve(store, ts.chain) == ts.cert
    with exactly(CertificateExpired):
        resolve(store, ts.chain, NOW_S + 6)


def test_expired_platform_cert_is_not_accepted():
    old = PKI.issue_cert(
        "platform", "platform", "", keypair("p-old"), PKI.update, PKI.update_keys, not_after=NOW_S - 1
    )
    with exactly(CertificateExpired):
        PKI.store(platform=False).accept_platform(old, NOW_S)


def test_servers_stop_verifying_once_their_platform_cert_expired():
    """A chain is only as valid as every certificate in it, the platform's included."""
    plat = PKI.issue_cert(
        "platform", "platform", "", keypair("p-short"), PKI.update, PKI.update_keys, not_after=NOW_S + 100
    )
    ts = PKI.server(Role.TRUST_SERVER, plat, keypair("p-short"), label="ts-short")
    store = PKI.store(platform=False)
    assert resolve(store, ts.chain) == ts.cert
    with pytest.raises(CertificateExpired):
        resolve(store, ts.chain, NOW_S + 101)


# -- revocation -------------------------------------------------------------------------
def test_revocation_list_signed_by_root():
    store = PKI.store()
    assert resolve(store, CHIP.chain) == CHIP.cert  # cached before the list arrives
    crl = sign_revocations(1, NOW_S, (CHIP.cert.serial, TS.cert.serial), PKI.root_keys)
    store.set_revocations(RevocationList.from_bytes(crl.to_bytes()), NOW_S)
    with exactly(CertificateRevoked):
        resolve(store, CHIP.chain)
    with exactly(CertificateRevoked):
        resolve(store, TS.chain)
    assert resolve(store, TM.chain) == TM.cert
    assert resolve(store, PS.chain) == PS.cert
    # a newer list without the chip lifts its revocation
    store.set_revocations(sign_revocations(2, NOW_S, (TS.cert.serial,), PKI.root_keys), NOW_S)
    assert resolve(store, CHIP.chain) == CHIP.cert


@pytest.mark.parametrize("signer", ["update", "platform", "attacker", "device"])
def test_revocation_list_signed_by_someone_else(signer):
    keys = {
        "update": PKI.update_keys,
        "platform": PKI.platform_keys,
        "attacker": ATTACKER,
        "device": TM.keys,
    }[signer]
    store = PKI.store()
    with exactly(CertificateInvalid):
        store.set_revocations(sign_revocations(5, NOW_S, (CHIP.cert.serial,), keys), NOW_S)
    assert store.revoked == frozenset()
    assert resolve(store, CHIP.chain) == CHIP.cert


def test_revocation_list_altered_after_signing():
    crl = sign_revocations(1, NOW_S, (CHIP.cert.serial,), PKI.root_keys)
    widened = dataclasses.replace(crl, body=dataclasses.replace(crl.body, serials=(CHIP.cert.serial, 1)))
    emptied = dataclasses.replace(crl, body=dataclasses.replace(crl.body, serials=()))
    store = PKI.store()
    for bad in (widened, emptied):
        with exactly(CertificateInvalid):
            store.set_revocations(bad, NOW_S)


def test_older_revocation_list_refused():
    store = PKI.store()
    store.set_revocations(sign_revocations(5, NOW_S, (CHIP.cert.serial,), PKI.root_keys), NOW_S)
    with exactly(CertificateInvalid):
        store.set_revocations(sign_revocations(4, NOW_S, (), PKI.root_keys), NOW_S)
    assert store.crl_number == 5
    with exactly(CertificateRevoked):
        resolve(store, CHIP.chain)


def test_revoked_platform_cert_is_not_accepted():
    store = PKI.store(platform=False)
    store.set_revocations(sign_revocations(1, NOW_S, (PKI.platform.serial,), PKI.root_keys), NOW_S)
    with exactly(CertificateRevoked):
        store.accept_platform(PKI.platform, NOW_S)
    with exactly(CertificateRevoked):
        resolve(store, TS.chain)


def test_revoking_the_held_platform_cert_stops_its_servers():
    """Revoking the platform certificate must stop every server certificate it issued."""
    store = PKI.store()
    assert resolve(store, TS.chain) == TS.cert
    store.set_revocations(sign_revocations(1, NOW_S, (PKI.platform.serial,), PKI.root_keys), NOW_S)
    with pytest.raises(CertificateRevoked):
        resolve(store, TS.chain)


def test_revoked_update_cert_cannot_rotate_the_platform():
    """If the update key is compromised the root revokes it: it must not install a platform key."""
    store = PKI.store()
    store.set_revocations(sign_revocations(1, NOW_S, (PKI.update.serial,), PKI.root_keys), NOW_S)
    new, _ = PKI.rotate("platform-by-revoked-update")
    with pytest.raises(CertificateInvalid):  # CertificateRevoked is one
        store.accept_platform(new, NOW_S)
    assert store.platform == PKI.platform


# -- platform rotation ------------------------------------------------------------------
def test_platform_rotation():
    store = PKI.store()
    assert store.accept_platform(PKI.platform, NOW_S) is False  # the same certificate again
    assert resolve(store, TS.chain) == TS.cert  # cached under the old platform
    new, new_keys = PKI.rotate("platform-rotated")
    assert new.serial > PKI.platform.serial
    assert store.accept_platform(new, NOW_S) is True
    assert store.platform == new

    new_ts = PKI.server(Role.TRUST_SERVER, new, new_keys)
    new_ps = PKI.server(Role.PAYMENT_SERVER, new, new_keys)
    assert resolve(store, new_ts.chain) == new_ts.cert
    assert resolve(store, new_ps.chain) == new_ps.cert
    # servers of the old key stop verifying: with the old platform cert, and dressed in the new one
    for old in (TS, PS):
        with exactly(CertificateInvalid):
            resolve(store, old.chain)
        with exactly(CertificateInvalid):
            resolve(store, (old.chain[0], new.to_bytes()))
        with exactly(CertificateInvalid):
            resolve(store, old.chain, accept_rotation=False)
    # and the old platform cert can't be re-installed
    with exactly(CertificateInvalid):
        store.accept_platform(PKI.platform, NOW_S)
    assert store.platform == new


def test_rotation_through_a_frame_chain():
    new, new_keys = PKI.rotate("platform-via-frame")
    new_ts = PKI.server(Role.TRUST_SERVER, new, new_keys)
    strict = PKI.store()
    with exactly(CertificateInvalid):
        resolve(strict, new_ts.chain, accept_rotation=False)
    assert strict.platform == PKI.platform
    store = PKI.store()
    assert resolve(store, new_ts.chain) == new_ts.cert
    assert store.platform == new
    with exactly(CertificateInvalid):
        resolve(store, TS.chain)


def test_rotated_frames_verify_end_to_end():
    new, new_keys = PKI.rotate("platform-e2e")
    new_ts = PKI.server(Role.TRUST_SERVER, new, new_keys)
    topic = link_topic(Role.TRUST_SERVER, Role.TRUST_MODULE, "d1")
    v = verifier(PKI, TM)
    ping = example(MESSAGE_TYPES["ping"].body)
    assert v.open(sign(envelope(new_ts, TM, "ping", ping), topic, new_ts), topic, NOW_MS)
    with exactly(CertificateInvalid):
        v.open(sign(envelope(TS, TM, "ping", ping), topic, TS), topic, NOW_MS)


@pytest.mark.parametrize("how", ["root", "attacker", "platform", "attacker-claims-update"])
def test_platform_cert_not_from_the_update_key(how):
    keys = keypair("rogue-platform")
    if how == "root":
        cert = PKI.issue_cert("platform", "platform", "", keys, PKI.update, PKI.root_keys, 50)
    elif how == "attacker":
        cert = PKI.issue_cert("platform", "platform", "", keys, PKI.update, ATTACKER, 50)
    elif how == "platform":
        cert = PKI.issue_cert("platform", "platform", "", keys, PKI.platform, PKI.platform_keys, 50)
    else:
        rogue_update = PKI.issue_cert("update", "update", "", ATTACKER, PKI.root, ATTACKER, 2)
        cert = PKI.issue_cert("platform", "platform", "", keys, rogue_update, ATTACKER, 50)
    store = PKI.store()
    with exactly(CertificateInvalid):
        store.accept_platform(cert, NOW_S)
    assert store.platform == PKI.platform
    rogue_ts = PKI.server(Role.TRUST_SERVER, cert, keys, label="rogue-ts")
    with exactly(CertificateInvalid):
        resolve(store, rogue_ts.chain)
    assert store.platform == PKI.platform
    assert resolve(store, TS.chain) == TS.cert


def test_platform_cert_with_wrong_role():
    cert = PKI.issue_cert("platform", "trust-server", "", keypair("p"), PKI.update, PKI.update_keys, 60)
    with exactly(WrongRole):
        PKI.store().accept_platform(cert, NOW_S)


def test_platform_cert_with_lower_or_equal_serial():
    store = PKI.store()
    for serial in (1, PKI.platform.serial):
        older = PKI.issue_cert(
            "platform", "platform", "", keypair(f"p{serial}"), PKI.update, PKI.update_keys, serial
        )
        with exactly(CertificateInvalid):
            store.accept_platform(older, NOW_S)
        assert store.platform == PKI.platform


def test_store_without_update_cert_cannot_rotate():
    store = PKI.store(update=False)
    with exactly(CertificateInvalid):
        store.accept_platform(PKI.platform, NOW_S)
    with exactly(CertificateInvalid):
        resolve(store, TS.chain)
    assert store.platform is None
    assert resolve(store, TM.chain) == TM.cert  # device chains need only the root


def test_cert_body_is_what_is_signed():
    body = CertBody(9, "s", "client", "d1", bytes(32), bytes(32), 0, 1, "root", 1)
    cert = issue(body, PKI.root_keys)
    check_signature(cert, PKI.root)
    with exactly(CertificateInvalid):
        check_signature(cert, PKI.update)


def test_install_platform_written_in():
    store = PKI.store(platform=False)
    with exactly(WrongRole):
        store.install_platform(PKI.update)
    store.install_platform(PKI.platform)
    assert store.platform == PKI.platform
    assert resolve(store, TS.chain, accept_rotation=False) == TS.cert


def test_revocation_list_from_the_future_is_refused():
    """A list dated ahead of the receiver's clock (beyond the skew) is not the current one."""
    store = PKI.store()
    with exactly(CertificateInvalid):
        store.set_revocations(
            sign_revocations(1, NOW_S + CRL_SKEW_S + 1, (CHIP.cert.serial,), PKI.root_keys), NOW_S
        )
    assert store.crl_number == -1 and resolve(store, CHIP.chain) == CHIP.cert
    assert store.set_revocations(
        sign_revocations(1, NOW_S + CRL_SKEW_S, (CHIP.cert.serial,), PKI.root_keys), NOW_S
    )


def test_the_same_list_again_changes_nothing_and_another_under_its_number_is_refused():
    store = PKI.store()
    crl = sign_revocations(3, NOW_S, (CHIP.cert.serial,), PKI.root_keys)
    assert store.set_revocations(crl, NOW_S) is True
    assert store.set_revocations(RevocationList.from_bytes(crl.to_bytes()), NOW_S) is False  # retained copy
    with exactly(CertificateInvalid):
        store.set_revocations(sign_revocations(3, NOW_S, (), PKI.root_keys), NOW_S)
    assert store.revoked == frozenset({CHIP.cert.serial})


def test_a_revoked_leaf_is_returned_only_when_asked_for():
    store = PKI.store()
    store.set_revocations(sign_revocations(1, NOW_S, (CHIP.cert.serial,), PKI.root_keys), NOW_S)
    with exactly(CertificateRevoked):
        resolve(store, CHIP.chain)
    assert store.resolve(list(CHIP.chain), NOW_S, allow_revoked=True) == CHIP.cert
    # never a revoked issuer, even when asked
    store.set_revocations(sign_revocations(2, NOW_S, (PKI.platform.serial,), PKI.root_keys), NOW_S)
    with exactly(CertificateRevoked):
        store.resolve(list(TS.chain), NOW_S, allow_revoked=True)


def test_an_issuer_certificate_must_chain_to_the_root():
    issuer_keys = keypair("issuer")
    real = PKI.issue_cert("issuer", "issuer", "", issuer_keys, PKI.root, PKI.root_keys)
    store = PKI.store()
    assert store.check_root_issued(real, "issuer", NOW_S) == real
    self_made = PKI.issue_cert("issuer", "issuer", "", ATTACKER, PKI.root, ATTACKER)
    with exactly(CertificateInvalid):
        store.check_root_issued(self_made, "issuer", NOW_S)
    with exactly(WrongRole):
        store.check_root_issued(PKI.update, "issuer", NOW_S)
    with exactly(WrongRole):
        store.check_root_issued(PKI.platform, "platform", NOW_S)  # the update key issues platforms
    with exactly(CertificateExpired):
        store.check_root_issued(real, "issuer", PKI.root.body.not_after + 1)
    store.set_revocations(sign_revocations(1, NOW_S, (real.serial,), PKI.root_keys), NOW_S)
    with exactly(CertificateRevoked):
        store.check_root_issued(real, "issuer", NOW_S)
