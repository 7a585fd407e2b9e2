"""Redemption holds, the lane's side (docs/downlink.md, "Redemption holds"): pure, no I/O.

Before a sale spends points, rebate money or a single-use coupon, a lane
with head office's API configured asks head office to hold them.  This
module says what a priced sale spends (``spend_of``), defines the port the
sale path asks through (``HoldPort``; ``sync.holds_client.HqHolds`` is the
implementation, wired by the daemon: ``agent`` never imports ``sync``), and
decides what an *offline* sale (head office did not answer) may still
spend: at most ``offline.points_per_day`` points and ``offline.rebate_per_day``
rebate per member per local day at this lane, and single-use coupons only
when ``offline.single_use_coupons = "accept"``.

A **single-use coupon** is a ``coupon`` tender: a voucher the member got
from the programme (points redeemed at the service desk, a birthday
voucher) that is used up when it pays.  Its code travels in the tender's
``subkind``; a coupon tender without one is an anonymous paper voucher,
which nobody can track, and is taken as before.  The codes in a basket's
``coupons`` list are not single-use: they are campaign codes ("XMAS50")
that make a rule apply, for any number of customers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.config import OfflineSection
from agent.engine import PricedBasket
from agent.errors import SpendRefusedError
from agent.money import format_fen

HoldResult = Literal["held", "refused", "offline"]

# The cashier's texts for head office's refusals (the POS gets them as the 409's message).
REFUSALS = {
    "insufficient_points": "head office says the member does not have these points any more (spent at another till)",
    "insufficient_rebate": "head office says the member does not have this rebate money any more (spent elsewhere)",
    "coupon_used": "this coupon was used already: it cannot be used again",
    "coupon_held": "this coupon is being used at another till right now",
    "unknown_member": "head office does not know this member: send the customer to the service desk",
}


@dataclass(frozen=True, slots=True)
class Spend:
    """What one sale spends that head office must hold: points, rebate (fen), single-use coupon codes."""

    points: int = 0
    rebate_fen: int = 0
    coupons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.points or self.rebate_fen or self.coupons)


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One sale's hold: ``hold_id`` is new for every attempt at committing the sale."""

    hold_id: str
    sale_id: str
    member_id: str | None
    spend: Spend


@dataclass(frozen=True, slots=True)
class HoldAnswer:
    """Head office's answer: ``held``, ``refused`` (``code`` says why) or ``offline`` (no usable answer)."""

    result: HoldResult
    code: str = ""
    message: str = ""


class HoldPort(Protocol):
    """How the sale path reaches head office's holds; every call answers within the hold timeout."""

    async def hold(self, request: HoldRequest) -> HoldAnswer:
        """Ask for a hold; never raises for network trouble (that is ``offline``)."""
        ...

    async def release(self, hold_id: str) -> None:
        """Release a hold whose sale was not committed; best effort, never raises."""
        ...


def spend_of(priced: PricedBasket) -> Spend:
    """The points, rebate money and single-use coupon codes a priced sale's tenders spend."""
    codes: list[str] = []
    for tender in priced.tenders:
        if tender.kind == "coupon" and tender.subkind and tender.subkind not in codes:
            codes.append(tender.subkind)
    return Spend(
        points=sum(t.points or 0 for t in priced.tenders if t.kind == "points"),
        rebate_fen=sum(t.amount_fen for t in priced.tenders if t.kind == "rebate"),
        coupons=tuple(codes),
    )


def refused(answer: HoldAnswer) -> SpendRefusedError:
    """The POS's 409 for a refusal by head office, with the cashier's text first."""
    text = REFUSALS.get(answer.code, "head office refused to hold this tender")
    detail = f" ({answer.message})" if answer.message else ""
    field = "member_id" if answer.code == "unknown_member" else "tenders"
    return SpendRefusedError(answer.code, f"{text}{detail}", field=field)


def check_offline_coupons(spend: Spend, offline: OfflineSection) -> None:
    """Offline, a single-use coupon is refused unless ``offline.single_use_coupons = "accept"``."""
    if spend.coupons and offline.single_use_coupons == "refuse":
        codes = ", ".join(spend.coupons)
        raise SpendRefusedError(
            "offline_limit",
            f"head office cannot be reached to check coupon {codes}: single-use coupons are not accepted"
            " offline; ask for another payment",
            field="tenders",
        )


def check_offline_day(
    member_id: str, spend: Spend, used: tuple[int, int], offline: OfflineSection, day: dt.date
) -> None:
    """Refuse (``offline_limit``) a spend that takes the member past this lane's offline allowance for ``day``.

    ``used`` is what this lane already spent offline for the member that day
    (points, rebate fen), read in the commit's own transaction.
    """
    points_used, rebate_used = used
    cap_points, cap_rebate = offline.points_per_day, offline.rebate_per_day_fen
    if spend.points and points_used + spend.points > cap_points:
        left = max(cap_points - points_used, 0)
        raise SpendRefusedError(
            "offline_limit",
            f"head office cannot be reached: without it member {member_id} may spend {cap_points} points a day"
            f" at this till ({points_used} spent on {day.isoformat()}, {left} left, {spend.points} asked);"
            " take another payment for the rest",
            field="tenders",
        )
    if spend.rebate_fen and rebate_used + spend.rebate_fen > cap_rebate:
        left = max(cap_rebate - rebate_used, 0)
        raise SpendRefusedError(
            "offline_limit",
            f"head office cannot be reached: without it member {member_id} may spend {format_fen(cap_rebate)}"
            f" rebate money a day at this till ({format_fen(rebate_used)} spent on {day.isoformat()},"
            f" {format_fen(left)} left, {format_fen(spend.rebate_fen)} asked); take another payment for the rest",
            field="tenders",
        )


__all__ = [
    "REFUSALS",
    "HoldAnswer",
    "HoldPort",
    "HoldRequest",
    "HoldResult",
    "Spend",
    "check_offline_coupons",
    "check_offline_day",
    "refused",
    "spend_of",
]
