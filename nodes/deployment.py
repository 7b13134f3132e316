"""A provisioned deployment directory: where everything is, and typed loaders for it.

``ops.provision`` writes the layout; every node, the broker launcher and the
operator tools find their files only through :class:`Deployment`, so the layout
lives in one place. Paths are computed, never cached: the trust module deletes
tampered apps (A3) and an operator may rotate keys while nodes run.

Layout (relative to the deployment root)::

    manifest.json                     the typed Manifest below
    public/{root,update,platform,issuer}.cert, crl.bin, certs/{node_id}.cert
    nodes/{node_id}/node.key node.cert broker.json state/   (dir 0700)
    nodes/{device}.chip/update.cert   the chip's update certificate (claim 3)
    nodes/{device}.tm/state/client.measured   the client digests the trust module last found good
    devices/{device}/client/{code/,static.json,dynamic.json}   the whole client install:
                                      code/ holds every project module the client runs
    devices/{device}/chip/apps/{app}/{code.py,static.json,dynamic.json,package.sig}
    releases/{kind}-{name}-{version}.release          signed reference measurements
    broker/  platform/{trust,ledger}.sqlite  logs/{node_id}.log

The offline keys (root, update, platform, issuer) are not in it: they live in
a directory of their own (:class:`OfflineKeys`, by default ``{deployment}.offline``
beside it) that no node reads, so a running deployment that leaks gives away
no key that certifies, rotates, releases or revokes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from protocol.certs import ISSUER, Certificate, CertStore, RevocationList
from protocol.codec import pack, unpack
from protocol.errors import ConfigError, Malformed, Rejected, TrustpayError, WrongTopic
from protocol.keys import KeyPair
from protocol.measure import install_image
from protocol.topics import (
    DEVICE_ROLES,
    SERVER_ROLES,
    Role,
    check_device_id,
    node_id,
    replica_ids,
    server_replica,
)

from .store import write_atomic

if TYPE_CHECKING:
    from .sql import DbUrl

MANIFEST_FORMAT = 1
SECRET_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644
OFFLINE_KEYS = ("root", "update", "platform", "issuer")
PublicName = Literal["root", "update", "platform", "issuer"]
# Platform identities that are not nodes of the patent but still log in to the broker.
EXTRA_ROLES = (Role.MONITOR, Role.OPERATOR)
CLIENT_COMPONENT = "client"
_ROLE_BY_SHORT = {role.short: role for role in Role}


# -- files -----------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The one serialisation of static/dynamic data, so equal data has equal digests."""
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def write_file(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> Path:
    """Replace ``path`` atomically with ``data``; never readable beyond ``mode``, even briefly.

    Atomic because a crash mid-write of a dynamic.json would otherwise leave a
    component that fails its integrity check for a reason that is not tampering.
    """
    write_atomic(path, data, mode)
    return path


def write_secret(path: Path, data: bytes) -> Path:
    """Every key or password file goes through here: owner read/write only."""
    return write_file(path, data, SECRET_FILE_MODE)


def make_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def keys_to_bytes(keys: KeyPair) -> bytes:
    return pack({"sign_seed": keys.sign_seed, "box_secret": keys.box_secret})


def parse_node_id(nid: str) -> tuple[Role, str | None]:
    """Invert :func:`protocol.topics.node_id`: ``dev-0001.tm`` -> (trust-module, dev-0001)."""
    replica = server_replica(nid)
    if replica is not None:  # trust-server, trust-server.2, ...
        return replica[0], None
    device, dot, short = nid.rpartition(".")
    if dot:
        role = _ROLE_BY_SHORT.get(short)
        if role is None or not role.on_device:
            raise ConfigError(f"node id {nid!r}: {short!r} is not a device role (tm, chip, client)")
        return role, _device_id(device)
    try:
        role = Role(nid)
    except ValueError:
        raise ConfigError(f"node id {nid!r} names no trustpay role") from None
    if role.on_device:
        raise ConfigError(f"node id {nid!r}: a {role.value} node id is DEVICE.{role.short}")
    return role, None


def _device_id(device: str) -> str:
    try:
        return check_device_id(device)
    except WrongTopic as exc:  # a bad id here is a bad deployment or argument, not a bad frame
        raise ConfigError(exc.reason) from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} missing: {path} (re-run `trustpay provision` or restore it)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _read_secret(path: Path, what: str) -> bytes:
    data = _read(path, what)
    # Like ssh: a key others can read is a key that may have leaked; make the owner fix it.
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{what} {path} is readable by others; run `chmod 600 {path}`")
    return data


def _decode(path: Path, what: str, data: bytes, parse: Any) -> Any:
    try:
        return parse(data)
    except TrustpayError as exc:
        raise ConfigError(f"{what} {path} is corrupt: {exc.reason}") from exc


# -- manifest --------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    backend: str  # "mosquitto" | "amqtt"
    host: str
    port: int
    tls: bool = False  # mqtts with client certificates (nodes.tls); Mosquitto only


@dataclass(frozen=True)
class DeviceEntry:
    device: str
    nodes: Mapping[str, str]  # role value -> node id
    apps: tuple[str, ...]
    accounts: Mapping[str, str]  # app -> payer account

    def node(self, role: Role) -> str:
        return self.nodes[role.value]


@dataclass(frozen=True)
class AccountEntry:
    account: str
    kind: str  # "payer" | "merchant"
    currency: str
    opening_balance: int  # minor units


@dataclass(frozen=True)
class Manifest:
    format: int
    created_ms: int
    currency: str
    exponent: int
    broker: BrokerSettings
    devices: tuple[DeviceEntry, ...]
    servers: Mapping[str, str]  # role value -> node id
    accounts: tuple[AccountEntry, ...]
    merchants: tuple[AccountEntry, ...]
    databases: Mapping[str, str]  # "trust" | "ledger" -> path relative to the deployment
    replicas: int = 1  # identities provisioned per server role (``server_ids``)

    def server_ids(self, role: Role) -> tuple[str, ...]:
        """The node ids of ``role``'s provisioned replicas: ``servers[role]`` first, then ``{role}.2`` ..."""
        return (self.servers[role.value], *replica_ids(role, self.replicas)[1:])

    def device(self, device: str) -> DeviceEntry:
        for entry in self.devices:
            if entry.device == device:
                return entry
        raise ConfigError(f"device {device!r} is not in this deployment")

    def node_ids(self) -> tuple[str, ...]:
        """Every node of the patent: the servers, then each device's three nodes."""
        out = [nid for r in SERVER_ROLES for nid in self.server_ids(r)]
        out += [d.node(role) for d in self.devices for role in DEVICE_ROLES]
        return tuple(out)

    def login_ids(self) -> tuple[str, ...]:
        """Every broker login: the nodes plus the monitor and the operator."""
        return (*self.node_ids(), *(node_id(role) for role in EXTRA_ROLES))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_ms": self.created_ms,
            "currency": self.currency,
            "exponent": self.exponent,
            "broker": {
                "backend": self.broker.backend,
                "host": self.broker.host,
                "port": self.broker.port,
                **({"tls": True} if self.broker.tls else {}),
            },
            "devices": [
                {
                    "device": d.device,
                    "nodes": dict(d.nodes),
                    "apps": list(d.apps),
                    "accounts": dict(d.accounts),
                }
                for d in self.devices
            ],
            "servers": dict(self.servers),
            "accounts": [_account_json(a) for a in self.accounts],
            "merchants": [_account_json(a) for a in self.merchants],
            "databases": dict(self.databases),
            **({"replicas": self.replicas} if self.replicas != 1 else {}),
        }

    def to_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and check a manifest; a ``ValueError`` names the bad field."""
        top = _obj(data, "manifest")
        if _get(top, "format", int) != MANIFEST_FORMAT:
            raise ValueError(f"format {top['format']!r} is not {MANIFEST_FORMAT}")
        broker = _obj(top.get("broker"), "broker")
        return cls(
            format=MANIFEST_FORMAT,
            created_ms=_get(top, "created_ms", int),
            currency=_get(top, "currency", str),
            exponent=_get(top, "exponent", int),
            broker=BrokerSettings(
                _get(broker, "backend", str),
                _get(broker, "host", str),
                _get(broker, "port", int),
                _get(broker, "tls", bool) if "tls" in broker else False,
            ),
            devices=tuple(_device(d) for d in _get(top, "devices", list)),
            servers=_str_map(top, "servers"),
            accounts=tuple(_account(a) for a in _get(top, "accounts", list)),
            merchants=tuple(_account(a) for a in _get(top, "merchants", list)),
            databases=_str_map(top, "databases"),
            replicas=_replicas(top),
        )


MAX_REPLICAS = 16


def _replicas(top: dict[str, Any]) -> int:
    count = _get(top, "replicas", int) if "replicas" in top else 1
    if not 1 <= count <= MAX_REPLICAS:
        raise ValueError(f"replicas {count} is not between 1 and {MAX_REPLICAS}")
    return count


def _account_json(a: AccountEntry) -> dict[str, Any]:
    return {
        "account": a.account,
        "kind": a.kind,
        "currency": a.currency,
        "opening_balance": a.opening_balance,
    }


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    return value


def _get(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    # bool is an int in Python; a manifest saying "port": true is still wrong
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _str_map(obj: dict[str, Any], key: str) -> dict[str, str]:
    value = _get(obj, key, dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"field {key!r} must map names to strings")
    return dict(value)


def _device(value: Any) -> DeviceEntry:
    d = _obj(value, "device entry")
    apps = _get(d, "apps", list)
    if not all(isinstance(a, str) for a in apps):
        raise ValueError("device apps must be strings")
    return DeviceEntry(_get(d, "device", str), _str_map(d, "nodes"), tuple(apps), _str_map(d, "accounts"))


def _account(value: Any) -> AccountEntry:
    a = _obj(value, "account entry")
    return AccountEntry(
        _get(a, "account", str),
        _get(a, "kind", str),
        _get(a, "currency", str),
        _get(a, "opening_balance", int),
    )


# -- the directory -----------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """A node's broker login; the username is its node id."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ComponentFiles:
    """The three measured parts of the client or of one app (claim 2), as on disk."""

    code: bytes
    static: bytes
    dynamic: bytes


@dataclass(frozen=True)
class Deployment:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # fixed places
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    @property
    def certs_dir(self) -> Path:
        return self.public_dir / "certs"

    @property
    def crl_path(self) -> Path:
        return self.public_dir / "crl.bin"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def releases_dir(self) -> Path:
        return self.root / "releases"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def platform_dir(self) -> Path:
        return self.root / "platform"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def trust_db(self) -> Path:
        return self.platform_dir / "trust.sqlite"

    @property
    def ledger_db(self) -> Path:
        return self.platform_dir / "ledger.sqlite"

    def database(self, name: str, override: str | None = None) -> DbUrl:
        """Where role database ``name`` ("trust" | "ledger") lives: ``override`` (a node's ``--db``),
        else the manifest's entry. A path is relative to the deployment; a ``postgresql://`` URL is
        used as it is. Reads the manifest: call it while starting, not per request."""
        from .sql import parse_db_url  # the database drivers load only for the roles that use them

        if override is None:
            databases = self.load_manifest().databases
            if name not in databases:
                raise ConfigError(
                    f"the manifest of {self.root} names no {name!r} database: provision it again"
                )
            override = databases[name]
        return parse_db_url(override, base=self.root)

    # per name
    def public_cert_path(self, name: PublicName) -> Path:
        return self.public_dir / f"{name}.cert"

    def cert_path(self, nid: str) -> Path:
        """The public copy of a node's certificate, for the monitor and for audits."""
        return self.certs_dir / f"{nid}.cert"

    def node_dir(self, nid: str) -> Path:
        return self.nodes_dir / nid

    def node_key_path(self, nid: str) -> Path:
        return self.node_dir(nid) / "node.key"

    def node_cert_path(self, nid: str) -> Path:
        return self.node_dir(nid) / "node.cert"

    def broker_credentials_path(self, nid: str) -> Path:
        return self.node_dir(nid) / "broker.json"

    def state_dir(self, nid: str) -> Path:
        return self.node_dir(nid) / "state"

    def log_path(self, nid: str) -> Path:
        return self.logs_dir / f"{nid}.log"

    def update_cert_path(self, device: str) -> Path:
        return self.node_dir(node_id(Role.CHIP, _device_id(device))) / "update.cert"

    def device_dir(self, device: str) -> Path:
        return self.devices_dir / _device_id(device)

    def client_dir(self, device: str) -> Path:
        return self.device_dir(device) / "client"

    def client_code_dir(self, device: str) -> Path:
        """The client's modules (protocol/, nodes/): everything its process runs past the boot path."""
        return self.client_dir(device) / "code"

    def client_measured_path(self, device: str) -> Path:
        """Where the trust module leaves the client digests it found good, for the boot path to check."""
        return self.state_dir(node_id(Role.TRUST_MODULE, _device_id(device))) / "client.measured"

    def chip_dir(self, device: str) -> Path:
        return self.device_dir(device) / "chip"

    def apps_dir(self, device: str) -> Path:
        return self.chip_dir(device) / "apps"

    def app_dir(self, device: str, app: str) -> Path:
        if not app or "/" in app or app.startswith("."):
            raise ConfigError(f"app name {app!r} is not a plain name")
        return self.apps_dir(device) / app

    def package_sig_path(self, device: str, app: str) -> Path:
        return self.app_dir(device, app) / "package.sig"

    def release_path(self, kind: str, name: str, version: str) -> Path:
        return self.releases_dir / f"{kind}-{name}-{version}.release"

    # loaders
    def load_manifest(self) -> Manifest:
        if not self.manifest_path.is_file():
            raise ConfigError(
                f"{self.root} is not a trustpay deployment: manifest.json missing; "
                f"run `trustpay provision --out {self.root}`"
            )
        try:
            return Manifest.from_json(json.loads(_read(self.manifest_path, "manifest")))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise ConfigError(f"{self.manifest_path} is not a valid manifest: {exc}") from exc

    def load_keys(self, nid: str) -> KeyPair:
        return _load_keys(self.node_key_path(nid), f"key of {nid}")

    def load_cert(self, nid: str) -> Certificate:
        return self._cert(self.node_cert_path(nid), f"certificate of {nid}")

    def load_public_cert(self, nid: str) -> Certificate:
        """A node's certificate from the public copies, readable without the node's own directory."""
        return self._cert(self.cert_path(nid), f"public certificate of {nid}")

    def load_update_cert(self, device: str) -> Certificate:
        return self._cert(self.update_cert_path(device), f"update certificate in the chip of {device}")

    @overload
    def load_public(self, name: PublicName) -> Certificate: ...
    @overload
    def load_public(self, name: Literal["crl"]) -> RevocationList: ...
    def load_public(self, name: str) -> Certificate | RevocationList:
        if name == "crl":
            data = _read(self.crl_path, "revocation list")
            return _decode(self.crl_path, "revocation list", data, RevocationList.from_bytes)  # type: ignore[no-any-return]
        if name not in OFFLINE_KEYS:
            raise ConfigError(f"no public item {name!r}; choose crl or one of {', '.join(OFFLINE_KEYS)}")
        return self._cert(self.public_dir / f"{name}.cert", f"{name} certificate")

    def load_issuer(self, certs: CertStore, now_s: int) -> Certificate:
        """The issuer certificate, only if it chains to ``certs``' root, is current and not revoked.

        Everything the issuer signs (releases, app packages) is trusted through
        it, so a copy written over public/issuer.cert must not be believed.
        """
        path = self.public_cert_path("issuer")
        try:
            return certs.check_root_issued(self.load_public("issuer"), ISSUER, now_s)
        except Rejected as exc:
            raise ConfigError(
                f"the issuer certificate {path} is not one the root issued ({exc.reason}): "
                "restore it from the deployment's original public/issuer.cert"
            ) from exc

    def load_broker_credentials(self, nid: str) -> Login:
        path = self.broker_credentials_path(nid)
        try:
            creds = _obj(json.loads(_read_secret(path, f"broker credentials of {nid}")), "credentials")
            username, password = _get(creds, "username", str), _get(creds, "password", str)
        except ValueError as exc:
            raise ConfigError(f"broker credentials {path} are corrupt: {exc}") from exc
        if username != nid:
            raise ConfigError(f"broker credentials {path} are for {username!r}, not {nid!r}")
        return Login(username, password)

    def load_releases(self) -> list[bytes]:
        """Every signed release record (the client trust reports), in file-name order."""
        if not self.releases_dir.is_dir():
            raise ConfigError(f"releases directory {self.releases_dir} missing; re-run `trustpay provision`")
        return [_read(p, "release") for p in sorted(self.releases_dir.glob("*.release"))]

    def installed_apps(self, device: str) -> list[str]:
        """The apps now in the chip; fewer than the manifest lists once one was deleted (A3)."""
        apps = self.apps_dir(device)
        return sorted(p.name for p in apps.iterdir() if p.is_dir()) if apps.is_dir() else []

    def read_client(self, device: str) -> ComponentFiles:
        """The client install; its "code" is the image of the whole code/ tree (claim 2)."""
        directory = self.client_dir(device)
        return ComponentFiles(
            install_image(read_tree(self.client_code_dir(device))),
            _read(directory / "static.json", "client static data"),
            _read(directory / "dynamic.json", "client dynamic data"),
        )

    def read_client_data(self, device: str, name: Literal["static", "dynamic"]) -> bytes:
        """The client's static or dynamic data alone, without reading its code."""
        return _read(self.client_dir(device) / f"{name}.json", f"client {name} data")

    def read_app(self, device: str, app: str) -> ComponentFiles:
        return read_component(self.app_dir(device, app))

    def _cert(self, path: Path, what: str) -> Certificate:
        return _decode(path, what, _read(path, what), Certificate.from_bytes)  # type: ignore[no-any-return]


def _load_keys(path: Path, what: str) -> KeyPair:
    def parse(data: bytes) -> KeyPair:
        fields = unpack(data)
        if not isinstance(fields, dict) or set(fields) != {"sign_seed", "box_secret"}:
            raise Malformed("not a map of sign_seed and box_secret")
        return KeyPair(fields["sign_seed"], fields["box_secret"])

    return _decode(path, what, _read_secret(path, what), parse)  # type: ignore[no-any-return]


def default_offline_dir(deployment: Path) -> Path:
    """Where the offline keys go unless told otherwise: beside the deployment, never inside it."""
    root = Path(deployment).absolute()
    return root.with_name(f"{root.name}.offline")


@dataclass(frozen=True)
class OfflineKeys:
    """The offline keys (root, update, platform, issuer), in a directory no node reads.

    Only ``provision`` and the operator's ``release``, ``rotate-platform`` and
    ``revoke`` use them; on a real platform this directory sits on another
    machine or a removable disk.
    """

    root: Path

    @classmethod
    def of(cls, deployment: Path, offline: Path | None = None) -> OfflineKeys:
        """``offline`` if given, else the default directory beside ``deployment``."""
        return cls(Path(offline) if offline is not None else default_offline_dir(deployment))

    def key_path(self, name: str) -> Path:
        if name not in OFFLINE_KEYS:
            raise ConfigError(f"no offline key {name!r}; choose one of {', '.join(OFFLINE_KEYS)}")
        return self.root / f"{name}.key"

    def load(self, name: PublicName) -> KeyPair:
        if not self.root.is_dir():
            raise ConfigError(
                f"offline keys directory {self.root} missing: pass --offline with the directory "
                "`trustpay provision` wrote them to"
            )
        return _load_keys(self.key_path(name), f"offline {name} key")


def read_component(directory: Path) -> ComponentFiles:
    what = f"component {directory.name}"
    return ComponentFiles(
        _read(directory / "code.py", what),
        _read(directory / "static.json", what),
        _read(directory / "dynamic.json", what),
    )


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its "/"-separated relative path, whatever its name.

    Nothing is skipped, so a file added anywhere in an install changes its
    measurement. ``ops.client_boot`` reads a tree by these same rules.
    """
    if not root.is_dir():
        raise ConfigError(f"client install missing: {root} (re-run `trustpay provision` or restore it)")
    files: dict[str, bytes] = {}
    top = os.fspath(root)
    cut = len(os.path.join(top, ""))
    # plain strings, not Path objects: the trust module reads the whole install at every C7
    for directory, _subdirs, names in os.walk(top):
        for name in names:
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                data = _read(Path(path), "client install file")  # raises the same errors as before
            files[path[cut:].replace(os.sep, "/")] = data
    return files


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Decode a static/dynamic JSON object, as a ConfigError if it is not one."""
    try:
        return _obj(json.loads(data), what)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a JSON object: {exc}") from exc
