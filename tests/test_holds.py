"""Redemption holds (docs/downlink.md): head office's side on SQLite and PostgreSQL, then real lanes end to end.

Head office's tests call ``sync.hq.holds`` on a real database the way the
API's owner thread does, and apply journal batches built as lanes build
them.  The end-to-end tests run a real Mosquitto, a real ``lane-hq run`` and
two real ``lane-agent run`` processes, each lane with its own token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import Broker
from conftest import MEMBER_DAY, RULES_888
from hq_harness import Hq, HqReader
from lane_harness import KEY, SHANGHAI, Lane, basket
from lane_harness import members as lane_members
from pgdb import fresh_database
from sqlalchemy import create_engine, text

from agent.basket import parse_member
from agent.config import LaneConfig, parse_config
from agent.engine import price
from agent.errors import SaleConflictError, SpendRefusedError
from agent.events import EventBus
from agent.holds import HoldAnswer, HoldRequest, Spend
from agent.metrics import Metrics
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import load_ruleset
from agent.service import LaneService
from agent.snapshot import SnapshotMember, write_snapshot
from agent.store import LaneStore
from sync.holds_client import HqHolds
from sync.hq import holds
from sync.hq.db import HqDatabase
from sync.lane_auth import lane_token
from sync.wire import RawEntry, decode_batch, encode_batch

pytestmark = pytest.mark.timeout(180)

STORE, LANE, OTHER_LANE = "s01", "l01", "l02"
EPOCH = "0123456789abcdef" * 2
T0 = dt.datetime(2026, 12, 10, 6, 0, tzinfo=dt.UTC)
HOLD_SECONDS = 300
POINTS_VERSION = "2026.11.1-points"


def points_rules(directory: Path) -> Path:
    """The 888 mall's ruleset with points taken at the till (100 points = 1.00), under its own version."""
    source = RULES_888.read_text(encoding="utf-8")
    assert source.count("accepted = false") == 1  # [tenders.points], the only tender it refuses
    changed = source.replace("accepted = false", "accepted = true").replace(
        'version = "2026.11.1"', f'version = "{POINTS_VERSION}"', 1
    )
    path = directory / "888-mall-points.toml"
    path.write_text(changed, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_ruleset(points_rules(tmp_path_factory.mktemp("rules")))


# --- journal bodies, as agent/service.py writes them ---------------------------------


def member_doc(member_id: str, points: int = 100_000, rebate: str = "1000.00") -> dict[str, Any]:
    """The lane's cached member: it may believe in more than head office has (that is the point)."""
    return {
        "member_id": member_id,
        "tier": "vip",
        "card_kind": "standard",
        "birthday": None,
        "points_balance": points,
        "rebate_balance": rebate,
        "next_tier": None,
        "next_tier_from": None,
    }


def sale_body(
    ruleset: Any,
    sale_id: str,
    member_id: str | None,
    *,
    points: int = 0,
    rebate: str | None = None,
    coupons: tuple[str, ...] = (),
    hold: dict[str, Any] | None = None,
    lane: str = LANE,
) -> dict[str, Any]:
    request = basket(sale_id=sale_id, at=MEMBER_DAY.isoformat())
    tenders: list[dict[str, Any]] = []
    if points:
        tenders.append({"kind": "points", "points": points})
    if rebate:
        tenders.append({"kind": "rebate", "amount": rebate})
    tenders.extend({"kind": "coupon", "amount": "10.00", "subkind": code} for code in coupons)
    member = None if member_id is None else member_doc(member_id)
    if member_id is not None:
        request["member_id"] = member_id
    priced_member = None if member is None else parse_member(member)
    request["tenders"] = tenders
    due = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, MEMBER_DAY).unpaid_fen
    request["tenders"] = [*tenders, {"kind": "cash", "amount": format_fen(due)}]
    priced = price(SaleIn.model_validate(request).to_basket(), priced_member, ruleset, MEMBER_DAY)
    assert priced.unpaid_fen == 0
    body: dict[str, Any] = {
        "v": 1,
        "kind": "sale",
        "store": STORE,
        "lane": lane,
        "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "sale_id": sale_id,
        "request": request,
        "member": member,
    }
    if hold is not None:
        body["hold"] = hold
    body["result"] = to_wire(priced)
    return body


class Journal:
    """A lane's journal at head office: entries numbered in order, applied a batch at a time."""

    def __init__(self, db: HqDatabase, lane: str = LANE) -> None:
        self.db, self.lane, self.seq = db, lane, 0

    def apply(self, *bodies: dict[str, Any]) -> tuple[list[str], tuple[str, ...]]:
        """Apply the bodies as one batch; the entries' ids and the flags raised."""
        entries = []
        for body in bodies:
            self.seq += 1
            entries.append(
                RawEntry(
                    self.seq,
                    str(uuid.uuid4()),
                    "sale",
                    MEMBER_DAY.isoformat(),
                    body["rules"]["version"],
                    1,
                    json.dumps(body),
                )
            )
        self.last = decode_batch(STORE, self.lane, encode_batch(STORE, self.lane, EPOCH, entries))
        applied = self.db.apply_batch(self.last, f"retail/{STORE}/{self.lane}/journal")
        assert (applied.applied, applied.dead) == (len(bodies), 0)
        return [entry.id for entry in entries], applied.spend_flags

    def resend(self) -> tuple[str, ...]:
        """The last batch delivered again (a lane resending): duplicates only; the flags raised."""
        applied = self.db.apply_batch(self.last, f"retail/{STORE}/{self.lane}/journal")
        assert (applied.applied, applied.duplicates) == (0, len(self.last.entries))
        return applied.spend_flags


# --- head office's database ----------------------------------------------------------


def seed_members(db_url: str, directory: Path, balances: dict[str, tuple[int, str]]) -> None:
    """Head office's members (``{member_id: (points, rebate)}``), imported as ``lane-hq members import`` does."""
    path = directory / f"hq-members-{uuid.uuid4().hex[:6]}.jsonl"
    lines = [
        SnapshotMember(member_id=member_id, tier="vip", points_balance=points, rebate_balance=rebate)
        for member_id, (points, rebate) in balances.items()
    ]
    write_snapshot(path, lines, version=1, card_key=KEY)
    db = HqDatabase.open(db_url)
    try:
        db.members.import_members(path, KEY)
    finally:
        db.close()


class Clock:
    """Head office's clock in these tests: ingest judges holds by it."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[HqDatabase]:
    seed_members(db_url, tmp_path, {"M1": (300, "50.00"), "M2": (1000, "0.00"), "M3": (0, "0.00")})
    database = HqDatabase.open(db_url, now=clock)
    try:
        yield database
    finally:
        database.close()


def ask(
    sale_id: str,
    member_id: str | None = "M1",
    *,
    points: int = 0,
    rebate_fen: int = 0,
    coupons: tuple[str, ...] = (),
    lane: str = LANE,
    hold_id: str | None = None,
) -> holds.HoldRequest:
    return holds.HoldRequest(
        hold_id=hold_id or str(uuid.uuid4()),
        store=STORE,
        lane=lane,
        sale_id=sale_id,
        member_id=member_id,
        points=points,
        rebate_fen=rebate_fen,
        coupons=tuple(sorted(coupons)),
    )


def take(db: HqDatabase, request: holds.HoldRequest, now: dt.datetime = T0) -> holds.Taken:
    return holds.take_hold(db, request, hold_seconds=HOLD_SECONDS, now=now)


def refusal(db: HqDatabase, request: holds.HoldRequest, now: dt.datetime = T0) -> str:
    with pytest.raises(holds.HoldRefused) as caught:
        take(db, request, now)
    return caught.value.code


def balance(db: HqDatabase, member_id: str) -> tuple[int, int]:
    found = db.members.get(member_id)
    assert found is not None
    return found[0].points_balance, found[0].rebate_fen


def flags(db: HqDatabase) -> list[tuple[str, str | None, dict[str, Any]]]:
    with db._engine.connect() as conn:
        found = conn.execute(text("SELECT code, member_id, detail FROM spend_flags ORDER BY id")).all()
    return [(code, member, json.loads(detail)) for code, member, detail in found]


# --- taking holds ------------------------------------------------------------------------


def test_a_hold_takes_what_is_available_and_other_sales_see_it_taken(db: HqDatabase) -> None:
    first = take(db, ask("S1", points=200, rebate_fen=3000))
    assert (first.replayed, first.hold.status, first.hold.points, first.hold.rebate_fen) == (False, "held", 200, 3000)
    assert first.hold.expires_at == T0 + dt.timedelta(seconds=HOLD_SECONDS)
    assert first.hold.document()["rebate"] == "30.00"
    # 300 points and 50.00 of balance, 200 and 30.00 held by S1: the rest is there for another sale.
    assert refusal(db, ask("S2", points=101)) == "insufficient_points"
    assert refusal(db, ask("S2", rebate_fen=2001)) == "insufficient_rebate"
    second = take(db, ask("S2", points=100, rebate_fen=2000))
    assert second.hold.status == "held"
    assert refusal(db, ask("S3", points=1)) == "insufficient_points"
    # The same sale asking again (a retry after a failed commit) does not compete with its own hold.
    again = take(db, ask("S1", points=200, rebate_fen=3000))
    assert not again.replayed
    assert again.hold.hold_id != first.hold.hold_id
    assert balance(db, "M1") == (300, 5000)  # a hold moves no balance


def test_unknown_members_and_other_lanes_sales_are_told_apart(db: HqDatabase) -> None:
    assert refusal(db, ask("S1", "M404", points=1)) == "unknown_member"
    take(db, ask("S1", points=300))
    # The same sale id at another lane is another sale: it competes for the points.
    assert refusal(db, ask("S1", points=1, lane=OTHER_LANE)) == "insufficient_points"


def test_the_same_hold_id_answers_the_same_hold_and_another_body_conflicts(db: HqDatabase) -> None:
    request = ask("S1", points=100, coupons=("CPN-1",))
    first = take(db, request)
    again = take(db, request, T0 + dt.timedelta(seconds=5))
    assert again.replayed
    assert again.hold == first.hold
    assert again.hold.document() == first.hold.document()
    assert refusal(db, ask("S1", points=101, hold_id=request.hold_id)) == "hold_conflict"
    assert refusal(db, ask("S1", points=100, coupons=(), hold_id=request.hold_id)) == "hold_conflict"
    assert refusal(db, ask("S1", points=100, coupons=("CPN-1",), lane=OTHER_LANE, hold_id=request.hold_id)) == (
        "hold_conflict"
    )
    # The replay held nothing more: 200 points are still there for another sale.
    assert take(db, ask("S2", points=200)).hold.status == "held"


def test_holds_expire_by_time_and_are_marked_so(db: HqDatabase) -> None:
    first = take(db, ask("S1", points=300, coupons=("CPN-1",)))
    just_before = T0 + dt.timedelta(seconds=HOLD_SECONDS - 1)
    assert refusal(db, ask("S2", points=1), just_before) == "insufficient_points"
    assert refusal(db, ask("S2", "M2", coupons=("CPN-1",)), just_before) == "coupon_held"
    later = T0 + dt.timedelta(seconds=HOLD_SECONDS)
    # Past its time the hold counts nowhere: the coupon is free again even before anything marks it.
    assert take(db, ask("S3", "M2", coupons=("CPN-1",)), later).hold.status == "held"
    stored = holds.find_hold(db, first.hold.hold_id)
    assert stored is not None
    assert stored.status == "held"
    # Holding the member again marks their lapsed holds, and says how many.
    taken = take(db, ask("S2", points=300), later)
    assert (taken.hold.status, taken.expired) == ("held", 1)
    stored = holds.find_hold(db, first.hold.hold_id)
    assert stored is not None
    assert stored.status == "expired"
    # Its id asked for again answers it as it is: expired, not held.
    replay = take(db, ask("S1", points=300, coupons=("CPN-1",), hold_id=first.hold.hold_id), later)
    assert (replay.replayed, replay.hold.status) == (True, "expired")
    # The sweep marks the rest (the coupon hold of S3, once its time is up) and counts them.
    assert holds.expire_holds(db, later) == 0
    assert holds.expire_holds(db, later + dt.timedelta(seconds=HOLD_SECONDS)) == 2


def test_a_released_hold_frees_what_it_held_and_only_its_lane_releases_it(db: HqDatabase) -> None:
    first = take(db, ask("S1", points=300, coupons=("CPN-1",)))
    assert holds.release_hold(db, STORE, OTHER_LANE, first.hold.hold_id, T0) is None
    assert holds.release_hold(db, STORE, LANE, "no-such-hold", T0) is None
    assert refusal(db, ask("S2", "M2", coupons=("CPN-1",))) == "coupon_held"
    released = holds.release_hold(db, STORE, LANE, first.hold.hold_id, T0)
    assert released is not None
    assert (released[0].status, released[1]) == ("released", True)
    again = holds.release_hold(db, STORE, LANE, first.hold.hold_id, T0)
    assert again is not None
    assert (again[0].status, again[1]) == ("released", False)
    assert take(db, ask("S2", points=300)).hold.status == "held"
    assert take(db, ask("S3", "M2", coupons=("CPN-1",))).hold.status == "held"


def test_a_guest_may_hold_coupons_and_a_used_coupon_is_refused(db: HqDatabase, ruleset: Any) -> None:
    hold = take(db, ask("G1", None, coupons=("CPN-7", "CPN-8")))
    assert refusal(db, ask("G2", None, coupons=("CPN-8",))) == "coupon_held"
    # LIKE is case-blind on SQLite: a code that differs in case only is another coupon.
    assert take(db, ask("G3", None, coupons=("cpn-8",))).hold.status == "held"
    body = sale_body(ruleset, "G1", None, coupons=("CPN-7", "CPN-8"), hold={"id": hold.hold.hold_id})
    _, raised = Journal(db).apply(body)
    assert raised == ()
    assert refusal(db, ask("G4", None, coupons=("CPN-7",))) == "coupon_used"
    assert refusal(db, ask("G4", "M2", coupons=("CPN-8",))) == "coupon_used"


def test_two_lanes_racing_for_the_last_points_one_wins(db_url: str, db: HqDatabase, tmp_path: Path) -> None:
    """Two databases on two threads, as two head-office workers would be; many rounds, one winner each."""
    rounds = 12
    seed_members(db_url, tmp_path, {f"R{n}": (300, "3.00") for n in range(rounds)})
    other = HqDatabase.open(db_url)
    try:
        for n in range(rounds):
            outcomes: list[str] = []
            barrier = threading.Barrier(2)

            def race(
                database: HqDatabase,
                lane: str,
                member_id: str = f"R{n}",
                barrier: threading.Barrier = barrier,
                outcomes: list[str] = outcomes,
            ) -> None:
                barrier.wait()
                try:
                    take(database, ask(f"X-{lane}", member_id, points=300, rebate_fen=300, lane=lane))
                    outcomes.append("held")
                except holds.HoldRefused as exc:
                    outcomes.append(exc.code)

            threads = [
                threading.Thread(target=race, args=(db, LANE)),
                threading.Thread(target=race, args=(other, OTHER_LANE)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert sorted(outcomes) == ["held", "insufficient_points"], (n, outcomes)
    finally:
        other.close()


def test_a_hold_waits_for_the_member_row_and_then_sees_what_was_held(db_url: str, db: HqDatabase) -> None:
    """Deterministic: another transaction holds M1's row (and holds the points) while this hold asks."""
    engine = create_engine(db_url, connect_args={"timeout": 30} if db_url.startswith("sqlite") else {})
    outcome: list[str] = []
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.begin()
                conn.execute(text("SELECT points_balance FROM members WHERE member_id = 'M1' FOR UPDATE"))
            conn.execute(
                text(
                    "INSERT INTO holds (hold_id, store, lane, sale_id, member_id, points, rebate_fen, coupons,"
                    " status, created_at, expires_at) VALUES ('H-other', :s, :l, 'OTHER', 'M1', 300, 0, '[]',"
                    " 'held', :now, :until)"
                ),
                {
                    "s": STORE,
                    "l": OTHER_LANE,
                    "now": T0.replace(tzinfo=None) if conn.dialect.name == "sqlite" else T0,
                    "until": (T0 + dt.timedelta(hours=1)).replace(tzinfo=None)
                    if conn.dialect.name == "sqlite"
                    else T0 + dt.timedelta(hours=1),
                },
            )

            def asking() -> None:
                try:
                    take(db, ask("S1", points=300))
                    outcome.append("held")
                except holds.HoldRefused as exc:
                    outcome.append(exc.code)

            thread = threading.Thread(target=asking)
            thread.start()
            thread.join(1.0)
            assert thread.is_alive(), "the hold did not wait for the member's row"
            conn.commit()
            thread.join(30)
    finally:
        engine.dispose()
    assert outcome == ["insufficient_points"]


# --- at ingest: consumption, coupon uses, flags -------------------------------------------------


def hold_state(db: HqDatabase, hold_id: str) -> tuple[str, str | None]:
    found = holds.find_hold(db, hold_id)
    assert found is not None
    return found.status, found.consumed_entry_id


def test_a_sale_consumes_its_hold_in_the_batch_that_applies_it(db: HqDatabase, ruleset: Any) -> None:
    taken = take(db, ask("S1", points=300, rebate_fen=5000))
    body = sale_body(ruleset, "S1", "M1", points=300, rebate="50.00", hold={"id": taken.hold.hold_id})
    earned = body["result"]["totals"]["points"]
    (entry_id,), raised = Journal(db).apply(body)
    assert raised == ()
    assert hold_state(db, taken.hold.hold_id) == ("consumed", entry_id)
    assert balance(db, "M1") == (earned, 0)
    # Consumed, the hold counts no more: the new balance is available whole, and not a point more.
    assert refusal(db, ask("S2", points=earned + 1)) == "insufficient_points"
    assert take(db, ask("S2", points=earned)).hold.status == "held"
    assert flags(db) == []


def test_a_hold_is_consumed_only_by_its_own_lane_and_sale(db: HqDatabase, ruleset: Any) -> None:
    taken = take(db, ask("S1", "M2", points=1000))
    journal, other = Journal(db), Journal(db, OTHER_LANE)
    hold = {"id": taken.hold.hold_id}
    _, raised = other.apply(sale_body(ruleset, "S1", "M2", points=500, hold=hold, lane=OTHER_LANE))
    _, raised_too = journal.apply(sale_body(ruleset, "S9", "M2", points=500, hold=hold))
    assert raised == raised_too == ()  # within the balance: no flag, but no consumption either
    assert hold_state(db, taken.hold.hold_id) == ("held", None)
    (entry_id,), _ = journal.apply(sale_body(ruleset, "S1", "M2", points=1000, hold=hold))
    assert hold_state(db, taken.hold.hold_id) == ("consumed", entry_id)
    # Named again by another sale, a consumed hold covers nothing: this one overspent.
    _, raised = journal.apply(sale_body(ruleset, "S8", "M2", points=50_000, hold=hold))
    assert raised == ("overspend",)
    assert flags(db)[0][2]["hold"] == "mismatch"


def test_spending_without_a_hold_below_zero_is_flagged(db: HqDatabase, ruleset: Any) -> None:
    journal = Journal(db)
    # Within the balance, no hold needed to be clean: no flag (M2 has 1000 points).
    _, raised = journal.apply(sale_body(ruleset, "S1", "M2", points=500, hold={"offline": True}))
    assert raised == ()
    # Offline, beyond the balance: flagged, with the balance it left (what it earned included).
    body = sale_body(ruleset, "S2", "M3", points=50_000, rebate="1.00", hold={"offline": True})
    earned = body["result"]["totals"]["points"]
    (entry_id,), raised = journal.apply(body)
    assert raised == ("overspend",)
    [(code, member_id, detail)] = flags(db)
    assert (code, member_id) == ("overspend", "M3")
    assert detail == {
        "sale_id": "S2",
        "points_spent": 50_000,
        "rebate_spent": "1.00",
        "points_balance": earned - 50_000,
        "rebate_balance": "-1.00",
        "hold": "offline",
    }
    assert balance(db, "M3") == (earned - 50_000, -100)  # the ledger is the truth: the balance owes it
    with db._engine.connect() as conn:
        assert conn.execute(text("SELECT entry_id FROM spend_flags")).scalar() == entry_id


def test_within_one_batch_each_sale_is_judged_by_the_balance_it_left(db: HqDatabase, ruleset: Any) -> None:
    first = sale_body(ruleset, "S1", "M2", points=1000)
    second = sale_body(ruleset, "S2", "M2", points=50_000)
    earned = first["result"]["totals"]["points"] + second["result"]["totals"]["points"]
    _, raised = Journal(db).apply(first, second)
    assert raised == ("overspend",)
    [(_, _, detail)] = flags(db)
    assert (detail["sale_id"], detail["points_balance"], detail["hold"]) == ("S2", earned - 50_000, "none")


def test_a_lapsed_hold_does_not_cover_an_overspend(db: HqDatabase, ruleset: Any, clock: Clock) -> None:
    taken = take(db, ask("S1", "M2", points=1000))
    journal, other = Journal(db), Journal(db, OTHER_LANE)
    clock.now = T0 + dt.timedelta(seconds=HOLD_SECONDS + 1)
    # Past the hold's time another lane could spend the same points (and more): it did, offline.
    _, raised = other.apply(sale_body(ruleset, "X1", "M2", points=50_000, hold={"offline": True}, lane=OTHER_LANE))
    assert raised == ("overspend",)
    (entry_id,), raised = journal.apply(sale_body(ruleset, "S1", "M2", points=1000, hold={"id": taken.hold.hold_id}))
    assert hold_state(db, taken.hold.hold_id) == ("consumed", entry_id)
    assert raised == ("overspend",)
    assert [(detail["sale_id"], detail["hold"]) for _, _, detail in flags(db)] == [("X1", "offline"), ("S1", "expired")]


def test_a_held_sale_is_never_flagged_and_a_coupon_used_twice_is(db: HqDatabase, ruleset: Any) -> None:
    journal, other = Journal(db), Journal(db, OTHER_LANE)
    taken = take(db, ask("S1", "M2", points=1000, coupons=("CPN-1",)))
    (first_entry,), raised = journal.apply(
        sale_body(ruleset, "S1", "M2", points=1000, coupons=("CPN-1",), hold={"id": taken.hold.hold_id})
    )
    assert raised == ()
    # Another lane, offline, took the same coupon (single_use_coupons = "accept"): head office flags it.
    (second_entry,), raised = other.apply(
        sale_body(ruleset, "X1", None, coupons=("CPN-1", "CPN-2"), hold={"offline": True}, lane=OTHER_LANE)
    )
    assert raised == ("coupon_reuse",)
    [(code, member_id, detail)] = flags(db)
    assert (code, member_id) == ("coupon_reuse", None)
    assert detail == {"sale_id": "X1", "code": "CPN-1", "first_entry_id": first_entry, "hold": "offline"}
    with db._engine.connect() as conn:
        uses = conn.execute(text("SELECT code, entry_id, lane FROM coupon_uses ORDER BY code")).all()
    assert [tuple(row) for row in uses] == [("CPN-1", first_entry, LANE), ("CPN-2", second_entry, OTHER_LANE)]
    assert refusal(db, ask("S5", "M2", coupons=("CPN-2",))) == "coupon_used"
    # The same batches delivered again are duplicates: nothing is consumed, recorded or flagged twice.
    assert journal.resend() == other.resend() == ()
    assert len(flags(db)) == 1
    assert hold_state(db, taken.hold.hold_id) == ("consumed", first_entry)


# --- the lane's sale path, in process, against a port that answers as told -----------------------


class ToldHolds:
    """A HoldPort answering what the test says, recording what it was asked; ``during`` runs inside a hold."""

    def __init__(self, *answers: HoldAnswer) -> None:
        self.answers = list(answers)
        self.asked: list[HoldRequest] = []
        self.released: list[str] = []
        self.during: Callable[[], Awaitable[None]] | None = None

    async def hold(self, request: HoldRequest) -> HoldAnswer:
        self.asked.append(request)
        during, self.during = self.during, None
        if during is not None:
            await during()
        return self.answers.pop(0)

    async def release(self, hold_id: str) -> None:
        self.released.append(hold_id)


def lane_config(directory: Path, rules: Path, offline: str = "", sync: str = "") -> LaneConfig:
    return parse_config(
        f"""
[lane]
store = "{E2E_STORE}"
lane = "lane-03"
[api]
token = "test-token-0123456789-abcdefghij"
[store]
path = "{directory / "lane.db"}"
card_hash_key = "hex:{KEY.hex()}"
[rules]
path = "{rules}"
[offline]
{offline}
[sync]
{sync}
""",
        environ={},
    )


def in_process(
    tmp_path: Path, work: Callable[[LaneService, ToldHolds], Awaitable[None]], *answers: HoldAnswer, offline: str = ""
) -> None:
    """Run ``work`` against a LaneService on a real store (the lane harness's members) and a told port."""
    rules = points_rules(tmp_path)
    config = lane_config(tmp_path, rules, offline)
    members = tmp_path / "members.jsonl"
    write_snapshot(members, lane_members(dt.datetime.now(SHANGHAI).date()), version=7, card_key=KEY)

    async def run() -> None:
        async with await LaneStore.open(config.store.path, KEY) as store:
            await store.import_snapshot(members)
            service = LaneService(config, store, load_ruleset(rules), EventBus())
            port = ToldHolds(*answers)
            service.holds = port
            await work(service, port)
            await asyncio.gather(*service._releases)

    asyncio.run(run())


def small_sale(sale_id: str, *, points: int = 800, coupon: str | None = None, cash: str = "36.00") -> dict[str, Any]:
    """M000123 (gold, 0.88): 50.00 is 44.00 due; 800 points pay 8.00."""
    tenders: list[dict[str, Any]] = [{"kind": "points", "points": points}] if points else []
    if coupon is not None:
        tenders.append({"kind": "coupon", "amount": "1.00", "subkind": coupon})
    tenders.append({"kind": "cash", "amount": cash})
    return {"sale_id": sale_id, "lines": [SMALL_LINE], "member_id": "M000123", "tenders": tenders}


async def sell_in(service: LaneService, body: dict[str, Any]) -> tuple[str, bool]:
    return await service.sale(SaleIn.model_validate(body), body)


async def journal_of(service: LaneService) -> list[dict[str, Any]]:
    return [entry.body for entry in await service.store.journal_after(0)]


def test_a_refused_hold_commits_nothing_and_says_why(tmp_path: Path) -> None:
    async def work(service: LaneService, port: ToldHolds) -> None:
        with pytest.raises(SpendRefusedError) as caught:
            await sell_in(service, small_sale("R-1"))
        assert (caught.value.code, caught.value.field) == ("insufficient_points", "tenders")
        assert "another till" in str(caught.value)
        assert await journal_of(service) == []
        [asked] = port.asked
        assert (asked.sale_id, asked.member_id, asked.spend) == ("R-1", "M000123", Spend(800, 0, ()))
        assert port.released == []

    in_process(tmp_path, work, HoldAnswer("refused", "insufficient_points", "800 points asked; 0 available"))


def test_a_commit_that_fails_after_the_hold_releases_it(tmp_path: Path) -> None:
    async def work(service: LaneService, port: ToldHolds) -> None:
        async def meanwhile() -> None:  # another request takes the sale id with another body
            other = small_sale("F-1", cash="35.00", coupon="CPN-9")
            port.answers.insert(0, HoldAnswer("held"))
            await sell_in(service, other)

        port.during = meanwhile
        with pytest.raises(SaleConflictError):
            await sell_in(service, small_sale("F-1"))
        first, second = port.asked
        await asyncio.gather(*service._releases)
        assert port.released == [first.hold_id]  # the loser's hold only: the winner's was consumed
        [entry] = await journal_of(service)
        assert entry["hold"] == {"id": second.hold_id}
        assert second.spend.coupons == ("CPN-9",)

    in_process(tmp_path, work, HoldAnswer("held"))


def test_a_concurrent_identical_request_releases_the_hold_it_did_not_use(tmp_path: Path) -> None:
    async def work(service: LaneService, port: ToldHolds) -> None:
        body = small_sale("D-1")
        answers: list[tuple[str, bool]] = []

        async def meanwhile() -> None:  # the POS retried while the first attempt waited for head office
            port.answers.insert(0, HoldAnswer("held"))
            answers.append(await sell_in(service, body))

        port.during = meanwhile
        text_, replayed = await sell_in(service, body)
        assert (replayed, answers[0][1]) == (True, False)
        assert json.loads(text_) == json.loads(answers[0][0])
        first, second = port.asked
        await asyncio.gather(*service._releases)
        assert port.released == [first.hold_id]
        [entry] = await journal_of(service)
        assert entry["hold"] == {"id": second.hold_id}
        # And a retry now is a replay before anything is asked.
        assert (await sell_in(service, body))[1] is True
        assert len(port.asked) == 2

    in_process(tmp_path, work, HoldAnswer("held"))


def test_offline_coupons_follow_the_policy_and_cash_sales_ask_nothing(tmp_path: Path) -> None:
    async def work(service: LaneService, port: ToldHolds) -> None:
        with pytest.raises(SpendRefusedError) as caught:
            await sell_in(service, small_sale("C-1", points=0, coupon="CPN-1", cash="43.00"))
        assert caught.value.code == "offline_limit"
        await sell_in(service, small_sale("C-2", points=0, cash="44.00"))
        # A coupon tender without a code is an anonymous voucher: nothing to hold.
        anonymous = small_sale("C-3", points=0, cash="43.00")
        anonymous["tenders"].insert(0, {"kind": "coupon", "amount": "1.00"})
        await sell_in(service, anonymous)
        assert len(port.asked) == 1
        assert ["hold" in entry for entry in await journal_of(service)] == [False, False]

    in_process(tmp_path, work, HoldAnswer("offline"))


def test_offline_coupons_accepted_by_policy_are_journaled_as_offline(tmp_path: Path) -> None:
    async def work(service: LaneService, port: ToldHolds) -> None:
        await sell_in(service, small_sale("A-1", points=0, coupon="CPN-1", cash="43.00"))
        await sell_in(service, small_sale("A-2", points=500, coupon="CPN-2", cash="38.00"))
        with pytest.raises(SpendRefusedError) as caught:  # 500 of the day's 600 spent: 200 more is too many
            await sell_in(service, small_sale("A-3", points=200, cash="42.00"))
        assert caught.value.code == "offline_limit"
        assert "500 spent" in str(caught.value)
        entries = await journal_of(service)
        assert [entry["hold"] for entry in entries] == [{"offline": True}, {"offline": True}]
        day = dt.datetime.now(SHANGHAI).date()
        assert await service.store.offline_spent("M000123", day) == (500, 0)
        assert await service.store.offline_spent("M000123", day - dt.timedelta(days=1)) == (0, 0)

    offline = 'single_use_coupons = "accept"\npoints_per_day = 600'
    in_process(tmp_path, work, *[HoldAnswer("offline")] * 3, offline=offline)


class Scripted(ThreadingHTTPServer):
    """A real HTTP server on loopback answering each request with the next (status, body) of its script."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]]) -> None:
        self.script = script
        self.paths: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.paths.append((self.command, self.path))
                status, body = outer.script.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_DELETE = _answer  # noqa: N815 - http.server's names

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_the_client_maps_head_offices_answers(tmp_path: Path) -> None:
    held = {"hold_id": "h", "status": "held"}
    server = Scripted(
        [
            (201, held),
            (201, {**held, "status": "expired"}),  # an old hold answered again: no hold for this sale
            (409, {"error": {"code": "coupon_held", "message": "held at l02", "field": "coupons"}}),
            (409, {"oops": True}),
            (503, {"error": {"code": "unavailable"}}),
            (401, {"error": {"code": "unauthorized"}}),
            (200, {"hold_id": "h", "status": "released"}),
            (404, {"error": {"code": "unknown_hold"}}),
        ]
    )
    config = lane_config(tmp_path, points_rules(tmp_path), sync=f'hq_url = "{server.url}"\nhq_token = "{"k" * 43}"')
    metrics = Metrics()

    async def run() -> list[HoldAnswer]:
        async with HqHolds(config, metrics) as client:
            request = HoldRequest("h/1", "S1", "M1", Spend(100, 250, ("CPN-1",)))
            answers = [await client.hold(request) for _ in range(6)]
            await client.release("h/1")
            await client.release("h/1")
            return answers

    try:
        answers = asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert [(a.result, a.code) for a in answers] == [
        ("held", ""),
        ("offline", ""),
        ("refused", "coupon_held"),
        ("offline", ""),
        ("offline", ""),
        ("offline", ""),
    ]
    assert answers[2].message == "held at l02"
    prefix = f"/v1/sync/{E2E_STORE}/lane-03"
    assert server.paths[0] == ("POST", f"{prefix}/holds")
    assert server.paths[-2:] == [("DELETE", f"{prefix}/holds/h%2F1")] * 2
    samples = {s.labels["result"]: s.value for s in metrics.holds.collect()[0].samples if s.name.endswith("_total")}
    assert samples == {"held": 1, "offline": 4, "refused": 1, "released": 1, "release_failed": 1}


# --- end to end: real lanes, a real broker, a real head office --------------------------------

E2E_STORE = "store-0101"
SECRET = "holds-test-lanes-secret-0123456789abcdef"
HOLD_TIMEOUT = 1.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def pg_e2e() -> Iterator[str]:
    with fresh_database("lanehq_holds_e2e") as url:
        yield url


@pytest.fixture
def started() -> Iterator[list[Hq | Lane]]:
    processes: list[Hq | Lane] = []
    yield processes
    for process in reversed(processes):
        process.kill()


def start_hq(started: list[Hq | Lane], directory: Path, broker: Broker, db_url: str, rules: Path) -> Hq:
    """``lane-hq run`` with the lanes' secret and the points ruleset, over head office's seeded members."""
    hq = Hq(directory, broker_port=broker.port, db_url=db_url)
    (directory / "rules" / rules.name).write_bytes(rules.read_bytes())
    secret = directory / "lanes.secret"
    secret.write_text(SECRET + "\n", encoding="utf-8")
    with hq.config.open("a", encoding="utf-8") as config:
        config.write(f'\n[lanes]\nauth_secret_file = "{secret}"\nhold_seconds = 300\n')
    hq.start()
    started.append(hq)
    return hq


def seed_hq(db_url: str, directory: Path, points: int, rebate: str) -> None:
    """Head office's view of the lanes' members: M000123's balances as given (lanes cache 12000 / 35.20)."""
    path = directory / "hq-members.jsonl"
    today = dt.datetime.now(SHANGHAI).date()
    lines = [
        m.model_copy(update={"points_balance": points, "rebate_balance": parse_money(rebate)})
        if m.member_id == "M000123"
        else m
        for m in lane_members(today)
    ]
    write_snapshot(path, lines, version=1, card_key=KEY)
    db = HqDatabase.open(db_url)
    try:
        db.members.import_members(path, KEY)
    finally:
        db.close()


def start_lane(
    started: list[Hq | Lane],
    directory: Path,
    broker: Broker,
    rules: Path,
    *,
    lane: str,
    hq_url: str,
    offline: str = "",
) -> Lane:
    token = lane_token(SECRET.encode(), E2E_STORE, lane)
    sync = (
        f"\n[offline]\n{offline}\n"
        f"\n[sync]\nenabled = true\nport = {broker.port}\nresend_after_seconds = 1.0\nstate_interval_seconds = 1.0\n"
        f"reconnect_min_seconds = 0.1\nreconnect_max_seconds = 0.5\n"
        f'hq_url = "{hq_url}"\nhq_token = "{token}"\nhold_timeout_seconds = {HOLD_TIMEOUT}\n'
    )
    agent = Lane(directory, rules=rules, extra_config=sync)
    text_ = agent.config_path.read_text(encoding="utf-8")
    assert text_.count('lane = "lane-03"') == 1
    agent.config_path.write_text(text_.replace('lane = "lane-03"', f'lane = "{lane}"'), encoding="utf-8")
    agent.import_members()
    agent.start()
    started.append(agent)
    return agent


SMALL_LINE = {"line_id": "1", "sku": "6901234567892", "category": "womenswear", "qty": "1", "unit_price": "50.00"}


def spend_sale(
    http: httpx.Client, sale_id: str, *, points: int = 0, rebate: str | None = None, coupon: str | None = None
) -> httpx.Response:
    """A small sale of M000123 paying ``points`` / ``rebate`` / a coupon, the rest in cash (priced first)."""
    doc: dict[str, Any] = {"lines": [SMALL_LINE], "member_id": "M000123"}
    tenders: list[dict[str, Any]] = []
    if points:
        tenders.append({"kind": "points", "points": points})
    if rebate:
        tenders.append({"kind": "rebate", "amount": rebate})
    if coupon:
        tenders.append({"kind": "coupon", "amount": "1.00", "subkind": coupon})
    priced = http.post("/v1/price", json={**doc, "tenders": tenders})
    assert priced.status_code == 200, priced.text
    unpaid = priced.json()["unpaid"]
    cash = [] if unpaid == "0.00" else [{"kind": "cash", "amount": unpaid}]
    return http.post("/v1/sales", json={**doc, "sale_id": sale_id, "tenders": [*tenders, *cash]})


def lane_entries(lane: Lane) -> dict[str, dict[str, Any]]:
    """The lane's sale entries by sale id, read from its own database."""
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT body FROM journal WHERE kind = 'sale' ORDER BY seq").fetchall()
    return {body["sale_id"]: body for body in (json.loads(row[0]) for row in rows)}


def lane_metric(lane: Lane, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in httpx.get(f"{lane.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def error_code(answer: httpx.Response, *, keys: frozenset[str] = frozenset({"code", "message", "field"})) -> str:
    body = answer.json()
    assert set(body) == {"error"}, body
    assert keys <= set(body["error"]), body
    return str(body["error"]["code"])


def test_two_lanes_spending_the_same_points_online_one_is_refused(
    tmp_path: Path, broker: Broker, pg_e2e: str, started: list[Hq | Lane]
) -> None:
    rules = points_rules(tmp_path)
    seed_hq(pg_e2e, tmp_path, points=1000, rebate="35.20")
    hq = start_hq(started, tmp_path / "hq", broker, pg_e2e, rules)
    lanes = [
        start_lane(started, tmp_path / name, broker, rules, lane=name, hq_url=hq.url) for name in ("lane-03", "lane-04")
    ]
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(2)

    def sell(lane: Lane) -> None:
        with lane.client() as http:
            barrier.wait()
            answers[lane.config_path.parent.name] = spend_sale(http, f"T-{lane.config_path.parent.name}", points=1000)

    threads = [threading.Thread(target=sell, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(answer.status_code for answer in answers.values())
    assert statuses == [200, 409], {name: answer.text for name, answer in answers.items()}
    winner = next(name for name, answer in answers.items() if answer.status_code == 200)
    loser = next(name for name, answer in answers.items() if answer.status_code == 409)
    refused = answers[loser].json()["error"]
    assert (refused["code"], refused["field"]) == ("insufficient_points", "tenders")
    assert "another till" in refused["message"]
    by_name = {lane.config_path.parent.name: lane for lane in lanes}
    # Nothing of the refused sale was committed; the winner's entry names its hold.
    assert lane_entries(by_name[loser]) == {}
    hold_id = lane_entries(by_name[winner])[f"T-{winner}"]["hold"]["id"]
    assert lane_metric(by_name[winner], "lane_holds_total", result="held") == 1
    assert lane_metric(by_name[loser], "lane_holds_total", result="refused") == 1
    # The sale reaches head office over MQTT and consumes its hold in the same transaction.
    reader = HqReader(pg_e2e)
    try:
        wait_for(
            "the hold to be consumed",
            lambda: reader.scalar("SELECT status FROM holds WHERE hold_id = :h", h=hold_id) == "consumed",
        )
        entry = reader.scalar("SELECT consumed_entry_id FROM holds WHERE hold_id = :h", h=hold_id)
        assert reader.scalar("SELECT sale_id FROM sales WHERE entry_id = :e", e=entry) == f"T-{winner}"
        assert reader.scalar("SELECT count(*) FROM spend_flags") == 0
        assert reader.scalar("SELECT count(*) FROM holds") == 1
    finally:
        reader.close()
    assert hq.metric("hq_holds_total") == 2  # one held, one refused
    # A retry of the winner's sale replays it: no second hold asked for.
    with by_name[winner].client() as http:
        again = http.post("/v1/sales", json=lane_entries(by_name[winner])[f"T-{winner}"]["request"])
    assert again.status_code == 200
    assert again.headers.get("Idempotent-Replay") == "true"
    assert lane_metric(by_name[winner], "lane_holds_total", result="held") == 1


def test_a_lane_token_holds_only_for_its_own_lane(
    tmp_path: Path, broker: Broker, pg_e2e: str, started: list[Hq | Lane]
) -> None:
    rules = points_rules(tmp_path)
    seed_hq(pg_e2e, tmp_path, points=1000, rebate="35.20")
    hq = start_hq(started, tmp_path / "hq", broker, pg_e2e, rules)
    mine, theirs = (lane_token(SECRET.encode(), E2E_STORE, lane) for lane in ("lane-03", "lane-04"))
    path = f"{hq.url}/v1/sync/{E2E_STORE}/lane-03/holds"
    body = {"hold_id": str(uuid.uuid4()), "sale_id": "S1", "member_id": "M000123", "points": 100}
    with httpx.Client(timeout=10) as http:
        for token in (theirs, None, "not-a-token"):
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            answer = http.post(path, json=body, headers=headers)
            # The lanes' guard (sync/hq/lane_guard.py) answers {code, message}: no field to point at.
            code = error_code(answer, keys=frozenset({"code", "message"}))
            assert (answer.status_code, code) == (401, "unauthorized"), answer.text
        assert (
            http.delete(f"{path}/{body['hold_id']}", headers={"Authorization": f"Bearer {theirs}"}).status_code == 401
        )
        own = {"Authorization": f"Bearer {mine}"}
        taken = http.post(path, json=body, headers=own)
        assert taken.status_code == 201, taken.text
        assert {k: taken.json()[k] for k in ("hold_id", "status", "points", "rebate", "coupons")} == {
            "hold_id": body["hold_id"],
            "status": "held",
            "points": 100,
            "rebate": "0.00",
            "coupons": [],
        }
        assert http.post(path, json=body, headers=own).json() == taken.json()
        conflict = http.post(path, json={**body, "points": 200}, headers=own)
        assert (conflict.status_code, error_code(conflict)) == (409, "hold_conflict")
        # Another lane cannot release it either, even with its own (valid) token on its own path.
        other_path = f"{hq.url}/v1/sync/{E2E_STORE}/lane-04/holds/{body['hold_id']}"
        gone = http.delete(other_path, headers={"Authorization": f"Bearer {theirs}"})
        assert (gone.status_code, error_code(gone)) == (404, "unknown_hold")
        for bad, code in (
            ({**body, "points": "100"}, "int_type"),
            ({**body, "rebate": 1.5}, "value_error"),
            ({**body, "points": 0}, "value_error"),
            ({**body, "extra": 1}, "extra_forbidden"),
        ):
            answer = http.post(path, json={**bad, "hold_id": str(uuid.uuid4())}, headers=own)
            assert (answer.status_code, error_code(answer)) == (422, code), answer.text
        released = http.delete(f"{path}/{body['hold_id']}", headers=own)
        assert (released.status_code, released.json()["status"]) == (200, "released")


class SilentServer:
    """A TCP port that accepts connections and never answers: head office's API hung, not refused."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def test_offline_spending_is_capped_per_day_within_the_hold_timeout_and_flagged_later(
    tmp_path: Path, broker: Broker, pg_e2e: str, started: list[Hq | Lane]
) -> None:
    rules = points_rules(tmp_path)
    seed_hq(pg_e2e, tmp_path, points=500, rebate="5.00")  # the lane believes in 12000 points and 35.20
    hq = start_hq(started, tmp_path / "hq", broker, pg_e2e, rules)
    silent = SilentServer()
    try:
        lane = start_lane(
            started,
            tmp_path / "lane-03",
            broker,
            rules,
            lane="lane-03",
            hq_url=silent.url,
            offline='points_per_day = 1500\nrebate_per_day = "20.00"',
        )
        with lane.client() as http:

            def timed(sale_id: str, **spend: Any) -> tuple[httpx.Response, float]:
                started_at = time.monotonic()
                answer = spend_sale(http, sale_id, **spend)
                return answer, time.monotonic() - started_at

            first, seconds = timed("O-1", points=800, rebate="15.00")
            assert first.status_code == 200, first.text
            assert HOLD_TIMEOUT <= seconds < HOLD_TIMEOUT + 1.5, seconds
            over, seconds = timed("O-2", points=800)
            assert (over.status_code, error_code(over)) == (409, "offline_limit"), over.text
            assert "800 spent" in over.json()["error"]["message"]
            assert "700 left" in over.json()["error"]["message"]
            assert HOLD_TIMEOUT <= seconds < HOLD_TIMEOUT + 1.5, seconds
            over_rebate, _ = timed("O-3", rebate="5.01")
            assert (over_rebate.status_code, error_code(over_rebate)) == (409, "offline_limit")
            coupon, _ = timed("O-4", coupon="CPN-000123")
            assert (coupon.status_code, error_code(coupon)) == (409, "offline_limit")
            rest, _ = timed("O-5", points=700, rebate="5.00")
            assert rest.status_code == 200, rest.text
            # A retry is answered from the journal at once: no hold asked for, no allowance spent again.
            entries = lane_entries(lane)
            replay, seconds = timed("O-1", points=800, rebate="15.00")
            assert replay.status_code == 200
            assert replay.headers.get("Idempotent-Replay") == "true"
            assert seconds < HOLD_TIMEOUT
            # Guests without a coupon, and cash sales, never ask head office.
            cash, seconds = timed("O-6")
            assert cash.status_code == 200
            assert seconds < HOLD_TIMEOUT
        assert set(entries) == {"O-1", "O-5"}
        assert all(entries[sale]["hold"] == {"offline": True} for sale in ("O-1", "O-5"))
        assert "hold" not in lane_entries(lane)["O-6"]
        assert lane_metric(lane, "lane_holds_total", result="offline") == 5
        assert lane_metric(lane, "lane_api_errors_total", code="offline_limit") == 3
        # The offline sales reach head office over MQTT: O-1 took the balance below zero, O-5 further.
        reader = HqReader(pg_e2e)
        try:
            wait_for("the offline sales at head office", lambda: reader.scalar("SELECT count(*) FROM sales") == 3)
            found = reader.rows(
                "SELECT s.sale_id, f.code, f.detail FROM spend_flags f JOIN sales s ON s.entry_id = f.entry_id"
                " ORDER BY f.id"
            )
            assert [(sale_id, code) for sale_id, code, _ in found] == [("O-1", "overspend"), ("O-5", "overspend")]
            assert all(json.loads(detail)["hold"] == "offline" for _, _, detail in found)
            assert reader.scalar("SELECT count(*) FROM holds") == 0
        finally:
            reader.close()
        wait_for("the flags metric", lambda: hq.metric("hq_spend_flags_total") == 2)
    finally:
        silent.close()


def test_a_hold_before_head_office_stops_then_offline_then_delivered(
    tmp_path: Path, broker: Broker, pg_e2e: str, started: list[Hq | Lane]
) -> None:
    rules = points_rules(tmp_path)
    seed_hq(pg_e2e, tmp_path, points=2000, rebate="35.20")
    hq = start_hq(started, tmp_path / "hq", broker, pg_e2e, rules)
    lane = start_lane(
        started, tmp_path / "lane-03", broker, rules, lane="lane-03", hq_url=hq.url, offline="points_per_day = 1000"
    )
    with lane.client() as http:
        online = spend_sale(http, "H-1", points=300)
        assert online.status_code == 200, online.text
        hold_id = lane_entries(lane)["H-1"]["hold"]["id"]
        hq.stop()
        # Refused connections are offline at once: no wait for the timeout.
        started_at = time.monotonic()
        offline = spend_sale(http, "H-2", points=800)
        assert offline.status_code == 200, offline.text
        assert time.monotonic() - started_at < HOLD_TIMEOUT
        beyond = spend_sale(http, "H-3", points=300)
        assert (beyond.status_code, error_code(beyond)) == (409, "offline_limit")
        # Voiding the offline sale gives its allowance back.
        assert http.post("/v1/sales/H-2/void").status_code == 200
        again = spend_sale(http, "H-4", points=1000)
        assert again.status_code == 200, again.text
    assert lane_entries(lane)["H-2"]["hold"] == {"offline": True}
    hq.start()
    reader = HqReader(pg_e2e)
    try:
        wait_for("the lane's entries at head office", lambda: reader.scalar("SELECT count(*) FROM sales") == 3)
        wait_for("the void at head office", lambda: reader.scalar("SELECT count(*) FROM voids") == 1)
        assert reader.scalar("SELECT status FROM holds WHERE hold_id = :h", h=hold_id) == "consumed"
        # 2000 points at head office cover all of it: offline, but no overspend.
        assert reader.scalar("SELECT count(*) FROM spend_flags") == 0
    finally:
        reader.close()
