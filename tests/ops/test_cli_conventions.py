"""The conventions every ``trustpay`` command follows (ops.cli, ops.cli_common): options anywhere on
the line, ``--deploy`` from $TRUSTPAY_DEPLOY or ./deploy, ``--json`` machine output, examples under
``--help``. No broker: the live client run is in tests/e2e/test_cli_options.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.deployment import Deployment
from nodes.ledger import ledger_at
from ops import cli
from ops.cli_common import DEPLOY_ENV, resolve_deploy
from ops.provision import provision

from .test_launcher import NODES, deploy, finish, lines_until, run_up

REPO = Path(__file__).resolve().parents[2]
# these make their own deployment (--out, a temporary one); every other command reads one
MAKE_THEIR_OWN_DEPLOYMENT = {"provision", "bench", "demo", "chaos fuzz", "chaos run"}


@pytest.fixture(scope="module")
def unmeasured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment no node ran on: the client's boot path refuses it (exit 3), saying where it looked."""
    root = tmp_path_factory.mktemp("conventions") / "deploy"
    provision(root, 1, broker_port=1, backend="amqtt")
    return root


# -- --help shows examples ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_commands_help_shows_an_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    examples = out.split("examples:\n", 1)[1]  # IndexError when there is none
    first = examples.splitlines()[0]
    assert first.startswith(f"  trustpay {name}"), first  # kept as written (RawDescriptionHelpFormatter)
    assert "--json" in out  # every command takes --json
    assert ("--deploy DIR" in out) != (name in MAKE_THEIR_OWN_DEPLOYMENT)


def test_every_command_that_reads_a_deployment_takes_deploy_and_json() -> None:
    for name in cli.COMMANDS:
        options = {o for a in cli.command_parser(name)._actions for o in a.option_strings}
        assert "--json" in options, name
        assert ("--deploy" in options) != (name in MAKE_THEIR_OWN_DEPLOYMENT), name


# -- options wherever they stand -------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        # the line: --json after the payment's words was the app's name
        (
            ["client", "--deploy", "D", "--device", "X", "pay", "1.25", "shop-1", "--json"],
            {"words": ["pay", "1.25", "shop-1"], "json": True, "device": "X"},
        ),
        (
            ["client", "pay", "--device", "X", "1.25", "--deploy", "D", "shop-1", "wallet"],
            {"words": ["pay", "1.25", "shop-1", "wallet"], "json": False, "device": "X"},
        ),
        # "--" still passes on a word that starts with a dash; a negative amount needs none
        (["client", "--deploy", "D", "pay", "1.25", "--", "--json"], {"words": ["pay", "1.25", "--json"]}),
        (["client", "--deploy", "D", "pay", "-1", "shop-1"], {"words": ["pay", "-1", "shop-1"]}),
        (
            ["release", "app", "--deploy", "D", "wallet", "--json", "1.1.0", "NEW", "--withdraw"],
            {"kind": "app", "name": "wallet", "version": "1.1.0", "path": Path("NEW"), "withdraw": True},
        ),
        (
            ["revoke", "dev-0001", "--json", "dev-0002.chip", "--deploy", "D"],
            {"targets": ["dev-0001", "dev-0002.chip"], "json": True},
        ),
        (
            ["ping", "trust-server", "--json", "dev-0001.tm", "--deploy", "D"],
            {"nodes": ["trust-server", "dev-0001.tm"], "json": True},
        ),
        (["node", "chip", "--json", "--deploy", "D", "--device", "dev-0002"], {"role": "chip", "json": True}),
        (["bench", "micro", "--json", "--n", "5"], {"what": "micro", "json": True, "n": 5}),
        (["ledger", "--json", "--deploy", "D"], {"json": True}),
        (["watch", "--all", "--deploy", "D", "--json"], {"all": True, "json": True}),
        (["provision", "--json", "--out", "o", "--devices", "2"], {"json": True, "devices": 2}),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_options_after_and_between_positionals_are_options(
    words: list[str], expected: dict[str, object]
) -> None:
    args = cli.parse(words)  # a --deploy given is taken as it is: the command checks it
    assert {k: getattr(args, k) for k in expected} == expected
    if "--deploy" in words:
        assert args.deploy == Path("D")


def test_an_unknown_option_after_the_words_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["client", "--deploy", "D", "pay", "1.25", "shop-1", "--jsn"]) == cli.EXIT_CONFIG
    assert "unrecognized arguments: --jsn" in capsys.readouterr().err


# -- --deploy: given, else $TRUSTPAY_DEPLOY, else ./deploy -----------------------------------------


def test_resolve_deploy_prefers_the_option_then_the_variable_then_dot_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deploy").mkdir()
    (tmp_path / "elsewhere").mkdir()
    assert resolve_deploy(Path("given"), {DEPLOY_ENV: "elsewhere"}) == Path("given")
    assert resolve_deploy(None, {DEPLOY_ENV: "elsewhere"}) == Path("elsewhere")
    assert resolve_deploy(None, {}) == Path("deploy")
    assert resolve_deploy(None, {DEPLOY_ENV: ""}) == Path("deploy")  # set but empty: not set


def test_a_variable_naming_nothing_is_an_error_not_a_fall_back_to_dot_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deploy").mkdir()  # would be used by a quiet fall back: another deployment
    with pytest.raises(ValueError, match=r"\$TRUSTPAY_DEPLOY is 'gone', which is not a directory"):
        resolve_deploy(None, {DEPLOY_ENV: "gone"})


def run_trustpay(cwd: Path, *words: str, deploy_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DEPLOY_ENV}
    env["PYTHONPATH"] = str(REPO)  # the worktree's code, from any working directory
    if deploy_env is not None:
        env[DEPLOY_ENV] = deploy_env
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *words],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def disabled_reason(done: subprocess.CompletedProcess[str]) -> str:
    """The client's JSON refusal (exit 3): the trust module never measured this install."""
    assert done.returncode == 3, done
    result = json.loads(done.stdout)
    assert result["status"] == "disabled"
    return str(result["reason"])


def test_a_command_without_deploy_uses_dot_deploy_in_its_working_directory(unmeasured: Path) -> None:
    done = run_trustpay(unmeasured.parent, "client", "balance", "--json")
    # the reason names the trust module's record under the deployment it found
    assert "deploy/nodes/dev-0001.tm/state/client.measured" in disabled_reason(done)


def test_a_command_without_deploy_uses_trustpay_deploy(unmeasured: Path, tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()  # an empty ./deploy: the variable wins over it
    done = run_trustpay(tmp_path, "client", "balance", "--json", deploy_env=str(unmeasured))
    assert f"{unmeasured}/nodes/dev-0001.tm/state/client.measured" in disabled_reason(done)


def test_without_deploy_variable_or_dot_deploy_the_error_names_all_three(tmp_path: Path) -> None:
    for words in (["client", "balance"], ["ledger", "--json"]):
        done = run_trustpay(tmp_path, *words)
        assert done.returncode == cli.EXIT_CONFIG, done
        assert done.stdout == ""
        assert "give --deploy DIR, or set $TRUSTPAY_DEPLOY, or run where ./deploy exists" in done.stderr
        assert str(tmp_path) in done.stderr


# -- --json parses -----------------------------------------------------------------------------


def test_provision_json_is_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert cli.main(["provision", "--devices", "2", "--out", str(out), "--backend", "amqtt", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in manifest["devices"]] == ["dev-0001", "dev-0002"]


def test_ledger_json_is_one_json_object(tmp_path: Path) -> None:
    provision(tmp_path / "deploy", 1, broker_port=1, backend="amqtt")
    dep = Deployment(tmp_path / "deploy")

    async def seed() -> None:  # the ledger as a payment-server leaves it at start
        ledger = ledger_at(dep.ledger_db)
        await ledger.open()
        try:
            await ledger.seed(dep.load_manifest())
        finally:
            await ledger.close()

    asyncio.run(seed())
    done = run_trustpay(tmp_path, "ledger", "--json")  # ./deploy
    assert done.returncode == 0, done
    ledger = json.loads(done.stdout)
    assert ledger["payments"] == [] and ledger["total"] == sum(a["balance"] for a in ledger["accounts"])


def test_client_json_refusal_is_one_json_object(unmeasured: Path) -> None:
    done = run_trustpay(REPO, "client", "--json", "--deploy", str(unmeasured), "pay", "1.25", "shop-1")
    assert "has not checked this client yet" in disabled_reason(done)


def test_bench_json_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "micro", "--n", "3", "--backend", "amqtt", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out)["ping.frame_bytes"] > 0


async def test_up_json_prints_one_json_event_per_line_and_the_text_on_stderr(tmp_path: Path) -> None:
    proc = await run_up(deploy(tmp_path, "amqtt"), "--json")
    try:
        seen = await lines_until(proc, '"event": "all_up"')
        proc.send_signal(signal.SIGTERM)
        code, out, err = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, err
    events = [json.loads(line) for line in [*seen, *out.splitlines()]]
    assert [e["event"] for e in events[:2]] == ["broker", "starting"]
    assert {e["node"] for e in events if e["event"] == "up"} == NODES
    assert {e["node"] for e in events if e["event"] == "down"} == NODES
    assert events[-1] == {"event": "stopped", "nodes": 4, "broker": True, "exit": 0}
    assert "all 4 nodes up" in err  # the lines for a person, kept off stdout


async def test_broker_and_revoke_json_on_a_running_broker(tmp_path: Path) -> None:
    dep = deploy(tmp_path, "amqtt")
    broker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "broker", "--json", "--deploy", str(dep.root),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        up = json.loads((await lines_until(broker, '"event": "up"'))[-1])
        assert (up["backend"], up["pid"] > 0) == ("amqtt", True)
        revoke = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "revoke", "dev-0001.chip", "--json",  # the manifest's broker
            cwd=tmp_path, env={**os.environ, DEPLOY_ENV: str(dep.root)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await revoke.communicate()
        assert revoke.returncode == 0, err.decode()
        result = json.loads(out)
        assert (result["number"], result["revoked"]) == (1, ["dev-0001.chip"])  # provision signs list 0
        assert result["crl"] == str(dep.crl_path)
        broker.send_signal(signal.SIGTERM)
        code, rest, err_text = await finish(broker)
    finally:
        if broker.returncode is None:
            broker.kill()
            await broker.wait()
    assert code == 0, err_text
    assert [json.loads(line) for line in rest.splitlines()] == [{"event": "stopped"}]


def test_demo_json_is_one_json_object_and_the_story_goes_to_stderr(tmp_path: Path) -> None:
    done = run_trustpay(tmp_path, "demo", "--json", "--backend", "amqtt", "--keep", str(tmp_path / "kept"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"passed": True, "exit": 0, "deployment": str(tmp_path / "kept")}
    assert "demo passed" in done.stderr
