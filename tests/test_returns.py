"""Returns against real priced sales: exact refunds and points reversals, never more than paid.

Every sale here is priced by the engine from a random case and read back from
its wire document, as the lane's return endpoint will read a stored sale.  The
expected amounts are computed from the wire strings with exact fractions,
independently of ``agent.returns``.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import Case, cases

from agent.engine import price
from agent.errors import ReturnError
from agent.render import to_json
from agent.returns import Returned, SoldLine, price_return, sold_lines_from_wire

PROPERTY = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fen(text: str) -> int:
    return int(Decimal(text) * 100)


def milli(text: str) -> int:
    return int(Decimal(text) * 1000)


def half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2)) if value >= 0 else -int(-value + Fraction(1, 2))


@st.composite
def sales(draw: st.DrawFn, *, max_lines: int = 12) -> dict[str, Any]:
    """The wire document of a sale the engine priced (members more often than not, to have points)."""
    case: Case = draw(cases(max_lines=max_lines, member=draw(st.sampled_from([True, True, False]))))
    return json.loads(to_json(price(case.basket(), case.member(), case.ruleset, case.at)))


@st.composite
def split(draw: st.DrawFn, qty: int) -> list[int]:
    """``qty`` thousandths cut into 1-4 positive parts."""
    cuts = draw(st.lists(st.integers(1, qty - 1), max_size=3, unique=True)) if qty > 1 else []
    points = [0, *sorted(cuts), qty]
    return [b - a for a, b in itertools.pairwise(points)]


@PROPERTY
@given(sales())
def test_a_full_return_in_one_go_refunds_each_net_and_reverses_each_points(sale: dict[str, Any]) -> None:
    sold = sold_lines_from_wire(sale)
    result = price_return(sold, {}, {line["line_id"]: milli(line["qty"]) for line in sale["lines"]})
    by_id = {line.line_id: line for line in result.lines}
    assert set(by_id) == {line["line_id"] for line in sale["lines"]}
    for line in sale["lines"]:
        back = by_id[line["line_id"]]
        assert back.qty == milli(line["qty"])
        assert back.refund_fen == fen(line["net"]), line
        assert back.points_reversed == line["points"], line
    assert result.refund_fen == fen(sale["totals"]["net"])
    assert result.points_reversed == sale["totals"]["points"]


@PROPERTY
@given(sales(), st.data())
def test_any_split_into_partial_returns_adds_up_exactly_and_never_exceeds(
    sale: dict[str, Any], data: st.DataObject
) -> None:
    sold = {line.line_id: line for line in sold_lines_from_wire(sale)}
    paid = {line["line_id"]: fen(line["net"]) for line in sale["lines"]}
    earned = {line["line_id"]: line["points"] for line in sale["lines"]}
    qty = {line["line_id"]: milli(line["qty"]) for line in sale["lines"]}

    # Every line comes back in random parts; parts of different lines interleave; consecutive
    # parts form one return, as long as a return names a line at most once.
    events = [(line_id, part) for line_id in qty for part in data.draw(split(qty[line_id]), label=line_id)]
    events = data.draw(st.permutations(events), label="order")
    breaks = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)), label="breaks")
    requests: list[dict[str, int]] = [{}]
    for (line_id, part), new in zip(events, breaks, strict=True):
        if (new or line_id in requests[-1]) and requests[-1]:
            requests.append({})
        requests[-1][line_id] = part

    previous: dict[str, Returned] = {}
    for request in requests:
        result = price_return(list(sold.values()), previous, request)
        assert sorted(line.line_id for line in result.lines) == sorted(request)
        assert result.refund_fen == sum(line.refund_fen for line in result.lines)
        assert result.points_reversed == sum(line.points_reversed for line in result.lines)
        for back in result.lines:
            done = previous.get(back.line_id, Returned())
            after = Returned(done.qty + back.qty, done.refund_fen + back.refund_fen, done.points + back.points_reversed)
            assert back.qty == request[back.line_id]
            assert back.refund_fen >= 0
            assert back.points_reversed >= 0
            assert after.refund_fen <= paid[back.line_id], (back, after)
            assert after.points <= earned[back.line_id], (back, after)
            # Cumulative shares, as documented: refunds so far are round(net x returned / sold).
            share = Fraction(after.qty, qty[back.line_id])
            assert after.refund_fen == half_up(paid[back.line_id] * share)
            assert after.points == half_up(earned[back.line_id] * share)
            previous[back.line_id] = after

    for line_id, sold_qty in qty.items():
        assert previous[line_id] == Returned(sold_qty, paid[line_id], earned[line_id])


@PROPERTY
@given(sales(), st.data())
def test_asking_back_more_than_is_left_is_an_over_return(sale: dict[str, Any], data: st.DataObject) -> None:
    sold = sold_lines_from_wire(sale)
    line = data.draw(st.sampled_from(sold), label="line")
    already = data.draw(st.integers(0, line.qty), label="already")
    previous: dict[str, Returned] = {}
    if already:
        first = price_return(sold, {}, {line.line_id: already}).lines[0]
        previous[line.line_id] = Returned(already, first.refund_fen, first.points_reversed)
    too_many = line.qty - already + data.draw(st.integers(1, 10**6), label="extra")
    with pytest.raises(ReturnError) as caught:
        price_return(sold, previous, {line.line_id: too_many})
    assert [(i.code, i.field) for i in caught.value.issues] == [("over_return", f"lines.{line.line_id}")]


SOLD = [
    SoldLine("1", qty=2000, net_fen=16720, points=167),
    SoldLine("2", qty=356, net_fen=1631, points=16),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"9": 1000}, [("unknown_line", "lines.9")]),
        ({"1": 0}, [("bad_quantity", "lines.1")]),
        ({"1": -1000}, [("bad_quantity", "lines.1")]),
        ({"2": 357}, [("over_return", "lines.2")]),
        (
            {"1": 2001, "9": 1, "2": 0},
            [("over_return", "lines.1"), ("unknown_line", "lines.9"), ("bad_quantity", "lines.2")],
        ),
    ],
)
def test_bad_returns_list_every_problem_with_its_line(
    request_: dict[str, int], expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(ReturnError) as caught:
        price_return(SOLD, {}, request_)
    assert [(issue.code, issue.field) for issue in caught.value.issues] == expected
    assert caught.value.code == "invalid_return"


def test_nothing_more_comes_back_after_a_full_return() -> None:
    previous = {"1": Returned(2000, 16720, 167)}
    with pytest.raises(ReturnError) as caught:
        price_return(SOLD, previous, {"1": 1})
    assert [(issue.code, issue.field) for issue in caught.value.issues] == [("over_return", "lines.1")]
    assert "0 left" in caught.value.issues[0].message


def test_a_weighed_line_returned_in_three_parts() -> None:
    # 0.356 kg for 16.31 yuan and 16 points, back as 0.100 + 0.100 + 0.156 kg.
    previous: dict[str, Returned] = {}
    refunds, points = [], []
    for part in (100, 100, 156):
        back = price_return(SOLD, previous, {"2": part}).lines[0]
        done = previous.get("2", Returned())
        previous["2"] = Returned(done.qty + part, done.refund_fen + back.refund_fen, done.points + back.points_reversed)
        refunds.append(back.refund_fen)
        points.append(back.points_reversed)
    # round(1631 x 100/356) = 458, round(1631 x 200/356) = 916, then the rest: 1631 - 916 = 715.
    assert refunds == [458, 458, 715]
    # round(16 x 100/356) = 4, round(16 x 200/356) = 9, then 16 - 9 = 7.
    assert points == [4, 5, 7]


@pytest.mark.parametrize(
    "document",
    [
        None,
        [],
        "sale",
        {},
        {"lines": None},
        {"lines": ["1"]},
        {"lines": [{"line_id": "1", "qty": "1", "net": "1.00"}]},
        {"lines": [{"line_id": "1", "qty": 1, "net": "1.00", "points": 0}]},
        {"lines": [{"line_id": "1", "qty": "1", "net": 1.0, "points": 0}]},
        {"lines": [{"line_id": "1", "qty": "0", "net": "1.00", "points": 0}]},
        {"lines": [{"line_id": "1", "qty": "1", "net": "-1.00", "points": 0}]},
        {"lines": [{"line_id": "1", "qty": "1", "net": "1.00", "points": "many"}]},
        {"lines": [{"line_id": "1", "qty": "1", "net": "1.00", "points": -5}]},
        {"lines": [{"line_id": "1", "qty": "1", "net": "1.00", "points": 1.5}]},
    ],
)
def test_a_document_that_is_not_a_priced_sale_is_refused(document: object) -> None:
    with pytest.raises(ReturnError) as caught:
        sold_lines_from_wire(document)  # type: ignore[arg-type]
    assert [issue.code for issue in caught.value.issues] == ["bad_sale"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
LINE_KEYS = st.sampled_from(["line_id", "qty", "net", "points", "gross"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(LINE_KEYS, JSON | st.sampled_from(["1", "2.5", "0.356", "10.00"])), max_size=4))
def test_garbage_sales_give_a_return_error_or_clean_lines(lines: list[dict[str, Any]]) -> None:
    try:
        sold = sold_lines_from_wire({"lines": lines})
    except ReturnError:
        return
    for line in sold:
        assert line.qty > 0
        assert line.net_fen >= 0
        assert isinstance(line.points, int)
        assert line.points >= 0
