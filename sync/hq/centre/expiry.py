"""Points expiry: the lots valid through a day before the job's day lapse (docs/member-centre.md "Expiry").

For the day D, every lot (``sync.hq.centre.lots``) whose expiry date is
before D and has points left lapses: one ``expire`` movement per member and
expiry date, keyed ``expire:{expiry date}:{member}``, dated D, through
``members.record_movements`` (so the new balance reaches the lanes), and a
notification for the member.  Never more than the member's balance: a
member whose lanes spent offline beyond it keeps a balance of zero, not a
negative one.

Idempotent by construction: the lots are derived from the ledger, so after
a run the lapsed lots have nothing left and a second run (or a run for an
earlier day) finds nothing; and where it would find something again (a
lapse capped by the balance), the movement's key is taken.

Members are picked in SQL, not by loading every history: under ``rolling``
and ``year_end`` lots lapse in the order they were earned, and the lots
earned up to the cutoff day (``lots.lapse_cutoff``) have points left exactly
when what was earned up to then exceeds everything ever taken (negative
movements always consume those lots first); under ``card_validity`` only
members whose every card's validity ended before D can have lapsed points.
The candidates' ledgers are then replayed ``CHUNK`` members per transaction,
with their member rows locked, so that ingest of their sales waits (or
comes after) and the balance read is the one moved.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, Select, func, literal, select, union_all
from sqlalchemy.dialects import postgresql, sqlite

from sync.hq.centre.lots import lapse_cutoff, ledger_rows_of, lots, validity_end
from sync.hq.centre.programme import JobContext, Programme
from sync.hq.members import Movement, _load, record_movements
from sync.hq.schema import centre_ledger, member_cards, members, notifications, points_ledger

log = logging.getLogger(__name__)

CHUNK = 500  # members per transaction


def _aged_candidates(programme: Programme, cutoff: dt.date) -> Select[str]:
    """Members with a positive balance whose points earned up to ``cutoff`` are not all taken by now."""
    p, c, m = points_ledger.c, centre_ledger.c, members.c
    before = programme.day_start(cutoff + dt.timedelta(days=1))
    zero = literal(0)
    lane = select(
        p.member_id.label("member_id"),
        func.sum(p.points).filter((p.points > 0) & (p.at_utc < before)).label("old"),
        func.sum(-p.points).filter(p.points < 0).label("taken"),
    ).group_by(p.member_id)
    centre = select(
        c.member_id,
        func.sum(c.points).filter((c.points > 0) & (c.on_date <= cutoff)),
        func.sum(-c.points).filter(c.points < 0),
    ).group_by(c.member_id)
    both = union_all(lane, centre).subquery()
    old, taken = func.coalesce(func.sum(both.c.old), zero), func.coalesce(func.sum(both.c.taken), zero)
    per_member = select(both.c.member_id).group_by(both.c.member_id).having(old > taken).subquery()
    return (
        select(m.member_id)
        .join(per_member, per_member.c.member_id == m.member_id)
        .where(m.points_balance > 0)
        .order_by(m.member_id)
    )


def _card_candidates(day: dt.date) -> Select[str]:
    """Members with a positive balance all of whose cards' validity ended before ``day``."""
    m, k = members.c, member_cards.c
    ended = (
        select(k.member_id)
        .group_by(k.member_id)
        .having((func.count(k.valid_until) == func.count()) & (func.max(k.valid_until) < day))
    )
    return select(m.member_id).where(m.points_balance > 0, m.member_id.in_(ended)).order_by(m.member_id)


def candidates(conn: Connection, programme: Programme, day: dt.date) -> list[str]:
    """The members who may have points lapsing before ``day``, in member_id order (a superset, small)."""
    policy = programme.centre.expiry.policy
    if policy == "card_validity":
        query = _card_candidates(day)
    else:
        cutoff = lapse_cutoff(programme, day)
        if cutoff is None:
            return []
        query = _aged_candidates(programme, cutoff)
    return list(conn.execute(query).scalars())


def _insert_notifications(conn: Connection, rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(notifications)
    conn.execute(insert.on_conflict_do_nothing(index_elements=[notifications.c.key]), rows)


def _chunk(ctx: JobContext, member_ids: Sequence[str]) -> tuple[int, int, int]:
    """Lapse the lots of ``member_ids`` in one transaction; ``(members, lots, points)`` written."""
    day, programme = ctx.day, ctx.programme
    moves: list[Movement] = []
    lot_counts: dict[str, int] = {}
    with ctx.db.transaction() as conn:
        state = _load(conn, member_ids)  # locks the rows: the balance read is the one the movements move
        history = ledger_rows_of(conn, list(state), tz=programme.tz)
        for member_id, member in state.items():
            lapsed: dict[dt.date, list[int]] = defaultdict(list)
            for lot in lots(programme, history[member_id], validity_end(member.cards.values())):
                if lot.expires is not None and lot.expires < day:
                    lapsed[lot.expires].append(lot.remaining)
            balance = member.points_balance
            for expires in sorted(lapsed):
                points = min(sum(lapsed[expires]), balance)
                if points <= 0:
                    break
                balance -= points
                key = f"expire:{expires.isoformat()}:{member_id}"
                lot_counts[key] = len(lapsed[expires])
                moves.append(
                    Movement(
                        key=key,
                        member_id=member_id,
                        kind="expire",
                        points=-points,
                        rebate_fen=0,
                        on_date=day,
                        actor=ctx.actor,
                        reason=f"points valid through {expires.isoformat()} lapsed",
                        ref=expires.isoformat(),
                    )
                )
        written = record_movements(conn, moves, ctx.now, allow_negative=False)
        _insert_notifications(
            conn,
            [
                {
                    "key": f"expired:{move.ref}:{move.member_id}",
                    "member_id": move.member_id,
                    "kind": "points_expired",
                    "detail": json.dumps(
                        {"points": -move.points, "valid_through": move.ref, "day": day.isoformat()}, sort_keys=True
                    ),
                    "created_at": ctx.now,
                    "sent_at": None,
                }
                for move in written
            ],
        )
    return (
        len({move.member_id for move in written}),
        sum(lot_counts[move.key] for move in written),
        sum(-move.points for move in written),
    )


def run(ctx: JobContext) -> Mapping[str, int]:
    """The expiry job for ``ctx.day``: what lapsed (members, lots, points) and how many members were looked at."""
    with ctx.db.reading() as conn:
        found = candidates(conn, ctx.programme, ctx.day)
    total = {"candidates": len(found), "members": 0, "lots": 0, "points": 0}
    for start in range(0, len(found), CHUNK):
        done = _chunk(ctx, found[start : start + CHUNK])
        for key, value in zip(("members", "lots", "points"), done, strict=True):
            total[key] += value
    if total["points"]:
        log.info("expiry %s: %d points of %d members lapsed", ctx.day, total["points"], total["members"])
    return total
