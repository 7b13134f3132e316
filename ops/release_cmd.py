"""``trustpay release``: publish (or withdraw) a version's signed reference measurements.

The release record ("client trust report", claim 3) is signed with the
issuer key, written to the deployment's releases/ (read by nodes at start)
and sent to the running trust-server and trust modules, so devices upgraded
to the new version stay trusted without a restart. ``--withdraw`` makes a
version untrusted from then on. A client release covers its whole install:
every file of ``DIR/code/`` (as ``devices/{device}/client/code/``) and
``DIR/static.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from nodes.deployment import Deployment, OfflineKeys, read_tree, write_file
from protocol.appraisal import open_release
from protocol.errors import ConfigError
from protocol.measure import APP, CLIENT, install_image, measure
from protocol.messages import ReleaseUpdate
from protocol.records import RELEASE_DOMAIN, Release, sign_record
from protocol.topics import Role, node_id

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json
from .operator import add_offline_argument, command, deployment_certs, offline_keys, operator_node

HELP = "add a client or app version's signed reference measurements, or --withdraw one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, "print the release and each node's answer as one JSON object")
    add_examples(
        parser,
        "trustpay release --deploy deploy app wallet 1.1.0 ./wallet-1.1.0   # holds code.py, static.json",
        "trustpay release client trustpay-client 1.1.0 ./client-1.1.0       # holds code/, static.json",
        "trustpay release app wallet 1.0.0 --withdraw --json                # stop trusting a version",
    )
    parser.add_argument("kind", choices=[CLIENT, APP])
    parser.add_argument("name", help="the client's name (trustpay-client) or the app's (wallet, transit)")
    parser.add_argument("version")
    parser.add_argument(
        "path",
        type=Path,
        nargs="?",
        help="new version: a client install (code/ and static.json) or an app (code.py, static.json)",
    )
    parser.add_argument("--withdraw", action="store_true", help="make this version untrusted from now on")
    parser.add_argument("--broker", help="broker URL (default: the manifest's)")
    add_offline_argument(parser)


def make_release(
    dep: Deployment,
    kind: str,
    name: str,
    version: str,
    path: Path | None,
    withdraw: bool,
    offline: OfflineKeys | None = None,
) -> bytes:
    offline = offline or OfflineKeys.of(dep.root)
    if withdraw:
        held = dep.release_path(kind, name, version)
        if not held.exists():
            raise ConfigError(f"{kind} {name} {version} was never released ({held} missing)")
        issuer = dep.load_issuer(deployment_certs(dep), time.time_ns() // 1_000_000_000)
        old = open_release(held.read_bytes(), issuer)
        code, static = old.code, old.static
    else:
        m = measure(kind, name, version, *_release_files(kind, path), b"")
        code, static = m.code, m.static
    release = Release(kind, name, version, code, static, withdraw, time.time_ns() // 1_000_000)
    blob = sign_record(release, RELEASE_DOMAIN, offline.load("issuer")).to_bytes()
    write_file(dep.release_path(kind, name, version), blob)
    return blob


def _release_files(kind: str, path: Path | None) -> tuple[bytes, bytes]:
    """A new version's code and static data, measured as the trust module will measure the install."""
    code = "code/" if kind == CLIENT else "code.py"
    if path is None or not (path / code.rstrip("/")).exists() or not (path / "static.json").is_file():
        raise ConfigError(f"give the directory of the new version: it must hold {code} and static.json")
    static = (path / "static.json").read_bytes()
    if kind == CLIENT:  # the whole install, as the trust module measures it
        return install_image(read_tree(path / "code")), static
    return (path / "code.py").read_bytes(), static


async def distribute(dep: Deployment, blob: bytes, broker_url: str | None) -> dict[str, str]:
    """Send the release to the trust-server and every trust module; what each answered."""
    manifest = dep.load_manifest()
    update = ReleaseUpdate(blob)
    async with operator_node(dep, broker_url) as op:
        targets: list[tuple[Role, str, str | None]] = [(Role.TRUST_SERVER, Role.TRUST_SERVER.value, None)]
        targets += [
            (Role.TRUST_MODULE, node_id(Role.TRUST_MODULE, d.device), d.device) for d in manifest.devices
        ]
        answers = await asyncio.gather(
            *(
                command(op, role, nid, "release.update", update, "release.ok", device)
                for role, nid, device in targets
            )
        )
    return {nid: answer for (_, nid, _), answer in zip(targets, answers, strict=True)}


def run(args: argparse.Namespace) -> int:
    dep = Deployment(args.deploy)
    blob = make_release(dep, args.kind, args.name, args.version, args.path, args.withdraw, offline_keys(args))
    what = "withdrawn" if args.withdraw else "released"
    path = dep.release_path(args.kind, args.name, args.version)
    if not args.json:
        print(f"{args.kind} {args.name} {args.version} {what}: {path}")
    answers = asyncio.run(distribute(dep, blob, args.broker))
    # nodes that are down read releases/ when they start; the trust-server must have it now
    code = 0 if answers.get(Role.TRUST_SERVER.value) == "ok" else 1
    if args.json:
        release = {"kind": args.kind, "name": args.name, "version": args.version, "withdrawn": args.withdraw}
        print_json({**release, "path": str(path), "answers": answers, "exit": code})
        return code
    for nid, answer in answers.items():
        print(f"  {nid:<24} {answer if answer != 'ok' else 'updated'}")
    return code
