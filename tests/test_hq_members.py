"""Head office's member table (sync/hq/members.py, lane_api.py, downlink.py; docs/downlink.md).

The database tests run on a real SQLite file and a real PostgreSQL database
(tests/pgdb.py); the HTTP and MQTT tests against a real ``lane-hq run``
(tests/hq_harness.py) and a private Mosquitto (tests/broker.py), with the
``lane-hq members`` / ``cards`` commands run as separate processes.  Files and
delta pages are checked with the readers lanes use (``agent.snapshot``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from broker import Broker
from conftest import REPO_ROOT
from hq_harness import Hq, HqReader
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from test_hq_db import LANE, MEMBER, STORE, TOPIC, batch_of, raw, return_body, sale_body, void_body

from agent.errors import InputError
from agent.snapshot import SnapshotCard, SnapshotMember, SnapshotReader, card_hash, read_delta, write_snapshot
from sync import wire
from sync.hq import members as mt
from sync.hq import schema
from sync.hq.db import HqDatabase
from sync.hq.facts import extract, ledger_moves
from sync.hq.members import AheadOfHeadError, MemberError
from sync.lane_auth import lane_token

KEY = bytes(range(32))  # the card key of docs/member-snapshot.md's example
SECRET = "lanes-secret-for-the-tests"
ROOT = "retail"


def number(i: int) -> str:
    return f"6200 1234 {i:08d}"


def hashed(i: int) -> str:
    return card_hash(KEY, number(i)).hex()


def seed_file(path: Path, count: int, *, points: int = 1000, first: int = 1) -> Path:
    """A member-snapshot file of members M0001… with one active card each (card i for member i)."""
    lines = [
        SnapshotMember(
            member_id=f"M{i:04d}",
            tier="gold",
            points_balance=points,
            rebate_balance="300.00",
            version=1,
            cards=(SnapshotCard(card_hash=hashed(i), kind="standard", state="active", valid_from=dt.date(2025, 1, 1)),),
        )
        for i in range(first, first + count)
    ]
    write_snapshot(path, lines, version=1, card_key=KEY)
    return path


def seed(db: HqDatabase, directory: Path, count: int, **kw: Any) -> mt.ImportResult:
    return db.members.import_members(seed_file(directory / f"seed-{uuid.uuid4().hex[:6]}.jsonl", count, **kw), KEY)


# --- helpers (the database fixtures are in conftest.py) ----------------------------


def rows(db: HqDatabase, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db._engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def member_row(db: HqDatabase, member_id: str) -> tuple[int, int, int]:
    [(points, rebate, version)] = rows(
        db, "SELECT points_balance, rebate_fen, version FROM members WHERE member_id = :m", m=member_id
    )
    return int(points), int(rebate), int(version)


def current_lines(db: HqDatabase) -> dict[str, dict[str, Any]]:
    """Every member's line at its last change, straight from the tables."""
    found = rows(db, "SELECT c.line FROM members m JOIN member_changes c ON c.version = m.version")
    return {doc["member_id"]: doc for doc in (json.loads(line) for (line,) in found)}


# --- the schema -------------------------------------------------------------------------


def test_migration_2_creates_the_member_tables_with_the_counter_at_zero(db: HqDatabase) -> None:
    assert db.members.head_version() == 0
    assert rows(db, "SELECT name, value FROM hq_counters") == [("member_version", 0)]
    assert (2, "member table, cards, change log, counters") in rows(
        db, "SELECT version, description FROM hq_schema_version"
    )
    for table in ("members", "member_cards", "member_changes"):
        assert rows(db, f"SELECT count(*) FROM {table}") == [(0,)]
    now = dt.datetime.now(dt.UTC)
    member = {"member_id": "M1", "tier": "gold", "points_balance": 0, "rebate_fen": 0, "version": 1, "updated_at": now}
    card = {"member_id": "M1", "kind": "standard", "valid_from": dt.date(2025, 1, 1), "version": 1, "changed_at": now}
    with db._writer.begin() as conn:
        conn.execute(schema.members.insert().values(member))
    for values in ({"card_hash": "a" * 64, "state": "stolen"}, {"card_hash": "a" * 63, "state": "lost"}):
        with db._writer.begin() as conn, pytest.raises(IntegrityError):
            conn.execute(schema.member_cards.insert().values({**card, **values}))


# --- versions -------------------------------------------------------------------------------


def test_versions_are_gapless_and_commit_in_order_under_concurrent_writers(db_url: str, tmp_path: Path) -> None:
    setup = HqDatabase.open(db_url)
    try:
        seed(setup, tmp_path, 20)
    finally:
        setup.close()
    writers = [HqDatabase.open(db_url) for _ in range(2)]
    watcher = HqDatabase.open(db_url)
    errors: list[BaseException] = []
    adjusted = [0, 0]
    refused = [0, 0]
    stop = threading.Event()
    seen: list[tuple[int, int, int]] = []
    start = threading.Barrier(3)

    def write(index: int) -> None:
        rng = random.Random(index)
        try:
            start.wait(10)
            for step in range(80):
                member = f"M{rng.randint(1, 20):04d}"
                if step % 9 == 4:
                    # Refused after its version was taken (the line does not validate): rolled back whole,
                    # so the number is not lost -- a sequence would leave a gap here.
                    with pytest.raises(InputError):
                        writers[index].members.set_tier(member, "x" * 65, None, None, "too long a tier")
                    refused[index] += 1
                else:
                    writers[index].members.adjust(member, 1, 0, f"writer {index} step {step}")
                    adjusted[index] += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    def watch() -> None:
        # Every consistent read must see a prefix: versions 1..head, nothing above, nothing missing.
        start.wait(10)
        while not stop.is_set():
            with watcher.members._read() as conn:
                head = mt.head_version(conn)
                count, top = conn.execute(text("SELECT count(*), coalesce(max(version), 0) FROM member_changes")).one()
            seen.append((head, int(count), int(top)))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    observer = threading.Thread(target=watch)
    for thread in [*threads, observer]:
        thread.start()
    for thread in threads:
        thread.join(60)
    stop.set()
    observer.join(10)
    try:
        assert not errors, errors
        assert refused == [9, 9]
        db = writers[0]
        head = db.members.head_version()
        assert head == 20 + sum(adjusted) == 20 + 2 * 71
        assert [v for (v,) in rows(db, "SELECT version FROM member_changes ORDER BY version")] == list(
            range(1, head + 1)
        )
        assert len(seen) > 10
        assert all(h == c == t for h, c, t in seen), [s for s in seen if not s[0] == s[1] == s[2]][:5]
        # Each member's version is its last change, and its balance counts every adjustment.
        last = dict(rows(db, "SELECT member_id, max(version) FROM member_changes GROUP BY member_id"))
        balances = dict(rows(db, "SELECT member_id, points_balance FROM members"))
        assert dict(rows(db, "SELECT member_id, version FROM members")) == last
        assert sum(int(p) - 1000 for p in balances.values()) == sum(adjusted)
    finally:
        for each in [*writers, watcher]:
            each.close()


# --- deltas ---------------------------------------------------------------------------------


def test_delta_pages_are_compacted_and_complete(db: HqDatabase, tmp_path: Path) -> None:
    seed(db, tmp_path, 10)
    assert db.members.head_version() == 10
    db.members.adjust("M0003", 5, 0, "first")  # 11
    db.members.adjust("M0005", 7, 0, "once")  # 12
    db.members.adjust("M0003", 5, 0, "second")  # 13
    page = db.members.delta_page(10, 100)
    assert (page.after, page.to, page.head) == (10, 13, 13)
    docs = [json.loads(line) for line in page.lines]
    # M0003 changed twice appears once, in its last state, ordered by version.
    assert [(d["member_id"], d["version"], d["points_balance"]) for d in docs] == [
        ("M0005", 12, 1007),
        ("M0003", 13, 1010),
    ]
    assert db.members.delta_page(13, 100).lines == []
    assert db.members.delta_page(13, 100).to == 13
    with pytest.raises(AheadOfHeadError) as caught:
        db.members.delta_page(14, 10)
    assert (caught.value.after, caught.value.head) == (14, 13)

    # A lane paging from 0 while members change between its pages ends with head office's state.
    cache: dict[str, dict[str, Any]] = {}
    after, pages = 0, 0
    while True:
        page = db.members.delta_page(after, 3)
        for doc in map(json.loads, page.lines):
            assert after < doc["version"] <= page.to
            if doc["version"] > cache.get(doc["member_id"], {}).get("version", 0):
                cache[doc["member_id"]] = doc
        pages += 1
        if pages == 2:
            db.members.adjust("M0001", 1, 0, "between pages")  # already sent: comes again, newer
            db.members.set_tier("M0009", "vip", None, None, "not sent yet")
        after = page.to
        if page.to == page.head:
            break
    assert pages >= 4
    assert cache == current_lines(db)
    assert cache["M0001"]["points_balance"] == 1001
    assert cache["M0009"]["tier"] == "vip"


def test_a_delta_page_is_verified_whole_by_the_lanes_reader(db: HqDatabase, tmp_path: Path) -> None:
    seed(db, tmp_path, 6)
    db.members.set_card_state(hashed(2), "lost", "reported at the desk")
    page = db.members.delta_page(3, 100)
    body = mt.encode_delta(page, KEY, dt.datetime.now(dt.UTC))
    path = tmp_path / "delta.ndjson"
    path.write_bytes(body)
    delta = read_delta(path, KEY)
    assert (delta.header.from_, delta.header.to, delta.header.head) == (3, 7, 7)
    assert [row[0] for row in delta.members] == ["M0004", "M0005", "M0006", "M0002"]
    assert {(card[1], card[3]) for card in delta.cards if card[1] == "M0002"} == {("M0002", "lost")}
    trailer = json.loads(body.splitlines()[-1])
    assert trailer["count"] == 4
    # Altered or cut short, the page is refused whole.
    path.write_bytes(body.replace(b'"points_balance":1000', b'"points_balance":9000', 1))
    with pytest.raises(InputError) as altered:
        read_delta(path, KEY)
    assert "checksum_mismatch" in {issue.code for issue in altered.value.issues}
    path.write_bytes(b"\n".join(body.splitlines()[:-1]) + b"\n")
    with pytest.raises(InputError) as cut:
        read_delta(path, KEY)
    assert "truncated" in {issue.code for issue in cut.value.issues}
    path.write_bytes(body)
    with pytest.raises(InputError) as other_key:
        read_delta(path, bytes(range(1, 33)))
    assert other_key.value.issues[0].code == "card_key_mismatch"


# --- balances moved by ingest -------------------------------------------------------------------


def test_a_batch_moves_a_known_members_balances_and_version_in_its_own_transaction(
    db: HqDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(db, tmp_path, 3, points=5000)  # M0001 is MEMBER of the sale bodies
    head = db.members.head_version()
    entries = [
        raw(1, "sale", sale_body("S1", variant=1)),
        raw(2, "sale", sale_body("S2", variant=2, rebate_fen=1234)),
        raw(3, "sale", sale_body("S3", member=None, variant=3)),
        raw(4, "sale", sale_body("S4", member={**MEMBER, "member_id": "M9999"}, variant=4)),
    ]
    batch = batch_of(entries)
    moved = [move for entry in batch.entries for move in ledger_moves(extract(entry))]
    earned = sum(m.points for m in moved if m.member_id == "M0001")

    # The same transaction: when the member update fails, nothing of the batch is there either.
    def broken(*_args: Any) -> range:
        raise RuntimeError("counter unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(mt, "take_versions", broken)
        with pytest.raises(RuntimeError, match="counter unavailable"):
            db.apply_batch(batch, TOPIC)
    assert rows(db, "SELECT count(*) FROM journal_entries") == [(0,)]
    assert rows(db, "SELECT count(*) FROM points_ledger") == [(0,)]
    assert member_row(db, "M0001") == (5000, 30000, 1)

    applied = db.apply_batch(batch, TOPIC)
    assert (applied.applied, applied.member_version, applied.unknown_members) == (4, head + 1, 1)
    assert member_row(db, "M0001") == (5000 + earned, 30000 - 1234, head + 1)
    assert db.member_balance("M0001") == (earned, -1234)  # the ledger agrees
    [(reason, line)] = rows(db, "SELECT reason, line FROM member_changes WHERE version = :v", v=head + 1)
    assert reason == f"journal {STORE}/{LANE}: earn+rebate_spend"
    assert json.loads(line)["points_balance"] == 5000 + earned
    assert json.loads(line)["rebate_balance"] == "287.66"
    assert rows(db, "SELECT count(*) FROM members WHERE member_id = 'M9999'") == [(0,)]

    # Sent again: duplicates move nothing, and the ack still says where head office is.
    again = db.apply_batch(batch, TOPIC)
    assert (again.applied, again.member_version) == (0, head + 1)
    assert member_row(db, "M0001") == (5000 + earned, 30000 - 1234, head + 1)

    # A return takes back points, a void undoes the sale: one version each.
    sale_2 = entries[1]
    points_2 = json.loads(sale_2.body)["result"]["totals"]["points"]
    back = [raw(5, "return", return_body(entries[0], "R1", [("1", "100.00", 40)])), raw(6, "void", void_body(sale_2))]
    later = db.apply_batch(batch_of(back), TOPIC)
    assert later.member_version == head + 2  # one batch, one member: one version
    assert member_row(db, "M0001") == (5000 + earned - 40 - points_2, 30000, head + 2)


def test_balances_below_zero_stay_exact_and_go_to_lanes_clamped(db: HqDatabase, tmp_path: Path) -> None:
    seed(db, tmp_path, 1, points=10)
    body = sale_body("S1")
    body["result"]["tenders"].append({"kind": "points", "points": 3000})  # spent offline, more than held
    db.apply_batch(batch_of([raw(1, "sale", body)]), TOPIC)
    earned = body["result"]["totals"]["points"]
    points, _, version = member_row(db, "M0001")
    assert points == 10 + earned - 3000 < 0
    [line] = db.members.delta_page(version - 1, 10).lines
    assert json.loads(line)["points_balance"] == 0
    with pytest.raises(MemberError) as caught:
        db.members.adjust("M0001", -1, 0, "cannot go further")
    assert caught.value.code == "negative_balance"


# --- administration ---------------------------------------------------------------------------


def test_card_states_tiers_and_adjustments_are_versioned_changes(db: HqDatabase, tmp_path: Path) -> None:
    seed(db, tmp_path, 3)
    lost = db.members.set_card_state(hashed(2), "lost", "reported")
    assert lost == mt.Change("M0002", 4)
    assert db.members.set_card_state(hashed(2), "lost", "again") is None  # nothing to change: no version
    tier = db.members.set_tier("M0001", "platinum", "gold", dt.date(2027, 1, 1), "promotion")
    assert tier == mt.Change("M0001", 5)
    assert db.members.adjust("M0003", 0, 550, "goodwill") == mt.Change("M0003", 6)
    assert db.members.head_version() == 6
    found = db.members.get("M0001")
    assert found is not None
    member, changes = found
    assert (member.tier, member.next_tier, member.next_tier_from) == ("platinum", "gold", dt.date(2027, 1, 1))
    assert [(v, reason) for v, _, reason in changes] == [(5, "promotion"), (1, "import")]
    assert db.members.hotlist(30, 10).cards == [
        {"card_hash": hashed(2), "member_id": "M0002", "state": "lost", "version": 4}
    ]
    for call, code in [
        (lambda: db.members.set_card_state("ab" * 32, "lost", "x"), "unknown_card"),
        (lambda: db.members.set_card_state(hashed(1), "stolen", "x"), "bad_state"),
        (lambda: db.members.adjust("M7777", 1, 0, "x"), "unknown_member"),
        (lambda: db.members.adjust("M0001", 1, 0, "  "), "bad_reason"),
        (lambda: db.members.adjust("M0001", 0, 0, "nothing"), "no_adjustment"),
        (lambda: db.members.set_tier("M0001", "gold", "vip", None, "half a change"), "next_tier_pair"),
    ]:
        with pytest.raises(MemberError) as caught:
            call()
        assert caught.value.code == code
    assert db.members.head_version() == 6
    # Restored, the card leaves the hot list; the count in the fingerprint says so.
    _, before = db.members.notice_state(30)
    db.members.set_card_state(hashed(2), "active", "found again")
    _, after = db.members.notice_state(30)
    assert before == (1, 4)
    assert after == (0, 0)
    assert db.members.hotlist(30, 10).cards == []


def test_an_import_moves_a_card_between_members_and_changes_both(db: HqDatabase, tmp_path: Path) -> None:
    seed(db, tmp_path, 3)
    moved = SnapshotMember(
        member_id="M0003",
        tier="gold",
        points_balance=1000,
        rebate_balance="300.00",
        cards=(
            SnapshotCard(card_hash=hashed(3), kind="standard", state="active", valid_from=dt.date(2025, 1, 1)),
            SnapshotCard(card_hash=hashed(1), kind="standard", state="active", valid_from=dt.date(2025, 1, 1)),
        ),
    )
    path = tmp_path / "move.jsonl"
    write_snapshot(path, [moved], version=1, card_key=KEY)
    result = db.members.import_members(path, KEY)
    assert (result.changed, result.unchanged, result.head) == (2, 0, 5)
    lines = current_lines(db)
    assert lines["M0001"]["cards"] == []
    assert {c["card_hash"] for c in lines["M0003"]["cards"]} == {hashed(1), hashed(3)}
    assert rows(db, "SELECT reason FROM member_changes WHERE version = 4") == [("import: card moved to M0003",)]
    # Importing the first file again changes only what differs from it.
    again = seed(db, tmp_path, 3)
    assert (again.changed, again.unchanged) == (2, 1)


def test_an_invalid_import_file_changes_nothing(db: HqDatabase, tmp_path: Path) -> None:
    path = seed_file(tmp_path / "ok.jsonl", 3)
    text_lines = path.read_text().splitlines()
    duplicated = [text_lines[0], text_lines[1], text_lines[1], *text_lines[2:-1]]
    bad = tmp_path / "bad.jsonl"
    write_snapshot(bad, [SnapshotMember.model_validate_json(line) for line in duplicated[1:]], version=1, card_key=KEY)
    with pytest.raises(InputError) as caught:
        db.members.import_members(bad, KEY)
    assert {issue.code for issue in caught.value.issues} == {"duplicate_member", "duplicate_card"}
    with pytest.raises(InputError) as other_key:
        db.members.import_members(path, bytes(range(1, 33)))
    assert other_key.value.issues[0].code == "card_key_mismatch"
    assert db.members.head_version() == 0
    assert rows(db, "SELECT count(*) FROM members") == [(0,)]


# --- snapshots --------------------------------------------------------------------------------


def read_snapshot(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """The file checked by the lanes' reader (count, checksum, versions): its version and member lines."""
    with SnapshotReader(path) as reader:
        header = reader.header(KEY)
        chunk = reader.chunk(0)
    assert chunk.issues == [], chunk.issues[:3]
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:-1]]
    return header.version, lines


def test_a_snapshot_is_one_consistent_version_under_concurrent_writes(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = HqDatabase.open(db_url)
    writer = HqDatabase.open(db_url)
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = [0]

    def keep_writing() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                writer.members.adjust(f"M{rng.randint(1, 3000):04d}", 1, 0, "meanwhile")
                writes[0] += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    def let_writes_commit(count: int = 10) -> None:
        target = writes[0] + count
        deadline = time.monotonic() + 20
        while writes[0] < target and not errors and time.monotonic() < deadline:
            time.sleep(0.002)
        assert writes[0] >= target, "the writer made no change while the snapshot was written"

    # The snapshot pauses right after it read the head version, and again in the middle of its rows,
    # while the writer commits: what it writes must still be the table at that one version.
    read_head = mt.head_version

    def head_then_wait(conn: Any) -> int:
        version = read_head(conn)
        if threading.current_thread() is threading.main_thread():
            let_writes_commit()
        return version

    write_file = mt.write_snapshot_file

    def paced(path: Path, lines: Iterator[SnapshotMember], **kw: Any) -> Any:
        def slowly() -> Iterator[SnapshotMember]:
            for index, line in enumerate(lines):
                if index == 1500:
                    let_writes_commit()
                yield line

        return write_file(path, slowly(), **kw)

    thread = threading.Thread(target=keep_writing)
    try:
        seed(db, tmp_path, 3000)
        monkeypatch.setattr(mt, "head_version", head_then_wait)
        monkeypatch.setattr(mt, "write_snapshot_file", paced)
        thread.start()
        snapshots = tmp_path / "snapshots"
        written = []
        for _ in range(3):
            result = db.members.write_snapshot(snapshots, KEY)
            assert result is not None
            written.append(result)
        stop.set()
        thread.join(30)
        assert not errors, errors
        history = rows(db, "SELECT member_id, version, line FROM member_changes ORDER BY version")
        assert history[-1][1] > written[-1].version + 10
        for result in written[-2:]:
            version, lines = read_snapshot(result.path)
            assert version == result.version
            # Exactly the table at that version: each member's last change at or below it.
            expected: dict[str, dict[str, Any]] = {}
            for member_id, change, line in history:
                if change <= version:
                    expected[member_id] = json.loads(line)
            assert {doc["member_id"]: doc for doc in lines} == expected
            assert [doc["member_id"] for doc in lines] == sorted(expected)
        # The newest two are kept.
        assert sorted(p.name for p in snapshots.iterdir()) == sorted(r.path.name for r in written[-2:])
    finally:
        stop.set()
        thread.join(30)
        db.close()
        writer.close()


# --- the real head office: HTTP, MQTT, the command line ------------------------------------------


def hq_config_extra(snapshot_dir: Path, *, secret: bool, every: int = 3) -> str:
    lanes = '[lanes]\nauth_secret_env = "LANE_HQ_TEST_SECRET"\n' if secret else ""
    return (
        f'\n[members]\ncard_hash_key = "hex:{KEY.hex()}"\nsnapshot_dir = "{snapshot_dir}"\n'
        f"snapshot_every_changes = {every}\nnotify_interval_seconds = 0.2\n\n{lanes}"
    )


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args, "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LANE_HQ_TEST_SECRET": SECRET},
    )


class Site:
    """A broker, a head office and its database, for one module."""

    def __init__(self, directory: Path, *, secret: bool) -> None:
        self.broker = Broker(directory / "broker")
        self.broker.start()
        try:
            self._start(directory, secret=secret)
        except BaseException:
            self.broker.stop()
            raise

    def _start(self, directory: Path, *, secret: bool) -> None:
        self.db_url = f"sqlite:///{directory}/hq.db"
        self.hq = Hq(
            directory / "hq",
            broker_port=self.broker.port,
            db_url=self.db_url,
            audit=False,
            env={"LANE_HQ_TEST_SECRET": SECRET},
        )
        self.snapshots = directory / "snapshots"
        with self.hq.config.open("a", encoding="utf-8") as handle:
            handle.write(hq_config_extra(self.snapshots, secret=secret))
        seeded = cli(self.hq.config, "members", "import", str(seed_file(directory / "seed.jsonl", 8)))
        assert seeded.returncode == 0, seeded.stderr
        try:
            self.hq.start()
        except BaseException:
            self.hq.kill()
            raise

    def close(self) -> None:
        self.hq.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    running = Site(tmp_path_factory.mktemp("site"), secret=True)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def closed_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A head office with no lanes' secret: its lane routes are closed."""
    running = Site(tmp_path_factory.mktemp("closed"), secret=False)
    try:
        yield running
    finally:
        running.close()


def lane_client(site: Site, store: str = STORE, lane: str = LANE, token_for: str | None = None) -> httpx.Client:
    token = lane_token(SECRET.encode(), store, token_for or lane)
    return httpx.Client(
        base_url=f"{site.hq.url}/v1/sync/{store}/{lane}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def test_hello_and_changes_with_a_lanes_token(site: Site, tmp_path: Path) -> None:
    with lane_client(site) as http:
        hello = http.get("/hello")
        assert hello.status_code == 200, hello.text
        doc = hello.json()
        head = doc["member_version"]
        assert head >= 8
        assert abs(dt.datetime.fromisoformat(doc["now"]) - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=30)
        assert set(doc) == {"v", "now", "member_version", "snapshot_version", "rules_version"}

        page = http.get("/members/changes", params={"after": 0, "limit": 5})
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("application/x-ndjson")
        path = tmp_path / "page.ndjson"
        path.write_bytes(page.content)
        delta = read_delta(path, KEY)
        assert (delta.header.from_, len(delta.members)) == (0, 5)
        rest = http.get("/members/changes", params={"after": delta.header.to})
        path.write_bytes(rest.content)
        assert read_delta(path, KEY).header.to == read_delta(path, KEY).header.head >= head

        for params, status, code in [
            ({"after": head + 1000}, 409, "ahead_of_head"),
            ({}, 422, "missing_after"),
            ({"after": "seven"}, 422, "bad_after"),
            ({"after": -1}, 422, "bad_after"),
            ({"after": 0, "limit": 0}, 422, "bad_limit"),
        ]:
            answer = http.get("/members/changes", params=params)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
            assert answer.json()["error"]["message"]


def test_lane_routes_refuse_another_lanes_token_no_token_and_no_secret(site: Site, closed_site: Site) -> None:
    for path in ("/hello", "/members/changes?after=0", "/members/snapshot"):
        with lane_client(site, token_for="l02") as other:
            answer = other.get(path)
            assert (answer.status_code, answer.json()["error"]["code"]) == (401, "unauthorized")
        bare = httpx.get(f"{site.hq.url}/v1/sync/{STORE}/{LANE}{path}", timeout=10)
        assert (bare.status_code, bare.json()["error"]["code"]) == (401, "unauthorized")
        with lane_client(closed_site) as closed:
            answer = closed.get(path)
            assert (answer.status_code, answer.json()["error"]["code"]) == (503, "lane_auth_unconfigured")


def test_a_snapshot_download_resumes_with_a_range_and_restarts_when_it_is_stale(site: Site, tmp_path: Path) -> None:
    with lane_client(site) as http:
        full = http.get("/members/snapshot")
        assert full.status_code == 200, full.text
        etag = full.headers["etag"]
        head = http.get("/hello").json()["member_version"]
        assert etag == f'"members-{head}"'
        assert full.headers["accept-ranges"] == "bytes"
        path = tmp_path / "snapshot.jsonl"
        path.write_bytes(full.content)
        version, lines = read_snapshot(path)
        assert (version, len(lines)) == (head, 8)
        assert http.get("/hello").json()["snapshot_version"] == head

        # Cut after 300 bytes: the rest, asked for with the same validator, completes it byte for byte.
        cut = 300
        rest = http.get("/members/snapshot", headers={"Range": f"bytes={cut}-", "If-Range": etag})
        assert rest.status_code == 206, rest.text
        assert rest.headers["content-range"] == f"bytes {cut}-{len(full.content) - 1}/{len(full.content)}"
        assert full.content[:cut] + rest.content == full.content

        # Enough changes for a new snapshot (snapshot_every_changes = 3): a stale validator gets the new file whole.
        for step in range(3):
            done = cli(site.hq.config, "members", "adjust", "M0004", "--points", "10", "--reason", f"step {step}")
            assert done.returncode == 0, done.stderr
        fresh = http.get("/members/snapshot", headers={"Range": f"bytes={cut}-", "If-Range": etag})
        assert fresh.status_code == 200, fresh.text
        assert fresh.headers["etag"] == f'"members-{head + 3}"'
        path.write_bytes(fresh.content)
        version, lines = read_snapshot(path)
        assert version == head + 3
        assert {d["member_id"]: d["points_balance"] for d in lines}["M0004"] == 1030


def subscriber_run(broker: Broker, topics: list[str], action: Any, until: Any, timeout: float) -> list[Any]:
    """Subscribe, run ``action()`` (blocking, in a thread), then collect (time, topic, doc) until ``until(seen)``."""

    async def run() -> list[Any]:
        seen: list[Any] = []
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)
            finished, arrived = asyncio.Event(), asyncio.Event()

            async def collect() -> None:
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    seen.append((time.monotonic(), message.topic.value, json.loads(payload)))
                    if finished.is_set() and until(seen):
                        arrived.set()
                        return

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.5)  # the retained messages first
            seen.append((time.monotonic(), "action-start", None))
            await asyncio.to_thread(action)
            seen.append((time.monotonic(), "action-done", None))
            finished.set()
            if until(seen):  # everything came while the action ran
                arrived.set()
            try:
                async with asyncio.timeout(timeout):
                    await arrived.wait()
            except TimeoutError:
                pass
            task.cancel()
        return seen

    return asyncio.run(run())


def test_a_card_marked_lost_in_another_process_reaches_subscribers_within_two_seconds(closed_site: Site) -> None:
    members_topic, hot_topic = wire.hq_topic(ROOT, "members"), wire.hq_topic(ROOT, "hotlist")
    done: list[subprocess.CompletedProcess[str]] = []
    target = hashed(5)

    def mark_lost() -> None:
        done.append(cli(closed_site.hq.config, "cards", "lost", number(5), "--reason", "reported by phone"))

    def marker(seen: list[Any], name: str) -> float:
        return next((s[0] for s in seen if s[1] == name), float("inf"))

    def after_start(seen: list[Any]) -> list[tuple[float, str, Any]]:
        begun = marker(seen, "action-start")
        return [s for s in seen if s[0] >= begun and not s[1].startswith("action-")]

    def has_card(doc: dict[str, Any]) -> bool:
        return any(card["card_hash"] == target for card in doc["cards"])

    def arrived(seen: list[Any]) -> bool:
        later = after_start(seen)
        return any(t == hot_topic and has_card(d) for _, t, d in later) and any(
            t == members_topic and d["version"] == 9 for _, t, d in later
        )

    seen = subscriber_run(closed_site.broker, [members_topic, hot_topic], mark_lost, arrived, timeout=5)
    [result] = done
    assert result.returncode == 0, result.stderr
    assert number(5) not in result.stdout + result.stderr
    assert number(5).replace(" ", "") not in result.stdout + result.stderr
    assert "(member version 9)" in result.stdout
    # Retained before the change: version 8 (the import) and an empty hot list.
    retained = [(t, d) for at, t, d in seen if at < marker(seen, "action-start")]
    assert [d["version"] for t, d in retained if t == members_topic] == [8]
    assert [d["cards"] for t, d in retained if t == hot_topic] == [[]]
    # The command's commit happened before it exited: counted from its exit, well within two seconds.
    ended = marker(seen, "action-done")
    later = after_start(seen)
    hot = next((at, d) for at, t, d in later if t == hot_topic and has_card(d))
    notice = next((at, d) for at, t, d in later if t == members_topic and d["version"] == 9)
    assert hot[0] - ended < 2.0
    assert notice[0] - ended < 2.0
    assert hot[1]["kind"] == "hotlist"
    assert hot[1]["version"] == 9
    assert hot[1]["cards"] == [{"card_hash": target, "member_id": "M0005", "state": "lost", "version": 9}]
    assert notice[1]["kind"] == "members"
    assert dt.datetime.fromisoformat(notice[1]["at"]).tzinfo is not None


def test_the_ack_carries_the_member_version_and_the_balance_moved(closed_site: Site) -> None:
    broker = closed_site.broker
    reader = HqReader(closed_site.db_url)
    try:
        head = int(reader.scalar("SELECT value FROM hq_counters"))
        points = int(reader.scalar("SELECT points_balance FROM members WHERE member_id = 'M0001'"))
        epoch = uuid.uuid4().hex
        body = sale_body("ACK-1", variant=11)
        entry = raw(1, "sale", body)
        payload = wire.encode_batch(STORE, LANE, epoch, [entry])
        ack_topic = wire.lane_topic(ROOT, STORE, LANE, "ack")

        async def exchange() -> wire.Ack:
            async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as client:
                await client.subscribe(ack_topic, qos=1)
                await client.publish(wire.lane_topic(ROOT, STORE, LANE, "journal"), payload, qos=1)
                async with asyncio.timeout(15):
                    async for message in client.messages:
                        raw_ack = message.payload if isinstance(message.payload, bytes) else b""
                        ack = wire.decode_ack(STORE, LANE, raw_ack)
                        if ack.epoch == epoch and ack.seq == 1:
                            return ack
            raise AssertionError("no ack")

        ack = asyncio.run(exchange())
        assert ack.member_version == head + 1
        assert int(reader.scalar("SELECT value FROM hq_counters")) == head + 1
        earned = body["result"]["totals"]["points"]
        assert int(reader.scalar("SELECT points_balance FROM members WHERE member_id = 'M0001'")) == points + earned

        # A change from the command line, then a restart: the acks re-published at connect say the new head.
        done = cli(closed_site.hq.config, "members", "set-tier", "M0002", "vip", "--reason", "upgrade")
        assert done.returncode == 0, done.stderr
        closed_site.hq.stop()
        closed_site.hq.start()
        deadline = time.monotonic() + 10
        while True:
            again = wire.decode_ack(STORE, LANE, retained_payload(broker, ack_topic))
            if again.member_version == head + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (again.epoch, again.seq, again.member_version) == (epoch, 1, head + 2)
    finally:
        reader.close()


def retained_payload(broker: Broker, topic: str) -> bytes:
    async def run() -> bytes:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    return message.payload if isinstance(message.payload, bytes) else b""
        return b""

    return asyncio.run(run())


def test_the_command_line_says_what_is_wrong_with_exit_codes(site: Site, tmp_path: Path) -> None:
    config = site.hq.config
    shown = cli(config, "members", "show", "M0003")
    assert shown.returncode == 0, shown.stderr
    assert "tier gold" in shown.stdout
    assert "points 1000, rebate 300.00" in shown.stdout
    assert mt.masked(hashed(3)) in shown.stdout
    assert hashed(3) not in shown.stdout
    for args, code, message in [
        (("members", "show", "M9999"), 1, "unknown_member"),
        (("members", "adjust", "M0003", "--points", "-5000", "--reason", "too much"), 1, "negative_balance"),
        (("members", "adjust", "M0003", "--points", "5"), 2, "--reason"),
        (("members", "set-tier", "M0003", "gold", "--next", "vip"), 1, "next_tier_pair"),
        (("cards", "lost", "not a card!"), 1, "4-64 letters or digits"),
        (("cards", "restore", "--hash", "ab" * 32), 1, "unknown_card"),
        (("members", "import", str(tmp_path / "missing.jsonl")), 1, "unreadable"),
    ]:
        result = cli(config, *args)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    no_key = tmp_path / "hq.toml"
    no_key.write_text(f'[database]\nurl = "{site.db_url}"\n', encoding="utf-8")
    result = cli(no_key, "cards", "lost", number(1))
    assert result.returncode == 78, result.stderr
    assert "card_hash_key" in result.stderr
    assert cli(no_key, "members", "show", "M0001").returncode == 0


def test_postgresql_with_a_card_key_and_no_snapshot_dir_is_a_configuration_error(pg_url: str, tmp_path: Path) -> None:
    config = tmp_path / "hq.toml"
    config.write_text(
        f'[database]\nurl = "{pg_url}"\n\n[members]\ncard_hash_key = "hex:{KEY.hex()}"\n', encoding="utf-8"
    )
    result = subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", "run", "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert result.returncode == 78, result.stderr
    assert "members.snapshot_dir" in result.stderr
