"""What runs is what was measured (claims 2 and 7): app code that hides itself when loaded cannot pay."""

from __future__ import annotations

import pytest

from .conftest import DEV1, E2E, tm_of

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
