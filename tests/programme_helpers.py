"""Small readers shared by the programme scenario tests: what a priced basket says, in plain lists."""

from __future__ import annotations

from agent.engine import PricedBasket, PricedLine


def discounts(pl: PricedLine) -> list[tuple[str, int]]:
    """(rule id, fen) of each discount on a line, in the order applied."""
    return [(d.rule_id, d.amount_fen) for d in pl.discounts]


def points(pl: PricedLine) -> list[tuple[str, int]]:
    """(rule id, points) of each points entry on a line."""
    return [(p.rule_id, p.points) for p in pl.points_detail]


def codes(priced: PricedBasket) -> list[str]:
    """The cashier message codes of a priced basket."""
    return [m.code for m in priced.messages]
