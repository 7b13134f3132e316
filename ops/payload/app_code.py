"""A payment application's own code (patent part 12), as installed in the chip.

``trustpay provision`` copies this file verbatim to
``devices/{device}/chip/apps/{app}/code.py``. At a payment the chip reads it
once; the trust module measures the same bytes (claim 2) and only after a
trusted verdict does the chip run that very buffer, in a locked-down worker
(``nodes/sandbox.py``): no files, no ``os``, only a few standard modules
(``from __future__``, ``typing`` ...). ``static`` is the app's static data
(name, version, currency, per-payment limit); ``dynamic`` its stored
transaction counter. The chip checks the order against what the user asked.
"""

from __future__ import annotations

from typing import Any


def make_order(
    static: dict[str, Any],
    dynamic: dict[str, Any],
    *,
    device: str,
    payee: str,
    amount: int,
    currency: str,
    order_id: str,
    now_ms: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields of a ``protocol.records.Order`` and the app's next dynamic data.

    The counter only ever grows, so the payment server can refuse an order
    replayed from an earlier state of this app.
    """
    # bool is an int subclass: True must not pay 1 minor unit
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError(f"amount must be a positive whole number of minor units, not {amount!r}")
    if currency != static["currency"]:
        raise ValueError(f"{static['name']} pays in {static['currency']}, not {currency}")
    if amount > static["limit"]:
        raise ValueError(f"amount {amount} is over {static['name']}'s limit of {static['limit']} per payment")
    if not payee:
        raise ValueError("a payment needs a payee")
    counter = int(dynamic.get("counter", 0)) + 1
    order = {
        "order_id": order_id,
        "device": device,
        "app": static["name"],
        "payee": payee,
        "amount": amount,
        "currency": currency,
        "counter": counter,
        "created_ms": now_ms,
    }
    return order, {**dynamic, "counter": counter, "last_order": order_id}
