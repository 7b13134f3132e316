"""The client's boot path: its copy of the measurement equals protocol.measure's, and it refuses
every install that is not the one the trust module measured. No event loop, no broker."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.deployment import Deployment, canonical_json, read_tree, write_file
from ops import client_boot
from ops.client_boot import BootRefused, Install, InstallFinder
from protocol.measure import CLIENT, install_image, measure

DEV = "dev-0001"

names = st.text(alphabet="abcxyz_.-0123456789", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=64), max_size=8
).filter(  # a path cannot be both a file and a directory
    lambda files: not any(other.startswith(path + "/") for path in files for other in files)
)


@settings(max_examples=200, deadline=None)
@given(trees, st.binary(max_size=32))
def test_the_boot_paths_digests_are_protocol_measures(files: dict[str, bytes], static: bytes) -> None:
    m = measure(CLIENT, "trustpay-client", "1.0.0", install_image(files), static, b"")
    assert client_boot.install_image(files) == install_image(files)
    assert client_boot.part_digest(client_boot.install_image(files), client_boot.CODE_TAG) == m.code
    assert client_boot.part_digest(static, client_boot.STATIC_TAG) == m.static


@settings(max_examples=50, deadline=None)
@given(trees)
def test_the_boot_path_reads_a_tree_as_the_trust_module_does(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "code"
        root.mkdir()
        for path, data in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        assert client_boot.read_tree(root) == read_tree(root) == files


def test_no_two_trees_share_an_image() -> None:
    # length prefixes: moving bytes between a name and a content, or between files, is seen
    assert install_image({"ab": b"c"}) != install_image({"a": b"bc"})
    assert install_image({"a": b"x", "b": b""}) != install_image({"a": b"x"})
    assert install_image({}) != install_image({"": b""})


def test_the_boot_path_finds_what_the_deployment_names(tmp_path: Path) -> None:
    dep = Deployment(tmp_path)
    assert client_boot.measured_path(tmp_path, DEV) == dep.client_measured_path(DEV)
    (dep.client_code_dir(DEV) / "nodes").mkdir(parents=True)
    (dep.client_code_dir(DEV) / "nodes" / "x.py").write_bytes(b"X = 1\n")
    (dep.client_dir(DEV) / "static.json").write_bytes(b"{}\n")
    install = client_boot.read_install(tmp_path, DEV)
    assert install.root == dep.client_code_dir(DEV)
    assert install.files == {"nodes/x.py": b"X = 1\n"} and install.static == b"{}\n"


# -- refusals ----------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> tuple[Install, Path]:
    """A small install and the trust module's record that it is good."""
    install = Install(tmp_path / "code", {"nodes/__init__.py": b"", "nodes/a.py": b"A = 1\n"}, b"{}\n")
    m = measure(CLIENT, "c", "1", install_image(install.files), install.static, b"")
    record = tmp_path / "client.measured"
    write_file(record, canonical_json({"code": m.code.hex(), "static": m.static.hex()}))
    return install, record


def test_the_measured_install_is_accepted(good: tuple[Install, Path]) -> None:
    client_boot.check_install(*good)  # raises if not


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda i: Install(i.root, {**i.files, "nodes/a.py": b"A = 2\n"}, i.static), "code is not"),
        (lambda i: Install(i.root, {**i.files, "nodes/extra.py": b""}, i.static), "code is not"),
        (lambda i: Install(i.root, {"nodes/a.py": b"A = 1\n"}, i.static), "code is not"),
        (lambda i: Install(i.root, i.files, b'{"x":1}\n'), "static data is not"),
    ],
    ids=["edited", "added", "removed", "static"],
)
def test_any_change_to_the_install_is_refused(
    good: tuple[Install, Path], change: object, reason: str
) -> None:
    install, record = good
    with pytest.raises(BootRefused, match=reason) as caught:
        client_boot.check_install(change(install), record)  # type: ignore[operator]
    assert caught.value.code == client_boot.EXIT_DISABLED


def test_no_record_or_a_refusal_from_the_trust_module_is_refused(good: tuple[Install, Path]) -> None:
    install, record = good
    record.unlink()
    with pytest.raises(BootRefused, match="has not checked this client yet"):
        client_boot.check_install(install, record)
    write_file(record, canonical_json({"refused": "client: code or static data match no released version"}))
    with pytest.raises(BootRefused, match="failed its integrity check: client: code or static data match"):
        client_boot.check_install(install, record)
    record.write_bytes(b"not json")
    with pytest.raises(BootRefused, match="unreadable"):
        client_boot.check_install(install, record)


def test_the_finder_serves_only_the_install(tmp_path: Path) -> None:
    install = Install(tmp_path, {"nodes/__init__.py": b"", "nodes/a.py": b"A = 1\n"}, b"")
    finder = InstallFinder(install)
    assert finder.find_spec("json", None) is None  # the standard library is the device's OS
    spec = finder.find_spec("nodes.a", None)
    assert spec is not None and spec.origin == str(tmp_path / "nodes" / "a.py")
    assert finder.find_spec("nodes", None) is not None
    for outside in ("nodes.chip", "protocol", "ops.provision", "broker"):
        with pytest.raises(ModuleNotFoundError, match="not part of the measured client install"):
            finder.find_spec(outside, None)


def test_a_refused_boot_says_why_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.provision import provision

    provision(tmp_path / "d", 1, broker_port=1, backend="amqtt")  # no trust module ran: no record
    args = argparse.Namespace(deploy=tmp_path / "d", device=None, json=False)

    assert client_boot.boot(args) == 3
    assert capsys.readouterr().out.startswith("Payment functions are disabled: the trust module has not")


def test_trustpay_client_imports_nothing_of_the_project_before_the_boot_path_checks(tmp_path: Path) -> None:
    # A whole process: `trustpay client` against a deployment whose client was never measured.
    from ops.provision import provision

    provision(tmp_path / "d", 1, broker_port=1, backend="amqtt")
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['trustpay', 'client', '--deploy', sys.argv[1], 'balance']\n"
        "try:\n    runpy.run_module('ops.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    project = ('protocol', 'nodes', 'ops', 'broker')\n"
        "    mods = sorted(m for m in sys.modules if m.split('.')[0] in project)\n"
        "    print(exc.code, ' '.join(mods))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "d")], capture_output=True, text=True, timeout=60
    )
    code, modules = done.stdout.splitlines()[-1].split(" ", 1)
    assert code == "3", done
    assert modules.split() == ["ops", "ops.cli_common", "ops.client_boot", "ops.client_cmd"]


def test_trustpay_node_client_points_to_trustpay_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ops.cli import main
    from ops.provision import provision

    provision(tmp_path / "d", 1, broker_port=1, backend="amqtt")

    assert main(["node", "client", "--deploy", str(tmp_path / "d")]) == 2
    assert "use `trustpay client --deploy DIR" in capsys.readouterr().err


BOOT_FILES = ("ops/__init__.py", "ops/cli.py", "ops/cli_common.py", "ops/client_cmd.py", "ops/client_boot.py")


def test_the_boot_path_imports_only_the_standard_library_and_itself() -> None:
    # Every import at any depth of a boot-path file, read from its source: a function-level import of
    # a third-party package or of project code (even one the client never reaches today) fails here.
    # ops.cli imports command modules by name (importlib); the subprocess test above checks that.
    import ast

    root = Path(__file__).resolve().parents[2]
    boot = {path.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for path in BOOT_FILES}
    found: dict[str, set[str]] = {}
    for path in BOOT_FILES:
        for node in ast.walk(ast.parse((root / path).read_text())):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: within ops
                names = {f"ops.{node.module}"} if node.module else {f"ops.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            else:
                continue
            found[path] = found.get(path, set()) | names
    outside = {
        path: sorted(n for n in names if n not in boot and n.partition(".")[0] not in sys.stdlib_module_names)
        for path, names in found.items()
    }
    # ops.cli's error handling for the other commands: the client reports its own errors and never gets
    # there (HANDLES_ERRORS; the subprocess test above sees no protocol module loaded)
    assert outside == {path: ["protocol.errors"] if path == "ops/cli.py" else [] for path in found}, outside
    assert "ops.cli_common" in found["ops/cli.py"] | found["ops/client_cmd.py"]  # the walk sees imports
