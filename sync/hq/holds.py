"""Redemption holds at head office (docs/downlink.md, "Redemption holds"): take, release, expire, consume.

Before a lane lets a sale spend points, rebate money or a single-use coupon
it asks head office to hold them.  A hold is granted only from what is
available: the member's balance (``members``) less the unexpired holds of
other sales.  Holds of one member are taken one at a time: the member's row
is locked (``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite ``BEGIN
IMMEDIATE`` already excludes every other writer), so two lanes cannot both
hold the last 300 points.  A coupon is locked by its code
(``pg_advisory_xact_lock``) across members.

The sale's journal entry carries ``hold: {"id": …}`` (or ``{"offline":
true}``); when head office applies it (``settle_sales``, called by
``HqDatabase.apply_batch`` inside the batch's transaction, just before the
member balances move) the hold is consumed.  A sale that spent points or
rebate without a hold that covered it and left the member's balance below
zero is flagged ``overspend``; a single-use coupon used a second time is
flagged ``coupon_reuse`` (``spend_flags``).

Every function here takes the ``HqDatabase`` (or the batch's connection)
and runs on the database's owner thread (``sync.hq.owner``).  Expiry is by
time: a hold past ``expires_at`` no longer counts anywhere, whatever its
status says; ``held`` rows are marked ``expired`` lazily (when their member
is held again, when their id is asked for, and by ``expire_holds``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, and_, func, not_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from agent.money import format_fen
from sync.hq.facts import MAX_ID, Facts, SaleFacts, ledger_moves, storable
from sync.hq.schema import coupon_uses, holds, members, spend_flags
from sync.wire import Entry

if TYPE_CHECKING:
    from sync.hq.db import HqDatabase

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL's deadlock_detected and serialization_failure: the transaction is tried again.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_ATTEMPTS = 3
_COUPON_LOCK_CONTEXT = b"lane-hq coupon\n"

__all__ = [
    "Hold",
    "HoldRefused",
    "HoldRequest",
    "SaleSpend",
    "Taken",
    "expire_holds",
    "find_hold",
    "release_hold",
    "sale_spend",
    "settle_sales",
    "take_hold",
]


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """What a lane asks head office to hold for one sale (validated by ``sync.hq.holds_api``)."""

    hold_id: str
    store: str
    lane: str
    sale_id: str
    member_id: str | None
    points: int
    rebate_fen: int
    coupons: tuple[str, ...]  # sorted, each once


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold as stored."""

    hold_id: str
    store: str
    lane: str
    sale_id: str
    member_id: str | None
    points: int
    rebate_fen: int
    coupons: tuple[str, ...]
    status: str
    created_at: dt.datetime
    expires_at: dt.datetime
    consumed_entry_id: str | None

    def same_request(self, request: HoldRequest) -> bool:
        return (
            self.store,
            self.lane,
            self.sale_id,
            self.member_id,
            self.points,
            self.rebate_fen,
            self.coupons,
        ) == (
            request.store,
            request.lane,
            request.sale_id,
            request.member_id,
            request.points,
            request.rebate_fen,
            request.coupons,
        )

    def document(self) -> dict[str, Any]:
        """The API's answer: money as a decimal string, times in UTC."""
        return {
            "hold_id": self.hold_id,
            "status": self.status,
            "sale_id": self.sale_id,
            "member_id": self.member_id,
            "points": self.points,
            "rebate": format_fen(self.rebate_fen),
            "coupons": list(self.coupons),
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "consumed_entry_id": self.consumed_entry_id,
        }


@dataclass(frozen=True, slots=True)
class Taken:
    """A hold granted (or the same one asked for again: ``replayed``); ``expired``: holds marked expired meanwhile."""

    hold: Hold
    replayed: bool
    expired: int


class HoldRefused(Exception):  # noqa: N818 - an answer (409), not a failure of head office
    """Head office will not hold what was asked: ``code`` is the lane's reason (docs/downlink.md)."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# --- the lanes' requests ----------------------------------------------------------------------


def take_hold(db: HqDatabase, request: HoldRequest, *, hold_seconds: int, now: dt.datetime) -> Taken:
    """Hold ``request`` for ``hold_seconds``, or raise HoldRefused; committed on return.

    The same ``hold_id`` with the same request answers the hold as it is now
    (idempotent); with another request (or from another lane) it is
    ``hold_conflict``.
    """
    return _retrying(db, lambda conn: _take(conn, request, hold_seconds, now))


def release_hold(db: HqDatabase, store: str, lane: str, hold_id: str, now: dt.datetime) -> tuple[Hold, bool] | None:
    """Release a hold of this lane that is still held (its sale did not happen): ``(hold, released now)``.

    None: this lane has no such hold.  Releasing again, or releasing a hold
    that was consumed or expired, changes nothing and answers it as it is.
    """

    def release(conn: Connection) -> tuple[Hold, bool] | None:
        hold = _load(conn, hold_id, lock=True)
        if hold is None or (hold.store, hold.lane) != (store, lane):
            return None
        if hold.status != "held":
            return hold, False
        status = "expired" if hold.expires_at <= now else "released"
        conn.execute(update(holds).where(holds.c.hold_id == hold_id).values(status=status))
        changed = _load(conn, hold_id)
        assert changed is not None
        return changed, status == "released"

    return _retrying(db, release)


def find_hold(db: HqDatabase, hold_id: str) -> Hold | None:
    """A hold by id, as stored (for the tests and the administration)."""
    with db._engine.connect() as conn:  # noqa: SLF001 - this module is the database's own code, split off
        return _load(conn, hold_id)


def expire_holds(db: HqDatabase, now: dt.datetime) -> int:
    """Mark every hold past its time ``expired``; how many.  Its own short transaction, locking no member."""

    def expire(conn: Connection) -> int:
        c = holds.c
        result = conn.execute(update(holds).where(c.status == "held", c.expires_at <= now).values(status="expired"))
        return int(result.rowcount)

    return _retrying(db, expire)


def _retrying(db: HqDatabase, fn: Callable[[Connection], T]) -> T:
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            with _write(db) as conn:
                return fn(conn)
        except DBAPIError as exc:
            if attempt == _ATTEMPTS or getattr(exc.orig, "sqlstate", None) not in _RETRY_SQLSTATES:
                raise
            log.warning("hold transaction retried after %s", exc.orig)
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def _write(db: HqDatabase) -> Iterator[Connection]:
    with db._write() as conn:  # noqa: SLF001 - this module is the database's own code, split off
        yield conn


def _take(conn: Connection, request: HoldRequest, hold_seconds: int, now: dt.datetime) -> Taken:
    existing = _load(conn, request.hold_id)
    if existing is not None:
        return _again(conn, existing, request, now)
    expired = 0
    if request.member_id is not None:
        expired = _check_balances(conn, request, now)
    for code in request.coupons:
        _check_coupon(conn, request, code, now)
    insert = postgresql.insert(holds) if conn.dialect.name == "postgresql" else sqlite.insert(holds)
    taken = conn.execute(
        insert.values(
            hold_id=request.hold_id,
            store=request.store,
            lane=request.lane,
            sale_id=request.sale_id,
            member_id=request.member_id,
            points=request.points,
            rebate_fen=request.rebate_fen,
            coupons=_coupons_text(request.coupons),
            status="held",
            created_at=now,
            expires_at=now + dt.timedelta(seconds=hold_seconds),
        )
        .on_conflict_do_nothing(index_elements=[holds.c.hold_id])
        .returning(holds.c.hold_id)
    ).first()
    hold = _load(conn, request.hold_id)
    assert hold is not None
    if taken is None:  # the same id, asked twice at once: the other request's hold is the answer
        return _again(conn, hold, request, now)
    return Taken(hold, replayed=False, expired=expired)


def _again(conn: Connection, existing: Hold, request: HoldRequest, now: dt.datetime) -> Taken:
    """A hold id asked for again: the hold as it is now, or ``hold_conflict`` for another request."""
    if not existing.same_request(request):
        raise HoldRefused("hold_conflict", f"hold {request.hold_id} was taken before with another request", "hold_id")
    if existing.status == "held" and existing.expires_at <= now:
        conn.execute(update(holds).where(holds.c.hold_id == request.hold_id).values(status="expired"))
        lapsed = _load(conn, request.hold_id)
        assert lapsed is not None
        return Taken(lapsed, replayed=True, expired=1)
    return Taken(existing, replayed=True, expired=0)


def _check_balances(conn: Connection, request: HoldRequest, now: dt.datetime) -> int:
    """Lock the member, lapse their holds past time, and refuse what is not available; holds expired."""
    m, c = members.c, holds.c
    row = conn.execute(
        select(m.points_balance, m.rebate_fen).where(m.member_id == request.member_id).with_for_update()
    ).first()
    if row is None:
        raise HoldRefused("unknown_member", f"head office has no member {request.member_id!r}", "member_id")
    balance_points, balance_rebate = int(row[0]), int(row[1])
    # Safe to write here: this member's row is locked, and ingest locks members before their holds.
    lapsed = conn.execute(
        update(holds)
        .where(c.member_id == request.member_id, c.status == "held", c.expires_at <= now)
        .values(status="expired")
    )
    held_points, held_rebate = conn.execute(
        select(func.coalesce(func.sum(c.points), 0), func.coalesce(func.sum(c.rebate_fen), 0)).where(
            c.member_id == request.member_id, c.status == "held", c.expires_at > now, _other_sale(request)
        )
    ).one()
    points = balance_points - int(held_points)
    rebate = balance_rebate - int(held_rebate)
    if request.points > max(points, 0):
        raise HoldRefused(
            "insufficient_points",
            f"{request.points} points asked; head office has {max(points, 0)} available"
            f" (balance {balance_points}, held by other sales {int(held_points)})",
            "points",
        )
    if request.rebate_fen > max(rebate, 0):
        raise HoldRefused(
            "insufficient_rebate",
            f"{format_fen(request.rebate_fen)} rebate asked; head office has {format_fen(max(rebate, 0))} available"
            f" (balance {format_fen(balance_rebate)}, held by other sales {format_fen(int(held_rebate))})",
            "rebate",
        )
    return int(lapsed.rowcount)


def _check_coupon(conn: Connection, request: HoldRequest, code: str, now: dt.datetime) -> None:
    """Refuse a coupon used before or held by another sale right now (its code locked until the commit)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _coupon_lock(code)})
    used = conn.execute(select(coupon_uses.c.store, coupon_uses.c.lane).where(coupon_uses.c.code == code)).first()
    if used is not None:
        raise HoldRefused("coupon_used", f"coupon {code} was used already (at {used[0]}/{used[1]})", "coupons")
    c = holds.c
    # A first cut by text, then the exact check on the decoded list (LIKE is case-blind on SQLite).
    pattern = "%" + _like_escape(json.dumps(code, ensure_ascii=False)) + "%"
    candidates = conn.execute(
        select(c.coupons).where(
            c.status == "held",
            c.expires_at > now,
            c.coupons.like(pattern, escape="\\"),
            _other_sale(request),
        )
    ).scalars()
    if any(code in json.loads(coupons) for coupons in candidates):
        raise HoldRefused("coupon_held", f"coupon {code} is held by another sale right now", "coupons")


def _other_sale(request: HoldRequest) -> Any:
    c = holds.c
    return not_(and_(c.store == request.store, c.lane == request.lane, c.sale_id == request.sale_id))


def _coupon_lock(code: str) -> int:
    digest = hashlib.sha256(_COUPON_LOCK_CONTEXT + code.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _coupons_text(codes: Sequence[str]) -> str:
    return json.dumps(sorted(codes), ensure_ascii=False, separators=(",", ":"))


def _load(conn: Connection, hold_id: str, *, lock: bool = False) -> Hold | None:
    query = select(holds).where(holds.c.hold_id == hold_id)
    row = conn.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        return None
    return Hold(
        hold_id=row["hold_id"],
        store=row["store"],
        lane=row["lane"],
        sale_id=row["sale_id"],
        member_id=row["member_id"],
        points=int(row["points"]),
        rebate_fen=int(row["rebate_fen"]),
        coupons=tuple(json.loads(row["coupons"])),
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        consumed_entry_id=row["consumed_entry_id"],
    )


# --- at ingest: a sale's journal entry ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaleSpend:
    """What a sale's journal body says about its hold and the single-use coupons it used."""

    hold_id: str | None
    offline: bool
    coupons: tuple[str, ...]


def sale_spend(body: Mapping[str, Any]) -> SaleSpend:
    """The hold and coupon codes of a sale's body (pure).  Anything malformed counts as absent.

    The coupons are the codes of its ``coupon`` tenders (their ``subkind``):
    a coupon tender is a voucher used up at the till, a single-use coupon.
    """
    hold = body.get("hold")
    hold_id = None
    offline = False
    if isinstance(hold, Mapping):
        ident = hold.get("id")
        if isinstance(ident, str) and 0 < len(ident) <= MAX_ID and storable(ident):
            hold_id = ident
        offline = hold.get("offline") is True
    codes: list[str] = []
    result = body.get("result")
    tenders = result.get("tenders") if isinstance(result, Mapping) else None
    if isinstance(tenders, Sequence) and not isinstance(tenders, str):
        for tender in tenders:
            if not isinstance(tender, Mapping) or tender.get("kind") != "coupon":
                continue
            code = tender.get("subkind")
            if isinstance(code, str) and 0 < len(code) <= MAX_ID and storable(code) and code not in codes:
                codes.append(code)
    return SaleSpend(hold_id, offline, tuple(codes))


@dataclass(slots=True)
class _Sale:
    entry: Entry
    facts: SaleFacts
    spend: SaleSpend
    covered: bool = False
    hold: str = "none"  # how its hold looked at ingest, for a flag's detail


def settle_sales(
    conn: Connection, store: str, lane: str, applied: Sequence[tuple[Entry, Facts]], now: dt.datetime
) -> tuple[str, ...]:
    """Consume the holds of a batch's newly applied sales, record coupon uses, raise spend flags.

    Runs inside ``apply_batch``'s transaction, before the batch moves the
    members' balances (``sync.hq.members.apply_movements``), with the rows of
    every member the batch moves locked in id order as that does; returns
    the codes of the flags raised (for ``hq_spend_flags_total``).  A hold covers its sale when it belongs to
    that lane and sale and was still held and unexpired when the entry
    arrived; it is consumed whatever its state (released, expired), so that
    ``consumed_entry_id`` names the sale.
    """
    spending = _spending(applied)
    if not spending:
        return ()
    balances = _lock_members(conn, sorted({move.member_id for _, facts in applied for move in ledger_moves(facts)}))
    if conn.dialect.name == "postgresql":
        # Every coupon of the batch, in one order for every transaction (two batches cannot deadlock on them).
        for code in sorted({code for sale in spending.values() for code in sale.spend.coupons}):
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _coupon_lock(code)})
    for sale in spending.values():
        if sale.spend.hold_id is not None:
            _consume(conn, store, lane, sale, now)
    flags = [*_overspends(applied, spending, balances, now), *_coupon_reuses(conn, store, lane, spending, now)]
    for flag in flags:
        log.warning("%s/%s: spend flag %s on entry %s: %s", store, lane, flag["code"], flag["entry_id"], flag["detail"])
    if flags:
        conn.execute(spend_flags.insert(), flags)
    return tuple(flag["code"] for flag in flags)


def _spending(applied: Sequence[tuple[Entry, Facts]]) -> dict[int, _Sale]:
    """The batch's sales that spent something or name a hold, by their position in ``applied``."""
    spending: dict[int, _Sale] = {}
    for index, (entry, facts) in enumerate(applied):
        if isinstance(facts, SaleFacts):
            spend = sale_spend(entry.body)
            if facts.points_spent or facts.rebate_spent_fen or spend.coupons or spend.hold_id:
                spending[index] = _Sale(entry, facts, spend, hold="offline" if spend.offline else "none")
    return spending


def _overspends(
    applied: Sequence[tuple[Entry, Facts]],
    spending: Mapping[int, _Sale],
    balances: Mapping[str, tuple[int, int]],
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """Flags for uncovered sales that left their member below zero, walking the batch in seq order.

    ``balances`` are the members' before the batch; each entry's moves are
    added in turn, so a sale is judged by the balance it left.
    """
    running = dict(balances)
    flags = []
    for index, (_, facts) in enumerate(applied):
        for move in ledger_moves(facts):
            if move.member_id in running:
                points, rebate = running[move.member_id]
                running[move.member_id] = (points + move.points, rebate + move.rebate_fen)
        sale = spending.get(index)
        if sale is None or sale.covered or sale.facts.member_id not in running:
            continue
        points, rebate = running[sale.facts.member_id]
        if (sale.facts.points_spent and points < 0) or (sale.facts.rebate_spent_fen and rebate < 0):
            detail = {
                "sale_id": sale.facts.sale_id,
                "points_spent": sale.facts.points_spent,
                "rebate_spent": format_fen(sale.facts.rebate_spent_fen),
                "points_balance": points,
                "rebate_balance": format_fen(rebate),
                "hold": sale.hold,
            }
            flags.append(_flag(sale, "overspend", detail, now))
    return flags


def _coupon_reuses(
    conn: Connection, store: str, lane: str, spending: Mapping[int, _Sale], now: dt.datetime
) -> list[dict[str, Any]]:
    flags = []
    for sale in spending.values():
        for code in sale.spend.coupons:
            first = _use_coupon(conn, store, lane, sale, code)
            if first is not None:
                detail = {"sale_id": sale.facts.sale_id, "code": code, "first_entry_id": first, "hold": sale.hold}
                flags.append(_flag(sale, "coupon_reuse", detail, now))
    return flags


def _lock_members(conn: Connection, member_ids: list[str]) -> dict[str, tuple[int, int]]:
    """The members' balances, their rows locked in id order (as ``apply_movements`` locks them next)."""
    if not member_ids:
        return {}
    m = members.c
    rows = conn.execute(
        select(m.member_id, m.points_balance, m.rebate_fen)
        .where(m.member_id.in_(member_ids))
        .order_by(m.member_id)
        .with_for_update()
    ).all()
    return {member_id: (int(points), int(rebate)) for member_id, points, rebate in rows}


def _consume(conn: Connection, store: str, lane: str, sale: _Sale, now: dt.datetime) -> None:
    assert sale.spend.hold_id is not None
    hold = _load(conn, sale.spend.hold_id, lock=True)
    if hold is None:
        sale.hold = "unknown"
        log.warning(
            "%s/%s: sale %s names hold %s, which head office never gave",
            store,
            lane,
            sale.facts.sale_id,
            sale.spend.hold_id,
        )
        return
    if (hold.store, hold.lane, hold.sale_id) != (store, lane, sale.facts.sale_id) or hold.status == "consumed":
        sale.hold = "mismatch"
        log.warning(
            "%s/%s: sale %s names hold %s of %s/%s sale %s (%s): not consumed",
            store,
            lane,
            sale.facts.sale_id,
            hold.hold_id,
            hold.store,
            hold.lane,
            hold.sale_id,
            hold.status,
        )
        return
    sale.covered = hold.status == "held" and hold.expires_at > now
    sale.hold = "held" if sale.covered else ("expired" if hold.status == "held" else hold.status)
    conn.execute(
        update(holds).where(holds.c.hold_id == hold.hold_id).values(status="consumed", consumed_entry_id=sale.entry.id)
    )


def _use_coupon(conn: Connection, store: str, lane: str, sale: _Sale, code: str) -> str | None:
    """Record the coupon's use by this sale; None, or the entry that used it first."""
    c = coupon_uses.c
    insert = postgresql.insert(coupon_uses) if conn.dialect.name == "postgresql" else sqlite.insert(coupon_uses)
    taken = conn.execute(
        insert.values(code=code, entry_id=sale.entry.id, store=store, lane=lane, at=sale.entry.at)
        .on_conflict_do_nothing(index_elements=[c.code])
        .returning(c.code)
    ).first()
    if taken is not None:
        return None
    first = conn.execute(select(c.entry_id).where(c.code == code)).scalar_one()
    return None if first == sale.entry.id else str(first)


def _flag(sale: _Sale, code: str, detail: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    return {
        "entry_id": sale.entry.id,
        "member_id": sale.facts.member_id,
        "code": code,
        "detail": json.dumps(detail, ensure_ascii=False, separators=(",", ":")),
        "at": now,
    }
