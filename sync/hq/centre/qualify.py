"""Whether a member's spend, visits and points meet a tier's criteria (pure; docs/member-centre.md "Tiers").

Windows end on the decision day, that day included: "same day" is that day,
a 30-day window is the day and the 29 before it, "a year" is the 365 days
ending on it.  Every function returns the criterion met, in words for the
tier history ("same-day spend 812.00 >= 800.00"), or None.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from agent.money import format_fen, parse_money
from agent.ruleset_schema import Qualify, Retention
from sync.hq.centre.programme import Programme
from sync.hq.centre.spend import MemberDays

YEAR_DAYS = 365


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a decision on ``day`` looks at: the member's days (at least the year before) and a year's points."""

    day: dt.date
    days: MemberDays
    year_points: int

    def window(self, length: int) -> tuple[dt.date, dt.date]:
        return self.day - dt.timedelta(days=length - 1), self.day


def _spend(ev: Evidence, length: int) -> int:
    return ev.days.spend_between(*ev.window(length))


def met(rule: Qualify, ev: Evidence) -> str | None:
    """The first of ``rule``'s criteria ``ev`` meets, or None."""
    if rule.same_day_spend is not None:
        spent = _spend(ev, 1)
        if spent >= parse_money(rule.same_day_spend):
            return f"same-day spend {format_fen(spent)} >= {rule.same_day_spend}"
    for window in rule.windows:
        spent = _spend(ev, window.days)
        if spent >= parse_money(window.spend):
            return f"{window.days}-day spend {format_fen(spent)} >= {window.spend}"
    return _year(rule.year_points, rule.year_spend, rule.year_visits, ev, YEAR_DAYS)


def _year(points: int | None, spend: str | None, visits: int | None, ev: Evidence, length: int) -> str | None:
    if points is not None and ev.year_points >= points:
        return f"points in a year {ev.year_points} >= {points}"
    if spend is not None:
        spent = _spend(ev, length)
        if spent >= parse_money(spend):
            return f"spend in a year {format_fen(spent)} >= {spend}"
    if visits is not None:
        count = ev.days.visits_between(*ev.window(length))
        if count >= visits:
            return f"visits in a year {count} >= {visits}"
    return None


def best_upgrade(programme: Programme, current: str | None, ev: Evidence, *, screening: bool) -> tuple[str, str] | None:
    """The highest tier above ``current`` that ``ev`` qualifies for, and why; None when there is none.

    ``screening``: the monthly screening, which also applies the rules marked
    ``screening_only``; journals arriving apply only the others.
    """
    best: tuple[int, str, str] | None = None
    floor = programme.rank(current)
    for rule in programme.centre.qualify:
        if rule.screening_only and not screening:
            continue
        rank = programme.rank(rule.tier)
        if rank <= floor or (best is not None and rank <= best[0]):
            continue
        why = met(rule, ev)
        if why is not None:
            best = (rank, rule.tier, why)
    return None if best is None else (best[1], best[2])


def joinable(programme: Programme, tier: str, ev: Evidence) -> str | None:
    """Why receipts in ``ev`` admit a new member at ``tier`` (any rule for it, screening rules included), or None.

    A tier no ``[[centre.qualify]]`` rule names is open to anyone.
    """
    rules = [rule for rule in programme.centre.qualify if rule.tier == tier]
    if not rules:
        return "no qualification needed"
    for rule in rules:
        for late in range(rule.apply_within_days + 1):
            earlier = Evidence(ev.day - dt.timedelta(days=late), ev.days, ev.year_points)
            why = met(rule, earlier)
            if why is not None:
                return why
    return None


def retained(rule: Retention, ev: Evidence, tier_year_days: int) -> str | None:
    """Why the member keeps ``rule.tier`` at its anniversary (the tier year ends on ``ev.day``), or None."""
    return _year(rule.year_points, rule.year_spend, rule.year_visits, ev, tier_year_days)
