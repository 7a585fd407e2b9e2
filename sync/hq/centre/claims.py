"""Receipts of guest sales and late point claims (补积分) at the service desk (docs/member-centre.md).

A member who forgot the card brings the receipt: a sale the lane journaled
for a guest (``sales.member_id`` NULL), named by its journal entry id or by
store, lane and sale id.  Within ``[centre] claim_window_days`` of the sale's
local date (0: the same day) the receipt is attached to the member
(``sale_claims``; from then on it counts as the member's spend) and the
member gets the points the sale would have earned with the card: the sale's
journal body re-priced with the engine, the ruleset version the lane
reported and the member as head office has it now.  Only the points: the
discount was not given and is not given now.  The points are one
centre-ledger ``claim`` movement keyed ``claim:{entry_id}``, so a receipt is
claimed once, by one member.

Registration uses the same receipts (``guest_sale``) to qualify a new member.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from agent.basket import Member as PricedMember
from agent.basket import Tender
from agent.engine import price
from agent.errors import InputError, TenderError
from agent.money import allocate
from agent.pos_models import SaleIn
from agent.store import json_text
from sync.hq.audit import RulesetLibrary
from sync.hq.centre.programme import Programme
from sync.hq.members import Member, MemberError, Movement, _load, record_movements
from sync.hq.schema import journal_entries, member_profiles, returns, sale_claims, sales, voids


@dataclass(frozen=True, slots=True)
class Receipt:
    """A receipt as the desk names it: its journal entry id, or the store, lane and sale id printed on it."""

    entry_id: str | None = None
    store: str | None = None
    lane: str | None = None
    sale_id: str | None = None

    def __post_init__(self) -> None:
        given = [part is not None for part in (self.store, self.lane, self.sale_id)]
        by_id, by_position = self.entry_id is not None and not any(given), self.entry_id is None and all(given)
        if not (by_id or by_position):
            raise MemberError("bad_receipt", "name a receipt by its entry id, or by store, lane and sale id")

    def describe(self) -> str:
        return f"entry {self.entry_id}" if self.entry_id else f"sale {self.store}/{self.lane}/{self.sale_id}"


@dataclass(frozen=True, slots=True)
class GuestSale:
    """A guest's sale that no member holds yet; ``at`` as the lane sent it (with its offset)."""

    entry_id: str
    store: str
    lane: str
    sale_id: str
    at: dt.datetime
    at_utc: dt.datetime
    net_fen: int
    body: dict[str, Any]

    def describe(self) -> str:
        return f"sale {self.store}/{self.lane}/{self.sale_id}"


def guest_sale(conn: Connection, receipt: Receipt) -> GuestSale:
    """The guest sale ``receipt`` names; MemberError when there is none or it cannot be given to a member.

    Codes: ``receipt_unknown``, ``receipt_ambiguous`` (a sale id journaled
    twice: give the entry id), ``receipt_has_member``, ``already_claimed``,
    ``receipt_voided``, ``receipt_returned`` (its goods came back: the
    points a claim would give are no longer earned).
    """
    s, j = sales.c, journal_entries.c
    query = select(s.entry_id, s.store, s.lane, s.sale_id, s.member_id, j.at, s.at_utc, s.net_fen, j.body).join_from(
        sales, journal_entries, j.id == s.entry_id
    )
    if receipt.entry_id is not None:
        query = query.where(s.entry_id == receipt.entry_id)
    else:
        query = query.where(s.store == receipt.store, s.lane == receipt.lane, s.sale_id == receipt.sale_id)
    found = conn.execute(query.limit(2)).all()
    if not found:
        raise MemberError("receipt_unknown", f"{receipt.describe()} is not in head office's journal")
    if len(found) > 1:
        raise MemberError("receipt_ambiguous", f"{receipt.describe()} was journaled twice: give its entry id")
    row = found[0]
    sale = GuestSale(
        entry_id=row.entry_id,
        store=row.store,
        lane=row.lane,
        sale_id=row.sale_id,
        at=dt.datetime.fromisoformat(row.at),
        at_utc=row.at_utc,
        net_fen=int(row.net_fen),
        body=json.loads(row.body),
    )
    if row.member_id is not None:
        raise MemberError("receipt_has_member", f"{sale.describe()} was made with member {row.member_id}'s card")
    owner = conn.execute(select(sale_claims.c.member_id).where(sale_claims.c.entry_id == sale.entry_id)).scalar()
    if owner is not None:
        raise MemberError("already_claimed", f"{sale.describe()} was already claimed by member {owner}")
    if conn.execute(select(voids.c.entry_id).where(voids.c.sale_entry_id == sale.entry_id).limit(1)).first():
        raise MemberError("receipt_voided", f"{sale.describe()} was voided")
    if conn.execute(select(returns.c.entry_id).where(returns.c.sale_entry_id == sale.entry_id).limit(1)).first():
        raise MemberError("receipt_returned", f"goods of {sale.describe()} were returned: it cannot be claimed")
    return sale


def attach(conn: Connection, sale: GuestSale, member_id: str, points: int, actor: str, now: dt.datetime) -> None:
    """The ``sale_claims`` row: the receipt is the member's from now on; ``already_claimed`` if another was quicker."""
    row = {"entry_id": sale.entry_id, "member_id": member_id, "points": points, "claimed_at": now, "actor": actor}
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(sale_claims)
    stmt = insert.values(row).on_conflict_do_nothing(index_elements=[sale_claims.c.entry_id])
    if conn.execute(stmt.returning(sale_claims.c.entry_id)).scalar() is None:
        raise MemberError("already_claimed", f"{sale.describe()} was claimed meanwhile")


def priced_member(member: Member, ruleset_kinds: tuple[str, ...]) -> PricedMember:
    """Head office's member as the engine prices for it (lanes see the same: clamped balances, the card's kind)."""
    kind = member.card_kind
    if kind is None:
        active = [card for card in member.cards.values() if card.state == "active"]
        newest = max(active, key=lambda card: (card.valid_from, card.card_hash), default=None)
        kind = newest.kind if newest is not None else (ruleset_kinds[0] if ruleset_kinds else "standard")
    birthday = None
    if member.birthday is not None:
        month, day = member.birthday.split("-")
        birthday = (int(month), int(day))
    return PricedMember(
        member_id=member.member_id,
        tier=member.tier,
        card_kind=kind,
        birthday=birthday,
        points_balance=max(member.points_balance, 0),
        rebate_fen=max(member.rebate_fen, 0),
        next_tier=member.next_tier,
        next_tier_from=member.next_tier_from,
    )


def _rescaled(tenders: tuple[Tender, ...], due: int) -> tuple[Tender, ...]:
    """The guest's money tenders shrunk in proportion to what the member would have owed.

    The member price is lower (the discount), so the guest's tenders would
    overpay it; their shares are kept, because which tenders earn points
    (cash, not a stored-value card, say) decides the points.  Points and
    rebate tenders are the member's own money: a guest sale has none.
    """
    money = [t for t in tenders if t.kind not in {"points", "rebate"} and (t.amount_fen or 0) > 0]
    paid = sum(t.amount_fen or 0 for t in money)
    if paid <= due:
        return tuple(money)
    shares = allocate(due, [t.amount_fen or 0 for t in money])
    return tuple(dataclasses.replace(t, amount_fen=share) for t, share in zip(money, shares, strict=True) if share)


def claim_points(library: RulesetLibrary, sale: GuestSale, member: Member) -> int:
    """The points ``sale`` earns for ``member`` re-priced with the ruleset the lane reported.

    Codes: ``unknown_rules`` (head office has not that version and digest),
    ``receipt_unreadable`` (the journaled request does not price again).
    """
    rules = sale.body.get("rules")
    if not isinstance(rules, dict):
        raise MemberError("receipt_unreadable", f"{sale.describe()} names no ruleset")
    ruleset = library.find(str(rules.get("id")), str(rules.get("version")), rules.get("digest"))
    if ruleset is None:
        raise MemberError(
            "unknown_rules",
            f"{sale.describe()} was priced with ruleset {rules.get('id')} {rules.get('version')}, "
            "which is not in head office's rules directory",
        )
    try:
        request = SaleIn.model_validate_json(json_text(sale.body.get("request")))
        basket = dataclasses.replace(request.to_basket(), at=sale.at, member_id=None)
        who = priced_member(member, ruleset.card_kinds)
        due = price(dataclasses.replace(basket, tenders=()), who, ruleset, sale.at).net_fen
        priced = price(dataclasses.replace(basket, tenders=_rescaled(basket.tenders, due)), who, ruleset, sale.at)
    except (ValidationError, InputError, TenderError) as exc:
        raise MemberError("receipt_unreadable", f"{sale.describe()} does not price again: {exc}"[:500]) from None
    return priced.points


@dataclass(frozen=True, slots=True)
class Claimed:
    """A receipt attached to a member and the points it credited."""

    entry_id: str
    store: str
    lane: str
    sale_id: str
    member_id: str
    sale_day: dt.date
    points: int
    points_balance: int
    version: int | None  # the member version of the credit; None when the sale earns no points


def claim(
    conn: Connection,
    library: RulesetLibrary,
    programme: Programme,
    member_id: str,
    receipt: Receipt,
    actor: str,
    now: dt.datetime,
) -> Claimed:
    """Attach ``receipt`` to ``member_id`` and credit its points; MemberError with the reason when refused.

    Codes, besides ``guest_sale``'s and ``claim_points``': ``unknown_member``,
    ``member_cancelled``, ``claim_window_closed``.
    """
    sale = guest_sale(conn, receipt)
    member = _load(conn, [member_id]).get(member_id)  # locked: the credit below changes it
    if member is None:
        raise MemberError("unknown_member", f"member {member_id!r} is not in head office's member table")
    status = conn.execute(select(member_profiles.c.status).where(member_profiles.c.member_id == member_id)).scalar()
    if status == "cancelled":
        raise MemberError("member_cancelled", f"member {member_id} is cancelled")
    window = programme.centre.claim_window_days
    today, sale_day = programme.local_date(now), programme.local_date(sale.at_utc)
    if (today - sale_day).days > window:
        allowed = "on the day of the sale" if window == 0 else f"within {window} days of the sale"
        raise MemberError(
            "claim_window_closed",
            f"receipts are claimed {allowed}; {sale.describe()} was on {sale_day}, today is {today}",
        )
    points = claim_points(library, sale, member)
    attach(conn, sale, member_id, points, actor, now)
    version = None
    balance = member.points_balance
    if points:
        move = Movement(
            key=f"claim:{sale.entry_id}",
            member_id=member_id,
            kind="claim",
            points=points,
            rebate_fen=0,
            on_date=sale_day,
            actor=actor,
            reason=f"late claim of {sale.describe()}",
            ref=sale.entry_id,
        )
        if not record_movements(conn, [move], now):
            raise MemberError("already_claimed", f"{sale.describe()} was already credited")
        after = _load(conn, [member_id], cards=False)[member_id]
        version, balance = after.version, after.points_balance
    return Claimed(sale.entry_id, sale.store, sale.lane, sale.sale_id, member_id, sale_day, points, balance, version)
