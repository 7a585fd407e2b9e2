"""The lane store's figures: snapshot import, card lookups, sale commits, beside a raw SQLite commit.

``python -m bench.store [--members 1000000] [--commits 2000] [--dir DIR]``

* **write**: head office's side, ``write_snapshot`` of N synthetic members
  (1.2 cards each on average, in member-id order as head office writes them).
* **import**: ``LaneStore.import_snapshot`` of that file into an empty store,
  then again into the now-full one (the usual case: a newer snapshot).
* **lookup**: ``lookup_card`` of random known cards, one at a time: p50/p99.
* **commit**: ``commit_sale`` one after another (journal + sale + 2 lines +
  own spend, WAL, synchronous=FULL): rate, p50/p99; beside **raw commit**, the
  same WAL+FULL database taking one small INSERT per transaction through
  plain ``sqlite3`` on this thread: the disk's fsync floor, measured in the
  same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agent.returns import SoldLine
from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot
from agent.store import LaneStore

KEY = bytes(range(32))
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
LINES = (SoldLine("1", 1000, 1990, 19), SoldLine("2", 2000, 500, 5))


def _number(i: int, extra: int = 0) -> str:
    return f"{6 + extra}{i:015d}"


def _members(count: int) -> Iterator[SnapshotMember]:
    since = dt.date(2024, 1, 1)
    for i in range(count):
        cards = [
            SnapshotCard(
                card_hash=card_hash(KEY, _number(i)).hex(),
                kind="standard",
                state="active",
                valid_from=since,
                valid_until=dt.date(2028, 12, 31),
            )
        ]
        if i % 5 == 0:
            cards.append(
                SnapshotCard(
                    card_hash=card_hash(KEY, _number(i, 1)).hex(), kind="standard", state="replaced", valid_from=since
                )
            )
        yield SnapshotMember(
            member_id=f"M{i:09d}",
            tier=("silver", "gold", "platinum")[i % 3],
            birthday=f"{i % 12 + 1:02d}-{i % 28 + 1:02d}",
            points_balance=i % 50_000,
            rebate_balance=f"{i % 1000}.{i % 100:02d}",
            cards=tuple(cards),
        )


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def _raw_commits(path: Path, count: int) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT)")
        samples = []
        for i in range(count):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?)", (i + 1, "x" * 200))
            conn.execute("COMMIT")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        conn.close()


async def _measure(work: Path, snapshot: Path, members: int, commits: int) -> list[tuple[str, str]]:
    rows = []
    async with await LaneStore.open(work / "lane.db", KEY) as store:
        for label in ("import, empty store", "import, over the previous"):
            started = time.perf_counter()
            result = await store.import_snapshot(snapshot)
            seconds = time.perf_counter() - started
            rows.append(
                (label, f"{seconds:.1f} s  ({result.members / seconds:,.0f} members/s, {result.cards:,} cards)")
            )
        rng = random.Random(1)
        samples = []
        for _ in range(5000):
            wanted = store.card_hash(_number(rng.randrange(members)))
            started = time.perf_counter()
            record = await store.lookup_card(wanted)
            samples.append(time.perf_counter() - started)
            assert record is not None
        rows.append(("lookup_card", f"p50 {_pct(samples, 0.5):.0f} us  p99 {_pct(samples, 0.99):.0f} us"))
        samples = []
        began = time.perf_counter()
        for i in range(commits):
            started = time.perf_counter()
            await store.commit_sale(
                f"S{i}",
                "d",
                {"sale_id": f"S{i}"},
                {"total": "24.90"},
                at=AT,
                rules_version="r1",
                member_id="M000000001",
                points_spent=1,
                lines=LINES,
            )
            samples.append(time.perf_counter() - started)
        rate = commits / (time.perf_counter() - began)
        rows.append(
            ("commit_sale", f"{rate:,.0f}/s  p50 {_pct(samples, 0.5):.0f} us  p99 {_pct(samples, 0.99):.0f} us")
        )
        status = await store.status()
        rows.append(("database size", f"{status.db_bytes / 2**20:,.0f} MiB"))
    raw = _raw_commits(work / "raw.db", commits)
    rows.append(
        (
            "raw WAL+FULL commit",
            f"{len(raw) / sum(raw):,.0f}/s  p50 {_pct(raw, 0.5):.0f} us  p99 {_pct(raw, 0.99):.0f} us",
        )
    )
    rows.append(("", f"commit_sale p50 / raw p50 = {statistics.median(samples) / statistics.median(raw):.2f}"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        snapshot = work / "members.jsonl"
        print(f"writing a snapshot of {args.members:,} members ...", file=sys.stderr)
        started = time.perf_counter()
        written = write_snapshot(snapshot, _members(args.members), version=1, card_key=KEY)
        rows = [
            ("write_snapshot", f"{time.perf_counter() - started:.1f} s  ({snapshot.stat().st_size / 2**20:,.0f} MiB)")
        ]
        print(f"importing {written.members:,} members ...", file=sys.stderr)
        rows += asyncio.run(_measure(work, snapshot, args.members, args.commits))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
