"""888 mall (seed 004) scenarios, each worked out by hand from the seed text.

The programme (config/rules/888-mall.toml): VIP "正价商品9折，折后商品95折";
gold "正价商品88折，折后商品95折"; the points card gets no discount; "每月10号为
会员惊喜日 ... 在原有折扣上再享受95折"; "1 元等于1 分" for every card, whole points
per basket (floor); the members' carnival earns no points; rebate money
earns no points.  Every expected amount below is computed in the comment next
to it, never by the engine.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from programme_helpers import codes, discounts, points

from agent.basket import Basket, Member, parse_basket, parse_member
from agent.engine import price
from agent.ruleset import Ruleset, load_ruleset

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "rules" / "888-mall.toml"
SAMPLES = ROOT / "config" / "samples" / "888-mall"

MEMBER_DAY = "2026-12-10T14:00:00+08:00"  # Thursday the 10th
ORDINARY_DAY = "2026-12-11T14:00:00+08:00"
EVENT_SKU = "6901234567892"


@pytest.fixture(scope="module")
def rules() -> Ruleset:
    return load_ruleset(RULES)


def line(
    line_id: str,
    unit_price: str,
    *,
    qty: str = "1",
    category: str = "womenswear",
    sku: str | None = None,
    regular_price: str | None = None,
    flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "line_id": line_id,
        "sku": sku or f"69200000000{line_id}",
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
    return parse_member({"member_id": "M000123", "tier": tier, "birthday": "05-17", **extra})


# --- tier rates, regular vs marked-down, member day ------------------------


@pytest.mark.parametrize(
    ("tier", "at", "expected_discounts", "net", "pts"),
    [
        # VIP, 11th: 1000.00 x 0.90 = 900.00 (100.00 off); 900 points.
        ("vip", ORDINARY_DAY, [("tier-rate", 10000)], 90000, 900),
        # VIP, 10th: 1000.00 x 0.90 = 900.00, x 0.95 = 855.00 (45.00 more); 855 points.
        ("vip", MEMBER_DAY, [("tier-rate", 10000), ("member-day", 4500)], 85500, 855),
        # gold, 11th: 1000.00 x 0.88 = 880.00 (120.00 off); 880 points.
        ("gold", ORDINARY_DAY, [("tier-rate", 12000)], 88000, 880),
        # gold, 10th: 1000.00 x 0.88 = 880.00, x 0.95 = 836.00 (44.00 more); 836 points.
        ("gold", MEMBER_DAY, [("tier-rate", 12000), ("member-day", 4400)], 83600, 836),
        # points card, either day: no discount at all ("积分卡" has none, and the member
        # day is a VIP-card benefit); 1000 points.
        ("points_card", ORDINARY_DAY, [], 100000, 1000),
        ("points_card", MEMBER_DAY, [], 100000, 1000),
    ],
)
def test_regular_priced_item_by_tier_and_day(rules, tier, at, expected_discounts, net, pts):
    priced = price(basket(line("1", "1000.00"), at=at), member(tier), rules)
    (pl,) = priced.lines
    assert pl.gross_fen == 100000
    assert discounts(pl) == expected_discounts
    assert pl.net_fen == net
    assert points(pl) == [("earn-base", pts)]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (100000, 100000 - net, net, pts)
    assert priced.tier == tier


@pytest.mark.parametrize(
    ("tier", "at", "expected_discounts", "net", "pts"),
    [
        # Marked down from 800.00 to 600.00: "折后商品95折" for VIP and gold alike.
        # 11th: 600.00 x 0.95 = 570.00 (30.00 off); 570 points.
        ("vip", ORDINARY_DAY, [("tier-rate", 3000)], 57000, 570),
        ("gold", ORDINARY_DAY, [("tier-rate", 3000)], 57000, 570),
        # 10th: 570.00 x 0.95 = 541.50 (28.50 more); floor(541.50) = 541 points.
        ("vip", MEMBER_DAY, [("tier-rate", 3000), ("member-day", 2850)], 54150, 541),
        ("gold", MEMBER_DAY, [("tier-rate", 3000), ("member-day", 2850)], 54150, 541),
        # points card: no discount, 600 points.
        ("points_card", MEMBER_DAY, [], 60000, 600),
    ],
)
def test_marked_down_item_gets_the_marked_down_rate(rules, tier, at, expected_discounts, net, pts):
    priced = price(basket(line("1", "600.00", regular_price="800.00"), at=at), member(tier), rules)
    (pl,) = priced.lines
    assert pl.gross_fen == 60000
    assert discounts(pl) == expected_discounts
    assert pl.net_fen == net
    assert points(pl) == [("earn-base", pts)]
    assert priced.points == pts


def test_marked_down_flag_without_regular_price(rules):
    # Gold on the 10th, 399.00 flagged marked_down: 399.00 x 0.95 = 379.05 (19.95 off),
    # x 0.95 = 360.0975 -> 360.10 (18.95 off); floor(360.10) = 360 points.
    priced = price(basket(line("1", "399.00", flags=("marked_down",)), at=MEMBER_DAY), member("gold"), rules)
    (pl,) = priced.lines
    assert discounts(pl) == [("tier-rate", 1995), ("member-day", 1895)]
    assert pl.net_fen == 36010
    assert points(pl) == [("earn-base", 360)]


def test_member_day_is_the_local_10th(rules):
    # 2026-12-09T16:30Z is 00:30 on the 10th in Shanghai: member day.
    # VIP: 1000.00 x 0.90 x 0.95 = 855.00.
    early = price(basket(line("1", "1000.00"), at="2026-12-09T16:30:00+00:00"), member("vip"), rules)
    assert early.net_fen == 85500
    # 2026-12-10T16:30Z is 00:30 on the 11th in Shanghai: no member day; 900.00.
    late = price(basket(line("1", "1000.00"), at="2026-12-10T16:30:00+00:00"), member("vip"), rules)
    assert late.net_fen == 90000
    assert discounts(late.lines[0]) == [("tier-rate", 10000)]


def test_guest_gets_nothing(rules):
    # "凭VIP卡 ... 享受VIP会员折扣": no card, no discount, no points, even on the 10th.
    priced = price(
        basket(line("1", "1000.00"), line("2", "600.00", regular_price="800.00"), at=MEMBER_DAY), None, rules
    )
    assert [discounts(pl) for pl in priced.lines] == [[], []]
    assert [points(pl) for pl in priced.lines] == [[], []]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (160000, 0, 160000, 0)
    assert priced.tier is None


# --- exclusions --------------------------------------------------------------


def test_counter_outside_the_member_scheme_gets_no_discount_but_earns(rules):
    # Seed: "在888实行会员制的专柜享受VIP会员折扣".  Flag non_member_counter -> no discount,
    # not even the member day; points on the full 299.00 = 299.
    priced = price(
        basket(line("1", "299.00", category="electronics", flags=("non_member_counter",)), at=MEMBER_DAY),
        member("gold"),
        rules,
    )
    (pl,) = priced.lines
    assert discounts(pl) == []
    assert pl.excluded_discounts == "flag:non_member_counter"
    assert pl.net_fen == 29900
    assert points(pl) == [("earn-base", 299)]
    assert pl.excluded_points is None


def test_no_points_activity_keeps_discount_but_earns_nothing(rules):
    # VIP on the 11th: toy 500.00 in an activity announced as no-points -> 450.00, 0 points;
    # coat 1000.00 -> 900.00, 900 points.  Basket: 1350.00, 900 points.
    priced = price(
        basket(
            line("1", "500.00", category="toys", flags=("no_points_event",)),
            line("2", "1000.00"),
            at=ORDINARY_DAY,
        ),
        member("vip"),
        rules,
    )
    toy, coat = priced.lines
    assert discounts(toy) == [("tier-rate", 5000)]
    assert toy.net_fen == 45000
    assert toy.points == 0
    assert points(toy) == []
    assert toy.excluded_points == "flag:no_points_event"
    assert points(coat) == [("earn-base", 900)]
    assert (priced.net_fen, priced.points) == (135000, 900)


@pytest.mark.parametrize(
    ("at", "pts"),
    [
        ("2026-11-26T20:00:00+08:00", 880),  # the day before the carnival: normal points
        ("2026-11-27T10:00:00+08:00", 0),  # first carnival day
        ("2026-11-28T15:30:00+08:00", 0),
        ("2026-11-29T21:59:00+08:00", 0),  # last carnival day
        ("2026-11-30T10:00:00+08:00", 880),  # the day after
        ("2027-05-02T10:00:00+08:00", 0),  # the second carnival of the year
    ],
)
def test_members_carnival_earns_no_points(rules, at, pts):
    # Gold, 1000.00 x 0.88 = 880.00 (none of these days is a 10th).  "一年两次的会员
    # 狂购嘉年华活动将不参与积分累计": 0 points on carnival days, named on the line.
    priced = price(basket(line("1", "1000.00"), at=at), member("gold"), rules)
    (pl,) = priced.lines
    assert discounts(pl) == [("tier-rate", 12000)]
    assert pl.net_fen == 88000
    assert priced.points == pts
    if pts:
        assert points(pl) == [("earn-base", pts)]
    else:
        assert points(pl) == [("carnival-no-points", 0)]


# --- tier change, weighed goods, rounding ------------------------------------


@pytest.mark.parametrize(
    ("at", "tier", "expected_discounts", "net", "message"),
    [
        # Still VIP on the 10th (member day): 1000.00 x 0.90 x 0.95 = 855.00.
        (MEMBER_DAY, "vip", [("tier-rate", 10000), ("member-day", 4500)], 85500, False),
        # Gold from the 11th: 1000.00 x 0.88 = 880.00, and the cashier is told.
        (ORDINARY_DAY, "gold", [("tier-rate", 12000)], 88000, True),
        # Still gold on the 12th, no message any more.
        ("2026-12-12T14:00:00+08:00", "gold", [("tier-rate", 12000)], 88000, False),
    ],
)
def test_upgrade_to_gold_takes_effect_the_next_day(rules, at, tier, expected_discounts, net, message):
    upgrading = member("vip", next_tier="gold", next_tier_from="2026-12-11")
    priced = price(basket(line("1", "1000.00"), at=at), upgrading, rules)
    assert priced.tier == tier
    assert discounts(priced.lines[0]) == expected_discounts
    assert priced.net_fen == net
    assert priced.points == net // 100
    assert ("tier_effective_today" in codes(priced)) is message


@pytest.mark.parametrize(
    ("at", "expected_discounts", "net"),
    [
        # 0.356 kg x 39.80 = 14.1688 -> 14.17.  VIP: 14.17 x 0.90 = 12.753 -> 12.75 (1.42 off).
        (ORDINARY_DAY, [("tier-rate", 142)], 1275),
        # 10th: 12.75 x 0.95 = 12.1125 -> 12.11 (0.64 more).
        (MEMBER_DAY, [("tier-rate", 142), ("member-day", 64)], 1211),
    ],
)
def test_weighed_goods(rules, at, expected_discounts, net):
    priced = price(basket(line("1", "39.80", qty="0.356", category="snacks_bulk"), at=at), member("vip"), rules)
    (pl,) = priced.lines
    assert pl.line.qty == 356
    assert pl.gross_fen == 1417
    assert discounts(pl) == expected_discounts
    assert pl.net_fen == net
    assert points(pl) == [("earn-base", 12)]  # floor(12.75) = floor(12.11) = 12


def test_points_are_rounded_once_per_basket(rules):
    # VIP, 11th: 10.50 x 0.90 = 9.45; 20.70 x 0.90 = 18.63.  Basket 28.08 -> 28 points
    # (per line it would be 9 + 18 = 27).  Back to lines by largest remainder:
    # 28 x 9.45/28.08 = 9.42 -> 9; 28 x 18.63/28.08 = 18.58 -> 18; the spare point goes
    # to the larger remainder (.58): 9 and 19.
    priced = price(basket(line("1", "10.50"), line("2", "20.70"), at=ORDINARY_DAY), member("vip"), rules)
    first, second = priced.lines
    assert (first.net_fen, second.net_fen) == (945, 1863)
    assert (discounts(first), discounts(second)) == ([("tier-rate", 105)], [("tier-rate", 207)])
    assert (points(first), points(second)) == ([("earn-base", 9)], [("earn-base", 19)])
    assert priced.points == 28


def test_mixed_basket_on_member_day(rules):
    # VIP on the 10th (config/samples/888-mall/member-day-mixed.json):
    #   coat 1000.00: x0.90 = 900.00 (100.00), x0.95 = 855.00 (45.00)
    #   shoes 600.00 (reg. 800.00): x0.95 = 570.00 (30.00), x0.95 = 541.50 (28.50)
    #   snacks 0.356 x 39.80 = 14.17: x0.90 = 12.75 (1.42), x0.95 = 12.11 (0.64)
    #   electronics 299.00 at a non-member counter: 299.00
    # gross 1913.17, net 855.00 + 541.50 + 12.11 + 299.00 = 1707.61, discount 205.56.
    # Points floor(1707.61) = 1707; shares 1707 x net/1707.61: 854.69, 541.31, 12.11,
    # 298.89 -> floors 854 + 541 + 12 + 298 = 1705, the 2 spare to the largest
    # remainders (.89 electronics, .69 coat): 855, 541, 12, 299.
    data = json.loads((SAMPLES / "member-day-mixed.json").read_text(encoding="utf-8"))
    vip = parse_member(json.loads((SAMPLES / "member-vip.json").read_text(encoding="utf-8")))
    priced = price(parse_basket(data), vip, rules)
    coat, shoes, snacks, electronics = priced.lines
    assert discounts(coat) == [("tier-rate", 10000), ("member-day", 4500)]
    assert discounts(shoes) == [("tier-rate", 3000), ("member-day", 2850)]
    assert discounts(snacks) == [("tier-rate", 142), ("member-day", 64)]
    assert discounts(electronics) == []
    assert [pl.net_fen for pl in priced.lines] == [85500, 54150, 1211, 29900]
    assert [pl.points for pl in priced.lines] == [855, 541, 12, 299]
    assert (priced.gross_fen, priced.discount_fen, priced.net_fen, priced.points) == (191317, 20556, 170761, 1707)


# --- gold event price, rebate money --------------------------------------------


@pytest.mark.parametrize(
    ("tier", "at", "unit_price", "expected_discounts", "net"),
    [
        # Gold, 19 Dec, 260.00: the rate gives 260 x 0.88 = 228.80 (31.20 off), the event
        # price 199.00 (61.00 off): the event price wins, alone.
        ("gold", "2026-12-19T11:00:00+08:00", "260.00", [("gold-event-2026-12", 6100)], 19900),
        # Gold, 19 Dec, 220.00: the rate gives 193.60 (26.40 off) against 21.00 off: the rate wins.
        ("gold", "2026-12-19T11:00:00+08:00", "220.00", [("tier-rate", 2640)], 19360),
        # VIP, 19 Dec: gold-only, so 260 x 0.90 = 234.00.
        ("vip", "2026-12-19T11:00:00+08:00", "260.00", [("tier-rate", 2600)], 23400),
        # Gold, 21 Dec, after the event: 228.80.
        ("gold", "2026-12-21T11:00:00+08:00", "260.00", [("tier-rate", 3120)], 22880),
    ],
)
def test_gold_event_price(rules, tier, at, unit_price, expected_discounts, net):
    priced = price(basket(line("1", unit_price, sku=EVENT_SKU, category="cosmetics"), at=at), member(tier), rules)
    (pl,) = priced.lines
    assert discounts(pl) == expected_discounts
    assert pl.net_fen == net
    assert points(pl) == [("earn-base", net // 100)]


def test_gold_event_price_per_unit(rules):
    # Gold, 18 Dec, 2 x 260.00 = 520.00: rate 457.60 (62.40 off); event 2 x 199.00 = 398.00
    # (122.00 off) wins; 398 points.
    priced = price(
        basket(line("1", "260.00", qty="2", sku=EVENT_SKU, category="cosmetics"), at="2026-12-18T09:00:00+08:00"),
        member("gold"),
        rules,
    )
    (pl,) = priced.lines
    assert discounts(pl) == [("gold-event-2026-12", 12200)]
    assert (pl.net_fen, pl.points) == (39800, 398)


def test_rebate_money_earns_no_points(rules):
    # Gold on the 11th: 600.00 -> 528.00 and 400.00 -> 352.00, due 880.00.  100.00 paid with
    # rebate money ("返利金只能在商场收银台交款时使用") earns nothing: spread by net, 60.00 and
    # 40.00; points on 468.00 + 312.00 = 780.
    priced = price(
        basket(
            line("1", "600.00"),
            line("2", "400.00", category="menswear"),
            at=ORDINARY_DAY,
            tenders=({"kind": "rebate", "amount": "100.00"}, {"kind": "bank_card", "amount": "780.00"}),
        ),
        member("gold", rebate_balance="150.00"),
        rules,
    )
    first, second = priced.lines
    assert (first.net_fen, second.net_fen) == (52800, 35200)
    assert (first.earning_fen, second.earning_fen) == (46800, 31200)
    assert (points(first), points(second)) == ([("earn-base", 468)], [("earn-base", 312)])
    assert priced.points == 780
    assert priced.unpaid_fen == 0


# --- the demo samples ------------------------------------------------------------


def test_every_sample_scenario_prices(rules):
    scenarios = json.loads((SAMPLES / "scenarios.json").read_text(encoding="utf-8"))
    assert len(scenarios) >= 5
    for scenario in scenarios:
        assert scenario["title_en"]
        assert scenario["title_zh"]
        data = json.loads((SAMPLES / scenario["basket"]).read_text(encoding="utf-8"))
        assert dt.datetime.fromisoformat(data["at"]).utcoffset() is not None
        who = None
        if scenario["member"] is not None:
            who = parse_member(json.loads((SAMPLES / scenario["member"]).read_text(encoding="utf-8")))
            assert who.tier in {"points_card", "vip", "gold"}
        priced = price(parse_basket(data), who, rules)
        assert priced.net_fen == sum(pl.net_fen for pl in priced.lines)
