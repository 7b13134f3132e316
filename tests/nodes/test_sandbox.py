"""The chip's worker for app code, on real processes: it answers, and it contains what it runs."""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodes.sandbox import MAX_OUTPUT, Sandbox
from protocol.errors import Refused

APP = (Path(__file__).parents[2] / "ops" / "payload" / "app_code.py").read_bytes()
STATIC = json.dumps({"name": "wallet", "version": "1.0.0", "currency": "EUR", "limit": 50_000}).encode()
CALL = {"device": "d", "payee": "shop-1", "amount": 125, "currency": "EUR", "order_id": "o-1", "now_ms": 1}
ESCAPE = b"""
def _os():
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            return cls.__init__.__globals__
"""


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(wall_s=1.0)
    try:
        yield box
    finally:
        await box.close()


def children() -> set[int]:
    """Our live child processes, zombies included (read from /proc)."""
    me, out = str(os.getpid()), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.add(int(entry.name))
    return out


async def run(box: Sandbox, code: bytes, dynamic: bytes = b'{"counter": 3}') -> dict[str, object]:
    answer = await box.make_order(code, STATIC, dynamic, CALL)
    return {"order": answer.order, "dynamic": answer.dynamic}


async def refusal(box: Sandbox, code: bytes) -> Refused:
    with pytest.raises(Refused) as info:
        await box.make_order(code, STATIC, b"{}", CALL)
    return info.value


async def test_the_released_app_makes_its_order(sandbox: Sandbox) -> None:
    sandbox.warm_up()
    out = await run(sandbox, APP)
    assert out["order"] == {
        "order_id": "o-1",
        "device": "d",
        "app": "wallet",
        "payee": "shop-1",
        "amount": 125,
        "currency": "EUR",
        "counter": 4,
        "created_ms": 1,
    }
    assert out["dynamic"] == {"counter": 4, "last_order": "o-1"}


async def test_the_apps_own_no_is_invalid_order(sandbox: Sandbox) -> None:
    refused = await refusal(sandbox, b"def make_order(*a, **k):\n    raise ValueError('over the limit')\n")
    assert (refused.refusal_code, refused.refusal_reason) == ("invalid_order", "over the limit")


async def test_files_are_out_of_reach_by_every_road(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "node.key"
    secret.write_bytes(b"the chip's private key")
    for read in (
        f"open({str(secret)!r}, 'rb').read()",
        f"_os()['read'](_os()['open']({str(secret)!r}, 0), 99)",
        f"_os()['listdir']({str(tmp_path)!r})",
        "__import__('io').open('/etc/hostname').read()",
    ):
        code = ESCAPE + f"def make_order(*a, **k):\n    return {{}}, {{'loot': str({read})}}\n".encode()
        refused = await refusal(sandbox, code)
        assert refused.refusal_code == "app_failed", read
        assert "private key" not in refused.refusal_reason


@pytest.mark.parametrize("module", ["os", "socket", "subprocess", "ctypes", "importlib", "sys"])
async def test_imports_outside_the_allowlist_are_refused(sandbox: Sandbox, module: str) -> None:
    refused = await refusal(sandbox, f"import {module}\n".encode())
    assert refused.refusal_code == "app_failed"
    assert f"may not import '{module}'" in refused.refusal_reason


async def test_as_root_the_worker_is_nobody_in_an_empty_root(sandbox: Sandbox) -> None:
    code = (
        ESCAPE
        + b"def make_order(*a, **k):\n    return {}, {'uid': _os()['getuid'](), 'cwd': _os()['getcwd']()}\n"
    )
    out = await run(sandbox, code)
    if os.geteuid() == 0:
        assert out["dynamic"] == {"uid": pwd.getpwnam("nobody").pw_uid, "cwd": "/"}
    else:  # without root there is no chroot: the audit hook alone keeps files out of reach
        assert out["dynamic"]["uid"] == os.getuid()  # type: ignore[index]


async def test_a_hung_app_is_killed_reaped_and_the_next_call_answers(sandbox: Sandbox) -> None:
    started = time.monotonic()
    refused = await refusal(sandbox, b"def make_order(*a, **k):\n    while True:\n        pass\n")
    assert refused.refusal_code == "app_failed" and "within 1 s" in refused.refusal_reason
    assert time.monotonic() - started < 5
    assert (await run(sandbox, APP))["dynamic"] == {"counter": 4, "last_order": "o-1"}
    await sandbox.close()
    assert children() == set()  # every worker, the hung one included, was killed and reaped


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (b"def make_order(*a, **k):\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
        (ESCAPE + b"def make_order(*a, **k):\n    _os()['_exit'](3)\n", "crashed or answered garbage"),
        (b"def make_order(*a, **k):\n    return 1\n", "must return"),
        (b"def make_order(*a, **k):\n    return [], {}\n", "as maps"),
        (b"x = (\n", "SyntaxError"),
        (b"make_order = 3\n", "no make_order"),
        (b"def make_order(*a, **k):\n    return {'x': 'a' * %d}, {}\n" % MAX_OUTPUT, "over"),
        (b"def make_order(*a, **k):\n    return {}, {'b': bytearray(2 ** 31)}\n", "MemoryError"),
    ],
)
async def test_a_failing_app_is_a_typed_refusal(sandbox: Sandbox, code: bytes, why: str) -> None:
    refused = await refusal(sandbox, code)
    assert refused.refusal_code == "app_failed"
    assert why in refused.refusal_reason


async def test_what_the_app_prints_is_not_its_answer(sandbox: Sandbox) -> None:
    forged = b'{"order": {}, "dynamic": {"forged": 1}}'
    code = b"def make_order(*a, **k):\n    print(%r)\n    return {}, {}\n" % forged.decode()
    assert await run(sandbox, code) == {"order": {}, "dynamic": {}}
