"""The benchmark's synthetic data agrees with the real loader and engine.

The generator writes TOML and the POS API's JSON, so these tests load its
rulesets through ``parse_ruleset`` and price its baskets through ``price``,
then read the result back from the wire document with decimal arithmetic:
lines must sum exactly to totals.  They also check that the generated data is
what the benchmark claims it is (every rule kind and stacking mode, rules that
fire on some lines and not all, 30-line baskets with weighed and marked-down
goods), so a benchmark figure is about a realistic workload.  No timing here:
speed is ``make bench``'s job.
"""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from decimal import Decimal
from functools import cache
from typing import Any, get_args

import pytest

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.render import to_json, to_wire
from agent.ruleset import Ruleset, parse_ruleset
from agent.ruleset_schema import RuleKind, Stacking
from bench import synthetic
from bench.synthetic import Catalogue, make_catalogue, make_requests, make_ruleset

SEEDS = (1, 2, 3, 17)
SIZES = (10, 200)


@cache
def catalogue(seed: int) -> Catalogue:
    return make_catalogue(seed)


@cache
def loaded(rules: int, seed: int) -> tuple[Ruleset, tuple[str, ...], str]:
    generated = make_ruleset(rules, seed, catalogue(seed))
    return parse_ruleset(generated.text, source=f"synthetic-{rules}-{seed}"), generated.coupon_codes, generated.text


def priced_wires(rules: int, seed: int, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    ruleset, coupons, _ = loaded(rules, seed)
    out = []
    for basket_doc, member_doc in make_requests(count, seed, catalogue(seed), coupons):
        basket = parse_basket(json.loads(json.dumps(basket_doc)))
        member = None if member_doc is None else parse_member(member_doc)
        out.append((basket_doc, to_wire(price(basket, member, ruleset))))
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rules", SIZES)
def test_generated_ruleset_loads_through_the_real_loader(rules: int, seed: int) -> None:
    ruleset, coupons, text = loaded(rules, seed)
    assert len(ruleset.rules) == rules
    assert len(tomllib.loads(text)["rules"]) == rules
    assert set(coupons) == set(ruleset.coupon_codes)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rules", SIZES)
def test_priced_lines_sum_exactly_to_totals(rules: int, seed: int) -> None:
    ruleset, _, _ = loaded(rules, seed)
    rule_ids = {r.id for r in ruleset.rules}
    for basket_doc, wire in priced_wires(rules, seed, 25):
        lines = wire["lines"]
        assert [line["line_id"] for line in lines] == [line["line_id"] for line in basket_doc["lines"]]
        for line in lines:
            gross, net = Decimal(line["gross"]), Decimal(line["net"])
            taken = sum((Decimal(d["amount"]) for d in line["discounts"]), Decimal(0))
            assert gross - taken == net >= 0
            assert Decimal(line["discount"]) == taken
            assert line["points"] == sum(p["points"] for p in line["points_detail"]) >= 0
            assert {d["rule"] for d in line["discounts"]} <= rule_ids
            assert {p["rule"] for p in line["points_detail"]} <= rule_ids
        totals = wire["totals"]
        assert sum((Decimal(line["gross"]) for line in lines), Decimal(0)) == Decimal(totals["gross"])
        assert sum((Decimal(line["net"]) for line in lines), Decimal(0)) == Decimal(totals["net"])
        assert Decimal(totals["gross"]) - Decimal(totals["discount"]) == Decimal(totals["net"])
        assert sum(line["points"] for line in lines) == totals["points"]


def test_pricing_generated_baskets_is_byte_identical_on_repeat() -> None:
    ruleset, coupons, _ = loaded(200, 1)
    for basket_doc, member_doc in make_requests(10, 1, catalogue(1), coupons):
        basket = parse_basket(basket_doc)
        member = None if member_doc is None else parse_member(member_doc)
        assert to_json(price(basket, member, ruleset)) == to_json(price(basket, member, ruleset))


def test_generator_is_deterministic_and_seeded() -> None:
    assert make_ruleset(200, 5).text == make_ruleset(200, 5).text
    assert make_ruleset(200, 5).text != make_ruleset(200, 6).text
    assert make_requests(5, 5) == make_requests(5, 5)
    assert make_requests(5, 5) != make_requests(5, 6)


def test_200_rules_use_the_whole_format() -> None:
    ruleset, coupons, text = loaded(200, 1)
    assert {r.kind for r in ruleset.rules} == set(get_args(RuleKind))
    assert {r.stacking for r in ruleset.rules} == set(get_args(Stacking))
    assert coupons
    raw = tomllib.loads(text)["rules"]
    conditions = Counter(key for rule in raw for key in rule.get("when", {}))
    for key in ("dates", "weekdays", "times", "days_of_month", "tiers", "member", "coupon", "birthday", "card_kinds"):
        assert conditions[key], f"no rule uses when.{key}"
    scopes = Counter(key for rule in raw for key in rule.get("scope", {}))
    for key in ("categories", "skus", "exclude_categories", "exclude_flags", "marked_down", "skip_discounted"):
        assert scopes[key], f"no rule uses scope.{key}"
    assert any("rates" in rule for rule in raw)
    assert any("marked_down_rates" in rule for rule in raw)
    assert any(rule.get("repeat") and "max_off" in rule for rule in raw)
    # Most rules are narrow: scoped to some categories or SKUs, not every line.
    scoped = sum(1 for rule in raw if rule.get("scope", {}).get("categories") or rule.get("scope", {}).get("skus"))
    assert scoped > 0.8 * len(raw)


def test_generated_rules_fire_on_some_lines_not_all() -> None:
    ruleset, _, _ = loaded(200, 1)
    wires = priced_wires(200, 1, 150)
    lines = [line for _, wire in wires for line in wire["lines"]]
    fired = Counter(d["rule"] for line in lines for d in line["discounts"])
    earned = Counter(p["rule"] for line in lines for p in line["points_detail"])
    kinds = {r.id: r.kind for r in ruleset.rules}
    # Every kind of rule gives something somewhere (no_points shows as a zero-point entry).
    assert {kinds[rule] for rule in fired} == {"percent", "amount_off", "spend_off", "event_price"}
    assert {kinds[rule] for rule in earned} >= {"earn", "points_multiplier"}
    assert len(fired) >= 40
    # Apart from the tier rate, no rule touches more than half of the lines.
    assert max(count for rule, count in fired.items() if rule != "tier-rate") < len(lines) / 2
    assert any(line["excluded"]["discounts"] for line in lines)
    assert any(line["excluded"]["points"] for line in lines)
    assert 0 < sum(1 for line in lines if line["discounts"]) < len(lines)


def test_baskets_look_like_a_supermarket_till() -> None:
    requests = make_requests(100, 3, catalogue(3), ("CPN00001",))
    lines = [line for basket, _ in requests for line in basket["lines"]]
    assert all(len(basket["lines"]) == synthetic.LINES_PER_BASKET for basket, _ in requests)
    for basket, member in requests:
        ids = [line["line_id"] for line in basket["lines"]]
        assert len(set(ids)) == len(ids)
        assert basket.get("member_id") == (None if member is None else member["member_id"])
    assert any("." in line["qty"] for line in lines), "no weighed goods"
    assert any("regular_price" in line for line in lines), "no marked-down lines"
    flags = Counter(flag for line in lines for flag in line.get("flags", ()))
    assert {"special_price", "group_buy", "no_points_event", "marked_down"} <= set(flags)
    assert 0 < sum(member is None for _, member in requests) < len(requests)
    assert any(basket.get("coupons") for basket, _ in requests)
    assert any(basket.get("tenders") for basket, _ in requests)
    assert len({line["category"] for line in lines}) >= 30
    assert len({line["sku"] for line in lines}) > 1000


def test_catalogue_has_valid_unique_ean13_codes() -> None:
    skus = catalogue(1).skus
    assert len(skus) == 5000
    assert len({s.sku for s in skus}) == len(skus)
    assert len({s.category for s in skus}) == 40
    for sku in skus:
        digits = [int(d) for d in sku.sku]
        assert len(digits) == 13
        assert sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0
        assert sku.price_fen > 0


def test_command_line_emits_a_ruleset_and_a_matching_basket_and_member(capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic.main(["--rules", "10", "--seed", "4"]) == 0
    ruleset = parse_ruleset(capsys.readouterr().out)
    assert len(ruleset.rules) == 10
    assert synthetic.main(["--rules", "10", "--seed", "4", "--emit", "basket"]) == 0
    basket = parse_basket(json.loads(capsys.readouterr().out))
    assert synthetic.main(["--rules", "10", "--seed", "4", "--emit", "member"]) == 0
    member = parse_member(json.loads(capsys.readouterr().out))
    priced = price(basket, member, ruleset)
    assert priced.member is not None
    assert sum(line.net_fen for line in priced.lines) == priced.net_fen


def test_too_few_rules_is_refused() -> None:
    with pytest.raises(ValueError, match="backbone"):
        make_ruleset(2, 1)
