"""The tier lifecycle (sync/hq/centre/tiers.py) and the centre worker (worker.py), on SQLite and PostgreSQL.

Sales travel as lanes send them: journal bodies priced by the engine with the
programme's own ruleset (the seed programmes in config/rules/), encoded and
decoded as batches and applied with ``HqDatabase.apply_batch``, which queues
their members for the centre.  Members are seeded by the member import
(``members.import_chunk``).  Expected figures are the sums of what the engine
priced for the sales each test made.  Head office's clock is the test's, so
that an import can be a year old.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import REPO_ROOT
from sqlalchemy import text
from test_hq_db import STORE, TOPIC, batch_of, raw

from agent.basket import parse_member
from agent.engine import price
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import Ruleset, load_ruleset
from agent.snapshot import SnapshotCard, SnapshotMember, card_hash
from sync.hq import members as mt
from sync.hq import schema
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import tiers
from sync.hq.centre.jobs import run_job
from sync.hq.centre.programme import JobContext, Programme
from sync.hq.centre.worker import CentreWorker
from sync.hq.config import parse_hq_config
from sync.hq.db import HqDatabase
from sync.wire import RawEntry

RULES = REPO_ROOT / "config" / "rules"
KANGCHENG = load_ruleset(RULES / "kangcheng.toml")
MALL_888 = load_ruleset(RULES / "888-mall.toml")
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
KEY = bytes(range(32))


# --- head office with the test's clock --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, day: dt.date, hour: int = 10) -> None:
        self.now = dt.datetime.combine(day, dt.time(hour), SHANGHAI).astimezone(dt.UTC)


@dataclass
class Hq:
    db: HqDatabase
    clock: Clock
    seq: int = 0
    lane: str = "l01"

    def ctx(self, programme: Programme, day: dt.date) -> JobContext:
        return JobContext(self.db, programme, day, self.clock())


@pytest.fixture
def hq(db_url: str) -> Iterator[Hq]:
    clock = Clock()
    database = HqDatabase.open(db_url, now=clock)
    try:
        yield Hq(database, clock)
    finally:
        database.close()


def day(text_: str) -> dt.date:
    return dt.date.fromisoformat(text_)


def at(day_: dt.date, hour: int = 14) -> dt.datetime:
    return dt.datetime.combine(day_, dt.time(hour), SHANGHAI)


def seed(hq: Hq, *tiers_: tuple[str, str]) -> None:
    """Members ``(member_id, tier)`` with one active card each, imported at the clock's time."""
    lines = [
        SnapshotMember(
            member_id=member_id,
            tier=tier,
            points_balance=0,
            rebate_balance="0.00",
            version=1,
            cards=(
                SnapshotCard(
                    card_hash=card_hash(KEY, f"8800{member_id}").hex(),
                    kind="standard",
                    state="active",
                    valid_from=dt.date(2024, 1, 1),
                ),
            ),
        )
        for member_id, tier in tiers_
    ]
    with hq.db.transaction() as conn:
        mt.import_chunk(conn, lines, hq.clock(), "seed")


def cancel(hq: Hq, member_id: str) -> None:
    """The member's profile, cancelled (as the service desk leaves it)."""
    now = hq.clock()
    with hq.db.transaction() as conn:
        conn.execute(
            schema.member_profiles.insert().values(
                member_id=member_id,
                status="cancelled",
                marketing_consent=0,
                registered_at=now,
                updated_at=now,
                cancelled_at=now,
            )
        )


def member_doc(hq: Hq, member_id: str) -> dict[str, Any]:
    """The member as lanes see it: its line at its current version in the change log."""
    with hq.db.reading() as conn:
        line = conn.execute(
            text("SELECT c.line FROM members m JOIN member_changes c ON c.version = m.version WHERE m.member_id = :m"),
            {"m": member_id},
        ).scalar_one()
    return dict(json.loads(line))


def rows(hq: Hq, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with hq.db.reading() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def history(hq: Hq, member_id: str) -> list[tuple[str, str | None, str | None, dt.date, dt.date]]:
    found = rows(
        hq,
        "SELECT kind, from_tier, to_tier, effective_from, decided_on FROM tier_history WHERE member_id = :m ORDER BY id",
        m=member_id,
    )
    return [(k, f, t, _date(e), _date(d)) for k, f, t, e, d in found]


def _date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))


def notes(hq: Hq, member_id: str) -> list[tuple[str, dict[str, Any]]]:
    found = rows(hq, "SELECT kind, detail FROM notifications WHERE member_id = :m ORDER BY id", m=member_id)
    return [(kind, json.loads(detail)) for kind, detail in found]


def everything(hq: Hq) -> dict[str, list[tuple[Any, ...]]]:
    """What a job run again must leave as it is."""
    return {
        "tier_history": rows(
            hq, "SELECT key, member_id, kind, from_tier, to_tier, effective_from FROM tier_history ORDER BY key"
        ),
        "notifications": rows(hq, "SELECT key, member_id, kind, detail FROM notifications ORDER BY key"),
        "members": rows(
            hq, "SELECT member_id, tier, next_tier, next_tier_from, version FROM members ORDER BY member_id"
        ),
        "cards": rows(hq, "SELECT card_hash, state, version FROM member_cards ORDER BY card_hash"),
        "head": rows(hq, "SELECT value FROM hq_counters"),
    }


# --- sales priced by the programme's own ruleset ----------------------------------------------


@dataclass(frozen=True)
class Sold:
    entry: RawEntry
    net_fen: int
    points: int


def sale(
    hq: Hq,
    ruleset: Ruleset,
    member_id: str,
    tier: str,
    when: dt.datetime,
    unit_price: str,
    **line: Any,
) -> Sold:
    """A one-line sale the way agent/service.py journals it, paid in cash, priced by the engine."""
    hq.seq += 1
    request: dict[str, Any] = {
        "sale_id": f"S{hq.seq:05d}",
        "at": when.isoformat(),
        "member_id": member_id,
        "lines": [
            {"line_id": "1", "sku": "6901234567892", "category": "womenswear", "qty": "1", "unit_price": unit_price}
            | line
        ],
    }
    member = {"member_id": member_id, "tier": tier, "points_balance": 0, "rebate_balance": "0.00"}
    priced_member = parse_member(member)
    due = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, when).net_fen
    request["tenders"] = [{"kind": "cash", "amount": format_fen(due)}]
    priced = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, when)
    body = {
        "v": 1,
        "kind": "sale",
        "store": STORE,
        "lane": hq.lane,
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": request["sale_id"],
        "request": request,
        "member": member,
        "result": to_wire(priced),
    }
    return Sold(raw(hq.seq, "sale", body, at=when), priced.net_fen, priced.points)


def ingest(hq: Hq, *sold: Sold) -> None:
    """Apply the sales as one lane batch (seqs continue the lane's stream)."""
    applied = hq.db.apply_batch(batch_of([s.entry for s in sold], lane=hq.lane), TOPIC.replace("l01", hq.lane))
    assert applied.applied == len(sold), applied


def arrivals(hq: Hq, programme: Programme) -> dict[str, int]:
    done = tiers.evaluate_arrivals(hq.db, programme)
    assert rows(hq, "SELECT count(*) FROM centre_queue") == [(0,)]
    return done


# Marked-down goods get no Kangcheng card rate, so a line's price is what the member pays.
def kc_sale(hq: Hq, member_id: str, when: dt.datetime, amount: str, tier: str = "gold") -> Sold:
    regular = format_fen(parse_money(amount) + 10_000)
    return sale(hq, KANGCHENG, member_id, tier, when, amount, regular_price=regular)


# A counter outside the 888 mall's member scheme gives no discount and earns 1 point per yuan.
def mall_sale(hq: Hq, member_id: str, tier: str, when: dt.datetime, amount: str) -> Sold:
    return sale(hq, MALL_888, member_id, tier, when, amount, flags=["non_member_counter"])


# --- Kangcheng: platinum on arrival ------------------------------------------------------------


def test_kangcheng_same_day_2000_makes_gold_platinum_from_the_next_day(hq: Hq) -> None:
    programme = Programme(KANGCHENG)
    seed(hq, ("K1", "gold"), ("K2", "gold"))
    d = day("2026-12-10")
    reached = kc_sale(hq, "K1", at(d, 11), "1200.00"), kc_sale(hq, "K1", at(d, 16), "800.00")
    short = kc_sale(hq, "K2", at(d), "1999.99")
    assert sum(s.net_fen for s in reached) == 200_000  # 1,200.00 + 800.00: the same day, two visits
    assert short.net_fen == 199_999
    ingest(hq, *reached, short)
    done = arrivals(hq, programme)
    assert done == {"entries": 3, "members": 2, "upgraded": 1, "unknown": 0, "cancelled": 0}

    line = member_doc(hq, "K1")  # what lanes receive
    assert (line["tier"], line["next_tier"], line["next_tier_from"]) == ("gold", "platinum", "2026-12-11")
    assert history(hq, "K1") == [("upgrade", "gold", "platinum", day("2026-12-11"), d)]
    [(kind, detail)] = notes(hq, "K1")
    assert kind == "tier_qualified"
    assert detail["tier"] == "platinum"
    assert detail["effective_from"] == "2026-12-11"
    assert detail["why"] == "same-day spend 2000.00 >= 2000.00"
    assert rows(hq, "SELECT key FROM tier_history") == [("upgrade:K1:platinum:2026-12-10",)]

    doc = member_doc(hq, "K2")
    assert (doc["tier"], doc.get("next_tier")) == ("gold", None)
    assert history(hq, "K2") == []
    assert notes(hq, "K2") == []

    # More spend the same day decides nothing again.
    ingest(hq, kc_sale(hq, "K1", at(d, 18), "2500.00"))
    assert arrivals(hq, programme)["upgraded"] == 0
    assert len(history(hq, "K1")) == 1

    # The daily job of the 10th leaves it pending; the 11th's makes it the tier.
    before = everything(hq)
    assert tiers.run_daily(hq.ctx(programme, d))["effective"] == 0
    assert everything(hq) == before
    assert tiers.run_daily(hq.ctx(programme, d + dt.timedelta(days=1)))["effective"] == 1
    line = member_doc(hq, "K1")
    assert (line["tier"], line.get("next_tier"), line.get("next_tier_from")) == ("platinum", None, None)
    assert history(hq, "K1")[-1] == ("effective", "gold", "platinum", day("2026-12-11"), day("2026-12-11"))
    settled = everything(hq)
    tiers.run_daily(hq.ctx(programme, d + dt.timedelta(days=1)))
    assert everything(hq) == settled


def test_kangcheng_60_day_spend_of_4000_over_several_days(hq: Hq) -> None:
    programme = Programme(KANGCHENG)
    seed(hq, ("K1", "gold"), ("K2", "gold"))
    first = day("2026-10-01")
    days = [first, first + dt.timedelta(days=25), first + dt.timedelta(days=59)]  # the 1st, 26th and 60th day
    inside = [
        kc_sale(hq, "K1", at(d), amount) for d, amount in zip(days, ("1500.00", "1500.00", "1000.00"), strict=True)
    ]
    ingest(hq, *inside[:2])
    assert arrivals(hq, programme)["upgraded"] == 0  # 3,000.00 so far
    ingest(hq, inside[2])
    assert arrivals(hq, programme)["upgraded"] == 1
    assert sum(s.net_fen for s in inside) == 400_000
    line = member_doc(hq, "K1")
    assert (line["next_tier"], line["next_tier_from"]) == ("platinum", (days[2] + dt.timedelta(days=1)).isoformat())
    [(_, detail)] = notes(hq, "K1")
    assert detail["why"] == "60-day spend 4000.00 >= 4000.00"

    # The same three amounts 61 days apart: the first falls out of the window.
    late = [first, first + dt.timedelta(days=30), first + dt.timedelta(days=60)]
    spread = [
        kc_sale(hq, "K2", at(d), amount) for d, amount in zip(late, ("1500.00", "1500.00", "1000.00"), strict=True)
    ]
    ingest(hq, *spread)
    assert arrivals(hq, programme)["upgraded"] == 0
    assert member_doc(hq, "K2").get("next_tier") is None


def test_unknown_and_cancelled_members_are_not_upgraded_and_leave_the_queue(hq: Hq) -> None:
    programme = Programme(KANGCHENG)
    seed(hq, ("K1", "gold"))
    cancel(hq, "K1")
    d = day("2026-12-10")
    ingest(hq, kc_sale(hq, "K1", at(d), "2500.00"), kc_sale(hq, "NOBODY", at(d), "3000.00"))
    assert arrivals(hq, programme) == {"entries": 2, "members": 2, "upgraded": 0, "unknown": 1, "cancelled": 1}
    assert member_doc(hq, "K1").get("next_tier") is None
    assert rows(hq, "SELECT count(*) FROM tier_history") == [(0,)]


# --- 888 mall: VIP and gold by arrival and by the screening ---------------------------------------


def test_888_points_in_a_year_wait_for_the_screening_same_day_spend_does_not(hq: Hq) -> None:
    programme = Programme(MALL_888)
    seed(hq, ("P1", "points_card"), ("P2", "points_card"), ("P3", "points_card"), ("P4", "points_card"))
    # P1: 3,000 points over two visits (no day reaches 2,000); P2: 10,500 over seven; P3: 1,000; P4: 2,000 in a day.
    p1 = [mall_sale(hq, "P1", "points_card", at(day(d)), "1500.00") for d in ("2026-10-05", "2026-11-12")]
    p2 = [mall_sale(hq, "P2", "points_card", at(day(f"2026-11-{n:02d}")), "1500.00") for n in (2, 4, 6, 9, 13, 17, 20)]
    p3 = [mall_sale(hq, "P3", "points_card", at(day("2026-11-20")), "1000.00")]
    p4 = [mall_sale(hq, "P4", "points_card", at(day("2026-11-20")), "2000.00")]
    assert sum(s.points for s in p1) == 3000
    assert sum(s.points for s in p2) == 10_500
    ingest(hq, *p1, *p2, *p3, *p4)
    assert arrivals(hq, programme)["upgraded"] == 1  # P4 only: points wait for the monthly screening
    assert (member_doc(hq, "P4")["next_tier"], member_doc(hq, "P4")["next_tier_from"]) == ("vip", "2026-11-21")
    for member_id in ("P1", "P2", "P3"):
        assert member_doc(hq, member_id).get("next_tier") is None

    # The screening is due on the 1st only.
    ctx = hq.ctx(programme, day("2026-12-01"))
    results = {name: run_job(ctx, name) for name in ("tiers", "screening")}
    assert results["tiers"].summary["effective"] == 1  # P4's VIP from 21 November
    assert results["screening"].summary["upgraded"] == 2
    assert (member_doc(hq, "P1")["next_tier"], member_doc(hq, "P1")["next_tier_from"]) == ("vip", "2026-12-02")
    assert (member_doc(hq, "P2")["next_tier"], member_doc(hq, "P2")["next_tier_from"]) == ("gold", "2026-12-02")
    assert member_doc(hq, "P3").get("next_tier") is None
    assert member_doc(hq, "P4")["tier"] == "vip"
    [(kind, detail)] = notes(hq, "P2")
    assert kind == "tier_qualified"
    # Tuesday 1 December + 10 working days (Monday to Friday): 15 December.
    assert detail == {
        "decided_on": "2026-12-01",
        "effective_from": "2026-12-02",
        "from_tier": "points_card",
        "notify_by": "2026-12-15",
        "source": "screening",
        "tier": "gold",
        "why": "points in a year 10500 >= 10000",
    }
    assert notes(hq, "P1")[0][1]["why"] == "points in a year 3000 >= 3000"
    assert history(hq, "P1") == [("upgrade", "points_card", "vip", day("2026-12-02"), day("2026-12-01"))]

    settled = everything(hq)
    for name in ("tiers", "screening"):
        assert run_job(ctx, name).runs == 2
    assert everything(hq) == settled

    tiers.run_daily(hq.ctx(programme, day("2026-12-02")))
    assert member_doc(hq, "P1")["tier"] == "vip"
    assert member_doc(hq, "P2")["tier"] == "gold"


def test_888_screening_counts_the_365_days_before_the_screening_day(hq: Hq) -> None:
    programme = Programme(MALL_888)
    seed(hq, ("P1", "points_card"), ("P2", "points_card"), ("P3", "points_card"))
    screening = day("2026-12-01")
    # The year screened: 1 December 2025 .. 30 November 2026 (365 days ending the day before).
    dates = {
        "P1": (day("2025-11-30"), day("2026-11-30")),  # the first is a day too early
        "P2": (day("2025-12-01"), day("2026-11-30")),  # both inside: 3,000
        "P3": (day("2026-11-30"), screening),  # the screening day itself is not complete: not counted
    }
    sold = [mall_sale(hq, m, "points_card", at(d), "1500.00") for m, pair in dates.items() for d in pair]
    ingest(hq, *sold)
    assert arrivals(hq, programme)["upgraded"] == 0
    assert tiers.run_screening(hq.ctx(programme, screening))["upgraded"] == 1
    assert member_doc(hq, "P2")["next_tier"] == "vip"
    assert member_doc(hq, "P1").get("next_tier") is None
    assert member_doc(hq, "P3").get("next_tier") is None


# --- 888 mall: gold's anniversary -------------------------------------------------------------------


def test_888_gold_is_kept_with_10000_points_in_its_year_and_drops_to_vip_with_9999(hq: Hq) -> None:
    programme = Programme(MALL_888)
    hq.clock.set(day("2025-11-01"))
    seed(hq, ("G1", "vip"), ("G2", "vip"))
    hq.clock.set(day("2025-11-20"))
    seed(hq, ("G3", "gold"), ("G4", "gold"))  # imported as gold: their year runs from the import
    cancel(hq, "G4")  # a cancelled member is not reviewed
    eve = day("2025-11-30")
    # A same-day 5,000 makes G1 and G2 gold from 1 December 2025 (those points are not in the gold year).
    ingest(hq, mall_sale(hq, "G1", "vip", at(eve), "5000.00"), mall_sale(hq, "G2", "vip", at(eve), "5000.00"))
    hq.clock.set(eve, 20)
    assert arrivals(hq, programme)["upgraded"] == 2
    hq.clock.set(day("2025-12-01"), 1)
    tiers.run_daily(hq.ctx(programme, day("2025-12-01")))
    assert member_doc(hq, "G1")["tier"] == "gold"

    dates = [day(d) for d in ("2026-01-05", "2026-03-03", "2026-06-06", "2026-09-09", "2026-11-30")]
    g1 = [mall_sale(hq, "G1", "gold", at(d), "2000.00") for d in dates]
    g2 = [
        mall_sale(hq, "G2", "gold", at(d), amount)
        for d, amount in zip(dates, ["2000.00"] * 4 + ["1999.00"], strict=True)
    ]
    g3 = [mall_sale(hq, "G3", "gold", at(day("2026-11-19")), "9000.00")]  # before its anniversary of the 20th
    assert sum(s.points for s in g1) == 10_000
    assert sum(s.points for s in g2) == 9_999
    ingest(hq, *g1, *g2, *g3)
    arrivals(hq, programme)

    anniversary = day("2026-12-01")
    hq.clock.set(anniversary, 1)
    before = {m: len(history(hq, m)) for m in ("G1", "G2")}
    done = tiers.run_daily(hq.ctx(programme, anniversary - dt.timedelta(days=1)))
    assert (done["anniversaries"], done["retained"], done["downgraded"]) == (0, 0, 0)
    done = tiers.run_daily(hq.ctx(programme, anniversary))
    assert (done["anniversaries"], done["retained"], done["downgraded"]) == (2, 1, 1)
    assert history(hq, "G1")[before["G1"] :] == [("retain", "gold", "gold", anniversary, anniversary)]
    assert notes(hq, "G1")[-1][0] == "tier_retained"
    assert history(hq, "G2")[before["G2"] :] == [("downgrade", "gold", "vip", day("2026-12-02"), anniversary)]
    kind, detail = notes(hq, "G2")[-1]
    assert kind == "tier_downgraded"
    assert detail["why"] == "tier year 2025-12-01..2026-11-30: points 9999 < 10000"
    line = member_doc(hq, "G2")
    assert (line["tier"], line["next_tier"], line["next_tier_from"]) == ("gold", "vip", "2026-12-02")
    settled = everything(hq)
    tiers.run_daily(hq.ctx(programme, anniversary))
    assert everything(hq) == settled

    hq.clock.set(day("2026-12-02"), 1)
    tiers.run_daily(hq.ctx(programme, day("2026-12-02")))
    assert member_doc(hq, "G2")["tier"] == "vip"
    assert member_doc(hq, "G1")["tier"] == "gold"
    # G1's kept year restarts on 1 December 2026: nothing is reviewed again before 2027.
    assert tiers.run_daily(hq.ctx(programme, day("2026-12-02")))["anniversaries"] == 0

    # G3 has no tier history: its year runs from its import on 20 November 2025; 9,000 points do not keep gold.
    done = tiers.run_daily(hq.ctx(programme, day("2026-11-20")))
    assert (done["anniversaries"], done["downgraded"]) == (2, 1)
    assert history(hq, "G3") == [("downgrade", "gold", "vip", day("2026-11-21"), day("2026-11-20"))]
    assert history(hq, "G4") == []


# --- 888 mall: inactivity ------------------------------------------------------------------------------


def test_888_vip_without_a_purchase_for_365_days_returns_to_the_points_card(hq: Hq) -> None:
    programme = Programme(MALL_888)
    hq.clock.set(day("2025-05-01"))
    seed(hq, ("V1", "vip"), ("V2", "vip"), ("PC", "points_card"))
    last = day("2025-06-01")
    hq.clock.set(last)
    seed(hq, ("V3", "vip"))
    ingest(
        hq,
        mall_sale(hq, "V1", "vip", at(last), "100.00"),
        mall_sale(hq, "V2", "vip", at(last), "100.00"),
        mall_sale(hq, "V2", "vip", at(day("2026-01-15")), "100.00"),
    )
    arrivals(hq, programme)
    hq.clock.set(day("2026-05-20"))
    seed(hq, ("V4", "vip"))  # joined recently, never bought
    year_on = last + dt.timedelta(days=365)  # 2026-06-01: 364 whole days without a purchase behind it
    assert tiers.run_daily(hq.ctx(programme, year_on))["inactive_downgraded"] == 0
    next_day = year_on + dt.timedelta(days=1)
    done = tiers.run_daily(hq.ctx(programme, next_day))
    # V1 (last bought 1 June 2025) and V3 (imported that day, never bought); not V2, V4 or the points card.
    assert done["inactive_downgraded"] == 2
    for member_id in ("V1", "V3"):
        line = member_doc(hq, member_id)
        assert (line["tier"], line["next_tier"], line["next_tier_from"]) == ("vip", "points_card", "2026-06-03")
        assert history(hq, member_id) == [("downgrade", "vip", "points_card", day("2026-06-03"), next_day)]
        [(kind, detail)] = notes(hq, member_id)
        assert (kind, detail["why"]) == ("tier_downgraded", "no purchase in the 365 days before 2026-06-02")
    for member_id in ("V2", "V4", "PC"):
        assert member_doc(hq, member_id).get("next_tier") is None
    settled = everything(hq)
    tiers.run_daily(hq.ctx(programme, next_day))
    assert everything(hq) == settled
    tiers.run_daily(hq.ctx(programme, next_day + dt.timedelta(days=1)))
    assert member_doc(hq, "V1")["tier"] == "points_card"


def test_inactivity_termination_cancels_the_cards_at_once(hq: Hq, tmp_path: Path) -> None:
    source = (RULES / "888-mall.toml").read_text(encoding="utf-8")
    changed = source.replace('action = "downgrade"\nto_tier = "points_card"', 'action = "terminate"')
    assert changed != source
    path = tmp_path / "888-terminate.toml"
    path.write_text(changed, encoding="utf-8")
    programme = Programme(load_ruleset(path))
    hq.clock.set(day("2025-05-01"))
    seed(hq, ("V1", "vip"), ("V2", "vip"))
    ingest(hq, mall_sale(hq, "V2", "vip", at(day("2026-05-01")), "100.00"))
    arrivals(hq, programme)
    d = day("2026-06-01")
    hq.clock.set(d, 2)
    assert tiers.run_daily(hq.ctx(programme, d))["terminated"] == 1
    card = card_hash(KEY, "8800V1").hex()
    line = member_doc(hq, "V1")
    assert [c["state"] for c in line["cards"]] == ["cancelled"]
    assert line["tier"] == "vip"  # the profile and the history stay; the card is what ends
    hot = hq.db.members.hotlist(30, 100)
    assert [c["card_hash"] for c in hot.cards] == [card]
    assert history(hq, "V1") == [("terminate", "vip", None, d, d)]
    assert notes(hq, "V1")[0][0] == "membership_terminated"
    assert [c["state"] for c in member_doc(hq, "V2")["cards"]] == ["active"]
    settled = everything(hq)
    assert tiers.run_daily(hq.ctx(programme, d))["terminated"] == 0
    assert tiers.run_daily(hq.ctx(programme, d + dt.timedelta(days=1)))["terminated"] == 0
    assert everything(hq) == settled


def test_a_pending_downgrade_gives_way_to_qualifying_again(hq: Hq) -> None:
    programme = Programme(MALL_888)
    hq.clock.set(day("2025-05-01"))
    seed(hq, ("V1", "vip"))
    d = day("2026-06-02")
    hq.clock.set(d, 1)
    assert tiers.run_daily(hq.ctx(programme, d))["inactive_downgraded"] == 1
    ingest(hq, mall_sale(hq, "V1", "vip", at(d, 15), "2000.00"))  # the day of the decision: VIP again
    assert arrivals(hq, programme)["upgraded"] == 1
    line = member_doc(hq, "V1")
    assert (line["tier"], line["next_tier"], line["next_tier_from"]) == ("vip", "vip", "2026-06-03")
    assert [h[0] for h in history(hq, "V1")] == ["downgrade", "upgrade"]


# --- the worker -------------------------------------------------------------------------------------


def _config(db_url: str, rules_dir: Path, *, ruleset: str | None, interval: float = 0.1) -> str:
    centre = f'ruleset = "{ruleset}"\n' if ruleset else ""
    return (
        f'[database]\nurl = "{db_url}"\n[rules]\ndirectory = "{rules_dir}"\n'
        f"[centre]\n{centre}worker_interval_seconds = {interval}\n[api]\nenabled = false\n"
    )


class Running:
    """A CentreWorker run on an event loop of its own thread, as ``lane-hq run`` runs it in its task group."""

    def __init__(self, config_text: str) -> None:
        config = parse_hq_config(config_text)
        assert config.rules.directory is not None
        self.worker = CentreWorker(config, RulesetLibrary.load(config.rules.directory))
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.task = asyncio.create_task(self.worker.run(), name="centre")
            self.started.set()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.error = exc

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> Self:
        self.thread.start()
        assert self.started.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the worker did not stop when cancelled"
        assert self.error is None, self.error


def test_the_worker_upgrades_within_seconds_of_the_batch_and_runs_the_days_jobs(db_url: str, tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shutil.copy(RULES / "kangcheng.toml", rules_dir)
    programme = Programme(KANGCHENG)
    hq = Hq(HqDatabase.open(db_url), Clock())
    try:
        seed(hq, ("K1", "gold"))
        today = programme.local_date(dt.datetime.now(dt.UTC))
        with Running(_config(db_url, rules_dir, ruleset="kangcheng")):
            deadline = time.monotonic() + 10
            while not rows(hq, "SELECT job FROM job_runs WHERE job = 'tiers'") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rows(hq, "SELECT job, on_date FROM job_runs WHERE job = 'tiers'") == [("tiers", _on(hq, today))]
            now = dt.datetime.now(SHANGHAI)
            ingest(hq, kc_sale(hq, "K1", now, "2000.00"))
            sent = time.monotonic()
            while member_doc(hq, "K1").get("next_tier") is None and time.monotonic() < sent + 5:
                time.sleep(0.02)
            took = time.monotonic() - sent
            line = member_doc(hq, "K1")
            tomorrow = programme.local_date(now.astimezone(dt.UTC)) + dt.timedelta(days=1)
            assert (line["next_tier"], line["next_tier_from"]) == ("platinum", tomorrow.isoformat()), took
            assert took < 3
    finally:
        hq.db.close()


def _on(hq: Hq, value: dt.date) -> Any:
    return value.isoformat() if hq.db.dialect == "sqlite" else value


def test_the_worker_idles_without_a_programme_and_logs_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    caplog.set_level(logging.INFO, logger="sync.hq.centre.worker")
    with Running(_config(f"sqlite:///{tmp_path}/hq.db", rules_dir, ruleset=None, interval=0.05)):
        time.sleep(0.6)
    idle = [r for r in caplog.records if "idle" in r.getMessage()]
    assert len(idle) == 1
    assert "[centre] ruleset is not set" in idle[0].getMessage()
    assert not (tmp_path / "hq.db").exists()  # idle: not even the database is opened


def test_a_failing_round_is_logged_and_tried_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shutil.copy(RULES / "kangcheng.toml", rules_dir)
    where = tmp_path / "not-yet" / f"{uuid.uuid4().hex}.db"
    caplog.set_level(logging.INFO, logger="sync.hq.centre.worker")
    with Running(_config(f"sqlite:///{where}", rules_dir, ruleset="kangcheng", interval=0.05)):
        time.sleep(0.4)
        failed = [r for r in caplog.records if "a round failed" in r.getMessage()]
        assert len(failed) >= 2  # every interval, and the task is still running
        where.parent.mkdir()
        deadline = time.monotonic() + 5
        while not where.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert where.exists()
        db = HqDatabase.open(f"sqlite:///{where}")
        try:
            deadline = time.monotonic() + 5
            found: list[Any] = []
            while not found and time.monotonic() < deadline:
                with db.reading() as conn:
                    found = list(conn.execute(text("SELECT job FROM job_runs WHERE job = 'tiers'")))
                time.sleep(0.05)
            assert found
        finally:
            db.close()
