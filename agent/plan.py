"""Line plans: which rules touch a line, resolved once and reused.

Two pure facts are memoised on the ruleset:

* a line's **identity** (SKU, category, flags, marked down) decides which
  rules' scopes and which exclusions match it -- independent of the moment
  and the member;
* its **plan** adds the moment and the member: of those candidate rules, the
  ones in force (``active`` bitmask restricted to the candidates) with their
  rates resolved for the tier.

A till sells the same goods all day, so both lookups almost always hit; the
plan key holds only the candidate rules' bits, so a rule that cannot touch the
line never splits its cache.  A plan also memoises its line-stage result per
(unit price, quantity): the same item at the same price discounts the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.basket import Line
from agent.money import RATE_SCALE
from agent.ruleset import Rule, Ruleset

IDENTITY_CACHE_LIMIT = 50_000  # line identities remembered; cleared wholesale when full
PLANS_PER_IDENTITY = 64  # (tier, rules in force) combinations per identity
RESULTS_PER_PLAN = 64  # (price, quantity) results per plan


@dataclass(frozen=True, slots=True)
class Step:
    """A line rule with its value for this line: a rate (percent), fen per unit (amount_off, event_price)."""

    rule: Rule
    value: int
    skip_discounted: bool
    percent: bool


@dataclass(frozen=True, slots=True)
class Group:
    mode: str
    steps: tuple[Step, ...]
    skips: bool  # some step skips lines already discounted


@dataclass(frozen=True, slots=True, eq=False)
class LinePlan:
    discount_excluded: str | None
    points_excluded: str | None
    groups: tuple[Group, ...]
    exclusive: tuple[Step, ...]
    # (rule, points numerator per fen earned): earn rate x 1e4, multiplier rate x (factor - 1e4); a
    # no_points rule appears alone with 0 so the line can say why it earns nothing.
    points: tuple[tuple[Rule, int], ...]
    basket_rules: tuple[Rule, ...]  # basket rules in force whose scope takes this line
    results: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)  # engine's line results


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """The rules whose scope matches a line identity, and its exclusions."""

    discount_excluded: str | None
    points_excluded: str | None
    line_rules: tuple[Rule, ...]
    points_rules: tuple[Rule, ...]
    basket_rules: tuple[Rule, ...]
    mask: int  # bits of all the rules above
    plans: dict[tuple[str | None, int], LinePlan] = field(default_factory=dict, repr=False)


def _step(rule: Rule, tier: str | None, marked_down: bool) -> Step | None:
    if rule.kind == "percent":
        rate = rule.rate_for(tier, marked_down=marked_down)
        if rate is None or rate >= RATE_SCALE:
            return None  # gives nothing on this line
        return Step(rule, rate, rule.scope.skip_discounted, percent=True)
    value = rule.amount if rule.kind == "amount_off" else rule.price
    return Step(rule, value, rule.scope.skip_discounted, percent=False)


def _points_plan(rules: list[Rule], tier: str | None) -> tuple[tuple[Rule, int], ...]:
    if tier is None:
        return ()
    blockers = [r for r in rules if r.kind == "no_points"]
    if blockers:
        return ((blockers[0], 0),)
    earn: tuple[Rule, int] | None = None
    for rule in rules:
        if rule.kind == "earn":
            rate = rule.rate_for(tier, marked_down=False)
            if rate is not None and rate > 0 and (earn is None or rate > earn[1]):  # ties keep the earlier
                earn = (rule, rate)
    if earn is None:
        return ()
    best_in_group: dict[str, Rule] = {}
    for rule in rules:
        if rule.kind == "points_multiplier" and rule.factor > RATE_SCALE:
            current = best_in_group.get(rule.group)
            if current is None or rule.factor > current.factor:
                best_in_group[rule.group] = rule
    extras = sorted(best_in_group.values(), key=lambda r: r.order)
    return ((earn[0], earn[1] * RATE_SCALE), *((r, earn[1] * (r.factor - RATE_SCALE)) for r in extras))


def build_identity(ruleset: Ruleset, line: Line) -> Identity:
    """The candidate rules of a line identity (pure)."""
    discount_excluded = ruleset.discount_exclusion.reason(line)
    points_excluded = ruleset.points_exclusion.reason(line)
    line_rules: tuple[Rule, ...] = ()
    basket_rules: tuple[Rule, ...] = ()
    points_rules: tuple[Rule, ...] = ()
    if discount_excluded is None:
        line_rules = tuple(r for r in ruleset.line_rules.candidates(line) if r.scope.matches(line))
        basket_rules = tuple(r for r in ruleset.basket_rules if r.scope.matches(line))
    if points_excluded is None:
        points_rules = tuple(r for r in ruleset.points_rules.candidates(line) if r.scope.matches(line))
    mask = 0
    for rule in (*line_rules, *basket_rules, *points_rules):
        mask |= rule.bit
    return Identity(discount_excluded, points_excluded, line_rules, points_rules, basket_rules, mask)


def build_plan(identity: Identity, active: int, tier: str | None, marked_down: bool) -> LinePlan:
    """Resolve the rules in force on a line of ``identity`` (pure)."""
    by_group: dict[str, list[Step]] = {}
    modes: dict[str, str] = {}
    exclusive: list[Step] = []
    for rule in identity.line_rules:
        if not rule.bit & active:
            continue
        step = _step(rule, tier, marked_down)
        if step is None:
            continue
        if rule.stacking == "exclusive":
            exclusive.append(step)
        else:
            # A group takes the place of its first rule in (priority, id) order.
            by_group.setdefault(rule.group, []).append(step)
            modes[rule.group] = rule.stacking
    groups = tuple(
        Group(modes[name], tuple(steps), any(s.skip_discounted for s in steps)) for name, steps in by_group.items()
    )
    points = _points_plan([r for r in identity.points_rules if r.bit & active], tier)
    basket_rules = tuple(r for r in identity.basket_rules if r.bit & active)
    return LinePlan(
        identity.discount_excluded, identity.points_excluded, groups, tuple(exclusive), points, basket_rules
    )


def plan_for(ruleset: Ruleset, active: int, tier: str | None, line: Line) -> LinePlan:
    """The plan of ``line`` at ``active`` for ``tier``, memoised on the ruleset."""
    marked_down = line.marked_down
    key = (line.sku, line.category, line.flags, marked_down)
    cache = ruleset.identity_cache
    identity: Identity | None = cache.get(key)
    if identity is None:
        if len(cache) >= IDENTITY_CACHE_LIMIT:
            cache.clear()
        identity = cache[key] = build_identity(ruleset, line)
    plan_key = (tier, active & identity.mask)
    plan = identity.plans.get(plan_key)
    if plan is None:
        if len(identity.plans) >= PLANS_PER_IDENTITY:
            identity.plans.clear()
        plan = identity.plans[plan_key] = build_plan(identity, active, tier, marked_down)
    return plan
