"""``trustpay revoke``: stop trusting a device or a node, on every running node within seconds.

Signs a new revocation list with the offline root key (the next number, every
serial of the held list plus the new ones), writes it to ``public/crl.bin`` for
nodes that start later, and publishes it retained on the revocation topic,
where every running node takes it at once (``Node._on_revocations``). A
revoked sender's requests are then refused with the code ``revoked``; the
trust-server also marks a device with any revoked certificate as revoked, so
its attestations are contraindicated (C3).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterable

from nodes.deployment import Deployment, Manifest, OfflineKeys, write_file
from protocol.certs import RevocationList, sign_revocations
from protocol.errors import ConfigError
from protocol.messages import RevocationUpdate
from protocol.topics import CRL_TOPIC, DEVICE_ROLES, Role

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .operator import add_offline_argument, offline_keys, operator_node

HELP = "revoke devices or nodes: a new signed revocation list, published to every running node"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "print the new list's number, the revoked nodes and the topic as JSON")
    add_examples(
        parser,
        "trustpay revoke --deploy deploy dev-0002            # the device's three nodes",
        "trustpay revoke dev-0001.chip --json                # one node; deploy from $TRUSTPAY_DEPLOY",
    )
    parser.add_argument(
        "targets", nargs="+", metavar="DEVICE|NODE", help="dev-0001, or a node id: dev-0001.chip"
    )
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_offline_argument(parser)


def target_nodes(manifest: Manifest, targets: Iterable[str]) -> list[str]:
    """The node ids ``targets`` name: a device stands for its three nodes."""
    devices = {d.device for d in manifest.devices}
    logins = set(manifest.login_ids())
    out: list[str] = []
    for target in targets:
        if target in devices:
            nids = [manifest.device(target).node(role) for role in DEVICE_ROLES]
        elif target in logins:
            nids = [target]
        else:
            raise ConfigError(
                f"{target!r} is neither a device nor a node of this deployment (see its manifest.json)"
            )
        if Role.OPERATOR.value in nids:
            raise ConfigError(
                "the operator publishes revocation lists and cannot revoke itself: provision a new deployment"
            )
        out += [nid for nid in nids if nid not in out]
    return out


def make_revocations(
    dep: Deployment, nids: Iterable[str], offline: OfflineKeys | None = None, now_s: int | None = None
) -> RevocationList:
    """Sign and write the next revocation list: the held one plus the certificates of ``nids``."""
    offline = offline or OfflineKeys.of(dep.root)
    now_s = now_s if now_s is not None else time.time_ns() // 1_000_000_000
    held = dep.load_public("crl")
    root_keys = offline.load("root")
    if root_keys.sign_public != dep.load_public("root").body.sign_key:
        raise ConfigError(f"the offline root key in {offline.root} is not this deployment's root")
    serials = {*held.body.serials, *(dep.load_public_cert(nid).serial for nid in nids)}
    crl = sign_revocations(held.body.number + 1, now_s, tuple(serials), root_keys)
    write_file(dep.crl_path, crl.to_bytes())
    return crl


async def publish(dep: Deployment, crl: RevocationList, broker_url: str | None) -> None:
    """Retained, so a node that connects (or reconnects) later still gets it at once."""
    async with operator_node(dep, broker_url) as op:
        await op.send(CRL_TOPIC, "crl", RevocationUpdate(crl.to_bytes()), retain=True)


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    nids = target_nodes(dep.load_manifest(), args.targets)
    crl = make_revocations(dep, nids, offline_keys(args))
    if not args.json:
        revoked = len(crl.body.serials)
        print(f"revocation list {crl.body.number}: {revoked} certificates revoked ({dep.crl_path})")
        for nid in nids:
            print(f"  revoked {nid}")
    asyncio.run(publish(dep, crl, args.broker))
    if args.json:
        print_json(
            {
                "number": crl.body.number,
                "certificates_revoked": len(crl.body.serials),
                "revoked": nids,
                "crl": str(dep.crl_path),
                "published": CRL_TOPIC,
            }
        )
    else:
        print(f"  published on {CRL_TOPIC}")
    return 0
