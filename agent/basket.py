"""The engine's inputs: basket lines, the member's state and tenders.

Two forms live here.  The frozen dataclasses (``Line``, ``Member``, ``Tender``,
``Basket``) are what the pure engine computes on: integer fen and thousandths,
nothing to parse.  The pydantic models (``BasketIn``, ``MemberIn``) are the
wire contract, the body of the POS API's ``POST /v1/price`` and the files
``lane-agent price`` reads; they validate everything at once and convert.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.errors import InputError, Issue
from agent.money import parse_money, parse_qty

TenderKindName = Literal["cash", "bank_card", "points", "rebate", "stored_value", "coupon"]

MARKED_DOWN_FLAG = "marked_down"
# Error type of the model-level checks that parse_basket/parse_member repeat on the raw
# document with an exact field path (the models keep them for callers that validate directly).
DOCUMENT_CHECK = "document_check"


@dataclass(frozen=True, slots=True)
class Line:
    """One basket line; money in fen, quantity in thousandths."""

    line_id: str
    sku: str
    category: str
    qty: int
    unit_fen: int
    regular_fen: int | None = None
    flags: frozenset[str] = frozenset()

    @property
    def marked_down(self) -> bool:
        """Already discounted by the shop: below its regular price, or flagged so."""
        return (self.regular_fen is not None and self.regular_fen > self.unit_fen) or MARKED_DOWN_FLAG in self.flags


@dataclass(frozen=True, slots=True)
class Member:
    """What the lane knows about an identified member (no personal data)."""

    member_id: str
    tier: str
    card_kind: str = "standard"
    birthday: tuple[int, int] | None = None  # (month, day)
    points_balance: int = 0
    rebate_fen: int = 0
    next_tier: str | None = None
    next_tier_from: dt.date | None = None

    def tier_on(self, day: dt.date) -> str:
        """The tier in force on ``day``: upgrades take effect from their date (the next day)."""
        if self.next_tier is not None and self.next_tier_from is not None and day >= self.next_tier_from:
            return self.next_tier
        return self.tier


@dataclass(frozen=True, slots=True)
class Tender:
    """A payment the customer intends; points tenders carry a point count."""

    kind: str
    amount_fen: int | None = None
    points: int | None = None
    subkind: str | None = None


@dataclass(frozen=True, slots=True)
class Basket:
    """A basket to price: lines, coupon codes presented, intended tenders."""

    lines: tuple[Line, ...]
    coupons: tuple[str, ...] = ()
    tenders: tuple[Tender, ...] = ()
    member_id: str | None = None
    at: dt.datetime | None = None


# --- wire models -----------------------------------------------------------

Money = Annotated[
    int,
    BeforeValidator(parse_money),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]{1,14}(\.[0-9]{1,2})?$", "examples": ["12.34"]}),
]
Quantity = Annotated[
    int,
    BeforeValidator(parse_qty),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]{1,7}(\.[0-9]{1,3})?$", "examples": ["1", "0.356"]}),
]
Code = Annotated[str, Field(min_length=1, max_length=64)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class LineIn(_Wire):
    """One basket line as the POS sends it."""

    line_id: Code
    sku: Code
    category: Code
    qty: Quantity = Field(description="decimal string; up to 3 decimals for weighed goods")
    unit_price: Money = Field(description="the selling price per unit now, decimal string")
    regular_price: Money | None = Field(default=None, description="the regular price when marked down")
    flags: list[Code] = Field(default_factory=list, max_length=16, description="special_price, group_buy, ...")

    def to_line(self) -> Line:
        return Line(
            line_id=self.line_id,
            sku=self.sku,
            category=self.category,
            qty=self.qty,
            unit_fen=self.unit_price,
            regular_fen=self.regular_price,
            flags=frozenset(self.flags),
        )


class TenderIn(_Wire):
    """An intended tender: money tenders give ``amount``, points tenders ``points``."""

    kind: TenderKindName
    amount: Money | None = None
    points: int | None = Field(default=None, ge=1, le=10**9)
    subkind: Code | None = Field(default=None, description="stored-value card type, coupon series, ...")

    @model_validator(mode="after")
    def _amount_or_points(self) -> TenderIn:
        if self.kind == "points":
            if self.points is None:
                raise ValueError("a points tender gives 'points' (the number of points to spend)")
        elif self.amount is None:
            raise ValueError(f"a {self.kind} tender gives 'amount'")
        elif self.points is not None:
            raise ValueError("'points' applies only to a points tender")
        if self.amount is not None and self.amount <= 0:
            raise ValueError("'amount' must be greater than zero")
        return self

    def to_tender(self) -> Tender:
        return Tender(kind=self.kind, amount_fen=self.amount, points=self.points, subkind=self.subkind)


class BasketIn(_Wire):
    """The body of ``POST /v1/price`` (and of a basket file)."""

    lines: list[LineIn] = Field(min_length=1, max_length=1000)
    member_id: Code | None = None
    coupons: list[Code] = Field(default_factory=list, max_length=20)
    tenders: list[TenderIn] = Field(default_factory=list, max_length=20)
    at: dt.datetime | None = Field(default=None, description="ISO 8601 with offset; default: now")

    @field_validator("at")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("'at' needs a UTC offset, e.g. 2026-12-10T14:00:00+08:00")
        return value

    @field_validator("lines")
    @classmethod
    def _unique(cls, lines: list[LineIn]) -> list[LineIn]:
        # Also checked on the raw document by parse_basket, which names the offending line.
        if len({line.line_id for line in lines}) != len(lines):
            raise PydanticCustomError(DOCUMENT_CHECK, "line_id values must be unique")
        return lines

    def to_basket(self) -> Basket:
        return Basket(
            lines=tuple(line.to_line() for line in self.lines),
            coupons=tuple(dict.fromkeys(self.coupons)),
            tenders=tuple(t.to_tender() for t in self.tenders),
            member_id=self.member_id,
            at=self.at,
        )


def _parse_birthday(value: object) -> object:
    if value is None:
        return None
    digits = value[:2] + value[3:] if isinstance(value, str) else ""
    # isascii: int() would read other scripts' digits too ("٠٣").
    if not isinstance(value, str) or len(value) != 5 or value[2] != "-" or not (digits.isascii() and digits.isdigit()):
        raise ValueError("birthday is month-day, 'MM-DD'")
    try:
        # 2000 is a leap year, so 02-29 is accepted.
        day = dt.date(2000, int(value[:2]), int(value[3:]))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a calendar month-day") from exc
    return (day.month, day.day)


class MemberIn(_Wire):
    """A member's state as the lane caches it (and as a member file gives it)."""

    member_id: Code
    tier: Code
    card_kind: Code = "standard"
    birthday: Annotated[
        tuple[int, int] | None,
        BeforeValidator(_parse_birthday),
        WithJsonSchema({"type": "string", "pattern": r"^[0-9]{2}-[0-9]{2}$", "examples": ["03-14"]}),
    ] = None
    points_balance: int = Field(default=0, ge=0, le=10**12)
    rebate_balance: Money = 0
    next_tier: Code | None = None
    next_tier_from: dt.date | None = None

    @model_validator(mode="after")
    def _pair(self) -> MemberIn:
        # Also checked on the raw document by parse_member, which names the missing field.
        if (self.next_tier is None) != (self.next_tier_from is None):
            raise PydanticCustomError(DOCUMENT_CHECK, "give both 'next_tier' and 'next_tier_from', or neither")
        return self

    def to_member(self) -> Member:
        return Member(
            member_id=self.member_id,
            tier=self.tier,
            card_kind=self.card_kind,
            birthday=self.birthday,
            points_balance=self.points_balance,
            rebate_fen=self.rebate_balance,
            next_tier=self.next_tier,
            next_tier_from=self.next_tier_from,
        )


def field_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the field path the project reports: ``lines[3].qty``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def issues_from_validation(exc: ValidationError, source: str = "") -> list[Issue]:
    """Turn pydantic's errors into the project's issues, with readable field paths."""
    issues = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        issues.append(Issue(field=field_path(error["loc"]), code=str(error["type"]), message=message, source=source))
    return issues


def _basket_document_issues(data: Any, source: str) -> list[Issue]:
    """Whole-document checks on the raw basket, each naming the field to correct."""
    issues = []
    lines = data.get("lines") if isinstance(data, dict) else None
    if isinstance(lines, list):
        first: dict[str, int] = {}
        for index, line in enumerate(lines):
            line_id = line.get("line_id") if isinstance(line, dict) else None
            if not isinstance(line_id, str):
                continue
            if line_id in first:
                issues.append(
                    Issue(
                        f"lines[{index}].line_id",
                        "duplicate",
                        f"line_id {line_id!r} appears twice (first at lines[{first[line_id]}])",
                        source,
                    )
                )
            else:
                first[line_id] = index
    return issues


def _member_document_issues(data: Any, source: str) -> list[Issue]:
    if not isinstance(data, dict):
        return []
    has_tier, has_from = data.get("next_tier") is not None, data.get("next_tier_from") is not None
    if has_tier == has_from:
        return []
    missing = "next_tier_from" if has_tier else "next_tier"
    return [Issue(missing, "missing", "give both 'next_tier' and 'next_tier_from', or neither", source)]


def _validate(model: type[_Wire], data: Any, document_issues: list[Issue], source: str, what: str) -> Any:
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        found = issues_from_validation(exc, source)
        # The raw-document checks name the exact field; pydantic's twin of them is dropped.
        found = [issue for issue in found if issue.code != DOCUMENT_CHECK]
        raise InputError([*found, *document_issues], what=what) from exc
    if document_issues:
        raise InputError(document_issues, what=what)
    return parsed


def parse_basket(data: Any, source: str = "basket") -> Basket:
    """Validate a decoded basket JSON document; raises InputError listing every problem."""
    parsed: BasketIn = _validate(BasketIn, data, _basket_document_issues(data, source), source, "basket")
    return parsed.to_basket()


def parse_member(data: Any, source: str = "member") -> Member:
    """Validate a decoded member JSON document; raises InputError listing every problem."""
    parsed: MemberIn = _validate(MemberIn, data, _member_document_issues(data, source), source, "member")
    return parsed.to_member()
