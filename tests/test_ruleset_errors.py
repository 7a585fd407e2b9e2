"""Malformed rulesets: every problem reported at once, each with file, key path and reason.

A technician runs ``lane-agent rules check`` on a file head office sent; what
comes back must point at the key to fix.  So these tests assert the exact
(field, code) pairs, and that every issue carries the source file, never just
that something was raised.  Fuzzing on top: no input text, however broken,
may escape as anything but a RulesetError.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RULES_888
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import ruleset_docs, to_toml

from agent.errors import Issue, RulesetError
from agent.ruleset import load_ruleset, parse_ruleset

SOURCE = "config/rules/bad.toml"


def base() -> dict[str, Any]:
    """A small valid ruleset; each case breaks one thing in a fresh copy."""
    return {
        "ruleset": {
            "id": "test-mall",
            "version": "1",
            "name": {"zh-CN": "测试商场", "en": "Test mall"},
            "card_kinds": ["standard", "group"],
        },
        "tiers": [
            {"id": "vip", "label": {"zh-CN": "VIP卡", "en": "VIP"}},
            {"id": "gold", "label": {"zh-CN": "金卡", "en": "Gold"}},
        ],
        "rules": [
            {
                "id": "tier-rate",
                "kind": "percent",
                "label": {"zh-CN": "会员折扣", "en": "Member discount"},
                "rates": {"vip": "0.90", "gold": "0.88"},
            },
            {"id": "earn", "kind": "earn", "label": {"zh-CN": "积分", "en": "Points"}, "rate": "1"},
        ],
    }


def rule(rule_id: str, kind: str, **keys: Any) -> dict[str, Any]:
    return {"id": rule_id, "kind": kind, "label": {"zh-CN": rule_id, "en": rule_id}, **keys}


def problems(doc: dict[str, Any]) -> list[Issue]:
    with pytest.raises(RulesetError) as caught:
        parse_ruleset(to_toml(doc), source=SOURCE)
    issues = list(caught.value.issues)
    assert issues, "a RulesetError lists its problems"
    for issue in issues:
        assert issue.source == SOURCE
        assert issue.message
        assert str(issue).startswith(f"{SOURCE}: ")
    assert caught.value.code == "invalid_ruleset"
    return issues


def pairs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(issue.field, issue.code) for issue in problems(doc)]


def test_the_base_ruleset_is_valid() -> None:
    ruleset = parse_ruleset(to_toml(base()), source=SOURCE)
    assert [r.id for r in ruleset.rules] == ["earn", "tier-rate"]


Mutation = Callable[[dict[str, Any]], object]


def _set(path: str, value: object) -> Mutation:
    """Set ``value`` at a dotted path of the document ("rules.0.rate")."""

    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _drop(path: str) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return apply


def _add_rule(**keys: Any) -> Mutation:
    return lambda doc: doc["rules"].append(rule(**keys))


SINGLE_PROBLEMS: list[tuple[str, Mutation, list[tuple[str, str]]]] = [
    # unknown keys, at every level
    ("top-level typo", _set("rulez", {"a": 1}), [("rulez", "extra_forbidden")]),
    ("header typo", _set("ruleset.timezon", "UTC"), [("ruleset.timezon", "extra_forbidden")]),
    ("rule typo", _set("rules.0.rat", "0.9"), [("rules[0].rat", "extra_forbidden")]),
    ("when typo", _set("rules.0.when.day_of_month", [10]), [("rules[0].when.day_of_month", "extra_forbidden")]),
    ("scope typo", _set("rules.0.scope.category", ["food"]), [("rules[0].scope.category", "extra_forbidden")]),
    ("exclusion typo", _set("exclusions.discounts.flag", ["x"]), [("exclusions.discounts.flag", "extra_forbidden")]),
    ("tender typo", _set("tenders.points.acepted", value=True), [("tenders.points.acepted", "extra_forbidden")]),
    # wrong types
    ("priority as text", _set("rules.0.priority", "high"), [("rules[0].priority", "int_parsing")]),
    ("rate as TOML float", _set("rules.1.rate", 0.9), [("rules[1].rate", "string_type")]),
    ("tiers as text", _set("tiers", "gold"), [("tiers", "list_type")]),
    ("label without en", _drop("rules.0.label.en"), [("rules[0].label.en", "missing")]),
    ("rule without kind", _drop("rules.0.kind"), [("rules[0].kind", "missing")]),
    ("unknown kind", _set("rules.0.kind", "bogof"), [("rules[0].kind", "literal_error")]),
    ("day 32", _set("rules.0.when.days_of_month", [10, 32]), [("rules[0].when.days_of_month[1]", "less_than_equal")]),
    ("weekday 0", _set("rules.0.when.weekdays", [0]), [("rules[0].when.weekdays[0]", "greater_than_equal")]),
    ("time 25:00", _set("rules.0.when.times", [{"from": "25:00", "to": "26:00"}]),
     [("rules[0].when.times[0].from", "string_pattern_mismatch"), ("rules[0].when.times[0].to", "string_pattern_mismatch")]),
    ("empty time range", _set("rules.0.when.times", [{"from": "10:00", "to": "10:00"}]),
     [("rules[0].when.times[0]", "value_error")]),
    ("backwards dates", _set("rules.0.when.dates", [{"from": dt.date(2026, 12, 20), "to": dt.date(2026, 12, 18)}]),
     [("rules[0].when.dates[0]", "value_error")]),
    ("rule id with a space", _set("rules.0.id", "tier rate"), [("rules[0].id", "string_pattern_mismatch")]),
    ("rule id with a leading dash", _set("rules.0.id", "-tier-rate"), [("rules[0].id", "string_pattern_mismatch")]),
    ("time with a prefix", _set("rules.0.when.times", [{"from": "x10:00", "to": "12:00"}]),
     [("rules[0].when.times[0].from", "string_pattern_mismatch")]),
    ("time with a suffix", _set("rules.0.when.times", [{"from": "10:00", "to": "12:00 and more"}]),
     [("rules[0].when.times[0].to", "string_pattern_mismatch")]),
    ("time with three hour digits", _set("rules.0.when.times", [{"from": "110:00", "to": "12:00"}]),
     [("rules[0].when.times[0].from", "string_pattern_mismatch")]),
    ("empty label", _set("rules.0.label.en", ""), [("rules[0].label.en", "string_too_short")]),
    ("five-decimal rate", _set("rules.1.rate", "0.12345"), [("rules[1].rate", "value_error")]),
    ("money with three decimals", _add_rule(rule_id="x", kind="amount_off", amount="1.234", per="unit"),
     [("rules[2].amount", "value_error")]),
    ("money as TOML number", _add_rule(rule_id="x", kind="spend_off", threshold=100, off="10"),
     [("rules[2].threshold", "string_type")]),
    ("points max_share above 1", _set("tenders.points.max_share", "1.5"), [("tenders.points.max_share", "value_error")]),
    ("currency", _set("ruleset.currency", "USD"), [("ruleset.currency", "literal_error")]),
    ("no tiers", _set("tiers", []), [("tiers", "too_short")]),
    # kind-specific requirements
    ("amount_off without per", _add_rule(rule_id="x", kind="amount_off", amount="5"), [("rules[2]", "value_error")]),
    ("spend_off without threshold", _add_rule(rule_id="x", kind="spend_off", off="10"), [("rules[2]", "value_error")]),
    ("event_price without price or scope", _add_rule(rule_id="x", kind="event_price"), [("rules[2]", "value_error")]),
    ("multiplier below 1", _add_rule(rule_id="x", kind="points_multiplier", factor="0.5"), [("rules[2]", "value_error")]),
    ("multiplier without factor", _add_rule(rule_id="x", kind="points_multiplier"), [("rules[2]", "value_error")]),
    ("percent with rate and rates", _set("rules.0.rate", "0.9"), [("rules[0]", "value_error")]),
    ("percent with neither", _drop("rules.0.rates"), [("rules[0]", "value_error")]),
    ("key of another kind", _set("rules.1.amount", "5"), [("rules[1]", "value_error")]),
    ("percent rate above 1", _add_rule(rule_id="x", kind="percent", rate="1.1"), [("rules[2]", "value_error")]),
    ("marked-down rate above 1", _set("rules.0.marked_down_rates", {"vip": "1.05"}), [("rules[0]", "value_error")]),
    ("points rule stacking", _set("rules.1.stacking", "multiplicative"), [("rules[1]", "value_error")]),
    ("additive amount_off", _add_rule(rule_id="x", kind="amount_off", amount="5", per="unit", stacking="additive"),
     [("rules[2]", "value_error")]),
    ("additive event price", _add_rule(rule_id="x", kind="event_price", price="9", stacking="additive",
                                       scope={"skus": ["a"]}), [("rules[2]", "value_error")]),
    # cross-rule consistency
    ("duplicate rule id", _set("rules.1.id", "tier-rate"), [("rules[1].id", "duplicate")]),
    ("duplicate tier", _set("tiers.1.id", "vip"),
     [("tiers[1].id", "duplicate"), ("rules[0].rates.gold", "unknown_tier")]),
    ("undeclared tier in rates", _set("rules.0.rates.platinum", "0.8"), [("rules[0].rates.platinum", "unknown_tier")]),
    ("undeclared tier in marked_down_rates", _set("rules.0.marked_down_rates", {"diamond": "0.95"}),
     [("rules[0].marked_down_rates.diamond", "unknown_tier")]),
    ("undeclared tier in when", _set("rules.0.when.tiers", ["vip", "platinum"]), [("rules[0].when.tiers", "unknown_tier")]),
    ("undeclared card kind", _set("rules.0.when.card_kinds", ["employee"]),
     [("rules[0].when.card_kinds", "unknown_card_kind")]),
    ("undeclared conflict tier", _set("tenders.stored_value.conflict_tiers", ["platinum"]),
     [("tenders.stored_value.conflict_tiers", "unknown_tier")]),
    ("group across stages", lambda d: (_set("rules.0.group", "g")(d), _set("rules.1.group", "g")(d)),
     [("rules[1].group", "inconsistent")]),
    ("group with two stackings", lambda d: d["rules"].extend([
        rule("a", "percent", rate="0.9", group="g", stacking="best_of"),
        rule("b", "percent", rate="0.8", group="g", stacking="multiplicative")]),
     [("rules[3].stacking", "inconsistent")]),
    ("additive basket rule", _add_rule(rule_id="x", kind="spend_off", threshold="100", off="10", stacking="additive"),
     [("rules[2].stacking", "inconsistent")]),
    ("unknown time zone", _set("ruleset.timezone", "Mars/Olympus_Mons"), [("ruleset.timezone", "inconsistent")]),
    ("time zone that is a directory of the tz database", _set("ruleset.timezone", "Asia"),
     [("ruleset.timezone", "inconsistent")]),
    ("time zone name too long for the file system", _set("ruleset.timezone", "Asia/" + "X" * 300),
     [("ruleset.timezone", "inconsistent")]),
    ("time zone that is not normalised", _set("ruleset.timezone", "Asia/../Asia/Shanghai"),
     [("ruleset.timezone", "inconsistent")]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(mutate, expected, id=name) for name, mutate, expected in SINGLE_PROBLEMS],
)
def test_each_problem_names_its_key_and_reason(mutate: Mutation, expected: list[tuple[str, str]]) -> None:
    doc = base()
    mutate(doc)
    assert pairs(doc) == expected


def test_a_problem_in_a_rule_names_the_rule() -> None:
    doc = base()
    doc["rules"][1]["rate"] = 0.9
    (issue,) = problems(doc)
    assert "(rule 'earn')" in issue.message


def test_kind_problems_explain_what_is_missing() -> None:
    doc = base()
    doc["rules"].append(rule("xmas", "spend_off", off="10"))
    doc["rules"].append(rule("gold-event", "event_price"))
    doc["rules"].append(rule("cap", "percent", rate="1.5"))
    messages = [issue.message for issue in problems(doc)]
    assert len(messages) == 3
    assert "'threshold'" in messages[0]
    assert "(rule 'xmas')" in messages[0]
    assert "'price'" in messages[1]
    assert "scope.skus or scope.categories" in messages[1]
    assert "above 1" in messages[2]


def test_every_schema_problem_in_a_file_is_reported_at_once() -> None:
    doc = base()
    doc["ruleset"]["timezon"] = "UTC"
    doc["rules"][0]["priority"] = "high"
    doc["rules"][1]["rate"] = 0.9
    doc["rules"].append(rule("x", "amount_off", amount="5"))
    doc["rules"].append(rule("y", "percent", rate="0.9", when={"days_of_month": [0]}))
    assert sorted(pairs(doc)) == sorted(
        [
            ("ruleset.timezon", "extra_forbidden"),
            ("rules[0].priority", "int_parsing"),
            ("rules[1].rate", "string_type"),
            ("rules[2]", "value_error"),
            ("rules[3].when.days_of_month[0]", "greater_than_equal"),
        ]
    )


def test_every_consistency_problem_in_a_file_is_reported_at_once() -> None:
    doc = base()
    doc["ruleset"]["timezone"] = "Mars/Olympus_Mons"
    doc["tiers"].append({"id": "vip", "label": {"zh-CN": "重复", "en": "again"}})
    doc["rules"][1]["id"] = "tier-rate"
    doc["rules"][0]["when"] = {"tiers": ["platinum"], "card_kinds": ["employee"]}
    assert sorted(pairs(doc)) == sorted(
        [
            ("ruleset.timezone", "inconsistent"),
            ("tiers[2].id", "duplicate"),
            ("rules[1].id", "duplicate"),
            ("rules[0].when.tiers", "unknown_tier"),
            ("rules[0].when.card_kinds", "unknown_card_kind"),
        ]
    )


def test_schema_and_consistency_problems_are_reported_together() -> None:
    # "All at once": a typo in one rule must not hide a duplicate id or an undeclared tier elsewhere.
    doc = base()
    doc["rules"][0]["rat"] = "0.9"
    doc["rules"].append(rule("earn", "earn", rate="2"))
    doc["rules"].append(rule("z", "percent", rates={"platinum": "0.8"}))
    assert sorted(pairs(doc)) == sorted(
        [
            ("rules[0].rat", "extra_forbidden"),
            ("rules[2].id", "duplicate"),
            ("rules[3].rates.platinum", "unknown_tier"),
        ]
    )


# --- text and files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[ruleset]\nid = "x\n',  # unterminated string
        "[ruleset\n",  # unterminated table header
        "[ruleset]\nid = \n",  # missing value
        "[ruleset]\nid = 1\nid = 2\n",  # duplicate key
        "rules = [ { id = 'a' }\n",  # unterminated array
        "\x00",
    ],
)
def test_toml_syntax_errors_name_the_file_and_the_line(text: str) -> None:
    with pytest.raises(RulesetError) as caught:
        parse_ruleset(text, source=SOURCE)
    (issue,) = caught.value.issues
    assert (issue.field, issue.code, issue.source) == ("", "toml_syntax", SOURCE)
    assert "line" in issue.message or "end of document" in issue.message


def test_load_ruleset_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    doc = base()
    doc["rules"][0]["rat"] = "0.9"
    path.write_text(to_toml(doc), encoding="utf-8")
    with pytest.raises(RulesetError) as caught:
        load_ruleset(path)
    assert [(i.field, i.code, i.source) for i in caught.value.issues] == [
        ("rules[0].rat", "extra_forbidden", str(path))
    ]
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("make", ["missing", "directory", "latin-1", "binary"])
def test_unreadable_files_are_ruleset_errors(tmp_path: Path, make: str) -> None:
    path = tmp_path / "rules.toml"
    if make == "directory":
        path.mkdir()
    elif make == "latin-1":
        path.write_bytes('[ruleset]\nid = "caf\xe9"\n'.encode("latin-1"))
    elif make == "binary":
        path.write_bytes(bytes(range(256)))
    with pytest.raises(RulesetError) as caught:
        load_ruleset(path)
    assert [(i.field, i.source) for i in caught.value.issues] == [("", str(path))]
    assert caught.value.issues[0].code in ("unreadable", "toml_syntax")


# --- fuzzing --------------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL_RULES = RULES_888.read_text(encoding="utf-8")


def parse_or_ruleset_error(text: str) -> None:
    try:
        parse_ruleset(text, source=SOURCE)
    except RulesetError as exc:
        issues = exc.issues
    else:
        return
    assert issues
    assert all(issue.source == SOURCE and issue.code and issue.message for issue in issues)


@FUZZ
@given(st.data())
def test_a_damaged_real_ruleset_gives_a_ruleset_error_or_loads(data: st.DataObject) -> None:
    text = REAL_RULES
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(text)), label="position")
        edit = data.draw(st.sampled_from(["insert", "replace", "delete", "truncate"]), label="edit")
        junk = data.draw(st.text(min_size=1, max_size=3) | st.sampled_from(['"', "[", "]", "=", "\n", "{", ".", "0"]))
        if edit == "insert":
            text = text[:position] + junk + text[position:]
        elif edit == "replace":
            text = text[:position] + junk + text[position + len(junk) :]
        elif edit == "delete":
            text = text[:position] + text[position + 1 :]
        else:
            text = text[:position]
    parse_or_ruleset_error(text)


SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=10)
    | st.text("0123456789:x ", min_size=4, max_size=7)  # almost times
    | st.sampled_from(["0.9", "-1", "1e3", "Asia", "UTC", "", "vip", "12:00", "24:00", "unit"])
    | st.dates()
)


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [path] + [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(node, list):
        return [path] + [leaf for index, value in enumerate(node) for leaf in _leaves(value, (*path, index))]
    return [path]


@FUZZ
@given(ruleset_docs(max_rules=6), st.data())
def test_a_valid_ruleset_with_one_value_replaced_gives_a_ruleset_error_or_loads(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_leaves(doc)[1:]), label="path")
    value = data.draw(
        st.none()  # None: delete the key
        | SCALARS
        | st.lists(SCALARS, max_size=3)
        | st.dictionaries(st.text("abcz_-", min_size=1, max_size=5), SCALARS),
        label="value",
    )
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    parse_or_ruleset_error(to_toml(doc))
