"""The member table and the hot list from head office, lane side (docs/downlink.md).

Store level, against real SQLite files: member-delta pages (replacement of a
member and its cards, re-delivery, gaps, cards moving, all-or-nothing on a bad
page or a full disk), the hot-list overlay, the balance the till shows.  Then
the member sync's notice handlers, the uplink's ack gating against a real
Mosquitto, and end to end: a real broker, a real ``lane-hq run`` and real
``lane-agent run`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import httpx
import pytest
from broker import Broker
from conftest import REPO_ROOT
from hq_harness import Hq
from lane_harness import GOLD_CARD, LOST_CARD, SHANGHAI, VIP_CARD, Lane, basket
from lane_harness import members as harness_members

from agent import migrations
from agent.config import LaneConfig, parse_config
from agent.errors import InputError, MemberGapError, StoreFullError
from agent.metrics import Metrics
from agent.returns import SoldLine
from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_delta, write_snapshot
from agent.store import HotCard, LaneStore
from sync import wire
from sync.downlink import MemberSync
from sync.lane_auth import lane_token
from sync.uplink import Uplink

T = TypeVar("T")

KEY = bytes(range(32))
STORE, LANE = "store-0101", "lane-03"
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
TODAY = AT.date()
CREATED = dt.datetime(2026, 12, 9, 23, 0, tzinfo=dt.UTC)

CARD_A = "6200 1234 5678 0001"
CARD_B = "6200 1234 5678 0002"
CARD_C = "6200 1234 5678 0003"
CARD_D = "6200 1234 5678 0004"

pytestmark = pytest.mark.timeout(120)


def with_store(db: Path, body: Callable[[LaneStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with await LaneStore.open(db, KEY) as store:
            return await body(store)

    return asyncio.run(main())


def card(number: str, state: str = "active", kind: str = "standard") -> SnapshotCard:
    return SnapshotCard(
        card_hash=card_hash(KEY, number).hex(),
        kind=kind,
        state=state,  # type: ignore[arg-type]
        valid_from=dt.date(2025, 1, 1),
    )


def member(
    member_id: str, version: int | None, *cards: SnapshotCard, tier: str = "silver", points: int = 100
) -> SnapshotMember:
    return SnapshotMember(
        member_id=member_id,
        tier=tier,
        points_balance=points,
        rebate_balance="1.00",
        version=version,
        cards=cards,
    )


def base(path: Path, version: int = 10) -> Path:
    """M1 (cards A, B) at 9, M2 (card C) at 10."""
    write_snapshot(
        path,
        [member("M1", 9, card(CARD_A), card(CARD_B), tier="gold", points=1200), member("M2", 10, card(CARD_C))],
        version=version,
        card_key=KEY,
        created=CREATED,
    )
    return path


def delta(path: Path, after: int, members: Iterable[SnapshotMember], *, head: int | None = None, **kw: Any) -> Path:
    listed = list(members)
    top = max((m.version or 0 for m in listed), default=after)
    return write_delta(path, listed, after=after, head=head if head is not None else top, card_key=KEY, **kw)


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the member cache and the lane state hold (the sync's timestamps aside)."""
    conn = sqlite3.connect(db)
    try:
        return {
            "members": conn.execute("SELECT * FROM members ORDER BY member_id").fetchall(),
            "cards": conn.execute("SELECT * FROM cards ORDER BY card_hash").fetchall(),
            "hot": conn.execute("SELECT card_hash, member_id, state, version FROM hot_cards ORDER BY 1").fetchall(),
            "state": conn.execute(
                "SELECT member_version, member_count, card_count, member_head_version, hotlist_version FROM lane_state"
            ).fetchall(),
        }
    finally:
        conn.close()


async def owner(store: LaneStore, number: str) -> tuple[str, str] | None:
    """(member, state) of a card as a lookup sees it."""
    record = await store.lookup_card(store.card_hash(number))
    return None if record is None else (record.member.member_id, record.use_on(TODAY))


# --- deltas ----------------------------------------------------------------------------


def test_a_page_replaces_each_member_and_all_its_cards(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        page = delta(
            tmp_path / "d.jsonl",
            10,
            [member("M1", 11, card(CARD_A, "lost"), tier="platinum", points=50), member("M3", 12, card(CARD_D))],
        )
        result = await store.apply_member_delta(page)
        assert (result.after, result.to, result.head, result.version) == (10, 12, 12, 12)
        assert (result.applied, result.skipped, result.cards) == (2, 0, 2)
        m1 = await store.get_member("M1")
        assert m1 is not None
        assert (m1.tier, m1.points_balance) == ("platinum", 50)
        assert await owner(store, CARD_A) == ("M1", "lost")
        assert await owner(store, CARD_B) is None  # no longer on M1's line: gone
        assert await owner(store, CARD_C) == ("M2", "ok")  # not in the page: untouched
        assert await owner(store, CARD_D) == ("M3", "ok")
        status = await store.status()
        assert (status.member_version, status.members, status.cards) == (12, 3, 3)

    with_store(db, body)
    assert dump(db)["state"] == [(12, 3, 3, 12, 0)]


def test_a_page_delivered_again_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    page = delta(tmp_path / "d.jsonl", 10, [member("M1", 11, card(CARD_A), tier="platinum")])

    async def first(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        assert (await store.apply_member_delta(page)).applied == 1

    with_store(db, first)
    before = dump(db)

    async def again(store: LaneStore) -> tuple[int, int, int]:
        result = await store.apply_member_delta(page)
        return result.applied, result.skipped, result.version

    assert with_store(db, again) == (0, 1, 11)
    assert dump(db) == before


def test_an_older_page_skips_members_the_cache_has_newer_and_never_moves_the_version_back(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        await store.apply_member_delta(delta(tmp_path / "new.jsonl", 10, [member("M1", 13, card(CARD_A), tier="vip")]))
        old = delta(
            tmp_path / "old.jsonl", 10, [member("M1", 11, card(CARD_A), tier="gold"), member("M2", 12, card(CARD_C))]
        )
        result = await store.apply_member_delta(old)
        assert (result.applied, result.skipped, result.version) == (1, 1, 13)
        m1 = await store.get_member("M1")
        assert m1 is not None
        assert m1.tier == "vip"

    with_store(db, body)
    assert dump(db)["state"][0][0] == 13


def test_a_page_starting_above_the_cache_is_a_gap_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: store.import_snapshot(base(tmp_path / "s.jsonl")))
    before = dump(db)
    page = delta(tmp_path / "d.jsonl", 11, [member("M1", 12, card(CARD_A), tier="vip")])

    async def body(store: LaneStore) -> None:
        with pytest.raises(MemberGapError) as raised:
            await store.apply_member_delta(page)
        assert (raised.value.code, raised.value.have, raised.value.start) == ("member_gap", 10, 11)

    with_store(db, body)
    assert dump(db) == before


def test_a_card_moves_to_the_member_whose_line_carries_it(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        # B leaves M1 for M2; M1's own line is not in the page (its change comes later).
        await store.apply_member_delta(delta(tmp_path / "d.jsonl", 10, [member("M2", 11, card(CARD_C), card(CARD_B))]))
        assert await owner(store, CARD_B) == ("M2", "ok")
        assert await owner(store, CARD_A) == ("M1", "ok")
        # Within one page: D is made for M1, then moves to M3 on a later line.
        page = delta(
            tmp_path / "d2.jsonl",
            11,
            [member("M1", 12, card(CARD_A), card(CARD_D)), member("M3", 13, card(CARD_D, kind="vip"))],
        )
        await store.apply_member_delta(page)
        record = await store.lookup_card(store.card_hash(CARD_D))
        assert record is not None
        assert (record.member.member_id, record.card_kind) == ("M3", "vip")
        status = await store.status()
        assert (status.members, status.cards) == (3, 4)

    with_store(db, body)
    assert len(dump(db)["cards"]) == 4


def test_an_empty_page_moves_the_version_to_head(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> int:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        return (await store.apply_member_delta(delta(tmp_path / "d.jsonl", 10, [], head=10))).version

    assert with_store(db, body) == 10


def _lines(page: Path) -> list[bytes]:
    return page.read_bytes().splitlines(keepends=True)


def _resign(lines: list[bytes]) -> bytes:
    """The lines with a correct trailer again (count and checksum)."""
    body = b"".join(lines[:-1])
    trailer = {"kind": "end", "count": len(lines) - 2, "sha256": hashlib.sha256(body).hexdigest()}
    return body + json.dumps(trailer).encode() + b"\n"


def _header(lines: list[bytes], **changes: Any) -> list[bytes]:
    doc = json.loads(lines[0])
    doc.update(changes)
    return [json.dumps(doc).encode() + b"\n", *lines[1:]]


def _line(lines: list[bytes], index: int, **changes: Any) -> list[bytes]:
    doc = json.loads(lines[index])
    doc.update(changes)
    return [*lines[:index], json.dumps(doc).encode() + b"\n", *lines[index + 1 :]]


BAD_PAGES: dict[str, tuple[Callable[[list[bytes]], bytes], str]] = {
    "truncated": (lambda lines: b"".join(lines[:-1]), "truncated"),
    "cut in a line": (lambda lines: b"".join(lines)[:-40], "truncated"),
    "altered": (
        lambda lines: b"".join(lines).replace(b'"points_balance":70', b'"points_balance":71'),
        "checksum_mismatch",
    ),
    "count": (lambda lines: b"".join(lines[:-1]) + lines[-1].replace(b'"count":2', b'"count":3'), "count_mismatch"),
    "field": (lambda lines: _resign(_line(lines, 2, phone="13800000000")), "extra_forbidden"),
    "above to": (lambda lines: _resign(_line(lines, 2, version=99)), "bad_version"),
    "not above from": (lambda lines: _resign(_line(lines, 1, version=10)), "bad_version"),
    "unordered": (lambda lines: _resign([lines[0], lines[2], lines[1], lines[3]]), "unordered"),
    "duplicate member": (lambda lines: _resign(_line(lines, 2, member_id="M1")), "duplicate_member"),
    "card twice on a line": (
        lambda lines: _resign(_line(lines, 1, cards=json.loads(lines[1])["cards"] * 2)),
        "duplicate_card",
    ),
    "to is not the last line": (lambda lines: _resign(_header(lines, to=13, head=13)), "bad_range"),
    "key": (lambda lines: _resign(_header(lines, key_check="0" * 16)), "card_key_mismatch"),
    "header": (lambda lines: _resign(_header(lines, kind="member-snapshot")), "bad_header"),
    "after trailer": (lambda lines: b"".join(lines) + lines[1], "after_trailer"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAGES))
def test_a_bad_page_is_refused_whole_and_changes_nothing(tmp_path: Path, case: str) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: store.import_snapshot(base(tmp_path / "s.jsonl")))
    before = dump(db)
    good = delta(
        tmp_path / "good.jsonl",
        10,
        [member("M1", 11, card(CARD_A), tier="vip", points=70), member("M3", 12, card(CARD_D), points=70)],
    )
    spoil, code = BAD_PAGES[case]
    page = tmp_path / "bad.jsonl"
    page.write_bytes(spoil(_lines(good)))

    async def body(store: LaneStore) -> list[str]:
        with pytest.raises(InputError) as raised:
            await store.apply_member_delta(page)
        return [issue.code for issue in raised.value.issues]

    assert code in with_store(db, body)
    assert dump(db) == before
    # and the good page still applies afterwards
    assert with_store(db, lambda store: store.apply_member_delta(good)).applied == 2


def test_a_page_that_fills_the_disk_is_rolled_back_whole(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: store.import_snapshot(base(tmp_path / "s.jsonl")))
    before = dump(db)
    many = [
        member(f"N{i:06d}", 11 + i, *(card(f"9{i:06d}{k:02d}") for k in range(8)), tier="t" * 60) for i in range(3000)
    ]
    page = delta(tmp_path / "big.jsonl", 10, many)

    async def body(store: LaneStore) -> None:
        size = (await store.status()).db_bytes
        await store.set_size_limit(size + 64 * 1024)
        with pytest.raises(StoreFullError):
            await store.apply_member_delta(page)
        await store.set_size_limit(None)

    with_store(db, body)
    assert dump(db) == before
    assert with_store(db, lambda store: store.apply_member_delta(page)).applied == 3000


# --- the hot list ------------------------------------------------------------------------------


def hot(number: str, member_id: str, state: str, version: int) -> HotCard:
    return HotCard(card_hash(KEY, number), member_id, state, version)  # type: ignore[arg-type]


def test_a_hot_card_newer_than_its_member_is_refused_until_a_delta_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))  # M1 at 9, M2 at 10
        result = await store.apply_hotlist(12, [hot(CARD_A, "M1", "lost", 11), hot(CARD_C, "M2", "cancelled", 12)])
        assert (result.received, result.stored, result.active) == (2, 2, 2)
        assert await owner(store, CARD_A) == ("M1", "lost")
        assert await owner(store, CARD_C) == ("M2", "cancelled")
        assert await owner(store, CARD_B) == ("M1", "ok")
        found = await store.card_for_sale(store.card_hash(CARD_A))
        assert found is not None
        assert found[0].use_on(TODAY) == "lost"
        # A delta below the entry's version does not supersede it.
        await store.apply_member_delta(delta(tmp_path / "d1.jsonl", 9, [member("M1", 10, card(CARD_A), card(CARD_B))]))
        assert await owner(store, CARD_A) == ("M1", "lost")
        # One at or above it does: here head office reinstated the card.
        result2 = await store.apply_member_delta(
            delta(tmp_path / "d2.jsonl", 10, [member("M1", 11, card(CARD_A), card(CARD_B))], head=12)
        )
        assert result2.hot_pruned == 1
        assert await owner(store, CARD_A) == ("M1", "ok")
        assert await owner(store, CARD_C) == ("M2", "cancelled")
        state = await store.member_sync_state()
        assert (state.hot_cards, state.hotlist_version) == (1, 12)

    with_store(db, body)


def test_hot_entries_only_move_forward_and_stale_ones_are_not_kept(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        await store.apply_hotlist(14, [hot(CARD_A, "M1", "replaced", 14)])
        older = await store.apply_hotlist(13, [hot(CARD_A, "M1", "lost", 13)])
        assert older.stored == 0
        assert await owner(store, CARD_A) == ("M1", "replaced")
        # An entry the cache already reflects (M2 is cached at 10) is dropped at once.
        stale = await store.apply_hotlist(15, [hot(CARD_C, "M2", "lost", 10), hot(CARD_A, "M1", "replaced", 14)])
        assert (stale.stored, stale.pruned, stale.active) == (1, 1, 1)
        assert await owner(store, CARD_C) == ("M2", "ok")
        # Hot entries survive a snapshot import; one the snapshot reflects is pruned after it.
        write_snapshot(
            tmp_path / "s2.jsonl",
            [member("M1", 14, card(CARD_A, "replaced"), card(CARD_B)), member("M2", 10, card(CARD_C))],
            version=15,
            card_key=KEY,
        )
        await store.apply_hotlist(16, [hot(CARD_B, "M1", "lost", 16), hot(CARD_A, "M1", "replaced", 14)])
        await store.import_snapshot(tmp_path / "s2.jsonl")
        assert await store.prune_hot_cards() == 1  # A: the snapshot has M1 at 14
        assert await owner(store, CARD_B) == ("M1", "lost")
        assert (await store.member_sync_state()).hot_cards == 1

    with_store(db, body)
    assert [row[2] for row in dump(db)["hot"]] == ["lost"]


# --- the balance the till shows --------------------------------------------------------------


def test_own_earned_points_count_until_acknowledged_and_a_void_takes_them_back(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    lines = (SoldLine("1", 1000, 10000, 80), SoldLine("2", 1000, 2000, 20))

    async def commit(store: LaneStore, sale_id: str, points: int = 0) -> None:
        await store.commit_sale(
            sale_id,
            "d",
            {"sale_id": sale_id},
            {"sale_id": sale_id},
            at=AT,
            rules_version="r",
            member_id="M1",
            points_spent=points,
            lines=lines,
        )

    async def body(store: LaneStore) -> list[tuple[int, int]]:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        seen = []
        await commit(store, "S1", points=30)  # seq 1: earns 100, spends 30
        seen.append((await store.unsynced_earned("M1"), (await store.unsynced_spend("M1"))[0]))
        await commit(store, "S2")  # seq 2
        await store.void_sale("S2", "v", {}, {}, at=AT, rules_version="r")  # seq 3
        seen.append((await store.unsynced_earned("M1"), (await store.unsynced_spend("M1"))[0]))
        await store.mark_acked(2)  # S1, S2 in head office's balance; the void not yet
        seen.append((await store.unsynced_earned("M1"), (await store.unsynced_spend("M1"))[0]))
        await store.mark_acked(3)
        seen.append((await store.unsynced_earned("M1"), (await store.unsynced_spend("M1"))[0]))
        seen.append((await store.unsynced_earned("M2"), 0))
        return seen

    assert with_store(db, body) == [(100, 30), (100, 30), (-100, 0), (0, 0), (0, 0)]


def test_a_version_2_database_counts_the_points_its_unacknowledged_sales_earned(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for migration in migrations.MIGRATIONS[:2]:
        migrations.apply(conn, migration)
    for seq, sale_id, points, void in ((1, "OLD", 40, None), (2, "NEW", 25, None), (3, "GONE", 7, 4)):
        conn.execute("INSERT INTO journal VALUES (?, ?, 'sale', ?, 'r', 0, '{}')", (seq, f"id{seq}", AT.isoformat()))
        if void is not None:
            conn.execute(
                "INSERT INTO journal VALUES (?, ?, 'void', ?, 'r', 0, '{}')", (void, f"id{void}", AT.isoformat())
            )
        conn.execute("INSERT INTO sales VALUES (?, ?, 'd', '{}', 'M1', 0, 0, ?, NULL, NULL)", (sale_id, seq, void))
        conn.execute("INSERT INTO sale_lines VALUES (?, '1', 0, 1000, 100, ?)", (sale_id, points))
    conn.execute("UPDATE lane_state SET acked_seq = 1")
    conn.close()

    async def body(store: LaneStore) -> int:
        return await store.unsynced_earned("M1")

    assert with_store(db, body) == 25  # NEW; OLD is acknowledged; GONE's sale and void cancel out
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.latest()
    assert conn.execute("SELECT seq, points FROM own_earned ORDER BY seq").fetchall() == [(2, 25), (3, 7), (4, -7)]
    conn.close()


def test_member_sync_state_is_kept_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def first(store: LaneStore) -> None:
        await store.note_member_sync(head=42, error={"code": "timeout", "message": "no answer", "at": "x"})

    with_store(db, first)

    async def second(store: LaneStore) -> tuple[int, int, Any, str | None]:
        state = await store.member_sync_state()
        return state.version, state.head_version, state.error, state.synced_at

    assert with_store(db, second) == (0, 42, {"code": "timeout", "message": "no answer", "at": "x"}, None)

    async def third(store: LaneStore) -> tuple[Any, bool]:
        await store.note_member_sync(head=43)
        state = await store.member_sync_state()
        return state.error, state.synced_at is not None

    assert with_store(db, third) == (None, True)


# --- notices ----------------------------------------------------------------------------------


def _metrics_value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def sync_config(db: Path, broker_port: int = 1883, **sync: Any) -> LaneConfig:
    settings: dict[str, Any] = {
        "enabled": True,
        "port": broker_port,
        "hq_url": "http://127.0.0.1:9",
        "hq_token": "t" * 32,
        "reconnect_min_seconds": 0.05,
        "reconnect_max_seconds": 0.2,
        **sync,
    }
    text = f"""
[lane]
store = "{STORE}"
lane = "{LANE}"

[api]
token = "{"a" * 32}"

[store]
path = "{db}"
card_hash_key = "hex:{KEY.hex()}"

[sync]
""" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return parse_config(text, environ={})


def hotlist(version: int, *cards: dict[str, Any], **changes: Any) -> bytes:
    doc = {"v": 1, "kind": "hotlist", "version": version, "at": "2026-12-10T06:00:00+00:00", "cards": list(cards)}
    doc.update(changes)
    return json.dumps(doc).encode()


def hot_doc(number: str, member_id: str = "M1", state: str = "lost", version: int = 11) -> dict[str, Any]:
    return {"card_hash": card_hash(KEY, number).hex(), "member_id": member_id, "state": state, "version": version}


MEMBERS_OK = {"v": 1, "kind": "members", "version": 15, "at": "2026-12-10T06:00:00+00:00", "snapshot_version": 10}
BAD_NOTICES: list[tuple[str, bytes, str]] = [
    ("members", b"not json", "bad_json"),
    ("members", b"[1, 2]", "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "v": 2}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "kind": "hotlist"}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "version": "15"}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "version": -1}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "snapshot_version": 16}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "at": "yesterday"}).encode(), "bad_envelope"),
    ("members", json.dumps({**MEMBERS_OK, "extra": 1}).encode(), "bad_envelope"),
    ("members", b" " * (8 * 1024 * 1024 + 1), "too_large"),
    ("hotlist", b"{", "bad_json"),
    ("hotlist", hotlist(20, hot_doc(CARD_A, state="active")), "bad_envelope"),
    ("hotlist", hotlist(20, hot_doc(CARD_A, version=21)), "bad_envelope"),
    ("hotlist", hotlist(20, hot_doc(CARD_A), hot_doc(CARD_A)), "bad_envelope"),
    ("hotlist", hotlist(20, {**hot_doc(CARD_A), "card_hash": "AB" * 32}), "bad_envelope"),
    ("hotlist", hotlist(20, {**hot_doc(CARD_A), "number": CARD_A}), "bad_envelope"),
    ("hotlist", hotlist(20, hot_doc(CARD_A), kind="members"), "bad_envelope"),
    ("hotlist", hotlist(20, hot_doc(CARD_A), cards=None), "bad_envelope"),
]


def test_malformed_or_forged_notices_are_counted_and_change_nothing(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    with_store(db, lambda store: store.import_snapshot(base(tmp_path / "s.jsonl")))
    before = dump(db)

    async def body(store: LaneStore) -> None:
        metrics = Metrics()
        sync = MemberSync(sync_config(db), store, metrics)
        for topic, payload, code in BAD_NOTICES:
            handler = sync.on_members if topic == "members" else sync.on_hotlist
            await handler(payload)  # never raises
            value = _metrics_value(metrics, "lane_member_notices_rejected_total", topic=topic, code=code)
            assert value >= 1, (topic, payload[:80], code)
        assert sum(
            _metrics_value(metrics, "lane_member_notices_rejected_total", topic=t, code=c)
            for t in ("members", "hotlist")
            for c in ("bad_json", "bad_envelope", "too_large")
        ) == len(BAD_NOTICES)
        assert sync.status()["head_version"] is None
        assert await owner(store, CARD_A) == ("M1", "ok")

    with_store(db, body)
    assert dump(db) == before


def test_a_hot_list_notice_is_kept_at_once_and_a_members_notice_wakes_the_fetch(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.import_snapshot(base(tmp_path / "s.jsonl"))
        metrics = Metrics()
        sync = MemberSync(sync_config(db), store, metrics)
        payload = hotlist(12, hot_doc(CARD_A, state="lost", version=11), hot_doc(CARD_C, "M2", "replaced", 12))
        await sync.on_hotlist(payload)
        assert await owner(store, CARD_A) == ("M1", "lost")
        assert await owner(store, CARD_C) == ("M2", "replaced")
        assert _metrics_value(metrics, "lane_member_hot_cards") == 2
        await sync.on_hotlist(payload)  # republished unchanged: nothing to do
        assert (sync.status()["hotlist_version"], sync.status()["hot_cards"]) == (12, 2)
        assert not sync._wake.is_set()
        await sync.on_members(json.dumps(MEMBERS_OK).encode())
        assert sync._wake.is_set()
        assert sync.status()["head_version"] == 15

    with_store(db, body)


# --- the uplink holds acks back for the member cache (real Mosquitto) ------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


async def eventually(what: str, condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def test_an_ack_waits_for_the_member_table_to_reach_its_version(tmp_path: Path, broker: Broker) -> None:
    db = tmp_path / "lane.db"
    ack_topic = wire.lane_topic("retail", STORE, LANE, "ack")
    reached = [10]

    async def acked(store: LaneStore) -> int:
        return (await store.status()).acked_seq

    async def body(store: LaneStore) -> None:
        for sale_id in ("S1", "S2", "S3", "S4"):
            await store.commit_sale(sale_id, "d", {"sale_id": sale_id}, {}, at=AT, rules_version="r")
        epoch = (await store.status()).journal_epoch
        metrics = Metrics()
        uplink = Uplink(sync_config(db, broker.port), store, metrics, member_version=lambda: reached[0])
        task = asyncio.create_task(uplink.run())
        try:
            async with aiomqtt.Client(broker.host, broker.port) as hq:
                await eventually("the uplink to connect", lambda: uplink.connected)

                async def ack(seq: int, member_version: int | None) -> None:
                    payload = wire.encode_ack(STORE, LANE, epoch, seq, member_version)
                    await hq.publish(ack_topic, payload, qos=1, retain=True)

                await ack(2, 50)  # head office applied S1, S2 at member version 50; the cache is at 10
                await eventually(
                    "the send window to move", lambda: _metrics_value(metrics, "lane_sync_acks_total") == 1
                )
                assert await acked(store) == 0  # their spends still count as this lane's own
                await ack(3, 55)  # the newer one replaces it
                await eventually("the second ack", lambda: _metrics_value(metrics, "lane_sync_acks_total") == 2)
                await uplink.members_reached(54)
                assert await acked(store) == 0
                reached[0] = 55
                await uplink.members_reached(55)
                assert await acked(store) == 3
                await ack(4, 40)  # a version the cache has: recorded at once

                async def four() -> bool:
                    return await acked(store) == 4

                await eventually("seq 4 recorded", four, within=5)
                await ack(9, 60)  # beyond the journal: refused even while held back
                await eventually(
                    "the refusal",
                    lambda: _metrics_value(metrics, "lane_sync_acks_rejected_total", reason="beyond_last") == 1,
                )
                reached[0] = 60
                await uplink.members_reached(60)
                assert await acked(store) == 4
        finally:
            uplink.stop()
            await asyncio.wait_for(task, 10)

    with_store(db, body)


def test_without_the_member_sync_acks_are_recorded_at_once(tmp_path: Path, broker: Broker) -> None:
    db = tmp_path / "lane.db"

    async def body(store: LaneStore) -> None:
        await store.commit_sale("S1", "d", {"sale_id": "S1"}, {}, at=AT, rules_version="r")
        epoch = (await store.status()).journal_epoch
        uplink = Uplink(sync_config(db, broker.port), store, Metrics())
        task = asyncio.create_task(uplink.run())
        try:
            async with aiomqtt.Client(broker.host, broker.port) as hq:
                await eventually("the uplink to connect", lambda: uplink.connected)
                payload = wire.encode_ack(STORE, LANE, epoch, 1, 99)
                await hq.publish(wire.lane_topic("retail", STORE, LANE, "ack"), payload, qos=1, retain=True)

                async def recorded() -> bool:
                    return (await store.status()).acked_seq == 1

                await eventually("the ack recorded", recorded)
        finally:
            uplink.stop()
            await asyncio.wait_for(task, 10)

    with_store(db, body)


# --- end to end: a real broker, a real lane-hq, real lane agents -----------------------------------

SECRET = "lanes-secret-for-the-member-sync-tests"


def hq_cli(hq: Hq, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args, "--config", str(hq.config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **hq.env},
    )
    assert result.returncode == 0, f"lane-hq {' '.join(args)}: {result.returncode} {result.stderr}"
    return result.stdout


class Chain:
    """A broker, a head office seeded with the lane harness's members, and lanes syncing with it."""

    def __init__(self, directory: Path, broker: Broker, *, members: bool = True) -> None:
        self.directory = directory
        self.broker = broker
        self.hq = Hq(
            directory / "hq",
            broker_port=broker.port,
            db_url=f"sqlite:///{directory / 'hq' / 'hq.db'}",
            audit=False,
            env={"MEMBER_SYNC_TEST_SECRET": SECRET},
        )
        key = f'card_hash_key = "hex:{KEY.hex()}"\n' if members else ""
        with self.hq.config.open("a", encoding="utf-8") as handle:
            handle.write(
                f"\n[members]\n{key}notify_interval_seconds = 0.2\n"
                'snapshot_every_changes = 1\n\n[lanes]\nauth_secret_env = "MEMBER_SYNC_TEST_SECRET"\n'
            )
        if members:
            seed = directory / "seed.jsonl"
            write_snapshot(seed, harness_members(dt.datetime.now(SHANGHAI).date()), version=1, card_key=KEY)
            hq_cli(self.hq, "members", "import", str(seed))
        self.hq.start()
        self.lanes: list[Lane] = []

    def lane(self, name: str = "lane", *, hq_url: str | None = None, **sync: Any) -> Lane:
        settings: dict[str, Any] = {
            "enabled": True,
            "port": self.broker.port,
            "hq_url": hq_url or self.hq.url,
            "hq_token": lane_token(SECRET.encode(), STORE, LANE),
            "member_poll_seconds": 1.0,
            "state_interval_seconds": 1.0,
            "resend_after_seconds": 1.0,
            "reconnect_min_seconds": 0.1,
            "reconnect_max_seconds": 0.5,
            "http_timeout_seconds": 5.0,
            **sync,
        }
        extra = "\n[sync]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items()) + "\n"
        lane = Lane(self.directory / name, extra_config=extra)
        self.lanes.append(lane)
        return lane

    def head(self) -> int:
        token = lane_token(SECRET.encode(), STORE, LANE)
        answer = httpx.get(
            f"{self.hq.url}/v1/sync/{STORE}/{LANE}/hello", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        return int(answer.json()["member_version"])

    def close(self) -> None:
        for lane in self.lanes:
            lane.kill()
        self.hq.kill()


@pytest.fixture
def chain(tmp_path: Path, broker: Broker) -> Iterator[Chain]:
    running = Chain(tmp_path, broker)
    try:
        yield running
    finally:
        running.close()


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def status(lane: Lane) -> dict[str, Any]:
    with lane.client() as http:
        doc: dict[str, Any] = http.get("/v1/status").json()
        return doc


def identify(lane: Lane, code: str, kind: str = "card") -> dict[str, Any]:
    with lane.client() as http:
        answer = http.post("/v1/identify", json={"code": code, "kind": kind})
        assert answer.status_code == 200, answer.text
        doc: dict[str, Any] = answer.json()
        return doc


def in_step(chain: Chain, lane: Lane) -> bool:
    members = status(lane)["members"]
    return bool(members["version"] == chain.head() and members["behind"] == 0 and members["last_error"] is None)


def lane_metric(lane: Lane, name: str, **labels: str) -> float:
    """One sample of the lane's /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in httpx.get(f"{lane.url}/metrics", timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == wanted:
            return float(value)
    return 0.0


def test_a_member_changed_at_head_office_reaches_the_lane(chain: Chain) -> None:
    lane = chain.lane()
    lane.start()
    wait_for("the first sync", lambda: in_step(chain, lane))
    first = status(lane)
    assert first["versions"]["member_table"] == first["member_table"]["version"] == chain.head()
    assert first["members"]["enabled"] is True
    assert lane_metric(lane, "lane_member_snapshots_total") == 1  # an empty cache starts from a snapshot
    before = identify(lane, GOLD_CARD)["member"]
    assert (before["tier"], before["points_balance"]) == ("gold", 12000)

    hq_cli(chain.hq, "members", "set-tier", "M000123", "platinum")
    hq_cli(chain.hq, "members", "adjust", "M000123", "--points", "500", "--rebate", "-5.00", "--reason", "test")
    after = wait_for(
        "the change at the lane",
        lambda: (m := identify(lane, GOLD_CARD)["member"])["tier"] == "platinum" and m["points_balance"] == 12500 and m,
        timeout=15,
    )
    assert (after["rebate_balance"], after["points_available"]) == ("30.20", 12500)
    wait_for("the lane in step", lambda: in_step(chain, lane))
    assert lane_metric(lane, "lane_member_deltas_applied_total") >= 1
    assert lane_metric(lane, "lane_member_snapshots_total") == 1
    assert lane_metric(lane, "lane_member_table_version") == chain.head()


def test_a_lane_stopped_while_members_changed_catches_up_by_deltas(chain: Chain) -> None:
    lane = chain.lane()
    lane.start()
    wait_for("the first sync", lambda: in_step(chain, lane))
    assert lane.stop() == 0
    hq_cli(chain.hq, "members", "set-tier", "M000124", "gold")
    hq_cli(chain.hq, "members", "adjust", "M000124", "--points", "250", "--reason", "goodwill")
    hq_cli(chain.hq, "cards", "block", VIP_CARD)
    hq_cli(chain.hq, "cards", "restore", LOST_CARD)
    lane.start()
    wait_for("the catch-up", lambda: in_step(chain, lane))
    assert lane_metric(lane, "lane_member_snapshots_total") == 0
    assert lane_metric(lane, "lane_member_deltas_applied_total") >= 1
    assert identify(lane, VIP_CARD)["reason"] == "cancelled"
    assert identify(lane, LOST_CARD)["member"]["member_id"] == "M000123"  # restored at head office
    member = identify(lane, "M000124", "member_id")["member"]
    assert (member["tier"], member["points_balance"]) == ("gold", 750)


def test_a_lane_far_behind_takes_a_snapshot(chain: Chain) -> None:
    lane = chain.lane(snapshot_after_changes=3)
    lane.start()
    wait_for("the first sync", lambda: in_step(chain, lane))
    assert lane.stop() == 0
    for points in (10, 20, 30, 40):
        hq_cli(chain.hq, "members", "adjust", "M000125", "--points", str(points), "--reason", "far behind")
    lane.start()
    wait_for("the catch-up", lambda: in_step(chain, lane))
    assert lane_metric(lane, "lane_member_snapshots_total") == 1
    assert identify(lane, "M000125", "member_id")["member"]["points_balance"] == 100
    assert status(lane)["member_table"]["members"] == 3
    assert not Path(f"{lane.db}.snapshot.part").exists()


def test_a_lost_card_is_refused_within_seconds_online_and_at_once_after_a_reconnect(chain: Chain) -> None:
    # Hourly polls: only the broker's notices and hot list can tell this lane anything in the test's time.
    lane = chain.lane(member_poll_seconds=3600.0)
    lane.start()
    wait_for("the first sync", lambda: in_step(chain, lane))
    assert identify(lane, GOLD_CARD)["result"] == "identified"
    hq_cli(chain.hq, "cards", "lost", GOLD_CARD)
    reported = time.monotonic()
    wait_for("the lost card refused", lambda: identify(lane, GOLD_CARD).get("reason") == "lost", timeout=5)
    online = time.monotonic() - reported
    assert online < 5.0

    chain.broker.stop()
    wait_for("the lane offline", lambda: not status(lane)["sync"]["connected"])
    hq_cli(chain.hq, "cards", "lost", VIP_CARD)
    time.sleep(1.5)  # head office notices its change within 0.2 s; no broker carries it
    assert identify(lane, VIP_CARD)["result"] == "identified"
    chain.broker.start()
    restarted = time.monotonic()
    wait_for("the lane back online", lambda: status(lane)["sync"]["connected"], timeout=10)
    reconnected = time.monotonic()
    wait_for("the card refused after the reconnect", lambda: identify(lane, VIP_CARD).get("reason") == "lost")
    refused = time.monotonic()
    print(
        f"online: refused {online:.2f} s after the report; offline: {refused - reconnected:.2f} s after the reconnect"
    )
    assert refused - restarted < 5.0
    assert identify(lane, "M000124", "member_id")["result"] == "identified"  # the member, not the card


class CuttingProxy:
    """TCP between the lane and head office's API; cuts the first snapshot answer after ``cut`` bytes.

    The network is the boundary faked here: head office and the lane are the real programs.
    """

    def __init__(self, target_port: int, cut: int) -> None:
        self.target_port = target_port
        self.cut = cut
        self.requests: list[bytes] = []
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"cutting": False, "sent": 0}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, state), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if data.startswith(b"GET "):
                    with self._lock:
                        self.requests.append(data)
                        if b"/members/snapshot" in data.split(b"\r\n", 1)[0] and self.cuts == 0:
                            state["cutting"], state["sent"] = True, 0
                upstream.sendall(data)
        _shut(client, upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["cutting"]:
                    room = self.cut - state["sent"]
                    client.sendall(data[:room])
                    state["sent"] += min(room, len(data))
                    if state["sent"] >= self.cut:
                        with self._lock:
                            self.cuts += 1
                        break
                else:
                    client.sendall(data)
        _shut(client, upstream)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def test_a_snapshot_download_cut_midway_resumes_where_it_stopped(chain: Chain) -> None:
    proxy = CuttingProxy(chain.hq.port, cut=700)  # the headers and part of the body
    try:
        lane = chain.lane(hq_url=f"http://127.0.0.1:{proxy.port}")
        lane.start()
        wait_for("the first sync", lambda: in_step(chain, lane))
        with proxy._lock:
            snapshots = [r for r in proxy.requests if b"/members/snapshot" in r.split(b"\r\n", 1)[0]]
        assert proxy.cuts == 1
        assert len(snapshots) == 2, snapshots
        assert b"range:" not in snapshots[0].lower()
        resumed = re.search(rb"\r\nrange: bytes=(\d+)-\r\n", snapshots[1].lower())
        assert resumed is not None, snapshots[1]
        assert 0 < int(resumed.group(1)) < 700
        assert b'\r\nif-range: "members-' in snapshots[1].lower()
        assert lane_metric(lane, "lane_member_fetch_errors_total", code="interrupted") == 1
        assert lane_metric(lane, "lane_member_snapshots_total") == 1
        # The resumed file imported whole: every member and card as head office has them.
        doc = status(lane)["member_table"]
        assert (doc["members"], doc["cards"]) == (3, 7)
        gold = identify(lane, GOLD_CARD)["member"]
        assert (gold["member_id"], gold["tier"], gold["points_balance"], gold["rebate_balance"]) == (
            "M000123",
            "gold",
            12000,
            "35.20",
        )
        assert identify(lane, LOST_CARD)["reason"] == "lost"
        assert identify(lane, VIP_CARD)["member"]["member_id"] == "M000124"
        assert not Path(f"{lane.db}.snapshot.part").exists()
    finally:
        proxy.close()


def test_the_balance_shown_after_a_sale_is_the_same_before_and_after_head_offices_ack(chain: Chain) -> None:
    lane = chain.lane()
    lane.start()
    wait_for("the first sync", lambda: in_step(chain, lane))
    before = identify(lane, GOLD_CARD)["member"]
    assert (before["points_balance"], before["rebate_balance"]) == (12000, "35.20")
    with lane.client() as http:
        net = int(http.post("/v1/price", json=basket(member_id="M000123")).json()["totals"]["net"].replace(".", ""))
        doc = basket(member_id="M000123", sale_id="balance-1")
        doc["tenders"] = [
            {"kind": "rebate", "amount": "30.00"},
            {"kind": "cash", "amount": f"{(net - 3000) / 100:.2f}"},
        ]
        sold = http.post("/v1/sales", json=doc)
        assert sold.status_code == 200, sold.text
        earned = sold.json()["totals"]["points"]
    assert earned > 0
    shown = (12000 + earned, "5.20")
    seen: set[tuple[int, str]] = set()
    samples = 0

    def settled() -> bool:
        nonlocal samples
        member = identify(lane, GOLD_CARD)["member"]
        seen.add((member["points_balance"], member["rebate_balance"]))
        samples += 1
        journal = status(lane)["journal"]
        return bool(journal["acked_seq"] == journal["last_seq"] == 1 and in_step(chain, lane))

    wait_for("head office's ack and the member update", settled)
    assert seen == {shown}, f"{samples} samples"
    # The ack came before the member table had the sale: it was held back, not recorded (the window above).
    assert "held until the member table reaches version" in lane.log()
    after = identify(lane, GOLD_CARD)["member"]
    # Now in the cache itself: spendable too (it was not while only this lane counted it).
    assert (after["points_balance"], after["points_available"], after["rebate_available"]) == (
        12000 + earned,
        12000 + earned,
        "5.20",
    )


def test_a_head_office_serving_no_member_table_does_not_hold_the_acks_back(chain: Chain) -> None:
    # Head office has members (version 3) but, restarted without its card key, serves none of them.
    chain.hq.stop()
    config = chain.hq.config.read_text(encoding="utf-8")
    chain.hq.config.write_text(re.sub(r"card_hash_key = .*\n", "", config), encoding="utf-8")
    chain.hq.start()
    lane = chain.lane()
    lane.import_members()  # from a file: version 7, "ahead" of head office's 3
    lane.start()
    with lane.client() as http:
        net = http.post("/v1/price", json=basket(member_id="M000123")).json()["totals"]["net"]
        cash = [{"kind": "cash", "amount": net}]
        sold = http.post("/v1/sales", json=basket(member_id="M000123", sale_id="plain-1", tenders=cash))
        assert sold.status_code == 200, sold.text

    def drained() -> bool:
        journal = status(lane)["journal"]
        return bool(journal["acked_seq"] == journal["last_seq"] == 1)

    wait_for("head office's ack recorded", drained)
    members = status(lane)["members"]
    assert (members["version"], members["head_version"]) == (7, chain.head())
    assert members["last_error"]["code"] == "http_503"
    assert "serves no member table" in lane.log()
