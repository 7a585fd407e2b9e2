"""A demo head office with a few months of a mall's life, and a screenshot of its member-centre dashboard.

``build_demo_database(url, rules_dir)`` fills an empty head-office database
the way production fills it: members imported from a member-snapshot file
(more in waves later, some registered at the service desk), sales of two
stores' five lanes priced by the real engine with the 888 mall's programme
and ingested journal batch by journal batch through ``HqDatabase.apply_batch``
(returns and voids among them, three sales a lane mispriced), the lanes'
retained states, the audit's re-pricing, and the member centre's movements
(the rebates job itself on its settlement dates; points expiring and staff
adjustments through ``members.record_movements`` and ``adjust``).  ``served(url, rules_dir)`` runs head office's
API with the reports' router in this process (uvicorn on a thread);
``screenshot`` / ``dump_dom`` open a page in Debian's headless Chromium.

    python scripts/dashboard_screenshot.py [--out docs/images/member-centre-dashboard.png] [--db URL]

The programme is the 888 mall's with one change, under its own version:
points pay at the till (100 points = 1.00), so that redemptions show.
tests/test_centre_dashboard.py imports this file for its data and its browser.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import heapq
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import func, insert, select

from agent.basket import parse_member
from agent.engine import price
from agent.errors import TenderError
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import Ruleset, load_ruleset
from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot
from sync.hq.api import create_hq_app
from sync.hq.audit import RulesetLibrary
from sync.hq.auditor import audit_rows
from sync.hq.centre import rebates, reports_api
from sync.hq.centre.programme import JobContext, Programme
from sync.hq.config import parse_hq_config
from sync.hq.db import HqDatabase
from sync.hq.members import Movement
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner
from sync.hq.schema import member_profiles, members, sales, tier_history
from sync.wire import RawEntry, decode_batch, encode_batch

ROOT = Path(__file__).resolve().parent.parent
RULES_888 = ROOT / "config" / "rules" / "888-mall.toml"
PROGRAMME = "888-mall"
DEMO_VERSION = "2026.11.1-till-points"
CARD_KEY = bytes(range(32))  # the card key of docs/member-snapshot.md's example
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "images" / "member-centre-dashboard.png"
STORES = (("s01", ("l01", "l02", "l03")), ("s02", ("l01", "l02")))
# sku, category, qty, unit price, regular price (marked down when given)
PRODUCTS = (
    ("6901234567892", "womenswear", "1", "399.00", None),
    ("6901234567908", "womenswear", "1", "1280.00", None),
    ("6901234567915", "menswear", "1", "699.00", None),
    ("6900000000036", "cosmetics", "1", "268.00", None),
    ("6900000000067", "cosmetics", "2", "129.00", "159.00"),
    ("6900000000012", "fresh", "0.356", "45.80", "52.00"),
    ("6900000000043", "fresh", "1.120", "18.60", None),
    ("6900000000029", "grocery", "2", "12.50", None),
    ("6900000000050", "household", "3", "9.90", None),
    ("6900000000074", "electronics", "1", "2999.00", None),
    ("6900000000081", "dining", "1", "88.00", None),
)
INITIAL_MEMBERS = 80
BATCH_ENTRIES = 4  # a lane's batch (fewer transactions: the demo builds in seconds)


def demo_rules(directory: Path) -> Path:
    """The 888 mall's ruleset with points accepted at the till, under ``DEMO_VERSION``, written into ``directory``."""
    source = RULES_888.read_text(encoding="utf-8")
    changed = source.replace("accepted = false", "accepted = true", 1).replace(
        'version = "2026.11.1"', f'version = "{DEMO_VERSION}"', 1
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{PROGRAMME}-{DEMO_VERSION}.toml"
    path.write_text(changed, encoding="utf-8")
    return path


# --- journal bodies, as agent/service.py writes them ---------------------------------------------


def member_doc(member_id: str, tier: str, points: int = 0, rebate_fen: int = 0) -> dict[str, Any]:
    """A member's state as a lane's cache holds it (what the lane priced with)."""
    return {
        "member_id": member_id,
        "tier": tier,
        "card_kind": "standard",
        "birthday": None,
        "points_balance": max(0, points),
        "rebate_balance": format_fen(max(0, rebate_fen)),
        "next_tier": None,
        "next_tier_from": None,
    }


def product_line(line_id: int, product: tuple[str, str, str, str, str | None]) -> dict[str, Any]:
    sku, category, qty, unit, regular = product
    line: dict[str, Any] = {"line_id": str(line_id), "sku": sku, "category": category, "qty": qty, "unit_price": unit}
    if regular is not None:
        line["regular_price"] = regular
    return line


def sale_body(
    ruleset: Ruleset,
    *,
    sale_id: str,
    store: str,
    lane: str,
    at: dt.datetime,
    lines: list[dict[str, Any]],
    member: dict[str, Any] | None,
    points: int = 0,
    rebate_fen: int = 0,
) -> dict[str, Any]:
    """A sale's journal body priced by the engine: paid with ``points`` / ``rebate_fen`` first, the rest cash."""
    request: dict[str, Any] = {"sale_id": sale_id, "lines": lines, "at": at.isoformat()}
    if member is not None:
        request["member_id"] = member["member_id"]
    priced_member = None if member is None else parse_member(member)
    tenders: list[dict[str, Any]] = []
    if points:
        tenders.append({"kind": "points", "points": points})
    if rebate_fen:
        tenders.append({"kind": "rebate", "amount": format_fen(rebate_fen)})
    request["tenders"] = tenders
    due = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, at).unpaid_fen
    request["tenders"] = [*tenders, {"kind": "cash", "amount": format_fen(due)}] if due else tenders
    priced = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, at)
    if priced.unpaid_fen != 0:
        raise ValueError(f"{sale_id}: {format_fen(priced.unpaid_fen)} left unpaid")
    return {
        "v": 1,
        "kind": "sale",
        "store": store,
        "lane": lane,
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": sale_id,
        "request": request,
        "member": member,
        "result": to_wire(priced),
    }


def return_body(
    sale_entry_id: str, sale: dict[str, Any], return_id: str, line_ids: list[str], at: dt.datetime
) -> dict[str, Any]:
    """Lines of a sale brought back whole: each refunded at its net, its points reversed."""
    priced = {line["line_id"]: line for line in sale["result"]["lines"]}
    lines = [
        {
            "line_id": line_id,
            "qty": priced[line_id]["qty"],
            "refund": priced[line_id]["net"],
            "points_reversed": priced[line_id]["points"],
        }
        for line_id in line_ids
    ]
    refund = sum(parse_money(line["refund"]) for line in lines)
    return {
        "v": 1,
        "kind": "return",
        "store": sale["store"],
        "lane": sale["lane"],
        "rules": sale["rules"],
        "sale_journal_id": sale_entry_id,
        "return_id": return_id,
        "sale_id": sale["sale_id"],
        "status": "committed",
        "at": at.isoformat(),
        "member_id": None if sale["member"] is None else sale["member"]["member_id"],
        "lines": lines,
        "refund": format_fen(refund),
        "points_reversed": sum(line["points_reversed"] for line in lines),
    }


def void_body(sale_entry_id: str, sale: dict[str, Any], at: dt.datetime) -> dict[str, Any]:
    """A whole sale cancelled: its net refunded, its points reversed, what it spent restored."""
    result = sale["result"]
    tenders = result["tenders"]
    return {
        "v": 1,
        "kind": "void",
        "store": sale["store"],
        "lane": sale["lane"],
        "rules": sale["rules"],
        "sale_journal_id": sale_entry_id,
        "sale_id": sale["sale_id"],
        "status": "voided",
        "at": at.isoformat(),
        "member_id": None if sale["member"] is None else sale["member"]["member_id"],
        "refund": result["totals"]["net"],
        "points_reversed": result["totals"]["points"],
        "points_restored": sum(t["points"] or 0 for t in tenders if t["kind"] == "points"),
        "rebate_restored": format_fen(sum(parse_money(t["amount"]) for t in tenders if t["kind"] == "rebate")),
        "reason": "customer changed their mind",
    }


class Clock:
    """Head office's clock while the demo is built: set to each moment as the lanes' batches arrive."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


class LaneFeed:
    """One lane's journal: entries numbered in order, sent to head office as the lane's batches."""

    def __init__(self, store: str, lane: str) -> None:
        self.store, self.lane = store, lane
        self.epoch = uuid.uuid5(uuid.NAMESPACE_URL, f"demo/{store}/{lane}").hex
        self.seq = 0
        self.pending: list[RawEntry] = []
        self.last_at = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # when its newest entry reached head office

    def add(self, kind: str, body: dict[str, Any], at: dt.datetime, rules_version: str) -> RawEntry:
        self.seq += 1
        entry = RawEntry(
            seq=self.seq,
            id=str(uuid.uuid4()),
            kind=kind,
            at=at.isoformat(),
            rules_version=rules_version,
            member_version=0,
            body=json.dumps(body, ensure_ascii=False),
        )
        self.pending.append(entry)
        return entry

    def flush(self, db: HqDatabase) -> None:
        if not self.pending:
            return
        payload = encode_batch(self.store, self.lane, self.epoch, self.pending)
        db.apply_batch(decode_batch(self.store, self.lane, payload), f"retail/{self.store}/{self.lane}/journal")
        self.pending = []


# --- the demo ------------------------------------------------------------------------------------


@dataclass(slots=True)
class DemoMember:
    member_id: str
    tier: str
    points: int
    rebate_fen: int
    interval: int  # usual days between visits
    offset: int
    stops: dt.date | None  # goes quiet from this day (the churn warning should find it)


@dataclass(slots=True)
class Demo:
    """What ``build_demo_database`` made (the figures it printed come from the reports, not from here)."""

    first: dt.date
    last: dt.date
    programme: Programme
    members: int = 0
    sales: int = 0
    returns: int = 0
    voids: int = 0
    quiet: list[str] = field(default_factory=list)


def _number(i: int) -> str:
    return f"8800 0000 {i:08d}"


def _import(db: HqDatabase, directory: Path, people: list[DemoMember]) -> None:
    # model_validate: the file's balance is a decimal string, which the model turns into fen.
    lines = [
        SnapshotMember.model_validate(
            {
                "member_id": m.member_id,
                "tier": m.tier,
                "points_balance": m.points,
                "rebate_balance": format_fen(m.rebate_fen),
                "version": 1,
                "cards": (
                    SnapshotCard(
                        card_hash=card_hash(CARD_KEY, _number(int(m.member_id[1:]))).hex(),
                        kind="standard",
                        state="active",
                        valid_from=dt.date(2025, 1, 1),
                    ),
                ),
            }
        )
        for m in people
    ]
    path = directory / f"members-{uuid.uuid4().hex[:8]}.jsonl"
    write_snapshot(path, lines, version=1, card_key=CARD_KEY)
    db.members.import_members(path, CARD_KEY)


def _new_member(rng: random.Random, number: int, first: dt.date, days: int) -> DemoMember:
    tier = rng.choices(("points_card", "vip", "gold"), (50, 35, 15))[0]
    stops = (
        first + dt.timedelta(days=rng.randrange(days // 2, max(days // 2 + 1, days - 14)))
        if rng.random() < 0.1
        else None
    )
    return DemoMember(
        member_id=f"M{number:05d}",
        tier=tier,
        points=rng.randrange(800, 9000),
        rebate_fen=rng.choice((0, 0, 5000, 30000)),
        interval=rng.choice((2, 3, 3, 4, 5, 7, 7, 10, 14)),
        offset=rng.randrange(14),
        stops=stops,
    )


def _basket(rng: random.Random, rich: bool) -> list[dict[str, Any]]:
    weights = [6, 2, 2, 4, 3, 8, 6, 8, 5, 1 if not rich else 4, 5]
    picked = rng.choices(PRODUCTS, weights, k=rng.randint(1, 4))
    return [product_line(i + 1, product) for i, product in enumerate(picked)]


class _Builder:
    """The day-by-day life of the demo mall (one instance per build)."""

    def __init__(self, db: HqDatabase, clock: Clock, ruleset: Ruleset, programme: Programme, seed: int) -> None:
        self.db, self.clock, self.ruleset, self.programme = db, clock, ruleset, programme
        self.rng = random.Random(seed)
        self.feeds = {(store, lane): LaneFeed(store, lane) for store, lanes in STORES for lane in lanes}
        self.people: dict[str, DemoMember] = {}
        self.counter = 0
        self.tampered = 0
        self.pending_tiers: dict[str, str] = {}  # member -> the tier it holds from tomorrow
        self.later: list[tuple[dt.datetime, str, LaneFeed, RawEntry, dict[str, Any], DemoMember | None]] = []

    def local(self, day: dt.date, hour: float) -> dt.datetime:
        moment = dt.datetime.combine(day, dt.time(), self.programme.tz) + dt.timedelta(hours=hour)
        return moment.replace(microsecond=0)

    def sale(self, at: dt.datetime, feed: LaneFeed, member: DemoMember | None, demo: Demo) -> None:
        self.counter += 1
        rng = self.rng
        doc = None if member is None else member_doc(member.member_id, member.tier, member.points, member.rebate_fen)
        lines = _basket(rng, member is not None and member.tier != "points_card")
        points = rebate = 0
        if member is not None and member.points >= 2000 and rng.random() < 0.12:
            points = 100 * rng.randint(5, 15)
        if member is not None and member.rebate_fen >= 2000 and member.tier != "points_card" and rng.random() < 0.1:
            rebate = min(member.rebate_fen, 1000 * rng.randint(1, 5))
        sale_id = f"{feed.store}-{feed.lane}-{self.counter:06d}"
        try:
            body = sale_body(
                self.ruleset,
                sale_id=sale_id,
                store=feed.store,
                lane=feed.lane,
                at=at,
                lines=lines,
                member=doc,
                points=points,
                rebate_fen=rebate,
            )
        except (ValueError, TenderError):  # the tenders came to more than the basket: all cash instead
            body = sale_body(
                self.ruleset, sale_id=sale_id, store=feed.store, lane=feed.lane, at=at, lines=lines, member=doc
            )
            points = rebate = 0
        if self.counter % 250 == 0 and self.tampered < 3:
            # A lane that priced wrongly: the audit re-prices it and finds the difference.
            body["result"]["totals"]["points"] += 7
            self.tampered += 1
        entry = feed.add("sale", body, at, self.ruleset.version)
        demo.sales += 1
        if member is not None:
            member.points += body["result"]["totals"]["points"] - points
            member.rebate_fen -= rebate
        roll = rng.random()
        if roll < 0.012:
            self.later.append((at + dt.timedelta(minutes=2), "void", feed, entry, body, member))
        elif roll < 0.06 and len(body["result"]["lines"]) > 1:
            self.later.append((at + dt.timedelta(minutes=rng.randint(20, 180)), "return", feed, entry, body, member))

    def undo(
        self,
        at: dt.datetime,
        kind: str,
        feed: LaneFeed,
        entry: RawEntry,
        sale: dict[str, Any],
        member: DemoMember | None,
        demo: Demo,
    ) -> None:
        if kind == "void":
            body = void_body(entry.id, sale, at)
            demo.voids += 1
            if member is not None:
                member.points += body["points_restored"] - body["points_reversed"]
                member.rebate_fen += parse_money(body["rebate_restored"])
        else:
            line = sale["result"]["lines"][-1]["line_id"]
            body = return_body(entry.id, sale, f"R{self.counter:06d}", [line], at)
            demo.returns += 1
            if member is not None:
                member.points -= body["points_reversed"]
        feed.add(kind, body, at, self.ruleset.version)

    def day(self, day: dt.date, index: int, demo: Demo) -> None:
        rng = self.rng
        events: list[tuple[dt.datetime, int, str | None]] = []
        weekend = day.weekday() >= 5
        for member in self.people.values():
            if member.stops is not None and day >= member.stops:
                continue
            due = (index + member.offset) % member.interval == 0
            if (due and rng.random() < 0.85) or rng.random() < 0.02:
                events.append((self.local(day, rng.uniform(10, 21.5)), len(events), member.member_id))
        for _ in range(rng.randint(10, 18) + (6 if weekend else 0)):
            events.append((self.local(day, rng.uniform(10, 21.5)), len(events), None))
        heapq.heapify(events)
        self.later = []
        lanes = list(self.feeds.values())
        while events or self.later:
            self.later.sort(key=lambda item: item[0])
            if self.later and (not events or self.later[0][0] <= events[0][0]):
                at, kind, feed, entry, body, buyer = self.later.pop(0)
                self.undo(at, kind, feed, entry, body, buyer, demo)
            else:
                at, _, member_id = heapq.heappop(events)
                feed = rng.choice(lanes)
                self.sale(at, feed, None if member_id is None else self.people[member_id], demo)
            # Online lanes send within seconds, a few entries a batch: head office's clock is when one arrives.
            self.clock.at = (at + dt.timedelta(seconds=rng.randint(1, 25))).astimezone(dt.UTC)
            feed.last_at = self.clock.at
            if len(feed.pending) >= BATCH_ENTRIES:
                feed.flush(self.db)
        for feed in sorted(lanes, key=lambda feed: feed.last_at):
            if feed.pending:
                self.clock.at = feed.last_at
                feed.flush(self.db)

    def upgrades(self, day: dt.date) -> None:
        """Members whose day reached a tier's same-day spend: the tier from tomorrow, as the tiers job decides."""
        spent: dict[str, int] = {}
        start, end = self.programme.day_range(day, day)
        with self.db.reading() as conn:
            s = sales.c
            query = select(s.member_id, func.sum(s.net_fen)).where(
                s.member_id.is_not(None), s.at_utc >= start, s.at_utc < end
            )
            spent = {m: int(fen) for m, fen in conn.execute(query.group_by(s.member_id))}
        ladder = self.programme.tiers
        for member_id, fen in sorted(spent.items()):
            member = self.people.get(member_id)
            if member is None:
                continue
            target = "gold" if fen >= 500_000 else "vip" if fen >= 200_000 else None
            if target is None or ladder.index(target) <= ladder.index(member.tier):
                continue
            tomorrow = day + dt.timedelta(days=1)
            # The tiers job (sync/hq/centre/tiers.py) decides this; its history row is written here directly.
            with self.db.transaction() as conn:
                conn.execute(
                    insert(tier_history).values(
                        key=f"demo-upgrade:{day}:{member_id}",
                        member_id=member_id,
                        kind="upgrade",
                        from_tier=member.tier,
                        to_tier=target,
                        effective_from=tomorrow,
                        decided_on=day,
                        reason=f"same-day spend {format_fen(fen)}",
                        at_utc=self.clock.at,
                    )
                )
            self.db.members.set_tier(member_id, member.tier, target, tomorrow, f"upgrade to {target} from {tomorrow}")
            self.pending_tiers[member_id] = target

    def settle(self, day: dt.date) -> None:
        """The rebates job itself (sync/hq/centre/rebates.py) on a settlement date; the lanes' balances follow."""
        if not rebates.is_settlement_day(self.programme, day):
            return
        rebates.run(JobContext(self.db, self.programme, day, self.clock.at, actor="job:rebates"))
        m = members.c
        with self.db.reading() as conn:
            for member_id, fen in conn.execute(select(m.member_id, m.rebate_fen)):
                if member_id in self.people:
                    self.people[member_id].rebate_fen = int(fen)

    def expire(self, day: dt.date) -> None:
        """Points of a few members whose card validity ended lapse (the expiry job's movements)."""
        moves = []
        for member in self.rng.sample(sorted(self.people.values(), key=lambda m: m.member_id), 3):
            lapse = member.points // 2
            if lapse > 0:
                moves.append(
                    Movement(
                        key=f"expire:{day}:{member.member_id}",
                        member_id=member.member_id,
                        kind="expire",
                        points=-lapse,
                        rebate_fen=0,
                        on_date=day,
                        actor="job:expiry",
                        reason="card validity ended",
                    )
                )
                member.points -= lapse
        self.db.members.record_movements(moves)


def build_demo_database(
    url: str, rules_dir: Path, *, days: int = 98, last: dt.date | None = None, seed: int = 7
) -> Demo:
    """Fill the empty head-office database at ``url`` with ``days`` days ending ``last`` (default: yesterday, local).

    Writes the demo's ruleset into ``rules_dir`` (serve from there).  98 days
    always hold one of the 888 mall's quarterly rebate settlements.
    """
    ruleset = load_ruleset(demo_rules(rules_dir))
    programme = Programme(ruleset)
    # Yesterday by default: the whole last day is over, and the lanes were last heard before now.
    last = last or programme.local_date(dt.datetime.now(dt.UTC)) - dt.timedelta(days=1)
    first = last - dt.timedelta(days=days - 1)
    clock = Clock(programme.day_start(first - dt.timedelta(days=45)))
    db = HqDatabase.open(url, now=clock)
    demo = Demo(first, last, programme)
    work = Path(tempfile.mkdtemp(prefix="demo-members-"))
    try:
        builder = _Builder(db, clock, ruleset, programme, seed)
        rng = builder.rng
        people = [_new_member(rng, i, first, days) for i in range(1, INITIAL_MEMBERS + 1)]
        _import(db, work, people)
        builder.people.update((m.member_id, m) for m in people)
        number = INITIAL_MEMBERS
        for index in range(days):
            day = first + dt.timedelta(days=index)
            clock.at = builder.local(day, 9).astimezone(dt.UTC)
            for member_id, tier in sorted(builder.pending_tiers.items()):
                builder.db.members.set_tier(member_id, tier, None, None, f"tier {tier} in effect")
                builder.people[member_id].tier = tier
            builder.pending_tiers.clear()
            builder.settle(day)
            if index % 7 == 3:
                wave = [_new_member(rng, number + i + 1, first, days) for i in range(rng.randint(2, 6))]
                number += len(wave)
                for member in wave:
                    member.tier, member.points, member.rebate_fen, member.stops = "points_card", 0, 0, None
                _import(db, work, wave)
                # Registered at the service desk (sync/hq/centre/ members' API): profiles without personal data here.
                with db.transaction() as conn:
                    for member in wave[::2]:
                        conn.execute(
                            insert(member_profiles).values(
                                member_id=member.member_id,
                                status="active",
                                marketing_consent=1,
                                registered_at=clock.at,
                                registered_store="s01",
                                updated_at=clock.at,
                            )
                        )
                builder.people.update((m.member_id, m) for m in wave)
            if day.weekday() == 0:
                builder.expire(day)
            if index % 9 == 4:
                member_id = rng.choice(sorted(builder.people))
                db.members.adjust(member_id, 200, 0, "goodwill: a late delivery", actor="staff:demo", key=f"demo:{day}")
                builder.people[member_id].points += 200
            builder.day(day, index, demo)
            clock.at = builder.local(day, 22.5).astimezone(dt.UTC)
            builder.upgrades(day)
        _finish(builder, demo)
    finally:
        db.close()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    return demo


def _finish(builder: _Builder, demo: Demo) -> None:
    db, clock, last = builder.db, builder.clock, demo.last
    demo.members = len(builder.people)
    demo.quiet = sorted(m.member_id for m in builder.people.values() if m.stops is not None)
    faded = [m for m in builder.people.values() if m.stops is not None]
    with db.transaction() as conn:
        if faded:
            # The tiers job's inactivity rule terminates a member; its history row is written here directly.
            gone = faded[0]
            conn.execute(
                insert(tier_history).values(
                    key=f"demo-terminate:{last}:{gone.member_id}",
                    member_id=gone.member_id,
                    kind="terminate",
                    from_tier=gone.tier,
                    to_tier=None,
                    effective_from=last - dt.timedelta(days=2),
                    decided_on=last - dt.timedelta(days=3),
                    reason="no purchase in the validity period",
                    at_utc=clock.at,
                )
            )
        # A member who cancelled at the service desk (the members' API sets this; written directly here).
        cancelled = sorted(builder.people)[1]
        at = builder.local(last - dt.timedelta(days=5), 15).astimezone(dt.UTC)
        conn.execute(
            insert(member_profiles).values(
                member_id=cancelled,
                status="cancelled",
                marketing_consent=0,
                registered_at=at - dt.timedelta(days=400),
                registered_store="s02",
                updated_at=at,
                cancelled_at=at,
            )
        )
    rng = builder.rng
    for n, ((store, lane), feed) in enumerate(sorted(builder.feeds.items())):
        if n == 3:
            db.record_state(store, lane, 4, "offline", {})
            continue
        backlog = rng.choice((0, 0, 0, 3, 12))
        info = {"backlog": backlog, "last_seq": feed.seq + backlog, "acked_seq": feed.seq, "at": clock.at.isoformat()}
        db.record_state(store, lane, 5, "online", {**info, "rules_version": builder.ruleset.version})
    library = RulesetLibrary([builder.ruleset])
    while rows := db.unaudited_sales(500):
        db.record_audits(audit_rows(library, rows))


# --- serving and the browser ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hq_config_text(url: str, rules_dir: Path, port: int) -> str:
    return (
        f'[database]\nurl = "{url}"\n\n[rules]\ndirectory = "{rules_dir}"\n\n'
        f'[api]\nport = {port}\n\n[centre]\nruleset = "{PROGRAMME}"\nchurn_factor = 3.0\n'
    )


@contextlib.contextmanager
def served(url: str, rules_dir: Path) -> Iterator[str]:
    """Head office's API with the reports' router, on a free port in this process; yields its base URL."""
    port = free_port()
    config = parse_hq_config(hq_config_text(url, rules_dir, port))
    library = RulesetLibrary.load(rules_dir)
    owner = DbOwner(HqDatabase.open(url))
    app = create_hq_app(owner, HqMetrics(), routers=[reports_api.router(config, owner, library)])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="demo-hq-api", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("head office's API did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        owner.close()


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Debian's Chromium, headless, with a profile of its own (``--no-sandbox``: it runs as root here)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, *, budget_ms: int = 10_000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (scripts run, fetches answered)."""
    done = chromium("--dump-dom", f"--virtual-time-budget={budget_ms}", "--window-size=1400,2200", url)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def screenshot(url: str, out: Path, *, width: int = 1400, height: int = 2120, budget_ms: int = 15_000) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    done = chromium(f"--screenshot={out}", f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", url)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=SCREENSHOT, help=f"the PNG to write (default {SCREENSHOT})")
    parser.add_argument("--db", help="an empty head-office database URL (default: SQLite in a temporary directory)")
    parser.add_argument("--days", type=int, default=98, help="days of sales (default 98)")
    parser.add_argument("--period", default="week", choices=("day", "week", "month"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="centre-demo-") as work:
        url = args.db or f"sqlite:///{work}/hq.db"
        started = time.monotonic()
        demo = build_demo_database(url, Path(work) / "rules", days=args.days)
        print(
            f"demo: {demo.members} members, {demo.sales} sales, {demo.returns} returns, {demo.voids} voids, "
            f"{demo.first} .. {demo.last} ({time.monotonic() - started:.1f} s)"
        )
        with served(url, Path(work) / "rules") as base:
            page = f"{base}/centre?from={demo.first}&to={demo.last}&period={args.period}"
            screenshot(page, args.out)
        print(f"wrote {args.out} from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
