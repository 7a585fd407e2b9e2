"""The points ledger, its expiry lots, the expiry and rebate jobs (sync/hq/centre/lots.py, expiry.py, rebates.py).

Every database test runs on a real SQLite file and a real PostgreSQL
database (the ``db`` fixture).  Members and their cards (with validity
dates) come in through the member-snapshot import; points move through real
journal batches (sales priced by the engine, returns, voids) applied with
``HqDatabase.apply_batch``, and through head office's own adjustments.
Expected figures are computed from the journal bodies the test made, not
written in as constants.  ``lane-hq jobs`` runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, RULES_888
from lane_harness import basket
from sqlalchemy import Table, select
from test_hq_db import TOPIC, batch_of, raw, return_body, sale_body, void_body
from test_hq_members import KEY, hashed

from agent.basket import parse_member
from agent.engine import price
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import Ruleset, load_ruleset, parse_ruleset
from agent.snapshot import SnapshotCard, SnapshotMember, write_snapshot
from sync.hq import members as mt
from sync.hq.api import create_hq_app
from sync.hq.audit import RulesetLibrary
from sync.hq.centre import jobs, jobs_api, lots, rebates
from sync.hq.centre.programme import JobContext, Programme, add_months
from sync.hq.centre.staff import bearer_value
from sync.hq.config import load_hq_config
from sync.hq.db import HqDatabase
from sync.hq.metrics import HqMetrics
from sync.hq.owner import DbOwner
from sync.hq.schema import centre_audit, centre_ledger, member_changes, notifications
from sync.wire import RawEntry

XX_TEXT = (REPO_ROOT / "config" / "rules" / "xx-mall.toml").read_text(encoding="utf-8")
XX = Programme(parse_ruleset(XX_TEXT, "xx-mall.toml"))
M888 = Programme(load_ruleset(RULES_888))
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
STAFF_SECRET = "staff-secret-for-the-tests"


def draft_text(expiry: str, *, points_tender: bool = False) -> str:
    """xx mall's ruleset with another ``[centre.expiry]`` (and, if asked, points accepted at the till)."""
    text = XX_TEXT.replace('[centre.expiry]\npolicy = "card_validity"\n', f"[centre.expiry]\n{expiry}\n")
    assert text != XX_TEXT
    if points_tender:
        text, count = re.subn(r"(\[tenders\.points\]\n(?:#.*\n)*)accepted = false", r"\1accepted = true", text)
        assert count == 1
    return text


ROLLING_TEXT = draft_text('policy = "rolling"\nmonths = 6', points_tender=True)
ROLLING = Programme(parse_ruleset(ROLLING_TEXT, "draft-rolling.toml"))
YEAR_END = Programme(parse_ruleset(draft_text('policy = "year_end"'), "draft-year-end.toml"))


def local(year: int, month: int, day: int, hour: int = 14) -> dt.datetime:
    return dt.datetime(year, month, day, hour, 5, tzinfo=SHANGHAI)


D = dt.date


# --- members, lanes, jobs ------------------------------------------------------------------


def import_members(
    db: HqDatabase,
    directory: Path,
    specs: list[tuple[str, str, list[tuple[int, D, D | None]]]],
    *,
    points: int = 0,
    rebate: str = "0.00",
) -> None:
    """Members ``(member_id, tier, [(card index, valid_from, valid_until)])`` through the snapshot import."""
    lines = [
        SnapshotMember(
            member_id=member_id,
            tier=tier,
            points_balance=points,
            rebate_balance=rebate,
            version=1,
            cards=tuple(
                SnapshotCard(card_hash=hashed(i), kind="standard", state="active", valid_from=start, valid_until=end)
                for i, start, end in cards
            ),
        )
        for member_id, tier, cards in specs
    ]
    path = directory / f"members-{uuid.uuid4().hex[:8]}.jsonl"
    write_snapshot(path, lines, version=1, card_key=KEY)
    db.members.import_members(path, KEY)


def member_doc(member_id: str, *, tier: str = "vip", points: int = 0) -> dict[str, Any]:
    """The member as the lane had it when it priced (the 888 mall's tiers price the test baskets)."""
    return {
        "member_id": member_id,
        "tier": tier,
        "card_kind": "standard",
        "birthday": None,
        "points_balance": points,
        "rebate_balance": "0.00",
        "next_tier": None,
        "next_tier_from": None,
    }


def points_sale_body(
    ruleset: Ruleset, sale_id: str, member: dict[str, Any], at: dt.datetime, points: int
) -> dict[str, Any]:
    """A sale paid partly with ``points`` (a ruleset that takes points at the till), the rest in cash."""
    request = basket(sale_id=sale_id, at=at.isoformat(), member_id=member["member_id"])
    request["tenders"] = [{"kind": "points", "points": points}]
    priced_member = parse_member(member)
    first = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, at)
    request["tenders"].append({"kind": "cash", "amount": format_fen(first.unpaid_fen)})
    priced = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, at)
    assert priced.unpaid_fen == 0
    return {
        "v": 1,
        "kind": "sale",
        "store": "s01",
        "lane": "l01",
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": sale_id,
        "request": request,
        "member": member,
        "result": to_wire(priced),
    }


def totals(entry: RawEntry) -> dict[str, Any]:
    return dict(json.loads(entry.body)["result"]["totals"])


def earned(entry: RawEntry) -> int:
    return int(totals(entry)["points"])


def spent(entry: RawEntry) -> int:
    tenders = json.loads(entry.body)["result"]["tenders"]
    return sum(int(t["points"] or 0) for t in tenders if t["kind"] == "points")


def net(entry: RawEntry) -> int:
    return parse_money(totals(entry)["net"])


class Lane:
    """One lane's journal, sent to head office one entry per batch, seq by seq."""

    def __init__(self, db: HqDatabase) -> None:
        self.db = db
        self.seq = 0

    def send(self, kind: str, body: dict[str, Any], at: dt.datetime) -> RawEntry:
        self.seq += 1
        entry = raw(self.seq, kind, body, at=at)
        applied = self.db.apply_batch(batch_of([entry]), TOPIC)
        assert (applied.applied, applied.dead, applied.unknown_members) == (1, 0, 0)
        return entry

    def sale(self, member_id: str, at: dt.datetime, *, tier: str = "vip") -> RawEntry:
        body = sale_body(f"S{self.seq + 1:05d}", member=member_doc(member_id, tier=tier), variant=self.seq, at=at)
        return self.send("sale", body, at)

    def points_sale(self, ruleset: Ruleset, member_id: str, at: dt.datetime, points: int, balance: int) -> RawEntry:
        member = member_doc(member_id, tier="normal", points=balance)
        body = points_sale_body(ruleset, f"S{self.seq + 1:05d}", member, at, points)
        return self.send("sale", body, at)


def run(db: HqDatabase, programme: Programme, name: str, day: D) -> dict[str, int]:
    return jobs.run_job(JobContext(db, programme, day, db.now()), name).summary


def adjust(db: HqDatabase, member_id: str, points: int, day: D, *, rebate_fen: int = 0) -> None:
    with db.transaction() as conn:
        mt.adjust(conn, member_id, points, rebate_fen, "desk correction", db.now(), actor="tester", on_date=day)


def balance(db: HqDatabase, member_id: str) -> tuple[int, int]:
    with db.reading() as conn:
        member = mt.get_member(conn, member_id)
    assert member is not None
    return member.points_balance, member.rebate_fen


def lots_of(db: HqDatabase, programme: Programme, member_id: str) -> list[tuple[D, D | None, int]]:
    with db.reading() as conn:
        member = mt.get_member(conn, member_id)
        assert member is not None
        rows = lots.ledger_rows(conn, member_id, tz=programme.tz)
    found = lots.lots(programme, rows, lots.validity_end(member.cards.values()))
    return [(lot.earned, lot.expires, lot.remaining) for lot in found]


def table(db: HqDatabase, which: Table) -> list[tuple[Any, ...]]:
    with db.reading() as conn:
        return [tuple(row) for row in conn.execute(select(which).order_by(*which.primary_key.columns))]


def ledger_of(db: HqDatabase, member_id: str) -> list[tuple[str, str, int, int, D, str | None]]:
    c = centre_ledger.c
    query = select(c.key, c.kind, c.points, c.rebate_fen, c.on_date, c.ref).where(c.member_id == member_id)
    with db.reading() as conn:
        return [(k, kind, int(p), int(r), on, ref) for k, kind, p, r, on, ref in conn.execute(query.order_by(c.id))]


def last_line(db: HqDatabase, member_id: str) -> tuple[str, dict[str, Any]]:
    c = member_changes.c
    query = select(c.reason, c.line).where(c.member_id == member_id).order_by(c.version.desc()).limit(1)
    with db.reading() as conn:
        reason, line = conn.execute(query).one()
    return reason, json.loads(line)


def reconciled(db: HqDatabase) -> lots.LedgerTotals:
    """The ledger totals, checked member by member as well as in sum."""
    with db.reading() as conn:
        found = lots.ledger_totals(conn)
        for member_id, points, rebate in conn.execute(
            select(mt.members.c.member_id, mt.members.c.points_balance, mt.members.c.rebate_fen)
        ):
            assert lots.balances(conn, member_id) == lots.Balances(int(points), int(rebate)), member_id
    assert found.balanced, found
    return found


# --- the pure parts -------------------------------------------------------------------------


def row(day: D, kind: str, points: int, *, ref: str | None = None, source: str = "") -> lots.LedgerRow:
    at = dt.datetime.combine(day, dt.time(6), dt.UTC)
    return lots.LedgerRow(day, at, kind, points, 0, source or f"{kind}-{day}-{points}", lane=False, ref=ref)


def test_expiry_dates_follow_the_policy() -> None:
    # Rolling six months: "half-year" dates, the month's end where the day does not exist.
    assert lots.expiry_date(ROLLING, D(2026, 1, 31), None) == D(2026, 7, 31)
    assert lots.expiry_date(ROLLING, D(2026, 8, 31), None) == D(2027, 2, 28)
    assert lots.expiry_date(YEAR_END, D(2026, 3, 1), None) == D(2026, 12, 31)
    later = Programme(parse_ruleset(draft_text('policy = "year_end"\nyears_after = 1'), "draft.toml"))
    assert lots.expiry_date(later, D(2026, 3, 1), None) == D(2027, 12, 31)
    assert lots.expiry_date(XX, D(2026, 3, 1), D(2027, 6, 30)) == D(2027, 6, 30)
    assert lots.expiry_date(XX, D(2026, 3, 1), None) is None
    never = Programme(parse_ruleset(draft_text('policy = "none"'), "draft.toml"))
    assert lots.expiry_date(never, D(2026, 3, 1), D(2027, 6, 30)) is None
    # The cutoff is the last earning day that has lapsed by the job's day.
    assert lots.lapse_cutoff(ROLLING, D(2026, 8, 1)) == D(2026, 1, 31)
    assert lots.lapse_cutoff(ROLLING, D(2026, 7, 31)) == D(2026, 1, 30)
    assert lots.lapse_cutoff(ROLLING, D(2026, 8, 31)) == D(2026, 2, 28)
    for day in (D(2026, 8, 1) + dt.timedelta(days=n) for n in range(400)):
        cutoff = lots.lapse_cutoff(ROLLING, day)
        assert cutoff is not None
        assert add_months(cutoff, 6) < day <= add_months(cutoff + dt.timedelta(days=1), 6)
    assert lots.lapse_cutoff(YEAR_END, D(2027, 1, 1)) == D(2026, 12, 31)
    assert lots.lapse_cutoff(YEAR_END, D(2026, 12, 31)) == D(2025, 12, 31)
    assert lots.lapse_cutoff(XX, D(2027, 7, 1)) is None


def test_card_validity_end_is_the_latest_card() -> None:
    now = dt.datetime.now(dt.UTC)

    def card(i: int, until: D | None) -> mt.Card:
        return mt.Card(hashed(i), "standard", "active", D(2026, 1, 1), until, 1, now)

    assert lots.validity_end([]) is None
    assert lots.validity_end([card(1, D(2027, 6, 30)), card(2, D(2028, 6, 30))]) == D(2028, 6, 30)
    assert lots.validity_end([card(1, D(2027, 6, 30)), card(2, None)]) is None


def test_lots_are_consumed_soonest_expiring_first_and_a_deficit_is_paid_first() -> None:
    rows = [
        row(D(2026, 1, 10), "earn", 100),  # valid through 2026-07-10
        row(D(2026, 3, 10), "earn", 50),  # through 2026-09-10
        row(D(2026, 2, 1), "adjust", -30),  # taken from the January lot
        row(D(2026, 4, 1), "redeem", -80),  # the rest of January's, then 10 of March's
    ]
    assert [(lot.earned, lot.expires, lot.remaining) for lot in lots.lots(ROLLING, rows, None)] == [
        (D(2026, 3, 10), D(2026, 9, 10), 40)
    ]
    # Spent beyond the lots (offline): the next earning pays the deficit first.
    rows = [row(D(2026, 1, 10), "earn", 20), row(D(2026, 1, 11), "redeem", -50), row(D(2026, 2, 1), "earn", 100)]
    assert [(lot.earned, lot.remaining) for lot in lots.lots(ROLLING, rows, None)] == [(D(2026, 2, 1), 70)]
    # An expire row takes the lots of the date it names, even where others expire sooner, and sorts first on its day.
    rows = [
        row(D(2026, 1, 10), "earn", 100),
        row(D(2026, 2, 10), "earn", 60),
        row(D(2026, 8, 11), "redeem", -10),
        row(D(2026, 8, 11), "expire", -60, ref="2026-08-10"),
    ]
    assert [(lot.earned, lot.remaining) for lot in lots.lots(ROLLING, rows, None)] == [(D(2026, 1, 10), 90)]


# --- card validity (xx mall: half-year validity) ---------------------------------------------


def test_xx_mall_points_lapse_with_the_card(db: HqDatabase, tmp_path: Path) -> None:
    # Card issued 2026-03-15: valid from the 16th to 30 June of the next year; one issued
    # 2026-09-01 (second half) to 30 June of the year after that.
    import_members(
        db,
        tmp_path,
        [
            ("X1", "normal", [(1, D(2026, 3, 16), D(2027, 6, 30))]),
            ("X2", "normal", [(2, D(2026, 9, 2), D(2028, 6, 30))]),
            # Renewed before it ran out: the new card's validity carries the points on.
            ("X3", "normal", [(3, D(2026, 3, 16), D(2027, 6, 30)), (4, D(2027, 6, 20), D(2028, 6, 30))]),
        ],
    )
    lane = Lane(db)
    x1 = [lane.sale("X1", local(2026, 4, 1)), lane.sale("X1", local(2027, 6, 30, 21))]
    x2 = [lane.sale("X2", local(2026, 10, 1))]
    x3 = [lane.sale("X3", local(2026, 5, 1))]
    x1_points = sum(map(earned, x1))
    assert x1_points > 0
    assert balance(db, "X1")[0] == x1_points
    assert lots_of(db, XX, "X1") == [
        (D(2026, 4, 1), D(2027, 6, 30), earned(x1[0])),
        (D(2027, 6, 30), D(2027, 6, 30), earned(x1[1])),
    ]

    # Valid through 30 June: the run for that day lapses nothing.
    assert run(db, XX, "expiry", D(2027, 6, 30)) == {"candidates": 0, "members": 0, "lots": 0, "points": 0}
    assert balance(db, "X1")[0] == x1_points
    assert run(db, XX, "expiry", D(2027, 7, 1)) == {"candidates": 1, "members": 1, "lots": 2, "points": x1_points}
    assert balance(db, "X1") == (0, 0)
    assert lots_of(db, XX, "X1") == []
    assert ledger_of(db, "X1") == [
        ("expire:2027-06-30:X1", "expire", -x1_points, 0, D(2027, 7, 1), "2027-06-30"),
    ]
    reason, line = last_line(db, "X1")
    assert (reason, line["points_balance"]) == ("centre: expire", 0)
    [(key, kind, detail)] = [(n[1], n[3], json.loads(n[4])) for n in table(db, notifications) if n[2] == "X1"]
    assert (key, kind, detail["points"], detail["valid_through"]) == (
        "expired:2027-06-30:X1",
        "points_expired",
        x1_points,
        "2027-06-30",
    )
    # The others keep theirs: X2's card runs to 2028, X3 renewed.
    assert balance(db, "X2")[0] == earned(x2[0])
    assert balance(db, "X3")[0] == earned(x3[0])
    assert run(db, XX, "expiry", D(2028, 6, 30))["points"] == 0
    assert run(db, XX, "expiry", D(2028, 7, 1)) == {
        "candidates": 2,
        "members": 2,
        "lots": 2,
        "points": earned(x2[0]) + earned(x3[0]),
    }
    assert balance(db, "X2")[0] == balance(db, "X3")[0] == 0
    reconciled(db)


# --- rolling and year-end expiry; what is consumed first ------------------------------------


def test_rolling_half_year_expiry_takes_the_redeemed_lots_first(db: HqDatabase, tmp_path: Path) -> None:
    import_members(
        db, tmp_path, [("R1", "normal", [(1, D(2025, 6, 1), None)]), ("R2", "normal", [(2, D(2025, 6, 1), None)])]
    )
    lane = Lane(db)
    january = lane.sale("R1", local(2026, 1, 31))  # valid through 2026-07-31
    february = lane.sale("R1", local(2026, 2, 1))  # through 2026-08-01
    a, b = earned(january), earned(february)
    assert a > 300
    # A redemption at the till (points tender) and a desk correction take January's lot first.
    redeemed = lane.points_sale(ROLLING.ruleset, "R1", local(2026, 3, 5), 200, a + b)
    assert spent(redeemed) == 200
    adjust(db, "R1", -50, D(2026, 3, 6))
    c = earned(redeemed)  # points earned on the cash part: a lot of March
    assert balance(db, "R1")[0] == a + b + c - 250
    # R2 spent its January points before they lapsed: nothing of January's is left to lapse.
    r2 = lane.sale("R2", local(2026, 1, 20))
    adjust(db, "R2", -earned(r2), D(2026, 6, 1))

    assert run(db, ROLLING, "expiry", D(2026, 7, 31)) == {"candidates": 0, "members": 0, "lots": 0, "points": 0}
    assert run(db, ROLLING, "expiry", D(2026, 8, 1)) == {"candidates": 1, "members": 1, "lots": 1, "points": a - 250}
    assert ledger_of(db, "R1")[-1] == ("expire:2026-07-31:R1", "expire", 250 - a, 0, D(2026, 8, 1), "2026-07-31")
    assert balance(db, "R1")[0] == b + c
    assert run(db, ROLLING, "expiry", D(2026, 8, 2))["points"] == b
    remaining = [(D(2026, 3, 5), D(2026, 9, 5), c)] if c else []
    assert lots_of(db, ROLLING, "R1") == remaining
    assert balance(db, "R2") == (0, 0)
    reconciled(db)


def test_year_end_expiry_clears_the_years_points(db: HqDatabase, tmp_path: Path) -> None:
    import_members(db, tmp_path, [("Y1", "normal", [(1, D(2025, 6, 1), None)])])
    lane = Lane(db)
    old = lane.sale("Y1", local(2026, 5, 5))
    new = lane.sale("Y1", local(2027, 1, 1, 10))
    assert run(db, YEAR_END, "expiry", D(2026, 12, 31))["points"] == 0
    assert run(db, YEAR_END, "expiry", D(2027, 1, 1)) == {
        "candidates": 1,
        "members": 1,
        "lots": 1,
        "points": earned(old),
    }
    assert balance(db, "Y1")[0] == earned(new)
    assert lots_of(db, YEAR_END, "Y1") == [(D(2027, 1, 1), D(2027, 12, 31), earned(new))]


def test_expiry_never_takes_a_balance_below_zero(db: HqDatabase, tmp_path: Path) -> None:
    # A lane's sale for a member head office did not know yet, then an import with a smaller balance:
    # the lots hold more than the balance, and the expiry stops at zero.
    body = sale_body("S-early", member=member_doc("Z1"), at=local(2026, 1, 10))
    entry = raw(1, "sale", body, at=local(2026, 1, 10))
    assert db.apply_batch(batch_of([entry]), TOPIC).unknown_members == 1
    import_members(db, tmp_path, [("Z1", "normal", [(1, D(2025, 6, 1), None)])], points=100)
    assert earned(entry) > 100
    assert run(db, ROLLING, "expiry", D(2026, 8, 1)) == {"candidates": 1, "members": 1, "lots": 1, "points": 100}
    assert balance(db, "Z1") == (0, 0)
    before = table(db, centre_ledger)
    assert run(db, ROLLING, "expiry", D(2026, 8, 1))["points"] == 0
    assert table(db, centre_ledger) == before
    # The reconciliation shows it: Z1's ledger is not its balance (the early sale never moved it).
    stray = raw(2, "sale", sale_body("S-stray", member=member_doc("U9"), at=local(2026, 2, 1)), at=local(2026, 2, 1))
    assert db.apply_batch(batch_of([stray]), TOPIC).unknown_members == 1
    with db.reading() as conn:
        found = lots.ledger_totals(conn)
        assert lots.balances(conn, "Z1") == lots.Balances(earned(entry), 0)
    assert not found.balanced
    assert (found.members, found.mismatched, found.balance_points) == (1, 1, 0)
    assert found.ledger_points == earned(entry)
    assert (found.unknown_points, found.unknown_rebate_fen) == (earned(stray), 0)


# --- rebates (888 mall) ----------------------------------------------------------------------


def test_rebate_periods_tile_the_year() -> None:
    assert rebates.period(M888, D(2026, 12, 10)) == (D(2026, 9, 10), D(2026, 12, 9))
    assert rebates.period(M888, D(2027, 3, 10)) == (D(2026, 12, 10), D(2027, 3, 9))
    assert rebates.period(M888, D(2026, 6, 10)) == (D(2026, 3, 10), D(2026, 6, 9))
    days = [D(2026, 3, 10), D(2026, 6, 10), D(2026, 9, 10), D(2026, 12, 10), D(2027, 3, 10)]
    assert [rebates.is_settlement_day(M888, day) for day in days] == [True] * 5
    assert not rebates.is_settlement_day(M888, D(2026, 12, 11))
    assert not rebates.is_settlement_day(XX, D(2026, 12, 10))
    for before, after in itertools.pairwise(days):
        assert rebates.period(M888, after) == (before, after - dt.timedelta(days=1))


def test_888_rebate_is_two_percent_of_the_periods_card_spend(db: HqDatabase, tmp_path: Path) -> None:
    card = [(1, D(2026, 1, 2), D(2027, 1, 1))]
    import_members(db, tmp_path, [("V1", "vip", card)], rebate="5.00")
    import_members(db, tmp_path, [("P1", "points_card", [(2, D(2026, 1, 2), D(2027, 1, 1))])])
    # A points-card holder whose VIP card takes effect on the settlement day takes part.
    import_members(db, tmp_path, [("N1", "points_card", [(3, D(2026, 1, 2), D(2027, 1, 1))])])
    with db.transaction() as conn:
        mt.set_tier(conn, "N1", "points_card", "vip", D(2026, 12, 10), "screened", db.now())
    lane = Lane(db)
    lane.sale("V1", local(2026, 9, 9, 23))  # the previous period
    in_period = [
        lane.sale("V1", local(2026, 9, 10, 9)),
        lane.sale("V1", local(2026, 10, 15)),
        lane.sale("V1", local(2026, 11, 2)),
        lane.sale("V1", local(2026, 12, 9, 21)),
    ]
    lane.sale("V1", local(2026, 12, 10, 10))  # the settlement day: the next period
    returned = lane.send("return", return_body(in_period[1], "R1", [("1", "120.00", 100)]), local(2026, 11, 20))
    lane.send("void", void_body(in_period[2]), local(2026, 11, 2, 15))
    p1 = [lane.sale("P1", local(2026, 10, 1, 11), tier="points_card")]
    n1 = [lane.sale("N1", local(2026, 11, 11, 11), tier="points_card")]
    refund = parse_money(json.loads(returned.body)["refund"])
    spend = sum(map(net, in_period)) - refund - net(in_period[2])
    expected = spend * 2 // 100
    assert expected > 0
    assert net(p1[0]) > 0

    assert run(db, M888, "rebates", D(2026, 12, 9)) == {
        "due": 0,
        "eligible": 0,
        "members": 0,
        "rebate_fen": 0,
        "spend_fen": 0,
    }
    assert run(db, M888, "rebates", D(2026, 12, 11))["due"] == 0
    assert balance(db, "V1")[1] == 500
    summary = run(db, M888, "rebates", D(2026, 12, 10))
    n1_rebate = net(n1[0]) * 2 // 100
    assert summary == {
        "due": 1,
        "eligible": 2,
        "members": 2,
        "rebate_fen": expected + n1_rebate,
        "spend_fen": spend + net(n1[0]),
    }
    assert balance(db, "V1")[1] == 500 + expected
    assert balance(db, "P1")[1] == 0
    assert balance(db, "N1")[1] == n1_rebate
    [(key, kind, points, rebate_fen, on_date, ref)] = ledger_of(db, "V1")[-1:]
    assert (key, kind, points, rebate_fen, on_date, ref) == (
        "rebate:2026-12-10:V1",
        "rebate_credit",
        0,
        expected,
        D(2026, 12, 10),
        "2026-09-10..2026-12-09",
    )
    assert ledger_of(db, "P1") == []
    reason, line = last_line(db, "V1")
    assert (reason, line["rebate_balance"]) == ("centre: rebate_credit", format_fen(500 + expected))
    [detail] = [json.loads(n[4]) for n in table(db, notifications) if n[1] == "rebate:2026-12-10:V1"]
    assert (detail["rebate"], detail["spend"]) == (format_fen(expected), format_fen(spend))

    before = (table(db, centre_ledger), table(db, notifications), table(db, member_changes))
    assert run(db, M888, "rebates", D(2026, 12, 10))["members"] == 0
    assert (table(db, centre_ledger), table(db, notifications), table(db, member_changes)) == before
    reconciled(db)


# --- jobs run twice; the whole ledger reconciles ---------------------------------------------


def test_jobs_run_twice_give_the_same_ledger_and_the_ledger_reconciles(db: HqDatabase, tmp_path: Path) -> None:
    card = [(1, D(2026, 1, 2), D(2027, 1, 1))]
    import_members(db, tmp_path, [("V1", "vip", card)], points=400, rebate="10.00")
    import_members(db, tmp_path, [("V2", "gold", [(2, D(2026, 1, 2), None)])])
    lane = Lane(db)
    made = [
        lane.sale("V1", local(2026, 1, 20)),
        lane.sale("V1", local(2026, 9, 20)),
        lane.sale("V2", local(2026, 2, 2)),
    ]
    lane.send("return", return_body(made[1], "R1", [("1", "50.00", 40)]), local(2026, 9, 21))
    voided = lane.sale("V2", local(2026, 10, 1))
    lane.send("void", void_body(voided), local(2026, 10, 1, 16))
    adjust(db, "V1", -30, D(2026, 3, 1), rebate_fen=-100)
    adjust(db, "V2", 25, D(2026, 4, 1))
    with db.reading() as conn:
        rows = [r for member in ("V1", "V2") for r in lots.ledger_rows(conn, member)]
    assert {r.kind for r in rows} >= {"earn", "return", "void", "adjust", "import"}

    # 888 mall, but with a rolling six-month expiry for this test.
    original = RULES_888.read_text(encoding="utf-8")
    text = original.replace(
        '[centre.expiry]\npolicy = "card_validity"\n', '[centre.expiry]\npolicy = "rolling"\nmonths = 6\n'
    )
    assert text != original
    programme = Programme(parse_ruleset(text, "888-rolling.toml"))
    days = [D(2026, 7, 21), D(2026, 8, 2), D(2026, 12, 10)]
    first = [(run(db, programme, "expiry", day), run(db, programme, "rebates", day)) for day in days]
    assert first[0][0]["points"] > 0  # January's points lapsed in July
    assert first[2][1]["members"] == 1  # V1's rebate (V2's spend in the period was voided)
    snapshot = (table(db, centre_ledger), table(db, notifications), table(db, member_changes))
    for day in [*days, D(2026, 7, 1)]:  # again, and an earlier day after the later ones
        assert run(db, programme, "expiry", day)["points"] == 0
        rebated = run(db, programme, "rebates", day)
        assert rebated["members"] == rebated["rebate_fen"] == 0
    assert (table(db, centre_ledger), table(db, notifications), table(db, member_changes)) == snapshot

    found = reconciled(db)
    # The balances are the lanes' journals plus head office's movements, computed from what was sent.
    # Sales earn, the return takes back 40, the void takes back what its sale earned.
    lane_points = sum(map(earned, made)) + earned(voided) - 40 - earned(voided)
    with db.reading() as conn:
        centre_points = sum(int(r.points) for r in conn.execute(select(centre_ledger)))
    assert found.ledger_points == found.balance_points == lane_points + centre_points
    assert centre_points == 400 - 30 + 25 - sum(expired["points"] for expired, _ in first)
    assert found.ledger_rebate_fen == 1000 - 100 + first[2][1]["rebate_fen"]
    assert (found.unknown_points, found.mismatched, found.members) == (0, 0, 2)


# --- lane-hq jobs, a real process ---------------------------------------------------------------


def hq_config(tmp_path: Path, db_url: str, *, ruleset: str | None = "xx-mall") -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "xx-mall.toml").write_text(XX_TEXT, encoding="utf-8")
    centre = f'[centre]\nruleset = "{ruleset}"\nstaff_secret_env = "LANE_HQ_TEST_STAFF"\n' if ruleset else ""
    config = tmp_path / f"hq-{ruleset}.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n\n[rules]\ndirectory = "{rules}"\n\n'
        f'[members]\ncard_hash_key = "hex:{KEY.hex()}"\n\n{centre}',
        encoding="utf-8",
    )
    return config


def lane_hq(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args, "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LANE_HQ_TEST_STAFF": STAFF_SECRET},
    )


def test_lane_hq_jobs_run_expiry_prints_what_it_did_and_is_idempotent(
    db: HqDatabase, db_url: str, tmp_path: Path
) -> None:
    import_members(db, tmp_path, [("X1", "normal", [(1, D(2026, 3, 16), D(2027, 6, 30))])])
    sale = Lane(db).sale("X1", local(2026, 4, 1))
    config = hq_config(tmp_path, db_url)

    done = lane_hq(config, "jobs", "run", "expiry", "--date", "2027-06-30")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "expiry 2027-06-30: candidates=0 lots=0 members=0 points=0"
    done = lane_hq(config, "jobs", "run", "expiry", "--date", "2027-07-01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"expiry 2027-07-01: candidates=1 lots=1 members=1 points={earned(sale)}"
    assert balance(db, "X1") == (0, 0)
    before = (table(db, centre_ledger), table(db, notifications))
    again = lane_hq(config, "jobs", "run", "expiry", "--date", "2027-07-01")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "expiry 2027-07-01: candidates=0 lots=0 members=0 points=0, run 2 for this day"
    assert (table(db, centre_ledger), table(db, notifications)) == before

    listed = lane_hq(config, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].startswith("2027-07-01  expiry     runs=2")
    assert len(listed.stdout.splitlines()) == 2

    # Every job due on a day, in order: the daily ones (no screening on the 2nd, no rebates in xx mall).
    due = lane_hq(config, "jobs", "due", "--date", "2027-07-02")
    assert due.returncode == 0, due.stderr
    assert [line.split(":")[0] for line in due.stdout.splitlines()] == ["tiers 2027-07-02", "expiry 2027-07-02"]
    assert due.stdout.splitlines()[1] == "expiry 2027-07-02: candidates=0 lots=0 members=0 points=0"

    unknown = lane_hq(config, "jobs", "run", "nope", "--date", "2027-07-01")
    assert unknown.returncode == 1
    assert "no job 'nope': one of tiers, screening, expiry, rebates" in unknown.stderr
    bad_date = lane_hq(config, "jobs", "run", "expiry", "--date", "2027-13-01")
    assert bad_date.returncode == 2
    assert "is not a date" in bad_date.stderr
    no_programme = lane_hq(hq_config(tmp_path, db_url, ruleset=None), "jobs", "run", "expiry", "--date", "2027-07-01")
    assert no_programme.returncode == 1
    assert "[centre] ruleset is not set" in no_programme.stderr
    assert (table(db, centre_ledger), table(db, notifications)) == before


# --- the HTTP routes ----------------------------------------------------------------------------


def test_jobs_api_runs_a_job_for_staff_only(
    db: HqDatabase, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANE_HQ_TEST_STAFF", STAFF_SECRET)
    import_members(db, tmp_path, [("X1", "normal", [(1, D(2026, 3, 16), D(2027, 6, 30))])])
    sale = Lane(db).sale("X1", local(2026, 4, 1))
    config = load_hq_config(hq_config(tmp_path, db_url))
    library = RulesetLibrary.load(config.rules.directory)
    owner = DbOwner(db)
    app = create_hq_app(owner, HqMetrics(), routers=[jobs_api.router(config, owner, library)])
    staff = {"Authorization": f"Bearer {bearer_value(STAFF_SECRET.encode(), 'desk.anna')}"}
    run_url = "/v1/centre/jobs/expiry/run?date=2027-07-01"

    async def calls() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hq") as client:
            assert (await client.post(run_url)).status_code == 401
            forged = {"Authorization": "Bearer desk.anna:" + "A" * 43}
            assert (await client.post(run_url, headers=forged)).status_code == 401
            answer = await client.post(run_url, headers=staff)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "job": "expiry",
                "day": "2027-07-01",
                "runs": 1,
                "summary": {"candidates": 1, "members": 1, "lots": 1, "points": earned(sale)},
            }
            again = (await client.post(run_url, headers=staff)).json()
            assert (again["runs"], again["summary"]["points"]) == (2, 0)
            unknown = await client.post("/v1/centre/jobs/nope/run?date=2027-07-01", headers=staff)
            assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_job")
            bad = await client.post("/v1/centre/jobs/expiry/run?date=tomorrow", headers=staff)
            assert (bad.status_code, bad.json()["error"]["code"]) == (422, "bad_date")
            assert (await client.get("/v1/centre/jobs")).status_code == 401
            runs = (await client.get("/v1/centre/jobs", headers=staff)).json()["runs"]
            assert [(r["job"], r["day"], r["runs"]) for r in runs] == [("expiry", "2027-07-01", 2)]

    try:
        asyncio.run(calls())
    finally:
        owner._pool.shutdown(wait=True)
    assert balance(db, "X1") == (0, 0)
    audit = [(r[2], r[3], json.loads(r[7])["summary"]["points"]) for r in table(db, centre_audit)]
    assert audit == [("desk.anna", "job_run", earned(sale)), ("desk.anna", "job_run", 0)]
