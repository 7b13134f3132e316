"""The fork-server workers for app code pass every test of the interpreter-per-payment sandbox.

Each test of ``tests/nodes/test_sandbox.py`` runs again here against
:class:`nodes.app_forks.ForkSandbox` (same contract, same containment), plus
what is particular to a fork server: one server serves many payments, each
in its own child, and a child can neither read nor forge the server's channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nodes.app_forks import ForkSandbox
from tests.nodes import test_sandbox as base
from tests.nodes.test_sandbox import (  # noqa: F401  (collected again here, with this module's fixture)
    test_a_failing_app_is_a_typed_refusal,
    test_a_hung_app_is_killed_reaped_and_the_next_call_answers,
    test_as_root_the_worker_is_nobody_in_an_empty_root,
    test_files_are_out_of_reach_by_every_road,
    test_imports_outside_the_allowlist_are_refused,
    test_the_apps_own_no_is_invalid_order,
    test_the_released_app_makes_its_order,
    test_what_the_app_prints_is_not_its_answer,
)


@pytest.fixture
async def sandbox() -> AsyncIterator[ForkSandbox]:
    box = ForkSandbox(wall_s=1.0)
    try:
        yield box
    finally:
        await box.close()


async def test_one_server_runs_each_payment_in_a_fresh_child() -> None:
    box = ForkSandbox(wall_s=1.0, max_servers=1)
    # an app that leaves a mark in its interpreter: a fresh child never sees the last one's
    code = (
        b"import json\n"
        b"def make_order(static, dynamic, **call):\n"
        b"    seen = getattr(json, 'mark', None)\n"
        b"    json.mark = call['order_id']\n"
        b"    return {}, {'seen': seen}\n"
    )
    try:
        for i in range(5):
            call = {**base.CALL, "order_id": f"o-{i}"}
            answer = await box.make_order(code, base.STATIC, b"{}", call)
            assert answer.dynamic == {"seen": None}
        assert box._count == 1  # one server, five children
    finally:
        await box.close()
    assert base.children() == set()


async def test_a_child_cannot_forge_an_answer_on_the_servers_channel() -> None:
    box = ForkSandbox(wall_s=1.0, max_servers=1)
    forged = b'A\x00\x00\x00\x2a{"order": {}, "dynamic": {"forged": 1}}  \n'
    code = base.ESCAPE + (
        b"def make_order(*a, **k):\n"
        b"    try:\n"
        b"        _os()['write'](1, %r)\n"
        b"    except OSError:\n"
        b"        pass\n"
        b"    return {}, {'honest': 1}\n" % forged
    )
    try:
        first = await box.make_order(code, base.STATIC, b"{}", base.CALL)
        assert first.dynamic == {"honest": 1}
        # the next payment gets its own answer, not anything the last app wrote
        second = await box.make_order(base.APP, base.STATIC, b'{"counter": 3}', base.CALL)
        assert second.dynamic == {"counter": 4, "last_order": "o-1"}
    finally:
        await box.close()
