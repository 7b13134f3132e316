"""What runs is what was measured (claims 2 and 7): app code that hides itself when loaded cannot pay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.deployment import canonical_json
from tests.nodes.test_chip_app import HOSTILE

from .conftest import DEV1, E2E, chip_of, tm_of

pytestmark = pytest.mark.e2e


async def test_app_code_that_restores_the_release_when_loaded_moves_no_money(e2e: E2E) -> None:
    code_py = e2e.dep.app_dir(DEV1, "wallet") / "code.py"
    released = code_py.read_bytes()
    # Appended by malware: once loaded it writes the released bytes back over its own file, so a
    # trust module that measures after the app ran sees the release; and it pays someone else.
    tampered = (
        released
        + (
            f"\n_RELEASED = {released!r}\n"
            f"with open({str(code_py.absolute())!r}, 'wb') as _f:\n"
            "    _f.write(_RELEASED)\n"
            "_honest = make_order\n\n\n"
            "def make_order(static, dynamic, **kw):\n"
            "    kw['payee'], kw['amount'] = 'shop-3', 40_000\n"
            "    return _honest(static, dynamic, **kw)\n"
        ).encode()
    )
    code_py.write_bytes(tampered)
    before = await e2e.balances()
    mark = e2e.watcher.mark()

    run = await e2e.pay(DEV1, "1.25", "shop-1")

    # On a chip that runs the app before C2, the file is the release again when measured, the
    # verdict affirms and 400.00 goes to shop-3.
    assert run.code == 1, (run.lines, run.stderr[-2000:])
    assert run.result["status"] == "refused" and run.result["code"] == "untrusted", run.result
    c4 = await e2e.wait_event(mark, device=DEV1, step="C4", node=tm_of(DEV1))
    assert c4.outcome == "refused" and c4.order_id == run.result["order_id"]
    assert not e2e.events(mark, device=DEV1, step="C5")
    assert await e2e.balances() == before
    assert e2e.stored_payments() == {}
    assert code_py.read_bytes() == tampered  # none of the app's code ran: it could not restore itself


def hostile_code(key_path: Path) -> bytes:
    """The hostile app of the node tests: what it does depends on the amount (1.11, 2.22 ...)."""
    return HOSTILE.format(key=str(key_path.absolute())).encode()


async def release_app(e2e: E2E, build: Path, app: str, version: str, code: bytes) -> None:
    """Release ``code`` as ``app`` VERSION (the issuer signs it; every node hears it), then install it."""
    app_dir = e2e.dep.app_dir(DEV1, app)
    static = json.loads((app_dir / "static.json").read_bytes())
    build.mkdir()
    (build / "code.py").write_bytes(code)
    (build / "static.json").write_bytes(canonical_json({**static, "version": version}))
    await e2e.trustpay("release", "app", app, version, str(build))
    for name in ("code.py", "static.json"):
        (app_dir / name).write_bytes((build / name).read_bytes())


async def test_a_released_app_that_steals_hangs_crashes_or_exits_is_refused_and_contained(
    e2e: E2E, tmp_path: Path
) -> None:
    key_path = e2e.dep.node_key_path(chip_of(DEV1))
    key = key_path.read_bytes()
    await release_app(e2e, tmp_path / "wallet-1.0.1", "wallet", "1.0.1", hostile_code(key_path))
    before = await e2e.balances()

    stolen = await e2e.pay(DEV1, "1.11", "shop-1")  # reads the chip's key into its own data
    hung = await e2e.pay(DEV1, "2.22", "shop-1")  # loops forever
    crashed = await e2e.pay(DEV1, "3.33", "shop-1")  # raises
    exited = await e2e.pay(DEV1, "4.44", "shop-1")  # os._exit through the classic escape
    paid = await e2e.pay(DEV1, "1.00", "shop-1")  # then an honest payment: the chip still pays

    # On a chip that runs the app in its own process the key is read, the payment confirmed, and
    # a hang takes the chip down with it.
    for run in (stolen, hung, crashed, exited):
        assert run.code == 1, (run.lines, run.stderr[-2000:])
        assert (run.result["status"], run.result["code"]) == ("refused", "app_failed"), run.result
    assert paid.code == 0 and paid.result["status"] == "confirmed", (paid.lines, paid.stderr[-2000:])
    after = await e2e.balances()
    assert after[f"{DEV1}:wallet"] == before[f"{DEV1}:wallet"] - 100
    assert sum(after.values()) == sum(before.values())
    dynamic = json.loads((e2e.dep.app_dir(DEV1, "wallet") / "dynamic.json").read_bytes())
    assert "loot" not in dynamic
    seen = json.dumps([r.lines for r in (stolen, hung, crashed, exited, paid)]).encode()
    logs = b"".join(p.read_bytes() for p in (e2e.dep.root / "logs").glob("*.log"))
    for secret in (key, key.hex().encode()):
        assert secret not in seen and secret not in logs
