"""Deterministic synthetic rulesets, catalogues, baskets and members for benchmarks and tests.

A real store's ruleset is mostly narrow promotions: a category on sale for two
weeks, a handful of SKUs at an event price for gold members, 满减 on
womenswear, double points on Tuesdays, plus a few rules that touch every line
(the tier rate, member day, base points).  The generator reproduces that mix
over a catalogue of 40 categories and 5,000 SKUs, so most rules apply to only
some lines of a basket and only some of the time.

Everything is driven by ``random.Random`` seeded with a string derived from the
seed, so the same arguments give byte-identical output on every machine and
Python version.  The ruleset comes out as TOML text: callers load it through
the real loader (``agent.ruleset.parse_ruleset``), so the benchmark measures
rulesets that passed the same validation as a shipped programme.  Baskets and
members come out as the POS API's JSON documents (dicts), for the same reason.

Usage::

    python -m bench.synthetic --rules 200 --seed 1 > synthetic.toml
    python -m bench.synthetic --rules 200 --seed 1 --emit basket > basket.json
    python -m bench.synthetic --seed 1 --emit member > member.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

TIERS = ("silver", "gold", "platinum", "diamond")
TIER_LABELS = {
    "silver": ("银卡", "Silver"),
    "gold": ("金卡", "Gold"),
    "platinum": ("白金卡", "Platinum"),
    "diamond": ("钻石卡", "Diamond"),
}
CARD_KINDS = ("standard", "employee", "group")
TIMEZONE = "Asia/Shanghai"
UTC8 = dt.timezone(dt.timedelta(hours=8))
# Sales happen in December 2026; promotions run somewhere between mid-October
# and mid-February, so each date window holds for some baskets and not others.
SALES_FROM = dt.date(2026, 12, 1)
SALES_DAYS = 31
CAMPAIGN_FROM = dt.date(2026, 10, 15)
CAMPAIGN_DAYS = 110
LINES_PER_BASKET = 30

Json = dict[str, Any]

# (id, zh-CN, en, weighed, lowest and highest price in yuan, share of SKUs)
_CATEGORIES: tuple[tuple[str, str, str, bool, float, float, int], ...] = (
    ("vegetables", "蔬菜", "Vegetables", True, 1.5, 30, 3),
    ("fruit", "水果", "Fruit", True, 3, 80, 3),
    ("meat", "鲜肉", "Fresh meat", True, 15, 120, 2),
    ("seafood", "水产", "Seafood", True, 20, 300, 2),
    ("deli", "熟食", "Deli", True, 10, 90, 2),
    ("bakery", "烘焙", "Bakery", False, 3, 60, 2),
    ("dairy", "乳品", "Dairy", False, 3, 80, 3),
    ("eggs", "禽蛋", "Eggs", False, 8, 40, 1),
    ("frozen", "冷冻食品", "Frozen food", False, 8, 90, 3),
    ("grain", "米面粮油", "Rice and flour", False, 5, 150, 3),
    ("oil", "食用油", "Cooking oil", False, 15, 200, 1),
    ("condiments", "调味品", "Condiments", False, 2, 60, 3),
    ("snacks", "休闲零食", "Snacks", False, 2, 60, 5),
    ("candy", "糖果巧克力", "Candy and chocolate", False, 3, 150, 3),
    ("biscuits", "饼干糕点", "Biscuits", False, 3, 80, 3),
    ("beverages", "饮料", "Soft drinks", False, 2, 60, 4),
    ("water", "饮用水", "Water", False, 1, 40, 1),
    ("tea", "茶叶", "Tea", False, 20, 800, 2),
    ("coffee", "咖啡冲饮", "Coffee", False, 10, 200, 2),
    ("beer", "啤酒", "Beer", False, 3, 150, 2),
    ("wine", "葡萄酒", "Wine", False, 40, 1500, 2),
    ("spirits", "白酒", "Baijiu and spirits", False, 30, 3000, 2),
    ("tobacco", "烟草", "Tobacco", False, 15, 100, 1),
    ("infant_formula", "婴幼儿奶粉", "Infant formula", False, 150, 500, 1),
    ("baby_care", "母婴用品", "Baby care", False, 10, 300, 2),
    ("personal_care", "个人护理", "Personal care", False, 5, 120, 4),
    ("skincare", "护肤", "Skincare", False, 30, 900, 3),
    ("cosmetics", "彩妆", "Cosmetics", False, 40, 600, 2),
    ("cleaning", "家庭清洁", "Household cleaning", False, 5, 90, 3),
    ("paper", "纸品", "Paper goods", False, 5, 80, 2),
    ("kitchenware", "厨具", "Kitchenware", False, 10, 600, 3),
    ("appliances", "小家电", "Small appliances", False, 60, 2000, 2),
    ("electronics", "数码", "Electronics", False, 30, 5000, 2),
    ("stationery", "文具", "Stationery", False, 2, 100, 2),
    ("toys", "玩具", "Toys", False, 10, 600, 3),
    ("womenswear", "女装", "Womenswear", False, 60, 1500, 3),
    ("menswear", "男装", "Menswear", False, 60, 1500, 2),
    ("shoes", "鞋", "Shoes", False, 80, 1500, 2),
    ("home_textiles", "家纺", "Home textiles", False, 30, 1200, 2),
    ("pet", "宠物用品", "Pet supplies", False, 5, 300, 2),
)
# The programme-wide exclusions every generated ruleset carries.
NO_DISCOUNT_CATEGORIES = ("tobacco", "infant_formula")
NO_POINTS_CATEGORIES = ("tobacco",)
NO_DISCOUNT_FLAGS = ("special_price", "group_buy")
NO_POINTS_FLAGS = ("group_buy", "no_points_event")


@dataclass(frozen=True, slots=True)
class Category:
    id: str
    zh: str
    en: str
    weighed: bool


@dataclass(frozen=True, slots=True)
class Sku:
    sku: str
    category: str
    price_fen: int  # per kilogram for weighed goods
    weighed: bool


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Categories and SKUs, with a popularity (Zipf-like) to draw basket lines from."""

    categories: tuple[Category, ...]
    skus: tuple[Sku, ...]
    cumulative_popularity: tuple[float, ...]

    def draw(self, rng: random.Random, count: int = 1) -> list[Sku]:
        """``count`` SKUs drawn by popularity (repeats possible, as at a real till)."""
        return rng.choices(self.skus, cum_weights=self.cumulative_popularity, k=count)

    def draw_unique(self, rng: random.Random, count: int) -> list[Sku]:
        """Up to ``count`` distinct SKUs drawn by popularity: promotions favour what sells."""
        chosen: dict[str, Sku] = {}
        for sku in self.draw(rng, count * 3):
            chosen.setdefault(sku.sku, sku)
            if len(chosen) == count:
                break
        return list(chosen.values())


@dataclass(frozen=True, slots=True)
class SyntheticRuleset:
    """A generated ruleset: the TOML text and what baskets need to know about it."""

    text: str
    rule_count: int
    coupon_codes: tuple[str, ...]


def _rng(seed: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by ``random``: stable across runs and versions.
    return random.Random(f"bench.synthetic:{stream}:{seed}")


def _ean13(body12: str) -> str:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body12))
    return body12 + str((10 - total % 10) % 10)


def _shelf_price(rng: random.Random, low: float, high: float) -> int:
    """A price in fen that looks like a shelf price: 3.50, 12.90, 129.00."""
    yuan = math.exp(rng.uniform(math.log(low), math.log(high)))
    if yuan < 10:
        return max(10, round(yuan * 10) * 10)
    if yuan < 100:
        return int(yuan) * 100 + rng.choice((0, 50, 80, 90))
    return int(yuan) * 100


def make_catalogue(seed: int = 1, n_skus: int = 5000) -> Catalogue:
    """40 categories and ``n_skus`` SKUs (EAN-13), ordered from most to least popular."""
    rng = _rng(seed, "catalogue")
    categories = tuple(Category(c[0], c[1], c[2], c[3]) for c in _CATEGORIES)
    shares = [c[6] for c in _CATEGORIES]
    seen: set[str] = set()
    skus: list[Sku] = []
    while len(skus) < n_skus:
        spec = rng.choices(_CATEGORIES, weights=shares)[0]
        code = _ean13("69" + "".join(rng.choice("0123456789") for _ in range(10)))
        if code in seen:
            continue
        seen.add(code)
        skus.append(Sku(code, spec[0], _shelf_price(rng, spec[4], spec[5]), spec[3]))
    # Popularity falls off like Zipf's law: a few SKUs are in many baskets.
    popularity = [1.0 / (rank + 10) ** 0.9 for rank in range(n_skus)]
    return Catalogue(categories, tuple(skus), tuple(accumulate(popularity)))


def _money(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _rate(e2: int) -> str:
    """Percent as a rate string: 95 -> "0.95", 100 -> "1"."""
    return "1" if e2 == 100 else f"0.{e2:02d}".rstrip("0")


def _label(zh: str, en: str) -> Json:
    return {"zh-CN": zh[:80], "en": en[:80]}


# --- rule makers -------------------------------------------------------------


class _Rules:
    """Accumulates rule tables; each maker adds one rule or a small group of them."""

    def __init__(self, rng: random.Random, catalogue: Catalogue, n_rules: int) -> None:
        self.rng = rng
        self.catalogue = catalogue
        self.categories = [c for c in catalogue.categories if c.id not in NO_DISCOUNT_CATEGORIES]
        self.rules: list[Json] = []
        self.coupons: list[str] = []
        self.serial = 0
        self.made: set[str] = set()
        # A few named groups per stage and mode, reused so groups have several members.
        self.group_count = max(1, n_rules // 40)

    # helpers

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial:04d}"

    def group(self, stage: str, mode: str) -> str:
        return f"g-{stage}-{mode}-{self.rng.randrange(self.group_count)}"

    def pick_categories(self, most: int = 3) -> list[Category]:
        return self.rng.sample(self.categories, self.rng.randint(1, most))

    def priority(self) -> int:
        return self.rng.choice((50, 80, 100, 120, 150, 200, 300, 500))

    def percent(self) -> int:
        return self.rng.choice((95, 95, 90, 90, 88, 85, 80, 80, 75, 70))

    def upper_tiers(self) -> list[str]:
        return list(TIERS[self.rng.randint(1, len(TIERS) - 1) :])

    def window(self, *, dates: float = 0.65, weekdays: float = 0.15, times: float = 0.08, member: float = 0.3) -> Json:
        rng = self.rng
        when: Json = {}
        if rng.random() < member:
            if rng.random() < 0.5:
                when["member"] = True
            else:
                when["tiers"] = self.upper_tiers()
        if rng.random() < dates:
            start = CAMPAIGN_FROM + dt.timedelta(days=rng.randrange(CAMPAIGN_DAYS))
            when["dates"] = [{"from": start, "to": start + dt.timedelta(days=rng.randint(2, 45))}]
        if rng.random() < weekdays:
            when["weekdays"] = rng.choice(([6, 7], [5, 6, 7], [2], [3], [1, 2, 3, 4]))
        if rng.random() < times:
            hour = rng.randint(8, 20)
            when["times"] = [{"from": f"{hour:02d}:00", "to": f"{hour + rng.randint(1, 3):02d}:00"}]
        return when

    def line_stacking(self, rule: Json, *, additive_ok: bool = False) -> None:
        roll = self.rng.random()
        if roll < 0.5:
            rule["stacking"] = "multiplicative"
        elif roll < 0.85:
            rule["stacking"] = "best_of"
            rule["group"] = self.group("line", "best")
        else:
            rule["stacking"] = "exclusive"
        if additive_ok and roll > 0.97:
            rule["stacking"] = "additive"
            rule["group"] = self.group("line", "add")

    def add(self, rule: Json) -> None:
        self.rules.append(rule)

    def once(self, name: str) -> bool:
        """True the first time: a programme has one birthday discount and one staff rate, not ten."""
        if name in self.made:
            return False
        self.made.add(name)
        return True

    # the programme's backbone: rules that touch (almost) every line

    def backbone(self) -> None:
        self.add(
            {
                "id": "tier-rate",
                "kind": "percent",
                "label": _label("会员折扣", "Member discount"),
                "priority": 100,
                "stacking": "multiplicative",
                "rates": {"silver": "0.98", "gold": "0.95", "platinum": "0.9", "diamond": "0.88"},
                "marked_down_rates": {"gold": "0.98", "platinum": "0.95", "diamond": "0.95"},
                "scope": {"exclude_categories": ["electronics", "appliances"]},
            }
        )
        self.add(
            {
                "id": "earn-base",
                "kind": "earn",
                "label": _label("消费积分", "Points on spend"),
                "priority": 100,
                "rates": {"silver": "1", "gold": "1", "platinum": "1.5", "diamond": "2"},
            }
        )
        self.add(
            {
                "id": "member-day",
                "kind": "percent",
                "label": _label("会员日95折", "Member day 5% off"),
                "priority": 200,
                "stacking": "multiplicative",
                "rate": "0.95",
                "when": {"tiers": ["gold", "platinum", "diamond"], "days_of_month": [10]},
            }
        )

    # promotions

    def category_percent(self) -> None:
        cats = self.pick_categories()
        pct = self.percent()
        rule: Json = {
            "id": self.next_id("cat"),
            "kind": "percent",
            "label": _label(
                f"{'、'.join(c.zh for c in cats)} {pct // 10}.{pct % 10}折".replace(".0折", "折"),
                f"{', '.join(c.en for c in cats)} {100 - pct}% off",
            ),
            "priority": self.priority(),
            "when": self.window(),
            "scope": {"categories": [c.id for c in cats]},
        }
        if self.rng.random() < 0.2:  # member prices that deepen with the tier
            rule["rates"] = {t: _rate(max(50, pct - 3 * i)) for i, t in enumerate(TIERS[1:])}
            rule["when"].pop("tiers", None)
        else:
            rule["rate"] = _rate(pct)
        scope = rule["scope"]
        roll = self.rng.random()
        if roll < 0.25:
            scope["marked_down"] = "exclude"
        elif roll < 0.35:
            rule["marked_down_rate"] = _rate(min(98, pct + 5))
        if self.rng.random() < 0.15:
            scope["skip_discounted"] = True
        if self.rng.random() < 0.2:
            scope["exclude_flags"] = ["clearance"]
        self.line_stacking(rule, additive_ok=True)
        self.add(rule)

    def sku_percent(self) -> None:
        skus = self.catalogue.draw_unique(self.rng, self.rng.choice((1, 2, 3, 5, 8, 12, 20, 30)))
        pct = self.percent()
        rule: Json = {
            "id": self.next_id("skupct"),
            "kind": "percent",
            "label": _label(f"指定商品{pct}折", f"Selected items {100 - pct}% off"),
            "priority": self.priority(),
            "rate": _rate(pct),
            "when": self.window(member=0.2),
            "scope": {"skus": [s.sku for s in skus]},
        }
        self.line_stacking(rule, additive_ok=True)
        self.add(rule)

    def sku_amount_off(self) -> None:
        skus = self.catalogue.draw_unique(self.rng, self.rng.choice((1, 2, 4, 6, 10)))
        cheapest = min(s.price_fen for s in skus)
        amount = max(10, cheapest * self.rng.randint(5, 25) // 100 // 10 * 10)
        rule: Json = {
            "id": self.next_id("skuoff"),
            "kind": "amount_off",
            "label": _label(f"指定商品立减{_money(amount)}元", f"{_money(amount)} off selected items"),
            "priority": self.priority(),
            "amount": _money(amount),
            "per": "unit",
            "when": self.window(member=0.2),
            "scope": {"skus": [s.sku for s in skus]},
        }
        self.line_stacking(rule)
        self.add(rule)

    def event_price(self) -> None:
        skus = self.catalogue.draw_unique(self.rng, self.rng.choice((1, 1, 2, 3)))
        price = min(s.price_fen for s in skus) * self.rng.randint(70, 90) // 100
        tiers = self.upper_tiers()
        rule: Json = {
            "id": self.next_id("event"),
            "kind": "event_price",
            "label": _label(f"{TIER_LABELS[tiers[0]][0]}及以上专享价", f"{TIER_LABELS[tiers[0]][1]}+ event price"),
            "priority": self.priority(),
            "price": _money(max(1, price)),
            "when": {**self.window(member=0), "tiers": tiers},
            "scope": {"skus": [s.sku for s in skus]},
        }
        if self.rng.random() < 0.6:
            rule["stacking"] = "exclusive"
        else:
            rule["stacking"] = "best_of"
            rule["group"] = self.group("line", "best")
        self.add(rule)

    def member_day_category(self) -> None:
        cats = self.pick_categories(2)
        day = self.rng.choice((8, 18, 28, 15, 25))
        rule: Json = {
            "id": self.next_id("mday"),
            "kind": "percent",
            "label": _label(f"{day}日会员日{cats[0].zh}9折", f"Member day on the {day}th: {cats[0].en} 10% off"),
            "priority": self.priority(),
            "stacking": "multiplicative",
            "rate": "0.9",
            "when": {"member": True, "days_of_month": [day]},
            "scope": {"categories": [c.id for c in cats]},
        }
        self.add(rule)

    def birthday(self) -> None:
        roll = self.rng.random()
        if roll < 0.4 and self.once("birthday-month"):
            self.add(
                {
                    "id": self.next_id("bday"),
                    "kind": "percent",
                    "label": _label("生日月9折", "Birthday month 10% off"),
                    "priority": self.priority(),
                    "stacking": "multiplicative",
                    "rate": "0.9",
                    "when": {"birthday": "month"},
                    "scope": {"marked_down": "exclude"},
                }
            )
        elif roll < 0.7:
            cats = self.pick_categories(2)
            self.add(
                {
                    "id": self.next_id("bday"),
                    "kind": "percent",
                    "label": _label(f"生日当天{cats[0].zh}8折", f"Birthday: {cats[0].en} 20% off"),
                    "priority": self.priority(),
                    "stacking": "exclusive",
                    "rate": "0.8",
                    "when": {"birthday": "day"},
                    "scope": {"categories": [c.id for c in cats]},
                }
            )
        elif self.once("birthday-points"):
            self.add(
                {
                    "id": self.next_id("bdaypts"),
                    "kind": "points_multiplier",
                    "label": _label("生日双倍积分", "Birthday double points"),
                    "priority": self.priority(),
                    "factor": "2",
                    "when": {"birthday": "day"},
                }
            )

    def coupon(self) -> None:
        code = f"CPN{self.serial + 1:05d}"
        self.coupons.append(code)
        roll = self.rng.random()
        when = {**self.window(dates=0.5, weekdays=0, times=0), "coupon": code}
        if roll < 0.4:
            cats = self.pick_categories(2)
            rule: Json = {
                "id": self.next_id("cpnpct"),
                "kind": "percent",
                "label": _label(f"{cats[0].zh}9折券", f"{cats[0].en} 10% coupon"),
                "rate": "0.9",
                "scope": {"categories": [c.id for c in cats]},
            }
        elif roll < 0.7:
            amount = self.rng.choice((500, 1000, 2000, 5000))
            rule = {
                "id": self.next_id("cpnoff"),
                "kind": "amount_off",
                "label": _label(f"{amount // 100}元代金券", f"{amount // 100} yuan voucher"),
                "amount": _money(amount),
                "per": "basket",
                "scope": {"exclude_flags": ["special_price"]},
            }
        else:
            threshold = self.rng.choice((10000, 20000, 30000))
            rule = {
                "id": self.next_id("cpnspend"),
                "kind": "spend_off",
                "label": _label(f"满{threshold // 100}减30券", f"30 off every {threshold // 100} coupon"),
                "threshold": _money(threshold),
                "off": "30.00",
                "scope": {"categories": [c.id for c in self.pick_categories(4)]},
            }
        rule["priority"] = self.priority()
        rule["when"] = when
        self.add(rule)

    def spend_off(self) -> None:
        cats = self.pick_categories(4)
        threshold = self.rng.choice((9900, 10000, 15000, 19900, 20000, 29900, 30000, 50000))
        off = max(500, threshold * self.rng.randint(5, 30) // 100 // 500 * 500)
        rule: Json = {
            "id": self.next_id("manjian"),
            "kind": "spend_off",
            "label": _label(
                f"{cats[0].zh}满{threshold // 100}减{off // 100}",
                f"{cats[0].en}: {off // 100} off every {threshold // 100}",
            ),
            "priority": self.priority(),
            "threshold": _money(threshold),
            "off": _money(off),
            "when": self.window(member=0.2),
            "scope": {"categories": [c.id for c in cats]},
        }
        if self.rng.random() < 0.5:
            rule["repeat"] = True
            if self.rng.random() < 0.5:
                rule["max_off"] = _money(off * self.rng.randint(2, 5))
        scope = rule["scope"]
        if self.rng.random() < 0.3:
            scope["marked_down"] = "exclude"
        if self.rng.random() < 0.3:
            scope["skip_discounted"] = True
        roll = self.rng.random()
        if roll < 0.5:
            rule["stacking"] = "multiplicative"
        elif roll < 0.8:
            rule["stacking"] = "best_of"
            rule["group"] = self.group("basket", "best")
        else:
            rule["stacking"] = "exclusive"
        self.add(rule)

    def additive_group(self) -> None:
        """Two or three percent rules whose rates add up (0.95 and 0.97 give 0.92)."""
        cats = [c.id for c in self.pick_categories(3)]
        group = f"g-line-sum-{self.serial + 1}"
        for _ in range(self.rng.randint(2, 3)):
            pct = self.rng.choice((97, 95, 95, 90))
            self.add(
                {
                    "id": self.next_id("sum"),
                    "kind": "percent",
                    "label": _label(f"叠加优惠{pct}折", f"Stackable {100 - pct}% off"),
                    "priority": self.priority(),
                    "stacking": "additive",
                    "group": group,
                    "rate": _rate(pct),
                    "when": self.window(dates=0.4, weekdays=0.3, member=0.3),
                    "scope": {"categories": cats},
                }
            )

    def card_kind(self) -> None:
        if self.rng.random() < 0.5:
            if not self.once("staff"):
                return
            self.add(
                {
                    "id": self.next_id("staff"),
                    "kind": "percent",
                    "label": _label("员工价85折", "Staff rate 15% off"),
                    "priority": self.priority(),
                    "stacking": "exclusive",
                    "rate": "0.85",
                    "when": {"card_kinds": ["employee"]},
                    "scope": {"exclude_flags": ["clearance"], "marked_down": "exclude"},
                }
            )
        elif self.once("corp"):
            self.add(
                {
                    "id": self.next_id("corp"),
                    "kind": "percent",
                    "label": _label("团购卡补贴98折", "Group card subsidy 2% off"),
                    "priority": 900,
                    "stacking": "multiplicative",
                    "rate": "0.98",
                    "when": {"card_kinds": ["group"]},
                }
            )

    def happy_hour(self) -> None:
        pct = self.rng.choice((70, 75, 80))
        self.add(
            {
                "id": self.next_id("evening"),
                "kind": "percent",
                "label": _label(f"晚间烘焙熟食{pct // 10}折", f"Evening bakery and deli {100 - pct}% off"),
                "priority": self.priority(),
                "stacking": "best_of",
                "group": self.group("line", "best"),
                "rate": _rate(pct),
                "when": {"times": [{"from": self.rng.choice(("19:00", "20:00", "20:30")), "to": "22:00"}]},
                "scope": {"categories": ["bakery", "deli"]},
            }
        )

    def basket_amount_off(self) -> None:
        if not self.once("basket-amount-off"):
            return
        amount = self.rng.choice((500, 1000, 2000))
        self.add(
            {
                "id": self.next_id("bskoff"),
                "kind": "amount_off",
                "label": _label(f"会员立减{amount // 100}元", f"Members: {amount // 100} off the bill"),
                "priority": self.priority(),
                "amount": _money(amount),
                "per": "basket",
                "when": {**self.window(dates=1, member=0), "tiers": self.upper_tiers()},
            }
        )

    # points

    def earn_category(self) -> None:
        cats = self.pick_categories(3)
        rule: Json = {
            "id": self.next_id("earn"),
            "kind": "earn",
            "label": _label(f"{cats[0].zh}多倍积分", f"{cats[0].en}: extra points"),
            "priority": self.priority(),
            "when": self.window(dates=0.5, member=0),
            "scope": {"categories": [c.id for c in cats]},
        }
        if self.rng.random() < 0.5:
            rule["rate"] = self.rng.choice(("2", "3", "1.5"))
        else:
            rule["rates"] = {"silver": "1.5", "gold": "2", "platinum": "2.5", "diamond": "3"}
        self.add(rule)

    def multiplier(self) -> None:
        factor = self.rng.choice(("2", "2", "3", "1.5"))
        rule: Json = {
            "id": self.next_id("xpts"),
            "kind": "points_multiplier",
            "label": _label(f"{factor}倍积分", f"{factor}x points"),
            "priority": self.priority(),
            "factor": factor,
            "when": self.window(dates=0.5, weekdays=0.5, member=0),
        }
        if self.rng.random() < 0.8:  # a programme-wide double-points day is rarer than a category one
            rule["scope"] = {"categories": [c.id for c in self.pick_categories(3)]}
        if self.rng.random() < 0.5:
            rule["stacking"] = "best_of"
            rule["group"] = self.group("points", "best")
        self.add(rule)

    def no_points(self) -> None:
        rule: Json = {
            "id": self.next_id("nopts"),
            "kind": "no_points",
            "label": _label("活动商品不积分", "Promotion: no points"),
            "priority": self.priority(),
            "when": self.window(dates=0.8, member=0),
        }
        if self.rng.random() < 0.5:
            rule["scope"] = {"categories": [c.id for c in self.pick_categories(2)]}
        else:
            rule["scope"] = {"skus": [s.sku for s in self.catalogue.draw_unique(self.rng, 10)]}
        self.add(rule)


_MAKERS: tuple[tuple[Callable[[_Rules], None], int], ...] = (
    (_Rules.category_percent, 18),
    (_Rules.sku_percent, 10),
    (_Rules.sku_amount_off, 8),
    (_Rules.event_price, 7),
    (_Rules.member_day_category, 3),
    (_Rules.birthday, 3),
    (_Rules.coupon, 8),
    (_Rules.spend_off, 10),
    (_Rules.additive_group, 3),
    (_Rules.card_kind, 2),
    (_Rules.happy_hour, 2),
    (_Rules.basket_amount_off, 1),
    (_Rules.earn_category, 7),
    (_Rules.multiplier, 6),
    (_Rules.no_points, 3),
)


# --- TOML output ---------------------------------------------------------------


def _toml_key(key: str) -> str:
    bare = key and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in key)
    return key if bare else json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON's string escapes are a subset of TOML basic strings'.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(header: str, table: Json, out: list[str]) -> None:
    """Write ``table`` under ``header``; nested plain dicts become sub-tables after the scalars."""
    out.append(header)
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict) and key in ("when", "scope"):
            if value:
                subtables.append((key, value))
        else:
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    prefix = header.strip("[]")
    for key, value in subtables:
        _toml_table(f"[{prefix}.{key}]", value, out)


def make_ruleset(n_rules: int, seed: int = 1, catalogue: Catalogue | None = None) -> SyntheticRuleset:
    """A ruleset of exactly ``n_rules`` rules (at least 3) over ``catalogue``, as TOML text."""
    if n_rules < 3:
        raise ValueError("a synthetic ruleset has at least the 3 backbone rules")
    catalogue = catalogue or make_catalogue(seed)
    rng = _rng(seed, f"rules:{n_rules}")
    rules = _Rules(rng, catalogue, n_rules)
    rules.backbone()
    makers = [m for m, _ in _MAKERS]
    weights = [w for _, w in _MAKERS]
    while len(rules.rules) < n_rules:
        rng.choices(makers, weights=weights)[0](rules)
    chosen = rules.rules[:n_rules]
    coupons = sorted({r["when"]["coupon"] for r in chosen if "coupon" in r.get("when", {})})

    out = [
        f"# Synthetic ruleset: {n_rules} rules, seed {seed}.  Generated by",
        f"# `python -m bench.synthetic --rules {n_rules} --seed {seed}`; do not edit.",
        "",
    ]
    header: Json = {
        "id": f"synthetic-{n_rules}-s{seed}",
        "version": "1",
        "name": _label(f"合成规则 {n_rules} 条", f"Synthetic ruleset, {n_rules} rules"),
        "timezone": TIMEZONE,
        "card_kinds": list(CARD_KINDS),
    }
    _toml_table("[ruleset]", header, out)
    for tier in TIERS:
        out.append("")
        _toml_table("[[tiers]]", {"id": tier, "label": _label(*TIER_LABELS[tier])}, out)
    sections: list[tuple[str, Json]] = [
        (
            "[exclusions.discounts]",
            {"categories": list(NO_DISCOUNT_CATEGORIES), "flags": list(NO_DISCOUNT_FLAGS)},
        ),
        ("[exclusions.points]", {"categories": list(NO_POINTS_CATEGORIES), "flags": list(NO_POINTS_FLAGS)}),
        ("[points]", {"rounding": "floor", "earning_tenders": ["cash", "bank_card"]}),
        ("[tenders.points]", {"accepted": True, "points_per_unit": 100, "unit_value": "1.00", "max_share": "0.5"}),
        ("[tenders.rebate]", {"accepted": True}),
        ("[tenders.stored_value]", {"accepted": True, "no_member_benefits_with": ["prepaid_gift"]}),
    ]
    for header_line, table in sections:
        out.append("")
        _toml_table(header_line, table, out)
    for rule in chosen:
        out.append("")
        _toml_table("[[rules]]", rule, out)
    return SyntheticRuleset("\n".join(out) + "\n", len(chosen), tuple(coupons))


# --- members and baskets ---------------------------------------------------------


def make_member(rng: random.Random, index: int) -> Json:
    """A member's cached state as the lane holds it (the POS API's member document)."""
    tier = rng.choices(TIERS, weights=(45, 30, 17, 8))[0]
    if rng.random() < 0.2:  # a December birthday, so birthday rules fire for some baskets
        birthday = f"12-{rng.randint(1, 31):02d}"
    else:
        birthday = f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    member: Json = {
        "member_id": f"M{index:09d}",
        "tier": tier,
        "card_kind": rng.choices(CARD_KINDS, weights=(92, 3, 5))[0],
        "birthday": birthday,
        "points_balance": rng.randint(200, 50_000),
        "rebate_balance": _money(rng.randint(500, 50_000)),
    }
    if rng.random() < 0.03 and tier != TIERS[-1]:
        member["next_tier"] = TIERS[TIERS.index(tier) + 1]
        member["next_tier_from"] = (SALES_FROM + dt.timedelta(days=rng.randrange(SALES_DAYS))).isoformat()
    return member


def _qty(rng: random.Random, sku: Sku) -> str:
    if sku.weighed:
        grams = rng.randint(80, 2500)
        return f"{grams // 1000}.{grams % 1000:03d}"
    return str(rng.choices((1, 2, 3, 4, 6, 12), weights=(70, 15, 6, 4, 3, 2))[0])


def make_basket(
    rng: random.Random,
    catalogue: Catalogue,
    member_id: str | None,
    coupon_codes: Sequence[str] = (),
    lines: int = LINES_PER_BASKET,
    day: dt.date | None = None,
) -> Json:
    """A basket as the POS sends it to ``POST /v1/price``, rung up on ``day`` (default: a day in December)."""
    body: list[Json] = []
    for number, sku in enumerate(catalogue.draw(rng, lines), start=1):
        line: Json = {
            "line_id": str(number),
            "sku": sku.sku,
            "category": sku.category,
            "qty": _qty(rng, sku),
            "unit_price": _money(sku.price_fen),
        }
        flags: list[str] = []
        roll = rng.random()
        if roll < 0.10:  # marked down on the shelf: regular price above the selling price
            line["regular_price"] = line["unit_price"]
            line["unit_price"] = _money(max(1, sku.price_fen * rng.choice((70, 80, 85, 90)) // 100))
        elif roll < 0.13:
            flags.append("marked_down")
        elif roll < 0.15:
            flags.append("clearance")
        roll = rng.random()
        if roll < 0.04:
            flags.append("special_price")
        elif roll < 0.06:
            flags.append("group_buy")
        elif roll < 0.09:
            flags.append("no_points_event")
        if flags:
            line["flags"] = flags
        body.append(line)
    if day is None:
        day = SALES_FROM + dt.timedelta(days=rng.randrange(SALES_DAYS))
    minute = rng.randint(8 * 60, 22 * 60 - 1)
    at = dt.datetime(day.year, day.month, day.day, minute // 60, minute % 60, rng.randrange(60), tzinfo=UTC8)
    basket: Json = {"lines": body, "at": at.isoformat()}
    if member_id is not None:
        basket["member_id"] = member_id
    if coupon_codes and rng.random() < 0.25:
        basket["coupons"] = rng.sample(list(coupon_codes), min(len(coupon_codes), rng.randint(1, 2)))
        if rng.random() < 0.1:
            basket["coupons"].append("EXPIRED-0001")
    tenders: list[Json] = []
    roll = rng.random()
    if member_id is not None and roll < 0.10:
        tenders.append({"kind": "rebate", "amount": "1.00"})
    elif member_id is not None and roll < 0.18:
        tenders.append({"kind": "points", "points": 100})
    elif roll < 0.20:
        tenders.append({"kind": "stored_value", "amount": "2.00", "subkind": "prepaid_gift"})
    if tenders:
        basket["tenders"] = tenders
    return basket


def make_requests(
    count: int,
    seed: int = 1,
    catalogue: Catalogue | None = None,
    coupon_codes: Sequence[str] = (),
    lines: int = LINES_PER_BASKET,
    day: dt.date | None = None,
) -> list[tuple[Json, Json | None]]:
    """``count`` (basket, member or None) pairs; about a quarter of shoppers are guests.

    With ``day``, every basket is rung up that day (08:00-22:00) and the pairs
    come in time order, like one store's trading day replayed at head office.
    """
    catalogue = catalogue or make_catalogue(seed)
    rng = _rng(seed, f"baskets:{lines}:{day}")
    out: list[tuple[Json, Json | None]] = []
    for index in range(count):
        member = make_member(rng, index) if rng.random() < 0.75 else None
        basket = make_basket(rng, catalogue, None if member is None else member["member_id"], coupon_codes, lines, day)
        out.append((basket, member))
    if day is not None:
        out.sort(key=lambda pair: pair[0]["at"])  # same day and offset: the ISO text sorts by time
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=200, help="number of rules (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--skus", type=int, default=5000, help="catalogue size (default 5000)")
    parser.add_argument("--lines", type=int, default=LINES_PER_BASKET, help="lines per basket (default 30)")
    parser.add_argument(
        "--emit", choices=("ruleset", "basket", "member"), default="ruleset", help="what to print (default ruleset)"
    )
    args = parser.parse_args(argv)
    if args.rules < 3:
        parser.error("--rules must be at least 3")
    catalogue = make_catalogue(args.seed, args.skus)
    ruleset = make_ruleset(args.rules, args.seed, catalogue)
    if args.emit == "ruleset":
        sys.stdout.write(ruleset.text)
        return 0
    # The first shopper with a member card, so that --emit basket and --emit member go together.
    requests = make_requests(8, args.seed, catalogue, ruleset.coupon_codes, args.lines)
    basket, member = next((b, m) for b, m in requests if m is not None)
    document = basket if args.emit == "basket" else member
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
