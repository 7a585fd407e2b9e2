"""Applying head office's member table on a lane: a snapshot import beside a raw sqlite3 bulk load, and deltas.

``python -m bench.members [--members 1000000] [--pages 20] [--page-members 5000] [--dir DIR] [--strict]``
(``MEMBERS=N`` in the environment sets the default of ``--members``, for quick runs)

* **snapshot**: ``write_snapshot`` of N synthetic members (``bench.store``'s
  generator: 1.2 cards each on average, member-id order).  Written once and
  cached in ``$TMPDIR/lane-bench-members/`` (304 MiB for a million), since it
  takes longer to write than to import; ``--fresh`` writes it again.
* **reference**: the minimal cost of getting the same rows into SQLite.  The
  file is first read with ``SnapshotReader`` into the very member and card
  rows the import produces, all in memory, and the card rows are sorted by
  hash (neither is timed: the reference is handed parsed rows in key order,
  SQLite's best case).  Timed: plain ``sqlite3`` ``executemany`` of those
  tuples into the ``members`` and ``cards`` tables of a fresh lane database
  (the lane's own schema, WAL, ``synchronous=FULL``, the lane's
  ``journal_size_limit``), 100,000 rows per transaction.  It has no parsing,
  no checking, no checksum, no staging and no swap.  It runs before and after
  the imports, each time on a new file; the faster run is the reference.
* **import**: ``LaneStore.import_snapshot`` of the file into an empty store,
  then again over the million it now holds (the usual case); both include
  everything the call does (header, parse and check, checksum, staging, swap,
  dropping the replaced tables).  Then a third import while a sale is
  committed every 20 ms: the longest a sale waited.  The importing process's
  peak RSS (VmHWM) is measured in its own child process.
* **deltas**: ``LaneStore.apply_member_delta`` of P delta pages
  (docs/downlink.md "Deltas") of M changed members each over the cache:
  members/s, and the longest page (one transaction: what a sale may wait).

Target (the member-table issue): import <= 2x the reference, measured in the
same run.  The table goes to stdout (progress to stderr), the figures to
``bench/results/members.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.returns import SoldLine
from agent.snapshot import SnapshotCard, SnapshotMember, SnapshotReader, card_hash, key_check, write_snapshot
from agent.store import LaneStore
from bench.run import machine

if TYPE_CHECKING:
    # bench.store's signatures, as bench.api declares them (mypy does not pass bench/store.py).
    KEY: bytes

    def _members(count: int) -> Iterator[SnapshotMember]: ...
    def _number(i: int, extra: int = 0) -> str: ...
else:
    from bench.store import KEY, _members, _number

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "members.json"
CACHE = Path(tempfile.gettempdir()) / "lane-bench-members"
# Bump when bench.store's generator changes, so a cached file of the old rows is not reused.
GENERATOR = 1
TARGET_RATIO = 2.0
REFERENCE_BATCH = 100_000
SALE_EVERY = 0.02  # seconds between sales during the third import
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
LINES = (SoldLine("1", 1000, 1990, 19),)


# --- the snapshot file -------------------------------------------------------------


def _cached_snapshot(members: int, *, fresh: bool) -> tuple[Path, float | None]:
    """The snapshot of ``members`` members, written if not cached; (path, seconds it took to write or None)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"members-{members}-g{GENERATOR}.jsonl"
    if not fresh and _complete(path, members):
        return path, None
    print(f"writing a snapshot of {members:,} members to {path} ...", file=sys.stderr)
    started = time.perf_counter()
    write_snapshot(path, _members(members), version=1, card_key=KEY)
    return path, time.perf_counter() - started


def _complete(path: Path, members: int) -> bool:
    """Whether ``path`` ends with the trailer of ``members`` lines (``write_snapshot`` renames only when done)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 200))
            last = handle.read().splitlines()[-1]
    except (OSError, IndexError):
        return False
    try:
        trailer = json.loads(last)
    except ValueError:
        return False
    return isinstance(trailer, dict) and trailer.get("kind") == "end" and trailer.get("count") == members


# --- the phases, each in its own process ----------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_reference(snapshot: Path, db: Path) -> dict[str, Any]:
    """The raw bulk load (module docstring): parsed rows in memory, then timed executemany."""
    asyncio.run(_create_lane_db(db))
    with SnapshotReader(snapshot) as reader:
        reader.header(KEY)
        chunk = reader.chunk(0)
    if chunk.issues:
        raise RuntimeError(f"the snapshot does not read cleanly: {chunk.issues[:3]}")
    members, cards = chunk.members, sorted(chunk.cards)
    del chunk
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")
        started = time.perf_counter()
        for table, rows in (("members", members), ("cards", cards)):
            marks = ", ".join("?" * len(rows[0]))
            for at in range(0, len(rows), REFERENCE_BATCH):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows[at : at + REFERENCE_BATCH])  # noqa: S608
                conn.execute("COMMIT")
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    return {"seconds": seconds, "members": len(members), "cards": len(cards), "peak_rss_mib": _peak_rss_mib()}


async def _create_lane_db(db: Path) -> None:
    async with await LaneStore.open(db, KEY):
        pass


def phase_import(snapshot: Path, db: Path, pages: int, page_members: int, *, extras: bool) -> dict[str, Any]:
    return asyncio.run(_imports(snapshot, db, pages, page_members, extras=extras))


async def _imports(snapshot: Path, db: Path, pages: int, page_members: int, *, extras: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await LaneStore.open(db, KEY) as store:
        out["rss_before_mib"] = _peak_rss_mib()
        for key in ("empty", "over"):
            print(f"import into {'an empty store' if key == 'empty' else 'the full store'} ...", file=sys.stderr)
            started = time.perf_counter()
            result = await store.import_snapshot(snapshot)
            out[key] = {"seconds": time.perf_counter() - started, "members": result.members, "cards": result.cards}
        out["peak_rss_mib"] = _peak_rss_mib()
        status = await store.status()
        out["db_bytes"] = status.db_bytes
        if extras:
            print("import with a sale every 20 ms ...", file=sys.stderr)
            out["with_sales"] = await _import_with_sales(store, snapshot)
            out["deltas"] = await _deltas(store, db.parent, pages, page_members, status.members)
    return out


async def _import_with_sales(store: LaneStore, snapshot: Path) -> dict[str, Any]:
    importing = asyncio.create_task(store.import_snapshot(snapshot))
    waits: list[float] = []
    while not importing.done():
        started = time.perf_counter()
        sale_id = f"S{len(waits)}"
        await store.commit_sale(
            sale_id,
            "d",
            {"sale_id": sale_id},
            {"total": "19.90"},
            at=AT,
            rules_version="r1",
            member_id="M000000001",
            lines=LINES,
        )
        waits.append(time.perf_counter() - started)
        await asyncio.sleep(SALE_EVERY)
    result = await importing
    waits.sort()
    return {
        "seconds": result.seconds,
        "sales": len(waits),
        "p50_ms": waits[len(waits) // 2] * 1000 if waits else None,
        "max_ms": waits[-1] * 1000 if waits else None,
    }


# --- deltas -------------------------------------------------------------------------


def write_delta_pages(work: Path, members: int, pages: int, page_members: int) -> list[Path]:
    """``pages`` delta pages over a snapshot of version 1: distinct random members changed, ordered by version.

    Each changed member has a new points balance; every tenth also gets a new
    active card (its old main card now ``replaced``), so pages move cards too.
    """
    rng = random.Random(7)
    changed = rng.sample(range(members), min(members, pages * page_members))
    since = dt.date(2024, 1, 1)
    created = dt.datetime.now(dt.UTC).isoformat()
    head = 1 + len(changed)
    paths = []
    for page in range(pages):
        indexes = changed[page * page_members : (page + 1) * page_members]
        if not indexes:
            break
        after = 1 + page * page_members  # the version the lane has before this page
        lines = [
            json.dumps(
                {
                    "v": 1,
                    "kind": "member-delta",
                    "from": after,
                    "to": after + len(indexes),
                    "head": head,
                    "created": created,
                    "key_check": key_check(KEY),
                },
                separators=(",", ":"),
            )
        ]
        for offset, i in enumerate(indexes):
            cards = [
                SnapshotCard(
                    card_hash=card_hash(KEY, _number(i)).hex(),
                    kind="standard",
                    state="replaced" if i % 10 == 0 else "active",
                    valid_from=since,
                    valid_until=dt.date(2028, 12, 31),
                )
            ]
            if i % 10 == 0:
                cards.append(
                    SnapshotCard(
                        card_hash=card_hash(KEY, _number(i, 2)).hex(), kind="standard", state="active", valid_from=since
                    )
                )
            member = SnapshotMember.model_validate(
                {
                    "member_id": f"M{i:09d}",
                    "tier": ("silver", "gold", "platinum")[(i + 1) % 3],
                    "points_balance": (i * 7) % 50_000,
                    "rebate_balance": "1.00",
                    "version": after + offset + 1,
                    "cards": tuple(cards),
                }
            )
            lines.append(member.model_dump_json(exclude_none=True))
        body = "".join(line + "\n" for line in lines).encode()
        trailer = {"kind": "end", "count": len(indexes), "sha256": hashlib.sha256(body).hexdigest()}
        path = work / f"delta-{page:03d}.jsonl"
        path.write_bytes(body + json.dumps(trailer, separators=(",", ":")).encode() + b"\n")
        paths.append(path)
    return paths


async def _deltas(store: LaneStore, work: Path, pages: int, page_members: int, members: int) -> dict[str, Any]:
    # apply_member_delta(path) is being added alongside this benchmark: measured when it exists, never faked.
    apply = getattr(store, "apply_member_delta", None)
    if apply is None or pages < 1 or page_members < 1:
        return {"available": False}
    paths = write_delta_pages(work, members, pages, page_members)
    print(f"applying {len(paths)} delta pages of {page_members:,} members ...", file=sys.stderr)
    seconds = []
    for path in paths:
        started = time.perf_counter()
        await apply(path)
        seconds.append(time.perf_counter() - started)
    changed = min(members, pages * page_members)
    status = await store.status()
    rng = random.Random(7)
    probe = rng.sample(range(members), changed)[-1]  # the last member of the last page
    member = await store.get_member(f"M{probe:09d}")
    if status.member_version != 1 + changed or member is None or member.points_balance != (probe * 7) % 50_000:
        raise RuntimeError(f"the deltas did not apply: member version {status.member_version}, {member}")
    return {
        "available": True,
        "pages": len(paths),
        "members": changed,
        "seconds": sum(seconds),
        "page_max_s": max(seconds),
        "page_p50_s": sorted(seconds)[len(seconds) // 2],
    }


# --- orchestration ------------------------------------------------------------------


def _child(args: Sequence[str]) -> dict[str, Any]:
    done = subprocess.run(  # noqa: S603  (this interpreter, this module)
        [sys.executable, "-m", "bench.members", *args], check=True, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Rounds of (reference, imports), then the reference once more; the best of each is compared.

    Interleaved so that a slow moment of a shared machine slows both sides; best of each because
    the machine only ever adds time.
    """
    snapshot, written = _cached_snapshot(args.members, fresh=args.fresh)
    load_before = os.getloadavg()[0]
    common = ["--snapshot", str(snapshot)]
    references: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []

    def reference() -> None:
        print(f"reference {len(references) + 1}: raw sqlite3 bulk load ...", file=sys.stderr)
        references.append(_child(["--phase", "reference", *common, "--db", str(work / f"raw-{len(references)}.db")]))

    for number in range(args.rounds):
        reference()
        last = number == args.rounds - 1
        argv = ["--phase", "import", *common, "--db", str(work / f"lane-{number}.db")]
        argv += ["--pages", str(args.pages), "--page-members", str(args.page_members)]
        print(f"round {number + 1} of {args.rounds}: imports ...", file=sys.stderr)
        rounds.append(_child([*argv, *(["--extras"] if last else [])]))
    reference()
    best = min(ref["seconds"] for ref in references)
    imports = {
        **rounds[-1],
        **{key: min((r[key] for r in rounds), key=lambda fig: float(fig["seconds"])) for key in ("empty", "over")},
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
        "rss_before_mib": max(r["rss_before_mib"] for r in rounds),
    }
    targets = {
        key: {
            "value": imports[key]["seconds"] / best,
            "limit": TARGET_RATIO,
            "met": imports[key]["seconds"] / best <= TARGET_RATIO,
        }
        for key in ("empty", "over")
    }
    return {
        "config": {
            "members": imports["empty"]["members"],
            "cards": imports["empty"]["cards"],
            "snapshot_bytes": snapshot.stat().st_size,
            "snapshot_written_s": written,
            "reference_batch": REFERENCE_BATCH,
            "rounds": args.rounds,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "machine": machine(),
        },
        "reference_runs_s": [ref["seconds"] for ref in references],
        "reference_s": best,
        "import_runs_s": {key: [r[key]["seconds"] for r in rounds] for key in ("empty", "over")},
        "imports": imports,
        "targets": targets,
    }


def render(results: dict[str, Any]) -> str:
    config, imports, goals = results["config"], results["imports"], results["targets"]
    reference = results["reference_s"]
    members = config["members"]
    written = config["snapshot_written_s"]
    out = [
        (
            f"member table apply: {members:,} members, {config['cards']:,} cards, a "
            f"{config['snapshot_bytes'] / 2**20:,.0f} MiB snapshot "
            f"({'cached' if written is None else f'written in {written:.1f} s'}); "
            f"load average {config['load_average'][0]:.2f} before, {config['load_average'][1]:.2f} after"
        ),
        "",
    ]
    rows = [("measurement", "seconds", "members/s", "vs reference", "target")]
    runs = " / ".join(f"{s:.2f}" for s in results["reference_runs_s"])
    rows.append(
        (
            f"raw sqlite3 bulk load, reference: best of {runs} s",
            f"{reference:.2f}",
            f"{members / reference:,.0f}",
            "1.00x",
            "",
        )
    )
    for key, name in (("empty", "import_snapshot, empty store"), ("over", "import_snapshot, over the previous")):
        seconds, goal = imports[key]["seconds"], goals[key]
        title = f"{name}: best of " + " / ".join(f"{s:.2f}" for s in results["import_runs_s"][key]) + " s"
        verdict = f"<= {goal['limit']:.1f}x: {'met' if goal['met'] else 'NOT MET'}"
        rows.append((title, f"{seconds:.2f}", f"{members / seconds:,.0f}", f"{goal['value']:.2f}x", verdict))
    sales = imports["with_sales"]
    rows.append(
        (
            "import_snapshot, a sale every 20 ms",
            f"{sales['seconds']:.2f}",
            f"{members / sales['seconds']:,.0f}",
            f"{sales['seconds'] / reference:.2f}x",
            "",
        )
    )
    deltas = imports["deltas"]
    if deltas["available"]:
        rows.append(
            (
                f"apply_member_delta, {deltas['pages']} pages x {deltas['members'] // deltas['pages']:,} members",
                f"{deltas['seconds']:.2f}",
                f"{deltas['members'] / deltas['seconds']:,.0f}",
                "",
                "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    if sales["sales"]:
        out.append(
            f"sales during the third import: {sales['sales']:,}, p50 {sales['p50_ms']:.1f} ms, "
            f"longest {sales['max_ms']:.0f} ms"
        )
    if deltas["available"]:
        out.append(
            f"apply_member_delta per page (the whole call): p50 {deltas['page_p50_s'] * 1000:.0f} ms, "
            f"longest {deltas['page_max_s'] * 1000:.0f} ms"
        )
    else:
        out.append("delta apply: not available (LaneStore.apply_member_delta does not exist in this tree)")
    out.append(
        f"importing process: peak RSS {imports['peak_rss_mib']:.0f} MiB after two imports "
        f"({imports['rss_before_mib']:.0f} MiB with the store open, before importing); "
        f"database {imports['db_bytes'] / 2**20:,.0f} MiB after two imports"
    )
    return "\n".join(out)


def _default_members() -> int:
    text = os.environ.get("MEMBERS", "")
    return int(text.replace(",", "").replace("_", "")) if text.strip() else 1_000_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.members", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=_default_members(), help="default: $MEMBERS or 1,000,000")
    parser.add_argument("--pages", type=int, default=20, help="delta pages applied (default 20)")
    parser.add_argument("--page-members", type=int, default=5000, help="changed members per delta page (default 5,000)")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes: the disk measured")
    parser.add_argument("--fresh", action="store_true", help="write the snapshot again even if it is cached")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of reference + imports (default 2)")
    parser.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--phase", choices=("reference", "import"), help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.members < 1:
        parser.error("--members must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.phase == "reference":
        print(json.dumps(phase_reference(args.snapshot, args.db)))
        return 0
    if args.phase == "import":
        print(json.dumps(phase_import(args.snapshot, args.db, args.pages, args.page_members, extras=args.extras)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-members-", dir=args.dir) as tmp:
        results = run(args, Path(tmp))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    missed = [key for key, goal in results["targets"].items() if not goal["met"]]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
