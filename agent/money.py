"""Exact money and quantity arithmetic.

Money is integer fen; quantities are integer thousandths ("0.356" kg = 356);
rates are integer ten-thousandths ("0.95" = 9500).  Everything the engine
computes is integer arithmetic with one explicit rounding rule per step, so
results are exact and identical on every machine.  Decimal strings are the
only wire form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

QTY_SCALE = 1000
RATE_SCALE = 10_000
MAX_FEN = 10**13  # 100 billion yuan: far beyond any till, small enough to catch garbage.
MAX_QTY = 10**9  # one million units, in thousandths.

_MONEY_RE = re.compile(r"-?[0-9]{1,14}(\.[0-9]{1,2})?")
_QTY_RE = re.compile(r"[0-9]{1,7}(\.[0-9]{1,3})?")
_RATE_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,4})?")


def _split_decimal(text: str, places: int) -> int:
    """Turn an already-validated decimal string into an integer scaled by 10**places."""
    negative = text.startswith("-")
    if negative:
        text = text[1:]
    whole, _, frac = text.partition(".")
    value: int = int(whole) * 10**places + int((frac + "0" * places)[:places] or "0")
    return -value if negative else value


def parse_money(text: object, *, allow_negative: bool = False) -> int:
    """Parse a decimal money string such as ``"12.34"`` into fen.

    Raises ``ValueError`` with a reason a cashier's integrator can act on.
    Floats and integers are refused: JSON numbers lose cents in transit.
    """
    if not isinstance(text, str):
        raise ValueError('money must be a decimal string such as "12.34"')
    if not _MONEY_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a money amount (digits, optional 1-2 decimals)")
    fen = _split_decimal(text, 2)
    if fen < 0 and not allow_negative:
        raise ValueError(f"{text!r} is negative")
    if abs(fen) > MAX_FEN:
        raise ValueError(f"{text!r} is out of range")
    return fen


def format_fen(fen: int) -> str:
    """Format fen as a decimal string with exactly two places: 1234 -> "12.34"."""
    sign = "-" if fen < 0 else ""
    whole, frac = divmod(abs(fen), 100)
    return f"{sign}{whole}.{frac:02d}"


def parse_qty(text: object) -> int:
    """Parse a positive quantity string (up to 3 decimals, "0.356") into thousandths."""
    if not isinstance(text, str):
        raise ValueError('quantity must be a decimal string such as "1" or "0.356"')
    if not _QTY_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a quantity (digits, optional 1-3 decimals)")
    milli = _split_decimal(text, 3)
    if milli <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    if milli > MAX_QTY:
        raise ValueError(f"{text!r} is out of range")
    return milli


def format_qty(milli: int) -> str:
    """Format thousandths without trailing zeros: 2000 -> "2", 356 -> "0.356"."""
    whole, frac = divmod(milli, QTY_SCALE)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:03d}".rstrip("0")


def parse_rate(text: object) -> int:
    """Parse a non-negative rate/factor string ("0.95", "2", "1.5") into ten-thousandths."""
    if not isinstance(text, str):
        raise ValueError('a rate must be a decimal string such as "0.95"')
    if not _RATE_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a rate (digits, optional 1-4 decimals)")
    return _split_decimal(text, 4)


def format_rate(e4: int) -> str:
    """Format ten-thousandths compactly: 9500 -> "0.95", 20000 -> "2"."""
    text = str(Decimal(e4).scaleb(-4).normalize())
    return text if "E" not in text else f"{Decimal(e4).scaleb(-4):f}"


def to_decimal(fen: int) -> Decimal:
    """Fen as an exact Decimal in yuan, for callers that want Decimal."""
    return Decimal(fen).scaleb(-2)


def decimal_to_fen(value: Decimal) -> int:
    """An exact Decimal amount in yuan to fen; refuses sub-fen precision."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite amount")
    try:
        scaled = value.scaleb(2)
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{value} has more than 2 decimals")
        return int(scaled)
    except InvalidOperation as exc:
        raise ValueError(f"{value} is not a finite amount") from exc


def div_half_up(numerator: int, denominator: int) -> int:
    """Round numerator/denominator half away from zero (四舍五入), for non-negative inputs."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("div_half_up expects a non-negative numerator and positive denominator")
    return (2 * numerator + denominator) // (2 * denominator)


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder).

    The parts always sum exactly to ``total``; a zero weight always gets zero;
    ties in the remainder go to the earlier position, so the result is
    deterministic.  Used for basket discounts, tender shares and points.
    """
    if total < 0:
        raise ValueError("allocate expects a non-negative total")
    if any(weight < 0 for weight in weights):
        raise ValueError("allocate expects non-negative weights")
    weight_sum = sum(weights)
    if weight_sum <= 0:
        if total:
            raise ValueError("cannot allocate a non-zero total over zero weights")
        return [0] * len(weights)
    parts = []
    remainders = []
    for index, weight in enumerate(weights):
        share, rest = divmod(total * weight, weight_sum)
        parts.append(share)
        if rest:
            remainders.append((-rest, index))
    left = total - sum(parts)
    remainders.sort()
    for _, index in remainders[:left]:
        parts[index] += 1
    return parts


def apportion(total: int, numerators: Sequence[int], denominator: int) -> list[int]:
    """Split ``total`` over exact fractions ``numerators[i] / denominator`` (largest remainder).

    Each part gets the whole part of its own fraction, and the units left over
    go to the largest fractional remainders, ties to the earlier position.
    ``total`` must lie between the sum of the floors and the sum of the
    ceilings -- as floor, ceil or half-up of the exact sum always does -- so
    nobody's whole points move to a neighbour: 900.00 and 12.75 give 900 + 12.
    """
    parts = []
    remainders = []
    for index, numerator in enumerate(numerators):
        whole, rest = divmod(numerator, denominator)
        parts.append(whole)
        if rest:
            remainders.append((-rest, index))
    left = total - sum(parts)
    if left < 0 or left > len(remainders):
        raise ValueError("apportion: total is outside the floors and ceilings of the parts")
    remainders.sort()
    for _, index in remainders[:left]:
        parts[index] += 1
    return parts
