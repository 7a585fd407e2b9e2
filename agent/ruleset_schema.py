"""The ruleset file format (TOML), as pydantic models.

These models are the format's single source of truth: they validate a parsed
TOML document, and ``docs/rules.md`` describes the same keys.  Every model
forbids unknown keys, so a typo is an error that names the key rather than a
rule that silently never fires.  Compilation into the engine's fast form lives
in ``agent.ruleset``.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.money import parse_money, parse_rate

RuleKind = Literal[
    "percent",
    "amount_off",
    "spend_off",
    "event_price",
    "earn",
    "points_multiplier",
    "no_points",
]
Stacking = Literal["multiplicative", "additive", "best_of", "exclusive"]
TenderKind = Literal["cash", "bank_card", "points", "rebate", "stored_value", "coupon"]

LINE_KINDS = frozenset({"percent", "amount_off", "event_price"})
POINTS_KINDS = frozenset({"earn", "points_multiplier", "no_points"})

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")

# Patterns are anchored: pydantic searches, it does not match the whole string.
Ident = Annotated[str, Field(pattern=f"^{_ID_RE.pattern}$", description="letters, digits, _ . : -")]
MoneyText = Annotated[str, Field(description='decimal string, "12.34"')]
RateText = Annotated[str, Field(description='decimal string, "0.95"')]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_money(value: str) -> str:
    parse_money(value)
    return value


def _check_rate(value: str) -> str:
    parse_rate(value)
    return value


class Label(_Strict):
    """A text the cashier reads, in both languages the tills support."""

    zh_cn: str = Field(alias="zh-CN", min_length=1, max_length=80)
    en: str = Field(min_length=1, max_length=80)


class Tier(_Strict):
    id: Ident
    label: Label


class Header(_Strict):
    id: Ident
    version: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")
    name: Label
    timezone: str = "Asia/Shanghai"
    currency: Literal["CNY"] = "CNY"
    card_kinds: list[Ident] = Field(default_factory=lambda: ["standard"], min_length=1)


class Exclusion(_Strict):
    categories: list[str] = Field(default_factory=list)
    skus: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)


class Exclusions(_Strict):
    discounts: Exclusion = Field(default_factory=Exclusion)
    points: Exclusion = Field(default_factory=Exclusion)


class PointsPolicy(_Strict):
    rounding: Literal["floor", "half_up", "ceil"] = "floor"
    earning_tenders: list[TenderKind] = Field(
        default_factory=lambda: list[TenderKind](["cash", "bank_card"]),
        description="tenders whose amount earns points; the unspecified rest counts as cash",
    )


class PointsTender(_Strict):
    accepted: bool = False
    points_per_unit: int = Field(default=100, ge=1, le=1_000_000)
    unit_value: MoneyText = "1.00"
    min_points: int = Field(default=0, ge=0)
    max_share: RateText = "1"

    _money = field_validator("unit_value")(_check_money)
    _rate = field_validator("max_share")(_check_rate)

    @field_validator("max_share")
    @classmethod
    def _share_at_most_one(cls, value: str) -> str:
        if parse_rate(value) > 10_000:
            raise ValueError("max_share is a fraction of the bill and must be at most 1")
        return value


class RebateTender(_Strict):
    accepted: bool = False


class StoredValueTender(_Strict):
    accepted: bool = True
    no_member_benefits_with: list[str] = Field(
        default_factory=list, description="stored-value card subkinds that exclude member benefits"
    )
    on_conflict: Literal["price_as_non_member", "reject"] = "price_as_non_member"
    conflict_tiers: list[Ident] = Field(
        default_factory=list, description="tiers the conflict applies to; empty means every tier"
    )


class Tenders(_Strict):
    points: PointsTender = Field(default_factory=PointsTender)
    rebate: RebateTender = Field(default_factory=RebateTender)
    stored_value: StoredValueTender = Field(default_factory=StoredValueTender)


class DateRange(_Strict):
    from_: dt.date = Field(alias="from")
    to: dt.date

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.to < self.from_:
            raise ValueError("'to' is before 'from'")
        return self


class TimeRange(_Strict):
    """Half-open [from, to) in local time; a range that passes midnight wraps."""

    from_: str = Field(alias="from", pattern=f"^{_TIME_RE.pattern}$")
    to: str = Field(pattern=f"^(?:{_TIME_RE.pattern}|24:00)$")

    @model_validator(mode="after")
    def _not_empty(self) -> TimeRange:
        if self.from_ == self.to:
            raise ValueError("empty time range: 'from' equals 'to'")
        return self


class When(_Strict):
    """Conditions; all given ones must hold, and any item of a list matches."""

    member: bool = False
    tiers: list[Ident] = Field(default_factory=list)
    card_kinds: list[Ident] = Field(default_factory=list)
    coupon: str | None = Field(default=None, min_length=1, max_length=64)
    days_of_month: list[Annotated[int, Field(ge=1, le=31)]] = Field(default_factory=list)
    weekdays: list[Annotated[int, Field(ge=1, le=7)]] = Field(default_factory=list)
    months: list[Annotated[int, Field(ge=1, le=12)]] = Field(default_factory=list)
    dates: list[DateRange] = Field(default_factory=list)
    times: list[TimeRange] = Field(default_factory=list)
    birthday: Literal["day", "month"] | None = None


class Scope(_Strict):
    """Which lines a rule touches; empty include lists mean every line."""

    categories: list[str] = Field(default_factory=list)
    skus: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)
    exclude_categories: list[str] = Field(default_factory=list)
    exclude_skus: list[str] = Field(default_factory=list)
    exclude_flags: list[str] = Field(default_factory=list)
    marked_down: Literal["any", "only", "exclude"] = "any"
    skip_discounted: bool = False


class RuleSpec(_Strict):
    id: Ident
    kind: RuleKind
    label: Label
    priority: int = Field(default=100, ge=0, le=1_000_000)
    stacking: Stacking | None = None
    group: Ident | None = None
    when: When = Field(default_factory=When)
    scope: Scope = Field(default_factory=Scope)
    # percent
    rate: RateText | None = None
    rates: dict[str, RateText] | None = None
    marked_down_rate: RateText | None = None
    marked_down_rates: dict[str, RateText] | None = None
    # amount_off / spend_off / event_price
    amount: MoneyText | None = None
    per: Literal["unit", "basket"] | None = None
    threshold: MoneyText | None = None
    off: MoneyText | None = None
    repeat: bool = False
    max_off: MoneyText | None = None
    price: MoneyText | None = None
    # points_multiplier
    factor: RateText | None = None

    _moneys = field_validator("amount", "threshold", "off", "max_off", "price")(
        lambda v: None if v is None else _check_money(v)
    )
    _rates = field_validator("rate", "marked_down_rate", "factor")(lambda v: None if v is None else _check_rate(v))

    @field_validator("rates", "marked_down_rates")
    @classmethod
    def _rate_maps(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            for text in value.values():
                _check_rate(text)
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> RuleSpec:  # noqa: C901, PLR0912 - one table of per-kind requirements
        problems: list[str] = []
        fields = {
            "percent": {"rate", "rates", "marked_down_rate", "marked_down_rates"},
            "amount_off": {"amount", "per"},
            "spend_off": {"threshold", "off", "repeat", "max_off"},
            "event_price": {"price"},
            "earn": {"rate", "rates"},
            "points_multiplier": {"factor"},
            "no_points": set(),
        }[self.kind]
        for name in (
            "rate", "rates", "marked_down_rate", "marked_down_rates", "amount", "per",
            "threshold", "off", "max_off", "price", "factor",
        ):  # fmt: skip
            if getattr(self, name) is not None and name not in fields:
                problems.append(f"'{name}' does not apply to kind '{self.kind}'")
        if self.repeat and self.kind != "spend_off":
            problems.append(f"'repeat' does not apply to kind '{self.kind}'")
        if self.kind in ("percent", "earn"):
            if (self.rate is None) == (self.rates is None):
                problems.append("give exactly one of 'rate' (everyone) or 'rates' (per tier)")
            if self.marked_down_rate is not None and self.marked_down_rates is not None:
                problems.append("give at most one of 'marked_down_rate' and 'marked_down_rates'")
        if self.kind == "percent":
            for text in [self.rate, self.marked_down_rate, *(self.rates or {}).values(),
                         *(self.marked_down_rates or {}).values()]:  # fmt: skip
                if text is not None and parse_rate(text) > 10_000:
                    problems.append(f"rate {text} is above 1: a percent rule pays the price times its rate")
        if self.kind == "amount_off":
            if self.amount is None or self.per is None:
                problems.append("kind 'amount_off' needs 'amount' and 'per' (unit or basket)")
            elif parse_money(self.amount) == 0:
                problems.append("'amount' must be greater than zero")
        if self.kind == "spend_off":
            if self.threshold is None or self.off is None:
                problems.append("kind 'spend_off' needs 'threshold' and 'off'")
            elif parse_money(self.threshold) <= 0 or parse_money(self.off) <= 0:
                problems.append("'threshold' and 'off' must be greater than zero")
        if self.kind == "event_price":
            if self.price is None:
                problems.append("kind 'event_price' needs 'price'")
            if not (self.scope.skus or self.scope.categories):
                problems.append("kind 'event_price' needs scope.skus or scope.categories")
        if self.kind == "points_multiplier":
            if self.factor is None:
                problems.append("kind 'points_multiplier' needs 'factor'")
            elif parse_rate(self.factor) < 10_000:
                problems.append("'factor' must be at least 1 (use no_points to remove points)")
        if self.kind in POINTS_KINDS and self.stacking not in (None, "best_of"):
            problems.append("points rules combine as documented; 'stacking' may only be best_of")
        if self.kind == "event_price" and self.stacking == "additive":
            problems.append("an event price cannot be additive; use best_of or exclusive")
        if self.kind == "amount_off" and self.stacking == "additive":
            problems.append("an amount_off rule cannot be additive; use best_of, multiplicative or exclusive")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def stage(self) -> Literal["line", "basket", "points"]:
        """Where in the pricing pipeline the rule acts."""
        if self.kind in POINTS_KINDS:
            return "points"
        if self.kind == "spend_off" or (self.kind == "amount_off" and self.per == "basket"):
            return "basket"
        return "line"


# --- [centre]: the programme head office runs (lanes read it and ignore it; docs/member-centre.md) ----

_MONTH_DAY_RE = re.compile(r"(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")


class CardValidity(_Strict):
    """How long a card is valid from the day it takes effect (the day after it is issued)."""

    # none: no end; years: ``years`` after it takes effect; half_year (xx mall, seed 004): issued
    # January-June -> 30 June of the next year, July-December -> 30 June of the year after that.
    kind: Literal["none", "years", "half_year"] = "none"
    years: int = Field(default=1, ge=1, le=10)


class Expiry(_Strict):
    """When earned points lapse; each earning is a lot, spent soonest-expiring first."""

    # none; rolling: a lot lapses ``months`` after the day it was earned; year_end: at the end of
    # the year it was earned in, plus ``years_after``; card_validity: when the member's card validity ends.
    policy: Literal["none", "rolling", "year_end", "card_validity"] = "none"
    months: int = Field(default=12, ge=1, le=120)
    years_after: int = Field(default=0, ge=0, le=10)


class SpendWindow(_Strict):
    """Spend over the last ``days`` days (the decision day included)."""

    days: int = Field(ge=2, le=366)
    spend: MoneyText

    _money = field_validator("spend")(_check_money)


class Qualify(_Strict):
    """One way to reach ``tier``: any criterion given is enough."""

    tier: Ident
    same_day_spend: MoneyText | None = None
    windows: list[SpendWindow] = Field(default_factory=list)
    year_points: int | None = Field(default=None, ge=1)
    year_spend: MoneyText | None = None
    year_visits: int | None = Field(default=None, ge=1)
    # True: only the monthly screening decides (888 mall screens at the start of each month).
    screening_only: bool = False
    # Registering (or upgrading at the desk) with the receipts of a qualifying day is allowed this
    # many days after it (xx mall: "三日内申办").
    apply_within_days: int = Field(default=0, ge=0, le=366)

    _moneys = field_validator("same_day_spend", "year_spend")(lambda v: None if v is None else _check_money(v))

    @model_validator(mode="after")
    def _some_criterion(self) -> Qualify:
        if not (self.same_day_spend or self.windows or self.year_points or self.year_spend or self.year_visits):
            raise ValueError(f"qualify for {self.tier!r}: give at least one criterion")
        return self


class Retention(_Strict):
    """At each anniversary of reaching ``tier``: any criterion met over that year keeps it, else ``else_tier``."""

    tier: Ident
    year_points: int | None = Field(default=None, ge=1)
    year_spend: MoneyText | None = None
    year_visits: int | None = Field(default=None, ge=1)
    else_tier: Ident

    _money = field_validator("year_spend")(lambda v: None if v is None else _check_money(v))


class Inactivity(_Strict):
    """Members of ``tiers`` (empty: every tier) with no purchase for ``days`` are downgraded or terminated."""

    days: int = Field(ge=1, le=3660)
    tiers: list[Ident] = Field(default_factory=list)
    action: Literal["downgrade", "terminate"]
    to_tier: Ident | None = None

    @model_validator(mode="after")
    def _target(self) -> Inactivity:
        if (self.action == "downgrade") != (self.to_tier is not None):
            raise ValueError("a downgrade names to_tier; a termination does not")
        return self


class Rebate(_Strict):
    """Rebate money: ``rate`` of each member's card spend since the previous settlement date, on each date."""

    rate: RateText
    dates: list[Annotated[str, Field(pattern=f"^{_MONTH_DAY_RE.pattern}$")]] = Field(min_length=1)
    tiers: list[Ident] = Field(default_factory=list)  # empty: every tier

    _rate = field_validator("rate")(_check_rate)


class Centre(_Strict):
    """What head office's member centre runs; lanes validate it with the rest of the file and ignore it."""

    card_validity: CardValidity = Field(default_factory=CardValidity)
    card_fee: MoneyText = "0.00"  # what a replacement card costs (seed 004: 10 yuan)
    # Joining: receipts meeting a [[centre.qualify]] rule of the tier joined, or this fee instead (xx mall: 10 yuan).
    join_fee: MoneyText | None = None
    claim_window_days: int = Field(default=0, ge=0, le=365)  # 0: a receipt is claimed the day of the sale
    expiry: Expiry = Field(default_factory=Expiry)
    qualify: list[Qualify] = Field(default_factory=list)
    screening_day: int = Field(default=1, ge=1, le=28)  # the monthly screening's day of the month
    tier_years: int = Field(default=1, ge=1, le=10)  # a tier is reviewed this often after it was reached
    retention: list[Retention] = Field(default_factory=list)
    inactivity: list[Inactivity] = Field(default_factory=list)
    rebate: Rebate | None = None

    _fee = field_validator("card_fee")(_check_money)
    _join_fee = field_validator("join_fee")(lambda v: None if v is None else _check_money(v))

    def tier_ids(self) -> set[str]:
        """Every tier this section names."""
        names = {q.tier for q in self.qualify}
        names |= {r.tier for r in self.retention} | {r.else_tier for r in self.retention}
        for rule in self.inactivity:
            names |= set(rule.tiers) | ({rule.to_tier} if rule.to_tier else set())
        if self.rebate is not None:
            names |= set(self.rebate.tiers)
        return names


class RulesetSpec(_Strict):
    """A whole ruleset file."""

    ruleset: Header
    tiers: list[Tier] = Field(min_length=1)
    exclusions: Exclusions = Field(default_factory=Exclusions)
    points: PointsPolicy = Field(default_factory=PointsPolicy)
    tenders: Tenders = Field(default_factory=Tenders)
    rules: list[RuleSpec] = Field(default_factory=list)
    centre: Centre = Field(default_factory=Centre)

    @model_validator(mode="after")
    def _centre_tiers(self) -> RulesetSpec:
        unknown = sorted(self.centre.tier_ids() - {tier.id for tier in self.tiers})
        if unknown:
            raise ValueError(f"[centre] names tiers that are not in [[tiers]]: {', '.join(unknown)}")
        return self
