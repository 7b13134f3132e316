"""A device whose clock is 40 s off pays and is told so at once (clock_skew); the other device pays.

Every node of the skewed device runs with its clock off (``trustpay up --clock-offset
DEVICE=MS`` for its chip and trust module, ``trustpay client --clock-offset-ms MS``),
on a real broker, each a process of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import BACKENDS, DEV1, DEV2, OPENING, running_deployment

pytestmark = pytest.mark.e2e

PAYER1, PAYER2 = f"{DEV1}:wallet", f"{DEV2}:wallet"


@pytest.mark.parametrize("backend", BACKENDS[:1])
@pytest.mark.parametrize(("offset_ms", "way"), [(-40_000, "behind"), (40_000, "ahead of")])
async def test_a_device_40s_off_is_refused_clock_skew_while_the_other_pays(
    tmp_path: Path, backend: str, offset_ms: int, way: str
) -> None:
    async with running_deployment(tmp_path, backend, clock_offsets={DEV1: offset_ms}) as e2e:
        skewed = await e2e.client(DEV1, "pay", "1.00", "shop-1", "--clock-offset-ms", str(offset_ms))
        fine = await e2e.pay(DEV2, "2.00", "shop-1")
        balances = await e2e.balances()
    assert skewed.code == 1, (skewed.result, skewed.stderr)  # refused, not 4 (outcome unknown)
    assert skewed.result["status"] == "refused" and skewed.result["code"] == "clock_skew", skewed.result
    reason = skewed.result["reason"]
    assert f"your clock is 40.0 s {way} the trust-server's; set the device's clock" in reason or (
        f"s {way} the trust-server's; set the device's clock" in reason
        and 39 <= float(reason.split("your clock is ")[1].split(" s ")[0]) <= 41
    ), reason
    assert fine.code == 0, (fine.result, fine.stderr)
    assert balances[PAYER1] == OPENING and balances[PAYER2] == OPENING - 200
