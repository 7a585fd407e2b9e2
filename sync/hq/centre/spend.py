"""What members spent and earned, day by day in the programme's calendar (pure reads for tiers and rebates).

A member's spend on a day is the net of its sales that day (what it paid
after discounts), the receipts attached to it later (``sale_claims``) on the
day of the sale, less the refunds of its returns and voids on the day they
happened.  A visit is a day with at least one sale: two baskets at one visit
are one visit.  Points earned come from the ledger: lanes' ``earn`` rows,
claims, and neither redemptions nor returns (a return takes back points in
its own row, which ``points_net`` counts).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, select

from sync.hq.centre.programme import Programme
from sync.hq.schema import centre_ledger, points_ledger, returns, sale_claims, sales, voids

_CHUNK = 900  # members per IN (...) list: under SQLite's bound-parameter limit


@dataclass(slots=True)
class MemberDays:
    """One member's days: net spend in fen and whether it was a visit (a day with a sale)."""

    spend: dict[dt.date, int] = field(default_factory=lambda: defaultdict(int))
    visits: set[dt.date] = field(default_factory=set)

    def spend_between(self, first: dt.date, last: dt.date) -> int:
        return sum(fen for day, fen in self.spend.items() if first <= day <= last)

    def visits_between(self, first: dt.date, last: dt.date) -> int:
        return sum(1 for day in self.visits if first <= day <= last)


def _chunks(member_ids: Collection[str] | None) -> list[list[str] | None]:
    if member_ids is None:
        return [None]
    ids = sorted(set(member_ids))
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _only(query: Select[Any], column: ColumnElement[str], ids: list[str] | None) -> Select[Any]:
    return query if ids is None else query.where(column.in_(ids))


def member_days(
    conn: Connection, programme: Programme, first: dt.date, last: dt.date, member_ids: Collection[str] | None = None
) -> dict[str, MemberDays]:
    """Spend and visits of ``member_ids`` (None: every member) on the days ``first``..``last``."""
    start, end = programme.day_range(first, last)
    out: dict[str, MemberDays] = defaultdict(MemberDays)
    s, r, v, c = sales.c, returns.c, voids.c, sale_claims.c
    for ids in _chunks(member_ids):
        own = select(s.member_id, s.at_utc, s.net_fen).where(
            s.member_id.is_not(None), s.at_utc >= start, s.at_utc < end
        )
        claimed = (
            select(c.member_id, s.at_utc, s.net_fen)
            .join_from(sale_claims, sales, s.entry_id == c.entry_id)
            .where(s.at_utc >= start, s.at_utc < end)
        )
        for query in (_only(own, s.member_id, ids), _only(claimed, c.member_id, ids)):
            for member_id, at, fen in conn.execute(query):
                day = programme.local_date(at)
                days = out[member_id]
                days.spend[day] += int(fen)
                days.visits.add(day)
        refunds: list[Select[Any]] = [
            select(r.member_id, r.at_utc, r.refund_fen).where(
                r.member_id.is_not(None), r.at_utc >= start, r.at_utc < end
            ),
            select(v.member_id, v.at_utc, v.refund_fen).where(
                v.member_id.is_not(None), v.at_utc >= start, v.at_utc < end
            ),
        ]
        for query, column in zip(refunds, (r.member_id, v.member_id), strict=True):
            for member_id, at, fen in conn.execute(_only(query, column, ids)):
                out[member_id].spend[programme.local_date(at)] -= int(fen)
    return dict(out)


def points_earned(
    conn: Connection, programme: Programme, first: dt.date, last: dt.date, member_ids: Collection[str] | None = None
) -> dict[str, int]:
    """Points earned on ``first``..``last``: lanes' earn rows, less what returns and voids took back, plus claims."""
    start, end = programme.day_range(first, last)
    totals: dict[str, int] = defaultdict(int)
    p, cl = points_ledger.c, centre_ledger.c
    for ids in _chunks(member_ids):
        lane_rows = select(p.member_id, p.at_utc, p.points).where(
            p.kind.in_(("earn", "return")), p.at_utc >= start, p.at_utc < end
        )
        for member_id, _, points in conn.execute(_only(lane_rows, p.member_id, ids)):
            totals[member_id] += int(points)
        v = voids.c
        voided = select(v.member_id, v.at_utc, v.points_reversed).where(
            v.member_id.is_not(None), v.at_utc >= start, v.at_utc < end
        )
        for member_id, _, points in conn.execute(_only(voided, v.member_id, ids)):
            totals[member_id] -= int(points)
        claims = select(cl.member_id, cl.at_utc, cl.points).where(
            cl.kind == "claim", cl.on_date >= first, cl.on_date <= last
        )
        for member_id, _, points in conn.execute(_only(claims, cl.member_id, ids)):
            totals[member_id] += int(points)
    return dict(totals)
