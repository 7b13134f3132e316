"""``trustpay rotate-platform``: a new platform key, certified by the update key (claim 3).

Writes the new platform certificate and gives the two servers (every replica
of each) new keys and certificates under it, then tells the running servers to
reload. New server keys, not only new certificates: a leaked server key must
not outlive the rotation that answers the leak. The replicas of a role get a
new signing key each and one new box key between them, as at provisioning.
Terminals hold the old platform key; they accept the new one at their next
payment (C1) only because the update certificate signed it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from nodes.deployment import Deployment, OfflineKeys, keys_to_bytes, write_file, write_secret
from protocol.certs import PLATFORM, CertBody, Certificate, issue
from protocol.keys import KeyPair
from protocol.messages import Empty
from protocol.topics import Role

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .operator import add_offline_argument, command, offline_keys, operator_node

HELP = "rotate the platform key through the update certificate and reload the servers"
SERVERS = (Role.TRUST_SERVER, Role.PAYMENT_SERVER)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "print the new certificate's serial and each server's answer as JSON")
    add_examples(
        parser,
        "trustpay rotate-platform --deploy deploy",
        "trustpay rotate-platform --offline /media/keys/deploy.offline --json",
    )
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_offline_argument(parser)


def _next_serial(dep: Deployment) -> int:
    certs = [*dep.certs_dir.glob("*.cert"), *dep.public_dir.glob("*.cert")]
    return 1 + max(Certificate.from_bytes(p.read_bytes()).serial for p in certs)


def rotate(dep: Deployment, offline: OfflineKeys | None = None, now_s: int | None = None) -> Certificate:
    """Issue and write a new platform key and certificate, and new server keys and certificates.

    Returns the new platform certificate.
    """
    offline = offline or OfflineKeys.of(dep.root)
    now_s = now_s or time.time_ns() // 1_000_000_000
    old = dep.load_public("platform")
    update_cert, update_keys = dep.load_public("update"), offline.load("update")
    platform_keys = KeyPair.generate()
    serial = _next_serial(dep)
    platform = issue(
        CertBody(
            serial,
            PLATFORM,
            PLATFORM,
            "",
            platform_keys.sign_public,
            platform_keys.box_public,
            now_s - 60,
            old.body.not_after,
            update_cert.subject,
            update_cert.serial,
        ),
        update_keys,
    )
    manifest = dep.load_manifest()
    servers = [(role, nid) for role in SERVERS for nid in manifest.server_ids(role)]
    boxes = {role: KeyPair.generate().box_secret for role in SERVERS}  # one per role: replicas share it
    for offset, (role, nid) in enumerate(servers, start=1):
        held = dep.load_cert(nid)
        keys = KeyPair(KeyPair.generate().sign_seed, boxes[role])
        body = CertBody(
            serial + offset,
            nid,
            role.value,
            "",
            keys.sign_public,
            keys.box_public,
            now_s - 60,
            held.body.not_after,
            PLATFORM,
            platform.serial,
        )
        cert = issue(body, platform_keys)
        write_secret(dep.node_key_path(nid), keys_to_bytes(keys))
        write_file(dep.node_cert_path(nid), cert.to_bytes())
        write_file(dep.cert_path(nid), cert.to_bytes())
    write_secret(offline.key_path("platform"), keys_to_bytes(platform_keys))
    write_file(dep.public_cert_path("platform"), platform.to_bytes())
    return platform


async def reload_servers(dep: Deployment, broker_url: str | None) -> dict[str, str]:
    """Tell every server replica to reload; its answer ("ok" or why not) by node id."""
    manifest = await asyncio.to_thread(dep.load_manifest)
    servers = [(role, nid) for role in SERVERS for nid in manifest.server_ids(role)]
    async with operator_node(dep, broker_url) as op:
        answers = await asyncio.gather(
            *(command(op, role, nid, "keys.reload", Empty(), "keys.reloaded") for role, nid in servers)
        )
    return {nid: answer for (_, nid), answer in zip(servers, answers, strict=True)}


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    platform = rotate(dep, offline_keys(args))
    if not args.json:
        print(f"platform certificate {platform.serial} issued by the update key; new server keys")
    answers = asyncio.run(reload_servers(dep, args.broker))
    code = 0 if all(a == "ok" for a in answers.values()) else 1
    if args.json:
        print_json({"platform_serial": platform.serial, "answers": answers, "exit": code})
        return code
    for nid, answer in answers.items():
        print(f"  {nid:<16} {'reloaded' if answer == 'ok' else answer}")
    return code
