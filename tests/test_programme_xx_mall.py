"""xx mall (xx购物中心, seed 004) scenarios, each worked out by hand from the seed text.

The programme (config/rules/xx-mall.toml): VIP silver "正价商品9.5折", gold "9折",
diamond "8.8折", each "(特殊品类及特价商品除外)"; normal members get points only;
1 point per yuan paid in cash or by bank card for every level, whole points per
basket (floor); "非公司规定的正常购买的储值卡不可与VIP卡同时使用": such a card
(subkind non_standard) prices the sale as a non-member's.  Every expected amount
below is computed in the comment next to it, never by the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from programme_helpers import codes, discounts, points

from agent.basket import Basket, Member, parse_basket, parse_member
from agent.engine import price
from agent.ruleset import Ruleset, load_ruleset

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "rules" / "xx-mall.toml"
SAMPLES = ROOT / "config" / "samples" / "xx-mall"

TENTH = "2026-12-10T14:00:00+08:00"
ELEVENTH = "2026-12-11T14:00:00+08:00"
VIP_TIERS = ["silver", "gold", "diamond"]


@pytest.fixture(scope="module")
def rules() -> Ruleset:
    return load_ruleset(RULES)


def line(
    line_id: str,
    unit_price: str,
    *,
    qty: str = "1",
    category: str = "womenswear",
    regular_price: str | None = None,
    flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "line_id": line_id,
        "sku": f"69400000000{line_id}",
        "category": category,
        "qty": qty,
        "unit_price": unit_price,
        "flags": list(flags),
    }
    if regular_price is not None:
        out["regular_price"] = regular_price
    return out


def basket(*lines: dict[str, Any], at: str, tenders: tuple[dict[str, Any], ...] = ()) -> Basket:
    return parse_basket({"lines": list(lines), "coupons": [], "tenders": list(tenders), "at": at})


def member(tier: str, **extra: Any) -> Member:
    return parse_member({"member_id": "M000301", "tier": tier, "birthday": "04-05", **extra})


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


# --- tier rates on regular-priced goods ----------------------------------------


@pytest.mark.parametrize("at", [TENTH, ELEVENTH])
@pytest.mark.parametrize(
    ("tier", "expected_discounts", "net"),
    [
        ("normal", [], 100000),  # no card discount for normal members; 1000 points
        ("silver", [("vip-rate", 5000)], 95000),  # 1000.00 x 0.95 = 950.00; 950 points
        ("gold", [("vip-rate", 10000)], 90000),  # 1000.00 x 0.90 = 900.00; 900 points
        ("diamond", [("vip-rate", 12000)], 88000),  # 1000.00 x 0.88 = 880.00; 880 points
    ],
)
def test_tier_rate_on_a_regular_priced_item(rules, at, tier, expected_discounts, net):
    # xx mall has no member day: the 10th prices like the 11th.
    priced = price(basket(line("1", "1000.00"), at=at), member(tier), rules)
    (pl,) = priced.lines
    assert discounts(pl) == expected_discounts
    assert pl.net_fen == net
    assert points(pl) == [("earn-base", net // 100)]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen) == (100000, 100000 - net, net)
    assert priced.tier == tier


@pytest.mark.parametrize(
    ("tier", "expected_discounts", "nets", "line_points", "totals"),
    [
        # regular-basket.json: coat 1000.00, 0.356 kg x 39.80 = 14.1688 -> 14.17.
        # silver: 950.00; 14.17 x 0.95 = 13.4615 -> 13.46 (0.71 off).  Net 963.46 -> 963 points;
        # shares 963 x 950.00/963.46 = 949.53, 963 x 13.46/963.46 = 13.45 -> 949 + 13, spare
        # to .53: 950 and 13.
        ("silver", [("vip-rate", 5000), ("vip-rate", 71)], (95000, 1346), (950, 13), (101417, 5071, 96346, 963)),
        # gold: 900.00; 14.17 x 0.90 = 12.753 -> 12.75 (1.42 off).  Net 912.75 -> 912 points;
        # each line keeps its whole points, 900 + 12.75 -> 900 + 12 (the basket is rounded
        # once; only the spare units left by the fractions go to the largest remainders).
        ("gold", [("vip-rate", 10000), ("vip-rate", 142)], (90000, 1275), (900, 12), (101417, 10142, 91275, 912)),
        # diamond: 880.00; 14.17 x 0.88 = 12.4696 -> 12.47 (1.70 off).  Net 892.47 -> 892;
        # shares 879.54 and 12.46 -> 879 + 12, spare to .54: 880 and 12.
        ("diamond", [("vip-rate", 12000), ("vip-rate", 170)], (88000, 1247), (880, 12), (101417, 12170, 89247, 892)),
        # normal: 1014.17 -> 1014 points; shares 1014 x 1000/1014.17 = 999.83 and
        # 1014 x 14.17/1014.17 = 14.17 -> 999 + 14, spare to .83: 1000 and 14.
        ("normal", [], (100000, 1417), (1000, 14), (101417, 0, 101417, 1014)),
    ],
)
def test_regular_basket_with_weighed_goods(rules, tier, expected_discounts, nets, line_points, totals):
    priced = price(parse_basket(sample("regular-basket.json")), member(tier), rules)
    coat, fresh = priced.lines
    assert fresh.line.qty == 356
    assert (coat.gross_fen, fresh.gross_fen) == (100000, 1417)
    assert discounts(coat) + discounts(fresh) == expected_discounts
    assert (coat.net_fen, fresh.net_fen) == nets
    assert (points(coat), points(fresh)) == ([("earn-base", line_points[0])], [("earn-base", line_points[1])])
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == totals


def test_guest_gets_nothing(rules):
    priced = price(parse_basket(sample("regular-basket.json")), None, rules)
    assert [discounts(pl) for pl in priced.lines] == [[], []]
    assert [points(pl) for pl in priced.lines] == [[], []]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (101417, 0, 101417, 0)


# --- "正价商品 ... (特殊品类及特价商品除外)" ---------------------------------------------


@pytest.mark.parametrize("tier", VIP_TIERS)
@pytest.mark.parametrize(
    "excluded",
    [
        line("1", "700.00", category="shoes", regular_price="1000.00"),  # marked down: not 正价
        line("1", "700.00", category="shoes", flags=("marked_down",)),
        line("1", "700.00", category="cosmetics", flags=("special_price",)),  # 特价商品
        line("1", "700.00", category="gold_jewellery"),  # 特殊品类
        line("1", "700.00", category="tobacco_liquor"),
        line("1", "700.00", category="watches", flags=("special_category",)),
    ],
)
def test_no_vip_rate_outside_regular_priced_goods_but_points(rules, tier, excluded):
    # No discount; the seed's exception is for the discount only, so 700 points.
    priced = price(basket(excluded, at=ELEVENTH), member(tier), rules)
    (pl,) = priced.lines
    assert discounts(pl) == []
    assert pl.net_fen == 70000
    assert points(pl) == [("earn-base", 700)]
    assert pl.excluded_points is None


def test_excluded_goods_sample(rules):
    # Diamond on the 11th (excluded-goods.json):
    #   shoes 700.00 (reg. 1000.00) 700.00; cosmetics 399.00 special_price 399.00;
    #   gold_jewellery 4560.00; tobacco_liquor 2 x 150.00 = 300.00; coat 1000.00 x 0.88 = 880.00.
    # gross 6959.00, discount 120.00, net 6839.00, points 700 + 399 + 4560 + 300 + 880 = 6839.
    priced = price(parse_basket(sample("excluded-goods.json")), parse_member(sample("member-diamond.json")), rules)
    assert [discounts(pl) for pl in priced.lines] == [[], [], [], [], [("vip-rate", 12000)]]
    assert [pl.net_fen for pl in priced.lines] == [70000, 39900, 456000, 30000, 88000]
    assert [pl.points for pl in priced.lines] == [700, 399, 4560, 300, 880]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (695900, 12000, 683900, 6839)


# --- upgrade ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "tier", "net", "pts", "message"),
    [
        # Silver on the 10th: 963.46, 963 points (see the regular basket above).
        (TENTH, "silver", 96346, 963, False),
        # Gold from the 11th: 912.75, 912 points, and the cashier is told.
        (ELEVENTH, "gold", 91275, 912, True),
    ],
)
def test_upgrade_to_gold_takes_effect_the_next_day(rules, at, tier, net, pts, message):
    data = sample("regular-basket.json")
    data["at"] = at
    upgrading = parse_member(sample("member-silver-upgrading.json"))
    assert (upgrading.next_tier, str(upgrading.next_tier_from)) == ("gold", "2026-12-11")
    priced = price(parse_basket(data), upgrading, rules)
    assert priced.tier == tier
    assert (priced.net_fen, priced.points) == (net, pts)
    assert ("tier_effective_today" in codes(priced)) is message


# --- stored-value cards ------------------------------------------------------------


@pytest.mark.parametrize("tier", VIP_TIERS)
def test_non_standard_stored_value_card_prices_as_non_member(rules, tier):
    # 1000.00 paid 300.00 by a non-standard stored-value card and 700.00 cash: the VIP card
    # cannot be used with it, so no discount (1000.00) and no points at all, not even on
    # the cash part; the cashier gets the message.
    priced = price(parse_basket(sample("stored-value-non-standard.json")), member(tier), rules)
    (pl,) = priced.lines
    assert discounts(pl) == []
    assert points(pl) == []
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (100000, 0, 100000, 0)
    assert priced.tier is None
    assert priced.member is not None
    assert priced.member.member_id == "M000301"
    assert codes(priced) == ["stored_value_no_member_benefits"]
    assert priced.unpaid_fen == 0


def test_non_standard_stored_value_card_without_member_card(rules):
    # A guest may pay with it: nothing to take away, no message.
    priced = price(parse_basket(sample("stored-value-non-standard.json")), None, rules)
    assert (priced.net_fen, priced.points) == (100000, 0)
    assert codes(priced) == []


def test_regular_stored_value_card_keeps_the_discount(rules):
    # Gold: 1000.00 x 0.90 = 900.00, paid 300.00 by a regularly bought stored-value card
    # and 580.00 cash (20.00 still open, counted as cash).  The stored-value part earns no
    # points: 900.00 - 300.00 = 600.00 -> 600 points.
    priced = price(parse_basket(sample("stored-value-standard.json")), member("gold"), rules)
    (pl,) = priced.lines
    assert discounts(pl) == [("vip-rate", 10000)]
    assert (pl.net_fen, pl.earning_fen) == (90000, 60000)
    assert points(pl) == [("earn-base", 600)]
    assert priced.unpaid_fen == 2000
    assert codes(priced) == []


def test_non_standard_stored_value_card_with_a_normal_card(rules):
    # The seed writes the restriction under the three VIP cards only ("不可与VIP卡同时使用").
    # A normal member has no discount to lose and keeps the points on the 700.00 cash: 700.
    priced = price(parse_basket(sample("stored-value-non-standard.json")), member("normal"), rules)
    assert priced.tier == "normal"
    assert priced.points == 700


def test_every_sample_scenario_prices(rules):
    scenarios = json.loads((SAMPLES / "scenarios.json").read_text(encoding="utf-8"))
    assert len(scenarios) >= 5
    for scenario in scenarios:
        assert scenario["title_en"]
        assert scenario["title_zh"]
        who = None
        if scenario["member"] is not None:
            who = parse_member(sample(scenario["member"]))
            assert who.tier in {"normal", "silver", "gold", "diamond"}
        priced = price(parse_basket(sample(scenario["basket"])), who, rules)
        assert priced.net_fen == sum(pl.net_fen for pl in priced.lines)
