"""Malformed baskets and members: InputError with a field path per problem, never a traceback.

These documents are the body of ``POST /v1/price`` and the files ``lane-agent
price`` reads, so every problem must come back with the path of the field to
fix (``lines[3].qty``), a machine-readable code, and the source it came from.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from conftest import MEMBER_DAY, RULES_888
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import basket_docs, tender_docs

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.errors import InputError, Issue
from agent.ruleset import load_ruleset

SOURCE = "basket.json"


def basket() -> dict[str, Any]:
    return {
        "lines": [
            {"line_id": "1", "sku": "6901234567892", "category": "womenswear", "qty": "1", "unit_price": "1000.00"},
            {
                "line_id": "2",
                "sku": "6900000000012",
                "category": "fresh",
                "qty": "0.356",
                "unit_price": "45.80",
                "regular_price": "52.00",
            },
            {"line_id": "3", "sku": "6900000000029", "category": "food", "qty": "2", "unit_price": "9.90"},
        ],
        "member_id": "M000123",
        "coupons": [],
        "tenders": [{"kind": "rebate", "amount": "35.20"}],
        "at": "2026-12-10T14:05:00+08:00",
    }


def member() -> dict[str, Any]:
    return {
        "member_id": "M000123",
        "tier": "gold",
        "card_kind": "standard",
        "birthday": "12-10",
        "points_balance": 1200,
        "rebate_balance": "35.20",
    }


def basket_problems(doc: object) -> list[Issue]:
    with pytest.raises(InputError) as caught:
        parse_basket(doc, source=SOURCE)
    issues = list(caught.value.issues)
    assert issues
    assert all(issue.source == SOURCE and issue.code and issue.message for issue in issues)
    assert caught.value.what == "basket"
    return issues


def member_problems(doc: object) -> list[Issue]:
    with pytest.raises(InputError) as caught:
        parse_member(doc, source="member.json")
    issues = list(caught.value.issues)
    assert issues
    assert all(issue.source == "member.json" and issue.code and issue.message for issue in issues)
    assert caught.value.what == "member"
    return issues


def test_the_sample_documents_are_valid() -> None:
    parsed = parse_basket(basket(), source=SOURCE)
    assert [line.qty for line in parsed.lines] == [1000, 356, 2000]
    assert parse_member(member()).birthday == (12, 10)


def _line(index: int, **changes: Any) -> dict[str, Any]:
    doc = basket()
    doc["lines"][index].update(changes)
    return doc


def _without(index: int, key: str) -> dict[str, Any]:
    doc = basket()
    del doc["lines"][index][key]
    return doc


def _top(**changes: Any) -> dict[str, Any]:
    doc = basket()
    doc.update(changes)
    return doc


BASKETS: list[tuple[str, dict[str, Any], list[tuple[str, str]], str]] = [
    ("no lines", {"at": "2026-12-10T14:05:00+08:00"}, [("lines", "missing")], "required"),
    ("empty lines", _top(lines=[]), [("lines", "too_short")], "at least 1"),
    ("lines not a list", _top(lines="1"), [("lines", "list_type")], "list"),
    ("qty as a JSON number", _line(0, qty=1.5), [("lines[0].qty", "value_error")], "decimal string"),
    ("qty zero", _line(1, qty="0"), [("lines[1].qty", "value_error")], "greater than zero"),
    ("qty with four decimals", _line(1, qty="0.3561"), [("lines[1].qty", "value_error")], "1-3 decimals"),
    ("negative qty", _line(2, qty="-1"), [("lines[2].qty", "value_error")], "not a quantity"),
    ("price as a JSON number", _line(0, unit_price=1000.0), [("lines[0].unit_price", "value_error")], "decimal string"),
    ("negative price", _line(0, unit_price="-1.00"), [("lines[0].unit_price", "value_error")], "negative"),
    ("price with three decimals", _line(0, unit_price="9.999"), [("lines[0].unit_price", "value_error")], "1-2 decimals"),
    ("regular price garbage", _line(1, regular_price="n/a"), [("lines[1].regular_price", "value_error")], "money"),
    ("no sku", _without(0, "sku"), [("lines[0].sku", "missing")], "required"),
    ("empty sku", _line(0, sku=""), [("lines[0].sku", "string_too_short")], "at least 1"),
    ("sku as a number", _line(0, sku=6901234567892), [("lines[0].sku", "string_type")], "string"),
    ("flags not a list", _line(0, flags="special_price"), [("lines[0].flags", "list_type")], "list"),
    ("too many flags", _line(0, flags=[f"f{i}" for i in range(17)]), [("lines[0].flags", "too_long")], "16"),
    ("unknown line key", _line(2, colour="red"), [("lines[2].colour", "extra_forbidden")], "not permitted"),
    ("unknown basket key", _top(memberid="M1"), [("memberid", "extra_forbidden")], "not permitted"),
    ("coupon empty", _top(coupons=[""]), [("coupons[0]", "string_too_short")], "at least 1"),
    ("too many coupons", _top(coupons=[f"C{i}" for i in range(21)]), [("coupons", "too_long")], "20"),
    ("unknown tender kind", _top(tenders=[{"kind": "cheque", "amount": "1.00"}]),
     [("tenders[0].kind", "literal_error")], "cash"),
    ("points tender without points", _top(tenders=[{"kind": "points"}]), [("tenders[0]", "value_error")], "points"),
    ("cash tender without amount", _top(tenders=[{"kind": "cash"}]), [("tenders[0]", "value_error")], "amount"),
    ("tender of zero", _top(tenders=[{"kind": "cash", "amount": "0.00"}]), [("tenders[0]", "value_error")],
     "greater than zero"),
    ("zero points", _top(tenders=[{"kind": "points", "points": 0}]), [("tenders[0].points", "greater_than_equal")],
     "1"),
    ("points as a fraction", _top(tenders=[{"kind": "points", "points": 1.5}]),
     [("tenders[0].points", "int_from_float")], "integer"),
    ("time garbage", _top(at="yesterday"), [("at", "datetime_from_date_parsing")], "datetime"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "expected", "reason"), [pytest.param(d, e, r, id=name) for name, d, e, r in BASKETS])
def test_each_basket_problem_names_its_field(doc: dict[str, Any], expected: list[tuple[str, str]], reason: str) -> None:
    issues = basket_problems(doc)
    assert [(issue.field, issue.code) for issue in issues] == expected
    assert reason in issues[0].message


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        pytest.param(
            _top(lines=[*basket()["lines"], {**basket()["lines"][0], "sku": "x"}]),
            "lines[3].line_id",
            "'1' appears twice",
            id="duplicate line id",
        ),
        pytest.param(_top(at="2026-12-10T14:05:00"), "at", "UTC offset", id="time without offset"),
    ],
)
def test_whole_document_checks_still_name_the_field(doc: dict[str, Any], field: str, reason: str) -> None:
    # The POS shows `field` next to the input to correct; an empty path points nowhere.
    (issue,) = basket_problems(doc)
    assert issue.field == field
    assert reason in issue.message


def test_every_problem_in_a_basket_is_reported_at_once() -> None:
    doc = basket()
    doc["lines"][0]["qty"] = 2
    del doc["lines"][1]["sku"]
    doc["lines"][2]["unit_price"] = "9.999"
    doc["tenders"] = [{"kind": "cheque", "amount": "1.00"}]
    doc["colour"] = "red"
    assert sorted((issue.field, issue.code) for issue in basket_problems(doc)) == sorted(
        [
            ("lines[0].qty", "value_error"),
            ("lines[1].sku", "missing"),
            ("lines[2].unit_price", "value_error"),
            ("tenders[0].kind", "literal_error"),
            ("colour", "extra_forbidden"),
        ]
    )


@pytest.mark.parametrize("doc", [None, [], "lines", 42, True, [basket()]])
def test_a_basket_that_is_not_an_object(doc: object) -> None:
    assert [(issue.field, issue.code) for issue in basket_problems(doc)] == [("", "model_type")]


def _member(**changes: Any) -> dict[str, Any]:
    doc = member()
    doc.update(changes)
    return doc


MEMBERS: list[tuple[str, dict[str, Any], list[tuple[str, str]], str]] = [
    ("no tier", {"member_id": "M1"}, [("tier", "missing")], "required"),
    ("empty tier", _member(tier=""), [("tier", "string_too_short")], "at least 1"),
    ("no member id", {"tier": "gold"}, [("member_id", "missing")], "required"),
    ("birthday month 13", _member(birthday="13-01"), [("birthday", "value_error")], "not a calendar month-day"),
    ("birthday 30 February", _member(birthday="02-30"), [("birthday", "value_error")], "not a calendar month-day"),
    ("birthday short", _member(birthday="2-3"), [("birthday", "value_error")], "MM-DD"),
    ("birthday as number", _member(birthday=1210), [("birthday", "value_error")], "MM-DD"),
    ("birthday with slash", _member(birthday="12/10"), [("birthday", "value_error")], "MM-DD"),
    ("birthday full date", _member(birthday="1990-12-10"), [("birthday", "value_error")], "MM-DD"),
    ("negative points", _member(points_balance=-1), [("points_balance", "greater_than_equal")], "0"),
    ("fractional points", _member(points_balance=1.5), [("points_balance", "int_from_float")], "integer"),
    ("rebate as a JSON number", _member(rebate_balance=35.2), [("rebate_balance", "value_error")], "decimal string"),
    ("negative rebate", _member(rebate_balance="-1.00"), [("rebate_balance", "value_error")], "negative"),
    ("next tier date garbage", _member(next_tier="vip", next_tier_from="soon"),
     [("next_tier_from", "date_from_datetime_parsing")], "date"),
    ("personal data", _member(name="张三"), [("name", "extra_forbidden")], "not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "expected", "reason"), [pytest.param(d, e, r, id=name) for name, d, e, r in MEMBERS])
def test_each_member_problem_names_its_field(doc: dict[str, Any], expected: list[tuple[str, str]], reason: str) -> None:
    issues = member_problems(doc)
    assert [(issue.field, issue.code) for issue in issues] == expected
    assert reason in issues[0].message


@pytest.mark.parametrize(
    "doc", [_member(next_tier="vip"), _member(next_tier_from="2026-12-11")], ids=["tier only", "date only"]
)
def test_an_upgrade_needs_both_tier_and_date_and_names_them(doc: dict[str, Any]) -> None:
    (issue,) = member_problems(doc)
    assert "next_tier" in issue.message
    assert issue.field in ("next_tier", "next_tier_from")


def test_every_problem_in_a_member_is_reported_at_once() -> None:
    doc = _member(tier="", birthday="13-01", points_balance=-5, colour="red")
    assert sorted((issue.field, issue.code) for issue in member_problems(doc)) == sorted(
        [
            ("tier", "string_too_short"),
            ("birthday", "value_error"),
            ("points_balance", "greater_than_equal"),
            ("colour", "extra_forbidden"),
        ]
    )


@pytest.mark.parametrize("doc", [None, [], "gold", 7])
def test_a_member_that_is_not_an_object(doc: object) -> None:
    assert [(issue.field, issue.code) for issue in member_problems(doc)] == [("", "model_type")]


def test_the_engine_refuses_a_basket_for_another_member() -> None:
    ruleset = load_ruleset(RULES_888)
    doc = basket()
    doc["tenders"] = []
    with pytest.raises(InputError) as caught:
        price(parse_basket(doc), parse_member(_member(member_id="M999")), ruleset)
    assert [(issue.field, issue.code) for issue in caught.value.issues] == [("member_id", "member_mismatch")]


def test_the_engine_refuses_a_basket_without_a_time() -> None:
    ruleset = load_ruleset(RULES_888)
    doc = basket()
    del doc["at"]
    with pytest.raises(InputError) as caught:
        price(parse_basket(doc), None, ruleset)
    assert [(issue.field, issue.code) for issue in caught.value.issues] == [("at", "time_required")]
    with pytest.raises(InputError):
        price(parse_basket(doc), None, ruleset, dt.datetime(2026, 12, 10, 14, 5))  # noqa: DTZ001 - naive on purpose


# --- fuzzing ----------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["1", "0.356", "12.34", "-1", "1e3", "NaN", "", "2026-12-10T14:05:00+08:00", "02-29"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RULESET = load_ruleset(RULES_888)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        out += [p for key, value in node.items() for p in _paths(value, (*path, key))]
    elif isinstance(node, list):
        out += [p for index, value in enumerate(node) for p in _paths(value, (*path, index))]
    return out


def _damage(doc: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one thing anywhere in ``doc``."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    if not path:
        return data.draw(JSON, label="whole")
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "replace":
        parent[path[-1]] = data.draw(JSON, label="value")
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6), label="key")] = data.draw(JSON, label="value")
    else:
        parent.append(data.draw(JSON, label="value"))
    return doc


def _price_or_input_error(doc: Any, member_doc: Any) -> None:
    try:
        parsed = parse_basket(doc, source=SOURCE)
        who = None if member_doc is None else parse_member(member_doc, source="member.json")
        price(parsed, who, RULESET, MEMBER_DAY)
    except InputError as exc:
        issues = exc.issues
    else:
        return
    assert issues
    assert all(issue.code and issue.message for issue in issues)


@FUZZ
@given(basket_docs(max_lines=5), st.lists(tender_docs(), max_size=3), st.data())
def test_a_damaged_basket_is_priced_or_refused_with_an_input_error(
    doc: dict[str, Any], tenders: list[dict[str, Any]], data: st.DataObject
) -> None:
    doc = dict(doc, tenders=tenders)
    _price_or_input_error(_damage(doc, data), None)


@FUZZ
@given(st.data())
def test_a_damaged_member_is_priced_for_or_refused_with_an_input_error(data: st.DataObject) -> None:
    doc = basket()
    doc["tenders"] = []
    _price_or_input_error(doc, _damage(member(), data))


@FUZZ
@given(JSON)
def test_any_json_document_is_a_basket_or_an_input_error(doc: Any) -> None:
    _price_or_input_error(doc, None)
