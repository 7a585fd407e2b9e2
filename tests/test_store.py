"""The lane store against real SQLite files: schema, member cache, journal, idempotency, full disk.

Every test opens real database files under tmp_path through the public API and
closes them (warnings are errors: a connection left open fails the test).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import hmac
import json
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import REPO_ROOT

from agent import migrations
from agent.basket import Member
from agent.errors import (
    AckError,
    InputError,
    ReturnError,
    SaleConflictError,
    SaleHasReturnsError,
    SaleVoidedError,
    StaleSnapshotError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    UnknownSaleError,
)
from agent.returns import Returned, SoldLine
from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, key_check, normalise_card_number, write_snapshot
from agent.store import LaneStore, request_digest
from agent.store_cli import add_members_parser, run_members

T = TypeVar("T")

KEY = bytes(range(32))
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
TODAY = AT.date()
CREATED = dt.datetime(2026, 12, 9, 23, 0, tzinfo=dt.UTC)

# Raw card numbers used in these tests; none of them may ever reach the database file.
RAW = {
    "active": "6200 1234 5678 0001",
    "lost": "6200 1234 5678 0002",
    "replaced": "6200 1234 5678 0003",
    "expired": "6200 1234 5678 0004",
    "cancelled": "6200 1234 5678 0005",
    "not_yet_valid": "6200 1234 5678 0006",
    "expired_by_date": "6200 1234 5678 0007",
    "other_member": "6200 1234 5678 0008",
}


def with_store(db: Path, body: Callable[[LaneStore], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        async with await LaneStore.open(db, KEY, **kwargs) as store:
            return await body(store)

    return asyncio.run(main())


def card(
    number: str,
    state: str = "active",
    *,
    kind: str = "standard",
    valid_from: dt.date | None = None,
    valid_until: dt.date | None = None,
) -> SnapshotCard:
    return SnapshotCard(
        card_hash=card_hash(KEY, number).hex(),
        kind=kind,
        state=state,  # type: ignore[arg-type]
        valid_from=valid_from or dt.date(2025, 1, 1),
        valid_until=valid_until,
    )


def alice(points: int = 1200, version: int | None = None) -> SnapshotMember:
    return SnapshotMember(
        member_id="M000123",
        tier="gold",
        next_tier="platinum",
        next_tier_from=dt.date(2026, 12, 11),
        birthday="03-14",
        points_balance=points,
        rebate_balance="35.20",
        version=version,
        cards=(
            card(RAW["active"], kind="vip", valid_until=dt.date(2027, 12, 31)),
            card(RAW["lost"], "lost"),
            card(RAW["replaced"], "replaced"),
            card(RAW["expired"], "expired"),
            card(RAW["cancelled"], "cancelled"),
            card(RAW["not_yet_valid"], valid_from=TODAY + dt.timedelta(days=1)),
            card(RAW["expired_by_date"], valid_until=TODAY - dt.timedelta(days=1)),
        ),
    )


def bob() -> SnapshotMember:
    return SnapshotMember(
        member_id="M000200", tier="silver", points_balance=0, rebate_balance="0", cards=(card(RAW["other_member"]),)
    )


def filler(count: int, start: int = 0) -> Iterable[SnapshotMember]:
    for i in range(start, start + count):
        yield SnapshotMember(
            member_id=f"F{i:07d}", tier="silver", points_balance=i, rebate_balance="1.00", cards=(card(f"7{i:015d}"),)
        )


def snapshot(path: Path, version: int, members: Iterable[SnapshotMember]) -> Path:
    write_snapshot(path, members, version=version, card_key=KEY, created=CREATED)
    return path


def raw_snapshot(path: Path, lines: list[str], *, version: int = 9, count: int | None = None) -> Path:
    """A hand-made snapshot (possibly invalid lines) with a correct header, count and checksum."""
    header = json.dumps(
        {
            "v": 1,
            "kind": "member-snapshot",
            "version": version,
            "created": "2026-12-09T23:00:00+00:00",
            "key_check": key_check(KEY),
        }
    )
    body = "".join(line + "\n" for line in [header, *lines]).encode()
    trailer = {
        "kind": "end",
        "count": len(lines) if count is None else count,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    path.write_bytes(body + json.dumps(trailer).encode() + b"\n")
    return path


def member_line(member_id: str, **changes: Any) -> str:
    doc: dict[str, Any] = {
        "member_id": member_id,
        "tier": "silver",
        "points_balance": 5,
        "rebate_balance": "0.00",
        "cards": [
            {
                "card_hash": card_hash(
                    KEY, "5" + str(int(hashlib.sha256(member_id.encode()).hexdigest(), 16))[:15]
                ).hex(),
                "kind": "standard",
                "state": "active",
                "valid_from": "2025-01-01",
            }
        ],
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...})


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    conn.close()
    return names


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def sale(
    store: LaneStore,
    sale_id: str,
    *,
    digest: str = "d1",
    member_id: str | None = None,
    points: int = 0,
    rebate: int = 0,
    lines: tuple[SoldLine, ...] = (),
    pad: str = "",
) -> tuple[dict[str, Any], bool]:
    return await store.commit_sale(
        sale_id,
        digest,
        {"sale_id": sale_id, "pad": pad},
        {"sale_id": sale_id, "total": "10.00"},
        at=AT,
        rules_version="2026.11.1",
        member_id=member_id,
        points_spent=points,
        rebate_spent_fen=rebate,
        lines=lines,
    )


def assert_gapless(db: Path) -> int:
    seqs = [row[0] for row in query(db, "SELECT seq FROM journal ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    return len(seqs)


# --- schema ---------------------------------------------------------------------


def test_open_creates_directory_schema_and_wal(tmp_path: Path) -> None:
    db = tmp_path / "state" / "lane" / "lane.db"
    status = with_store(db, lambda store: store.status())
    assert db.exists()
    assert status.schema_version == migrations.latest()
    assert (status.last_seq, status.acked_seq, status.backlog, status.member_version) == (0, 0, 0, 0)
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert query(db, "PRAGMA user_version") == [(migrations.latest(),)]
    assert {"journal", "sales", "members", "cards", "lane_state", "own_spend"} <= tables(db)
    assert not any(
        name.startswith(("cards_stage", "members_next", "cards_next", "members_old", "cards_old"))
        for name in tables(db)
    )


def test_reopen_is_idempotent_and_keeps_everything(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    first = with_store(db, lambda store: sale(store, "S1"))
    assert first == ({"sale_id": "S1", "total": "10.00"}, False)
    epoch = with_store(db, lambda store: store.status()).journal_epoch

    async def reopened(store: LaneStore) -> None:
        status = await store.status()
        assert status.schema_version == migrations.latest()
        assert status.journal_epoch == epoch
        assert status.last_seq == 1
        assert await sale(store, "S1") == ({"sale_id": "S1", "total": "10.00"}, True)

    with_store(db, reopened)
    assert query(db, "SELECT count(*) FROM journal") == [(1,)]


def test_each_migration_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: sale(store, "S1"))
    broken = migrations.Migration(
        migrations.latest() + 1, "half of it fails", ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, broken))
    with pytest.raises(StoreError, match="open failed"):
        with_store(db, lambda store: store.status())
    assert query(db, "PRAGMA user_version") == [(broken.version - 1,)]
    assert "half_done" not in tables(db)
    monkeypatch.undo()
    assert with_store(db, lambda store: store.status()).last_seq == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: store.status())
    query(db, "PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this program"):
        with_store(db, lambda store: store.status())


def test_damaged_header_is_refused_and_left_as_found(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: sale(store, "S1"))
    damaged = b"\x00garbage" * 8 + db.read_bytes()[64:]
    db.write_bytes(damaged)
    with pytest.raises(StoreCorruptError) as caught:
        with_store(db, lambda store: store.status())
    assert str(db) in str(caught.value)
    assert caught.value.code == "store_corrupt"
    assert db.read_bytes() == damaged  # never silently recreated


def test_damaged_page_fails_the_integrity_check(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def fill(store: LaneStore) -> None:
        for i in range(300):  # nothing deleted: every page is in use
            await sale(store, f"S{i}", lines=LINES, pad="p" * 300)

    with_store(db, fill)
    data = bytearray(db.read_bytes())
    page_size = query(db, "PRAGMA page_size")[0][0]
    pages = len(data) // page_size
    assert pages > 20
    for page in range(pages // 2, pages // 2 + 3):
        data[page * page_size + 8 : page * page_size + 200] = b"\xa5" * 192
    db.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"lane\.db"):
        with_store(db, lambda store: store.status())
    assert db.read_bytes() == bytes(data)


# --- card hashes --------------------------------------------------------------


def test_card_hash_is_hmac_sha256_of_the_normalised_number() -> None:
    expected = hmac.new(KEY, b"6200123456780001", hashlib.sha256).digest()
    for variant in (
        "6200123456780001",
        "6200 1234 5678 0001",
        " 6200-1234-5678-0001\n",
        "６２００１２３４５６７８０００１",
    ):
        assert card_hash(KEY, variant) == expected
    assert card_hash(KEY, "ab12cd") == card_hash(KEY, "AB12CD")
    assert normalise_card_number("ab-12 cd") == "AB12CD"
    assert card_hash(bytes(32), "6200123456780001") != expected
    for bad in ("", "12", "6200*1234", "6200\u00e91234", "9" * 65):
        with pytest.raises(ValueError, match="card number"):
            card_hash(KEY, bad)
    with pytest.raises(ValueError, match="16 bytes"):
        card_hash(b"short", "6200123456780001")


def test_request_digest_ignores_key_order() -> None:
    assert request_digest({"a": 1, "b": [1, 2]}) == request_digest({"b": [1, 2], "a": 1})
    assert request_digest({"a": 1}) != request_digest({"a": 2})


# --- member cache -----------------------------------------------------------------


def test_the_documented_example_imports(tmp_path: Path) -> None:
    doc = (REPO_ROOT / "docs" / "member-snapshot.md").read_text()
    example = re.search(r"```\n(\{\"v\":1.*?\n)```", doc, re.DOTALL)
    assert example is not None
    path = tmp_path / "example.jsonl"
    path.write_text(example.group(1))
    assert f"`{card_hash(KEY, '6200 1234 5678 0001').hex()}`" in doc
    assert f"`{key_check(KEY)}`" in doc

    async def body(store: LaneStore) -> None:
        result = await store.import_snapshot(path)
        assert (result.version, result.members, result.cards) == (42, 2, 3)
        record = await store.lookup_card(store.card_hash(RAW["active"]))
        assert record is not None
        assert (record.member.member_id, record.member.rebate_fen, record.member_version) == ("M000123", 3520, 41)
        lost = await store.lookup_card(store.card_hash(RAW["lost"]))
        assert lost is not None
        assert lost.use_on(TODAY) == "lost"
        new = await store.lookup_card(store.card_hash(RAW["replaced"]))  # ...0003: M000124's card, valid tomorrow
        assert new is not None
        assert (new.member.member_id, new.use_on(TODAY)) == ("M000124", "not_yet_valid")

    with_store(tmp_path / "lane.db", body)


def test_import_then_lookup_every_card_state(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    source = snapshot(tmp_path / "snap.jsonl", 7, [alice(version=3), bob()])

    async def body(store: LaneStore) -> None:
        result = await store.import_snapshot(source)
        assert (result.version, result.members, result.cards) == (7, 2, 8)
        expected_member = Member(
            member_id="M000123",
            tier="gold",
            card_kind="vip",
            birthday=(3, 14),
            points_balance=1200,
            rebate_fen=3520,
            next_tier="platinum",
            next_tier_from=dt.date(2026, 12, 11),
        )
        uses = {
            "active": "ok",
            "lost": "lost",
            "replaced": "replaced",
            "expired": "expired",
            "cancelled": "cancelled",
            "not_yet_valid": "not_yet_valid",
            "expired_by_date": "expired",
        }
        for name, use in uses.items():
            record = await store.lookup_card(store.card_hash(RAW[name]))
            assert record is not None, name
            assert record.use_on(TODAY) == use, name
            assert record.member_version == 3
            assert record.member.member_id == "M000123"
            assert record.member.card_kind == record.card_kind
        active = await store.lookup_card(store.card_hash("6200-1234-5678-0001"))
        assert active is not None
        assert active.member == expected_member
        assert (active.state, active.valid_from, active.valid_until) == (
            "active",
            dt.date(2025, 1, 1),
            dt.date(2027, 12, 31),
        )
        assert active.member.tier_on(dt.date(2026, 12, 11)) == "platinum"
        lost = await store.lookup_card(store.card_hash(RAW["lost"]))
        assert lost is not None
        assert (lost.state, lost.card_kind, lost.valid_until) == ("lost", "standard", None)
        assert await store.lookup_card(store.card_hash("6200 9999 9999 9999")) is None
        assert await store.get_member("M000123") == expected_member
        other = await store.lookup_card(store.card_hash(RAW["other_member"]))
        assert other is not None
        assert other.member == Member(member_id="M000200", tier="silver", card_kind="standard")
        assert other.member_version == 7  # a line without its own version takes the snapshot's
        assert await store.get_member("M999") is None
        status = await store.status()
        assert (status.member_version, status.members, status.cards, status.card_key_ok) == (7, 2, 8, True)
        assert status.snapshot_created == CREATED.isoformat()

    with_store(db, body)
    assert not any(
        name.startswith(("cards_stage", "members_next", "cards_next", "members_old", "cards_old"))
        for name in tables(db)
    )


async def _import_v1(store: LaneStore, tmp_path: Path) -> None:
    await store.import_snapshot(snapshot(tmp_path / "v1.jsonl", 1, [alice(points=1200)]))


async def _assert_v1_intact(store: LaneStore, db: Path) -> None:
    record = await store.lookup_card(store.card_hash(RAW["active"]))
    assert record is not None
    assert record.member.points_balance == 1200
    assert await store.lookup_card(store.card_hash(RAW["other_member"])) is None
    status = await store.status()
    assert (status.member_version, status.members, status.cards) == (1, 1, 7)
    staging = await store._run(
        lambda conn: conn.execute(
            "SELECT name FROM sqlite_schema WHERE name LIKE 'cards_stage%' OR name LIKE '%_next' OR name LIKE '%_old'"
        ).fetchall(),
        "test",
    )
    assert staging == [], db


def _issues(exc: pytest.ExceptionInfo[InputError]) -> list[tuple[str, str, str]]:
    return [(issue.source, issue.field, issue.code) for issue in exc.value.issues]


def test_truncated_snapshot_is_refused_and_the_old_cache_stays(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    full = snapshot(tmp_path / "v2.jsonl", 2, [alice(points=5), bob(), *filler(50)]).read_bytes()
    lines = full.splitlines(keepends=True)
    no_trailer = tmp_path / "no-trailer.jsonl"
    no_trailer.write_bytes(b"".join(lines[:-1]))
    mid_line = tmp_path / "mid-line.jsonl"
    mid_line.write_bytes(full[: len(full) // 2])

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(no_trailer)
        assert _issues(caught) == [(f"{no_trailer}:{len(lines)}", "", "truncated")]
        await _assert_v1_intact(store, db)
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(mid_line)
        codes = [code for _, _, code in _issues(caught)]
        assert codes[-1] == "truncated"
        assert codes[:-1] == ["json_invalid"]  # the cut line itself
        await _assert_v1_intact(store, db)

    with_store(db, body)


def test_altered_snapshot_fails_its_checksum(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    path = snapshot(tmp_path / "v2.jsonl", 2, [alice(points=5), bob()])
    text = path.read_text()
    assert '"points_balance":5,' in text
    path.write_text(text.replace('"points_balance":5,', '"points_balance":50000,'))

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(path)
        assert _issues(caught) == [(f"{path}:4", "sha256", "checksum_mismatch")]
        await _assert_v1_intact(store, db)

    with_store(db, body)


def test_every_bad_line_is_reported_with_line_and_field(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    good_card = {"card_hash": "ab" * 32, "kind": "standard", "state": "active", "valid_from": "2025-01-01"}
    path = raw_snapshot(
        tmp_path / "bad.jsonl",
        [
            member_line("A1"),
            member_line("A2", cards=[{**good_card, "state": "stolen"}]),
            member_line("A3", tier=...),
            member_line("A4", birthday="13-45"),
            member_line("A5", name="Zhang San", phone="13800000000"),  # personal data is refused outright
            member_line("A6", points_balance="12"),
            member_line("A7", rebate_balance=12.5),
            member_line("A8", cards=[{**good_card, "card_hash": "6200123456780001"}]),
            member_line("A9", next_tier="gold"),
            "",
            "not json",
            member_line("A10", version=10),
            member_line("A11", cards=[{**good_card, "valid_from": "2026-01-02", "valid_until": "2026-01-01"}]),
        ],
    )

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(path)
        found = _issues(caught)
        where = f"{path}:"
        assert found == [
            (where + "3", "cards[0].state", "literal_error"),
            (where + "4", "tier", "missing"),
            (where + "5", "birthday", "value_error"),
            (where + "6", "name", "extra_forbidden"),
            (where + "6", "phone", "extra_forbidden"),
            (where + "7", "points_balance", "int_type"),
            (where + "8", "rebate_balance", "value_error"),
            (where + "9", "cards[0].card_hash", "string_pattern_mismatch"),
            (where + "10", "", "value_error"),
            (where + "11", "", "blank_line"),
            (where + "12", "", "json_invalid"),
            (where + "13", "version", "bad_version"),
            (where + "14", "cards[0]", "value_error"),
        ]
        message = str(caught.value)
        assert f"{path}:5: birthday:" in message
        assert "calendar" in message
        await _assert_v1_intact(store, db)

    with_store(db, body)


def test_a_garbage_file_reports_a_bounded_number_of_problems(tmp_path: Path) -> None:
    path = raw_snapshot(tmp_path / "garbage.jsonl", ["not json"] * 250)

    async def body(store: LaneStore) -> None:
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(path)
        issues = caught.value.issues
        assert len(issues) == 101
        assert issues[99].source == f"{path}:101"
        assert (issues[100].code, issues[100].message) == ("too_many_problems", "and 150 more problem(s) not listed")

    with_store(tmp_path / "lane.db", body)


def test_duplicate_members_and_cards_are_reported_across_chunks(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    shared = {"card_hash": "cd" * 32, "kind": "standard", "state": "active", "valid_from": "2025-01-01"}
    path = raw_snapshot(
        tmp_path / "dups.jsonl",
        [
            member_line("B1", cards=[shared]),
            member_line("B2"),
            member_line("B3"),
            member_line("B1"),
            member_line("B4", cards=[{**shared, "state": "lost"}]),
        ],
    )

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        with pytest.raises(InputError) as caught:
            await store.import_snapshot(path, chunk_members=2)
        assert _issues(caught) == [
            (f"{path}:5", "member_id", "duplicate_member"),
            (f"{path}:6", "cards[0].card_hash", "duplicate_card"),
        ]
        assert "line 2 (member 'B1')" in str(caught.value)
        await _assert_v1_intact(store, db)

    with_store(db, body)


def test_header_and_trailer_problems(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    other_key = tmp_path / "other-key.jsonl"
    write_snapshot(other_key, [bob()], version=2, card_key=bytes(32), created=CREATED)
    not_snapshot = tmp_path / "rules.jsonl"
    not_snapshot.write_text('{"v": 1, "kind": "ruleset"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    wrong_count = raw_snapshot(tmp_path / "count.jsonl", [member_line("C1"), member_line("C2")], count=3)
    after = tmp_path / "after.jsonl"
    after.write_bytes(snapshot(tmp_path / "ok.jsonl", 2, [bob()]).read_bytes() + b'{"member_id": "late"}\n')

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        expectations = [
            (other_key, [(f"{other_key}:1", "key_check", "card_key_mismatch")]),
            (
                not_snapshot,
                [
                    (f"{not_snapshot}:1", "", "bad_header"),
                    (f"{not_snapshot}:1", "kind", "literal_error"),
                    *[(f"{not_snapshot}:1", name, "missing") for name in ("version", "created", "key_check")],
                ],
            ),
            (empty, [(f"{empty}:1", "", "empty_file")]),
            (wrong_count, [(f"{wrong_count}:4", "count", "count_mismatch")]),
            (after, [(f"{after}:4", "", "after_trailer")]),
            (tmp_path / "missing.jsonl", [(str(tmp_path / "missing.jsonl"), "", "unreadable")]),
        ]
        for path, expected in expectations:
            with pytest.raises(InputError) as caught:
                await store.import_snapshot(path)
            assert _issues(caught) == expected, path
            await _assert_v1_intact(store, db)

    with_store(db, body)


def test_older_snapshot_is_refused_unless_allowed(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    v5 = snapshot(tmp_path / "v5.jsonl", 5, [alice()])
    v4 = snapshot(tmp_path / "v4.jsonl", 4, [bob()])

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(v5)
        with pytest.raises(StaleSnapshotError, match="older"):
            await store.import_snapshot(v4)
        assert (await store.status()).member_version == 5
        await store.import_snapshot(v5)  # the same version again: allowed (re-delivery)
        await store.import_snapshot(v4, allow_older=True)
        assert (await store.status()).member_version == 4
        assert await store.get_member("M000123") is None

    with_store(db, body)


def test_sales_carry_on_during_an_import(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    source = snapshot(tmp_path / "big.jsonl", 2, filler(6000))

    async def body(store: LaneStore) -> None:
        importing = asyncio.create_task(store.import_snapshot(source, chunk_members=200))
        committed = 0
        while not importing.done():
            await sale(store, f"S{committed}")
            committed += 1
        await importing
        assert committed > 5  # sales were interleaved with the import's chunks
        status = await store.status()
        assert (status.members, status.last_seq) == (6000, committed)

    with_store(db, body)


# --- the journal: sales, returns, voids --------------------------------------------

# Out of line_id order on purpose: a sale's lines come back in the order they were sold.
LINES = (SoldLine("2", 1000, 3000, 30), SoldLine("1", 2000, 10000, 100))


def test_commit_sale_is_idempotent_on_sale_id_and_digest(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        response = {"sale_id": "S1", "total": "10.00"}
        assert await sale(store, "S1", member_id="M1", points=10, lines=LINES) == (response, False)
        assert await sale(store, "S1", member_id="M1", points=10, lines=LINES) == (response, True)
        with pytest.raises(SaleConflictError) as caught:
            await sale(store, "S1", digest="other")
        assert (caught.value.code, caught.value.key) == ("sale_conflict", "S1")
        record = await store.find_sale("S1")
        assert record is not None
        assert (record.seq, record.request_digest, record.member_id, record.points_spent) == (1, "d1", "M1", 10)
        assert record.entry == {"sale_id": "S1", "pad": ""}
        assert record.response == response
        assert record.lines == LINES
        assert not record.voided
        assert record.at == AT.isoformat()
        assert await store.find_sale("S2") is None

    with_store(db, body)
    assert query(db, "SELECT count(*) FROM journal") == [(1,)]
    assert query(db, "SELECT count(*) FROM own_spend") == [(1,)]


def test_seq_is_gapless_across_concurrent_commits_conflicts_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(snapshot(tmp_path / "v4.jsonl", 4, [bob()]))
        results = await asyncio.gather(
            *(sale(store, f"S{i % 150}", digest="d1" if i < 250 else "d2") for i in range(300)),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, SaleConflictError)]
        assert len(conflicts) == 50
        entries = []
        after = 0
        while batch := await store.journal_after(after, limit=40):
            entries.extend(batch)
            after = batch[-1].seq
        assert [entry.seq for entry in entries] == list(range(1, 151))
        assert len({entry.id for entry in entries}) == 150
        first = entries[0]
        assert (first.kind, first.at, first.rules_version, first.member_version) == (
            "sale",
            AT.isoformat(),
            "2026.11.1",
            4,
        )
        assert first.body["sale_id"].startswith("S")

    with_store(db, body)
    assert_gapless(db)

    async def more(store: LaneStore) -> None:
        await sale(store, "S-after-reopen")
        assert (await store.find_sale("S-after-reopen")).seq == 151  # type: ignore[union-attr]

    with_store(db, more)
    assert assert_gapless(db) == 151


def test_returns_are_checked_against_the_sale_in_the_same_transaction(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def give_back(
        store: LaneStore, return_id: str, lines: dict[str, Returned], *, sale_id: str = "S1", digest: str = "r"
    ) -> tuple[dict[str, Any], bool]:
        return await store.commit_return(
            return_id,
            sale_id,
            digest,
            {"return_id": return_id},
            {"return_id": return_id, "refund": "1.00"},
            lines,
            at=AT,
            rules_version="r1",
        )

    async def body(store: LaneStore) -> None:
        await sale(store, "S1", member_id="M1", lines=LINES)
        assert await store.returned_so_far("S1") == {}
        assert await give_back(store, "R1", {"1": Returned(1000, 5000, 50)}) == (
            {"return_id": "R1", "refund": "1.00"},
            False,
        )
        assert await give_back(store, "R1", {"1": Returned(1000, 5000, 50)}) == (
            {"return_id": "R1", "refund": "1.00"},
            True,
        )
        with pytest.raises(SaleConflictError):
            await give_back(store, "R1", {"1": Returned(1000, 5000, 50)}, digest="other")
        await sale(store, "S2", lines=LINES)
        with pytest.raises(SaleConflictError, match="already used for sale 'S1'"):
            await give_back(store, "R1", {"1": Returned(1000, 5000, 50)}, sale_id="S2")
        await give_back(store, "R2", {"1": Returned(500, 2500, 25), "2": Returned(1000, 3000, 30)})
        assert await store.returned_so_far("S1") == {"1": Returned(1500, 7500, 75), "2": Returned(1000, 3000, 30)}
        with pytest.raises(ReturnError) as caught:
            await give_back(
                store, "R3", {"1": Returned(1000, 5000, 50), "2": Returned(1, 0, 0), "9": Returned(1, 1, 0)}
            )
        assert [(i.field, i.code) for i in caught.value.issues] == [
            ("lines.1", "over_return"),
            ("lines.2", "over_return"),
            ("lines.9", "unknown_line"),
        ]
        assert "1 asked back, 0.5 left to return" in str(caught.value)
        with pytest.raises(ReturnError, match="over_refund"):
            await give_back(store, "R3", {"1": Returned(500, 2501, 25)})
        with pytest.raises(ReturnError, match="bad_quantity"):
            await give_back(store, "R3", {"1": Returned(0, 0, 0)})
        with pytest.raises(UnknownSaleError) as unknown:
            await give_back(store, "R3", {"1": Returned(1, 0, 0)}, sale_id="nope")
        assert unknown.value.code == "unknown_sale"
        await give_back(store, "R3", {"1": Returned(500, 2500, 25)})
        assert await store.returned_so_far("S1") == {"1": Returned(2000, 10000, 100), "2": Returned(1000, 3000, 30)}

    with_store(db, body)
    assert query(db, "SELECT kind, count(*) FROM journal GROUP BY kind ORDER BY kind") == [("return", 3), ("sale", 2)]
    assert_gapless(db)


def test_void_is_journaled_once_and_blocks_returns(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def void(store: LaneStore, sale_id: str, digest: str = "v") -> tuple[dict[str, Any], bool]:
        return await store.void_sale(sale_id, digest, {"void": sale_id}, {"voided": sale_id}, at=AT, rules_version="r1")

    async def body(store: LaneStore) -> None:
        await sale(store, "S1", lines=LINES)
        await sale(store, "S2", lines=LINES)
        assert await void(store, "S1") == ({"voided": "S1"}, False)
        assert await void(store, "S1") == ({"voided": "S1"}, True)
        with pytest.raises(SaleVoidedError) as again:
            await void(store, "S1", digest="second")
        assert again.value.code == "sale_voided"
        with pytest.raises(SaleVoidedError):
            await store.commit_return("R1", "S1", "r", {}, {}, {"1": Returned(1, 0, 0)}, at=AT, rules_version="r1")
        record = await store.find_sale("S1")
        assert record is not None
        assert record.voided
        assert record.void_seq == 3
        await store.commit_return("R2", "S2", "r", {}, {}, {"1": Returned(1, 0, 0)}, at=AT, rules_version="r1")
        with pytest.raises(SaleHasReturnsError) as has_returns:
            await void(store, "S2")
        assert has_returns.value.code == "sale_has_returns"
        with pytest.raises(UnknownSaleError):
            await void(store, "S9")

    with_store(db, body)
    assert query(db, "SELECT seq, kind FROM journal ORDER BY seq") == [
        (1, "sale"),
        (2, "sale"),
        (3, "void"),
        (4, "return"),
    ]


def test_unsynced_spend_counts_until_head_office_acknowledges(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await sale(store, "A", member_id="M1", points=100, rebate=500, lines=LINES)  # seq 1
        await sale(store, "B", member_id="M1", points=50)  # seq 2
        await sale(store, "C", member_id="M2", points=7)  # seq 3
        await store.commit_return("R", "A", "r", {}, {}, {"1": Returned(1000, 5000, 10)}, at=AT, rules_version="r")  # 4
        await store.void_sale("B", "v", {}, {}, at=AT, rules_version="r")  # seq 5: credits B's 50 back
        assert await store.unsynced_spend("M1") == (100 + 50 + 10 - 50, 500)
        assert await store.unsynced_spend("M2") == (7, 0)
        assert await store.unsynced_spend("nobody") == (0, 0)
        assert await store.mark_acked(2) == 2
        # A and B are acknowledged: B's void credit no longer counts either (it undid an acknowledged spend).
        assert await store.unsynced_spend("M1") == (10, 0)
        assert await store.mark_acked(1) == 2  # a late, lower ack changes nothing
        with pytest.raises(AckError) as caught:
            await store.mark_acked(6)
        assert caught.value.code == "bad_ack"
        status = await store.status()
        assert (status.last_seq, status.acked_seq, status.backlog) == (5, 2, 3)
        assert status.db_bytes > 0
        assert [entry.seq for entry in await store.journal_after(status.acked_seq)] == [3, 4, 5]
        assert await store.mark_acked(5) == 5
        assert await store.unsynced_spend("M1") == (0, 0)
        assert (await store.status()).backlog == 0

    with_store(db, body)


def test_lookups_for_a_sale_read_the_member_and_its_unsynced_spend_together(tmp_path: Path) -> None:
    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        await sale(store, "A", member_id="M000123", points=100, rebate=500)
        card = await store.card_for_sale(store.card_hash(RAW["active"]))
        assert card is not None
        record, spend = card
        assert (record.member.member_id, record.member.points_balance, spend) == ("M000123", 1200, (100, 500))
        assert record == await store.lookup_card(store.card_hash(RAW["active"]))
        member = await store.member_for_sale("M000123")
        assert member is not None
        assert (member[0], member[1]) == (await store.get_member("M000123"), (100, 500))
        assert await store.card_for_sale(store.card_hash(RAW["other_member"])) is None
        assert await store.member_for_sale("nobody") is None
        assert await store.mark_acked(1) == 1
        acked = await store.member_for_sale("M000123")
        assert acked is not None
        assert acked[1] == (0, 0)

    with_store(tmp_path / "lane.db", body)


def test_sale_context_reads_the_taken_sale_or_the_member(tmp_path: Path) -> None:
    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        assert await store.sale_context("S", None) == (None, None)
        free, member = await store.sale_context("S", "M000123")
        assert free is None
        assert member == await store.member_for_sale("M000123")
        assert await store.sale_context("S", "nobody") == (None, None)
        await sale(store, "S", member_id="M000123", points=5)
        taken, member = await store.sale_context("S", "M000123")
        assert taken == await store.find_sale("S")
        assert member is None  # a retry needs no member

    with_store(tmp_path / "lane.db", body)


def test_background_checkpoints_leave_commits_alone_until_asked(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body() -> None:
        async with await LaneStore.open(db, KEY, background_checkpoints=True) as store:
            for i in range(300):  # well past SQLite's 1,000-page automatic checkpoint
                await sale(store, f"S{i}", lines=LINES)
            wal = db.with_name("lane.db-wal")
            pages_before, _ = await store.checkpoint()
            assert pages_before > 1000, "commits checkpointed on their own"
            assert wal.stat().st_size > 1000 * 4096
            pages, done = await store.checkpoint()
            assert done == pages  # nothing else reads: everything copied
            assert (await store.status()).last_seq == 300
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM sales").fetchone()[0] == 300

    asyncio.run(body())


def test_find_return_gives_the_committed_return(tmp_path: Path) -> None:
    async def body(store: LaneStore) -> None:
        await sale(store, "A", lines=LINES)
        assert await store.find_return("R") is None
        await store.commit_return(
            "R", "A", "dig", {"e": 1}, {"refund": "1.00"}, {"1": Returned(1000, 100, 0)}, at=AT, rules_version="r"
        )
        assert await store.find_return("R") == ("A", "dig", {"refund": "1.00"})

    with_store(tmp_path / "lane.db", body)


# --- full disk ----------------------------------------------------------------------


def test_full_disk_rolls_back_the_whole_sale_and_recovers(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    source = snapshot(tmp_path / "v1.jsonl", 1, [alice()])

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(source)
        for i in range(5):
            await sale(store, f"S{i}", member_id="M000123", points=1, lines=LINES)
        status = await store.status()
        await store.set_size_limit(status.db_bytes + 8 * 4096)
        committed = 5
        failed_id = code = None
        for i in range(5, 2000):
            try:
                await sale(store, f"S{i}", member_id="M000123", points=1, lines=LINES, pad="x" * 3000)
            except StoreFullError as exc:
                code = exc.code
                failed_id = f"S{i}"
                break
            committed += 1
        assert failed_id is not None, "the size limit never hit"
        assert code == "disk_full"
        assert await store.find_sale(failed_id) is None
        # Reads carry on while full, and so do further attempts, cleanly refused.
        assert await store.lookup_card(store.card_hash(RAW["active"])) is not None
        with pytest.raises(StoreFullError):
            await sale(store, failed_id, member_id="M000123", points=1, lines=LINES, pad="x" * 3000)
        assert (await store.status()).last_seq == committed
        assert await store.unsynced_spend("M000123") == (committed, 0)
        await store.set_size_limit(None)
        assert await sale(store, failed_id, member_id="M000123", points=1, lines=LINES, pad="x" * 3000) == (
            {"sale_id": failed_id, "total": "10.00"},
            False,
        )
        assert (await store.find_sale(failed_id)).seq == committed + 1  # type: ignore[union-attr]
        assert await store.integrity_check() == ["ok"]

    with_store(db, body)
    total = assert_gapless(db)
    assert query(db, "SELECT count(*) FROM sales") == [(total,)]
    assert query(db, "SELECT count(*) FROM own_spend") == [(total,)]
    assert query(db, "SELECT count(*) FROM sale_lines") == [(2 * total,)]


def test_full_disk_during_import_keeps_the_old_cache(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    big = snapshot(tmp_path / "v2.jsonl", 2, filler(4000))

    async def body(store: LaneStore) -> None:
        await _import_v1(store, tmp_path)
        await store.set_size_limit((await store.status()).db_bytes + 16 * 4096)
        with pytest.raises(StoreFullError):
            await store.import_snapshot(big, chunk_members=500)
        await _assert_v1_intact(store, db)
        await sale(store, "S1")  # small writes fit in the pages the failed import gave back
        await store.set_size_limit(None)
        result = await store.import_snapshot(big)
        assert result.members == 4000
        assert await store.lookup_card(store.card_hash(RAW["active"])) is None

    with_store(db, body)


def test_a_lock_held_elsewhere_times_out_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await sale(store, "S1")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # e.g. a technician's sqlite3 shell in the middle of a write
            with pytest.raises(StoreBusyError) as caught:
                await sale(store, "S2")
            assert caught.value.code == "store_busy"
            assert await store.lookup_card(store.card_hash(RAW["active"])) is None  # WAL: reads are not blocked
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await sale(store, "S2") == ({"sale_id": "S2", "total": "10.00"}, False)

    with_store(db, body, busy_timeout_ms=100)
    assert assert_gapless(db) == 2


# --- personal data ------------------------------------------------------------------


def test_no_raw_card_number_reaches_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    source = snapshot(tmp_path / "v1.jsonl", 1, [alice(), bob()])

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(source)
        for name, number in RAW.items():
            record = await store.lookup_card(store.card_hash(number))
            assert record is not None
            await sale(store, f"S-{name}", member_id=record.member.member_id, points=1, lines=LINES)

    with_store(db, body)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("lane.db")]
    data = b"".join(p.read_bytes() for p in files)
    assert card_hash(KEY, RAW["active"]) in data  # the scan does see what is stored
    assert b"M000123" in data
    for number in RAW.values():
        for form in (number, normalise_card_number(number), number.replace(" ", "-")):
            assert form.encode() not in data, form
            assert form.encode("utf-16-le") not in data, form


# --- the command line ---------------------------------------------------------------


def _members(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lane-agent")
    add_members_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["members", "import", *argv])


def test_cli_imports_a_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "state" / "lane.db"
    source = snapshot(tmp_path / "v3.jsonl", 3, [alice(), bob()])
    assert run_members(_members([str(source), "--db", str(db), "--card-key-hex", KEY.hex()])) == 0
    out = capsys.readouterr().out
    assert "member-table version 3, 2 members, 8 cards" in out
    assert with_store(db, lambda store: store.status()).member_version == 3


def test_cli_reports_every_problem_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "lane.db"
    path = raw_snapshot(tmp_path / "bad.jsonl", [member_line("A1", tier=...), member_line("A2", birthday="02-30")])
    assert run_members(_members([str(path), "--db", str(db), "--card-key-hex", KEY.hex()])) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: tier: Field required [missing]" in err
    assert f"{path}:3: birthday:" in err
    assert "nothing imported" in err
    assert "Traceback" not in err
    assert run_members(_members([str(path), "--db", str(db), "--card-key-hex", "zz"])) == 1
    assert "--card-key-hex" in capsys.readouterr().err
    assert run_members(_members([str(path), "--db", str(db), "--card-key-hex", "abcd"])) == 1
    assert "at least 16 bytes" in capsys.readouterr().err


def test_cli_store_failure_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "lane.db"
    db.write_bytes(b"this is not a database" * 100)
    source = snapshot(tmp_path / "v3.jsonl", 3, [bob()])
    assert run_members(_members([str(source), "--db", str(db), "--card-key-hex", KEY.hex()])) == 3
    err = capsys.readouterr().err
    assert "store_corrupt" in err
    assert "Traceback" not in err


# --- what the uplink reads ---------------------------------------------------------------------


def test_journal_batch_gives_the_stored_rows_as_they_are(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        for number in range(5):
            await sale(store, f"S{number}", pad="收银" * number)
        rows = await store.journal_batch(1, 3)
        assert [row.seq for row in rows] == [2, 3, 4]
        assert await store.journal_batch(5, 10) == []
        with pytest.raises(ValueError, match="at least one"):
            await store.journal_batch(0, 0)

    with_store(db, body)
    stored = query(db, "SELECT seq, id, kind, at, rules_version, member_version, body FROM journal WHERE seq = 3")
    rows = with_store(db, lambda store: store.journal_batch(2, 1))
    assert [
        tuple(getattr(row, f) for f in ("seq", "id", "kind", "at", "rules_version", "member_version", "body"))
        for row in rows
    ] == stored
    assert isinstance(rows[0].body, str)


def test_backlog_stats_follow_sales_and_acks_in_utf8_bytes(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    def expected() -> tuple[int, int, str | None]:
        rows = query(
            db, "SELECT j.at, j.body FROM journal AS j, lane_state AS s WHERE j.seq > s.acked_seq ORDER BY j.seq"
        )
        return len(rows), sum(len(body.encode()) for _, body in rows), rows[0][0] if rows else None

    async def body(store: LaneStore) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
        seen = [(tuple(await store.backlog_stats()), expected())]
        for number in range(4):
            await sale(store, f"S{number}", pad="会员" * (number + 1) * 10)
            seen.append((tuple(await store.backlog_stats()), expected()))
        await store.mark_acked(2)
        seen.append((tuple(await store.backlog_stats()), expected()))
        await sale(store, "S4", pad="x" * 100)
        await store.mark_acked(3)  # both ends moved since the last call
        seen.append((tuple(await store.backlog_stats()), expected()))
        await sale(store, "S5")
        await store.mark_acked(6)  # the ack passed everything the last call counted
        seen.append((tuple(await store.backlog_stats()), expected()))
        return seen

    seen = with_store(db, body)
    for got, want in seen:
        assert got == want
    assert [got[0] for got, _ in seen] == [0, 1, 2, 3, 4, 2, 2, 0]
    assert seen[4][0][1] > 600  # 200 CJK characters of padding: 600 bytes in UTF-8, counted as bytes


def test_sync_sessions_count_up_durably(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> tuple[int, int, int]:
        return await store.sync_session(), await store.next_sync_session(), await store.next_sync_session()

    assert with_store(db, body) == (0, 1, 2)
    assert with_store(db, lambda store: store.next_sync_session()) == 3
    assert query(db, "SELECT sync_session FROM lane_state") == [(3,)]


def test_a_written_entry_wakes_the_uplink_and_a_replay_does_not(tmp_path: Path) -> None:
    async def body(store: LaneStore) -> list[bool]:
        woken = [store.journal_appended.is_set()]
        await sale(store, "A")
        woken.append(store.journal_appended.is_set())
        store.journal_appended.clear()
        await sale(store, "A")  # the POS's retry: replayed, nothing written
        woken.append(store.journal_appended.is_set())
        await store.void_sale("A", "v", {}, {}, at=AT, rules_version="r")
        woken.append(store.journal_appended.is_set())
        store.journal_appended.clear()
        await sale(store, "B", lines=LINES)
        store.journal_appended.clear()
        await store.commit_return("R", "B", "r", {}, {}, {"1": Returned(1000, 100, 0)}, at=AT, rules_version="r")
        woken.append(store.journal_appended.is_set())
        return woken

    assert with_store(tmp_path / "lane.db", body) == [False, True, False, True, True]


def test_a_version_1_database_gains_the_session_column(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    conn = sqlite3.connect(db, isolation_level=None)
    migrations.apply(conn, migrations.MIGRATIONS[0])
    conn.close()
    assert with_store(db, lambda store: store.next_sync_session()) == 1
    assert query(db, "PRAGMA user_version") == [(migrations.latest(),)]
