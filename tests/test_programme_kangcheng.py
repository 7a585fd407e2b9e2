"""Kangcheng department store (康城百货, seed 000) scenarios, each worked out by hand.

The programme (config/rules/kangcheng.toml): gold and platinum cards both get
"会员卡一般提供9折优惠" (x0.90) on regular-priced goods; marked-down goods get no
card rate; special-price and group-buy lines get neither discount nor points;
1 point per yuan paid in cash or by bank card, whole points per basket (floor);
no member day, no points or rebate tender.  Every expected amount below is
computed in the comment next to it, never by the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from programme_helpers import codes, discounts, points

from agent.basket import Basket, Member, parse_basket, parse_member
from agent.engine import price
from agent.errors import TenderError
from agent.ruleset import Ruleset, load_ruleset

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "rules" / "kangcheng.toml"
SAMPLES = ROOT / "config" / "samples" / "kangcheng"

TENTH = "2026-12-10T14:00:00+08:00"
ELEVENTH = "2026-12-11T14:00:00+08:00"


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
        "sku": f"69300000000{line_id}",
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
    return parse_member({"member_id": "M000201", "tier": tier, "birthday": "06-21", **extra})


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("tier", ["gold", "platinum"])
@pytest.mark.parametrize("at", [TENTH, ELEVENTH])
def test_card_rate_on_regular_goods_any_day(rules, tier, at):
    # 1000.00 x 0.90 = 900.00 (100.00 off) for both cards; Kangcheng has no member day,
    # so the 10th is like the 11th.  900 points.
    priced = price(basket(line("1", "1000.00"), at=at), member(tier), rules)
    (pl,) = priced.lines
    assert discounts(pl) == [("card-rate", 10000)]
    assert pl.net_fen == 90000
    assert points(pl) == [("earn-base", 900)]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (100000, 10000, 90000, 900)
    assert priced.tier == tier
    assert codes(priced) == []


@pytest.mark.parametrize(
    "marked_down",
    [
        line("1", "999.00", category="shoes", regular_price="1200.00"),
        line("1", "999.00", category="shoes", flags=("marked_down",)),
    ],
)
def test_marked_down_goods_get_no_card_rate_but_earn(rules, marked_down):
    # Already marked down from 1200.00 to 999.00: no card rate on top; 999 points.
    priced = price(basket(marked_down, at=ELEVENTH), member("platinum"), rules)
    (pl,) = priced.lines
    assert discounts(pl) == []
    assert pl.excluded_discounts is None  # left out by the rule's scope, not excluded outright
    assert pl.net_fen == 99900
    assert points(pl) == [("earn-base", 999)]


@pytest.mark.parametrize("flag", ["special_price", "group_buy"])
def test_special_price_and_group_buy_get_no_discount_and_no_points(rules, flag):
    # 1999.00 flagged: no discount, no points (seed 001 "团购业务、特例商品不参与积分").
    priced = price(
        basket(line("1", "1999.00", category="appliances", flags=(flag,)), at=ELEVENTH), member("gold"), rules
    )
    (pl,) = priced.lines
    assert discounts(pl) == []
    assert pl.excluded_discounts == f"flag:{flag}"
    assert pl.excluded_points == f"flag:{flag}"
    assert (pl.net_fen, pl.points, points(pl)) == (199900, 0, [])
    assert priced.points == 0


def test_excluded_goods_sample(rules):
    # Platinum on the 11th (config/samples/kangcheng/excluded-goods.json):
    #   shoes 999.00 (reg. 1200.00): 999.00, 999 points
    #   appliance 1999.00 special_price: 1999.00, 0 points
    #   food 300.00 group_buy: 300.00, 0 points
    #   coat 1000.00: x0.90 = 900.00, 900 points
    # gross 4298.00, discount 100.00, net 4198.00, points 999 + 900 = 1899.
    priced = price(parse_basket(sample("excluded-goods.json")), parse_member(sample("member-platinum.json")), rules)
    assert [discounts(pl) for pl in priced.lines] == [[], [], [], [("card-rate", 10000)]]
    assert [pl.net_fen for pl in priced.lines] == [99900, 199900, 30000, 90000]
    assert [pl.points for pl in priced.lines] == [999, 0, 0, 900]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (429800, 10000, 419800, 1899)


def test_regular_basket_points_rounded_once(rules):
    # Gold on the 10th (regular-basket.json): coat 1000.00 -> 900.00; 2 x 45.67 = 91.34,
    # x0.90 = 82.206 -> 82.21 (9.13 off).  Net 982.21 -> 982 points; each line keeps
    # its whole points (900 and 82.21 -> 82), nothing is left for the remainders.
    priced = price(parse_basket(sample("regular-basket.json")), parse_member(sample("member-gold.json")), rules)
    coat, home = priced.lines
    assert discounts(coat) == [("card-rate", 10000)]
    assert discounts(home) == [("card-rate", 913)]
    assert (coat.net_fen, home.net_fen) == (90000, 8221)
    assert (points(coat), points(home)) == ([("earn-base", 900)], [("earn-base", 82)])
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (109134, 10913, 98221, 982)


def test_no_card_no_benefit(rules):
    # "若未出示会员卡则无法享受相关优惠和积分累积功能": guest pays 1000.00 + 91.34.
    priced = price(parse_basket(sample("regular-basket.json")), None, rules)
    assert [discounts(pl) for pl in priced.lines] == [[], []]
    assert [points(pl) for pl in priced.lines] == [[], []]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (109134, 0, 109134, 0)
    assert priced.tier is None


def test_card_of_an_unknown_tier_is_priced_as_a_guest(rules):
    # A "vip" tier does not exist at Kangcheng: no discount, no points, a message.
    priced = price(basket(line("1", "1000.00"), at=ELEVENTH), member("vip"), rules)
    assert (priced.net_fen, priced.points, priced.tier) == (100000, 0, None)
    assert codes(priced) == ["unknown_tier"]


@pytest.mark.parametrize(
    ("at", "tier", "message"),
    [
        (TENTH, "gold", False),
        (ELEVENTH, "platinum", True),  # "会员卡将在次日生效": platinum from the 11th
        ("2026-12-12T10:00:00+08:00", "platinum", False),
    ],
)
def test_upgrade_to_platinum_takes_effect_the_next_day(rules, at, tier, message):
    # Both cards pay 1000.00 x 0.90 = 900.00; what changes is the tier in force.
    upgrading = member("gold", next_tier="platinum", next_tier_from="2026-12-11")
    priced = price(basket(line("1", "1000.00"), at=at), upgrading, rules)
    assert priced.tier == tier
    assert (priced.net_fen, priced.points) == (90000, 900)
    assert ("tier_effective_today" in codes(priced)) is message


def test_weighed_goods(rules):
    # Gold on the 11th (weighed.json): 0.356 kg x 68.00 = 24.208 -> 24.21, x0.90 = 21.789
    # -> 21.79 (2.42 off); 3 x 12.34 = 37.02, x0.90 = 33.318 -> 33.32 (3.70 off).
    # Net 55.11 -> 55 points; shares 55 x 21.79/55.11 = 21.75 and 55 x 33.32/55.11 = 33.25
    # -> 21 + 33, the spare point to the larger remainder (.75): 22 and 33.
    priced = price(parse_basket(sample("weighed.json")), member("gold"), rules)
    fresh, food = priced.lines
    assert fresh.line.qty == 356
    assert (fresh.gross_fen, food.gross_fen) == (2421, 3702)
    assert (discounts(fresh), discounts(food)) == ([("card-rate", 242)], [("card-rate", 370)])
    assert (fresh.net_fen, food.net_fen) == (2179, 3332)
    assert (points(fresh), points(food)) == ([("earn-base", 22)], [("earn-base", 33)])
    assert (priced.net_fen, priced.points) == (5511, 55)


def test_stored_value_part_earns_no_points(rules):
    # Gold on the 11th: 1000.00 -> 900.00, paid 200.00 by stored-value card and 700.00 cash.
    # Only cash and bank card earn: 700 points.  A regular stored-value card is no conflict.
    priced = price(parse_basket(sample("stored-value.json")), member("gold"), rules)
    (pl,) = priced.lines
    assert discounts(pl) == [("card-rate", 10000)]
    assert (pl.net_fen, pl.earning_fen) == (90000, 70000)
    assert points(pl) == [("earn-base", 700)]
    assert priced.unpaid_fen == 0
    assert codes(priced) == []


@pytest.mark.parametrize(
    "tender",
    [{"kind": "points", "points": 1000}, {"kind": "rebate", "amount": "10.00"}],
)
def test_points_and_rebate_do_not_pay(rules, tender):
    # Neither points cash-offset nor rebate money exists at Kangcheng.
    with pytest.raises(TenderError) as caught:
        price(basket(line("1", "1000.00"), at=ELEVENTH, tenders=(tender,)), member("gold", points_balance=5000), rules)
    assert [issue.code for issue in caught.value.issues] == ["tender_not_accepted"]


def test_every_sample_scenario_prices(rules):
    scenarios = json.loads((SAMPLES / "scenarios.json").read_text(encoding="utf-8"))
    assert len(scenarios) >= 5
    for scenario in scenarios:
        assert scenario["title_en"]
        assert scenario["title_zh"]
        who = None
        if scenario["member"] is not None:
            who = parse_member(sample(scenario["member"]))
            assert who.tier in {"gold", "platinum"}
        priced = price(parse_basket(sample(scenario["basket"])), who, rules)
        assert priced.net_fen == sum(pl.net_fen for pl in priced.lines)
