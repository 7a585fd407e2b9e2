"""Loading a ruleset file and compiling it into the engine's fast form.

``load_ruleset`` reads TOML, validates it against ``agent.ruleset_schema``,
runs the cross-rule checks (unique ids, declared tiers, consistent groups) and
reports every problem at once with file, key and reason.  The compiled
``Ruleset`` is immutable and holds indexes by SKU and category, so pricing a
line looks only at the rules that can touch it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from agent.basket import Line, issues_from_validation
from agent.errors import Issue, RulesetError
from agent.money import parse_money, parse_rate
from agent.ruleset_schema import Centre, Exclusion, Header, Label, RulesetSpec, RuleSpec, Scope, Tenders, Tier, When

CACHE_LIMIT = 4096  # days or coupon sets remembered; cleared wholesale when full


@dataclass(frozen=True, slots=True)
class Text:
    """A cashier-facing text in both languages."""

    zh_cn: str
    en: str

    @classmethod
    def of(cls, label: Label) -> Text:
        return cls(label.zh_cn, label.en)


@dataclass(frozen=True, slots=True)
class Context:
    """Everything about the moment and the member that a rule's conditions read."""

    day: dt.date
    minute: int  # minutes since local midnight
    tier: str | None
    card_kind: str | None
    birthday: tuple[int, int] | None
    coupons: frozenset[str]

    @property
    def birthday_relation(self) -> str | None:
        """ "day" on the member's birthday, "month" in the birthday month, else None."""
        if self.birthday is None or self.birthday[0] != self.day.month:
            return None
        return "day" if _is_birthday(self.birthday[0], self.birthday[1], self.day) else "month"


@dataclass(frozen=True, slots=True)
class CompiledWhen:
    member: bool
    tiers: frozenset[str] | None
    card_kinds: frozenset[str] | None
    coupon: str | None
    days_of_month: frozenset[int] | None
    weekdays: frozenset[int] | None
    months: frozenset[int] | None
    dates: tuple[tuple[dt.date, dt.date], ...]
    times: tuple[tuple[int, int], ...]
    birthday: str | None

    @classmethod
    def of(cls, when: When) -> CompiledWhen:
        def minutes(text: str) -> int:
            return int(text[:2]) * 60 + int(text[3:])

        return cls(
            member=when.member or bool(when.tiers or when.card_kinds or when.birthday),
            tiers=frozenset(when.tiers) or None,
            card_kinds=frozenset(when.card_kinds) or None,
            coupon=when.coupon,
            days_of_month=frozenset(when.days_of_month) or None,
            weekdays=frozenset(when.weekdays) or None,
            months=frozenset(when.months) or None,
            dates=tuple((r.from_, r.to) for r in when.dates),
            times=tuple((minutes(r.from_), minutes(r.to)) for r in when.times),
            birthday=when.birthday,
        )

    # The conditions split by what they read, so the engine can cache each part on its own
    # key (the day, the minute, the member, the coupons) and AND the bitmasks together.

    def member_holds(self, tier: str | None, card_kind: str | None) -> bool:
        if self.member and tier is None:
            return False
        if self.tiers is not None and tier not in self.tiers:
            return False
        return self.card_kinds is None or card_kind in self.card_kinds

    def day_holds(self, day: dt.date) -> bool:
        if self.days_of_month is not None and day.day not in self.days_of_month:
            return False
        if self.weekdays is not None and day.isoweekday() not in self.weekdays:
            return False
        if self.months is not None and day.month not in self.months:
            return False
        return not self.dates or any(start <= day <= end for start, end in self.dates)

    def minute_holds(self, minute: int) -> bool:
        return not self.times or any(_in_time(minute, start, end) for start, end in self.times)

    def birthday_holds(self, relation: str | None) -> bool:
        """``relation``: "day" on the member's birthday, "month" in its month, else None."""
        if self.birthday is None:
            return True
        return relation == "day" or (self.birthday == "month" and relation == "month")

    def coupon_holds(self, coupons: frozenset[str]) -> bool:
        return self.coupon is None or self.coupon in coupons

    def holds(self, ctx: Context) -> bool:
        """True when every condition given holds at ``ctx``."""
        return (
            self.member_holds(ctx.tier, ctx.card_kind)
            and self.day_holds(ctx.day)
            and self.minute_holds(ctx.minute)
            and self.birthday_holds(ctx.birthday_relation)
            and self.coupon_holds(ctx.coupons)
        )


def _in_time(minute: int, start: int, end: int) -> bool:
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps past midnight


def _is_birthday(month: int, mday: int, day: dt.date) -> bool:
    if (month, mday) == (day.month, day.day):
        return True
    # Members born on 29 February celebrate on 28 February in common years.
    leap = day.year % 4 == 0 and (day.year % 100 != 0 or day.year % 400 == 0)
    return (month, mday) == (2, 29) and not leap and (day.month, day.day) == (2, 28)


@dataclass(frozen=True, slots=True)
class CompiledScope:
    categories: frozenset[str] | None
    skus: frozenset[str] | None
    flags: frozenset[str] | None
    exclude_categories: frozenset[str]
    exclude_skus: frozenset[str]
    exclude_flags: frozenset[str]
    marked_down: str
    skip_discounted: bool

    @property
    def flag_free(self) -> bool:
        """Whether SKU and category alone decide a match (no flag or marked-down condition)."""
        return self.flags is None and not self.exclude_flags and self.marked_down == "any"

    @classmethod
    def of(cls, scope: Scope) -> CompiledScope:
        return cls(
            categories=frozenset(scope.categories) or None,
            skus=frozenset(scope.skus) or None,
            flags=frozenset(scope.flags) or None,
            exclude_categories=frozenset(scope.exclude_categories),
            exclude_skus=frozenset(scope.exclude_skus),
            exclude_flags=frozenset(scope.exclude_flags),
            marked_down=scope.marked_down,
            skip_discounted=scope.skip_discounted,
        )

    def matches(self, line: Line) -> bool:  # noqa: PLR0911 - a flat list of independent checks
        """True when the rule may touch ``line`` (before the already-discounted check)."""
        if self.skus is not None or self.categories is not None:
            in_sku = self.skus is not None and line.sku in self.skus
            in_cat = self.categories is not None and line.category in self.categories
            if not (in_sku or in_cat):
                return False
        if self.flags is not None and not (self.flags & line.flags):
            return False
        if line.sku in self.exclude_skus or line.category in self.exclude_categories:
            return False
        if self.exclude_flags and (self.exclude_flags & line.flags):
            return False
        if self.marked_down == "only":
            return line.marked_down
        if self.marked_down == "exclude":
            return not line.marked_down
        return True


@dataclass(frozen=True, slots=True)
class CompiledExclusion:
    categories: frozenset[str]
    skus: frozenset[str]
    flags: frozenset[str]

    @classmethod
    def of(cls, exclusion: Exclusion) -> CompiledExclusion:
        return cls(frozenset(exclusion.categories), frozenset(exclusion.skus), frozenset(exclusion.flags))

    def reason(self, line: Line) -> str | None:
        """Why ``line`` is excluded (``sku:X``, ``category:X``, ``flag:X``), or None."""
        if line.sku in self.skus:
            return f"sku:{line.sku}"
        if line.category in self.categories:
            return f"category:{line.category}"
        hit = self.flags & line.flags
        if hit:
            return f"flag:{min(hit)}"
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule.  ``order`` is its place in the documented evaluation order."""

    id: str
    kind: str
    stage: str
    label: Text
    priority: int
    stacking: str
    group: str
    when: CompiledWhen
    scope: CompiledScope
    order: int = 0
    bit: int = 1  # 1 << order: rule sets are int bitmasks
    rate: int | None = None
    rates: Mapping[str, int] = field(default_factory=dict)
    marked_down_rate: int | None = None
    marked_down_rates: Mapping[str, int] | None = None
    amount: int = 0
    per: str | None = None
    threshold: int = 0
    off: int = 0
    repeat: bool = False
    max_off: int | None = None
    price: int = 0
    factor: int = 10_000

    def rate_for(self, tier: str | None, marked_down: bool) -> int | None:
        """The rate (ten-thousandths of the price paid, or points per yuan) for this line, or None."""
        if marked_down and (self.marked_down_rate is not None or self.marked_down_rates is not None):
            if self.marked_down_rate is not None:
                return self.marked_down_rate
            return None if tier is None or self.marked_down_rates is None else self.marked_down_rates.get(tier)
        if self.rate is not None:
            return self.rate
        return None if tier is None else self.rates.get(tier)


@dataclass(frozen=True, slots=True)
class PointsTenderPolicy:
    accepted: bool
    points_per_unit: int
    unit_fen: int
    min_points: int
    max_share: int  # ten-thousandths of the amount due


@dataclass(frozen=True, slots=True)
class TenderPolicy:
    points: PointsTenderPolicy
    rebate_accepted: bool
    stored_value_accepted: bool
    no_member_benefits_with: frozenset[str]
    on_conflict: str
    conflict_tiers: frozenset[str]


@dataclass(frozen=True, slots=True)
class RuleIndex:
    """Rules of one stage, findable by what a line is."""

    general: tuple[Rule, ...]
    by_sku: Mapping[str, tuple[Rule, ...]]
    by_category: Mapping[str, tuple[Rule, ...]]

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> RuleIndex:
        general: list[Rule] = []
        by_sku: dict[str, list[Rule]] = defaultdict(list)
        by_category: dict[str, list[Rule]] = defaultdict(list)
        for rule in rules:
            scope = rule.scope
            if scope.skus is None and scope.categories is None:
                general.append(rule)
                continue
            for sku in scope.skus or ():
                by_sku[sku].append(rule)
            for category in scope.categories or ():
                by_category[category].append(rule)
        return cls(
            tuple(general),
            {k: tuple(v) for k, v in by_sku.items()},
            {k: tuple(v) for k, v in by_category.items()},
        )

    def candidates(self, line: Line) -> list[Rule]:
        """Rules whose include lists can match ``line``, in evaluation order, no repeats."""
        by_sku = self.by_sku.get(line.sku, ())
        by_cat = self.by_category.get(line.category, ())
        if not by_sku and not by_cat:
            return list(self.general)
        found = {rule.order: rule for rule in (*self.general, *by_sku, *by_cat)}
        return [found[order] for order in sorted(found)]


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A validated, compiled ruleset: immutable, shareable between threads."""

    id: str
    version: str
    name: Text
    timezone: ZoneInfo
    tiers: tuple[str, ...]
    tier_labels: Mapping[str, Text]
    card_kinds: tuple[str, ...]
    discount_exclusion: CompiledExclusion
    points_exclusion: CompiledExclusion
    points_rounding: str
    earning_tenders: frozenset[str]
    tenders: TenderPolicy
    rules: tuple[Rule, ...]
    line_rules: RuleIndex
    basket_rules: RuleIndex
    points_rules: RuleIndex
    coupon_codes: frozenset[str]
    digest: str
    source: str
    coupon_rules: Mapping[str, frozenset[str]]
    # Head office's programme ([centre]): never used in pricing, so never part of a lane's decision.
    centre: Centre = field(default_factory=Centre, compare=False)
    # Memo tables of pure functions of this ruleset (here and in agent.plan); never part of its
    # value.  Each is keyed by one thing that repeats all day at a till, so they stay small.
    member_cache: dict[tuple[str | None, str | None], int] = field(default_factory=dict, compare=False, repr=False)
    day_cache: dict[dt.date, int] = field(default_factory=dict, compare=False, repr=False)
    minute_cache: dict[int, int] = field(default_factory=dict, compare=False, repr=False)
    birthday_cache: dict[str | None, int] = field(default_factory=dict, compare=False, repr=False)
    coupon_cache: dict[frozenset[str], int] = field(default_factory=dict, compare=False, repr=False)
    identity_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    signature_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    candidate_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def _mask(self, holds: Callable[[CompiledWhen], bool]) -> int:
        mask = 0
        for rule in self.rules:
            if holds(rule.when):
                mask |= rule.bit
        return mask

    def active(self, ctx: Context) -> int:
        """The rules whose conditions hold at ``ctx``, as a bitmask of ``Rule.bit``."""
        member_key = (ctx.tier, ctx.card_kind)
        member = self.member_cache.get(member_key)
        if member is None:
            member = self.member_cache[member_key] = self._mask(lambda w: w.member_holds(*member_key))
        day = self.day_cache.get(ctx.day)
        if day is None:
            if len(self.day_cache) >= CACHE_LIMIT:
                self.day_cache.clear()
            day = self.day_cache[ctx.day] = self._mask(lambda w: w.day_holds(ctx.day))
        minute = self.minute_cache.get(ctx.minute)
        if minute is None:
            minute = self.minute_cache[ctx.minute] = self._mask(lambda w: w.minute_holds(ctx.minute))
        relation = ctx.birthday_relation
        birthday = self.birthday_cache.get(relation)
        if birthday is None:
            birthday = self.birthday_cache[relation] = self._mask(lambda w: w.birthday_holds(relation))
        coupon = self.coupon_cache.get(ctx.coupons)
        if coupon is None:
            if len(self.coupon_cache) >= CACHE_LIMIT:
                self.coupon_cache.clear()
            coupon = self.coupon_cache[ctx.coupons] = self._mask(lambda w: w.coupon_holds(ctx.coupons))
        return member & day & minute & birthday & coupon


def _sort_key(spec: RuleSpec) -> tuple[int, str]:
    return (spec.priority, spec.id)


def _compile_rule(spec: RuleSpec, order: int) -> Rule:
    def rate(text: str | None) -> int | None:
        return None if text is None else parse_rate(text)

    def money(text: str | None) -> int:
        return 0 if text is None else parse_money(text)

    default_stacking = "best_of" if spec.stage == "points" else "multiplicative"
    return Rule(
        id=spec.id,
        kind=spec.kind,
        stage=spec.stage,
        label=Text.of(spec.label),
        priority=spec.priority,
        stacking=spec.stacking or default_stacking,
        group=spec.group or spec.id,
        when=CompiledWhen.of(spec.when),
        scope=CompiledScope.of(spec.scope),
        order=order,
        bit=1 << order,
        rate=rate(spec.rate),
        rates={k: parse_rate(v) for k, v in (spec.rates or {}).items()},
        marked_down_rate=rate(spec.marked_down_rate),
        marked_down_rates=None
        if spec.marked_down_rates is None
        else {k: parse_rate(v) for k, v in spec.marked_down_rates.items()},
        amount=money(spec.amount),
        per=spec.per,
        threshold=money(spec.threshold),
        off=money(spec.off),
        repeat=spec.repeat,
        max_off=None if spec.max_off is None else parse_money(spec.max_off),
        price=money(spec.price),
        factor=parse_rate(spec.factor) if spec.factor is not None else 10_000,
    )


@dataclass(frozen=True, slots=True)
class _Parts:
    """The parts of a ruleset that validated on their own, for the cross-rule checks."""

    header: Header | None
    tiers: list[Tier] | None
    tenders: Tenders | None
    rules: list[tuple[int, RuleSpec]]

    @classmethod
    def of(cls, spec: RulesetSpec) -> _Parts:
        return cls(spec.ruleset, spec.tiers, spec.tenders, list(enumerate(spec.rules)))

    @classmethod
    def salvage(cls, raw: Mapping[str, Any]) -> _Parts:
        """Best effort when the whole document does not validate: every part that does, so that a
        typo in one rule does not hide a duplicate id or an undeclared tier in another."""

        def valid(model: type[Any], data: Any) -> Any:
            try:
                return model.model_validate(data)
            except ValidationError:
                return None

        tiers_raw = raw.get("tiers")
        tiers = [valid(Tier, t) for t in tiers_raw] if isinstance(tiers_raw, list) else []
        rules_raw = raw.get("rules", [])
        rules = [(i, valid(RuleSpec, r)) for i, r in enumerate(rules_raw)] if isinstance(rules_raw, list) else []
        return cls(
            valid(Header, raw.get("ruleset")),
            None if not tiers or None in tiers else tiers,  # undeclared-tier checks need every tier
            valid(Tenders, raw.get("tenders", {})),
            [(i, rule) for i, rule in rules if rule is not None],
        )


def _cross_check(parts: _Parts, source: str) -> list[Issue]:  # noqa: C901, PLR0912 - independent checks
    issues: list[Issue] = []

    def bad(where: str, message: str, code: str = "inconsistent") -> None:
        issues.append(Issue(field=where, code=code, message=message, source=source))

    if parts.header is not None:
        try:
            ZoneInfo(parts.header.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # a directory, or a name too long for a path
            bad("ruleset.timezone", f"unknown time zone {parts.header.timezone!r}")
    tiers = [t.id for t in parts.tiers or ()]
    for index, tier in enumerate(tiers):
        if tiers.index(tier) != index:
            bad(f"tiers[{index}].id", f"tier {tier!r} is declared twice", "duplicate")
    known_tiers = set(tiers) if parts.tiers is not None else None
    known_kinds = set(parts.header.card_kinds) if parts.header is not None else None

    def check_tier(where: str, tier: str) -> None:
        if known_tiers is not None and tier not in known_tiers:
            bad(where, f"tier {tier!r} is not declared in [[tiers]]", "unknown_tier")

    if parts.tenders is not None:
        for tier in parts.tenders.stored_value.conflict_tiers:
            check_tier("tenders.stored_value.conflict_tiers", tier)
    first_seen: dict[str, int] = {}
    groups: dict[str, tuple[int, str, str]] = {}
    for index, rule in parts.rules:
        where = f"rules[{index}]"
        if rule.id in first_seen:
            bad(f"{where}.id", f"rule id {rule.id!r} is already used by rules[{first_seen[rule.id]}]", "duplicate")
        first_seen.setdefault(rule.id, index)
        for key in ("rates", "marked_down_rates"):
            for tier in getattr(rule, key) or {}:
                check_tier(f"{where}.{key}.{tier}", tier)
        for tier in rule.when.tiers:
            check_tier(f"{where}.when.tiers", tier)
        for kind in rule.when.card_kinds:
            if known_kinds is not None and kind not in known_kinds:
                bad(f"{where}.when.card_kinds", f"card kind {kind!r} is not in ruleset.card_kinds", "unknown_card_kind")
        if rule.stage == "basket" and rule.stacking == "additive":
            bad(f"{where}.stacking", "basket rules stack multiplicative (in turn), best_of or exclusive")
        if rule.group is not None:
            stacking = rule.stacking or ("best_of" if rule.stage == "points" else "multiplicative")
            if rule.group in groups:
                other, other_stage, other_stacking = groups[rule.group]
                if other_stage != rule.stage:
                    bad(f"{where}.group", f"group {rule.group!r} mixes stages with rules[{other}]")
                elif other_stacking != stacking:
                    bad(
                        f"{where}.stacking",
                        f"group {rule.group!r} is {other_stacking} in rules[{other}] but {stacking} here",
                    )
            else:
                groups[rule.group] = (index, rule.stage, stacking)
    return issues


def _annotate_rule_ids(issues: list[Issue], raw: Mapping[str, Any]) -> list[Issue]:
    """Add the rule id to issues under ``rules[N]`` so the author can find the rule."""
    rules = raw.get("rules")
    if not isinstance(rules, list):
        return issues
    out = []
    for issue in issues:
        if issue.field.startswith("rules["):
            index = int(issue.field[6 : issue.field.index("]")])
            rule_id = rules[index].get("id") if index < len(rules) and isinstance(rules[index], dict) else None
            if isinstance(rule_id, str):
                out.append(Issue(issue.field, issue.code, f"{issue.message} (rule {rule_id!r})", issue.source))
                continue
        out.append(issue)
    return out


def parse_ruleset(text: str, source: str = "<ruleset>") -> Ruleset:
    """Validate and compile ruleset TOML text; raises RulesetError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesetError([Issue("", "toml_syntax", str(exc), source)], what="ruleset") from exc
    try:
        spec = RulesetSpec.model_validate(raw)
    except ValidationError as exc:
        issues = [*issues_from_validation(exc, source), *_cross_check(_Parts.salvage(raw), source)]
        raise RulesetError(_annotate_rule_ids(issues, raw), what="ruleset") from exc
    issues = _cross_check(_Parts.of(spec), source)
    if issues:
        raise RulesetError(_annotate_rule_ids(issues, raw), what="ruleset")
    return compile_spec(spec, source=source, digest=hashlib.sha256(text.encode()).hexdigest())


def compile_spec(spec: RulesetSpec, *, source: str = "<spec>", digest: str = "") -> Ruleset:
    """Compile an already validated spec (also used by the synthetic-ruleset generator)."""
    ordered = sorted(spec.rules, key=_sort_key)
    rules = tuple(_compile_rule(rule, order) for order, rule in enumerate(ordered))
    points = spec.tenders.points
    return Ruleset(
        id=spec.ruleset.id,
        version=spec.ruleset.version,
        name=Text.of(spec.ruleset.name),
        timezone=ZoneInfo(spec.ruleset.timezone),
        tiers=tuple(t.id for t in spec.tiers),
        tier_labels={t.id: Text.of(t.label) for t in spec.tiers},
        card_kinds=tuple(spec.ruleset.card_kinds),
        discount_exclusion=CompiledExclusion.of(spec.exclusions.discounts),
        points_exclusion=CompiledExclusion.of(spec.exclusions.points),
        points_rounding=spec.points.rounding,
        earning_tenders=frozenset(spec.points.earning_tenders),
        tenders=TenderPolicy(
            points=PointsTenderPolicy(
                accepted=points.accepted,
                points_per_unit=points.points_per_unit,
                unit_fen=parse_money(points.unit_value),
                min_points=points.min_points,
                max_share=parse_rate(points.max_share),
            ),
            rebate_accepted=spec.tenders.rebate.accepted,
            stored_value_accepted=spec.tenders.stored_value.accepted,
            no_member_benefits_with=frozenset(spec.tenders.stored_value.no_member_benefits_with),
            on_conflict=spec.tenders.stored_value.on_conflict,
            conflict_tiers=frozenset(spec.tenders.stored_value.conflict_tiers),
        ),
        rules=rules,
        line_rules=RuleIndex.of(r for r in rules if r.stage == "line"),
        basket_rules=RuleIndex.of(r for r in rules if r.stage == "basket"),
        points_rules=RuleIndex.of(r for r in rules if r.stage == "points"),
        coupon_codes=frozenset(r.when.coupon for r in rules if r.when.coupon is not None),
        coupon_rules={
            code: frozenset(r.id for r in rules if r.when.coupon == code)
            for code in {r.when.coupon for r in rules if r.when.coupon is not None}
        },
        digest=digest,
        source=source,
        centre=spec.centre,
    )


def load_ruleset(path: str | Path) -> Ruleset:
    """Read, validate and compile a ruleset file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesetError([Issue("", "unreadable", str(exc), str(path))], what="ruleset") from exc
    return parse_ruleset(text, source=str(path))
