"""Line plans: which rules touch a line, resolved once and reused.

Which rules apply to a line, and at what rate, depends only on the active
rule set (the moment and the member), the tier, and the line's identity
(SKU, category, flags, marked down) -- not on its price or quantity.  The
engine therefore resolves that once per identity and caches it on the
ruleset, so a till pricing the same goods all day pays for rule matching
once.  A plan is an immutable value; building one is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.basket import Line
from agent.money import RATE_SCALE
from agent.ruleset import Rule, Ruleset

PLAN_CACHE_LIMIT = 200_000  # entries; cleared wholesale when full (a plan is cheap to rebuild)


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


@dataclass(frozen=True, slots=True)
class LinePlan:
    discount_excluded: str | None
    points_excluded: str | None
    groups: tuple[Group, ...]
    exclusive: tuple[Step, ...]
    # (rule, points numerator per fen earned): earn rate x 1e4, multiplier rate x (factor - 1e4); a
    # no_points rule appears alone with 0 so the line can say why it earns nothing.
    points: tuple[tuple[Rule, int], ...]


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


def build_plan(ruleset: Ruleset, active: frozenset[int], tier: str | None, line: Line) -> LinePlan:
    """Resolve the rules that touch ``line`` (pure; see ``plan_for`` for the cached form)."""
    marked_down = line.marked_down
    discount_excluded = ruleset.discount_exclusion.reason(line)
    groups: list[Group] = []
    exclusive: list[Step] = []
    if discount_excluded is None:
        by_group: dict[str, list[Step]] = {}
        modes: dict[str, str] = {}
        for rule in ruleset.line_rules.candidates(line):
            if rule.order not in active or not rule.scope.matches(line):
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
        groups = [
            Group(modes[name], tuple(steps), any(s.skip_discounted for s in steps)) for name, steps in by_group.items()
        ]
    points_excluded = ruleset.points_exclusion.reason(line)
    points: tuple[tuple[Rule, int], ...] = ()
    if points_excluded is None:
        rules = [r for r in ruleset.points_rules.candidates(line) if r.order in active and r.scope.matches(line)]
        points = _points_plan(rules, tier)
    return LinePlan(discount_excluded, points_excluded, tuple(groups), tuple(exclusive), points)


def plan_for(ruleset: Ruleset, active: frozenset[int], tier: str | None, line: Line) -> LinePlan:
    """``build_plan``, memoised on the ruleset by everything a plan depends on."""
    key = (active, tier, line.sku, line.category, line.flags, line.marked_down)
    cache = ruleset.plan_cache
    plan = cache.get(key)
    if plan is None:
        plan = build_plan(ruleset, active, tier, line)
        if len(cache) >= PLAN_CACHE_LIMIT:
            cache.clear()
        cache[key] = plan
    return plan
