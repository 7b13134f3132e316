"""``trustpay provision``: create a whole deployment directory, offline.

One run makes the key hierarchy of :mod:`protocol.certs` (root, update,
platform, issuer, then one certificate per node), installs the client (the
modules of :mod:`ops.client_install`) and the payment apps on every device,
signs their packages and reference releases, writes each login's broker
credentials and the broker's password/ACL files, and records it all in
``manifest.json`` (layout: :mod:`nodes.deployment`).

The directory is built next to ``out`` and renamed into place at the end, so an
interrupted run never leaves a half-provisioned deployment behind: it leaves a
staging directory, and the run is simply repeated. So the files of the staging
tree are written without a fsync each (tens of thousands for a large fleet,
most of the time the command took) and made durable together by one sync
before the rename, then the rename by a fsync of the parent directory. The offline
keys (root, update, platform, issuer) go to a directory of their own, by
default ``{out}.offline`` beside it: nothing a node reads holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from broker import (
    BACKENDS,
    CLUSTER_SIZE,
    HOST,
    PORTS_PER_MEMBER,
    PROVISION_ONLY,
    default_backend,
    free_port,
    free_ports,
)
from broker.identities import BrokerIdentity, write_amqtt_auth, write_mosquitto_auth
from broker.nats import write_nats_auth
from broker.rabbitmq import write_rabbitmq_definitions
from nodes.deployment import (
    MANIFEST_FORMAT,
    MAX_REPLICAS,
    PUBLIC_FILE_MODE,
    SECRET_FILE_MODE,
    AccountEntry,
    BrokerSettings,
    Deployment,
    DeviceEntry,
    Manifest,
    OfflineKeys,
    canonical_json,
    keys_to_bytes,
    make_private_dir,
    parse_node_id,
)
from nodes.sql import POSTGRESQL, parse_db_url
from nodes.store import create_unsynced, sync_dir, sync_tree
from protocol.certs import ISSUER_ROLE, PLATFORM, ROOT, UPDATE, CertBody, Certificate, issue, sign_revocations
from protocol.errors import ConfigError
from protocol.keys import KeyPair
from protocol.measure import APP, CLIENT, measure
from protocol.records import PACKAGE_DOMAIN, RELEASE_DOMAIN, Package, Release, sign_record
from protocol.topics import DEVICE_ROLES, SERVER_ROLES, node_id, server_replica

from .cli_common import add_examples, add_json_argument
from .client_install import write_client_install
from .tls_material import write_tls

CURRENCY, EXPONENT = "EUR", 2
DEFAULT_APPS = ("wallet", "transit")
MERCHANTS = ("shop-1", "shop-2", "shop-3")
DEFAULT_OPENING_BALANCE = 100_000  # 1000.00 EUR
DEFAULT_VALIDITY_DAYS = 365
APP_LIMIT = 50_000  # per payment, minor units
CLIENT_NAME, INITIAL_VERSION = "trustpay-client", "1.0.0"
CLOCK_SKEW_S = 60  # certificates start a minute early so a slightly slow clock accepts them
DATABASES = {"trust": "platform/trust.sqlite", "ledger": "platform/ledger.sqlite"}


def device_ids(count: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(1, count + 1)]


def provision(
    out: Path,
    devices: int,
    *,
    apps: Sequence[str] = DEFAULT_APPS,
    broker_port: int | None = None,
    backend: str | None = None,
    opening_balance: int = DEFAULT_OPENING_BALANCE,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
    force: bool = False,
    now_ms: int | None = None,
    offline: Path | None = None,
    tls: bool = False,
    db: str | None = None,
    replicas: int = 1,
) -> Manifest:
    """Create the deployment ``out`` and its offline keys directory; return the manifest.

    ``db``: the servers' database (``--db``), a ``postgresql://`` URL both roles share (each in its
    own schema); default: a SQLite file per role inside the deployment.
    ``replicas``: identities per server role (``trust-server``, ``trust-server.2`` ...),
    each with its own signing key, certificate and broker login; the replicas of a
    role share its box (sealing) key, so a device seals once to the role.

    ``offline`` defaults to ``{out}.offline`` beside ``out``. A non-empty
    ``out`` or ``offline`` is refused unless ``force`` (then it is replaced).
    """
    out = Path(out).absolute()  # so "." still has a name and a parent to stage beside
    offline_dir = OfflineKeys.of(out, offline).root.absolute()
    backend = backend or default_backend()
    _check_options(devices, apps, broker_port, backend, opening_balance, validity_days)
    _check_apart(out, offline_dir)
    _check_target(out, force)
    _check_target(offline_dir, force, "--offline")
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    if broker_port is None:  # a NATS cluster's members listen on a block of ports (broker.nats)
        broker_port = free_ports(CLUSTER_SIZE * PORTS_PER_MEMBER) if backend == "nats" else free_port()
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ConfigError(f"--replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
    manifest = _manifest(now_ms, devices, apps, backend, broker_port, opening_balance)
    manifest = dataclasses.replace(manifest, replicas=replicas)
    if db is not None:
        manifest = dataclasses.replace(manifest, databases=_databases(db))
    if tls:  # mqtts with client certificates (nodes.tls); the embedded broker stays plain
        if backend != "mosquitto":
            raise ConfigError("--tls needs the mosquitto backend: the embedded amqtt broker has no TLS here")
        manifest = dataclasses.replace(manifest, broker=dataclasses.replace(manifest.broker, tls=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    offline_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".provisioning", dir=out.parent))
    keys_staging = Path(
        tempfile.mkdtemp(prefix=f".{offline_dir.name}.", suffix=".provisioning", dir=offline_dir.parent)
    )
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; secrets are guarded by their own 0700 dirs
        _build(Deployment(staging), OfflineKeys(keys_staging), manifest, now_ms, validity_days)
        sync_tree()  # every staged file durable before either tree is renamed into place
        _replace(offline_dir, keys_staging)
        _replace(out, staging)
        sync_dir(offline_dir.parent)
        sync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(keys_staging, ignore_errors=True)
        raise
    return manifest


def _databases(url: str) -> dict[str, str]:
    """Both roles on the database at ``url``; a password is refused, as the manifest is no secret."""
    if parse_db_url(url).kind == POSTGRESQL and urlsplit(url).password is not None:
        raise ConfigError(
            "--db: leave the password out of the URL (the manifest is not a secret); "
            "give it to each server in PGPASSWORD or ~/.pgpass"
        )
    return {"trust": url, "ledger": url}


def _replace(target: Path, built: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # empty, or force was given
    elif target.exists() or target.is_symlink():
        target.unlink()
    built.rename(target)


def _check_apart(out: Path, offline: Path) -> None:
    """The offline keys must not end up where the running deployment (or its copy) is."""
    out_r, offline_r = out.resolve(), offline.resolve()
    if offline_r == out_r or out_r in offline_r.parents or offline_r in out_r.parents:
        raise ConfigError(
            f"the offline keys directory {offline} must be outside the deployment {out} (and not hold it)"
        )


def _check_options(
    devices: int, apps: Sequence[str], port: int | None, backend: str, balance: int, days: int
) -> None:
    if not 1 <= devices <= 99_999:
        raise ConfigError(f"--devices must be between 1 and 99999, not {devices}")
    if not apps or len(set(apps)) != len(apps):
        raise ConfigError("give at least one app, each once")
    for app in apps:
        # an app name becomes a directory and part of an account and a release file name
        if not app or not all(c.isalnum() or c == "_" for c in app):
            raise ConfigError(f"app name {app!r} must be letters, digits or '_'")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--broker-port {port} is not a TCP port (1-65535)")
    if backend not in (*BACKENDS, *PROVISION_ONLY):
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS + PROVISION_ONLY)}, not {backend!r}")
    if balance < 0:
        raise ConfigError(f"--opening-balance must not be negative, not {balance}")
    if days < 1:
        raise ConfigError(f"certificate validity must be at least one day, not {days}")


def _check_target(out: Path, force: bool, option: str = "--out") -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"{out} exists and is not empty; choose another {option} or pass --force")
    resolved = out.resolve()
    # --force deletes a tree: never one that holds the caller, their home or the filesystem
    if resolved in (Path("/"), Path.home().resolve()) or resolved in Path.cwd().resolve().parents:
        raise ConfigError(f"refusing to replace {out}: it contains the current directory or is a home/root")
    if resolved == Path.cwd().resolve():
        raise ConfigError(f"refusing to replace {out}: it is the current directory")


def _manifest(
    now_ms: int, count: int, apps: Sequence[str], backend: str, port: int, balance: int
) -> Manifest:
    devices = tuple(
        DeviceEntry(
            device=dev,
            nodes={role.value: node_id(role, dev) for role in DEVICE_ROLES},
            apps=tuple(apps),
            accounts={app: f"{dev}:{app}" for app in apps},
        )
        for dev in device_ids(count)
    )
    payers = tuple(
        AccountEntry(account, "payer", CURRENCY, balance) for d in devices for account in d.accounts.values()
    )
    return Manifest(
        format=MANIFEST_FORMAT,
        created_ms=now_ms,
        currency=CURRENCY,
        exponent=EXPONENT,
        broker=BrokerSettings(backend, HOST, port),
        devices=devices,
        servers={role.value: node_id(role) for role in SERVER_ROLES},
        accounts=payers,
        merchants=tuple(AccountEntry(m, "merchant", CURRENCY, 0) for m in MERCHANTS),
        databases=dict(DATABASES),
    )


def _stage_file(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> Path:
    """Create a file of the staging tree (module docstring: synced once, before the rename).

    Its directory must exist already: made once by the caller, not probed per file.
    """
    create_unsynced(path, data, mode)
    return path


def _stage_secret(path: Path, data: bytes) -> Path:
    """Every key or password file of the staging tree: owner read/write only."""
    return _stage_file(path, data, SECRET_FILE_MODE)


@dataclass
class _Authority:
    """Issues certificates with unique, increasing serials and one validity window."""

    not_before: int
    not_after: int
    serial: int = 0
    issued: dict[str, tuple[Certificate, KeyPair]] = field(default_factory=dict)

    def issue(
        self, subject: str, role: str, device: str = "", box_of: str | None = None
    ) -> tuple[Certificate, KeyPair]:
        """A new key pair and its certificate; ``box_of``: share that subject's box key (replicas)."""
        keys = KeyPair.generate()
        if box_of is not None:
            keys = KeyPair(keys.sign_seed, self.issued[box_of][1].box_secret)
        self.serial += 1
        if role == ROOT:
            issuer_name, issuer_serial, issuer_keys = subject, self.serial, keys  # self-issued
        else:
            # the offline certificates' subjects are their role names, so the issuer is found by role
            issuer_name = ISSUER_ROLE[role]
            issuer_cert, issuer_keys = self.issued[issuer_name]
            issuer_serial = issuer_cert.serial
        body = CertBody(
            serial=self.serial,
            subject=subject,
            role=role,
            device=device,
            sign_key=keys.sign_public,
            box_key=keys.box_public,
            not_before=self.not_before,
            not_after=self.not_after,
            issuer=issuer_name,
            issuer_serial=issuer_serial,
        )
        cert = issue(body, issuer_keys)
        self.issued[subject] = (cert, keys)
        return cert, keys


def _build(dep: Deployment, offline: OfflineKeys, manifest: Manifest, now_ms: int, days: int) -> None:
    now_s = now_ms // 1000
    for directory in (dep.public_dir, dep.certs_dir, dep.nodes_dir, dep.devices_dir, dep.releases_dir):
        directory.mkdir(parents=True)
    for directory in (offline.root, dep.broker_dir, dep.platform_dir, dep.logs_dir):
        make_private_dir(directory)
    ca = _Authority(now_s - CLOCK_SKEW_S, now_s + days * 86_400)
    # issuers first, in chain order: each one's certificate is needed to issue the next
    for name, role in ((ROOT, ROOT), (UPDATE, UPDATE), (PLATFORM, PLATFORM), ("issuer", "issuer")):
        cert, keys = ca.issue(name, role)
        _stage_file(dep.public_dir / f"{name}.cert", cert.to_bytes())
        _stage_secret(offline.key_path(name), keys_to_bytes(keys))
    _, root_keys = ca.issued[ROOT]
    _stage_file(dep.crl_path, sign_revocations(0, now_s, (), root_keys).to_bytes())
    identities = [_install_node(dep, ca, nid) for nid in manifest.login_ids()]
    update_cert, _ = ca.issued[UPDATE]
    _, issuer_keys = ca.issued["issuer"]
    for device in manifest.devices:
        _stage_file(dep.update_cert_path(device.device), update_cert.to_bytes())
        _install_payloads(dep, device, issuer_keys)
    _write_releases(dep, manifest, issuer_keys, now_ms)
    if manifest.broker.backend == "mosquitto":
        write_mosquitto_auth(dep.broker_dir, identities)
    elif manifest.broker.backend == "nats":
        # every member includes the same logins and permissions (rewritten at each start)
        write_nats_auth(dep.broker_dir, identities)
    elif manifest.broker.backend == "rabbitmq":  # run by the operator: rabbitmqctl import_definitions
        write_rabbitmq_definitions(dep.broker_dir, identities)
    else:
        # amqtt keeps its topic ACL in the config the broker writes at start (broker.embedded)
        write_amqtt_auth(dep.broker_dir, identities)
    if manifest.broker.tls:
        write_tls(dep, offline, manifest.login_ids(), now_s, days)
    _stage_file(dep.manifest_path, manifest.to_text().encode())


def _install_node(dep: Deployment, ca: _Authority, nid: str) -> BrokerIdentity:
    role, device = parse_node_id(nid)
    # a server's replicas seal with the first one's box key, sign with their own
    first = node_id(role) if role in SERVER_ROLES else nid
    cert, keys = ca.issue(nid, role.value, device or "", box_of=first if first != nid else None)
    make_private_dir(dep.node_dir(nid))
    make_private_dir(dep.state_dir(nid))
    _stage_secret(dep.node_key_path(nid), keys_to_bytes(keys))
    _stage_file(dep.node_cert_path(nid), cert.to_bytes())
    _stage_file(dep.cert_path(nid), cert.to_bytes())
    replica = server_replica(nid)
    identity = BrokerIdentity.for_node(role, device, replica=replica[1] if replica else 1)
    creds = {"username": identity.username, "password": identity.password}
    _stage_secret(dep.broker_credentials_path(nid), json.dumps(creds).encode() + b"\n")
    return identity


def _payload(name: str) -> bytes:
    return resources.files("ops.payload").joinpath(name).read_bytes()


def client_static(default_app: str = DEFAULT_APPS[0]) -> dict[str, object]:
    return {
        "name": CLIENT_NAME,
        "version": INITIAL_VERSION,
        "currency": CURRENCY,
        "exponent": EXPONENT,
        "default_app": default_app,
    }


def app_static(app: str) -> dict[str, object]:
    return {"name": app, "version": INITIAL_VERSION, "currency": CURRENCY, "limit": APP_LIMIT}


def _install_payloads(dep: Deployment, device: DeviceEntry, issuer_keys: KeyPair) -> None:
    client = dep.client_dir(device.device)
    client.mkdir(parents=True)
    write_client_install(dep.client_code_dir(device.device), _stage_file)
    _stage_file(client / "static.json", canonical_json(client_static(device.apps[0])))
    _stage_file(client / "dynamic.json", canonical_json({"attempts": 0, "last_order": ""}))
    code = _payload("app_code.py")
    for app in device.apps:
        app_dir = dep.app_dir(device.device, app)
        app_dir.mkdir(parents=True)
        static = canonical_json(app_static(app))
        _stage_file(app_dir / "code.py", code)
        _stage_file(app_dir / "static.json", static)
        _stage_file(app_dir / "dynamic.json", canonical_json({"counter": 0, "last_order": ""}))
        m = measure(APP, app, INITIAL_VERSION, code, static, b"")
        package = Package(app, INITIAL_VERSION, m.code, m.static)
        _stage_file(app_dir / "package.sig", sign_record(package, PACKAGE_DOMAIN, issuer_keys).to_bytes())


def _write_releases(dep: Deployment, manifest: Manifest, issuer_keys: KeyPair, now_ms: int) -> None:
    """One reference measurement per released component, from the bytes just installed."""
    first = manifest.devices[0].device
    components = [(CLIENT, CLIENT_NAME, dep.read_client(first))]
    components += [(APP, app, dep.read_app(first, app)) for app in manifest.devices[0].apps]
    for kind, name, files in components:
        m = measure(kind, name, INITIAL_VERSION, files.code, files.static, files.dynamic)
        release = Release(kind, name, INITIAL_VERSION, m.code, m.static, False, now_ms)
        blob = sign_record(release, RELEASE_DOMAIN, issuer_keys).to_bytes()
        _stage_file(dep.release_path(kind, name, INITIAL_VERSION), blob)


# -- command line (registered in ops.cli) ---------------------------------------------

HELP = "create a deployment directory: keys, certificates, devices, broker logins"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--devices", type=int, required=True, help="number of devices")
    parser.add_argument("--broker-port", type=int, default=None, help="default: a free port now")
    parser.add_argument(
        "--backend",
        "--broker",
        dest="backend",
        choices=BACKENDS + PROVISION_ONLY,
        default=None,
        help="default: mosquitto if installed; nats: a three-member NATS cluster; "
        "rabbitmq: its logins only, to load into a RabbitMQ you run (README)",
    )
    parser.add_argument(
        "--opening-balance",
        type=int,
        default=DEFAULT_OPENING_BALANCE,
        help=f"minor units per payer account (default {DEFAULT_OPENING_BALANCE})",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mqtts: a broker certificate and a client certificate per login (mosquitto only)",
    )
    add_json_argument(parser, "print the manifest as JSON")
    parser.add_argument(
        "--offline",
        type=Path,
        default=None,
        help="directory for the offline keys (root, update, platform, issuer); default: OUT.offline",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out or --offline")
    parser.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="the servers' database: postgresql://user@host:port/db, shared by replicas "
        "(default: a SQLite file per server in the deployment)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="identities per server role (trust-server, trust-server.2, ...) for `up --replicas N`",
    )
    add_examples(
        parser,
        "trustpay provision --out deploy --devices 2          # ./deploy: found by every command",
        "trustpay provision --out /srv/tp --devices 100 --tls --json   # then TRUSTPAY_DEPLOY=/srv/tp",
        "trustpay provision --out deploy --devices 2 --broker nats   # a clustered broker (NATS, 3 members)",
        "trustpay provision --out deploy --devices 4 --replicas 2   # then `trustpay up --replicas 2`",
    )


def run(args: argparse.Namespace) -> int:
    manifest = provision(
        args.out,
        args.devices,
        broker_port=args.broker_port,
        backend=args.backend,
        opening_balance=args.opening_balance,
        force=args.force,
        offline=args.offline,
        tls=args.tls,
        db=args.db,
        replicas=args.replicas,
    )
    if args.json:
        print(manifest.to_text(), end="")
        return 0
    b = manifest.broker
    devices = [d.device for d in manifest.devices]
    shown = ", ".join(devices[:3]) + (", ..." if len(devices) > 3 else "")
    print(f"provisioned {args.out}")
    print(f"  devices:  {len(devices)} ({shown}), apps {', '.join(manifest.devices[0].apps)}")
    print(f"  accounts: {len(manifest.accounts)} payers, {len(manifest.merchants)} merchants ({CURRENCY})")
    if manifest.replicas > 1:
        first = ", ".join(manifest.node_ids()[: manifest.replicas])
        print(f"  servers:  {manifest.replicas} replicas of each role ({first}, ...)")
    print(f"  broker:   {b.backend} on {b.host}:{b.port}{' (mqtts, client certificates)' if b.tls else ''}")
    offline = OfflineKeys.of(args.out, args.offline).root
    print(f"  offline keys (root, update, platform, issuer): {offline} (keep it off the servers)")
    return 0
