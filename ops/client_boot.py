"""The client's boot path: the phone's OS loading the payment app, and nothing more.

``trustpay client`` runs these project files and no other outside the client
install: ``ops/__init__.py``, ``ops/cli.py`` (which imports only the chosen
command), ``ops/cli_common.py`` (the options every command shares),
``ops/client_cmd.py`` (the command line) and this module, all with the
standard library only. Here:

1. the whole install (``devices/{device}/client/code/`` and ``static.json``)
   is read into memory, once;
2. the digests of exactly those bytes are computed as :mod:`protocol.measure`
   computes them (:func:`install_image` repeats its few lines; a test pins the
   copy to the original);
3. they are compared with the digests the trust module last found good and
   left in its protected storage (``nodes/{device}.tm/state/client.measured``,
   written at A1 and C7);
4. on a match, the packages ``protocol`` and ``nodes`` are served from those
   bytes only (:class:`InstallFinder`; any other project module is refused),
   and the install's entry point :mod:`nodes.client_main` runs.

On anything else nothing of the install runs: the user reads "Payment
functions are disabled: <why>" and the exit status is 3, as at B5. So a client
whose code would rewrite its files once loaded never gets to run: its bytes
are checked before execution, and what executes is the checked buffer.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_CONFIG, EXIT_DISABLED = 2, 3
ENTRY = "nodes.client_main"
INSTALL_PACKAGES = ("protocol", "nodes")
PROJECT_PACKAGES = (*INSTALL_PACKAGES, "ops", "broker")
# protocol.measure's constants, repeated so the boot path imports no project code
IMAGE_TAG = b"trustpay-install-v1\x00"
DIGEST_SIZE = 32
CODE_TAG, STATIC_TAG = b"tp-code", b"tp-static"


class BootRefused(Exception):
    """The install may not run; ``reason`` says why, for the user."""

    def __init__(self, reason: str, code: int = EXIT_DISABLED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# -- measuring, as protocol.measure and nodes.deployment do ------------------------------------


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its "/"-separated relative path (rules of nodes.deployment.read_tree)."""
    if not root.is_dir():
        raise OSError(f"{root} is not a directory")
    files: dict[str, bytes] = {}
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def install_image(files: Mapping[str, bytes]) -> bytes:
    """protocol.measure.install_image: sorted paths, each path and content length-prefixed."""
    image = bytearray(IMAGE_TAG)
    for path in sorted(files):
        name, data = path.encode(), files[path]
        image += len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big") + data
    return bytes(image)


def part_digest(data: bytes, tag: bytes) -> bytes:
    """protocol.measure.digest, for a measurement's code or static part."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=tag).digest()


# -- the install ---------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    root: Path  # devices/{device}/client/code: where the bytes were read, for tracebacks
    files: Mapping[str, bytes]
    static: bytes


def resolve_device(deploy: Path, device: str | None) -> str:
    """The device the client runs for: ``device``, or the deployment's only one."""
    try:
        manifest = json.loads((deploy / "manifest.json").read_bytes())
        devices = [str(entry["device"]) for entry in manifest["devices"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BootRefused(f"{deploy} is not a trustpay deployment: {exc}", EXIT_CONFIG) from exc
    if device is None:
        if len(devices) != 1:
            raise BootRefused(f"--device is needed: this deployment has {len(devices)} devices", EXIT_CONFIG)
        return devices[0]
    if device not in devices:
        raise BootRefused(f"device {device!r} is not in this deployment", EXIT_CONFIG)
    return device


def read_install(deploy: Path, device: str) -> Install:
    client = deploy / "devices" / device / "client"
    try:
        return Install(client / "code", read_tree(client / "code"), (client / "static.json").read_bytes())
    except OSError as exc:
        raise BootRefused(f"the client install cannot be read: {exc}") from exc


def measured_path(deploy: Path, device: str) -> Path:
    """nodes.deployment.Deployment.client_measured_path."""
    return deploy / "nodes" / f"{device}.tm" / "state" / "client.measured"


def check_install(install: Install, measured: Path) -> None:
    """Refuse unless the install's bytes are those the trust module last found good."""
    try:
        record = json.loads(measured.read_bytes())
        if "refused" in record:
            raise BootRefused(f"the client failed its integrity check: {record['refused']}")
        code, static = bytes.fromhex(record["code"]), bytes.fromhex(record["static"])
    except FileNotFoundError:
        raise BootRefused(
            f"the trust module has not checked this client yet ({measured} missing); start it first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BootRefused(f"the trust module's record of the client is unreadable: {exc}") from exc
    if not hmac.compare_digest(part_digest(install_image(install.files), CODE_TAG), code):
        raise BootRefused("the client's code is not what the trust module measured")
    if not hmac.compare_digest(part_digest(install.static, STATIC_TAG), static):
        raise BootRefused("the client's static data is not what the trust module measured")


# -- running it ----------------------------------------------------------------------


class InstallFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``protocol`` and ``nodes`` from the checked bytes; refuses every other project module."""

    def __init__(self, install: Install) -> None:
        self.install = install

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in PROJECT_PACKAGES:
            return None  # the standard library and third-party packages: the device's OS
        base = fullname.replace(".", "/")
        for relative, is_package in ((f"{base}/__init__.py", True), (f"{base}.py", False)):
            if relative in self.install.files:
                spec = importlib.util.spec_from_loader(
                    fullname, self, origin=str(self.install.root / relative), is_package=is_package
                )
                assert spec is not None
                spec.has_location = True  # __file__ names the install's file, for tracebacks
                return spec
        raise ModuleNotFoundError(f"{fullname} is not part of the measured client install", name=fullname)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None and spec.origin is not None
        relative = Path(spec.origin).relative_to(self.install.root).as_posix()
        exec(compile(self.install.files[relative], spec.origin, "exec", dont_inherit=True), module.__dict__)


def boot(args: argparse.Namespace) -> int:
    """Check the install, then run its entry point with ``args``; the client's exit status."""
    deploy = Path(args.deploy)
    try:
        device = resolve_device(deploy, args.device)
        install = read_install(deploy, device)
        check_install(install, measured_path(deploy, device))
    except BootRefused as exc:
        return _refuse(exc, args.json)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in INSTALL_PACKAGES)
    if loaded:  # they would be used instead of the install's: a bug in the boot path
        return _refuse(BootRefused(f"the boot path already imported {', '.join(loaded)}", 1), args.json)
    sys.meta_path.insert(0, InstallFinder(install))
    entry = importlib.import_module(ENTRY)
    code: int = entry.main(args, device, install.static)
    return code


def _refuse(exc: BootRefused, as_json: bool) -> int:
    if exc.code != EXIT_DISABLED:
        print(f"trustpay: error: {exc.reason}", file=sys.stderr)
    elif as_json:
        text = f"Payment functions are disabled: {exc.reason}"
        print(json.dumps({"exit": exc.code, "message": text, "status": "disabled", "reason": exc.reason}))
    else:
        print(f"Payment functions are disabled: {exc.reason}")
    return exc.code
