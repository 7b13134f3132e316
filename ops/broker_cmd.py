"""``trustpay broker --deploy DIR``: run the deployment's MQTT broker until stopped."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl

from broker import BACKENDS, Broker, BrokerIdentity, ServerTls, make_broker
from nodes.deployment import Deployment, Manifest, parse_node_id
from nodes.tls import broker_tls, client_context, node_tls

from .cli_common import add_deploy_argument, add_examples, add_json_argument, print_json

HELP = "run the deployment's broker (Mosquitto, or the embedded amqtt) with its logins and ACL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deploy_argument(parser)
    add_json_argument(parser, 'print {"event": "up", ...} and {"event": "stopped"} as JSON lines')
    add_examples(
        parser,
        "trustpay broker --deploy deploy",
        "trustpay broker --backend amqtt --port 18830 --json   # deploy from $TRUSTPAY_DEPLOY, else ./deploy",
    )
    parser.add_argument("--backend", choices=BACKENDS, help="default: the manifest's")
    parser.add_argument("--port", type=int, help="default: the manifest's")


def broker_identities(dep: Deployment, manifest: Manifest) -> tuple[BrokerIdentity, ...]:
    """Every login the broker must accept, with the passwords the nodes hold."""
    identities = []
    for nid in manifest.login_ids():
        login = dep.load_broker_credentials(nid)
        role, device = parse_node_id(nid)
        identities.append(BrokerIdentity(login.username, login.password, role, device))
    return tuple(identities)


def broker_for(dep: Deployment, backend: str | None = None, port: int | None = None) -> Broker:
    """The deployment's broker (not started), its data kept under DIR/broker/."""
    manifest = dep.load_manifest()
    identities = broker_identities(dep, manifest)
    health = next(i for i in identities if i.username == "monitor")
    tls = client_tls = None
    if manifest.broker.tls:
        files = broker_tls(dep)
        tls = ServerTls(files.ca, files.cert, files.key)
        contexts: dict[str, ssl.SSLContext] = {}

        def client_tls(ident: BrokerIdentity) -> ssl.SSLContext:  # the broker's own health probe
            if ident.username not in contexts:
                contexts[ident.username] = client_context(node_tls(dep, ident.username))
            return contexts[ident.username]

    return make_broker(
        backend or manifest.broker.backend,
        dep.broker_dir / "data",
        port or manifest.broker.port,
        identities,
        health,
        tls=tls,
        client_tls=client_tls,
    )


async def serve(broker: Broker, as_json: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with broker:
        if as_json:
            print_json({"event": "up", "backend": broker.backend, "url": broker.url, "pid": broker.pid})
        else:
            print(
                f"broker {broker.backend} up at {broker.url} (pid {broker.pid}); Ctrl-C stops it", flush=True
            )
        await stop.wait()
    if as_json:
        print_json({"event": "stopped"})
    else:
        print("broker stopped", flush=True)


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(broker_for(Deployment(args.deploy), args.backend, args.port), args.json))
    return 0
