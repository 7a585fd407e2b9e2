"""Audit re-pricing: head office re-runs the lane's engine and compares.

A lane reports, with every sale, the basket, the member state it priced
with, the moment, the ruleset version and its priced result.  Re-pricing the
same inputs with the same ruleset version must reproduce the result exactly;
any difference means a buggy or tampered lane (or a ruleset mix-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.render import to_wire
from agent.ruleset import Ruleset


@dataclass(frozen=True, slots=True)
class Difference:
    """One value that differs between the lane's report and head office's re-pricing."""

    path: str
    reported: object
    expected: object


def _diff(path: str, reported: object, expected: object, out: list[Difference]) -> None:
    if isinstance(reported, Mapping) and isinstance(expected, Mapping):
        for key in sorted(set(reported) | set(expected), key=str):
            _diff(f"{path}.{key}" if path else str(key), reported.get(key), expected.get(key), out)
    elif isinstance(reported, list) and isinstance(expected, list) and len(reported) == len(expected):
        for index, (left, right) in enumerate(zip(reported, expected, strict=True)):
            _diff(f"{path}[{index}]", left, right, out)
    elif reported != expected:
        out.append(Difference(path, reported, expected))


def audit_sale(ruleset: Ruleset, sale: Mapping[str, Any]) -> list[Difference]:
    """Re-price ``sale`` (keys: basket, member, result) and list every difference.

    Raises InputError when the sale's basket or member cannot be parsed, and
    reports a ``rules`` difference first when the lane priced with another
    ruleset version than the one given.
    """
    basket = parse_basket(sale.get("basket"), source="sale.basket")
    member_doc = sale.get("member")
    member = None if member_doc is None else parse_member(member_doc, source="sale.member")
    reported = sale.get("result")
    expected = to_wire(price(basket, member, ruleset))
    out: list[Difference] = []
    _diff("", reported if isinstance(reported, Mapping) else {}, expected, out)
    return out
