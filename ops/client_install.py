"""The client install: every project module the client process runs, as files for a device.

``trustpay client`` runs nothing of the project past its boot path
(``ops.client_boot``) that is not in ``devices/{device}/client/code/``, and
the trust module measures that whole tree. Which modules belong there is found
from the source itself: the static import closure of the entry point
(:mod:`nodes.client_main`) within the ``protocol`` and ``nodes`` packages, so a
module a later change makes the client import is installed and measured
without anyone keeping a list.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from nodes.deployment import write_file
from protocol.errors import ConfigError

CLIENT_ENTRY = "nodes.client_main"
INSTALL_PACKAGES = ("protocol", "nodes")
# The client may import neither: they hold provisioning, launcher, demo, bench and brokers.
FORBIDDEN_PACKAGES = ("ops", "broker")
MAX_MODULES = 500  # bounds the walk; the install has a few dozen


def client_install_files() -> dict[str, bytes]:
    """Relative path ("nodes/client.py") -> bytes, for every module the client can import."""
    files: dict[str, bytes] = {}
    todo = [CLIENT_ENTRY]
    for _ in range(MAX_MODULES):
        if not todo:
            return files
        module = todo.pop()
        path, source = _source(module)
        if path in files:
            continue
        files[path] = source
        todo += _parents(module) + _imports(module, path, source)
    raise ConfigError(f"the client imports more than {MAX_MODULES} project modules")


def _node(module: str) -> tuple[Traversable, str] | None:
    """Where ``module``'s source is in the installed packages, and its install path; None if no module."""
    top, *rest = module.split(".")
    if not rest:
        return resources.files(top).joinpath("__init__.py"), f"{top}/__init__.py"
    place = resources.files(top)
    for part in rest[:-1]:
        place = place.joinpath(part)
    path = "/".join([top, *rest])
    if place.joinpath(rest[-1]).is_dir():
        return place.joinpath(rest[-1], "__init__.py"), f"{path}/__init__.py"
    file = place.joinpath(f"{rest[-1]}.py")
    return (file, f"{path}.py") if file.is_file() else None


def _source(module: str) -> tuple[str, bytes]:
    found = _node(module)
    if found is None:
        raise ConfigError(f"the client imports {module}, which is not a module of the project")
    file, path = found
    return path, file.read_bytes()


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(module: str, path: str, source: bytes) -> list[str]:
    """The project modules ``module`` imports anywhere in its text (also inside functions)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append(base)
            # "from package import module" imports a module too
            names += [f"{base}.{a.name}" for a in node.names if _node_if_project(f"{base}.{a.name}")]
    out = []
    for name in names:
        top = name.split(".")[0]
        if top in FORBIDDEN_PACKAGES:
            raise ConfigError(f"{path} imports {name}: the client must not import {top}")
        if top in INSTALL_PACKAGES:
            out.append(name)
    return out


def _node_if_project(name: str) -> bool:
    return name.split(".")[0] in INSTALL_PACKAGES and _node(name) is not None


@functools.cache
def _install() -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted(client_install_files().items()))


def write_client_install(code_dir: Path, write: Callable[[Path, bytes], object] = write_file) -> None:
    """Install the client's modules in ``code_dir`` (a device's ``client/code``) with ``write``.

    ``write`` is the default atomic, fsynced writer; provisioning passes its
    staging writer (synced once for the whole deployment).
    """
    made: set[Path] = set()  # each directory once, not once per file (1,000 devices: 27,000 mkdirs)
    for path, data in _install():
        target = code_dir / path
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        write(target, data)
