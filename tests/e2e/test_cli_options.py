"""The CLI conventions against a live deployment: options after the payment's words, --deploy
from $TRUSTPAY_DEPLOY and ./deploy, --json from the client, ping, ledger, release and
rotate-platform. One backend: the command line is parsed before any broker is involved (the
payment itself is tested on both)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from nodes.deployment import canonical_json
from ops.cli_common import DEPLOY_ENV

from .conftest import DEV1, OPENING, WAIT_S, running_deployment

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


async def trustpay(cwd: Path, *words: str, deploy_env: str | None = None) -> tuple[int, list[str], str]:
    """``trustpay WORDS`` in ``cwd``: exit code, stdout lines, stderr."""
    env = {k: v for k, v in os.environ.items() if k != DEPLOY_ENV}
    env["PYTHONPATH"] = str(REPO)
    if deploy_env is not None:
        env[DEPLOY_ENV] = deploy_env
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", *words, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S * 3):
        out, err = await proc.communicate()
    return proc.returncode if proc.returncode is not None else -1, out.decode().splitlines(), err.decode()


async def test_json_after_the_payments_words_is_an_option_and_deploy_comes_from_env_or_dot_deploy(
    tmp_path: Path,
) -> None:
    async with running_deployment(tmp_path, "amqtt") as e2e:
        root, url = e2e.dep.root, e2e.launcher.broker_url
        assert root == tmp_path / "deploy"

        # the command line, --json last (it was the app's name: "unknown app --json")
        code, lines, err = await trustpay(
            REPO, "client", "--deploy", str(root), "--device", DEV1, "pay", "1.25", "shop-1", "--json",
            "--broker", url,
        )  # fmt: skip
        assert code == 0, (lines, err[-2000:])
        results = [json.loads(line) for line in lines]  # every line is JSON: --json took effect
        paid = results[-1]
        # the default app, not "--json"
        assert (paid["status"], paid["amount"], paid["payee"], paid["app"]) == (
            "confirmed",
            125,
            "shop-1",
            "wallet",
        )
        assert (await e2e.balances())[f"{DEV1}:wallet"] == OPENING - 125

        # no --deploy: $TRUSTPAY_DEPLOY from anywhere; options between the words
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        code, lines, err = await trustpay(
            elsewhere,
            "ping",
            "trust-server",
            "--json",
            "payment-server",
            "--broker",
            url,
            deploy_env=str(root),
        )
        assert code == 0, (lines, err[-2000:])
        assert [(p["node"], p["ok"]) for p in map(json.loads, lines)] == [
            ("trust-server", True),
            ("payment-server", True),
        ]

        # no --deploy and no variable: ./deploy of the working directory
        code, lines, err = await trustpay(tmp_path, "ledger", "--json")
        assert code == 0, err
        ledger = json.loads("\n".join(lines))
        assert [(p["order_id"], p["status"]) for p in ledger["payments"]] == [(paid["order_id"], "confirmed")]

        # release and rotate-platform --json: one object with every node's answer
        build = tmp_path / "wallet-1.0.1"
        build.mkdir()
        app = e2e.dep.app_dir(DEV1, "wallet")
        (build / "code.py").write_bytes((app / "code.py").read_bytes())
        static = json.loads((app / "static.json").read_bytes())
        (build / "static.json").write_bytes(canonical_json({**static, "version": "1.0.1"}))
        code, lines, err = await trustpay(tmp_path, "release", "app", "wallet", "1.0.1", str(build), "--json")
        assert code == 0, err
        (released,) = map(json.loads, lines)
        assert (released["version"], released["withdrawn"]) == ("1.0.1", False)
        assert released["path"] == "deploy/releases/app-wallet-1.0.1.release"  # found from ./deploy
        assert set(released["answers"].values()) == {"ok"} and len(released["answers"]) == 3  # ts, 2 tms

        code, lines, err = await trustpay(tmp_path, "rotate-platform", "--json", "--broker", url)
        assert code == 0, err
        (rotated,) = map(json.loads, lines)
        assert rotated["answers"] == {"trust-server": "ok", "payment-server": "ok"}
