"""Hypothesis strategies: valid random rulesets, baskets, members and moments.

Rulesets are drawn as plain documents (what ``tomllib`` would return), written
out as TOML text by a small emitter and then parsed by the real loader, so
every property also exercises the file format.  Every rule kind, stacking
mode, group, scope, exclusion, when-condition and tier map can appear; the
generator respects the format's cross-rule constraints (unique ids, declared
tiers and card kinds, one stage and one stacking per group) so that every
document it draws must load.

Three names are always excluded from both discounts and points
(``EXCLUDED_FLAG``, ``EXCLUDED_SKU``, ``EXCLUDED_CATEGORY``); ordinary basket
lines never use the SKU or the category, so a property can add a line that is
excluded by construction without changing what the other lines are.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

from agent.basket import Basket, Member, parse_basket, parse_member
from agent.ruleset import Ruleset, parse_ruleset

SKUS = ("6901234567892", "sku-a", "sku-b", "sku-c", "sku-d", "sku-e")
CATEGORIES = ("womenswear", "fresh", "cosmetics", "dining", "tobacco")
FLAGS = ("special_price", "group_buy", "marked_down", "promo", "clearance")
EXCLUDED_FLAG = "no_benefit"
EXCLUDED_SKU = "sku-excluded"
EXCLUDED_CATEGORY = "excluded-goods"
TIER_POOL = ("normal", "silver", "gold", "diamond")
CARD_KIND_POOL = ("standard", "family", "employee", "group")
COUPONS = ("XMAS50", "C10", "VIP5")
RULESET_ZONES = ("Asia/Shanghai", "UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham")
SV_SUBKINDS = ("gift", "prepaid", "corporate")
TENDER_KINDS = ("cash", "bank_card", "points", "rebate", "stored_value", "coupon")

LINE_KINDS = ("percent", "amount_off", "event_price")
BASKET_KINDS = ("spend_off", "amount_off")
POINTS_KINDS = ("earn", "points_multiplier", "no_points")
STAGE_KINDS = {"line": LINE_KINDS, "basket": BASKET_KINDS, "points": POINTS_KINDS}
ALL_STAGES = "line basket points"

# Windows are drawn around the same weeks the sale times are drawn from, so
# that date conditions sometimes hold and sometimes do not.
FIRST_DAY = dt.date(2026, 10, 25)
LAST_DAY = dt.date(2027, 1, 6)


# --- TOML -----------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    if key and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in key):
        return key
    return _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: dict[str, Any]) -> str:
    """A TOML text for ``doc``: a table per top-level key, an array of tables per list of tables."""
    parts: list[str] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:
                parts.append(f"[[{_toml_key(key)}]]")
                parts.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items())
                parts.append("")
        elif isinstance(value, dict):
            parts.append(f"[{_toml_key(key)}]")
            parts.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
            parts.append("")
        else:
            parts.insert(0, f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(parts) + "\n"


# --- decimal texts ----------------------------------------------------------


def money_text(fen: int, *, short: bool = False) -> str:
    """Fen as a wire money string; ``short`` drops zero decimals ("12", "12.5")."""
    whole, frac = divmod(fen, 100)
    if short and frac == 0:
        return str(whole)
    if short and frac % 10 == 0:
        return f"{whole}.{frac // 10}"
    return f"{whole}.{frac:02d}"


def qty_text(milli: int) -> str:
    whole, frac = divmod(milli, 1000)
    return str(whole) if frac == 0 else f"{whole}.{frac:03d}".rstrip("0")


def moneys(min_fen: int, max_fen: int) -> st.SearchStrategy[str]:
    return st.builds(money_text, st.integers(min_fen, max_fen), short=st.booleans())


@st.composite
def rate_texts(draw: st.DrawFn, max_e4: int = 10_000) -> str:
    """A rate string with 0-4 decimals, at most ``max_e4`` ten-thousandths."""
    places = draw(_PLACES)
    step = 10 ** (4 - places)
    e4 = draw(st.integers(0, max_e4 // step)) * step
    whole, frac = divmod(e4, 10_000)
    return str(whole) if places == 0 else f"{whole}.{frac // step:0{places}d}"


_PLACES = st.sampled_from([0, 1, 2, 4])
# Strategies are built once here: building them inside every draw costs more than the engine.
DISCOUNT_RATES = st.sampled_from(["0.95", "0.9", "0.88", "0.85", "0.5", "0", "1", "0.9999"]) | rate_texts()
EARN_RATES = st.sampled_from(["1", "2", "0.5", "0"]) | rate_texts(max_e4=50_000)
FACTORS = st.sampled_from(["1", "1.5", "2", "3"]) | rate_texts(max_e4=40_000).filter(lambda t: Decimal(t) >= 1)
_LABEL_TEXT = st.text(
    # Quotes, backslashes, control characters and CJK all travel through TOML and JSON.
    alphabet=st.sampled_from('会员折扣积分日 AbZ9"\\\n\t-%ü') | st.characters(codec="utf-8"),
    min_size=1,
    max_size=12,
)
LABELS = st.fixed_dictionaries({"zh-CN": _LABEL_TEXT, "en": _LABEL_TEXT})
_BOOL = st.booleans()
_RARELY = st.sampled_from((False,) * 9 + (True,))
_PRIORITY = st.none() | st.sampled_from([10, 100, 100, 200]) | st.integers(0, 1_000_000)
_AMOUNT = moneys(1, 50_000)
_MAX_OFF = moneys(0, 100_000)
_EVENT_PRICE = moneys(0, 50_000)
_SMALL_INDEX = st.integers(1, 2)
_GROUP_INDEX = st.sampled_from((1, 1, 1, 2))  # mostly one group per stage and stacking: members meet
_DAY = st.dates(FIRST_DAY, LAST_DAY)
_SPAN = st.integers(0, 20)
_MINUTE = st.integers(0, 24 * 60 - 1)
_END_MINUTE = st.integers(0, 24 * 60)
_COND_COUNT = st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3])
_SCOPE_COUNT = st.sampled_from([0, 0, 0, 1, 1, 2, 3])
_WHEN_KEYS = ("member", "tiers", "tiers", "card_kinds", "coupon", "days_of_month", "weekdays", "months",
              "dates", "times", "birthday")  # fmt: skip
_SCOPE_KEYS = ("categories", "skus", "flags", "exclude_categories", "exclude_skus", "exclude_flags",
               "marked_down", "skip_discounted")  # fmt: skip
_SCOPE_POOLS = {"categories": CATEGORIES, "skus": SKUS, "flags": FLAGS, "exclude_categories": CATEGORIES,
                "exclude_skus": SKUS, "exclude_flags": FLAGS}  # fmt: skip
_WHEN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "member": st.sampled_from((True, True, False)),
    "coupon": st.sampled_from(COUPONS),
    "days_of_month": st.lists(
        st.sampled_from([1, 10, 15, 28, 29, 30, 31]) | st.integers(1, 31), min_size=1, max_size=3
    ),
    "weekdays": st.lists(st.integers(1, 7), min_size=1, max_size=3),
    "months": st.lists(st.sampled_from([10, 11, 12, 1]) | st.integers(1, 12), min_size=1, max_size=2),
    "birthday": st.sampled_from(["day", "month"]),
}


@cache
def _sublist(pool: tuple[str, ...], min_size: int = 1) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(pool), min_size=min_size, max_size=min(3, len(pool)), unique=True)


@cache
def _choose(pool: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(pool)


@cache
def _tier_rates(tiers: tuple[str, ...], values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(st.sampled_from(tiers), values, min_size=1, max_size=len(tiers))


def _keys(draw: st.DrawFn, count: st.SearchStrategy[int], pool: tuple[str, ...]) -> list[str]:
    return sorted(set(draw(st.lists(_choose(pool), min_size=draw(count), max_size=3))), key=pool.index)


def draw_date_range(draw: st.DrawFn) -> dict[str, dt.date]:
    start = draw(_DAY)
    return {"from": start, "to": min(start + dt.timedelta(days=draw(_SPAN)), LAST_DAY)}


def draw_time_range(draw: st.DrawFn) -> dict[str, str]:
    start = draw(_MINUTE)
    end = draw(_END_MINUTE)
    if end == start or (start, end) == (0, 24 * 60):
        end = (start + 90) % (24 * 60)
    return {"from": f"{start // 60:02d}:{start % 60:02d}", "to": f"{end // 60:02d}:{end % 60:02d}"}


def draw_when(draw: st.DrawFn, tiers: tuple[str, ...], card_kinds: tuple[str, ...]) -> dict[str, Any]:
    """Conditions: usually none or one, so that rules often take part."""
    when: dict[str, Any] = {}
    for key in _keys(draw, _COND_COUNT, _WHEN_KEYS):
        if key == "tiers":
            when[key] = draw(_sublist(tiers))
        elif key == "card_kinds":
            when[key] = draw(_sublist(card_kinds))
        elif key == "dates":
            when[key] = [draw_date_range(draw) for _ in range(draw(_SMALL_INDEX))]
        elif key == "times":
            when[key] = [draw_time_range(draw) for _ in range(draw(_SMALL_INDEX))]
        else:
            when[key] = draw(_WHEN_VALUES[key])
    return when


def draw_scope(draw: st.DrawFn, *, need_target: bool) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    for key in _keys(draw, _SCOPE_COUNT, _SCOPE_KEYS):
        if key == "marked_down":
            scope[key] = draw(_choose(("any", "only", "exclude")))
        elif key == "skip_discounted":
            scope[key] = draw(_BOOL)
        else:
            scope[key] = draw(_sublist(_SCOPE_POOLS[key]))
    if need_target and not (scope.get("categories") or scope.get("skus")):
        key = draw(_choose(("categories", "skus")))
        scope[key] = draw(_sublist(_SCOPE_POOLS[key]))
    return scope


def draw_rule(
    draw: st.DrawFn,
    rule_id: str,
    tiers: tuple[str, ...],
    card_kinds: tuple[str, ...],
    kinds: tuple[str, ...],
    *,
    basket_stage: bool = True,
) -> dict[str, Any]:
    """One valid ``[[rules]]`` table of a kind drawn from ``kinds``."""
    kind = draw(_choose(kinds))
    rule: dict[str, Any] = {"id": rule_id, "kind": kind, "label": draw(LABELS)}
    priority = draw(_PRIORITY)
    if priority is not None:
        rule["priority"] = priority
    per = None
    if kind == "percent":
        if draw(_BOOL):
            rule["rate"] = draw(DISCOUNT_RATES)
        else:
            rule["rates"] = draw(_tier_rates(tiers, DISCOUNT_RATES))
        choice = draw(_choose(("none", "none", "rate", "rates")))
        if choice == "rate":
            rule["marked_down_rate"] = draw(DISCOUNT_RATES)
        elif choice == "rates":
            rule["marked_down_rates"] = draw(_tier_rates(tiers, DISCOUNT_RATES))
    elif kind == "amount_off":
        per = draw(_choose(("unit", "basket") if basket_stage else ("unit",)))
        rule["amount"] = draw(_AMOUNT)
        rule["per"] = per
    elif kind == "spend_off":
        threshold = draw(st.integers(1, 80_000))
        rule["threshold"] = money_text(threshold)
        rule["off"] = money_text(draw(st.integers(1, threshold * 2)))
        if draw(_BOOL):
            rule["repeat"] = True
        if draw(_BOOL):
            rule["max_off"] = draw(_MAX_OFF)
    elif kind == "event_price":
        rule["price"] = draw(_EVENT_PRICE)
    elif kind == "earn":
        if draw(_BOOL):
            rule["rate"] = draw(EARN_RATES)
        else:
            rule["rates"] = draw(_tier_rates(tiers, EARN_RATES))
    elif kind == "points_multiplier":
        rule["factor"] = draw(FACTORS)

    stage = "points" if kind in POINTS_KINDS else ("basket" if kind == "spend_off" or per == "basket" else "line")
    if stage == "points":
        allowed: tuple[str | None, ...] = (None, "best_of")
    elif kind == "percent":
        allowed = (None, "multiplicative", "additive", "best_of", "exclusive")
    else:
        allowed = (None, "multiplicative", "best_of", "exclusive")
    stacking = draw(_choose(allowed))
    if stacking is not None:
        rule["stacking"] = stacking
    if draw(_BOOL):
        effective = stacking or ("best_of" if stage == "points" else "multiplicative")
        # The group's name carries its stage and stacking, so rules that share it always agree.
        rule["group"] = f"g-{stage}-{effective}-{draw(_GROUP_INDEX)}"

    when = draw_when(draw, tiers, card_kinds)
    if kind == "no_points" and not when:
        when = {"dates": [draw_date_range(draw)]}  # an unconditional no_points would silence every points property
    if when:
        rule["when"] = when
    scope = draw_scope(draw, need_target=kind == "event_price")
    if scope:
        rule["scope"] = scope
    return rule


@dataclass(frozen=True)
class GeneratedRuleset:
    """A drawn ruleset: the document, its TOML text, and the compiled result of loading that text."""

    doc: dict[str, Any]
    text: str = field(repr=False)
    ruleset: Ruleset = field(repr=False)

    @classmethod
    def of(cls, doc: dict[str, Any]) -> GeneratedRuleset:
        text = to_toml(doc)
        return cls(doc, text, parse_ruleset(text, source="generated.toml"))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints falsifying examples with this: the document says it all.
        printer.text("GeneratedRuleset.of(")
        printer.pretty(self.doc)
        printer.text(")")

    @property
    def tiers(self) -> list[str]:
        return [t["id"] for t in self.doc["tiers"]]

    @property
    def card_kinds(self) -> list[str]:
        return list(self.doc["ruleset"].get("card_kinds", ["standard"]))


def _exclusion(extra_flags: list[str], extra_categories: list[str]) -> dict[str, list[str]]:
    return {
        "categories": [EXCLUDED_CATEGORY, *extra_categories],
        "skus": [EXCLUDED_SKU],
        "flags": [EXCLUDED_FLAG, *extra_flags],
    }


_EXTRA_EXCLUDED_FLAGS = st.lists(st.sampled_from(["special_price", "group_buy"]), max_size=1)
_EXTRA_EXCLUDED_CATEGORIES = st.lists(st.just("tobacco"), max_size=1)
_EXTRA_CARD_KINDS = st.lists(st.sampled_from(CARD_KIND_POOL[1:]), max_size=3, unique=True)
_EARNING_TENDERS = st.lists(st.sampled_from(TENDER_KINDS), max_size=4, unique=True)
_NO_BENEFITS_WITH = st.lists(st.sampled_from(SV_SUBKINDS), max_size=2, unique=True)
_ZONE = st.none() | st.sampled_from(RULESET_ZONES)
_UNIT_VALUE = moneys(1, 500)
_SHARE = rate_texts(max_e4=10_000)


@st.composite
def ruleset_docs(draw: st.DrawFn, *, max_rules: int = 12, stages: str = ALL_STAGES) -> dict[str, Any]:
    """A valid ruleset document of up to ``max_rules`` rules of the given stages ("line basket points")."""
    tiers = tuple(draw(_sublist(TIER_POOL)))
    card_kinds = ("standard", *draw(_EXTRA_CARD_KINDS))
    header: dict[str, Any] = {
        "id": draw(_choose(("888-mall", "xx-mall", "prop-test"))),
        "version": draw(_choose(("1", "2026.11.1", "v2+b"))),
        "name": draw(LABELS),
    }
    zone = draw(_ZONE)
    if zone is not None:
        header["timezone"] = zone
    if card_kinds != ("standard",) or draw(_BOOL):
        header["card_kinds"] = list(card_kinds)
    doc: dict[str, Any] = {
        "ruleset": header,
        "tiers": [{"id": tier, "label": draw(LABELS)} for tier in tiers],
        "exclusions": {
            "discounts": _exclusion(draw(_EXTRA_EXCLUDED_FLAGS), draw(_EXTRA_EXCLUDED_CATEGORIES)),
            "points": _exclusion(draw(_EXTRA_EXCLUDED_FLAGS), draw(_EXTRA_EXCLUDED_CATEGORIES)),
        },
        "points": {
            "rounding": draw(_choose(("floor", "half_up", "ceil"))),
            "earning_tenders": draw(_EARNING_TENDERS),
        },
        "tenders": {
            "points": {
                "accepted": draw(_BOOL),
                "points_per_unit": draw(_choose((1, 10, 100, 250))),
                "unit_value": draw(_UNIT_VALUE),
                "min_points": draw(_choose((0, 0, 100, 1000))),
                "max_share": draw(_SHARE),
            },
            "rebate": {"accepted": draw(_BOOL)},
            "stored_value": {
                "accepted": draw(_BOOL),
                "no_member_benefits_with": draw(_NO_BENEFITS_WITH),
                "on_conflict": draw(_choose(("price_as_non_member", "reject"))),
            },
        },
    }
    kinds = tuple(kind for stage, kinds in STAGE_KINDS.items() if stage in stages for kind in kinds)
    basket_stage = "basket" in stages
    rules = []
    for index in range(draw(st.integers(0, max_rules))):
        # A random letter before the unique index makes the (priority, id) order differ from file order.
        rule_id = f"{draw(_choose(tuple('abcz')))}{index}"
        rules.append(draw_rule(draw, rule_id, tiers, card_kinds, kinds, basket_stage=basket_stage))
    if "points" in stages and draw(_BOOL):
        # Real programmes have a base earn rule for every tier; without one most points rules do nothing.
        rules.append(
            {
                "id": "earn-base",
                "kind": "earn",
                "label": {"zh-CN": "消费积分", "en": "Points"},
                "rates": {tier: draw(EARN_RATES) for tier in tiers},
            }
        )
    if rules:
        doc["rules"] = rules
    return doc


@st.composite
def rulesets(draw: st.DrawFn, *, max_rules: int = 12, stages: str = ALL_STAGES) -> GeneratedRuleset:
    """A valid ruleset, written as TOML and loaded by ``parse_ruleset``."""
    return GeneratedRuleset.of(draw(ruleset_docs(max_rules=max_rules, stages=stages)))


# --- baskets, members, moments ------------------------------------------------

QUANTITIES = st.one_of(
    # Units ("3") or weighed goods with up to three decimals ("0.356").
    st.integers(1, 12).map(str),
    st.integers(1, 50_000).map(qty_text),
    st.sampled_from(["0.001", "1.000", "2.50", "999"]),
)
_UNIT_FEN = st.integers(1, 9_999_999) | st.sampled_from([1, 99, 100, 9_999_999]) | st.integers(1, 20_000)
_MARKUP = st.integers(1, 10_000)
_LINE_FLAGS = st.lists(st.sampled_from(FLAGS), max_size=3, unique=True)
_LINE_IDS = st.text("0123456789ABCxyz-", min_size=1, max_size=6)
_BASKET_COUPONS = st.lists(st.sampled_from((*COUPONS, "BOGUS1")), max_size=3, unique=True)


def draw_line(draw: st.DrawFn, line_id: str, *, sku: str | None = None, category: str | None = None) -> dict[str, Any]:
    """One wire basket line: 0.01-99999.99 a unit, marked down or not, with flags."""
    unit = draw(_UNIT_FEN)
    line: dict[str, Any] = {
        "line_id": line_id,
        "sku": sku or draw(_choose(SKUS)),
        "category": category or draw(_choose(CATEGORIES)),
        "qty": draw(QUANTITIES),
        "unit_price": money_text(unit, short=draw(_BOOL)),
    }
    regular = draw(_choose(("none", "none", "above", "below", "equal")))
    if regular == "above":
        line["regular_price"] = money_text(unit + draw(_MARKUP))
    elif regular == "below":
        line["regular_price"] = money_text(draw(st.integers(0, unit - 1)))
    elif regular == "equal":
        line["regular_price"] = money_text(unit)
    flags = list(draw(_LINE_FLAGS))
    if draw(_RARELY):
        flags.append(EXCLUDED_FLAG)
    if flags or draw(_BOOL):
        line["flags"] = flags
    return line


@st.composite
def basket_docs(draw: st.DrawFn, *, min_lines: int = 1, max_lines: int = 40) -> dict[str, Any]:
    """A wire basket (the body of ``POST /v1/price``) without tenders or time."""
    count = draw(st.integers(min_lines, max_lines))
    if draw(_BOOL):
        ids = [f"L{i}" for i in range(1, count + 1)]
    else:
        ids = draw(st.lists(_LINE_IDS, min_size=count, max_size=count, unique=True))
    doc: dict[str, Any] = {"lines": [draw_line(draw, line_id) for line_id in ids]}
    coupons = draw(_BASKET_COUPONS)
    if coupons:
        doc["coupons"] = coupons
    return doc


BIRTHDAYS = st.sampled_from(["02-29", "12-10", "11-30"]) | st.tuples(
    st.sampled_from([10, 11, 12, 1, 2]) | st.integers(1, 12), st.integers(1, 28)
).map(lambda md: f"{md[0]:02d}-{md[1]:02d}")
_BALANCE = st.integers(0, 100_000)
_REBATE = moneys(0, 50_000)


def draw_member(draw: st.DrawFn, tiers: tuple[str, ...], card_kinds: tuple[str, ...]) -> dict[str, Any]:
    """A member state document; now and then with a tier the ruleset does not know."""
    member: dict[str, Any] = {
        "member_id": draw(_choose(("M000123", "M9"))),
        "tier": draw(_choose((*tiers, *tiers, "retired-tier"))),
        "points_balance": draw(_BALANCE),
        "rebate_balance": draw(_REBATE),
    }
    if draw(_BOOL):
        member["card_kind"] = draw(_choose(card_kinds))
    if draw(_BOOL):
        member["birthday"] = draw(BIRTHDAYS)
    if draw(_choose((False, False, False, True))):
        member["next_tier"] = draw(_choose(tiers))
        member["next_tier_from"] = draw(_DAY).isoformat()
    return member


SALE_ZONES = (
    dt.timezone(dt.timedelta(hours=8)),
    dt.UTC,
    dt.timezone(dt.timedelta(hours=-5)),
    dt.timezone(dt.timedelta(hours=12, minutes=45)),
    ZoneInfo("Asia/Shanghai"),
)
MOMENTS = st.datetimes(
    # Aware sale times in the weeks the windows are drawn from.
    min_value=dt.datetime.combine(FIRST_DAY, dt.time()),
    max_value=dt.datetime.combine(LAST_DAY, dt.time(23, 59)),
    timezones=st.sampled_from(SALE_ZONES),
    allow_imaginary=False,
)


@dataclass(frozen=True)
class Case:
    """One pricing request: a ruleset, basket and member documents (wire form) and a moment."""

    rules: GeneratedRuleset
    basket_doc: dict[str, Any]
    member_doc: dict[str, Any] | None
    at: dt.datetime

    @property
    def ruleset(self) -> Ruleset:
        return self.rules.ruleset

    def basket(self, doc: dict[str, Any] | None = None) -> Basket:
        """The basket parsed from (a JSON round trip of) its wire document."""
        return parse_basket(json.loads(json.dumps(self.basket_doc if doc is None else doc)))

    def member(self) -> Member | None:
        return None if self.member_doc is None else parse_member(json.loads(json.dumps(self.member_doc)))


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    max_rules: int = 12,
    max_lines: int = 40,
    stages: str = ALL_STAGES,
    member: bool | None = None,
) -> Case:
    """A full pricing request; ``member`` True/False forces a member/guest, None draws either."""
    generated = draw(rulesets(max_rules=max_rules, stages=stages))
    return draw_request(draw, generated, max_lines=max_lines, member=member)


def draw_request(draw: st.DrawFn, generated: GeneratedRuleset, *, max_lines: int, member: bool | None) -> Case:
    """A basket, a member or guest, and a moment, for an already drawn ruleset."""
    basket = draw(basket_docs(max_lines=max_lines))
    want_member = draw(_BOOL) if member is None else member
    member_doc = draw_member(draw, tuple(generated.tiers), tuple(generated.card_kinds)) if want_member else None
    return Case(generated, basket, member_doc, draw(MOMENTS))


@st.composite
def sessions(draw: st.DrawFn, *, max_requests: int = 6, max_lines: int = 12) -> list[Case]:
    """Several requests against one ruleset, as a till prices them through a day (or a week)."""
    generated = draw(rulesets())
    count = draw(st.integers(2, max_requests))
    return [draw_request(draw, generated, max_lines=max_lines, member=None) for _ in range(count)]


_TENDER_POINTS = st.sampled_from([100, 250, 1000, 5000]) | st.integers(1, 20_000)
_TENDER_AMOUNT = moneys(1, 5_000) | moneys(1, 200_000)
_BAD_TENDER_VALUE = st.sampled_from([None, "0.00", "1.234", "-1.00", 1.5, 100, -3, "", "cheque", [], {}])
_TENDER_FIELDS = ("kind", "amount", "points", "subkind", "colour")


@st.composite
def tender_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Intended tenders, mostly well formed; now and then one field is garbage or misplaced."""
    kind = draw(_choose(TENDER_KINDS))
    tender: dict[str, Any] = {"kind": kind}
    if kind == "points":
        tender["points"] = draw(_TENDER_POINTS)
    else:
        tender["amount"] = draw(_TENDER_AMOUNT)
    if draw(_BOOL):
        tender["subkind"] = draw(_choose(SV_SUBKINDS))
    if draw(_RARELY):
        tender[draw(_choose(_TENDER_FIELDS))] = draw(_BAD_TENDER_VALUE)
    return tender
