"""Draining a lane's backlog to head office: lane → broker → head office → PostgreSQL → ack, against a raw upsert.

``python -m bench.sync [--entries 100000] [--quick]``

One run, one temporary directory, one fresh PostgreSQL database on the
machine's server (``tests.pgdb``):

1. **Set-up.** A lane database holding a backlog of N sale entries.  The
   bodies are real: baskets of 1-6 lines priced by the engine under the 888
   mall's rules, for members and guests, in the shape ``agent/service.py``
   journals them (request, member state, priced result), each with its own
   ``sale_id``.  The rows are written straight into the journal table (a
   million POS API calls would take an hour and measure the API, not the
   sync).
2. **The pipeline.** A private Mosquitto, ``lane-hq run`` on that
   PostgreSQL database (audit off: it runs behind ingest and is not on the
   ack's path), then ``lane-agent run`` with sync on.  ``GET /v1/status`` is
   polled every 20 ms; the rate is entries acknowledged per second from the
   first ack to the last (the lane's and head office's start-up excluded).
   Afterwards head office's tables are checked: N journal entries, N sales,
   nothing dead-lettered, every ledger row once.
3. **The reference.** The same N journal rows (the same columns and JSON
   text) upserted into a table of the same shape with psycopg directly:
   ``INSERT … SELECT FROM unnest(…) ON CONFLICT (id) DO NOTHING``, binary
   arrays, 500 rows and one commit per batch (the fastest batched form measured here,
   ../shared/REAL_COMPONENTS.md).  It runs before and after the pipeline; the
   faster of the two is the reference.

Target (the sync issue): pipeline rate >= 0.3 x the raw upsert rate.
The table goes to stdout; the figures to ``bench/results/sync.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.types.array import ListBinaryDumper

from agent.basket import parse_member
from agent.engine import price
from agent.pos_models import SaleIn
from agent.render import to_wire
from agent.ruleset import load_ruleset
from agent.store import LaneStore, json_text
from bench.run import machine

ROOT = Path(__file__).resolve().parent.parent
# The broker, head-office and database helpers are the tests' own (one copy of each).
sys.path.insert(0, str(ROOT / "tests"))
from broker import Broker, free_port  # noqa: E402
from hq_harness import Hq, HqReader  # noqa: E402
from pgdb import fresh_database  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sync.json"
RULES = ROOT / "config" / "rules" / "888-mall.toml"
STORE, LANE = "bench-store", "lane-01"
TARGET_RATIO = 0.3
RAW_BATCH = 500
UTC8 = dt.timezone(dt.timedelta(hours=8))
PRODUCTS = (
    ("6901234567892", "womenswear", "1", "399.00", None),
    ("6900000000012", "fresh", "0.356", "45.80", "52.00"),
    ("6900000000029", "grocery", "2", "12.50", None),
    ("6900000000036", "cosmetics", "1", "268.00", None),
    ("6900000000043", "fresh", "1.120", "18.60", None),
    ("6900000000050", "household", "3", "9.90", None),
)


class BenchError(Exception):
    """The benchmark could not run (a component did not start, a check failed)."""


def _templates(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` journal bodies as JSON text with a ``__SALE_ID__`` placeholder, and their ``at``."""
    ruleset = load_ruleset(RULES)
    rng = random.Random(seed)
    at = dt.datetime(2026, 12, 10, 14, 5, tzinfo=UTC8)
    out = []
    for index in range(count):
        lines = []
        for number, (sku, category, qty, unit, regular) in enumerate(rng.sample(PRODUCTS, rng.randint(1, 6))):
            line = {"line_id": str(number + 1), "sku": sku, "category": category, "qty": qty, "unit_price": unit}
            if regular:
                line["regular_price"] = regular
            lines.append(line)
        member_doc = None
        request: dict[str, Any] = {"sale_id": "__SALE_ID__", "lines": lines}
        if index % 3:
            member_doc = {
                "member_id": f"M{index:06d}",
                "tier": ("standard", "silver", "gold", "vip")[index % 4],
                "points_balance": 1000,
                "rebate_balance": "0.00",
            }
            request["member_id"] = member_doc["member_id"]
        unpaid = SaleIn.model_validate_json(json.dumps(request)).to_basket()
        member = None if member_doc is None else parse_member(member_doc)
        net = to_wire(price(dataclasses.replace(unpaid, at=at), member, ruleset, at))["totals"]["net"]
        request["tenders"] = [{"kind": "cash", "amount": net}]
        basket = dataclasses.replace(SaleIn.model_validate_json(json.dumps(request)).to_basket(), at=at)
        body = {
            "v": 1,
            "kind": "sale",
            "store": STORE,
            "lane": LANE,
            "rules": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
            "sale_id": "__SALE_ID__",
            "request": request,
            "member": member_doc,
            "result": to_wire(price(basket, member, ruleset, at)),
        }
        out.append((json_text(body), at.isoformat()))
    return out


def _lane_db(path: Path, key: bytes, entries: int, seed: int) -> tuple[str, int]:
    """A lane database whose journal holds ``entries`` unacknowledged sales; its epoch and body bytes."""

    async def create() -> str:
        async with await LaneStore.open(path, key) as store:
            return (await store.status()).journal_epoch

    epoch = asyncio.run(create())
    ruleset = load_ruleset(RULES)
    templates = _templates(64, seed)
    conn = sqlite3.connect(path)
    total = 0
    rows = []
    for seq in range(1, entries + 1):
        text, at = templates[seq % len(templates)]
        body = text.replace("__SALE_ID__", f"B{seq:08d}")
        total += len(body)
        rows.append((seq, str(uuid.uuid4()), "sale", at, ruleset.version, 0, body))
    with conn:
        conn.executemany(
            "INSERT INTO journal (seq, id, kind, at, rules_version, member_version, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()
    return epoch, total


def _raw_rate(dsn: str, lane_db: Path, epoch: str, table: str) -> float:
    """Rows per second of a batched unnest upsert of the lane's journal rows into ``table``."""
    source = sqlite3.connect(lane_db)
    rows = source.execute("SELECT seq, id, kind, at, rules_version, member_version, body FROM journal ORDER BY seq")
    columns: list[list[Any]] = [[] for _ in range(7)]
    batches = []
    for row in rows:
        for index, value in enumerate(row):
            columns[index].append(value)
        if len(columns[0]) == RAW_BATCH:
            batches.append(columns)
            columns = [[] for _ in range(7)]
    if columns[0]:
        batches.append(columns)
    source.close()
    with psycopg.connect(dsn) as conn:
        # Binary arrays: the text form of 500 JSON bodies costs more to escape and parse than the insert itself.
        conn.adapters.register_dumper(list, ListBinaryDumper)
        conn.execute(
            f"CREATE TABLE {table} (id TEXT PRIMARY KEY, store TEXT NOT NULL, lane TEXT NOT NULL, epoch TEXT NOT NULL,"
            " seq BIGINT NOT NULL, kind TEXT NOT NULL, at TEXT NOT NULL, rules_version TEXT NOT NULL,"
            " member_version BIGINT NOT NULL, body TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
            " UNIQUE (store, lane, epoch, seq))"
        )
        conn.commit()
        started = time.perf_counter()
        count = 0
        for seqs, ids, kinds, ats, versions, member_versions, bodies in batches:
            conn.execute(
                f"INSERT INTO {table} (id, store, lane, epoch, seq, kind, at, rules_version, member_version, body)"  # noqa: S608 - our own table name
                " SELECT i, %s, %s, %s, s, k, a, r, m, b FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[],"
                " %s::text[], %s::bigint[], %s::text[]) AS u(i, s, k, a, r, m, b) ON CONFLICT (id) DO NOTHING",
                (STORE, LANE, epoch, ids, seqs, kinds, ats, versions, member_versions, bodies),
            )
            conn.commit()
            count += len(ids)
        seconds = time.perf_counter() - started
    return count / seconds


def _drain(work: Path, db_url: str, lane_db: Path, key: bytes, entries: int) -> dict[str, Any]:
    broker = Broker(work / "broker", max_queued=10_000)
    broker.start()
    hq = Hq(work / "hq", broker_port=broker.port, db_url=db_url, audit=False)
    lane: subprocess.Popen[bytes] | None = None
    try:
        hq.start()
        port = free_port()
        token = secrets.token_urlsafe(24)
        config = work / "lane.toml"
        config.write_text(
            f'[lane]\nstore = "{STORE}"\nlane = "{LANE}"\n\n[api]\nport = {port}\ntoken = "{token}"\n\n'
            f'[store]\npath = "{lane_db}"\ncard_hash_key = "hex:{key.hex()}"\n\n[rules]\npath = "{RULES}"\n\n'
            f'[logging]\nlevel = "WARNING"\n\n[sync]\nenabled = true\nport = {broker.port}\n',
            encoding="utf-8",
        )
        lane = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT)  # noqa: S603
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + 900
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}) as http:
            while time.monotonic() < deadline:
                if lane.poll() is not None:
                    raise BenchError(f"the lane exited with {lane.returncode}")
                try:
                    acked = int(http.get("/v1/status", timeout=5).json()["journal"]["acked_seq"])
                except httpx.HTTPError:
                    time.sleep(0.02)
                    continue
                samples.append((time.perf_counter(), acked))
                if acked >= entries:
                    break
                time.sleep(0.02)
            else:
                raise BenchError(f"the backlog did not drain within 900 s (acked {samples[-1][1] if samples else 0})")
        first = next(i for i, (_, acked) in enumerate(samples) if acked > 0)
        t0, a0 = samples[first]
        t1, a1 = samples[-1]
        rate = (a1 - a0) / (t1 - t0) if t1 > t0 else float("nan")
        batches = hq.metric("hq_batches_total")
    finally:
        if lane is not None and lane.poll() is None:
            lane.send_signal(signal.SIGTERM)
            lane.wait(30)
        hq.stop()
        broker.stop()
    reader = HqReader(db_url)
    try:
        stored = reader.scalar("SELECT count(*) FROM journal_entries")
        sales = reader.scalar("SELECT count(*) FROM sales")
        dead = reader.scalar("SELECT count(*) FROM dead_letters")
        distinct = reader.scalar("SELECT count(DISTINCT seq) FROM journal_entries")
    finally:
        reader.close()
    if not (stored == sales == distinct == entries) or dead:
        raise BenchError(f"head office holds {stored} entries, {sales} sales, {dead} dead letters; expected {entries}")
    return {
        "rate_entries_per_s": rate,
        "seconds": t1 - t0,
        "entries_timed": a1 - a0,
        "messages": batches,
        "stored": stored,
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    key = secrets.token_bytes(32)
    lane_db = work / "lane.db"
    print(f"writing a lane backlog of {args.entries:,} sale entries…", file=sys.stderr)
    epoch, body_bytes = _lane_db(lane_db, key, args.entries, args.seed)
    with fresh_database("lanehq_bench") as db_url:
        dsn = f"dbname={db_url.split('///', 1)[1].split('?', 1)[0]} host={db_url.rsplit('host=', 1)[1]}"
        print("raw upsert (before)…", file=sys.stderr)
        raw_before = _raw_rate(dsn, lane_db, epoch, "raw_before")
        print("draining lane → broker → head office → PostgreSQL → ack…", file=sys.stderr)
        drained = _drain(work, db_url, lane_db, key, args.entries)
        print("raw upsert (after)…", file=sys.stderr)
        raw_after = _raw_rate(dsn, lane_db, epoch, "raw_after")
    raw = max(raw_before, raw_after)
    ratio = drained["rate_entries_per_s"] / raw
    return {
        "machine": machine(),
        "entries": args.entries,
        "avg_body_bytes": body_bytes / args.entries,
        "pipeline": drained,
        "raw_upsert_rows_per_s": {"before": raw_before, "after": raw_after, "reference": raw},
        "targets": {"drain_vs_raw": {"ratio": ratio, "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO}},
    }


def render(results: dict[str, Any]) -> str:
    pipe = results["pipeline"]
    raw = results["raw_upsert_rows_per_s"]
    target = results["targets"]["drain_vs_raw"]
    return "\n".join(
        [
            f"bench.sync: {results['entries']:,} sale entries, {results['avg_body_bytes']:.0f} B each on average",
            f"  {'figure':<58}{'value':>14}",
            f"  {'lane → broker → HQ → PostgreSQL → ack (entries/s)':<58}{pipe['rate_entries_per_s']:>14,.0f}",
            f"  {'  timed: entries / seconds':<58}{pipe['entries_timed']:>8,} / {pipe['seconds']:.2f}",
            f"  {'  journal messages handled by head office':<58}{pipe['messages']:>14,.0f}",
            f"  {'raw batched upsert, before (rows/s)':<58}{raw['before']:>14,.0f}",
            f"  {'raw batched upsert, after (rows/s)':<58}{raw['after']:>14,.0f}",
            f"  {'ratio pipeline / raw (target >= 0.3)':<58}{target['ratio']:>14.2f}  "
            + ("met" if target["met"] else "NOT met"),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, help="backlog size (default 100,000; --quick 10,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 entries: a smoke test")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.entries is None:
        args.entries = 10_000 if args.quick else 100_000
    if args.entries < 1000:
        parser.error("--entries must be at least 1000")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="bench-sync-", dir=args.dir) as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(f"bench.sync: {exc}", file=sys.stderr)
            return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    return 1 if args.strict and not results["targets"]["drain_vs_raw"]["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
