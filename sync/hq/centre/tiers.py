"""The tier lifecycle (docs/member-centre.md "Tiers"): upgrades as journals arrive, the daily job, the screening.

Three entry points, each deciding from what the ledger holds and writing
every decision once, under a key (``tier_history.key`` and
``notifications.key`` are unique; a key already taken means "done before"):

- ``evaluate_arrivals``: the centre worker's step.  Ingest queues every member
  entry (``centre_queue``); for each member and each local day of its queued
  entries, the ``[[centre.qualify]]`` rules that are not ``screening_only`` are
  checked on that day's evidence.  Key ``upgrade:{member}:{tier}:{day}``.
- ``run_daily`` (job ``tiers``): (1) tiers decided for the day take effect;
  (2) anniversary retention (``[[centre.retention]]``); (3) inactivity
  (``[[centre.inactivity]]``).
- ``run_screening`` (job ``screening``, on ``[centre] screening_day``): every
  member with evidence that may qualify, every rule (``screening_only`` too),
  on the evidence of the day before (the last complete day).

The calendar: a tier decided on day D takes effect on D+1.  The decision is
``members.next_tier`` / ``next_tier_from`` = D+1, which lanes price with from
that day (``agent.basket.Member.tier_on``); the daily job of D+1 makes it the
member's ``tier``.  This holds for downgrades too: a gold member who misses
retention at the anniversary D keeps gold through D (the day the job may run
late into) and is VIP from D+1, the "next year" of seed 004 ("次年将取消您的金卡
资格降为普通VIP 卡") starting with the first whole day after the decision.

Where the seeds are silent, decided here:

- An upgrade is never to a tier at or below what the member will have: the
  floor is the pending ``next_tier`` when there is one, else the tier.  A
  member whose pending change is a downgrade and who qualifies again for the
  tier it holds keeps it (the upgrade replaces the downgrade).
- Cancelled members (``member_profiles.status``) are neither upgraded nor
  reviewed.  A member with a pending change is not reviewed at its
  anniversary or for inactivity (the change decides its next tier year).
- A tier's year starts on the ``effective_from`` of the latest ``upgrade``,
  ``effective``, ``manual`` or ``retain`` row for the member's current tier
  (a member with none: the day of its first change, its import or
  registration); at each whole ``tier_years`` after that the tier is
  reviewed over the tier year that ended the day before.  ``retain``
  restarts the tier year on the anniversary.
- Inactivity: "no purchase for N days" counts from the latest of the
  member's last sale (its own or a receipt claimed for it), the start of its
  current tier, its first change and its newest card's first valid day, so
  a member who just joined, was just downgraded into the tier or just got a
  new card is not inactive.  It is decided on the first day with N whole days
  without a purchase behind it.  A termination cancels the member's active
  cards at once (they are on the hot list from that moment): the profile
  stays, the history and ledger too; it is recorded with
  ``effective_from`` = the day.
- Notifications: ``tier_qualified`` (arrivals and screening; the screening's
  detail carries ``notify_by``: seed 004's "10 working days", counted Monday
  to Friday, public holidays being unknown here), ``tier_retained``,
  ``tier_downgraded``, ``membership_terminated``.

Locks, as everywhere (sync/hq/members.py): queue rows (``SKIP LOCKED`` on
PostgreSQL, so two head-office processes take different rows), then member
rows in member_id order (``members._load``), then the member-version counter
(``members.set_tier``).  Reads of whole populations run in read transactions;
writes in transactions of ``CHUNK`` members.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, and_, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from agent.money import format_fen, parse_money
from agent.ruleset_schema import Inactivity, Qualify, Retention
from sync.hq.centre.programme import JobContext, Programme, add_years
from sync.hq.centre.qualify import YEAR_DAYS, Evidence, best_upgrade, retained
from sync.hq.centre.spend import MemberDays, member_days, points_earned
from sync.hq.members import Member, _load, set_card_state, set_tier
from sync.hq.schema import (
    centre_ledger,
    centre_queue,
    member_cards,
    member_changes,
    member_profiles,
    members,
    notifications,
    points_ledger,
    sale_claims,
    sales,
    tier_history,
)

if TYPE_CHECKING:
    from sync.hq.db import HqDatabase

log = logging.getLogger(__name__)

CHUNK = 500  # members per write transaction (and per IN list: far under SQLite's parameter limit)
READ_CHUNK = 2_000  # members per read of a population
NOTIFY_WORKING_DAYS = 10  # seed 004: "在10 个工作日内通知"
# The rows that start a tier's year: reaching it, it taking effect, a change at the desk, a kept anniversary.
REACHED_KINDS = ("upgrade", "effective", "manual", "retain")


# --- small helpers ------------------------------------------------------------------------


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _standing(member: Member) -> str:
    """The tier the member will have: the pending change's, else the one in force."""
    return member.next_tier if member.next_tier is not None else member.tier


def _insert_new(conn: Connection, table: Table, row: Mapping[str, Any]) -> bool:
    """Insert ``row`` unless its ``key`` is taken; whether it was inserted."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    stmt = insert.values(dict(row)).on_conflict_do_nothing(index_elements=[table.c.key]).returning(table.c.key)
    return conn.execute(stmt).first() is not None


def _history(
    conn: Connection,
    key: str,
    member: Member,
    kind: str,
    tiers: tuple[str | None, str | None],
    days: tuple[dt.date, dt.date],
    reason: str,
    now: dt.datetime,
) -> bool:
    """A tier_history row, ``tiers`` = (from, to), ``days`` = (effective from, decided on), unless its key is taken."""
    row = {
        "key": key,
        "member_id": member.member_id,
        "kind": kind,
        "from_tier": tiers[0],
        "to_tier": tiers[1],
        "effective_from": days[0],
        "decided_on": days[1],
        "reason": reason[:500],
        "at_utc": now,
    }
    return _insert_new(conn, tier_history, row)


def _notify(conn: Connection, key: str, member_id: str, kind: str, detail: Mapping[str, Any], now: dt.datetime) -> None:
    row = {
        "key": key,
        "member_id": member_id,
        "kind": kind,
        "detail": json.dumps(detail, sort_keys=True, ensure_ascii=False),
        "created_at": now,
        "sent_at": None,
    }
    _insert_new(conn, notifications, row)


def working_days_after(day: dt.date, count: int) -> dt.date:
    """The ``count``-th working day (Monday to Friday) after ``day``."""
    out = day
    while count > 0:
        out += dt.timedelta(days=1)
        if out.weekday() < 5:
            count -= 1
    return out


def _cancelled(conn: Connection, ids: Collection[str]) -> set[str]:
    p = member_profiles.c
    out: set[str] = set()
    for chunk in _chunks(sorted(ids)):
        out.update(conn.execute(select(p.member_id).where(p.member_id.in_(chunk), p.status == "cancelled")).scalars())
    return out


def _reached(conn: Connection, ids: Sequence[str], day: dt.date) -> dict[str, dt.date]:
    """When each member's current tier started (latest REACHED_KINDS row for it, in effect by ``day``)."""
    th, m = tier_history.c, members.c
    query = (
        select(th.member_id, func.max(th.effective_from))
        .join_from(tier_history, members, and_(m.member_id == th.member_id, m.tier == th.to_tier))
        .where(th.member_id.in_(ids), th.kind.in_(REACHED_KINDS), th.effective_from <= day)
        .group_by(th.member_id)
    )
    return {str(row[0]): row[1] for row in conn.execute(query).all()}


def _first_days(conn: Connection, programme: Programme, ids: Sequence[str]) -> dict[str, dt.date]:
    """The local day of each member's first change (its import, registration or first sale)."""
    if not ids:
        return {}
    c = member_changes.c
    query = select(c.member_id, func.min(c.at)).where(c.member_id.in_(ids)).group_by(c.member_id)
    return {member_id: programme.local_date(at) for member_id, at in conn.execute(query)}


def _members_of(conn: Connection, tiers: Collection[str] | None, after: str, limit: int) -> list[tuple[str, str]]:
    """``(member_id, tier)`` of members without a pending change, in ``tiers`` (None: any), after ``after``."""
    m = members.c
    query = select(m.member_id, m.tier).where(m.member_id > after, m.next_tier.is_(None))
    if tiers is not None:
        query = query.where(m.tier.in_(sorted(tiers)))
    return [(member_id, tier) for member_id, tier in conn.execute(query.order_by(m.member_id).limit(limit))]


# --- evidence -----------------------------------------------------------------------------


def _spend_span(rules: Iterable[Qualify]) -> int:
    """Days of spend and visits the rules look back over (0: none of them looks at spend or visits)."""
    span = 0
    for rule in rules:
        if rule.same_day_spend is not None:
            span = max(span, 1)
        for window in rule.windows:
            span = max(span, window.days)
        if rule.year_spend is not None or rule.year_visits is not None:
            span = max(span, YEAR_DAYS)
    return span


def _evidence(
    conn: Connection, programme: Programme, rules: Sequence[Qualify], wanted: Mapping[str, Collection[dt.date]]
) -> dict[tuple[str, dt.date], Evidence]:
    """Evidence for each ``(member, day)`` asked for: only the spend and points the rules look at are read."""
    everyday = {day for days in wanted.values() for day in days}
    if not everyday:
        return {}
    span = _spend_span(rules)
    days_of: dict[str, MemberDays] = {}
    if span:
        first = min(everyday) - dt.timedelta(days=span - 1)
        days_of = member_days(conn, programme, first, max(everyday), list(wanted))
    points: dict[dt.date, dict[str, int]] = {}
    if any(rule.year_points is not None for rule in rules):
        by_day: dict[dt.date, list[str]] = defaultdict(list)
        for member_id, days in wanted.items():
            for day in days:
                by_day[day].append(member_id)
        for day, ids in by_day.items():
            points[day] = points_earned(conn, programme, day - dt.timedelta(days=YEAR_DAYS - 1), day, ids)
    return {
        (member_id, day): Evidence(day, days_of.get(member_id) or MemberDays(), points.get(day, {}).get(member_id, 0))
        for member_id, days in wanted.items()
        for day in days
    }


# --- upgrades -----------------------------------------------------------------------------


def _upgrade(
    conn: Connection,
    member: Member,
    tier: str,
    why: str,
    decided: dt.date,
    now: dt.datetime,
    source: str,
) -> bool:
    """Record an upgrade decided on ``decided`` (effective the next day) unless its key was taken."""
    effective = decided + dt.timedelta(days=1)
    floor = _standing(member)
    key = f"upgrade:{member.member_id}:{tier}:{decided.isoformat()}"
    if not _history(conn, key, member, "upgrade", (floor, tier), (effective, decided), why, now):
        return False
    reason = f"centre: {tier} from {effective.isoformat()} ({why})"
    set_tier(conn, member.member_id, member.tier, tier, effective, reason, now)
    member.next_tier, member.next_tier_from = tier, effective
    detail: dict[str, Any] = {
        "tier": tier,
        "from_tier": floor,
        "effective_from": effective.isoformat(),
        "decided_on": decided.isoformat(),
        "why": why,
        "source": source,
    }
    if source == "screening":
        detail["notify_by"] = working_days_after(decided, NOTIFY_WORKING_DAYS).isoformat()
    _notify(
        conn,
        f"tier_qualified:{member.member_id}:{tier}:{decided.isoformat()}",
        member.member_id,
        "tier_qualified",
        detail,
        now,
    )
    log.info("member %s: %s from %s (%s, %s)", member.member_id, tier, effective, why, source)
    return True


def evaluate_arrivals(db: HqDatabase, programme: Programme, limit: int = 1000) -> dict[str, int]:
    """Look at up to ``limit`` queued journal entries of members: upgrades they earn, decided on their days.

    One transaction: the queue rows taken are deleted in it, so an entry is
    looked at once (a crash leaves them queued, and the keys make a second
    look write nothing).  Entries of members head office does not hold are
    dropped; cancelled members are not upgraded.
    """
    q = centre_queue.c
    counts = {"entries": 0, "members": 0, "upgraded": 0, "unknown": 0, "cancelled": 0}
    rules = [rule for rule in programme.centre.qualify if not rule.screening_only]
    now = db.now()
    with db.transaction() as conn:
        taken = conn.execute(
            select(q.entry_id, q.member_id, q.at_utc)
            .order_by(q.at_utc, q.entry_id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not taken:
            return counts
        days: dict[str, set[dt.date]] = defaultdict(set)
        for _, member_id, at in taken:
            days[member_id].add(programme.local_date(at))
        state = _load(conn, days, cards=False)
        cancelled = _cancelled(conn, state)
        counts.update(entries=len(taken), members=len(days))
        counts["unknown"] = len(set(days) - set(state))
        counts["cancelled"] = len(cancelled)
        wanted = {member_id: sorted(days[member_id]) for member_id in sorted(state) if member_id not in cancelled}
        evidence = _evidence(conn, programme, rules, wanted) if rules else {}
        for member_id, member_days_ in wanted.items():
            member = state[member_id]
            for day in member_days_:  # oldest first: the earliest qualifying day wins
                found = best_upgrade(programme, _standing(member), evidence[member_id, day], screening=False)
                if found is not None and _upgrade(conn, member, found[0], found[1], day, now, "arrival"):
                    counts["upgraded"] += 1
        ids = [entry_id for entry_id, _, _ in taken]
        for chunk in _chunks(ids):
            conn.execute(delete(centre_queue).where(q.entry_id.in_(chunk)))
    return counts


def _at_least(
    conn: Connection,
    programme: Programme,
    first: dt.date,
    last: dt.date,
    *,
    spend: int | None = None,
    sales_count: int | None = None,
) -> set[str]:
    """Members whose own sales on ``first``..``last`` total at least ``spend`` fen (or number ``sales_count``)."""
    s = sales.c
    start, end = programme.day_range(first, last)
    measure = func.sum(s.net_fen) >= spend if spend is not None else func.count() >= (sales_count or 0)
    query = (
        select(s.member_id)
        .where(s.member_id.is_not(None), s.at_utc >= start, s.at_utc < end)
        .group_by(s.member_id)
        .having(measure)
    )
    return set(conn.execute(query).scalars())


def _screening_candidates(conn: Connection, programme: Programme, rules: Sequence[Qualify], last: dt.date) -> set[str]:
    """Members who may meet some rule on ``last``: a superset, found with one aggregate per criterion.

    Each aggregate over-counts (returns and voids are left out; a sale count
    bounds the visits; only lanes' earn rows are summed), so no member who
    qualifies is missed; receipts claimed for a member count for it, so every
    member with a claim in the year is a candidate too.  The exact evidence is
    read for the candidates only.
    """
    year_first = last - dt.timedelta(days=YEAR_DAYS - 1)
    found: set[str] = set()
    for rule in rules:
        if rule.same_day_spend is not None:
            found |= _at_least(conn, programme, last, last, spend=parse_money(rule.same_day_spend))
        for window in rule.windows:
            first = last - dt.timedelta(days=window.days - 1)
            found |= _at_least(conn, programme, first, last, spend=parse_money(window.spend))
        if rule.year_spend is not None:
            found |= _at_least(conn, programme, year_first, last, spend=parse_money(rule.year_spend))
        if rule.year_visits is not None:
            found |= _at_least(conn, programme, year_first, last, sales_count=rule.year_visits)
        if rule.year_points is not None:
            p = points_ledger.c
            start, end = programme.day_range(year_first, last)
            query = (
                select(p.member_id)
                .where(p.kind == "earn", p.at_utc >= start, p.at_utc < end)
                .group_by(p.member_id)
                .having(func.sum(p.points) >= rule.year_points)
            )
            found.update(conn.execute(query).scalars())
    start, end = programme.day_range(year_first, last)
    c, s, cl = sale_claims.c, sales.c, centre_ledger.c
    claimed = select(c.member_id).join_from(sale_claims, sales, s.entry_id == c.entry_id)
    found.update(conn.execute(claimed.where(s.at_utc >= start, s.at_utc < end).distinct()).scalars())
    found.update(
        conn.execute(
            select(cl.member_id).where(cl.kind == "claim", cl.on_date >= year_first, cl.on_date <= last).distinct()
        ).scalars()
    )
    return found


def run_screening(ctx: JobContext) -> dict[str, int]:
    """The monthly screening: every member that may qualify, on the last complete day's evidence (the day before).

    Upgrades are decided on ``ctx.day`` and take effect the day after, like
    those of arrivals; each gets a ``tier_qualified`` notification due within
    ``NOTIFY_WORKING_DAYS`` working days.
    """
    programme, day = ctx.programme, ctx.day
    counts = {"candidates": 0, "upgraded": 0, "cancelled": 0}
    rules = list(programme.centre.qualify)
    if not rules:
        return counts
    last = day - dt.timedelta(days=1)
    with ctx.db.reading() as conn:
        candidates = sorted(_screening_candidates(conn, programme, rules, last))
    counts["candidates"] = len(candidates)
    top = programme.tiers[-1] if programme.tiers else None
    for chunk in _chunks(candidates):
        with ctx.db.transaction() as conn:
            state = _load(conn, chunk, cards=False)
            cancelled = _cancelled(conn, state)
            counts["cancelled"] += len(cancelled)
            wanted = {
                member_id: [last]
                for member_id, member in state.items()
                if member_id not in cancelled and _standing(member) != top
            }
            evidence = _evidence(conn, programme, rules, wanted)
            for member_id in sorted(wanted):
                member = state[member_id]
                found = best_upgrade(programme, _standing(member), evidence[member_id, last], screening=True)
                if found is not None and _upgrade(conn, member, found[0], found[1], day, ctx.now, "screening"):
                    counts["upgraded"] += 1
    return counts


# --- the daily job ------------------------------------------------------------------------


def run_daily(ctx: JobContext) -> dict[str, int]:
    """Job ``tiers`` for ``ctx.day``: decided tiers take effect, anniversaries are reviewed, the inactive lapse."""
    counts = {"effective": _make_effective(ctx)}
    counts.update(_anniversaries(ctx))
    counts.update(_inactivity(ctx))
    return counts


def _make_effective(ctx: JobContext) -> int:
    """Every member whose next tier is due by ``ctx.day`` gets it as its tier (an ``effective`` row each)."""
    m = members.c
    done = 0
    after = ""
    while True:
        with ctx.db.transaction() as conn:
            due = select(m.member_id).where(m.next_tier_from <= ctx.day, m.member_id > after)
            ids = list(conn.execute(due.order_by(m.member_id).limit(CHUNK)).scalars())
            if not ids:
                return done
            state = _load(conn, ids, cards=False)
            for member_id in sorted(state):
                member = state[member_id]
                tier, since = member.next_tier, member.next_tier_from
                if tier is None or since is None or since > ctx.day:  # changed before the lock was taken
                    continue
                key = f"effective:{member_id}:{tier}:{since.isoformat()}"
                _history(
                    conn, key, member, "effective", (member.tier, tier), (since, ctx.day), f"{tier} in force", ctx.now
                )
                set_tier(
                    conn, member_id, tier, None, None, f"centre: {tier} in force from {since.isoformat()}", ctx.now
                )
                done += 1
            after = ids[-1]


def is_anniversary(since: dt.date, day: dt.date, tier_years: int) -> bool:
    """Whether ``day`` is a whole number of ``tier_years`` after ``since`` (29 February: the 28th in common years)."""
    years = day.year - since.year
    return since < day and years >= tier_years and years % tier_years == 0 and add_years(since, years) == day


def _anniversaries(ctx: JobContext) -> dict[str, int]:
    """Members whose tier year ended yesterday: kept (``retain``, a new tier year) or ``else_tier`` from tomorrow."""
    programme, day = ctx.programme, ctx.day
    rules: dict[str, Retention] = {}
    for rule in programme.centre.retention:
        rules.setdefault(rule.tier, rule)
    counts = {"anniversaries": 0, "retained": 0, "downgraded": 0}
    if not rules:
        return counts
    years = programme.centre.tier_years
    due: list[tuple[str, str, dt.date]] = []
    after = ""
    while True:
        with ctx.db.reading() as conn:
            chunk = _members_of(conn, rules, after, READ_CHUNK)
            if not chunk:
                break
            ids = [member_id for member_id, _ in chunk]
            reached = _reached(conn, ids, day)
            first = _first_days(conn, programme, [member_id for member_id in ids if member_id not in reached])
        for member_id, tier in chunk:
            since = reached.get(member_id) or first.get(member_id)
            if since is not None and is_anniversary(since, day, years):
                due.append((member_id, tier, max(since, add_years(day, -years))))
        after = ids[-1]
    counts["anniversaries"] = len(due)
    for part in _chunks(due):
        with ctx.db.transaction() as conn:
            kept, dropped = _review(conn, ctx, rules, part)
        counts["retained"] += kept
        counts["downgraded"] += dropped
    return counts


def _review(
    conn: Connection, ctx: JobContext, rules: Mapping[str, Retention], due: Sequence[tuple[str, str, dt.date]]
) -> tuple[int, int]:
    programme, day = ctx.programme, ctx.day
    last = day - dt.timedelta(days=1)
    state = _load(conn, [member_id for member_id, _, _ in due], cards=False)
    cancelled = _cancelled(conn, state)
    by_start: dict[dt.date, list[tuple[str, str]]] = defaultdict(list)
    for member_id, tier, start in due:
        member = state.get(member_id)
        if member is None or member_id in cancelled or member.tier != tier or member.next_tier is not None:
            continue  # changed since the read
        by_start[start].append((member_id, tier))
    kept = dropped = 0
    for start, group in sorted(by_start.items()):
        ids = [member_id for member_id, _ in group]
        points = points_earned(conn, programme, start, last, ids)
        spend_rules = any(rules[t].year_spend is not None or rules[t].year_visits is not None for _, t in group)
        days_of = member_days(conn, programme, start, last, ids) if spend_rules else {}
        length = (day - start).days
        for member_id, tier in group:
            rule, member = rules[tier], state[member_id]
            ev = Evidence(last, days_of.get(member_id) or MemberDays(), points.get(member_id, 0))
            why = retained(rule, ev, length)
            span = f"tier year {start.isoformat()}..{last.isoformat()}"
            if why is not None:
                kept += _retain(conn, ctx, member, f"{span}: {why}")
            else:
                dropped += _downgrade(conn, ctx, member, rule.else_tier, f"{span}: {_shortfall(rule, ev, length)}")
    return kept, dropped


def _shortfall(rule: Retention, ev: Evidence, length: int) -> str:
    """What the tier year fell short of, in words for the history."""
    parts: list[str] = []
    if rule.year_points is not None:
        parts.append(f"points {ev.year_points} < {rule.year_points}")
    if rule.year_spend is not None:
        parts.append(f"spend {format_fen(ev.days.spend_between(*ev.window(length)))} < {rule.year_spend}")
    if rule.year_visits is not None:
        parts.append(f"visits {ev.days.visits_between(*ev.window(length))} < {rule.year_visits}")
    return ", ".join(parts) or "no retention criterion"


def _retain(conn: Connection, ctx: JobContext, member: Member, why: str) -> int:
    day, tier = ctx.day, member.tier
    key = f"retain:{member.member_id}:{tier}:{day.isoformat()}"
    if not _history(conn, key, member, "retain", (tier, tier), (day, day), why, ctx.now):
        return 0
    detail = {"tier": tier, "decided_on": day.isoformat(), "why": why}
    _notify(
        conn,
        f"tier_retained:{member.member_id}:{tier}:{day.isoformat()}",
        member.member_id,
        "tier_retained",
        detail,
        ctx.now,
    )
    return 1


def _downgrade(
    conn: Connection, ctx: JobContext, member: Member, to_tier: str, why: str, *, prefix: str = "downgrade"
) -> int:
    """``to_tier`` from the day after ``ctx.day`` (the member keeps its tier through the day of the decision)."""
    day = ctx.day
    effective = day + dt.timedelta(days=1)
    key = f"{prefix}:{member.member_id}:{to_tier}:{day.isoformat()}"
    if not _history(conn, key, member, "downgrade", (member.tier, to_tier), (effective, day), why, ctx.now):
        return 0
    set_tier(
        conn,
        member.member_id,
        member.tier,
        to_tier,
        effective,
        f"centre: {to_tier} from {effective.isoformat()} ({why})",
        ctx.now,
    )
    detail = {
        "tier": to_tier,
        "from_tier": member.tier,
        "effective_from": effective.isoformat(),
        "decided_on": day.isoformat(),
        "why": why,
    }
    member.next_tier, member.next_tier_from = to_tier, effective
    _notify(
        conn,
        f"tier_downgraded:{member.member_id}:{to_tier}:{day.isoformat()}",
        member.member_id,
        "tier_downgraded",
        detail,
        ctx.now,
    )
    return 1


# --- inactivity ---------------------------------------------------------------------------


def _bought_since(conn: Connection, programme: Programme, first: dt.date) -> set[str]:
    """Members with a sale (their own, or a receipt claimed for them) on ``first`` or later: one scan each."""
    start = programme.day_start(first)
    s, c = sales.c, sale_claims.c
    found = set(
        conn.execute(select(s.member_id).where(s.member_id.is_not(None), s.at_utc >= start).distinct()).scalars()
    )
    claimed = select(c.member_id).join_from(sale_claims, sales, s.entry_id == c.entry_id).where(s.at_utc >= start)
    found.update(conn.execute(claimed.distinct()).scalars())
    return found


def _newest_cards(conn: Connection, ids: Sequence[str]) -> tuple[dict[str, dt.date], set[str]]:
    """Each member's newest card's first valid day, and the members holding an active card."""
    c = member_cards.c
    newest = dict(
        conn.execute(
            select(c.member_id, func.max(c.valid_from)).where(c.member_id.in_(ids)).group_by(c.member_id)
        ).all()
    )
    active = set(
        conn.execute(select(c.member_id).where(c.member_id.in_(ids), c.state == "active").distinct()).scalars()
    )
    return newest, active


def _inactivity(ctx: JobContext) -> dict[str, int]:
    """Members of each ``[[centre.inactivity]]`` rule's tiers without a purchase for its ``days``: its action."""
    counts = {"inactive_downgraded": 0, "terminated": 0}
    for rule in ctx.programme.centre.inactivity:
        cutoff = ctx.day - dt.timedelta(days=rule.days)  # quiet since before this day: ``days`` whole days without
        with ctx.db.reading() as conn:
            bought = _bought_since(conn, ctx.programme, cutoff)
        quiet: list[tuple[str, str]] = []
        after = ""
        while True:
            with ctx.db.reading() as conn:
                chunk = _members_of(conn, rule.tiers or None, after, READ_CHUNK)
                if not chunk:
                    break
                ids = [member_id for member_id, _ in chunk if member_id not in bought]
                reached = _reached(conn, ids, ctx.day) if ids else {}
                first = _first_days(conn, ctx.programme, ids)
                newest, active = _newest_cards(conn, ids) if ids else ({}, set())
            after = chunk[-1][0]
            for member_id, tier in chunk:
                if member_id in bought:
                    continue
                if rule.action == "terminate" and member_id not in active:
                    continue  # no card left to cancel: terminated already, or never given one
                marks = [d for d in (reached.get(member_id), first.get(member_id), newest.get(member_id)) if d]
                if marks and max(marks) >= cutoff:
                    continue
                quiet.append((member_id, tier))
        for part in _chunks(quiet):
            with ctx.db.transaction() as conn:
                done = _lapse(conn, ctx, rule, part)
            counts["terminated" if rule.action == "terminate" else "inactive_downgraded"] += done
    return counts


def _lapse(conn: Connection, ctx: JobContext, rule: Inactivity, quiet: Sequence[tuple[str, str]]) -> int:
    state = _load(conn, [member_id for member_id, _ in quiet])
    cancelled = _cancelled(conn, state)
    why = f"no purchase in the {rule.days} days before {ctx.day.isoformat()}"
    done = 0
    for member_id, tier in quiet:
        member = state.get(member_id)
        if member is None or member_id in cancelled or member.tier != tier or member.next_tier is not None:
            continue
        if rule.action == "downgrade":
            if rule.to_tier is not None and rule.to_tier != tier:
                done += _downgrade(conn, ctx, member, rule.to_tier, why, prefix="inactive")
            continue
        done += _terminate(conn, ctx, member, why)
    return done


def _terminate(conn: Connection, ctx: JobContext, member: Member, why: str) -> int:
    """Cancel the member's active cards now (the hot list has them at once); the profile and history stay."""
    day = ctx.day
    key = f"terminate:{member.member_id}:{day.isoformat()}"
    cards = sorted(h for h, card in member.cards.items() if card.state == "active")
    if not cards or not _history(conn, key, member, "terminate", (member.tier, None), (day, day), why, ctx.now):
        return 0
    for card_hash in cards:
        set_card_state(conn, card_hash, "cancelled", f"centre: membership terminated ({why})", ctx.now)
    detail = {"tier": member.tier, "decided_on": day.isoformat(), "cards": len(cards), "why": why}
    _notify(
        conn,
        f"membership_terminated:{member.member_id}:{day.isoformat()}",
        member.member_id,
        "membership_terminated",
        detail,
        ctx.now,
    )
    return 1
