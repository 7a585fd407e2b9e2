"""kill -9 in a loop of commits: no committed sale lost, none duplicated, the journal gapless.

A child process (tests/store_commit_loop.py) commits sales as fast as it can
and prints each sale_id after ``commit_sale`` returned; this test SIGKILLs it
at random moments, some during start-up and migrations, most mid-stream,
then reopens the database and checks it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO_ROOT

from agent.store import LaneStore

HELPER = REPO_ROOT / "tests" / "store_commit_loop.py"
KEY = bytes(range(32))
MIN_KILLS = 20
BUDGET_S = 20.0


def _wait_for_output(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and b"\n" in path.read_bytes():
            return
        if proc.poll() is not None:
            return
        time.sleep(0.005)


def test_kill_9_in_a_loop_of_commits(tmp_path: Path) -> None:
    db = tmp_path / "lane.db"
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    printed: list[str] = []
    kills = mid_stream = 0
    started = time.monotonic()
    while kills < MIN_KILLS or (time.monotonic() - started < BUDGET_S / 2 and kills < 3 * MIN_KILLS):
        out = tmp_path / f"run{kills}.out"
        err = tmp_path / f"run{kills}.err"
        argv = [sys.executable, str(HELPER), str(db), f"run{kills}"]
        if printed:
            argv.append(printed[-1])
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, cwd=REPO_ROOT, env=env)
            try:
                if rng.random() < 0.25:
                    time.sleep(rng.uniform(0.0, 0.6))  # anywhere from interpreter start to the first commits
                else:
                    _wait_for_output(out, proc, timeout=15)
                    time.sleep(rng.uniform(0.0, 0.08))
                    mid_stream += 1
                alive = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait(timeout=10)
        assert alive, f"seed {seed}: the committing process exited by itself: {err.read_text()}"
        assert proc.returncode == -signal.SIGKILL
        lines = out.read_bytes().decode().split("\n")
        printed.extend(lines[:-1])  # the last piece is "" or a line cut by the kill
        kills += 1
        assert time.monotonic() - started < 3 * BUDGET_S, f"seed {seed}: too slow, {kills} kills so far"

    print(f"seed {seed}: {kills} kills, {mid_stream} mid-stream, {len(printed)} sales printed")
    assert kills >= MIN_KILLS
    assert mid_stream >= MIN_KILLS // 2
    assert len(printed) > 100, f"seed {seed}: only {len(printed)} sales committed"
    assert len(set(printed)) == len(printed)

    async def check() -> None:
        async with await LaneStore.open(db, KEY) as store:  # quick_check at open
            assert await store.integrity_check() == ["ok"]
            status = await store.status()
            entries = []
            after = 0
            while batch := await store.journal_after(after, limit=1000):
                entries.extend(batch)
                after = batch[-1].seq
            assert [entry.seq for entry in entries] == list(range(1, status.last_seq + 1)), f"seed {seed}: gap"
            journaled = [entry.body["sale_id"] for entry in entries]
            assert len(set(journaled)) == len(journaled), f"seed {seed}: a sale journaled twice"
            missing = set(printed) - set(journaled)
            assert not missing, f"seed {seed}: printed but lost: {sorted(missing)[:5]}"
            assert await store.unsynced_spend("M000123") == (status.last_seq, 0)

    asyncio.run(check())
    conn = sqlite3.connect(db)
    try:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM journal), (SELECT count(*) FROM sales),"
            " (SELECT count(*) FROM sale_lines), (SELECT count(*) FROM own_spend)"
        ).fetchone()
    finally:
        conn.close()
    total = counts[0]
    assert counts == (total, total, 2 * total, total), f"seed {seed}: a sale half-written {counts}"
