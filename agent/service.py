"""The lane's operations, without HTTP: identify, price, sell, return, void, status.

``LaneService`` joins the pure engine (``agent.engine``, ``agent.returns``)
to the store (``agent.store``) and the event bus.  Everything it answers is
computed from local data: the cached member table, this lane's own unsynced
spends and the ruleset on disk.  It returns the POS API's JSON documents and
raises the project's errors (``agent.errors``); ``agent.api`` maps those to
HTTP.

Balances: a member may spend points and rebate money down to the cached
balance, less what this lane spent that head office has not acknowledged,
less the offline floors.  The engine checks tenders against the member it is
given, so it is given exactly that (``_spendable``).

Redemption holds: with head office's API configured (``sync.hq_url``), a
sale whose tenders spend points, rebate money or a single-use coupon asks
head office to hold them after pricing and before its commit
(``agent.holds``; docs/downlink.md).  Refused: 409, nothing committed.  No
answer: the lane's offline allowance decides, checked in the commit's
transaction.  The journal entry says which (``hold``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from agent.basket import Basket, BasketIn, Member
from agent.config import LaneConfig
from agent.engine import PricedBasket, price
from agent.errors import InputError, Issue, SaleConflictError, UnknownSaleError
from agent.events import EventBus, Source
from agent.holds import HoldPort, HoldRequest, Spend, check_offline_coupons, check_offline_day, refused, spend_of
from agent.money import format_fen, format_qty
from agent.pos_models import IdentifyIn, ReturnIn, SaleIn, VoidIn
from agent.render import to_wire
from agent.returns import Returned, SoldLine, price_return
from agent.ruleset import Ruleset
from agent.store import BacklogStats, CardRecord, LaneStore, SaleRecord, StoreStatus, json_text, request_digest

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
# How far ahead of the lane's clock a POS's ``at`` may be (two PCs' clocks drift).
CLOCK_TOLERANCE = dt.timedelta(minutes=5)

# The cashier's texts for each refusal of a card, in both languages.
REJECTIONS: Mapping[str, tuple[str, str]] = {
    "unknown": (
        "未找到该会员卡，请核对卡号或请顾客到服务台办理",
        "Card not found: check the number, or send the customer to the service desk",
    ),
    "lost": (
        "该卡已挂失，不能使用，请顾客到服务台处理",
        "This card was reported lost and cannot be used: service desk, please",
    ),
    "replaced": ("该卡已换新卡，请使用新卡", "This card was replaced: please use the new card"),
    "cancelled": ("该卡已注销", "This card was cancelled"),
    "expired": ("该卡已过有效期", "This card has expired"),
    "not_yet_valid": (
        "新办会员卡次日起生效，今日不能使用",
        "A new card takes effect from tomorrow: it cannot be used today",
    ),
    "unreadable": ("无法识别该卡号，请重新刷卡或输入", "The card number could not be read: swipe or type it again"),
}


def _issue(field: str, code: str, message: str, what: str = "request") -> InputError:
    return InputError([Issue(field, code, message)], what=what)


@dataclass(frozen=True, slots=True)
class Identified:
    """The answer to an identification, and whether it was a refusal."""

    document: dict[str, Any]
    rejected: bool


class LaneService:
    """Identify, price, sell, return and void against this lane's store and ruleset."""

    def __init__(
        self,
        config: LaneConfig,
        store: LaneStore,
        ruleset: Ruleset,
        events: EventBus,
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # Replaced whole (never mutated) when head office sends a newer ruleset.
        self.ruleset = ruleset
        self.events = events
        self.zone = config.lane.zone
        self._clock = clock or (lambda: dt.datetime.now(self.zone))
        self.started = self._clock()
        self._started_monotonic = time.monotonic()
        # The uplink's live figures (sync.uplink.Uplink.status), set by the daemon when [sync] is enabled.
        self.sync_status: Callable[[], Mapping[str, Any]] | None = None
        # Where the ruleset came from, previous, pending, last refusal (sync.rules_downlink.RulesKeeper.status).
        self.rules_status: Callable[[], Mapping[str, Any]] | None = None
        # The member sync's live figures (sync.downlink.MemberSync.status), set by the daemon when it runs.
        self.members_status: Callable[[], Mapping[str, Any]] | None = None
        self._backlog_warned: set[str] = set()
        # Head office's redemption holds (sync.holds_client.HqHolds), set by the daemon when sync.hq_url is.
        self.holds: HoldPort | None = None
        self._releases: set[asyncio.Task[None]] = set()

    def now(self) -> dt.datetime:
        return self._clock().astimezone(self.zone)

    # --- identification -------------------------------------------------------

    async def identify(self, request: IdentifyIn, source: Source = "manual") -> Identified:
        """A member summary, or a refusal with a reason code and the cashier's message."""
        today = self.now().date()
        if request.kind == "member_id":
            found = await self.store.member_for_sale(request.code)
            if found is None:
                return self._reject("unknown", source)
            member, spend = found
            earned = await self.store.unsynced_earned(member.member_id)
            return self._accept(member, spend, None, source, today, earned)
        try:
            card_hash = self.store.card_hash(request.code)
        except ValueError:
            return self._reject("unreadable", source)
        card = await self.store.card_for_sale(card_hash)
        if card is None:
            return self._reject("unknown", source)
        record, spend = card
        use = record.use_on(today)
        if use != "ok":
            return self._reject(use, source, member_id=record.member.member_id)
        earned = await self.store.unsynced_earned(record.member.member_id)
        return self._accept(record.member, spend, record, source, today, earned)

    def reject_unreadable(self, source: Source, detail: str) -> Identified:
        """A device read nothing usable (a half swipe, a forged QR code): the POS hears why, nobody is matched."""
        return self._reject("unreadable", source, detail=detail)

    def _reject(self, reason: str, source: Source, *, member_id: str | None = None, detail: str = "") -> Identified:
        zh, en = REJECTIONS[reason]
        document: dict[str, Any] = {
            "result": "rejected",
            "source": source,
            "reason": reason,
            "message": {"zh-CN": zh, "en": en},
        }
        if detail:
            document["detail"] = detail
        # The member id helps the service desk; a card number never leaves the request.
        event = {**document, "member_id": member_id}
        self.events.publish("card.rejected", event)
        log.info("card rejected (%s, source %s)", reason, source)
        return Identified(document, rejected=True)

    def _accept(
        self,
        member: Member,
        spend: tuple[int, int],
        card: CardRecord | None,
        source: Source,
        today: dt.date,
        earned: int,
    ) -> Identified:
        available = self._spendable(member, spend)
        # Shown: head office's balance as cached, less this lane's unacknowledged spends, plus the points its
        # unacknowledged sales earned (docs/downlink.md, "Balances at the till"); spendable stays without them.
        points_shown = max(member.points_balance + earned - spend[0], 0)
        rebate_shown = max(member.rebate_fen - spend[1], 0)
        tier = member.tier_on(today)
        summary = {
            "member_id": member.member_id,
            "tier": tier,
            "tier_label": self._tier_label(tier),
            "card_kind": member.card_kind,
            "points_balance": points_shown,
            "points_available": available.points_balance,
            "rebate_balance": format_fen(rebate_shown),
            "rebate_available": format_fen(available.rebate_fen),
            "birthday_today": member.birthday == (today.month, today.day),
            "next_tier": member.next_tier if member.next_tier_from and member.next_tier_from > today else None,
            "next_tier_from": None
            if member.next_tier_from is None or member.next_tier_from <= today
            else member.next_tier_from.isoformat(),
        }
        document: dict[str, Any] = {
            "result": "identified",
            "source": source,
            "member": summary,
            "card": None
            if card is None
            else {
                "kind": card.card_kind,
                "valid_until": None if card.valid_until is None else card.valid_until.isoformat(),
            },
        }
        self.events.publish("member.identified", document)
        log.info("member %s identified (source %s)", member.member_id, source)
        return Identified(document, rejected=False)

    def _tier_label(self, tier: str) -> dict[str, str] | None:
        label = self.ruleset.tier_labels.get(tier)
        return None if label is None else {"zh-CN": label.zh_cn, "en": label.en}

    def _spendable(self, member: Member, spend: tuple[int, int]) -> Member:
        """The member as the engine sees it: balances less own unsynced spend and the offline floors."""
        offline = self.config.offline
        points = max(member.points_balance - spend[0] - offline.points_floor, 0)
        rebate = max(member.rebate_fen - spend[1] - offline.rebate_floor_fen, 0)
        return dataclasses.replace(member, points_balance=points, rebate_fen=rebate)

    # --- pricing and sales ------------------------------------------------

    async def _member_of(self, basket: BasketIn) -> Member | None:
        if basket.member_id is None:
            return None
        found = await self.store.member_for_sale(basket.member_id)
        if found is None:
            raise _issue("member_id", "unknown_member", f"this lane has no member {basket.member_id!r}")
        member, spend = found
        return self._spendable(member, spend)

    async def price(self, request: BasketIn) -> dict[str, Any]:
        """The priced basket (``docs/pos-api.md``); ``at`` may be any moment, for what-if pricing."""
        member = await self._member_of(request)
        basket = request.to_basket()
        return to_wire(price(basket, member, self.ruleset, basket.at or self.now()))

    def _moment(self, at: dt.datetime | None) -> dt.datetime:
        now = self.now()
        if at is None:
            return now
        if at - now > CLOCK_TOLERANCE:
            raise _issue("at", "at_in_future", f"{at.isoformat()} is ahead of the lane's clock ({now.isoformat()})")
        return at

    async def sale(self, request: SaleIn, body: Any) -> tuple[str, bool]:
        """Price and journal a sale durably; ``(response JSON text, replayed)``.  ``body``: the decoded request.

        The same ``sale_id`` and body replays the first answer without pricing
        again; another body is a SaleConflictError.  Both are decided again
        inside the commit's transaction, for two requests racing with one id.
        The tenders must pay exactly what is due.

        The priced result (some 27 KB for 30 lines) is encoded once and used
        three times: in the journal entry, in the answer, and on a replay
        (rebuilt from the entry; the store keeps only a small envelope as the
        response, so the result is not stored twice).
        """
        digest = request_digest(body)
        # One ruleset for the whole sale: head office may switch it while the hold is asked, and the
        # entry must name the version the result was priced with, or the audit reports a mismatch.
        ruleset = self.ruleset
        stored, found = await self.store.sale_context(request.sale_id, request.member_id)
        if stored is not None:
            # Decided before pricing: a retry is answered as first committed (the member's balance has
            # moved since), and a reused id is a conflict whatever else is wrong with the new body.
            return self._replay(stored, digest), True
        at = self._moment(request.at)
        member = None
        if request.member_id is not None:
            if found is None:
                raise _issue("member_id", "unknown_member", f"this lane has no member {request.member_id!r}")
            member = self._spendable(*found)
        basket: Basket = dataclasses.replace(request.to_basket(), at=at)
        priced = price(basket, member, ruleset, at)
        if priced.unpaid_fen:
            paid, due = format_fen(priced.net_fen - priced.unpaid_fen), format_fen(priced.net_fen)
            message = f"the tenders pay {paid} of {due} due: list every tender taken, cash included"
            raise _issue("tenders", "tenders_short", message, "sale")
        spend = spend_of(priced)
        # Asked after every local check, before the commit: a refusal leaves nothing behind.
        hold = await self._hold(request.sale_id, member, spend, at) if self.holds is not None and spend else None
        result = json_text(to_wire(priced))
        head = self._entry(
            "sale",
            ruleset=ruleset,
            sale_id=request.sale_id,
            request=body,
            member=None if member is None else _member_doc(member),
            **({} if hold is None else {"hold": hold.document}),
        )
        entry = json_text(head)[:-1] + ',"result":' + result + "}"
        envelope = {"sale_id": request.sale_id, "status": "committed"}
        try:
            _, replayed = await self.store.commit_sale(
                request.sale_id,
                digest,
                entry,
                envelope,
                at=at,
                rules_version=ruleset.version,
                member_id=None if member is None else member.member_id,
                points_spent=spend.points,
                rebate_spent_fen=spend.rebate_fen,
                lines=_sold_lines(priced),
                offline_day=None if hold is None else hold.offline_day,
                offline_check=None if hold is None else hold.offline_check,
            )
        except Exception:
            # Not committed (a cancelled commit may have been: its hold is left to lapse or be consumed).
            self._release(request.sale_id, hold)
            raise
        if replayed:  # the same request committed by a concurrent call since sale_context looked
            self._release(request.sale_id, hold)  # that call's entry carries its own hold
            again = await self.store.find_sale(request.sale_id)
            assert again is not None
            return self._replay(again, digest), True
        return _answer(envelope, result), False

    async def _hold(self, sale_id: str, member: Member | None, spend: Spend, at: dt.datetime) -> _SaleHold:
        """Head office's hold for what the sale spends, or what this lane may spend without one (docs/downlink.md).

        Refused by head office, or beyond the offline allowance: SpendRefusedError (409).
        """
        assert self.holds is not None
        member_id = None if member is None else member.member_id
        hold_id = str(uuid.uuid4())  # new for every attempt: a retry after a failed commit asks afresh
        answer = await self.holds.hold(HoldRequest(hold_id, sale_id, member_id, spend))
        if answer.result == "held":
            return _SaleHold({"id": hold_id}, hold_id)
        if answer.result == "refused":
            raise refused(answer)
        offline = self.config.offline
        check_offline_coupons(spend, offline)
        if member_id is None:
            return _SaleHold({"offline": True})
        day = at.astimezone(self.zone).date()

        def within_allowance(used: tuple[int, int]) -> None:  # run inside the commit's transaction
            check_offline_day(member_id, spend, used, offline, day)

        return _SaleHold({"offline": True}, offline_day=day, offline_check=within_allowance)

    def _release(self, sale_id: str, hold: _SaleHold | None) -> None:
        """Release, in the background, the hold of a sale that was not committed (best effort, logged)."""
        if hold is None or hold.hold_id is None or self.holds is None:
            return
        log.info("sale %s not committed: releasing hold %s", sale_id, hold.hold_id)
        task = asyncio.create_task(self.holds.release(hold.hold_id), name=f"release-hold-{hold.hold_id}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def _replay(self, stored: SaleRecord, digest: str) -> str:
        if stored.request_digest != digest:
            raise SaleConflictError(
                f"sale {stored.sale_id!r} was already committed with a different request", key=stored.sale_id
            )
        return _answer(stored.response, json_text(stored.entry["result"]))

    def _entry(self, kind: str, *, ruleset: Ruleset | None = None, **body: Any) -> dict[str, Any]:
        """A journal body: what head office receives (and re-prices, for sales), naming ``ruleset``."""
        rules = ruleset or self.ruleset
        return {
            "v": ENTRY_VERSION,
            "kind": kind,
            "store": self.config.lane.store,
            "lane": self.config.lane.lane,
            "rules": {"id": rules.id, "version": rules.version, "digest": rules.digest},
            **body,
        }

    # --- returns and voids --------------------------------------------------

    async def return_goods(self, request: ReturnIn, body: Any) -> tuple[dict[str, Any], bool]:
        """Refund exactly the allocated net of what comes back and reverse its points; ``(response, replayed)``."""
        digest = request_digest(body)
        done = await self.store.find_return(request.return_id)
        if done is not None and done[0] == request.sale_id and done[1] == digest:
            # A retry: answered from the journal, before the limits (which it now meets in full) are checked again.
            return done[2], True
        sale = await self.store.find_sale(request.sale_id)
        if sale is None:
            # Checked again inside the commit's transaction; here for the clear message.
            raise _unknown_sale(request.sale_id)
        at = self._moment(request.at)
        sold_day = dt.datetime.fromisoformat(sale.at).astimezone(self.zone).date()
        window = self.config.returns.window_days
        if at.astimezone(self.zone).date() > sold_day + dt.timedelta(days=window):
            last = sold_day + dt.timedelta(days=window)
            raise _issue(
                "sale_id",
                "return_window",
                f"sold on {sold_day.isoformat()}: returns were accepted until {last.isoformat()} ({window} days)",
                "return",
            )
        if sale.member_id is not None and request.member_id != sale.member_id:
            if request.member_id is None:
                if self.config.returns.require_member_card:
                    raise _issue(
                        "member_id",
                        "member_card_required",
                        "a member's sale: identify the member's card first, so the points can be reversed",
                        "return",
                    )
            else:
                raise _issue("member_id", "member_mismatch", "the sale was made by another member", "return")
        requested = {line.line_id: line.qty for line in request.lines}
        previous = await self.store.returned_so_far(request.sale_id)
        priced = price_return(sale.lines, previous, requested)
        lines = [
            {
                "line_id": line.line_id,
                "qty": format_qty(line.qty),
                "refund": format_fen(line.refund_fen),
                "points_reversed": line.points_reversed,
            }
            for line in priced.lines
        ]
        response: dict[str, Any] = {
            "return_id": request.return_id,
            "sale_id": request.sale_id,
            "status": "committed",
            "at": at.isoformat(),
            "member_id": sale.member_id,
            "lines": lines,
            "refund": format_fen(priced.refund_fen),
            "points_reversed": priced.points_reversed,
        }
        entry = self._entry("return", sale_journal_id=sale.journal_id, **response)
        # What this return takes back, in the store's terms, for its in-transaction limit check.
        back = {line.line_id: Returned(line.qty, line.refund_fen, line.points_reversed) for line in priced.lines}
        return await self.store.commit_return(
            request.return_id,
            request.sale_id,
            digest,
            entry,
            response,
            back,
            at=at,
            rules_version=self.ruleset.version,
        )

    async def void(self, sale_id: str, request: VoidIn, body: Any) -> tuple[dict[str, Any], bool]:
        """Cancel a sale of today entirely: refund it all, undo its points and spends; ``(response, replayed)``."""
        sale = await self.store.find_sale(sale_id)
        if sale is None:
            raise _unknown_sale(sale_id)
        digest = request_digest(body)
        at = self._moment(request.at)
        sold_day = dt.datetime.fromisoformat(sale.at).astimezone(self.zone).date()
        if at.astimezone(self.zone).date() != sold_day and sale.void_seq is None:
            raise _issue(
                "sale_id",
                "void_too_late",
                f"only a sale of today can be voided (this one is of {sold_day.isoformat()}): make a return",
                "void",
            )
        totals = sale.entry.get("result", {}).get("totals", {})
        response = {
            "sale_id": sale_id,
            "status": "voided",
            "at": at.isoformat(),
            "member_id": sale.member_id,
            "refund": totals.get("net"),
            "points_reversed": totals.get("points", 0),
            "points_restored": sale.points_spent,
            "rebate_restored": format_fen(sale.rebate_spent_fen),
            "reason": request.reason,
        }
        entry = self._entry("void", sale_journal_id=sale.journal_id, **response)
        return await self.store.void_sale(sale_id, digest, entry, response, at=at, rules_version=self.ruleset.version)

    # --- status -------------------------------------------------------------

    async def status(self, devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``GET /v1/status``: who this lane is, versions, backlog, disk, devices."""
        store = await self.store.status()
        backlog = await self.store.backlog_stats()
        free = _free_bytes(self.store.path)
        warn = self.config.store.disk_warn_free_mb * 1024 * 1024
        now = self.now()
        return {
            "v": 1,
            "lane": {"store": self.config.lane.store, "lane": self.config.lane.lane, "timezone": self.zone.key},
            "agent": {
                "version": __version__,
                "started_at": self.started.isoformat(),
                "uptime_seconds": round(time.monotonic() - self._started_monotonic, 3),
            },
            "now": now.isoformat(),
            "business_day": now.date().isoformat(),
            "rules": {
                "id": self.ruleset.id,
                "version": self.ruleset.version,
                "digest": self.ruleset.digest,
                **(self.rules_status() if self.rules_status is not None else {}),
            },
            "member_table": {
                "version": store.member_version,
                "created": store.snapshot_created,
                "members": store.members,
                "cards": store.cards,
                "card_key_ok": store.card_key_ok,
            },
            "versions": {"rules": self.ruleset.version, "member_table": store.member_version},
            "members": self._members_status(store),
            "journal": {
                "epoch": store.journal_epoch,
                "last_seq": store.last_seq,
                "acked_seq": store.acked_seq,
                "backlog": store.backlog,
            },
            "store": {
                "schema_version": store.schema_version,
                "db_bytes": store.db_bytes,
                "disk_free_bytes": free,
                "disk_low": free is not None and warn > 0 and free < warn,
            },
            "devices": devices or [],
            "events": {"subscribers": self.events.subscribers},
            "sync": self._sync_status(store, backlog),
        }

    def _members_status(self, store: StoreStatus) -> dict[str, Any]:
        """The member table against head office's (docs/lane-agent.md, "Member table and hot list")."""
        live = self.members_status() if self.members_status is not None else {}
        head = live.get("head_version")
        return {
            "enabled": self.members_status is not None,
            "version": store.member_version,  # the store's, which a `members import` may also have moved
            "head_version": head,
            "behind": None if head is None else max(head - store.member_version, 0),
            "last_sync_at": live.get("last_sync_at"),
            "last_error": live.get("last_error"),
            "snapshot_in_progress": bool(live.get("snapshot_in_progress", False)),
            "snapshot_bytes": live.get("snapshot_bytes"),
            "hotlist_version": live.get("hotlist_version"),
            "hot_cards": live.get("hot_cards"),
        }

    def _sync_status(self, store: StoreStatus, backlog: BacklogStats) -> dict[str, Any]:
        sync = self.config.sync
        live = self.sync_status() if self.sync_status is not None else {}
        host = f"[{sync.host}]" if ":" in sync.host else sync.host
        return {
            "enabled": sync.enabled,
            "connected": bool(live.get("connected", False)),
            "broker": f"{host}:{sync.port}",
            "session": live.get("session"),
            "backlog": backlog.entries,
            "backlog_bytes": backlog.bytes,
            "oldest_unacked_at": backlog.oldest_unacked_at,
            "oldest_unacked_age_seconds": _age(backlog.oldest_unacked_at),
            "last_ack_at": live.get("last_ack_at"),
            "last_ack_age_seconds": live.get("last_ack_age_seconds"),
            "acked_seq": store.acked_seq,
            "last_seq": store.last_seq,
            "sync_lag_seconds": live.get("sync_lag_seconds"),
            "warnings": [{"code": code, "message": message} for code, message in self._backlog_warnings(backlog)],
        }

    def _backlog_warnings(self, backlog: BacklogStats) -> list[tuple[str, str]]:
        """The backlog's warnings; each is logged once when it starts (and once when it ends), not per status."""
        warnings = self.config.sync.backlog_warnings(backlog.entries, backlog.bytes)
        for code in sorted(warnings.keys() - self._backlog_warned):
            log.warning("%s", warnings[code])
        for code in sorted(self._backlog_warned - warnings.keys()):
            log.info("backlog back below its warning level (%s)", code)
        self._backlog_warned = set(warnings)
        return sorted(warnings.items())


def _age(at: str | None) -> float | None:
    """Seconds since the ISO time ``at`` by the wall clock (never negative), or None."""
    if at is None:
        return None
    moment = dt.datetime.fromisoformat(at)
    if moment.tzinfo is None:
        return None
    return round(max((dt.datetime.now(dt.UTC) - moment).total_seconds(), 0.0), 3)


def _free_bytes(path: os.PathLike[str] | str) -> int | None:
    try:
        stats = os.statvfs(Path(path).parent)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _unknown_sale(sale_id: str) -> UnknownSaleError:
    return UnknownSaleError(f"no sale {sale_id!r} on this lane", sale_id=sale_id)


def _answer(envelope: Mapping[str, Any], result: str) -> str:
    """A sale's answer: its envelope (sale_id, status) then the priced result's keys, as JSON text."""
    return json_text(dict(envelope))[:-1] + "," + result[1:]


@dataclass(frozen=True, slots=True)
class _SaleHold:
    """A sale's ``hold`` in its journal entry, and for an offline spend the allowance checked at commit."""

    document: dict[str, Any]
    hold_id: str | None = None
    offline_day: dt.date | None = None
    offline_check: Callable[[tuple[int, int]], None] | None = None


def _sold_lines(priced: PricedBasket) -> list[SoldLine]:
    return [SoldLine(p.line.line_id, p.line.qty, p.net_fen, p.points) for p in priced.lines]


def _member_doc(member: Member) -> dict[str, Any]:
    """The member state the engine priced with, in the member file's shape (``agent.basket.MemberIn``)."""
    return {
        "member_id": member.member_id,
        "tier": member.tier,
        "card_kind": member.card_kind,
        "birthday": None if member.birthday is None else f"{member.birthday[0]:02d}-{member.birthday[1]:02d}",
        "points_balance": member.points_balance,
        "rebate_balance": format_fen(member.rebate_fen),
        "next_tier": member.next_tier,
        "next_tier_from": None if member.next_tier_from is None else member.next_tier_from.isoformat(),
    }


__all__ = ["REJECTIONS", "Identified", "LaneService"]
