"""What the client reads from and shows to its user: amounts, and the record of its payments.

Part of the client install like every module the client runs: ``trustpay
provision`` copies it to ``devices/{device}/client/code/nodes/``, where the
trust module measures it and the boot path (``ops.client_boot``) loads it.
"""

from __future__ import annotations

import re
from typing import Any

# ASCII digits only: str.isdigit() and \d would also accept e.g. Arabic-Indic digits.
_AMOUNT = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
_MAX_DIGITS = 15  # keeps every amount far inside the ledger's signed 64-bit integers


def parse_amount(text: str, exponent: int) -> int:
    """Turn what the user typed ("12.50") into minor units (1250), exactly, without floats."""
    cleaned = text.strip()
    if cleaned.startswith("-"):
        raise ValueError(f"{text!r}: an amount cannot be negative")
    match = _AMOUNT.fullmatch(cleaned)
    if match is None:
        example = "12.50" if exponent > 0 else "12"
        raise ValueError(f"{text!r} is not an amount; type digits like {example}")
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > exponent:
        if exponent == 0:
            raise ValueError(f"{text!r}: this currency has no decimal places")
        raise ValueError(f"{text!r} has more than {exponent} decimal places")
    digits = (whole + fraction.ljust(exponent, "0")).lstrip("0")
    if len(digits) > _MAX_DIGITS:
        raise ValueError(f"{text!r} is too large an amount")
    minor = int(digits or "0")
    if minor == 0:
        raise ValueError(f"{text!r}: the amount must be more than zero")
    return minor


def format_amount(minor: int, currency: str, exponent: int) -> str:
    """1250, "EUR", 2 -> "12.50 EUR"."""
    sign = "-" if minor < 0 else ""
    digits = str(abs(minor)).rjust(exponent + 1, "0")
    if exponent == 0:
        return f"{sign}{digits} {currency}"
    return f"{sign}{digits[:-exponent]}.{digits[-exponent:]} {currency}"


def record_payment(dynamic: dict[str, Any], order_id: str) -> dict[str, Any]:
    """The client's new dynamic data once a payment attempt is recorded.

    It does not depend on the outcome, so the client can announce the digest of
    what it will write before the payment runs (the trust module journals it).
    """
    return {**dynamic, "attempts": int(dynamic.get("attempts", 0)) + 1, "last_order": order_id}
