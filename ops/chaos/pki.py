"""A small fixed PKI for fuzzing the decoders: no files, the same keys on every run.

root -> update -> platform -> trust-server, payment-server; root -> the trust
module, chip and client of two devices, and the operator. Keys come from their
labels, so a failing example found today reproduces tomorrow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from protocol.certs import CertBody, Certificate, CertStore, issue
from protocol.keys import KeyPair
from protocol.topics import DEVICE_ROLES, SERVER_ROLES, Role, node_id

NOW_S = 1_700_000_000
NOW_MS = NOW_S * 1000
DEVICES = ("d1", "d2")


def keypair(label: str) -> KeyPair:
    def secret(purpose: bytes) -> bytes:
        return hashlib.blake2b(label.encode(), digest_size=32, person=purpose).digest()

    return KeyPair(secret(b"tp-fuzz-sign"), secret(b"tp-fuzz-box"))


@dataclass(frozen=True)
class Party:
    name: str
    role: Role
    device: str | None
    keys: KeyPair
    cert: Certificate
    chain: tuple[bytes, ...]


class FuzzPki:
    def __init__(self) -> None:
        self.root_keys = keypair("root")
        self.root = self._issue(1, "root", "root", "", self.root_keys, "root", 1, self.root_keys)
        self.update_keys = keypair("update")
        self.update = self._issue(2, "update", "update", "", self.update_keys, "root", 1, self.root_keys)
        self.platform_keys = keypair("platform")
        self.platform = self._issue(
            3, "platform", "platform", "", self.platform_keys, "update", 2, self.update_keys
        )
        self.parties: dict[tuple[Role, str | None], Party] = {}
        serial = 10
        for role in SERVER_ROLES:
            serial += 1
            self._add(role, None, serial, "platform", 3, self.platform_keys, (self.platform.to_bytes(),))
        for device in DEVICES:
            for role in DEVICE_ROLES:
                serial += 1
                self._add(role, device, serial, "root", 1, self.root_keys, ())
        self._add(Role.OPERATOR, None, 99, "root", 1, self.root_keys, ())

    def _issue(
        self,
        serial: int,
        subject: str,
        role: str,
        device: str,
        keys: KeyPair,
        issuer: str,
        issuer_serial: int,
        issuer_keys: KeyPair,
    ) -> Certificate:
        body = CertBody(
            serial,
            subject,
            role,
            device,
            keys.sign_public,
            keys.box_public,
            NOW_S - 86_400,
            NOW_S + 86_400,
            issuer,
            issuer_serial,
        )
        return issue(body, issuer_keys)

    def _add(
        self,
        role: Role,
        device: str | None,
        serial: int,
        issuer: str,
        issuer_serial: int,
        issuer_keys: KeyPair,
        rest: tuple[bytes, ...],
    ) -> None:
        name = node_id(role, device) if role is not Role.OPERATOR else role.value
        keys = keypair(name)
        cert = self._issue(serial, name, role.value, device or "", keys, issuer, issuer_serial, issuer_keys)
        self.parties[(role, device)] = Party(name, role, device, keys, cert, (cert.to_bytes(), *rest))

    def party(self, role: Role, device: str | None = "d1") -> Party:
        return self.parties[(role, device if role.on_device else None)]

    def store(self) -> CertStore:
        store = CertStore(self.root, self.update)
        store.accept_platform(self.platform, NOW_S)
        return store
