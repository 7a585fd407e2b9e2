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


class RulesetSpec(_Strict):
    """A whole ruleset file."""

    ruleset: Header
    tiers: list[Tier] = Field(min_length=1)
    exclusions: Exclusions = Field(default_factory=Exclusions)
    points: PointsPolicy = Field(default_factory=PointsPolicy)
    tenders: Tenders = Field(default_factory=Tenders)
    rules: list[RuleSpec] = Field(default_factory=list)
