"""Returns: the exact refund and the points to reverse, line by line.

A returned quantity refunds its share of what the line actually cost after
every discount (the allocated net), and reverses the same share of the points
the line earned.  Shares are cumulative: after returning ``r`` of ``q`` units
the refunds so far total round(net x r / q), so any sequence of partial
returns adds up to exactly the net paid (and exactly the points earned) once
the whole line is back, and never more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.errors import Issue, ReturnError
from agent.money import div_half_up, format_qty, parse_money, parse_qty


@dataclass(frozen=True, slots=True)
class SoldLine:
    """What a sale recorded for one line: quantity, net paid, points earned."""

    line_id: str
    qty: int
    net_fen: int
    points: int


@dataclass(frozen=True, slots=True)
class Returned:
    """What earlier returns already took back from one line."""

    qty: int = 0
    refund_fen: int = 0
    points: int = 0


@dataclass(frozen=True, slots=True)
class ReturnLine:
    line_id: str
    qty: int
    refund_fen: int
    points_reversed: int


@dataclass(frozen=True, slots=True)
class ReturnResult:
    lines: tuple[ReturnLine, ...]
    refund_fen: int
    points_reversed: int


def price_return(
    sold: Sequence[SoldLine], previous: Mapping[str, Returned], request: Mapping[str, int]
) -> ReturnResult:
    """Refund and points reversal for returning ``request`` (line id -> thousandths).

    ``previous`` holds what earlier returns of the same sale took.  Raises
    ReturnError listing every unknown line and every over-return.
    """
    by_id = {line.line_id: line for line in sold}
    issues = []
    for line_id, qty in request.items():
        where = f"lines.{line_id}"
        line = by_id.get(line_id)
        if line is None:
            issues.append(Issue(where, "unknown_line", f"the sale has no line {line_id!r}"))
            continue
        done = previous.get(line_id, Returned())
        left = line.qty - done.qty
        if qty <= 0:
            issues.append(Issue(where, "bad_quantity", "the returned quantity must be greater than zero"))
        elif qty > left:
            issues.append(
                Issue(where, "over_return", f"{format_qty(qty)} asked back, {format_qty(max(left, 0))} left to return")
            )
    if issues:
        raise ReturnError(issues, what="return")
    position = {line.line_id: index for index, line in enumerate(sold)}
    out = []
    for line_id in sorted(request, key=position.__getitem__):
        line = by_id[line_id]
        done = previous.get(line_id, Returned())
        returned_after = done.qty + request[line_id]
        refund_total = div_half_up(line.net_fen * returned_after, line.qty)
        points_total = div_half_up(line.points * returned_after, line.qty)
        out.append(
            ReturnLine(
                line_id=line_id,
                qty=request[line_id],
                refund_fen=refund_total - done.refund_fen,
                points_reversed=points_total - done.points,
            )
        )
    return ReturnResult(
        lines=tuple(out),
        refund_fen=sum(r.refund_fen for r in out),
        points_reversed=sum(r.points_reversed for r in out),
    )


def sold_lines_from_wire(result: object) -> list[SoldLine]:
    """The sold lines of a priced result document (as ``agent.render.to_wire`` made it).

    Strict: quantities and money must be the wire's decimal strings and points
    non-negative integers, so a damaged or forged document is refused rather
    than turned into a refund.
    """
    lines = result.get("lines") if isinstance(result, Mapping) else None
    if not isinstance(lines, list) or not lines:
        raise ReturnError([Issue("lines", "bad_sale", "not a priced sale: no lines")], what="sale")
    out = []
    issues = []
    for index, line in enumerate(lines):
        try:
            out.append(_sold_line(line))
        except KeyError as exc:
            issues.append(Issue(f"lines[{index}]", "bad_sale", f"missing {exc}"))
        except (TypeError, ValueError) as exc:
            issues.append(Issue(f"lines[{index}]", "bad_sale", str(exc)))
    if issues:
        raise ReturnError(issues, what="sale")
    return out


def _sold_line(line: object) -> SoldLine:
    if not isinstance(line, Mapping):
        raise TypeError("a line is an object")
    points = line["points"]
    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise ValueError(f"points {points!r} is not a non-negative integer")
    return SoldLine(str(line["line_id"]), parse_qty(line["qty"]), parse_money(line["net"]), points)
