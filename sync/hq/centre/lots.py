"""A member's points ledger as one view, and its expiry lots (docs/member-centre.md "The points ledger").

The ledger is two append-only tables: ``points_ledger`` (what lanes' journal
entries moved, keyed by entry) and ``centre_ledger`` (what head office moved:
adjustments, claims, imports, expiry, rebates, keyed by a movement key).  A
balance is their sum; nothing else is kept.  Expiry lots are *derived*: there
is no lot table to keep in step with the ledger, so a lot can never disagree
with the rows it comes from, and a new policy (or a corrected one) applies to
history as it stands.

Replaying a member's rows in order (``lots``):

- every positive points movement (``earn``, ``claim``, a positive
  ``adjust`` or ``import``, a ``void`` that gives back more than it takes) is
  a lot, expiring by the programme's ``[centre.expiry]`` policy;
- every negative one (``redeem``, ``return``, a ``void`` that takes back,
  a negative ``adjust`` or ``import``, ``expire``) consumes lots
  soonest-expiring first -- an ``expire`` row first the lots of the date it
  names (its ``ref``);
- what a negative movement finds no lot for (a lane spent offline beyond the
  balance) is a deficit, which the next lots pay first.  So the lots left
  always add up to the balance when it is positive, and to nothing otherwise.

Order: by the programme-local day, an ``expire`` row first on its day (points
that lapse on day D lapse as D begins: they were valid through the day
before), then by the time the row was written (a sale's ``earn`` row before
its ``redeem`` row: the kinds' names in order).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, func, literal, select, union_all

from sync.hq.centre.programme import Programme, add_months
from sync.hq.members import Card
from sync.hq.schema import centre_ledger, members, points_ledger

_CHUNK = 900  # members per IN (...) list: under SQLite's bound-parameter limit


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One movement of a member's balances, from either ledger."""

    day: dt.date  # the programme-local business day it belongs to
    at: dt.datetime  # when it happened (lanes' rows) or was recorded (head office's), UTC
    kind: str  # points_ledger: earn, redeem, rebate_spend, return, void; centre_ledger: adjust, claim, …
    points: int
    rebate_fen: int
    source: str  # the journal entry id (a lane's row) or the centre-ledger key
    lane: bool  # True: from points_ledger
    ref: str | None = None  # centre_ledger.ref: an expire row's lapsed date, a claim's entry id, …

    def order(self) -> tuple[dt.date, int, dt.datetime, str, str]:
        return (self.day, 0 if self.kind == "expire" else 1, self.at, self.source, self.kind)


@dataclass(frozen=True, slots=True)
class Lot:
    """Points earned together, with the date they are valid through (None: they never lapse)."""

    earned: dt.date
    expires: dt.date | None
    points: int  # as earned
    remaining: int
    source: str  # the row it came from


@dataclass(frozen=True, slots=True)
class Balances:
    points: int
    rebate_fen: int


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Both ledgers summed against the members' balances (``ledger_totals``)."""

    members: int
    ledger_points: int  # over the members in the member table
    ledger_rebate_fen: int
    balance_points: int  # sum of members.points_balance
    balance_rebate_fen: int
    mismatched: int  # members whose own ledger sum is not their balance
    unknown_points: int  # lanes' rows for members head office's member table does not hold
    unknown_rebate_fen: int

    @property
    def balanced(self) -> bool:
        return (
            self.mismatched == 0
            and self.ledger_points == self.balance_points
            and self.ledger_rebate_fen == self.balance_rebate_fen
        )


# --- reading the ledger ----------------------------------------------------------------


def _lane_day(at: str, at_utc: dt.datetime, tz: dt.tzinfo | None) -> dt.date:
    # Without a zone, the lane's own local date (``at`` carries the lane's offset).
    return at_utc.astimezone(tz).date() if tz is not None else dt.datetime.fromisoformat(at).date()


def ledger_rows_of(
    conn: Connection, member_ids: Collection[str], *, tz: dt.tzinfo | None = None
) -> dict[str, list[LedgerRow]]:
    """Every ledger row of ``member_ids``, per member, in ledger order (see the module docstring).

    ``tz``: the programme's zone, which dates lanes' rows (default: the lane's own date of each).
    """
    found: dict[str, list[LedgerRow]] = {member_id: [] for member_id in member_ids}
    ids = sorted(found)
    p, c = points_ledger.c, centre_ledger.c
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        lane_query = select(p.member_id, p.entry_id, p.kind, p.points, p.rebate_fen, p.at, p.at_utc).where(
            p.member_id.in_(chunk)
        )
        for member_id, entry_id, kind, points, rebate, at, at_utc in conn.execute(lane_query):
            found[member_id].append(
                LedgerRow(_lane_day(at, at_utc, tz), at_utc, kind, int(points), int(rebate), entry_id, lane=True)
            )
        centre_query = select(c.member_id, c.key, c.kind, c.points, c.rebate_fen, c.on_date, c.at_utc, c.ref).where(
            c.member_id.in_(chunk)
        )
        for member_id, key, kind, points, rebate, on_date, at_utc, ref in conn.execute(centre_query):
            found[member_id].append(
                LedgerRow(on_date, at_utc, kind, int(points), int(rebate), key, lane=False, ref=ref)
            )
    for rows in found.values():
        rows.sort(key=LedgerRow.order)
    return found


def ledger_rows(conn: Connection, member_id: str, *, tz: dt.tzinfo | None = None) -> list[LedgerRow]:
    """The member's whole ledger (points_ledger ∪ centre_ledger) in ledger order."""
    return ledger_rows_of(conn, [member_id], tz=tz)[member_id]


def balances(conn: Connection, member_id: str) -> Balances:
    """What the member's ledger adds up to: equals ``members.points_balance`` / ``rebate_fen``."""
    total_points = total_rebate = 0
    for table in (points_ledger, centre_ledger):
        query = select(func.coalesce(func.sum(table.c.points), 0), func.coalesce(func.sum(table.c.rebate_fen), 0))
        points, rebate = conn.execute(query.where(table.c.member_id == member_id)).one()
        total_points += int(points)
        total_rebate += int(rebate)
    return Balances(total_points, total_rebate)


def ledger_totals(conn: Connection) -> LedgerTotals:
    """Both ledgers per member against the member table: the reconciliation of the whole ledger."""
    p, c, m = points_ledger.c, centre_ledger.c, members.c
    moved = union_all(
        select(p.member_id.label("member_id"), p.points.label("points"), p.rebate_fen.label("rebate_fen")),
        select(c.member_id, c.points, c.rebate_fen),
    ).subquery()
    sums = (
        select(
            moved.c.member_id,
            func.sum(moved.c.points).label("points"),
            func.sum(moved.c.rebate_fen).label("rebate_fen"),
        )
        .group_by(moved.c.member_id)
        .subquery()
    )
    zero = literal(0)
    ledger_points = func.coalesce(sums.c.points, zero)
    ledger_rebate = func.coalesce(sums.c.rebate_fen, zero)
    known = select(
        func.count(),
        func.coalesce(func.sum(ledger_points), zero),
        func.coalesce(func.sum(ledger_rebate), zero),
        func.coalesce(func.sum(m.points_balance), zero),
        func.coalesce(func.sum(m.rebate_fen), zero),
        func.count().filter((ledger_points != m.points_balance) | (ledger_rebate != m.rebate_fen)),
    ).select_from(members.outerjoin(sums, sums.c.member_id == m.member_id))
    count, lp, lr, bp, br, mismatched = conn.execute(known).one()
    unknown = select(func.coalesce(func.sum(sums.c.points), zero), func.coalesce(func.sum(sums.c.rebate_fen), zero))
    unknown = unknown.where(sums.c.member_id.not_in(select(m.member_id)))
    up, ur = conn.execute(unknown).one()
    return LedgerTotals(int(count), int(lp), int(lr), int(bp), int(br), int(mismatched), int(up), int(ur))


# --- expiry lots (pure) ------------------------------------------------------------------


def validity_end(cards: Iterable[Card]) -> dt.date | None:
    """The member's card validity end: the latest ``valid_until`` of its cards; None when one has none (or none).

    A renewal or replacement card valid longer extends it: the points move with the card.
    """
    ends = [card.valid_until for card in cards]
    if not ends or any(end is None for end in ends):
        return None
    return max(end for end in ends if end is not None)


def expiry_date(programme: Programme, earned: dt.date, card_valid_until: dt.date | None) -> dt.date | None:
    """The last day points earned on ``earned`` are valid (None: they never lapse)."""
    expiry = programme.centre.expiry
    if expiry.policy == "rolling":
        return add_months(earned, expiry.months)
    if expiry.policy == "year_end":
        return dt.date(earned.year + expiry.years_after, 12, 31)
    if expiry.policy == "card_validity":
        return card_valid_until
    return None


def lapse_cutoff(programme: Programme, day: dt.date) -> dt.date | None:
    """The last earning day whose points have lapsed by ``day`` (rolling and year_end); None for other policies.

    Expiry dates grow with the earning day, so "lapsed before ``day``" is
    "earned on this day or before": what lets the expiry job rule members out in SQL.
    """
    expiry = programme.centre.expiry
    if expiry.policy == "year_end":
        return dt.date(day.year - 1 - expiry.years_after, 12, 31)
    if expiry.policy != "rolling":
        return None
    one = dt.timedelta(days=1)
    cutoff = add_months(day, -expiry.months)
    while add_months(cutoff, expiry.months) >= day:
        cutoff -= one
    while add_months(cutoff + one, expiry.months) < day:
        cutoff += one
    return cutoff


@dataclass(slots=True)
class _Open:
    earned: dt.date
    expires: dt.date | None
    points: int
    remaining: int
    source: str
    seq: int
    sort: tuple[int, dt.date, dt.date, int] = field(init=False)

    def __post_init__(self) -> None:
        # Soonest-expiring first; lots that never lapse last; then oldest first.
        never = self.expires is None
        self.sort = (1 if never else 0, self.expires or dt.date.max, self.earned, self.seq)


def _ref_date(ref: str | None) -> dt.date | None:
    try:
        return None if ref is None else dt.date.fromisoformat(ref)
    except ValueError:
        return None


def _consume(open_lots: list[_Open], need: int, only: dt.date | None = None) -> int:
    """Take ``need`` points from the open lots in order (``only``: from those expiring on that date); what is left."""
    for lot in open_lots:
        if need == 0:
            break
        if only is not None and lot.expires != only:
            continue
        taken = min(lot.remaining, need)
        lot.remaining -= taken
        need -= taken
    return need


def lots(programme: Programme, rows: Sequence[LedgerRow], card_valid_until: dt.date | None) -> list[Lot]:
    """The member's lots with points remaining, soonest-expiring first (pure; see the module docstring)."""
    open_lots: list[_Open] = []
    deficit = 0
    for seq, row in enumerate(sorted(rows, key=LedgerRow.order)):
        if row.points > 0:
            paid = min(row.points, deficit)
            deficit -= paid
            if row.points > paid:
                lot = _Open(
                    row.day,
                    expiry_date(programme, row.day, card_valid_until),
                    row.points,
                    row.points - paid,
                    row.source,
                    seq,
                )
                bisect.insort(open_lots, lot, key=lambda each: each.sort)
        elif row.points < 0:
            need = -row.points
            if row.kind == "expire":
                need = _consume(open_lots, need, _ref_date(row.ref))
            deficit += _consume(open_lots, need)
            open_lots = [lot for lot in open_lots if lot.remaining]
    return [Lot(lot.earned, lot.expires, lot.points, lot.remaining, lot.source) for lot in open_lots if lot.remaining]
