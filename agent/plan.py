"""Line templates: which rules can touch a line, resolved once and reused.

Which rules' scopes and which exclusions match a line depends only on its
**identity** (SKU, category, flags, marked down); the rates those rules give
depend on the member's tier as well.  Both are pure facts of the ruleset, so
the engine resolves them once per (identity, tier) into a ``Template`` and
memoises it on the ruleset.  A till sells the same goods day after day, so
after its first day these lookups almost always hit and the memo stops
growing.  What depends on the moment -- which of those rules are in force --
is a bitmask; each template memoises its line result and points keyed only by
the bits of its *own* rules in force (plus price and quantity), so the memo
stays small, and a moment that changes nothing for a line reuses its entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.basket import Line
from agent.money import RATE_SCALE
from agent.ruleset import Rule, Ruleset

IDENTITY_CACHE_LIMIT = 100_000  # line identities remembered; cleared wholesale when full
MEMO_LIMIT = 1024  # entries per template memo table; cleared wholesale when full


@dataclass(frozen=True, slots=True)
class Step:
    """A line rule with its value for this line: a rate (percent), fen per unit (amount_off, event_price)."""

    rule: Rule
    bit: int
    value: int
    skip_discounted: bool
    percent: bool


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """A line identity's candidate rules for one tier, each with its bit, in evaluation order."""

    discount_excluded: str | None
    points_excluded: str | None
    groups: tuple[tuple[str, tuple[Step, ...]], ...]  # (stacking mode, steps), groups in order
    exclusive: tuple[Step, ...]
    no_points: tuple[Rule, ...]
    earn: tuple[tuple[Rule, int], ...]  # (rule, rate): best rate first, then evaluation order
    multipliers: tuple[tuple[Rule, ...], ...]  # per group, best factor first
    basket_rules: tuple[Rule, ...]
    line_mask: int  # bits of the line-stage rules above
    points_mask: int  # bits of the points rules above
    # Memo tables, keyed by the bits of this template's own rules in force (so a rule that cannot
    # touch the line never splits them): line results by (bits, unit price, quantity), points per
    # fen by bits.  Small and bounded: the same goods sell at the same price all day.
    line_results: dict[tuple[int, int, int], Any] = field(default_factory=dict, repr=False)
    points_memo: dict[int, tuple[tuple[Rule, int], ...]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """The rules whose scope matches a line identity, and its exclusions."""

    discount_excluded: str | None
    points_excluded: str | None
    line_rules: tuple[Rule, ...]
    points_rules: tuple[Rule, ...]
    basket_rules: tuple[Rule, ...]
    marked_down: bool
    templates: dict[str | None, Template] = field(default_factory=dict, repr=False)

    @property
    def signature(self) -> tuple[object, ...]:
        """Everything pricing reads from an identity: lines with equal signatures price alike."""
        return (
            self.discount_excluded,
            self.points_excluded,
            self.marked_down,
            tuple(r.order for r in self.line_rules),
            tuple(r.order for r in self.points_rules),
            tuple(r.order for r in self.basket_rules),
        )


def _step(rule: Rule, tier: str | None, marked_down: bool) -> Step | None:
    if rule.kind == "percent":
        rate = rule.rate_for(tier, marked_down=marked_down)
        if rate is None or rate >= RATE_SCALE:
            return None  # gives nothing on this line
        return Step(rule, rule.bit, rate, rule.scope.skip_discounted, percent=True)
    value = rule.amount if rule.kind == "amount_off" else rule.price
    return Step(rule, rule.bit, value, rule.scope.skip_discounted, percent=False)


@dataclass(frozen=True, slots=True)
class _Candidates:
    """For one (SKU, category): rules already known to match, and rules that depend on flags."""

    matched: tuple[Rule, ...]
    depends: tuple[Rule, ...]


def _candidates(ruleset: Ruleset, line: Line) -> tuple[_Candidates, _Candidates, _Candidates]:
    # The same SKU comes back with other flags (marked down at closing time, ...): what only
    # the SKU and category decide is worked out once per (SKU, category).
    key = (line.sku, line.category)
    found: tuple[_Candidates, _Candidates, _Candidates] | None = ruleset.candidate_cache.get(key)
    if found is None:
        parts = []
        for index in (ruleset.line_rules, ruleset.basket_rules, ruleset.points_rules):
            rules = index.candidates(line)
            free = [r for r in rules if r.scope.flag_free]
            parts.append(
                _Candidates(
                    tuple(r for r in free if r.scope.matches(line)), tuple(r for r in rules if not r.scope.flag_free)
                )
            )
        if len(ruleset.candidate_cache) >= IDENTITY_CACHE_LIMIT:
            ruleset.candidate_cache.clear()
        found = ruleset.candidate_cache[key] = (parts[0], parts[1], parts[2])
    return found


def _matching(candidates: _Candidates, line: Line) -> tuple[Rule, ...]:
    if not candidates.depends:
        return candidates.matched
    more = [r for r in candidates.depends if r.scope.matches(line)]
    if not more:
        return candidates.matched
    return tuple(sorted((*candidates.matched, *more), key=_order))


def _order(rule: Rule) -> int:
    return rule.order


def build_identity(ruleset: Ruleset, line: Line) -> Identity:
    """The candidate rules of a line identity (pure)."""
    discount_excluded = ruleset.discount_exclusion.reason(line)
    points_excluded = ruleset.points_exclusion.reason(line)
    line_cands, basket_cands, points_cands = _candidates(ruleset, line)
    line_rules: tuple[Rule, ...] = ()
    basket_rules: tuple[Rule, ...] = ()
    points_rules: tuple[Rule, ...] = ()
    if discount_excluded is None:
        line_rules = _matching(line_cands, line)
        basket_rules = _matching(basket_cands, line)
    if points_excluded is None:
        points_rules = _matching(points_cands, line)
    return Identity(discount_excluded, points_excluded, line_rules, points_rules, basket_rules, line.marked_down)


def _points_template(
    rules: tuple[Rule, ...], tier: str | None
) -> tuple[tuple[Rule, ...], tuple[tuple[Rule, int], ...], tuple[tuple[Rule, ...], ...]]:
    if tier is None:
        return (), (), ()  # guests earn nothing
    no_points = tuple(rule for rule in rules if rule.kind == "no_points")
    earn: list[tuple[Rule, int]] = []
    multipliers: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.kind == "earn":
            rate = rule.rate_for(tier, marked_down=False)
            if rate is not None and rate > 0:
                earn.append((rule, rate))
        elif rule.kind == "points_multiplier" and rule.factor > RATE_SCALE:
            multipliers.setdefault(rule.group, []).append(rule)
    # Best first; ties keep the earlier rule (sorts are stable, rules arrive in evaluation order).
    earn.sort(key=lambda item: -item[1])
    return no_points, tuple(earn), tuple(tuple(sorted(m, key=lambda r: -r.factor)) for m in multipliers.values())


def build_template(identity: Identity, tier: str | None) -> Template:
    """Resolve an identity's candidate rules for ``tier`` (pure)."""
    marked_down = identity.marked_down
    by_group: dict[str, list[Step]] = {}
    modes: dict[str, str] = {}
    exclusive: list[Step] = []
    for rule in identity.line_rules:
        step = _step(rule, tier, marked_down)
        if step is None:
            continue
        if rule.stacking == "exclusive":
            exclusive.append(step)
        else:
            # Kept in (priority, id) order; the engine places a group at its first rule in force.
            by_group.setdefault(rule.group, []).append(step)
            modes[rule.group] = rule.stacking
    no_points, earn, multipliers = _points_template(identity.points_rules, tier)
    line_mask = 0
    for step in (*(s for steps in by_group.values() for s in steps), *exclusive):
        line_mask |= step.bit
    points_mask = 0
    for rule in (*no_points, *(rule for rule, _ in earn), *(rule for group in multipliers for rule in group)):
        points_mask |= rule.bit
    return Template(
        discount_excluded=identity.discount_excluded,
        points_excluded=identity.points_excluded,
        groups=tuple((modes[name], tuple(steps)) for name, steps in by_group.items()),
        exclusive=tuple(exclusive),
        no_points=no_points,
        earn=earn,
        multipliers=multipliers,
        basket_rules=identity.basket_rules,
        line_mask=line_mask,
        points_mask=points_mask,
    )


def points_per_fen(template: Template, active: int) -> tuple[tuple[Rule, int], ...]:
    """(rule, points numerator per fen earned) for the rules in force: the best earn rate x 1e4,
    each multiplier group's best extra; a no_points rule alone with 0, so the line can say why."""
    bits = active & template.points_mask
    found = template.points_memo.get(bits)
    if found is None:
        if len(template.points_memo) >= MEMO_LIMIT:
            template.points_memo.clear()
        found = template.points_memo[bits] = _points_per_fen(template, bits)
    return found


def _points_per_fen(template: Template, active: int) -> tuple[tuple[Rule, int], ...]:
    for rule in template.no_points:
        if rule.bit & active:
            return ((rule, 0),)
    for rule, rate in template.earn:
        if rule.bit & active:
            out = [(rule, rate * RATE_SCALE)]
            extras = [next((r for r in group if r.bit & active), None) for group in template.multipliers]
            for extra in sorted((r for r in extras if r is not None), key=lambda r: r.order):
                out.append((extra, rate * (extra.factor - RATE_SCALE)))
            return tuple(out)
    return ()


def template_for(ruleset: Ruleset, tier: str | None, line: Line) -> Template:
    """The template of ``line`` for ``tier``, memoised on the ruleset."""
    marked_down = line.marked_down
    key = (line.sku, line.category, line.flags, marked_down)
    cache = ruleset.identity_cache
    identity: Identity | None = cache.get(key)
    if identity is None:
        if len(cache) >= IDENTITY_CACHE_LIMIT:
            cache.clear()
            ruleset.signature_cache.clear()
        # Most goods share their rules with many others (a category's promotions): one shared
        # Identity per signature keeps the memo small and its tables shared between them.
        fresh = build_identity(ruleset, line)
        identity = cache[key] = ruleset.signature_cache.setdefault(fresh.signature, fresh)
    template = identity.templates.get(tier)
    if template is None:
        template = identity.templates[tier] = build_template(identity, tier)
    return template
