"""Priced results as the wire JSON (the body ``POST /v1/price`` answers) and as a cashier's table.

The JSON is built in a fixed key order and serialised with fixed separators, so
the same priced basket always gives the same bytes; money and quantities are
decimal strings.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from agent.engine import Message, PricedBasket, PricedLine
from agent.money import format_fen, format_qty
from agent.ruleset import Text

WIRE_VERSION = 1


@functools.lru_cache(maxsize=4096)
def _label(text: Text) -> dict[str, str]:
    # Shared between documents: a ruleset has a few hundred labels, a busy till prints them all day.
    # Callers only serialise the dict, never mutate it.
    return {"zh-CN": text.zh_cn, "en": text.en}


def _message(message: Message) -> dict[str, str]:
    return {"code": message.code, "zh-CN": message.text.zh_cn, "en": message.text.en}


def _line(priced: PricedLine) -> dict[str, Any]:
    line = priced.line
    out: dict[str, Any] = {
        "line_id": line.line_id,
        "sku": line.sku,
        "category": line.category,
        "qty": format_qty(line.qty),
        "unit_price": format_fen(line.unit_fen),
    }
    if line.regular_fen is not None:
        out["regular_price"] = format_fen(line.regular_fen)
    out["flags"] = sorted(line.flags)
    out["gross"] = format_fen(priced.gross_fen)
    out["discounts"] = [
        {"rule": d.rule_id, "kind": d.kind, "amount": format_fen(d.amount_fen), "label": _label(d.label)}
        for d in priced.discounts
    ]
    out["discount"] = format_fen(priced.discount_fen)
    out["net"] = format_fen(priced.net_fen)
    out["points"] = priced.points
    out["points_detail"] = [
        {"rule": p.rule_id, "points": p.points, "label": _label(p.label)} for p in priced.points_detail
    ]
    out["excluded"] = {"discounts": priced.excluded_discounts, "points": priced.excluded_points}
    return out


def to_wire(priced: PricedBasket) -> dict[str, Any]:
    """The priced basket as the POS API's JSON document."""
    member = priced.member
    return {
        "v": WIRE_VERSION,
        "rules": {"id": priced.ruleset_id, "version": priced.ruleset_version},
        "at": priced.at.isoformat(),
        "member": None
        if member is None
        else {"member_id": member.member_id, "tier": member.tier, "benefits_tier": priced.tier},
        "lines": [_line(line) for line in priced.lines],
        "totals": {
            "gross": format_fen(priced.gross_fen),
            "discount": format_fen(priced.discount_fen),
            "net": format_fen(priced.net_fen),
            "points": priced.points,
        },
        "tenders": [
            {
                "kind": t.kind,
                "amount": format_fen(t.amount_fen),
                "points": t.points,
                "subkind": t.subkind,
                "earns_points": t.earns_points,
            }
            for t in priced.tenders
        ],
        "unpaid": format_fen(priced.unpaid_fen),
        "coupons": {"applied": list(priced.coupons_applied), "unused": list(priced.coupons_unused)},
        "messages": [_message(m) for m in priced.messages],
    }


def to_json(priced: PricedBasket) -> str:
    """Deterministic JSON text of ``to_wire``."""
    return json.dumps(to_wire(priced), ensure_ascii=False, separators=(",", ":"))


def _width(text: str) -> int:
    """Display width: CJK characters take two terminal cells."""
    return sum(2 if ord(ch) >= 0x1100 else 1 for ch in text)


def _pad(text: str, width: int, *, right: bool = False) -> str:
    gap = " " * max(0, width - _width(text))
    return gap + text if right else text + gap


def explain(priced: PricedBasket, lang: str = "zh-CN") -> str:  # noqa: C901 - one row kind per branch
    """A cashier-readable table: each line, each discount and point with the rule behind it."""

    def say(text: Text) -> str:
        return text.zh_cn if lang == "zh-CN" else text.en

    rows: list[str] = []
    head = f"{priced.ruleset_id} {priced.ruleset_version}  {priced.at.isoformat()}"
    if priced.member is not None:
        head += f"  member {priced.member.member_id} ({priced.tier or 'no benefits'})"
    rows.append(head)
    rows.append(
        f"{_pad('line', 28)}{_pad('qty', 8, right=True)}{_pad('amount', 12, right=True)}{_pad('pts', 7, right=True)}"
    )
    for pl in priced.lines:
        line = pl.line
        title = f"{line.line_id} {line.sku} [{line.category}]"
        if _width(title) > 28:
            title = title[:27] + "~"  # visibly cut, never a dangling bracket that looks complete
        rows.append(
            f"{_pad(title, 28)}{_pad(format_qty(line.qty), 8, right=True)}"
            f"{_pad(format_fen(pl.gross_fen), 12, right=True)}{_pad('', 7)}"
        )
        for d in pl.discounts:
            rows.append(
                f"    - {_pad(say(d.label)[:22], 22)} {_pad(d.rule_id[:18], 18)}{_pad('-' + format_fen(d.amount_fen), 8, right=True)}"
            )
        for p in pl.points_detail:
            rows.append(
                f"    + {_pad(say(p.label)[:22], 22)} {_pad(p.rule_id[:18], 18)}{_pad('', 8)}{_pad(str(p.points), 7, right=True)}"
            )
        if pl.excluded_discounts:
            rows.append(f"    ! no member discount: {pl.excluded_discounts}")
        if pl.excluded_points:
            rows.append(f"    ! no points: {pl.excluded_points}")
        if pl.discounts:
            rows.append(
                f"{_pad('', 36)}{_pad(format_fen(pl.net_fen), 12, right=True)}{_pad(str(pl.points), 7, right=True)}"
            )
    rows.append("-" * 55)
    rows.append(f"{_pad('gross', 36)}{_pad(format_fen(priced.gross_fen), 12, right=True)}")
    rows.append(f"{_pad('discount', 36)}{_pad('-' + format_fen(priced.discount_fen), 12, right=True)}")
    rows.append(
        f"{_pad('due', 36)}{_pad(format_fen(priced.net_fen), 12, right=True)}{_pad(str(priced.points), 7, right=True)}"
    )
    for t in priced.tenders:
        rows.append(f"{_pad('tender ' + t.kind, 36)}{_pad(format_fen(t.amount_fen), 12, right=True)}")
    for m in priced.messages:
        rows.append(f"* {say(m.text)}")
    return "\n".join(rows)
