"""Head office's database (sync/hq/db.py) on a real SQLite file and a real PostgreSQL database.

Batches are built the way they travel: journal bodies priced by the engine
(888 mall ruleset), encoded with ``sync.wire.encode_batch`` and decoded with
``decode_batch``.  Every test runs on both backends; PostgreSQL gets a fresh
``public`` schema per test in one database per session (tests/pgdb.py).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import pytest
from conftest import MEMBER_DAY, RULES_888
from lane_harness import basket
from sqlalchemy import text

from agent.basket import parse_member
from agent.engine import price
from agent.money import format_fen, parse_money
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import load_ruleset
from sync.hq import facts, schema
from sync.hq.audit import RulesetLibrary
from sync.hq.auditor import audit_rows
from sync.hq.db import MAX_DEAD_PAYLOAD, HqDatabase
from sync.wire import Batch, RawEntry, decode_batch, encode_batch

RULESET = load_ruleset(RULES_888)
STORE, LANE = "s01", "l01"
EPOCH = "0123456789abcdef" * 2
EPOCH_2 = "fedcba9876543210" * 2
TOPIC = f"retail/{STORE}/{LANE}/journal"
MEMBER = {
    "member_id": "M0001",
    "tier": "vip",
    "card_kind": "standard",
    "birthday": None,
    "points_balance": 5000,
    "rebate_balance": "300.00",
    "next_tier": None,
    "next_tier_from": None,
}
RULES = {"id": RULESET.id, "version": RULESET.version, "digest": RULESET.digest}


# --- journal bodies, as agent/service.py writes them --------------------------------


def sale_body(
    sale_id: str,
    *,
    member: dict[str, Any] | None = MEMBER,
    rebate_fen: int = 0,
    variant: int = 0,
    at: dt.datetime = MEMBER_DAY,
    store: str = STORE,
    lane: str = LANE,
) -> dict[str, Any]:
    """A sale's journal body: the POS request, the member state and the engine's priced result."""
    request = basket(sale_id=sale_id, at=at.isoformat())
    request["lines"][0]["unit_price"] = format_fen(100_000 + 137 * variant)
    if member is not None:
        request["member_id"] = member["member_id"]
    priced_member = None if member is None else parse_member(member)
    due = price(SaleIn.model_validate(request).to_basket(), priced_member, RULESET, at).net_fen
    tenders = [{"kind": "rebate", "amount": format_fen(rebate_fen)}] if rebate_fen else []
    request["tenders"] = [*tenders, {"kind": "cash", "amount": format_fen(due - rebate_fen)}]
    priced = price(SaleIn.model_validate(request).to_basket(), priced_member, RULESET, at)
    assert priced.unpaid_fen == 0
    return {
        "v": 1,
        "kind": "sale",
        "store": store,
        "lane": lane,
        "rules": RULES,
        "sale_id": sale_id,
        "request": request,
        "member": member,
        "result": to_wire(priced),
    }


def return_body(sale_entry: RawEntry, return_id: str, lines: list[tuple[str, str, int]]) -> dict[str, Any]:
    """A return of ``(line_id, refund, points_reversed)`` lines of a sale entry."""
    sale = json.loads(sale_entry.body)
    refund = sum(parse_money(r) for _, r, _ in lines)
    return {
        "v": 1,
        "kind": "return",
        "store": sale["store"],
        "lane": sale["lane"],
        "rules": RULES,
        "sale_journal_id": sale_entry.id,
        "return_id": return_id,
        "sale_id": sale["sale_id"],
        "status": "committed",
        "at": MEMBER_DAY.isoformat(),
        "member_id": None if sale["member"] is None else sale["member"]["member_id"],
        "lines": [{"line_id": i, "qty": "1", "refund": r, "points_reversed": p} for i, r, p in lines],
        "refund": format_fen(refund),
        "points_reversed": sum(p for _, _, p in lines),
    }


def void_body(sale_entry: RawEntry) -> dict[str, Any]:
    sale = json.loads(sale_entry.body)
    result = sale["result"]
    return {
        "v": 1,
        "kind": "void",
        "store": sale["store"],
        "lane": sale["lane"],
        "rules": RULES,
        "sale_journal_id": sale_entry.id,
        "sale_id": sale["sale_id"],
        "status": "voided",
        "at": MEMBER_DAY.isoformat(),
        "member_id": None if sale["member"] is None else sale["member"]["member_id"],
        "refund": result["totals"]["net"],
        "points_reversed": result["totals"]["points"],
        "points_restored": sum(t["points"] or 0 for t in result["tenders"] if t["kind"] == "points"),
        "rebate_restored": format_fen(
            sum(parse_money(t["amount"]) for t in result["tenders"] if t["kind"] == "rebate")
        ),
        "reason": "customer changed their mind",
    }


def raw(
    seq: int, kind: str, body: dict[str, Any] | str, *, ident: str | None = None, at: dt.datetime = MEMBER_DAY
) -> RawEntry:
    return RawEntry(
        seq=seq,
        id=ident or str(uuid.uuid4()),
        kind=kind,
        at=at.isoformat(),
        rules_version=RULESET.version,
        member_version=7,
        body=body if isinstance(body, str) else json.dumps(body, ensure_ascii=False),
    )


def sales(first: int, count: int, **kw: Any) -> list[RawEntry]:
    return [raw(seq, "sale", sale_body(f"S{seq:05d}", variant=seq, **kw)) for seq in range(first, first + count)]


def batch_of(entries: list[RawEntry], *, store: str = STORE, lane: str = LANE, epoch: str = EPOCH) -> Batch:
    return decode_batch(store, lane, encode_batch(store, lane, epoch, entries))


# --- helpers (the database fixtures are in conftest.py) ----------------------------


def scalar(db: HqDatabase, sql: str, **params: Any) -> Any:
    with db._engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def rows(db: HqDatabase, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db._engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def counts(db: HqDatabase) -> dict[str, int]:
    tables = ("journal_entries", "sales", "returns", "voids", "points_ledger", "dead_letters")
    return {table: int(scalar(db, f"SELECT count(*) FROM {table}")) for table in tables}


def ledger(db: HqDatabase) -> list[tuple[str, str, int, int]]:
    found = rows(
        db,
        "SELECT l.member_id, l.kind, l.points, l.rebate_fen FROM points_ledger l"
        " JOIN journal_entries j ON j.id = l.entry_id ORDER BY j.seq, l.kind",
    )
    return [(m, k, int(p), int(r)) for m, k, p, r in found]


# --- applying batches ----------------------------------------------------------------


def test_a_batch_is_applied_once_with_its_rows(db: HqDatabase) -> None:
    entries = sales(1, 3)
    entries.append(raw(4, "sale", sale_body("S00004", member=None, variant=4)))
    applied = db.apply_batch(batch_of(entries), TOPIC)
    assert (applied.store, applied.lane, applied.epoch) == (STORE, LANE, EPOCH)
    assert (applied.acked_seq, applied.applied, applied.duplicates, applied.dead, applied.gap) == (4, 4, 0, 0, False)
    assert applied.sales_applied == 4
    assert counts(db) == {
        "journal_entries": 4,
        "sales": 4,
        "returns": 0,
        "voids": 0,
        "points_ledger": 3,  # three member sales earn; the guest's earns nothing for anyone
        "dead_letters": 0,
    }
    stored = rows(db, "SELECT id, seq, kind, at, rules_version, member_version, body FROM journal_entries ORDER BY seq")
    for entry, (ident, seq, kind, at, rules_version, member_version, body) in zip(entries, stored, strict=True):
        assert (ident, seq, kind, at, rules_version, member_version) == (
            entry.id,
            entry.seq,
            "sale",
            entry.at,
            entry.rules_version,
            entry.member_version,
        )
        assert json.loads(body) == json.loads(entry.body)
    assert db.cursors() == [(STORE, LANE, EPOCH, 4)]


def test_the_same_batch_twice_is_duplicates_and_nothing_doubles(db: HqDatabase) -> None:
    sale = sales(1, 2)
    entries = [
        *sale,
        raw(3, "return", return_body(sale[0], "R1", [("1", "100.00", 90)])),
        raw(4, "void", void_body(sale[1])),
    ]
    batch = batch_of(entries)
    first = db.apply_batch(batch, TOPIC)
    before, balance = counts(db), db.member_balance("M0001")
    second = db.apply_batch(batch, TOPIC)
    assert (first.applied, first.duplicates) == (4, 0)
    assert (second.applied, second.duplicates, second.dead, second.gap, second.acked_seq) == (0, 4, 0, False, 4)
    assert counts(db) == before
    assert db.member_balance("M0001") == balance
    assert db.lane_summary()[0]["duplicates"] == 4


def test_out_of_order_batches_wait_for_the_gap_then_apply_in_order(db: HqDatabase) -> None:
    entries = sales(1, 6)
    one, two = batch_of(entries[:3]), batch_of(entries[3:])
    early = db.apply_batch(two, TOPIC)
    assert (early.gap, early.applied, early.acked_seq, early.duplicates, early.dead) == (True, 0, 0, 0, 0)
    assert counts(db)["journal_entries"] == 0
    assert db.apply_batch(one, TOPIC).acked_seq == 3
    late = db.apply_batch(two, TOPIC)
    assert (late.gap, late.applied, late.acked_seq) == (False, 3, 6)
    assert [seq for (seq,) in rows(db, "SELECT seq FROM journal_entries ORDER BY seq")] == [1, 2, 3, 4, 5, 6]
    assert counts(db)["sales"] == 6


def test_a_gap_inside_a_batch_stops_it_there(db: HqDatabase) -> None:
    entries = sales(1, 5)
    applied = db.apply_batch(batch_of([entries[0], entries[1], entries[3], entries[4]]), TOPIC)
    assert (applied.applied, applied.acked_seq, applied.gap) == (2, 2, True)
    assert counts(db)["journal_entries"] == 2
    assert db.apply_batch(batch_of(entries[2:]), TOPIC).acked_seq == 5


def test_overlapping_batches_apply_each_entry_once(db: HqDatabase) -> None:
    entries = sales(1, 8)
    assert db.apply_batch(batch_of(entries[:5]), TOPIC).applied == 5
    overlap = db.apply_batch(batch_of(entries[2:]), TOPIC)
    assert (overlap.applied, overlap.duplicates, overlap.acked_seq) == (3, 3, 8)
    assert counts(db)["sales"] == 8
    assert int(scalar(db, "SELECT count(DISTINCT entry_id) FROM points_ledger")) == 8


def test_a_rejected_entry_is_dead_lettered_and_the_stream_moves_on(db: HqDatabase) -> None:
    entries = sales(1, 3)
    bad = RawEntry(2, str(uuid.uuid4()), "refund", MEMBER_DAY.isoformat(), RULESET.version, 7, '{"kind":"refund"}')
    batch = batch_of([entries[0], bad, entries[2]])
    assert [r.code for r in batch.rejects] == ["bad_kind"]
    applied = db.apply_batch(batch, TOPIC)
    assert (applied.applied, applied.dead, applied.acked_seq, applied.gap) == (2, 1, 3, False)
    [(seq, entry_id, code, payload, topic, epoch)] = rows(
        db, "SELECT seq, entry_id, code, payload, topic, epoch FROM dead_letters"
    )
    assert (seq, entry_id, code, topic, epoch) == (2, bad.id, "bad_kind", TOPIC, EPOCH)
    assert json.loads(payload)["kind"] == "refund"
    # Sent again: the dead-lettered seq is a duplicate like the rest, not a second dead letter.
    again = db.apply_batch(batch, TOPIC)
    assert (again.duplicates, again.dead) == (3, 0)
    assert db.lane_summary()[0]["dead_letters"] == 1


def test_a_reject_without_a_seq_is_dead_lettered_and_moves_nothing(db: HqDatabase) -> None:
    entries = sales(1, 2)
    no_seq = RawEntry(0, str(uuid.uuid4()), "sale", MEMBER_DAY.isoformat(), RULESET.version, 7, "{}")
    batch = batch_of([entries[0], no_seq, entries[1]])
    assert [(r.seq, r.code) for r in batch.rejects] == [(None, "bad_seq")]
    applied = db.apply_batch(batch, TOPIC)
    assert (applied.applied, applied.dead, applied.acked_seq) == (2, 1, 2)
    assert rows(db, "SELECT seq, code FROM dead_letters") == [(None, "bad_seq")]


def test_an_id_seen_before_is_dead_lettered_never_applied_twice(db: HqDatabase) -> None:
    first = sales(1, 1)[0]
    db.apply_batch(batch_of([first]), TOPIC)
    reused = raw(2, "sale", sale_body("S-other", variant=9), ident=first.id)
    twice = sales(3, 1)[0]
    same_in_batch = raw(4, "sale", sale_body("S-again", variant=8), ident=twice.id)
    applied = db.apply_batch(batch_of([reused, twice, same_in_batch]), TOPIC)
    assert (applied.applied, applied.dead, applied.acked_seq) == (1, 2, 4)
    # Another lane reusing an id is refused the same way.
    elsewhere = raw(1, "sale", sale_body("S-l02", lane="l02"), ident=first.id)
    other = db.apply_batch(batch_of([elsewhere], lane="l02"), "retail/s01/l02/journal")
    assert (other.applied, other.dead, other.acked_seq) == (0, 1, 1)
    assert rows(db, "SELECT lane, seq, entry_id, code FROM dead_letters ORDER BY lane, seq") == [
        (LANE, 2, first.id, "duplicate_id"),
        (LANE, 4, twice.id, "duplicate_id"),
        ("l02", 1, first.id, "duplicate_id"),
    ]
    assert [sale_id for (sale_id,) in rows(db, "SELECT sale_id FROM sales ORDER BY sale_id")] == ["S00001", "S00003"]


def test_a_body_that_lacks_what_its_kind_needs_is_dead_lettered(db: HqDatabase) -> None:
    no_id = sale_body("S1")
    del no_id["sale_id"]
    bad_net = sale_body("S2")
    bad_net["result"]["totals"]["net"] = "12.3x"
    float_net = sale_body("S3")
    float_net["result"]["totals"]["net"] = 12.3
    nul = _with(sale_body("S4"), "sale_id", "S\x004")
    good = sale_body("S5")
    entries = [raw(1, "sale", no_id), raw(2, "sale", bad_net), raw(3, "sale", float_net), raw(4, "sale", nul)]
    entries.append(raw(5, "sale", good))
    applied = db.apply_batch(batch_of(entries), TOPIC)
    assert (applied.applied, applied.dead, applied.acked_seq) == (1, 4, 5)
    found = rows(db, "SELECT seq, code, message FROM dead_letters ORDER BY seq")
    assert [(seq, code) for seq, code, _ in found] == [
        (1, "bad_sale"),
        (2, "bad_sale"),
        (3, "bad_sale"),
        (4, "bad_sale"),
    ]
    assert found[0][2] == "sale_id: missing"
    assert found[1][2].startswith("result.totals.net: '12.3x' is not a money amount")
    assert found[2][2].startswith("result.totals.net: money must be a decimal string")
    assert "NUL" in found[3][2]
    assert rows(db, "SELECT sale_id FROM sales") == [("S5",)]


def test_text_a_database_refuses_never_blocks_a_lane(db: HqDatabase) -> None:
    # A lone surrogate in a key head office does not read: stored (escaped), the sale applied.
    odd = sale_body("S1")
    odd["request"]["note"] = "\ud800"
    bad_version = RawEntry(
        2, str(uuid.uuid4()), "sale", MEMBER_DAY.isoformat(), "v\x00", 7, json.dumps(sale_body("S2"))
    )
    huge_version = RawEntry(
        3, str(uuid.uuid4()), "sale", MEMBER_DAY.isoformat(), "v", 2**64, json.dumps(sale_body("S3"))
    )
    applied = db.apply_batch(batch_of([raw(1, "sale", json.dumps(odd)), bad_version, huge_version]), TOPIC)
    assert (applied.applied, applied.dead, applied.acked_seq) == (1, 2, 3)
    assert json.loads(scalar(db, "SELECT body FROM journal_entries"))["request"]["note"] == "\ud800"
    assert rows(db, "SELECT seq, code FROM dead_letters ORDER BY seq") == [(2, "bad_entry"), (3, "bad_entry")]


def test_money_is_exact_fen(db: HqDatabase) -> None:
    entries = sales(1, 40)
    db.apply_batch(batch_of(entries), TOPIC)
    bodies = [json.loads(e.body)["result"]["totals"] for e in entries]
    expected = {key: sum(parse_money(t[key]) for t in bodies) for key in ("gross", "discount", "net")}
    found = rows(db, "SELECT sum(gross_fen), sum(discount_fen), sum(net_fen), sum(points_earned) FROM sales")[0]
    assert [int(v) for v in found] == [
        expected["gross"],
        expected["discount"],
        expected["net"],
        sum(t["points"] for t in bodies),
    ]
    assert expected["net"] % 100 != 0  # the figures really have fen in them
    totals = db.totals()
    assert totals["net_fen"] == expected["net"]
    assert isinstance(totals["net_fen"], int)
    assert totals["discount_fen"] == expected["discount"]


def test_ledger_rows_per_kind_and_the_balance_they_add_up_to(db: HqDatabase) -> None:
    paid_with_rebate = raw(1, "sale", sale_body("S1", rebate_fen=5_000, variant=1))
    with_points = sale_body("S2", variant=2)
    # No programme here takes points at the till yet; the shape is the engine's (agent/render.py).
    with_points["result"]["tenders"].insert(
        0, {"kind": "points", "amount": "0.00", "points": 300, "subkind": None, "earns_points": False}
    )
    spent_points = raw(2, "sale", with_points)
    guest = raw(3, "sale", sale_body("S3", member=None, variant=3))
    returned = raw(4, "return", return_body(paid_with_rebate, "R1", [("1", "500.00", 400)]))
    voided = raw(5, "void", void_body(spent_points))
    guest_void = raw(6, "void", void_body(guest))
    applied = db.apply_batch(batch_of([paid_with_rebate, spent_points, guest, returned, voided, guest_void]), TOPIC)
    assert (applied.applied, applied.sales_applied) == (6, 3)
    earned_1 = json.loads(paid_with_rebate.body)["result"]["totals"]["points"]
    earned_2 = with_points["result"]["totals"]["points"]
    assert ledger(db) == [
        ("M0001", "earn", earned_1, 0),
        ("M0001", "rebate_spend", 0, -5_000),
        ("M0001", "earn", earned_2, 0),
        ("M0001", "redeem", -300, 0),
        ("M0001", "return", -400, 0),
        ("M0001", "void", 300 - earned_2, 0),
    ]
    assert db.member_balance("M0001") == (earned_1 - 400, -5_000)
    assert db.member_balance("nobody") == (0, 0)
    [(spent, rebate)] = rows(db, "SELECT points_spent, rebate_spent_fen FROM sales WHERE sale_id = 'S2'")
    assert (spent, rebate) == (300, 0)
    [(refund, points_reversed, restored, rebate_restored)] = rows(
        db, "SELECT refund_fen, points_reversed, points_restored, rebate_restored_fen FROM voids WHERE sale_id = 'S2'"
    )
    assert (refund, points_reversed, restored, rebate_restored) == (
        parse_money(with_points["result"]["totals"]["net"]),
        earned_2,
        300,
        0,
    )
    [(return_id, sale_entry_id, refund_fen)] = rows(db, "SELECT return_id, sale_entry_id, refund_fen FROM returns")
    assert (return_id, sale_entry_id, refund_fen) == ("R1", paid_with_rebate.id, 50_000)
    summary = db.lane_summary()[0]
    assert (summary["sales"], summary["returns"], summary["voids"]) == (3, 1, 2)


def test_a_new_epoch_has_its_own_position(db: HqDatabase) -> None:
    db.apply_batch(batch_of(sales(1, 3)), TOPIC)
    fresh = db.apply_batch(batch_of(sales(1, 2), epoch=EPOCH_2), TOPIC)
    assert (fresh.applied, fresh.acked_seq, fresh.epoch) == (2, 2, EPOCH_2)
    assert db.cursors() == [(STORE, LANE, EPOCH_2, 2)]
    summary = db.lane_summary()[0]
    assert (summary["sales"], summary["epoch"], summary["last_seq"]) == (5, EPOCH_2, 2)


# --- whole messages, lane state ----------------------------------------------------------


def test_whole_messages_that_cannot_be_decoded_are_kept(db: HqDatabase) -> None:
    db.dead_letter_message(TOPIC, STORE, LANE, "not_json", "not JSON: Expecting value", b"\xff\xfe garbage")
    db.dead_letter_message("retail/x\x00y", None, None, "bad_topic", "not a lane topic", b"a\x00b")
    big = b'{"v":1,' + b" " * (2 * MAX_DEAD_PAYLOAD) + b"}"
    db.dead_letter_message(TOPIC, STORE, LANE, "bad_version", "wire version 2", big)
    found = rows(db, "SELECT topic, store, code, payload, payload_size FROM dead_letters ORDER BY id")
    assert found[0][3] == repr(b"\xff\xfe garbage")
    assert found[1][:3] == ("retail/x\\x00y", None, "bad_topic")
    assert found[1][3] == repr(b"a\x00b")
    assert len(found[2][3]) == MAX_DEAD_PAYLOAD
    assert found[2][4] == len(big)
    assert db.lane_summary()[0]["dead_letters"] == 2
    assert db.totals()["dead_letters"] == 3
    assert [d["code"] for d in db.recent_dead_letters(2)] == ["bad_version", "bad_topic"]


def test_lane_state_keeps_the_highest_session_and_the_later_message(db: HqDatabase) -> None:
    assert db.record_state(STORE, LANE, 2, "online", {"backlog": 3})
    assert not db.record_state(STORE, LANE, 1, "offline", {})  # an old connection's late Last Will
    assert db.lane_summary()[0]["state"] == "online"
    assert db.record_state(STORE, LANE, 2, "offline", {})  # this connection's own will
    assert db.record_state(STORE, LANE, 3, "online", {"backlog": 0, "note": "\ud800"})
    assert not db.record_state(STORE, LANE, 2, "offline", {})
    assert not db.record_state(STORE, LANE, 2**63, "online", {})
    [(session, state, info)] = rows(db, "SELECT session, state, info FROM lane_states")
    assert (session, state, json.loads(info)) == (3, "online", {"backlog": 0, "note": "\ud800"})
    summary = db.lane_summary()[0]
    assert (summary["state"], summary["session"], summary["sales"], summary["last_seq"]) == ("online", 3, 0, 0)


# --- audit -----------------------------------------------------------------------------------


def test_sales_to_audit_oldest_first_and_their_results(db: HqDatabase) -> None:
    late, later = MEMBER_DAY + dt.timedelta(hours=1), MEMBER_DAY + dt.timedelta(hours=2)
    tampered = sale_body("S3", variant=3, at=late)
    tampered["result"]["totals"]["points"] += 100
    entries = [
        raw(1, "sale", sale_body("S1", at=later, variant=1), at=later),
        raw(2, "sale", sale_body("S2", variant=2)),
        raw(3, "sale", tampered, at=late),
    ]
    db.apply_batch(batch_of(entries), TOPIC)
    pending = db.unaudited_sales(10)
    assert [p.entry_id for p in pending] == [entries[1].id, entries[2].id, entries[0].id]
    assert pending[2].at == later
    assert pending[2].at.utcoffset() == dt.timedelta(hours=8)
    assert (pending[0].rules_id, pending[0].rules_version, pending[0].rules_digest) == (
        RULESET.id,
        RULESET.version,
        RULESET.digest,
    )
    assert pending[1].body == tampered
    assert len(db.unaudited_sales(1)) == 1
    results = audit_rows(RulesetLibrary([RULESET]), pending)
    assert [status for _, status, _ in results] == ["ok", "mismatch", "ok"]
    db.record_audits(results)
    assert db.unaudited_sales(10) == []
    summary = db.lane_summary()[0]
    assert (summary["audit_pending"], summary["audit_mismatches"]) == (0, 1)
    [(detail,)] = rows(db, "SELECT audit_detail FROM sales WHERE audit_status = 'mismatch'")
    assert any(d["path"] == "totals.points" for d in json.loads(detail))
    with pytest.raises(ValueError, match="audit status"):
        db.record_audits([(entries[0].id, "fine", "[]")])


# --- schema ---------------------------------------------------------------------------------------


def test_opening_twice_migrates_once_and_a_newer_database_is_refused(db_url: str) -> None:
    HqDatabase.open(db_url).close()
    db = HqDatabase.open(db_url)
    try:
        versions = rows(db, "SELECT version FROM hq_schema_version ORDER BY version")
        assert versions == [(number,) for number in range(1, schema.LATEST + 1)]
        with db._engine.begin() as conn:
            conn.execute(
                schema.schema_version.insert().values(
                    version=schema.LATEST + 1, description="from the future", applied_at=dt.datetime.now(dt.UTC)
                )
            )
    finally:
        db.close()
    with pytest.raises(schema.SchemaError, match=f"schema version {schema.LATEST + 1}") as caught:
        HqDatabase.open(db_url)
    assert caught.value.code == "schema_too_new"


def test_an_unsupported_database_is_refused() -> None:
    with pytest.raises(schema.SchemaError, match="PostgreSQL or SQLite"):
        HqDatabase.open("mysql://localhost/hq")


def test_sqlite_runs_in_wal_with_full_sync_and_foreign_keys(tmp_path: Any) -> None:
    db = HqDatabase.open(f"sqlite:///{tmp_path}/hq.db")
    try:
        assert scalar(db, "PRAGMA journal_mode") == "wal"
        assert scalar(db, "PRAGMA synchronous") == 2  # FULL
        assert scalar(db, "PRAGMA foreign_keys") == 1
    finally:
        db.close()


# --- concurrency ---------------------------------------------------------------------------------


def test_two_consumers_of_one_lane_apply_each_entry_exactly_once(db_url: str) -> None:
    entries = sales(1, 120)
    # Both start with the very same batch (without the cursor lock both would insert it, and the
    # second would see every id as taken), then go on with overlapping batches of their own.
    plans = [
        [batch_of(entries[0:40]), batch_of(entries[30:80]), batch_of(entries[60:120])],
        [batch_of(entries[0:40]), batch_of(entries[20:70]), batch_of(entries[70:120])],
    ]
    dbs = [HqDatabase.open(db_url), HqDatabase.open(db_url)]
    start = threading.Barrier(2)
    results: list[list[Any]] = [[], []]
    errors: list[BaseException] = []

    def consume(index: int) -> None:
        try:
            start.wait(10)
            for batch in plans[index]:
                deadline = time.monotonic() + 30
                while True:
                    applied = dbs[index].apply_batch(batch, TOPIC)
                    results[index].append(applied)
                    if not applied.gap or time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not errors, errors
        assert sum(a.applied for r in results for a in r) == 120
        assert all(a.dead == 0 for r in results for a in r)
        db = dbs[0]
        assert counts(db) == {
            "journal_entries": 120,
            "sales": 120,
            "returns": 0,
            "voids": 0,
            "points_ledger": 120,
            "dead_letters": 0,
        }
        assert [seq for (seq,) in rows(db, "SELECT seq FROM journal_entries ORDER BY seq")] == list(range(1, 121))
        earned = sum(json.loads(e.body)["result"]["totals"]["points"] for e in entries)
        assert db.member_balance("M0001") == (earned, 0)
        assert db.cursors() == [(STORE, LANE, EPOCH, 120)]
    finally:
        for each in dbs:
            each.close()


# --- the pure extraction ---------------------------------------------------------------------------------


def _entry(kind: str, body: dict[str, Any]) -> Any:
    return batch_of([raw(1, kind, body)]).entries[0]


def _without(doc: dict[str, Any], path: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    del target[last]
    return doc


def _with(doc: dict[str, Any], path: str, value: Any = None) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    target[last] = value
    return doc


SALE = sale_body("S1", rebate_fen=1234)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_without(SALE, "sale_id"), "sale_id"),
        (_with(SALE, "sale_id", 17), "sale_id"),
        (_with(SALE, "sale_id", "x" * 65), "sale_id"),
        (_without(SALE, "rules"), "rules"),
        (_without(SALE, "rules.version"), "rules.version"),
        (_without(SALE, "result"), "result"),
        (_without(SALE, "result.totals"), "result.totals"),
        (_with(SALE, "result.totals.gross", "1,016.30"), "result.totals.gross"),
        (_with(SALE, "result.totals.discount", "-1.00"), "result.totals.discount"),
        (_with(SALE, "result.totals.net", None), "result.totals.net"),
        (_with(SALE, "result.totals.points", value=True), "result.totals.points"),
        (_with(SALE, "result.totals.points", -1), "result.totals.points"),
        (_with(SALE, "result.totals.points", 10**13), "result.totals.points"),
        (_with(SALE, "result.tenders", {"kind": "cash"}), "result.tenders"),
        (_with(SALE, "result.tenders", [{"kind": "rebate", "amount": 12.34}]), "result.tenders[0].amount"),
        (_with(SALE, "result.tenders", [{"kind": "points", "points": "300"}]), "result.tenders[0].points"),
        (_with(SALE, "member", "M0001"), "member"),
        (_without(SALE, "member.member_id"), "member.member_id"),
    ],
)
def test_a_sale_body_that_lacks_what_is_needed_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(facts.FactError) as caught:
        facts.extract(_entry("sale", body))
    assert (caught.value.code, caught.value.field) == ("bad_sale", field)
    assert caught.value.message.startswith(f"{field}: ")


def test_sale_facts_are_exact_and_unknown_keys_are_ignored() -> None:
    body = _with(SALE, "future_key", {"anything": [1, 2]})
    got = facts.extract(_entry("sale", body))
    totals = SALE["result"]["totals"]
    assert got == facts.SaleFacts(
        sale_id="S1",
        member_id="M0001",
        gross_fen=parse_money(totals["gross"]),
        discount_fen=parse_money(totals["discount"]),
        net_fen=parse_money(totals["net"]),
        points_earned=totals["points"],
        points_spent=0,
        rebate_spent_fen=1234,
        rules_id=RULESET.id,
        rules_version=RULESET.version,
        rules_digest=RULESET.digest,
    )
    assert facts.ledger_moves(got) == [
        facts.LedgerMove("M0001", "earn", totals["points"], 0),
        facts.LedgerMove("M0001", "rebate_spend", 0, -1234),
    ]
    guest = facts.extract(_entry("sale", _with(SALE, "member", None)))
    assert guest.member_id is None
    assert facts.ledger_moves(guest) == []


def test_return_and_void_facts_and_their_ledger_moves() -> None:
    sale = raw(1, "sale", SALE)
    ret = facts.extract(_entry("return", return_body(sale, "R9", [("1", "10.05", 9), ("2", "1.00", 0)])))
    assert ret == facts.ReturnFacts("R9", "S1", sale.id, "M0001", 1105, 9)
    assert facts.ledger_moves(ret) == [facts.LedgerMove("M0001", "return", -9, 0)]
    nothing_back = facts.extract(_entry("return", return_body(sale, "R10", [("2", "1.00", 0)])))
    assert facts.ledger_moves(nothing_back) == []
    void = facts.extract(_entry("void", void_body(sale)))
    assert isinstance(void, facts.VoidFacts)
    assert (void.refund_fen, void.points_restored, void.rebate_restored_fen) == (
        parse_money(SALE["result"]["totals"]["net"]),
        0,
        1234,
    )
    assert facts.ledger_moves(void) == [facts.LedgerMove("M0001", "void", -void.points_reversed, 1234)]
    for kind, body, field in [
        ("return", _without(return_body(sale, "R1", [("1", "1.00", 1)]), "refund"), "refund"),
        ("return", _with(return_body(sale, "R1", [("1", "1.00", 1)]), "sale_journal_id", None), "sale_journal_id"),
        ("void", _with(void_body(sale), "rebate_restored", "0.001"), "rebate_restored"),
        ("void", _without(void_body(sale), "points_restored"), "points_restored"),
    ]:
        with pytest.raises(facts.FactError) as caught:
            facts.extract(_entry(kind, body))
        assert (caught.value.code, caught.value.field) == (f"bad_{kind}", field)


def test_a_batch_of_guest_sales_has_no_member_anywhere(db: HqDatabase) -> None:
    applied = db.apply_batch(batch_of(sales(1, 3, member=None)), TOPIC)
    assert (applied.applied, applied.dead) == (3, 0)
    assert rows(db, "SELECT DISTINCT member_id FROM sales") == [(None,)]
    assert counts(db)["points_ledger"] == 0
