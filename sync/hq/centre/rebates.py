"""Rebate money (返利金) settled on the programme's dates (docs/member-centre.md "Rebates").

Seed 004 (888 mall): "一年中分4次返利金结算时段，分别为3月10日，6月10日，9月10日，
12 月10 日，每年这些时间段按卡内消费额的2%结算返利金" -- four settlements a year,
on 10 March, June, September and December, of 2% of the card's spend.

The period.  The seed names settlement *dates* and calls what lies between
them the settlement periods ("结算时段"); it does not say where a period
starts.  We take the periods to tile the year with no gap and no overlap:
the settlement on date D covers the card's spend from the previous
settlement date (the previous configured date, last year's for the first
date of a year: 10 December before 10 March) to the day before D, both
included.  The settlement day itself belongs to the next period, because the
job runs for D when D begins (its sales are not in yet), in line with every
other job here: a day is settled once it is over.  So 10 December settles
10 September .. 9 December, and 10 March settles 10 December .. 9 March.

The money: ``rate`` × the member's net card spend in the period
(``spend.member_days``: its sales, the receipts attached to it later, less
the refunds of returns and voids in the period), floored to whole fen,
credited as a ``rebate_credit`` centre-ledger movement keyed
``rebate:{D}:{member}`` (``members.record_movements``: the new rebate
balance reaches the lanes through the member change log, usable only at the
till), with a notification for the member.  Who takes part: members whose
tier on D (the next tier when it takes effect by D) is among
``[centre.rebate] tiers`` (empty: every tier), and not a cancelled member.
A return after the settlement of a sale settled before does not take the
rebate back: it reduces the spend of the period it falls in.

On a day that is not a settlement date the job does nothing (``due`` 0 in
its summary).  Running it again for the same day finds every key taken.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, case, select
from sqlalchemy.dialects import postgresql, sqlite

from agent.money import format_fen, format_rate
from sync.hq.centre.programme import JobContext, Programme
from sync.hq.centre.spend import member_days
from sync.hq.members import Movement, record_movements
from sync.hq.schema import member_profiles, members, notifications

log = logging.getLogger(__name__)

CHUNK = 500  # members per transaction
RATE_ONE = 10_000  # agent.money.parse_rate's fixed point


def _on(year: int, month_day: str) -> dt.date | None:
    month, day = (int(part) for part in month_day.split("-"))
    try:
        return dt.date(year, month, day)
    except ValueError:  # 02-29 in a common year: no settlement that year
        return None


def is_settlement_day(programme: Programme, day: dt.date) -> bool:
    rebate = programme.centre.rebate
    return rebate is not None and f"{day:%m-%d}" in rebate.dates


def period(programme: Programme, day: dt.date) -> tuple[dt.date, dt.date]:
    """The days the settlement on ``day`` covers: from the previous settlement date to the day before ``day``."""
    rebate = programme.centre.rebate
    if rebate is None:
        raise ValueError("the programme has no [centre.rebate]")
    earlier = [
        date
        for year in (day.year - 1, day.year)
        for month_day in rebate.dates
        if (date := _on(year, month_day)) is not None and date < day
    ]
    return max(earlier), day - dt.timedelta(days=1)


def eligible(conn: Connection, programme: Programme, day: dt.date) -> list[str]:
    """Members taking part on ``day``: their tier on that day is a rebate tier; cancelled members are not."""
    rebate = programme.centre.rebate
    assert rebate is not None
    m, p = members.c, member_profiles.c
    tier_on = case((m.next_tier_from.is_not(None) & (m.next_tier_from <= day), m.next_tier), else_=m.tier)
    cancelled = select(p.member_id).where(p.status == "cancelled")
    query = select(m.member_id).where(m.member_id.not_in(cancelled)).order_by(m.member_id)
    if rebate.tiers:
        query = query.where(tier_on.in_(rebate.tiers))
    return [member_id for (member_id,) in conn.execute(query)]


def _notify(conn: Connection, rows: list[dict[str, object]]) -> None:
    if rows:
        insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(notifications)
        conn.execute(insert.on_conflict_do_nothing(index_elements=[notifications.c.key]), rows)


def _credit(ctx: JobContext, moves: Sequence[Movement], spend: Mapping[str, int]) -> list[Movement]:
    with ctx.db.transaction() as conn:
        written = record_movements(conn, moves, ctx.now, allow_negative=False)
        _notify(
            conn,
            [
                {
                    "key": move.key,
                    "member_id": move.member_id,
                    "kind": "rebate_credited",
                    "detail": json.dumps(
                        {
                            "rebate": format_fen(move.rebate_fen),
                            "spend": format_fen(spend[move.member_id]),
                            "period": move.ref,
                            "day": ctx.day.isoformat(),
                        },
                        sort_keys=True,
                    ),
                    "created_at": ctx.now,
                    "sent_at": None,
                }
                for move in written
            ],
        )
    return written


def run(ctx: JobContext) -> Mapping[str, int]:
    """The rebate settlement for ``ctx.day``: ``due`` 0 on other days; members credited, fen, spend settled."""
    programme, day = ctx.programme, ctx.day
    rebate = programme.centre.rebate
    summary = {"due": 0, "eligible": 0, "members": 0, "rebate_fen": 0, "spend_fen": 0}
    if rebate is None or not is_settlement_day(programme, day):
        log.info("rebates %s: not a settlement date; nothing to do", day)
        return summary
    rate = programme.rebate_rate()
    assert rate is not None
    first, last = period(programme, day)
    with ctx.db.reading() as conn:
        ids = eligible(conn, programme, day)
        days = member_days(conn, programme, first, last)  # one pass over the period for every member
    spend = {member_id: sum(days[member_id].spend.values()) for member_id in ids if member_id in days}
    moves = [
        Movement(
            key=f"rebate:{day.isoformat()}:{member_id}",
            member_id=member_id,
            kind="rebate_credit",
            points=0,
            rebate_fen=fen * rate // RATE_ONE,
            on_date=day,
            actor=ctx.actor,
            reason=f"rebate {format_rate(rate)} of card spend {format_fen(fen)} from {first} to {last}",
            ref=f"{first.isoformat()}..{last.isoformat()}",
        )
        for member_id, fen in sorted(spend.items())
        if fen * rate // RATE_ONE > 0
    ]
    summary.update(due=1, eligible=len(ids))
    for start in range(0, len(moves), CHUNK):
        for move in _credit(ctx, moves[start : start + CHUNK], spend):
            summary["members"] += 1
            summary["rebate_fen"] += move.rebate_fen
            summary["spend_fen"] += spend[move.member_id]
    log.info(
        "rebates %s (%s..%s): %s to %d members", day, first, last, format_fen(summary["rebate_fen"]), summary["members"]
    )
    return summary
